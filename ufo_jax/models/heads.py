"""Task heads of the multi-task model: a masked BatchNorm neck and CosFace class weights.

A training batch mixes the examples of all tasks and every head sees the whole batch; a boolean
mask ``(B,)`` marks the examples of the head's task. The neck is a BatchNorm1d ("BNNeck") whose
statistics come from the masked examples only, over the whole global batch: under ``jax.jit``
on a batch-sharded array the sums below are global reductions, so the statistics are
synchronised across devices and hosts without any explicit collective.

Conventions (those of ``flax.nnx.BatchNorm``): epsilon 1e-5, running averages
``momentum * old + (1 - momentum) * batch`` with momentum 0.9 (PyTorch's 0.1), the biased batch
variance in both the normalisation and the running average. The neck's bias is frozen in the
reference (fast-reid ``BNneck``: ``bias.requires_grad_(False)``): the neck has a learned scale and a
bias that training never changes. It is an ``nnx.BatchStat`` (no gradient, no optimizer state,
saved and restored with the running statistics): zero when training from scratch, and the stored
value of an imported model (UFO's release keeps a non-zero bias, which its BatchNorm applies;
``ufo_jax.models.ufo_release``). A step in which the task has no example (homogeneous batches of
another task) leaves the running averages unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

CLASS_WEIGHT_INIT_STD = 0.001


def padded_num_classes(num_classes: int, multiple: int) -> int:
  """``num_classes`` rounded up to a multiple of ``multiple`` (the class shard count)."""
  if num_classes <= 0 or multiple <= 0:
    raise ValueError(f'num_classes ({num_classes}) and multiple ({multiple}) must be positive')
  return -(-num_classes // multiple) * multiple


class MaskedBatchNorm(nnx.Module):
  """BatchNorm1d over the masked rows of a ``(B, D)`` batch; learned scale, frozen bias.

  Attributes:
    scale: ``nnx.Param`` (D,), initialised to ones.
    bias: ``nnx.BatchStat`` (D,), zeros; never trained (an imported model's stored bias).
    mean, var: ``nnx.BatchStat`` (D,) running averages (zeros and ones at init).
    use_running_average: False (``model.train()``) normalises with the masked batch statistics
      and updates the running averages; True (``model.eval()``) uses the running averages.
  """

  def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               use_running_average: bool = False):
    self.features = features
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """Normalises ``x`` (B, D) in float32; ``mask`` (B,) selects the rows of the statistics."""
    if x.ndim != 2 or x.shape[1] != self.features:
      raise ValueError(f'MaskedBatchNorm({self.features}) expects (batch, {self.features}) '
                       f'inputs, got {x.shape}')
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      w = (jnp.ones((x.shape[0],), jnp.float32) if mask is None
           else mask.astype(jnp.float32))
      count = jnp.sum(w)
      denom = jnp.maximum(count, 1.0)
      mean = jnp.sum(w[:, None] * x, axis=0) / denom
      var = jnp.sum(w[:, None] * jnp.square(x - mean), axis=0) / denom
      seen = count > 0
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(
          jnp.where(seen, m * self.mean[...] + (1 - m) * mean, self.mean[...]))
      self.var[...] = jax.lax.stop_gradient(
          jnp.where(seen, m * self.var[...] + (1 - m) * var, self.var[...]))
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    return y + jax.lax.stop_gradient(self.bias[...])

  def set_view(self, use_running_average: bool | None = None):
    """Hook for ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class TaskHead(nnx.Module):
  """One task's head: the BatchNorm neck (test-time embedding) and CosFace class weights.

  The class weights have shape ``(feature_dim, padded_classes)``: ``num_classes`` real classes,
  normal init with std 0.001, followed by zero columns up to ``padded_classes`` so that the class
  dimension splits evenly over the devices. ``class_weights_for_loss`` returns the real classes
  only, so padded classes never enter the softmax (and get no gradient).
  """

  def __init__(self, feature_dim: int, num_classes: int, *, rngs: nnx.Rngs,
               padded_classes: int | None = None):
    padded = num_classes if padded_classes is None else padded_classes
    if num_classes <= 0 or padded < num_classes:
      raise ValueError(f'TaskHead: num_classes={num_classes} must be positive and '
                       f'padded_classes={padded} >= num_classes')
    self.num_classes = num_classes
    self.padded_classes = padded
    self.neck = MaskedBatchNorm(feature_dim)
    weights = CLASS_WEIGHT_INIT_STD * jax.random.normal(
        rngs.params(), (feature_dim, num_classes), jnp.float32)
    if padded > num_classes:
      weights = jnp.pad(weights, ((0, 0), (0, padded - num_classes)))
    self.class_weights = nnx.Param(weights)

  def class_weights_for_loss(self) -> Array:
    """The ``(feature_dim, num_classes)`` weights of the real classes."""
    w = self.class_weights[...]
    return w if self.padded_classes == self.num_classes else w[:, :self.num_classes]

  def __call__(self, feature: Array, mask: Array | None = None) -> Array:
    """Returns the neck output (the embedding) of the backbone feature ``(B, D)``."""
    return self.neck(feature, mask)
