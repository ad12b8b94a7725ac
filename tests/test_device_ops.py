"""On-device preprocessing: normalisation and timm-style random erasing (pixel mode)."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufo_jax.data import device_ops


def _augment(**overrides):
  values = dict(mean=127.5, std=127.5, erasing_prob=0.5, erasing_area=(0.02, 1 / 3),
                erasing_aspect=(0.3, 3.3))
  values.update(overrides)
  return types.SimpleNamespace(**values)


def _images(batch=64, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def test_eval_mode_is_plain_normalisation():
  images = _images(4)
  out = device_ops.preprocess(jnp.asarray(images), None, _augment(erasing_prob=1.0), train=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), (images.astype(np.float32) - 127.5) / 127.5,
                             rtol=0, atol=1e-6)


def test_erasing_rate_area_and_aspect():
  batch, size = 256, 32
  images = _images(batch, size)
  normalised = (images.astype(np.float32) - 127.5) / 127.5
  fn = jax.jit(lambda x, k: device_ops.preprocess(x, k, _augment(), train=True))
  out = np.asarray(fn(jnp.asarray(images), jax.random.key(3)))
  changed = np.any(np.abs(out - normalised) > 1e-5, axis=-1)  # (B, H, W)
  erased = changed.any(axis=(1, 2))
  # p = 0.5 and nearly every draw fits at 32x32: the rate is about 0.5 (binomial sd ~0.031).
  assert 0.38 < erased.mean() < 0.62
  area_lo, area_hi = 0.02 * size * size, size * size / 3
  for mask in changed[erased]:
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # One solid rectangle of h x w (noise equals the old value with probability ~0).
    assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].mean() > 0.99
    assert mask.sum() <= h * w
    assert h < size and w < size
    # h = round(sqrt(A r)) and w = round(sqrt(A / r)): the unrounded values lie within 0.5 of
    # h and w, so A and r must be reachable from [h - 0.5, h + 0.5] x [w - 0.5, w + 0.5].
    assert (h + 0.5) * (w + 0.5) >= area_lo and (h - 0.5) * (w - 0.5) <= area_hi
    assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 3.3
  # Inside the rectangle the values are standard-normal noise, not the image.
  noise = out[changed]
  assert abs(noise.mean()) < 0.05 and 0.9 < noise.std() < 1.1
  np.testing.assert_allclose(out[~changed], normalised[~changed], atol=1e-5)


def test_erasing_boxes_match_timm_rule():
  """The first attempt that fits (h < H and w < W) is used; boxes stay inside the image."""
  height = width = 16
  boxes = jax.jit(lambda k: device_ops.erasing_boxes(
      k, 4096, height, width, prob=1.0, area=(0.02, 1 / 3), aspect=(0.3, 3.3)))
  erase, top, left, h, w = boxes(jax.random.key(0))
  erase, top, left, h, w = map(np.asarray, (erase, top, left, h, w))
  assert erase.mean() > 0.95  # almost every example has a fitting attempt among 10
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= height) and np.all(left + w <= width)
  assert np.all(h[erase] < height) and np.all(w[erase] < width)
  # Every top in [0, H - h] is reachable (inclusive randint): the extreme values occur.
  assert np.any(top[erase] == height - h[erase]) and np.any(top[erase] == 0)
  # Area fraction U(0.02, 1/3) before rounding: the mean of h*w is near its expectation.
  expected = (0.02 + 1 / 3) / 2 * height * width
  assert math.isclose(np.mean(h[erase] * w[erase]), expected, rel_tol=0.15)


def test_no_erasing_when_probability_zero():
  images = _images(8)
  out = device_ops.preprocess(jnp.asarray(images), jax.random.key(0),
                              _augment(erasing_prob=0.0), train=True)
  np.testing.assert_allclose(np.asarray(out), (images.astype(np.float32) - 127.5) / 127.5,
                             atol=1e-6)


def test_bad_inputs_are_clear():
  with pytest.raises(ValueError, match='uint8'):
    device_ops.preprocess(jnp.zeros((1, 8, 8, 3), jnp.float32), None, _augment(), train=False)
  with pytest.raises(ValueError, match='rng'):
    device_ops.preprocess(jnp.zeros((1, 8, 8, 3), jnp.uint8), None, _augment(), train=True)
  with pytest.raises(ValueError, match='erasing_area'):
    device_ops.random_erasing(jnp.zeros((1, 8, 8, 3)), jax.random.key(0), prob=0.5,
                              area=(0.5, 0.1), aspect=(0.3, 3.3))
