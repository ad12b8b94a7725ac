"""Augmentation: AutoAugment ops against numpy references, the transform chain, decoding."""

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

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


# The reference: fast-reid fastreid/data/transforms/autoaugment.py (timm's), policy 'original'.
# Its (op, probability) pairs are those of the AutoAugment paper's ImageNet policy (as in
# torchvision's AutoAugmentPolicy.IMAGENET, Posterize named PosterizeOriginal there).
_PAPER_PAIRS = [
    [('Posterize', 0.4), ('Rotate', 0.6)], [('Solarize', 0.6), ('AutoContrast', 0.6)],
    [('Equalize', 0.8), ('Equalize', 0.6)], [('Posterize', 0.6), ('Posterize', 0.6)],
    [('Equalize', 0.4), ('Solarize', 0.2)], [('Equalize', 0.4), ('Rotate', 0.8)],
    [('Solarize', 0.6), ('Equalize', 0.6)], [('Posterize', 0.8), ('Equalize', 1.0)],
    [('Rotate', 0.2), ('Solarize', 0.6)], [('Equalize', 0.6), ('Posterize', 0.4)],
    [('Rotate', 0.8), ('Color', 0.4)], [('Rotate', 0.4), ('Equalize', 0.6)],
    [('Equalize', 0.0), ('Equalize', 0.8)], [('Invert', 0.6), ('Equalize', 1.0)],
    [('Color', 0.6), ('Contrast', 1.0)], [('Rotate', 0.8), ('Color', 1.0)],
    [('Color', 0.8), ('Solarize', 0.8)], [('Sharpness', 0.4), ('Invert', 0.6)],
    [('ShearX', 0.6), ('Equalize', 1.0)], [('Color', 0.4), ('Equalize', 0.6)],
    [('Equalize', 0.4), ('Solarize', 0.2)], [('Solarize', 0.6), ('AutoContrast', 0.6)],
    [('Invert', 0.6), ('Equalize', 1.0)], [('Color', 0.6), ('Contrast', 1.0)],
    [('Equalize', 0.8), ('Equalize', 0.6)]]


def test_original_policy_table():
  policy = augment.ORIGINAL_POLICY
  assert len(policy) == 25 and all(len(sp) == 2 for sp in policy)
  pairs = [[(op.replace('PosterizeOriginal', 'Posterize'), p) for op, p, _ in sp]
           for sp in policy]
  assert pairs == _PAPER_PAIRS
  assert all(isinstance(level, int) and 0 <= level <= 10 for sp in policy for _, _, level in sp)
  # Levels of the reference table (spot checks across the list).
  assert policy[0] == (('PosterizeOriginal', 0.4, 8), ('Rotate', 0.6, 9))
  assert policy[1] == (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5))
  assert policy[10] == (('Rotate', 0.8, 8), ('Color', 0.4, 0))
  assert policy[17] == (('Sharpness', 0.4, 7), ('Invert', 0.6, 8))
  assert policy[18] == (('ShearX', 0.6, 5), ('Equalize', 1.0, 9))
  assert policy[24] == (('Equalize', 0.8, 8), ('Equalize', 0.6, 3))


# Worked out by hand from the reference's level -> argument functions (_MAX_LEVEL 10).
@pytest.mark.parametrize('level,bits', [(0, 4), (3, 5), (5, 6), (6, 6), (7, 6), (8, 7), (10, 8)])
def test_posterize_original_bits(level, bits):  # 4 + int(level / 10 * 4)
  x = np.asarray(_image())
  got = np.asarray(augment.apply_op(_image(), 'PosterizeOriginal', level))
  np.testing.assert_array_equal(got, x & np.uint8((0xFF << (8 - bits)) & 0xFF))


@pytest.mark.parametrize('level,thr', [(3, 76), (4, 102), (5, 128), (7, 179), (8, 204),
                                       (10, 256)])
def test_solarize_threshold(level, thr):  # int(level / 10 * 256); 256 inverts nothing
  x = np.asarray(_image())
  got = np.asarray(augment.apply_op(_image(), 'Solarize', level))
  np.testing.assert_array_equal(got, np.where(x < thr, x, 255 - x))


def test_invert_equalize_autocontrast():
  x = np.asarray(_image())
  for level in (0, 4, 8):  # no argument: the level is ignored
    np.testing.assert_array_equal(np.asarray(augment.apply_op(_image(), 'Invert', level)),
                                  255 - x)
    np.testing.assert_array_equal(np.asarray(augment.apply_op(_image(), 'Equalize', level)),
                                  _equalize_ref(x))
    np.testing.assert_array_equal(np.asarray(augment.apply_op(_image(), 'AutoContrast', level)),
                                  _autocontrast_ref(x))


