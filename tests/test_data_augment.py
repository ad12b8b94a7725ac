"""Augmentation: AutoAugment ops against numpy references, the transform chain, decoding."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from ufo_jax.data import augment


def _image(h=24, w=16, seed=0) -> Image.Image:
  rng = np.random.default_rng(seed)
  # Smooth-ish content with a full value range (so equalize/autocontrast have work to do).
  base = rng.integers(30, 220, size=(h // 4, w // 4, 3)).astype(np.uint8)
  arr = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)).copy()
  arr[0, 0] = (3, 250, 17)
  return Image.fromarray(arr)


def _luma(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return np.round(0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])


def _blend(degenerate: np.ndarray, x: np.ndarray, f: float) -> np.ndarray:
  return np.clip(np.round(degenerate + f * (x.astype(np.float64) - degenerate)), 0, 255)


def _nearest_affine(x: np.ndarray, src_of: callable, fill: int) -> np.ndarray:
  """out[y, x] = x[floor(src)] at pixel centres, ``fill`` outside (nearest neighbour)."""
  h, w = x.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  sx, sy = src_of(xx + 0.5, yy + 0.5)
  ix, iy = np.floor(sx).astype(int), np.floor(sy).astype(int)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  out = np.full_like(x, fill)
  out[inside] = x[iy[inside], ix[inside]]
  return out


def _equalize_ref(x: np.ndarray) -> np.ndarray:
  out = np.empty_like(x)
  for c in range(x.shape[-1]):
    ch = x[..., c]
    hist = np.bincount(ch.ravel(), minlength=256)
    last = hist[np.flatnonzero(hist)[-1]]
    step = (hist.sum() - last) // 255
    if step == 0:
      out[..., c] = ch
      continue
    lut = np.minimum(255, (step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step)
    out[..., c] = lut[ch]
  return out


def _autocontrast_ref(x: np.ndarray) -> np.ndarray:
  out = np.empty_like(x)
  for c in range(x.shape[-1]):
    ch = x[..., c].astype(np.float64)
    lo, hi = ch.min(), ch.max()
    if hi <= lo:
      out[..., c] = x[..., c]
      continue
    scale = 255.0 / (hi - lo)
    out[..., c] = np.clip(np.floor(ch * scale - lo * scale), 0, 255)
  return out


def _sharpness_ref(x: np.ndarray, f: float) -> np.ndarray:
  xf = x.astype(np.float64)
  k = np.ones((3, 3))
  k[1, 1] = 5
  smooth = xf.copy()
  acc = np.zeros_like(xf[1:-1, 1:-1])
  for dy in range(3):
    for dx in range(3):
      acc += k[dy, dx] * xf[dy:dy + xf.shape[0] - 2, dx:dx + xf.shape[1] - 2]
  smooth[1:-1, 1:-1] = np.round(acc / 13)
  return _blend(smooth, x, f)


def _close(a, b, tol=1, frac=1.0):
  """All pixels within ``tol`` (or at least ``frac`` of them, for nearest-neighbour geometry)."""
  diff = np.abs(np.asarray(a, np.int64) - np.asarray(b, np.int64)).max(axis=-1)
  assert a.shape == b.shape
  assert (diff <= tol).mean() >= frac, f'{(diff > tol).mean():.3f} of pixels differ'


@pytest.mark.parametrize('bits', [4, 5, 6])
def test_posterize(bits):
  x = np.asarray(_image())
  got = np.asarray(augment.apply_op(_image(), 'Posterize', bits))
  np.testing.assert_array_equal(got, x & np.uint8((0xFF << (8 - bits)) & 0xFF))


@pytest.mark.parametrize('bin_index', [3, 5, 8])
def test_solarize(bin_index):
  thr = 255.0 - bin_index * 255.0 / 9  # torchvision linspace(255, 0, 10)
  x = np.asarray(_image())
  got = np.asarray(augment.apply_op(_image(), 'Solarize', thr))
  np.testing.assert_array_equal(got, np.where(x < thr, x, 255 - x))


def test_invert_equalize_autocontrast():
  x = np.asarray(_image())
  np.testing.assert_array_equal(np.asarray(augment.apply_op(_image(), 'Invert', 0.0)), 255 - x)
  np.testing.assert_array_equal(np.asarray(augment.apply_op(_image(), 'Equalize', 0.0)),
                                _equalize_ref(x))
  np.testing.assert_array_equal(np.asarray(augment.apply_op(_image(), 'AutoContrast', 0.0)),
                                _autocontrast_ref(x))


@pytest.mark.parametrize('op,m', [('Color', 0.4), ('Color', -0.8), ('Contrast', 0.8),
                                  ('Contrast', -0.8), ('Brightness', 0.3), ('Sharpness', 0.7),
                                  ('Sharpness', -0.7)])
def test_enhance_ops(op, m):
  x = np.asarray(_image())
  f = 1.0 + m
  if op == 'Color':
    ref = _blend(_luma(x)[..., None], x, f)
  elif op == 'Contrast':
    ref = _blend(np.full_like(x, int(_luma(x).mean() + 0.5), dtype=np.float64), x, f)
  elif op == 'Brightness':
    ref = _blend(np.zeros_like(x, dtype=np.float64), x, f)
  else:
    ref = _sharpness_ref(x, f)
  _close(np.asarray(augment.apply_op(_image(), op, m)), ref, tol=1)


@pytest.mark.parametrize('m', [0.3 * 5 / 9, -0.3 * 5 / 9])
def test_shear_x(m):
  x = np.asarray(_image())
  ref = _nearest_affine(x, lambda px, py: (px + m * py, py), fill=128)
  _close(np.asarray(augment.apply_op(_image(), 'ShearX', m, fill=128)), ref, tol=0, frac=0.97)


@pytest.mark.parametrize('angle', [30.0, -80.0 / 3, 10.0])
def test_rotate(angle):
  x = np.asarray(_image())
  h, w = x.shape[:2]
  a = math.radians(angle)  # counter-clockwise on screen: source = R(a) (p - c) + c, y down

  def src(px, py):
    dx, dy = px - w / 2, py - h / 2
    return (math.cos(a) * dx - math.sin(a) * dy + w / 2,
            math.sin(a) * dx + math.cos(a) * dy + h / 2)

  ref = _nearest_affine(x, src, fill=128)
  _close(np.asarray(augment.apply_op(_image(), 'Rotate', angle, fill=128)), ref, tol=0,
         frac=0.97)


def test_magnitude_bins_match_torchvision():
  bins = lambda op: augment.magnitude_bins(op, 128, 64)
  np.testing.assert_allclose(bins('Rotate')[0][[3, 8, 9]], [10.0, 80 / 3, 30.0])
  np.testing.assert_array_equal(bins('Posterize')[0], [8, 8, 7, 7, 6, 6, 5, 5, 4, 4])
  np.testing.assert_allclose(bins('Solarize')[0][[3, 5, 8]], [170.0, 255 - 5 * 255 / 9, 255 / 9])
  np.testing.assert_allclose(bins('Color')[0][[0, 4, 8]], [0.0, 0.4, 0.8])
  np.testing.assert_allclose(bins('ShearX')[0][5], 0.3 * 5 / 9)
  np.testing.assert_allclose(bins('TranslateX')[0][9], 150 / 331 * 64)
  assert bins('Rotate')[1] and not bins('Posterize')[1] and not bins('Solarize')[1]
  assert len(augment.IMAGENET_POLICY) == 25
  assert all(len(sp) == 2 for sp in augment.IMAGENET_POLICY)


class _ScriptedRng:
  """Stands in for np.random.Generator with scripted draws (sub-policy, probs, signs)."""

  def __init__(self, sub_policy, probs, signs):
    self.sub_policy, self.probs, self.signs = sub_policy, np.array(probs), np.array(signs)

  def integers(self, low, high=None, size=None):
    return self.sub_policy if size is None else self.signs

  def random(self, size=None):
    return self.probs


def test_auto_augment_draws():
  x = np.asarray(_image())
  # Sub-policy 0: (Posterize 0.4 bin 8 -> 4 bits), (Rotate 0.6 bin 9); 0.3 <= 0.4 applies, 0.7 not.
  got = augment.auto_augment(_image(), _ScriptedRng(0, [0.3, 0.7], [1, 1]))
  np.testing.assert_array_equal(np.asarray(got), x & np.uint8(0xF0))
  # Sub-policy 10: (Rotate 0.8 bin 8), (Color 0.4 bin 0); sign 0 negates the angle.
  got = augment.auto_augment(_image(), _ScriptedRng(10, [0.5, 0.9], [0, 1]), fill=128)
  want = augment.apply_op(_image(), 'Rotate', -80.0 / 3, fill=128)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Nothing applies when both draws exceed the probabilities.
  got = augment.auto_augment(_image(), _ScriptedRng(1, [0.61, 0.61], [1, 1]))
  np.testing.assert_array_equal(np.asarray(got), x)


def _smooth_image(h, w) -> Image.Image:
  """Low-frequency sinusoids (one period across the image), a different phase per channel."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  x = np.stack([127 + 100 * np.sin(2 * np.pi * (0.7 * xx + 0.4 * yy + ph)) for ph in (0, .3, .6)],
               axis=-1)
  return Image.fromarray(np.round(x).astype(np.uint8))


