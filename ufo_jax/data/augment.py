"""Host-side image decoding and augmentation (SPEC §5), with PIL, numpy and OpenCV.

The training transform of one example, in the order of the seed's recipe:

  AutoAugment (original ImageNet policy, applied with probability p, fill 128)
  -> bicubic resize to image_size x image_size
  -> pad ``pad`` pixels (constant 0) and random crop back to image_size
  -> horizontal flip with probability ``flip_prob``

The host yields uint8 images; normalisation ((x - 127.5) / 127.5) and random
erasing run on the device inside the train step (``ufo_jax/data/device_ops.py``),
where they cost nothing next to the model (see docs/PERFORMANCE.md).

AutoAugment follows torchvision's ``AutoAugment(AutoAugmentPolicy.IMAGENET)``:
the same 25 sub-policies, the same magnitude bins (``num_bins=10``), the same
PIL operations, nearest-neighbour resampling for the geometric operations and
the same random draws (one sub-policy uniformly, then for each of its two
operations ``u <= p`` and a random sign). The evaluation transform is the
bicubic resize alone.

Bicubic resize: OpenCV's ``cv2.resize(INTER_CUBIC)`` when ``cv2`` is importable
(package ``opencv-python-headless``; 4-5x faster than PIL for the
upsampling to 384x384), else PIL's bicubic. The two kernels differ: OpenCV's
cubic convolution uses a = -0.75 (as torch's ``interpolate(mode='bicubic')``)
with replicated edges, PIL's a = -0.5 with its weights renormalised at the
edges, so on smooth images they differ by 1-2 grey levels, more next to sharp
edges (a = -0.75 overshoots a bit more). Images larger than the output along
either side are always resized by PIL, whose bicubic widens its support when
shrinking (antialiasing) where ``INTER_CUBIC`` would alias. OpenCV runs
single-threaded (``cv2.setNumThreads(0)`` in every process that resizes):
parallelism comes from the grain worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageOps

try:
  import cv2
except ImportError:  # opencv-python-headless not installed: PIL's bicubic resize
  cv2 = None

BACKEND_CV2 = 'cv2'  # OpenCV INTER_CUBIC (a = -0.75) when upsampling, PIL when shrinking
BACKEND_PIL = 'pil'  # PIL bicubic (a = -0.5), as torchvision's Resize on PIL images
RESIZE_BACKENDS = (BACKEND_CV2, BACKEND_PIL)
DEFAULT_RESIZE_BACKEND = BACKEND_CV2 if cv2 is not None else BACKEND_PIL

# --------------------------------------------------------------------------- decoding


class DecodeError(ValueError):
  """An image record whose bytes do not decode to an image."""


# Failed decodes per dataset in this process (each grain worker process counts
# its own; every failure is also logged with the dataset and record index).
DECODE_FAILURES: collections.Counter = collections.Counter()
_LOG_FIRST = 10  # failures logged per dataset before logging every 1000th


def decode_image(data: bytes) -> Image.Image:
  """Decodes encoded JPEG/PNG/... bytes to an RGB PIL image; DecodeError if it cannot."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
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

# torchvision.transforms.AutoAugmentPolicy.IMAGENET: (op, probability, magnitude bin).
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)),
    (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
)

_NUM_BINS = 10


def magnitude_bins(op: str, height: int, width: int) -> tuple[np.ndarray, bool]:
  """torchvision ``AutoAugment._augmentation_space(10, (height, width))[op]``: (bins, signed)."""
  n = _NUM_BINS
  if op in ('ShearX', 'ShearY'):
    return np.linspace(0.0, 0.3, n), True
  if op == 'TranslateX':
    return np.linspace(0.0, 150.0 / 331.0 * width, n), True
  if op == 'TranslateY':
    return np.linspace(0.0, 150.0 / 331.0 * height, n), True
  if op == 'Rotate':
    return np.linspace(0.0, 30.0, n), True
  if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    return np.linspace(0.0, 0.9, n), True
  if op == 'Posterize':
    return 8 - np.round(np.arange(n) / ((n - 1) / 4)).astype(np.int64), False
  if op == 'Solarize':
    return np.linspace(255.0, 0.0, n), False
  if op in ('AutoContrast', 'Equalize', 'Invert'):
    return np.zeros(1), False
  raise ValueError(f'unknown AutoAugment operation {op!r}')


def _affine(img: Image.Image, matrix: tuple[float, ...], fill: int) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.NEAREST,
                       fillcolor=(fill,) * len(img.getbands()))