# Enhancement factor level / 10 * 1.8 + 0.1, no sign: Color at level 0 is 0.1 (near grey).
@pytest.mark.parametrize('op,level,f', [('Color', 0, 0.1), ('Color', 2, 0.46), ('Color', 4, 0.82),
                                        ('Color', 8, 1.54), ('Contrast', 8, 1.54),
                                        ('Sharpness', 7, 1.36), ('Brightness', 3, 0.64)])
def test_enhance_factors(op, level, f):
  x = np.asarray(_image())
  if op == 'Color':
    ref = _blend(_luma(x)[..., None], x, f)
  elif op == 'Contrast':
    ref = _blend(np.full_like(x, int(_luma(x).mean() + 0.5), dtype=np.float64), x, f)
  elif op == 'Brightness':
    ref = _blend(np.zeros_like(x, dtype=np.float64), x, f)
  else:
    ref = _sharpness_ref(x, f)
  got = augment.apply_op(_image(), op, level, negate=True)  # the sign does not apply
  _close(np.asarray(got), ref, tol=1)
  assert augment.op_argument(op, level) == pytest.approx(f)


def _resamplings():
  return [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC]


@pytest.mark.parametrize('level,angle', [(9, 27.0), (8, 24.0), (3, 9.0)])
def test_rotate_angle(level, angle):  # level / 10 * 30 degrees, negated on demand
  img = _image()
  for negate in (False, True):
    for resample in _resamplings():
      want = img.rotate(-angle if negate else angle, resample=resample, fillcolor=(128,) * 3)
      got = augment.apply_op(img, 'Rotate', level, negate=negate, resample=resample)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The direction and the fill, against a numpy nearest-neighbour rotation: counter-clockwise
  # on screen, source = R(a) (p - c) + c with y down.
  x = np.asarray(img)
  h, w = x.shape[:2]
  a = math.radians(angle)

  def src(px, py):
    dx, dy = px - w / 2, py - h / 2
    return (math.cos(a) * dx - math.sin(a) * dy + w / 2,
            math.sin(a) * dx + math.cos(a) * dy + h / 2)

  got = augment.apply_op(img, 'Rotate', level, resample=Image.Resampling.NEAREST, fill=77)
  _close(np.asarray(got), _nearest_affine(x, src, fill=77), tol=0, frac=0.97)


def test_shear_x():  # level / 10 * 0.3, negated on demand
  img, x = _image(), np.asarray(_image())
  for negate, m in ((False, 0.15), (True, -0.15)):
    for resample in _resamplings():
      want = img.transform(img.size, Image.Transform.AFFINE, (1, m, 0, 0, 1, 0),
                           resample=resample, fillcolor=(128,) * 3)
      got = augment.apply_op(img, 'ShearX', 5, negate=negate, resample=resample)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got = augment.apply_op(img, 'ShearX', 5, negate=negate, resample=Image.Resampling.NEAREST)
    ref = _nearest_affine(x, lambda px, py, m=m: (px + m * py, py), fill=128)
    _close(np.asarray(got), ref, tol=0, frac=0.97)


def test_op_arguments_of_other_reference_ops():
  arg = augment.op_argument
  assert arg('ShearY', 10, True) == pytest.approx(-0.3)
  assert arg('TranslateX', 5) == pytest.approx(28.5)  # translate_const 57
  assert arg('TranslateYRel', 10, True) == pytest.approx(-0.45)
  assert arg('Posterize', 6) == 2 and arg('PosterizeIncreasing', 6) == 2
  assert arg('SolarizeIncreasing', 5) == 128 and arg('SolarizeAdd', 5) == 55
  assert arg('ColorIncreasing', 5, True) == pytest.approx(0.55)
  assert arg('Rotate', 14) == pytest.approx(30.0) and arg('Rotate', -3) == 0.0  # clipped level
  assert arg('Equalize', 3) is None
  x = np.asarray(_image())
  got = np.asarray(augment.apply_op(_image(), 'SolarizeAdd', 5))
  np.testing.assert_array_equal(got, np.where(x < 128, np.minimum(255, x.astype(int) + 55), x))
  got = augment.apply_op(_image(), 'TranslateX', 5, negate=True, fill=9)
  want = _image().transform((16, 24), Image.Transform.AFFINE, (1, 0, -28.5, 0, 1, 0),
                            resample=Image.Resampling.BILINEAR, fillcolor=(9, 9, 9))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match='unknown AutoAugment operation'):
    augment.apply_op(_image(), 'Cutout', 5)


class _ScriptedRng:
  """Stands in for np.random.Generator: scripted ``integers`` and ``random`` draws, in order."""

  def __init__(self, integers, randoms):
    self.ints, self.rands = list(integers), list(randoms)

  def integers(self, low, high=None, size=None):
    assert size is None
    return self.ints.pop(0)

  def random(self, size=None):
    assert size is None
    return self.rands.pop(0)

  def exhausted(self):
    return not self.ints and not self.rands