def _cubic(x, a):
  """Keys' cubic convolution kernel with parameter a."""
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


def _weights(n_in, n_out, a, edge):
  """(n_out, n_in) upsampling weights at half-pixel centres, 4 taps; edges 'replicate'
  (out-of-range taps read the edge pixel, as OpenCV) or 'renorm' (dropped, the rest
  renormalised, as PIL)."""
  m = np.zeros((n_out, n_in))
  for o in range(n_out):
    c = (o + 0.5) * n_in / n_out - 0.5
    for k in range(int(np.floor(c)) - 1, int(np.floor(c)) + 3):
      if edge == 'replicate':
        m[o, min(max(k, 0), n_in - 1)] += _cubic(c - k, a)
      elif 0 <= k < n_in:
        m[o, k] += _cubic(c - k, a)
    m[o] /= m[o].sum()
  return m


def _bicubic_ref(img: Image.Image, size: int, a: float, edge: str) -> np.ndarray:
  x = np.asarray(img, np.float64)
  y = np.einsum('oh,hwc->owc', _weights(x.shape[0], size, a, edge), x)
  y = np.einsum('pw,owc->opc', _weights(x.shape[1], size, a, edge), y)
  return np.clip(np.round(y), 0, 255)


def _diff(a, b) -> np.ndarray:
  return np.abs(np.asarray(a, np.int64) - np.asarray(b, np.int64))