def apply_op(img: Image.Image, op: str, magnitude: float, fill: int = 128) -> Image.Image:
  """One AutoAugment operation as torchvision's ``_apply_op`` on a PIL image."""
  if op == 'ShearX':  # torchvision: affine(shear=(degrees(atan(m)), 0), center=(0, 0))
    return _affine(img, (1.0, magnitude, 0.0, 0.0, 1.0, 0.0), fill)
  if op == 'ShearY':
    return _affine(img, (1.0, 0.0, 0.0, magnitude, 1.0, 0.0), fill)
  if op == 'TranslateX':
    return _affine(img, (1.0, 0.0, -float(int(magnitude)), 0.0, 1.0, 0.0), fill)
  if op == 'TranslateY':
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(magnitude))), fill)
  if op == 'Rotate':
    return img.rotate(magnitude, resample=Image.Resampling.NEAREST,
                      fillcolor=(fill,) * len(img.getbands()))
  if op == 'Brightness':
    return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)
  if op == 'Color':
    return ImageEnhance.Color(img).enhance(1.0 + magnitude)
  if op == 'Contrast':
    return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
  if op == 'Sharpness':
    return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
  if op == 'Posterize':
    return ImageOps.posterize(img, int(magnitude))
  if op == 'Solarize':
    return ImageOps.solarize(img, magnitude)
  if op == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if op == 'Equalize':
    return ImageOps.equalize(img)
  if op == 'Invert':
    return ImageOps.invert(img)
  raise ValueError(f'unknown AutoAugment operation {op!r}')


def auto_augment(img: Image.Image, rng: np.random.Generator, fill: int = 128,
                 policy=IMAGENET_POLICY) -> Image.Image:
  """torchvision ``AutoAugment.forward``: one random sub-policy, each op with its probability."""
  sub_policy = policy[int(rng.integers(len(policy)))]
  probs = rng.random(2)
  signs = rng.integers(0, 2, size=2)
  for i, (op, p, bin_index) in enumerate(sub_policy):
    if probs[i] <= p:
      bins, signed = magnitude_bins(op, img.height, img.width)
      magnitude = float(bins[bin_index]) if bin_index is not None else 0.0
      if signed and signs[i] == 0:
        magnitude = -magnitude
      img = apply_op(img, op, magnitude, fill)
  return img


# ------------------------------------------------------------------------ transforms


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """The host-side part of ``config.input.augment`` and the output size.

  ``resize_backend`` ('cv2' or 'pil') is not a config field: it defaults to
  ``DEFAULT_RESIZE_BACKEND`` (OpenCV when importable); benchmarks and tests set it.
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
  """``backend`` if it is 'cv2' (and OpenCV is installed) or 'pil'; else ValueError."""
  if backend not in RESIZE_BACKENDS:
    raise ValueError(f'resize backend must be one of {RESIZE_BACKENDS}, got {backend!r}')
  if backend == BACKEND_CV2 and cv2 is None:
    raise ValueError("resize backend 'cv2' needs OpenCV: pip install opencv-python-headless "
                     "(or use 'pil')")
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

  OpenCV's INTER_CUBIC only where no side shrinks: when shrinking, PIL's bicubic
  widens its kernel (antialiasing) and INTER_CUBIC does not.
  """
  if backend == BACKEND_CV2 and width <= size and height <= size:
    return BACKEND_CV2
  return BACKEND_PIL


def resize(img: Image.Image, size: int, backend: str | None = None) -> np.ndarray:
  """Bicubic resize to (size, size, 3) uint8 (aspect not kept), see the module docstring.

  ``backend``: 'cv2' (OpenCV INTER_CUBIC, a = -0.75, for upsampling; PIL when a side
  shrinks) or 'pil' (PIL bicubic, a = -0.5, as torchvision's Resize on PIL images);
  default ``DEFAULT_RESIZE_BACKEND``. The result may be read-only.
  """
  backend = check_resize_backend(backend or DEFAULT_RESIZE_BACKEND)
  if img.size == (size, size):
    return np.asarray(img)
  if resize_method(img.width, img.height, size, backend) == BACKEND_CV2:
    return _cv2_single_threaded().resize(np.asarray(img), (size, size),
                                         interpolation=cv2.INTER_CUBIC)
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
  if flip and resize_method(img.width, img.height, size, params.resize_backend) == BACKEND_PIL:
    # flip(crop(resize(x), dx)) == crop(resize(flip(x)), -dx): PIL's resize is exactly
    # mirror-symmetric, so flip the small source image (cheaper than the 384 x 384 output).
    # (OpenCV's is not, to +-1 grey level: that path flips the output in shift_into.)
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