def test_auto_augment_draws():
  img = _image()
  bicubic = Image.Resampling.BICUBIC
  # Sub-policy 0: (PosterizeOriginal 0.4, level 8 -> 7 bits), (Rotate 0.6, level 9 -> 27 deg).
  # Draws: op 1 u = 0.4 <= 0.4 applies; op 2 u = 0.5 applies, sign u = 0.7 > 0.5 negates,
  # resampling index 1 = bicubic.
  rng = _ScriptedRng([0, 1], [0.4, 0.5, 0.7])
  got = augment.auto_augment(img, rng)
  want = ImageOps.posterize(img, 7).rotate(-27.0, resample=bicubic, fillcolor=(128,) * 3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert rng.exhausted()
  # Sub-policy 7: (PosterizeOriginal 0.8) skipped (u = 0.81 > 0.8); (Equalize 1.0) always
  # applies, drawing nothing.
  rng = _ScriptedRng([7], [0.81])
  got = augment.auto_augment(img, rng)
  np.testing.assert_array_equal(np.asarray(got), _equalize_ref(np.asarray(img)))
  assert rng.exhausted()
  # Sub-policy 18: (ShearX 0.6, level 5): sign u = 0.2 keeps +0.15, bilinear; fill 77.
  rng = _ScriptedRng([18, 0], [0.1, 0.2])
  got = augment.auto_augment(img, rng, fill=77)
  want = img.transform(img.size, Image.Transform.AFFINE, (1, 0.15, 0, 0, 1, 0),
                       resample=Image.Resampling.BILINEAR, fillcolor=(77,) * 3)
  want = ImageOps.equalize(want)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert rng.exhausted()


def test_train_transform_applies_auto_augment_with_probability_p():
  """fast-reid's RandomApply([AutoAugment()], p) before the resize: u < p applies it."""
  params = augment.AugmentParams(image_size=24, autoaugment_prob=0.5, pad=0, flip_prob=0.0,
                                 resize_backend='pil')
  img = _image()
  plain = augment.resize(img, 24, 'pil')
  # u = 0.7 >= 0.5: no AutoAugment, nothing else drawn.
  out = augment.train_transform(img, _ScriptedRng([], [0.7]), params)
  np.testing.assert_array_equal(out, plain)
  # u = 0.2 < 0.5: sub-policy 13 (Invert 0.6, Equalize 1.0) on the source, then the resize.
  rng = _ScriptedRng([13], [0.2, 0.3])
  out = augment.train_transform(img, rng, params)
  want = augment.resize(ImageOps.equalize(ImageOps.invert(img)), 24, 'pil')
  np.testing.assert_array_equal(out, want)
  assert rng.exhausted()


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


def test_default_backend_is_numpy_pil_bicubic():
  assert augment.DEFAULT_RESIZE_BACKEND == 'numpy'
  assert augment.AugmentParams(image_size=8).resize_backend == 'numpy'
  img = _image()
  np.testing.assert_array_equal(augment.resize(img, 40), augment.resize(img, 40, 'numpy'))
  np.testing.assert_array_equal(augment.eval_transform(img, 40), augment.resize(img, 40))


@pytest.mark.parametrize('n_in,n_out', [(24, 48), (13, 40), (112, 384), (64, 384), (40, 41)])
def test_pil_bicubic_weights_upsampling_match_keys_kernel(n_in, n_out):
  """Enlarging: 4 taps of Keys' a = -0.5 at half-pixel centres, edge taps dropped and the
  rest renormalised (the independent reference ``_weights``)."""
  np.testing.assert_allclose(augment.pil_bicubic_weights(n_in, n_out),
                             _weights(n_in, n_out, -0.5, 'renorm'), atol=1e-12)


def test_pil_bicubic_weights_shrinking_widen_the_kernel():
  w = augment.pil_bicubic_weights(100, 40)  # scale 2.5: support 5 input pixels each side
  np.testing.assert_allclose(w.sum(axis=1), 1.0)
  assert (np.count_nonzero(w, axis=1)[5:-5] >= 9).all()
  centre = 20
  c = (centre + 0.5) * 2.5  # the output pixel's centre in input coordinates
  taps = np.arange(100)
  want = _cubic((taps + 0.5 - c) / 2.5, -0.5)
  np.testing.assert_allclose(w[centre], want / want.sum(), atol=1e-12)


@pytest.mark.parametrize('hw,size', [((24, 16), 48), ((21, 13), 40), ((112, 112), 384),
                                     ((128, 64), 384), ((7, 3), 40), ((40, 40), 41),
                                     ((60, 300), 384)])
@pytest.mark.parametrize('kind', ['noise', 'smooth'])
def test_numpy_resize_matches_pil_within_one_grey_level(hw, size, kind):
  img = _noise_image(*hw) if kind == 'noise' else _smooth_image(*hw)
  want = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
  got = augment.resize_numpy(np.asarray(img), size, size)
  assert got.shape == (size, size, 3) and got.dtype == np.uint8
  d = _diff(got, want)
  assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())
  d = _diff(augment.resize(img, size, 'numpy'), want)  # numpy or PIL itself (resize_method)
  assert d.max() <= 1 and (d > 0).mean() < 0.01