def _noise_image(h, w, seed=0) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_default_backend_is_opencv_when_installed():
  want = 'cv2' if augment.cv2 is not None else 'pil'
  assert augment.DEFAULT_RESIZE_BACKEND == want
  assert augment.AugmentParams(image_size=8).resize_backend == want
  img = _image()
  np.testing.assert_array_equal(augment.resize(img, 40), augment.resize(img, 40, want))


@pytest.mark.parametrize('hw', [(24, 16), (21, 13), (40, 40)])
def test_cv2_resize_is_cubic_convolution_a075(hw):
  """OpenCV's INTER_CUBIC is Keys' kernel with a = -0.75 and replicated edges (torch's)."""
  img = _noise_image(*hw)
  got = augment.resize(img, 48, 'cv2')
  assert got.shape == (48, 48, 3) and got.dtype == np.uint8
  assert _diff(got, _bicubic_ref(img, 48, -0.75, 'replicate')).max() <= 1
  # ... and not PIL's a = -0.5 (on noise the two kernels differ by many grey levels).
  assert _diff(got, _bicubic_ref(img, 48, -0.5, 'replicate')).max() > 8
  assert augment.cv2.getNumThreads() == 1  # set single-threaded by the first resize


@pytest.mark.parametrize('hw', [(24, 16), (21, 13), (40, 40)])
def test_pil_resize_is_cubic_convolution_a05(hw):
  img = _smooth_image(*hw)
  got = augment.resize(img, 48, 'pil')
  np.testing.assert_array_equal(got, np.asarray(img.resize((48, 48), Image.Resampling.BICUBIC)))
  assert _diff(got, _bicubic_ref(img, 48, -0.5, 'renorm')).max() <= 1


@pytest.mark.parametrize('hw,size', [((24, 16), 48), ((21, 13), 40), ((112, 112), 384),
                                     ((128, 64), 384)])
def test_cv2_and_pil_agree_on_smooth_images(hw, size):
  d = _diff(augment.resize(_smooth_image(*hw), size, 'cv2'),
            augment.resize(_smooth_image(*hw), size, 'pil'))
  assert d.max() <= 2 and d.mean() < 0.6, (d.max(), d.mean())


@pytest.mark.parametrize('hw', [(64, 48), (30, 50), (50, 30)])
def test_shrinking_uses_pil_antialiased_resize(hw):
  img = _noise_image(*hw)
  want = np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(augment.resize(img, 40, 'cv2'), want)
  assert augment.resize_method(hw[1], hw[0], 40, 'cv2') == 'pil'
  assert augment.resize_method(16, 40, 40, 'cv2') == 'cv2'
  assert augment.resize_method(16, 24, 40, 'pil') == 'pil'


def test_train_transform_shape_dtype_default_params():
  params = augment.AugmentParams(image_size=32)
  rng = np.random.default_rng(0)
  for seed in range(8):
    out = augment.train_transform(_image(seed=seed), rng, params)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize('backend', ['cv2', 'pil'])
