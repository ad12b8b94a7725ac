"""Host-side image decoding and augmentation (docs/INPUT.md), with PIL and numpy (OpenCV optional).

The training transform of one example, in the order of the reference (fast-reid's
``build_transforms`` as UFO's training builds it):

  AutoAugment (fast-reid's policy 'original', applied with probability p, fill 128)
  -> bicubic resize to image_size x image_size (PIL's bicubic, as ``T.Resize(size, 3)``)
  -> pad ``pad`` pixels (constant 0) and random crop back to image_size
  -> horizontal flip with probability ``flip_prob``

The host yields uint8 images; normalisation ((x - 127.5) / 127.5) and random
erasing run on the device inside the train step (``ufo_jax/data/device_ops.py``),
where they cost nothing next to the model (see docs/PERFORMANCE.md).

AutoAugment follows fast-reid's ``fastreid/data/transforms/autoaugment.py`` (a timm
derivative), ``auto_augment_policy_original``: ``ORIGINAL_POLICY`` holds its 25
sub-policies of two (op_name, probability, level), levels 0-10 (``MAX_LEVEL``), and
``op_argument`` its level -> argument functions (rotate level/10 x 30 degrees, shear
level/10 x 0.3, both randomly negated; enhance factors level/10 x 1.8 + 0.1;
PosterizeOriginal keeps 4 + int(level/10 x 4) bits; Solarize's threshold is
int(level/10 x 256)). Geometric ops resample bilinear or bicubic at random and fill
with 128. ``apply_op`` is one op with the random sign and resampling given explicitly,
``auto_augment`` the random policy. The evaluation transform is the resize alone.

Bicubic resize (``resize``): by default ('numpy') PIL's bicubic -- Keys' kernel with
a = -0.5, widened when shrinking (antialiasing), weights renormalised at the edges,
horizontal pass rounded to uint8 before the vertical one -- computed as banded float32
matrix products, within +-1 grey level of PIL and 1.6-2x faster than PIL when enlarging
small sources (faces, person crops); PIL itself resizes the others (``resize_method``).
'pil' is PIL itself; 'cv2' is OpenCV's INTER_CUBIC (a = -0.75, replicated edges: not the
reference's kernel; PIL when shrinking), run single-threaded (``cv2.setNumThreads(0)`` in
every process that resizes): parallelism comes from the grain worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageOps

try:
  import cv2
except ImportError:  # opencv-python-headless not installed: PIL's bicubic resize
  cv2 = None

BACKEND_NUMPY = 'numpy'  # PIL's bicubic weights as banded float32 matrix products (default)
BACKEND_PIL = 'pil'  # PIL bicubic (a = -0.5), as torchvision's Resize on PIL images
BACKEND_CV2 = 'cv2'  # OpenCV INTER_CUBIC (a = -0.75) when upsampling, PIL when shrinking
RESIZE_BACKENDS = (BACKEND_NUMPY, BACKEND_PIL, BACKEND_CV2)
DEFAULT_RESIZE_BACKEND = BACKEND_NUMPY

# --------------------------------------------------------------------------- decoding


class DecodeError(ValueError):
  """An image record whose bytes do not decode to an image."""


# Failed decodes per dataset in this process (each grain worker process counts
# its own; every failure is also logged with the dataset and record index).
DECODE_FAILURES: collections.Counter = collections.Counter()
_LOG_FIRST = 10  # failures logged per dataset before logging every 1000th


_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_8_bit(img: Image.Image) -> Image.Image:
  """A 16-bit grey image (PIL mode ``I;16*``, or ``I`` with values above 255) scaled to 8 bits
  (``value >> 8``, as PIL reduces 16-bit RGB PNGs); ``convert('RGB')`` would clip it to white.
  Other images are returned as they are."""
  if img.mode not in _SIXTEEN_BIT_MODES:
    return img
  values = np.asarray(img).astype(np.int64)
  if img.mode == 'I' and values.max(initial=0) <= 255:
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), 'L')  # 8-bit range in I
  return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), 'L')


def decode_image(data: bytes, *, exif_transpose: bool = False) -> Image.Image:
  """Decodes encoded JPEG/PNG/... bytes to an RGB PIL image; DecodeError if it cannot.

  16-bit grey images are scaled to 8 bits (``to_8_bit``). ``exif_transpose``: rotate / mirror
  as the EXIF orientation tag says (``PIL.ImageOps.exif_transpose``; what ``ufo_jax.embed``
  does for photos; the training and evaluation data are read as stored).
  """
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    if exif_transpose:
      img = ImageOps.exif_transpose(img)
    img = to_8_bit(img)
    if img.mode != 'RGB':
      img = img.convert('RGB')
  except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as e:
    raise DecodeError(f'{type(e).__name__}: {e}') from None
  if img.width < 1 or img.height < 1:
    raise DecodeError(f'empty image of size {img.size}')
  return img


def record_decode_failure(dataset: str, record: int, error: Exception) -> None:
  """Counts a failed decode and logs it (the record is skipped by the caller)."""
  DECODE_FAILURES[dataset] += 1
  n = DECODE_FAILURES[dataset]
  if n <= _LOG_FIRST or n % 1000 == 0:
    logging.warning('ufo_jax.data: record %d of %s does not decode (%s); skipped '
                    '(%d failures in %s so far in this process)', record, dataset, error, n,
                    dataset)


def decode_failure_counts() -> dict[str, int]:
  """Failed decodes per dataset counted in this process (grain workers count their own)."""
  return dict(DECODE_FAILURES)


# ------------------------------------------------------------------------ AutoAugment

# fast-reid's ``auto_augment_policy_original`` (the ImageNet policy of the AutoAugment paper, in
# the level convention of timm, from which fast-reid's transforms/autoaugment.py derives):
# 25 sub-policies of two (op_name, probability, level), level in 0..10.
ORIGINAL_POLICY: tuple[tuple[tuple[str, float, int], ...], ...] = (
    (('PosterizeOriginal', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
    (('PosterizeOriginal', 0.6, 7), ('PosterizeOriginal', 0.6, 6)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, 4), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, 7)),
    (('PosterizeOriginal', 0.8, 5), ('Equalize', 1.0, 2)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, 8), ('PosterizeOriginal', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, 2)),
    (('Equalize', 0.0, 7), ('Equalize', 0.8, 8)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, 8)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, 9)),
    (('Color', 0.4, 0), ('Equalize', 0.6, 3)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
)

MAX_LEVEL = 10.0
TRANSLATE_CONST = 57  # pixels at level 10 of TranslateX/Y (the reference's default hparams)
TRANSLATE_PCT = 0.45  # fraction of the side at level 10 of TranslateX/YRel
# The geometric ops' resampling, drawn uniformly per op application as the reference does.
RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

_ENHANCE = {'Color': ImageEnhance.Color, 'Contrast': ImageEnhance.Contrast,
            'Brightness': ImageEnhance.Brightness, 'Sharpness': ImageEnhance.Sharpness}
_AFFINE_OPS = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')
GEOMETRIC_OPS = frozenset(_AFFINE_OPS + ('Rotate',))  # take ``resample`` and ``fill``
# Ops whose argument the reference negates with probability 1/2 (``negate`` here).
SIGNED_OPS = GEOMETRIC_OPS | {name + 'Increasing' for name in _ENHANCE}
OP_NAMES = frozenset(
    ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'PosterizeIncreasing',
     'PosterizeOriginal', 'Solarize', 'SolarizeIncreasing', 'SolarizeAdd')
    + tuple(_ENHANCE) + tuple(SIGNED_OPS))


def op_argument(op_name: str, level: float, negate: bool = False):
  """The reference's argument of ``op_name`` at ``level`` (clipped to [0, 10]); None if none.

  Angles in degrees (Rotate), shear factors, translation pixels (TranslateX/Y) or fractions of
  the side (TranslateX/YRel), enhancement factors, bits kept (Posterize*), thresholds
  (Solarize*) or the added value (SolarizeAdd). ``negate`` flips the sign of SIGNED_OPS.
  """
  if op_name not in OP_NAMES:
    raise ValueError(f'unknown AutoAugment operation {op_name!r}')
  frac = min(MAX_LEVEL, max(0.0, level)) / MAX_LEVEL
  sign = -1.0 if negate else 1.0
  if op_name in ('AutoContrast', 'Equalize', 'Invert'):
    return None
  if op_name == 'Rotate':
    return sign * (frac * 30.0)
  if op_name in ('ShearX', 'ShearY'):
    return sign * (frac * 0.3)
  if op_name in ('TranslateX', 'TranslateY'):
    return sign * (frac * float(TRANSLATE_CONST))
  if op_name in ('TranslateXRel', 'TranslateYRel'):
    return sign * (frac * TRANSLATE_PCT)
  if op_name in _ENHANCE:
    return frac * 1.8 + 0.1
  if op_name.endswith('Increasing') and op_name[:-len('Increasing')] in _ENHANCE:
    return 1.0 + sign * (frac * 0.9)
  if op_name == 'Posterize':
    return int(frac * 4)
  if op_name == 'PosterizeIncreasing':
    return 4 - int(frac * 4)
  if op_name == 'PosterizeOriginal':
    return int(frac * 4) + 4
  if op_name == 'Solarize':
    return int(frac * 256)
  if op_name == 'SolarizeIncreasing':
    return 256 - int(frac * 256)
  return int(frac * 110)  # SolarizeAdd


def apply_op(img: Image.Image, op_name: str, level: float, *, negate: bool = False,
             resample=Image.BILINEAR, fill: int = 128) -> Image.Image:
  """One AutoAugment op of fast-reid's policy at ``level`` (0-10) on a PIL image.

  Pixel-identical to the reference op at that level, with its random negation given by
  ``negate`` (SIGNED_OPS only) and its random bilinear/bicubic choice by ``resample``
  (GEOMETRIC_OPS only); ``fill`` is the grey of pixels from outside the image.
  """
  arg = op_argument(op_name, level, negate)
  if op_name == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if op_name == 'Equalize':
    return ImageOps.equalize(img)
  if op_name == 'Invert':
    return ImageOps.invert(img)
  fillcolor = (fill,) * len(img.getbands())
  if op_name == 'Rotate':
    return img.rotate(arg, resample=resample, fillcolor=fillcolor)
  if op_name in _AFFINE_OPS:
    if op_name == 'TranslateXRel':
      arg = arg * img.size[0]
    elif op_name == 'TranslateYRel':
      arg = arg * img.size[1]
    matrix = {'ShearX': (1, arg, 0, 0, 1, 0), 'ShearY': (1, 0, 0, arg, 1, 0),
              'TranslateX': (1, 0, arg, 0, 1, 0), 'TranslateY': (1, 0, 0, 0, 1, arg),
              'TranslateXRel': (1, 0, arg, 0, 1, 0), 'TranslateYRel': (1, 0, 0, 0, 1, arg)}[op_name]
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample,
                         fillcolor=fillcolor)
  if op_name.startswith('Posterize'):
    return img if arg >= 8 else ImageOps.posterize(img, arg)
  if op_name in ('Solarize', 'SolarizeIncreasing'):
    return ImageOps.solarize(img, arg)
  if op_name == 'SolarizeAdd':
    if img.mode not in ('L', 'RGB'):
      return img
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))
  enhance = _ENHANCE[op_name.removesuffix('Increasing')]
  return enhance(img).enhance(arg)


def auto_augment(img: Image.Image, rng: np.random.Generator, fill: int = 128,
                 policy=ORIGINAL_POLICY) -> Image.Image:
  """fast-reid ``AutoAugment()``: one sub-policy uniformly, then each op with its probability.

  Draws, in the reference's order: the sub-policy; per op, ``u > p`` skips it (no draw when
  p >= 1); then, for SIGNED_OPS, the sign (negated when ``u > 0.5``); then, for
  GEOMETRIC_OPS, bilinear or bicubic resampling with probability 1/2 each.
  """
  sub_policy = policy[int(rng.integers(len(policy)))]
  for op_name, prob, level in sub_policy:
    if prob < 1.0 and rng.random() > prob:
      continue
    negate = bool(rng.random() > 0.5) if op_name in SIGNED_OPS else False
    resample = Image.Resampling.BILINEAR
    if op_name in GEOMETRIC_OPS:
      resample = RANDOM_RESAMPLE[int(rng.integers(len(RANDOM_RESAMPLE)))]
    img = apply_op(img, op_name, level, negate=negate, resample=resample, fill=fill)
  return img


# ------------------------------------------------------------------------ transforms


RECIPE_PAD = 10  # the recipe's crop pad (configs/ufo_l.py) ...
RECIPE_IMAGE_SIZE = 384  # ... at its input size


def scaled_pad(image_size: int) -> int:
  """The recipe's crop pad scaled to ``image_size`` (rounded down): 1 px at 64, 0 at 32.

  Unscaled, 10 px is 31 % of a 32 px input, and tiny models stayed near chance
  (docs/PERFORMANCE.md, "The reduced version in the tests").
  """
  return int(RECIPE_PAD * image_size / RECIPE_IMAGE_SIZE)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """The host-side part of ``config.input.augment`` and the output size.

  ``resize_backend`` ('numpy', 'pil' or 'cv2') is not a config field: it defaults to
  ``DEFAULT_RESIZE_BACKEND`` ('numpy', PIL's bicubic to +-1); benchmarks and tests set it.
  """

  image_size: int
  autoaugment_prob: float = 0.5
  autoaugment_fill: int = 128
  pad: int = 10
  flip_prob: float = 0.5
  resize_backend: str = DEFAULT_RESIZE_BACKEND

  def __post_init__(self):
    if self.image_size < 1:
      raise ValueError(f'config.input.image_size must be positive, got {self.image_size}')
    for name in ('autoaugment_prob', 'flip_prob'):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f'config.input.augment.{name} must be in [0, 1], got {p}')
    if self.pad < 0:
      raise ValueError(f'config.input.augment.pad must be >= 0, got {self.pad}')
    if not 0 <= self.autoaugment_fill <= 255:
      raise ValueError('config.input.augment.autoaugment_fill must be in [0, 255], '
                       f'got {self.autoaugment_fill}')
    check_resize_backend(self.resize_backend)

  @classmethod
  def from_config(cls, config) -> 'AugmentParams':
    aug = config.input.augment
    return cls(image_size=int(config.input.image_size),
               autoaugment_prob=float(aug.get('autoaugment_prob', 0.5)),
               autoaugment_fill=int(aug.get('autoaugment_fill', 128)),
               pad=int(aug.get('pad', 10)),
               flip_prob=float(aug.get('flip_prob', 0.5)))


# --------------------------------------------------------------------------- resizing

_CV2_CONFIGURED_PID = None  # the process in which cv2 was last set single-threaded


def check_resize_backend(backend: str) -> str:
  """``backend`` if it is 'numpy', 'pil' or 'cv2' (and OpenCV is installed); else ValueError."""
  if backend not in RESIZE_BACKENDS:
    raise ValueError(f'resize backend must be one of {RESIZE_BACKENDS}, got {backend!r}')
  if backend == BACKEND_CV2 and cv2 is None:
    raise ValueError("resize backend 'cv2' needs OpenCV: pip install opencv-python-headless "
                     "(or use 'numpy' or 'pil')")
  return backend


def _cv2_single_threaded():
  """cv2, set single-threaded once per process (grain workers are separate processes)."""
  global _CV2_CONFIGURED_PID
  pid = os.getpid()
  if _CV2_CONFIGURED_PID != pid:
    cv2.setNumThreads(0)  # 0: run sequentially, no OpenCV thread pool
    _CV2_CONFIGURED_PID = pid
  return cv2


def resize_method(width: int, height: int, size: int, backend: str) -> str:
  """The library that resizes a width x height image to size x size with ``backend``.

  'cv2': OpenCV only where no side shrinks, else PIL (when shrinking, PIL's bicubic widens
  its kernel, antialiasing; INTER_CUBIC does not). 'numpy': the matrix products where
  they are faster than PIL itself, enlarging sources of at most (size / 2)^2 pixels (112 x
  112 faces, 128 x 64 persons to 384: 1.6-2x faster); PIL (exact) for the others, where
  the horizontal pass over many rows costs as much as PIL's whole resize
  (docs/PERFORMANCE.md). Both give PIL's result to +-1 grey level.
  """
  if backend == BACKEND_CV2 and width <= size and height <= size:
    return BACKEND_CV2
  if backend == BACKEND_NUMPY and width <= size and height <= size and (
      4 * width * height <= size * size):
    return BACKEND_NUMPY
  return BACKEND_PIL


# PIL's bicubic as matrix products. Each output pixel of PIL's separable resampling is a
# weighted sum of a few neighbouring input pixels (4 when enlarging, 4 x in/out when shrinking,
# where the kernel widens: antialiasing), the weights normalised to sum to 1 (so taps outside
# the image are dropped, not replicated). PIL does the horizontal pass first, rounds and clips
# to uint8, then the vertical pass. The same here in float32: the horizontal pass multiplies
# the (H, W*C) image on the right by a channel-interleaved banded matrix, the vertical one on
# the left by the (S, H) banded matrix, both in blocks of _BLOCK outputs so that only the band
# is multiplied. PIL's weights are fixed-point (22 bits), ours float32: results agree within
# +-1 grey level (rarely 1, where a value falls on .5; tests/test_data_augment.py).
_BLOCK = 16
# Multiply-adds per matrix product, kept under OpenBLAS's threshold for using threads
# (4 x 65536): the products run single-threaded, parallelism is the grain workers'.
_GEMM_MAX_MACS = 200_000


def _bicubic_kernel(x: np.ndarray) -> np.ndarray:
  """PIL's bicubic filter: Keys' cubic convolution with a = -0.5, support 2."""
  a = -0.5
  x = np.abs(x)
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 weights of PIL's bicubic resampling along one axis.

  PIL's ``precompute_coeffs``: the output pixel xx samples at
  ``center = (xx + 0.5) * in/out``; the kernel is widened by ``max(in/out, 1)``; taps
  ``int(center -+ support + 0.5)`` clipped to the image; weights normalised to sum 1.
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  ss = 1.0 / filterscale
  out = np.zeros((out_size, in_size))
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    w = _bicubic_kernel((np.arange(xmin, xmax) - center + 0.5) * ss)
    total = w.sum()
    out[xx, xmin:xmax] = w / total if total != 0.0 else 0.0
  return out


@functools.lru_cache(maxsize=256)
def _bands(in_size: int, out_size: int) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
  """Blocks (o0, o1, i0, i1, weights[o0:o1, i0:i1] float32) covering the banded weights."""
  w = pil_bicubic_weights(in_size, out_size)
  blocks = []
  for o0 in range(0, out_size, _BLOCK):
    o1 = min(out_size, o0 + _BLOCK)
    used = np.flatnonzero(np.any(w[o0:o1] != 0.0, axis=0))
    i0, i1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
    blocks.append((o0, o1, i0, i1, np.ascontiguousarray(w[o0:o1, i0:i1], np.float32)))
  return tuple(blocks)


@functools.lru_cache(maxsize=256)
def _bands_interleaved(in_size: int, out_size: int, channels: int):
  """``_bands`` transposed for right multiplication of (rows, in_size * channels) images."""
  blocks = []
  for o0, o1, i0, i1, w in _bands(in_size, out_size):
    m = np.zeros(((i1 - i0) * channels, (o1 - o0) * channels), np.float32)
    for c in range(channels):
      m[c::channels, c::channels] = w.T
    blocks.append((o0 * channels, o1 * channels, i0 * channels, i1 * channels, m))
  return tuple(blocks)


def _round_clip(x: np.ndarray) -> np.ndarray:
  """In place: PIL's ``clip8((v * 2^22 + 2^21) >> 22)``, i.e. floor(v + 0.5) in [0, 255]."""
  x += 0.5
  np.floor(x, out=x)
  return np.clip(x, 0.0, 255.0, out=x)


def resize_numpy(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL's bicubic resize of a (H, W, C) uint8 array to (height, width, C) uint8, to +-1.

  Any sizes (``resize`` uses it where no side shrinks; when shrinking each output pixel
  reads ~4 x in/out inputs per axis and PIL itself is as fast).
  """
  h, w, c = x.shape
  rows = x.reshape(h, w * c).astype(np.float32)
  if w != width:  # horizontal pass: (h, w*c) @ band -> (h, width*c), then uint8 as PIL
    out = np.empty((h, width * c), np.float32)
    for o0, o1, i0, i1, m in _bands_interleaved(w, width, c):
      step = max(1, _GEMM_MAX_MACS // m.size)
      for r in range(0, h, step):
        np.matmul(rows[r:r + step, i0:i1], m, out=out[r:r + step, o0:o1])
    rows = _round_clip(out)
  if h != height:  # vertical pass: band @ (h, width*c) -> (height, width*c)
    out = np.empty((height, width * c), np.float32)
    for o0, o1, i0, i1, m in _bands(h, height):
      step = max(1, _GEMM_MAX_MACS // m.size)
      for col in range(0, width * c, step):
        np.matmul(m, rows[i0:i1, col:col + step], out=out[o0:o1, col:col + step])
    out += 0.5  # the final rounding: floor(v + 0.5) clipped, floor by the uint8 cast
    rows = np.clip(out, 0.0, 255.0, out=out)
  return rows.astype(np.uint8).reshape(height, width, c)


def resize(img: Image.Image, size: int, backend: str | None = None) -> np.ndarray:
  """Bicubic resize to (size, size, 3) uint8 (aspect not kept), see the module docstring.

  ``backend``: 'numpy' (PIL's bicubic as matrix products, within +-1 of PIL), 'pil' (PIL
  bicubic, a = -0.5, as torchvision's Resize on PIL images, which the reference uses) or
  'cv2' (OpenCV INTER_CUBIC, a = -0.75, for upsampling; PIL when a side shrinks); default
  ``DEFAULT_RESIZE_BACKEND`` ('numpy'). The result may be read-only.
  """
  backend = check_resize_backend(backend or DEFAULT_RESIZE_BACKEND)
  if img.size == (size, size):
    return np.asarray(img)
  method = resize_method(img.width, img.height, size, backend)
  if method == BACKEND_CV2:
    return _cv2_single_threaded().resize(np.asarray(img), (size, size),
                                         interpolation=cv2.INTER_CUBIC)
  if method == BACKEND_NUMPY:
    return resize_numpy(np.asarray(img), size, size)
  return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


# ------------------------------------------------------------------------ transforms


def shift_into(out: np.ndarray, src: np.ndarray, dy: int, dx: int, flip: bool = False) -> None:
  """out[y, x] = src[y + dy, x + dx], 0 where that falls outside src; out (S, S, C), src (H, W, C).

  With dy, dx in [-pad, pad] this is "pad by ``pad`` (constant 0), then crop at
  (pad + dy, pad + dx)". ``flip`` then mirrors the crop left-right (``out[:, ::-1]``).
  One copy straight into ``out`` (no padded intermediate); only the border strips
  that fall outside src are zeroed.
  """
  s_h, s_w = out.shape[:2]
  h, w = src.shape[:2]
  if flip:  # flip(shift(src, dy, dx)) == shift(src[:, ::-1], dy, w - S - dx)
    dx = w - s_w - dx
  y0 = max(0, -dy)
  y1 = max(y0, min(s_h, h - dy))
  x0 = max(0, -dx)
  x1 = max(x0, min(s_w, w - dx))
  out[:y0] = 0
  out[y1:] = 0
  out[y0:y1, :x0] = 0
  out[y0:y1, x1:] = 0
  if y1 == y0 or x1 == x0:
    return
  rows = src[y0 + dy:y1 + dy]
  if not flip:
    out[y0:y1, x0:x1] = rows[:, x0 + dx:x1 + dx]
    return
  block = rows[:, w - (x1 + dx):w - (x0 + dx)]  # the columns of src[:, ::-1][:, x0+dx:x1+dx]
  dst = out[y0:y1, x0:x1]
  if cv2 is not None and block.dtype == np.uint8 and block.ndim == 3 and block.shape[2] <= 4:
    # numpy copies a reversed 3-byte-pixel axis element by element (~1 ms at 384x384);
    # cv2.flip is a vectorised row copy written straight into the batch row.
    if _cv2_single_threaded().flip(block, 1, dst=dst) is dst:
      return
  dst[...] = block[:, ::-1]


def train_transform_into(out: np.ndarray, img: Image.Image, rng: np.random.Generator,
                         params: AugmentParams) -> None:
  """Writes the augmented uint8 (S, S, 3) image into ``out`` (the batch row).

  Random draws, in order: AutoAugment gate (and its own draws), crop offsets
  (if pad > 0), flip gate (if flip_prob > 0).
  """
  if params.autoaugment_prob > 0 and rng.random() < params.autoaugment_prob:
    img = auto_augment(img, rng, params.autoaugment_fill)
  pad = params.pad
  if pad:
    oy, ox = rng.integers(0, 2 * pad + 1, size=2)
    dy, dx = int(oy) - pad, int(ox) - pad
  else:
    dy = dx = 0
  flip = bool(params.flip_prob > 0 and rng.random() < params.flip_prob)
  size = params.image_size
  if flip and resize_method(img.width, img.height, size,
                            params.resize_backend) in (BACKEND_PIL, BACKEND_NUMPY):
    # flip(crop(resize(x), dx)) == crop(resize(flip(x)), -dx): PIL's resize is exactly
    # mirror-symmetric (the numpy one to float32 rounding: rarely 1 grey level), so flip
    # the small source image (cheaper than the 384 x 384 output). (OpenCV's is not, to
    # +-1 grey level: that path flips the output in shift_into.)
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    dx, flip = -dx, False
  shift_into(out, resize(img, size, params.resize_backend), dy, dx, flip=flip)


def train_transform(img: Image.Image, rng: np.random.Generator,
                    params: AugmentParams) -> np.ndarray:
  """The training transform of one decoded image: (S, S, 3) uint8."""
  out = np.empty((params.image_size, params.image_size, 3), np.uint8)
  train_transform_into(out, img, rng, params)
  return out


def eval_transform(img: Image.Image, image_size: int, backend: str | None = None) -> np.ndarray:
  """The evaluation transform: bicubic resize only (``resize``), (S, S, 3) uint8."""
  return resize(img, image_size, backend)