def test_numpy_backend_uses_the_matrix_products_on_small_enlarged_sources():
  method = lambda w, h: augment.resize_method(w, h, 384, 'numpy')  # noqa: E731
  assert method(112, 112) == method(64, 128) == method(150, 240) == 'numpy'  # <= 192^2 px
  assert method(200, 200) == method(300, 300) == method(150, 300) == 'pil'
  assert method(400, 100) == method(384, 385) == 'pil'  # a side shrinks
  img = _noise_image(200, 200)
  np.testing.assert_array_equal(augment.resize(img, 384, 'numpy'),
                                np.asarray(img.resize((384, 384), Image.Resampling.BICUBIC)))


@pytest.mark.parametrize('hw,out_hw', [((64, 48), (40, 40)), ((385, 383), (384, 384)),
                                       ((300, 20), (100, 40)), ((20, 30), (20, 90))])
def test_resize_numpy_any_sizes_matches_pil(hw, out_hw):
  """The matrix products for shrinking and one-axis resizes too (resize() hands shrinking
  to PIL itself, which is exact and as fast there)."""
  img = _noise_image(*hw)
  want = np.asarray(img.resize(out_hw[::-1], Image.Resampling.BICUBIC))
  d = _diff(augment.resize_numpy(np.asarray(img), *out_hw), want)
  assert d.max() <= 1 and (d > 0).mean() < 0.01
  if out_hw[0] < hw[0] or out_hw[1] < hw[1]:
    assert augment.resize_method(hw[1], hw[0], max(out_hw), 'numpy') == 'pil'


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
  np.testing.assert_array_equal(augment.resize(img, 40, 'numpy'), want)
  assert augment.resize_method(hw[1], hw[0], 40, 'cv2') == 'pil'
  assert augment.resize_method(hw[1], hw[0], 40, 'numpy') == 'pil'
  assert augment.resize_method(16, 40, 40, 'cv2') == 'cv2'
  assert augment.resize_method(16, 24, 40, 'pil') == 'pil'


def test_train_transform_shape_dtype_default_params():
  params = augment.AugmentParams(image_size=32)
  rng = np.random.default_rng(0)
  for seed in range(8):
    out = augment.train_transform(_image(seed=seed), rng, params)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize('backend', ['numpy', 'cv2', 'pil'])
def test_train_transform_without_randomness_is_the_resize(backend):
  params = augment.AugmentParams(image_size=40, autoaugment_prob=0.0, pad=0, flip_prob=0.0,
                                 resize_backend=backend)
  img = _image()
  out = augment.train_transform(img, np.random.default_rng(0), params)
  np.testing.assert_array_equal(out, augment.resize(img, 40, backend))
  np.testing.assert_array_equal(augment.eval_transform(img, 40, backend), out)
  if backend == 'pil':
    np.testing.assert_array_equal(out, np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC)))
  elif backend == 'numpy':
    assert _diff(out, np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC))).max() <= 1
  else:
    assert _diff(out, _bicubic_ref(img, 40, -0.75, 'replicate')).max() <= 1


@pytest.mark.parametrize('backend', ['numpy', 'cv2', 'pil'])
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
    if backend == 'numpy':  # it flips the source: mirror-symmetric to float32 rounding
      assert _diff(out, want).max() <= 1 and (_diff(out, want) > 0).mean() < 0.01
    else:
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


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path):
  """A 16-bit grey PNG and TIFF as scanners and microscopes write them (PIL mode I;16)."""
  rng = np.random.default_rng(3)
  deep = rng.integers(0, 65536, (24, 16), dtype=np.uint16)
  want = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2)
  for name in ('deep.png', 'deep.tif'):
    Image.fromarray(deep).save(tmp_path / name)
    with Image.open(tmp_path / name) as raw:
      assert raw.mode == 'I;16'
      assert np.asarray(raw.convert('RGB')).mean() > 250  # what PIL alone makes of it: white
    got = augment.decode_image((tmp_path / name).read_bytes())
    np.testing.assert_array_equal(np.asarray(got), want)
  # 8-bit values held in a 32-bit grey image stay as they are.
  small = rng.integers(0, 256, (5, 7)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(augment.to_8_bit(Image.fromarray(small, 'I'))), small)