def test_train_transform_without_randomness_is_the_resize(backend):
  params = augment.AugmentParams(image_size=40, autoaugment_prob=0.0, pad=0, flip_prob=0.0,
                                 resize_backend=backend)
  img = _image()
  out = augment.train_transform(img, np.random.default_rng(0), params)
  np.testing.assert_array_equal(out, augment.resize(img, 40, backend))
  np.testing.assert_array_equal(augment.eval_transform(img, 40, backend), out)
  if backend == 'pil':
    np.testing.assert_array_equal(out, np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC)))
  else:
    assert _diff(out, _bicubic_ref(img, 40, -0.75, 'replicate')).max() <= 1


@pytest.mark.parametrize('backend', ['cv2', 'pil'])
@pytest.mark.parametrize('flip_prob,hw', [(0.0, (24, 16)), (1.0, (24, 16)), (1.0, (21, 13))])
def test_pad_crop_flip_against_numpy(backend, flip_prob, hw):
  s, pad = 24, 5
  params = augment.AugmentParams(image_size=s, autoaugment_prob=0.0, pad=pad, flip_prob=flip_prob,
                                 resize_backend=backend)
  img = _image(*hw)
  resized = augment.resize(img, s, backend)
  if backend == 'pil':
    np.testing.assert_array_equal(resized,
                                  np.asarray(img.resize((s, s), Image.Resampling.BICUBIC)))
  out = np.full((s, s, 3), 77, np.uint8)  # stale content: every pixel must be rewritten
  for seed in range(6):
    augment.train_transform_into(out, img, np.random.default_rng(seed), params)
    oy, ox = np.random.default_rng(seed).integers(0, 2 * pad + 1, size=2)
    padded = np.pad(resized, ((pad, pad), (pad, pad), (0, 0)))
    want = padded[oy:oy + s, ox:ox + s]
    if flip_prob:
      want = want[:, ::-1]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize('channels,dtype', [(3, np.uint8), (1, np.uint8), (5, np.uint8),
                                            (3, np.float32)])
def test_shift_into_against_brute_force(channels, dtype):
  rng = np.random.default_rng(channels)
  s = 12
  for src_hw in [(12, 12), (9, 14), (15, 7)]:
    src = rng.integers(1, 255, size=src_hw + (channels,)).astype(dtype)
    for dy, dx in [(0, 0), (3, -2), (-4, 5), (11, -11), (13, 0), (0, -20)]:
      for flip in (False, True):
        want = np.zeros((s, s, channels), dtype)
        for y in range(s):
          for x in range(s):
            yy, xx = y + dy, x + dx
            if 0 <= yy < src_hw[0] and 0 <= xx < src_hw[1]:
              want[y, x] = src[yy, xx]
        if flip:
          want = want[:, ::-1]
        out = np.full((s, s, channels), 255, dtype)
        augment.shift_into(out, src, dy, dx, flip=flip)
        np.testing.assert_array_equal(out, want, err_msg=f'{src_hw} {dy} {dx} {flip}')


def test_decode_image_and_failures():
  buf = io.BytesIO()
  _image().convert('L').save(buf, 'PNG')
  img = augment.decode_image(buf.getvalue())
  assert img.mode == 'RGB' and img.size == (16, 24)
  jpeg = io.BytesIO()
  _image(64, 64).save(jpeg, 'JPEG')
  for bad in (b'', b'not an image', jpeg.getvalue()[:200]):
    with pytest.raises(augment.DecodeError):
      augment.decode_image(bad)
  before = augment.decode_failure_counts().get('unit_test_set', 0)
  augment.record_decode_failure('unit_test_set', 7, augment.DecodeError('x'))
  assert augment.decode_failure_counts()['unit_test_set'] == before + 1


def test_params_validation(monkeypatch):
  with pytest.raises(ValueError, match='flip_prob'):
    augment.AugmentParams(image_size=8, flip_prob=1.5)
  with pytest.raises(ValueError, match='pad'):
    augment.AugmentParams(image_size=8, pad=-1)
  with pytest.raises(ValueError, match='resize backend'):
    augment.AugmentParams(image_size=8, resize_backend='bilinear')
  monkeypatch.setattr(augment, 'cv2', None)  # OpenCV not installed
  with pytest.raises(ValueError, match='opencv-python-headless'):
    augment.AugmentParams(image_size=8, resize_backend='cv2')
  with pytest.raises(ValueError, match='opencv-python-headless'):
    augment.resize(_image(), 8, 'cv2')
  # The numpy fallback of shift_into's flip still works without OpenCV.
  out = np.empty((4, 4, 3), np.uint8)
  src = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  augment.shift_into(out, src, 0, 1, flip=True)
  np.testing.assert_array_equal(out, np.pad(src[:, 1:], ((0, 0), (0, 1), (0, 0)))[:, ::-1])
