"""Image operations that run on the accelerator inside the jitted train step.

The input pipeline delivers uint8 images ``(B, H, W, 3)``; the cheap per-pixel work that follows
the host-side augmentation (docs/INPUT.md: normalise, then random erasing) runs here, on the sharded
global batch, so that the host only moves bytes.

- ``normalize``: ``(x - mean) / std`` (mean = std = 127.5 in the recipe), in float32.
- ``random_erasing``: timm ``RandomErasing(mode='pixel', max_count=1)`` semantics, vectorised:
  with probability ``prob`` an example gets one rectangle of per-pixel standard-normal noise (in
  normalised space). Up to 10 attempts per example draw ``area ~ U(area_range) * H * W`` and
  ``log(aspect) ~ U(log aspect_range)``, ``h = round(sqrt(area * aspect))``,
  ``w = round(sqrt(area / aspect))``; the first attempt with ``h < H`` and ``w < W`` is used,
  at ``top ~ randint(0, H - h)``, ``left ~ randint(0, W - w)`` (both inclusive). When no attempt
  fits the example is left as it is (as timm does).
- ``preprocess``: both, as the train step calls them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

ERASING_ATTEMPTS = 10  # timm RandomErasing tries 10 rectangles per example


def normalize(images: Array, mean: float = 127.5, std: float = 127.5) -> Array:
  """Returns ``(images - mean) / std`` in float32."""
  return (images.astype(jnp.float32) - mean) / std


def erasing_boxes(rng: Array, batch: int, height: int, width: int, *, prob: float,
                  area: tuple[float, float], aspect: tuple[float, float],
                  attempts: int = ERASING_ATTEMPTS) -> tuple[Array, Array, Array, Array, Array]:
  """Draws one erasing rectangle per example.

  Returns:
    ``(erase, top, left, h, w)``, each of shape ``(batch,)``: ``erase`` (bool) says whether the
    example is erased (the probability draw passed and one attempt fitted); the rectangle is
    rows ``[top, top + h)`` and columns ``[left, left + w)``.
  """
  k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply, (batch,)) < prob
  target = jax.random.uniform(k_area, (batch, attempts), minval=area[0],
                              maxval=area[1]) * (height * width)
  log_ratio = jax.random.uniform(k_aspect, (batch, attempts), minval=math.log(aspect[0]),
                                 maxval=math.log(aspect[1]))
  ratio = jnp.exp(log_ratio)
  hs = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  ws = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (hs < height) & (ws < width)
  first = jnp.argmax(fits, axis=1)  # the first attempt that fits (0 when none does)
  h = jnp.take_along_axis(hs, first[:, None], axis=1)[:, 0]
  w = jnp.take_along_axis(ws, first[:, None], axis=1)[:, 0]
  erase = apply & jnp.any(fits, axis=1)
  h = jnp.where(erase, h, 0)
  w = jnp.where(erase, w, 0)
  # randint(0, H - h) inclusive on both ends, as Python's random.randint in timm.
  top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
  top = jnp.minimum(top, height - h)
  left = jnp.minimum(left, width - w)
  return erase, top, left, h, w


def random_erasing(images: Array, rng: Array, *, prob: float, area: tuple[float, float],
                   aspect: tuple[float, float]) -> Array:
  """Replaces one random rectangle per selected example by standard-normal noise.

  Args:
    images: normalised float images ``(B, H, W, C)``.
    rng: a PRNG key.
    prob: probability that an example is erased.
    area: (min, max) fraction of the image area of the rectangle.
    aspect: (min, max) aspect ratio h / w, sampled log-uniformly.
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f'random erasing: erasing_prob must be in [0, 1], got {prob}')
  if not 0.0 < area[0] <= area[1] <= 1.0:
    raise ValueError(f'random erasing: erasing_area must be 0 < min <= max <= 1, got {area}')
  if not 0.0 < aspect[0] <= aspect[1]:
    raise ValueError(f'random erasing: erasing_aspect must be 0 < min <= max, got {aspect}')
  batch, height, width, _ = images.shape
  k_box, k_noise = jax.random.split(rng)
  erase, top, left, h, w = erasing_boxes(k_box, batch, height, width, prob=prob, area=area,
                                         aspect=aspect)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
  inside = inside & erase[:, None, None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)


def preprocess(images_uint8: Array, rng: Array | None, augment_config: Any, *,
               train: bool) -> Array:
  """Turns a uint8 batch into the model's float32 input.

  Args:
    images_uint8: ``(B, H, W, 3)`` uint8 images.
    rng: PRNG key for random erasing (unused, may be None, when ``train`` is False).
    augment_config: ``config.input.augment`` (``mean``, ``std``, ``erasing_prob``,
      ``erasing_area``, ``erasing_aspect``).
    train: True applies random erasing after the normalisation; False only normalises.

  Returns:
    ``(B, H, W, 3)`` float32 images.
  """
  if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
    raise ValueError(f'preprocess expects (batch, height, width, 3) images, '
                     f'got shape {images_uint8.shape}')
  if images_uint8.dtype != jnp.uint8:
    raise ValueError(f'preprocess expects uint8 images, got {images_uint8.dtype}')
  x = normalize(images_uint8, float(augment_config.mean), float(augment_config.std))
  prob = float(augment_config.erasing_prob)
  if train and prob > 0:
    if rng is None:
      raise ValueError('preprocess(train=True) with erasing_prob > 0 needs an rng key')
    x = random_erasing(x, rng, prob=prob, area=tuple(augment_config.erasing_area),
                       aspect=tuple(augment_config.erasing_aspect))
  return x
