"""Training losses of the multi-task model: CosFace and batch-hard triplet (jax only).

A training batch mixes the examples of all tasks; every task head sees the whole batch and a
`mask` marks the examples that belong to its task (static shapes in both the heterogeneous and the
homogeneous batch modes). Every loss therefore takes an optional `mask` (bool or float, shape (B,)):
the loss is the mean over masked examples, `sum(mask * loss) / max(sum(mask), 1)`, and the labels
of masked-out rows are ignored (they may be out of range, e.g. another task's label or -1).

All losses are computed in float32 whatever the dtype of their inputs (a bfloat16 model's
features and class weights are cast first), and their matrix products (the CosFace cosines, the
triplet's Gram matrix) use `precision=HIGHEST`, so that accelerators do not run them in
bfloat16 or TF32 passes: the triplet's `|a|^2 + |b|^2 - 2ab` on un-normalised features of norm
~30 loses a positive pair's whole distance to bf16 rounding otherwise.

- `cosface_loss`: large-margin cosine loss (CosFace). Written in plain jnp: under `jax.jit` with
  the class weights sharded over the class dimension (`NamedSharding(mesh, P(None, axes))`) GSPMD
  keeps it exact.
- `cosface_loss_sharded`: the same loss as an explicit model-parallel softmax (Partial FC style,
  `jax.shard_map`): each device computes the logits of its own classes only, and the softmax is
  assembled from a `pmax` of the row maxima and `psum`s of the exponential sums and of the target
  logit, so the (B, C) logits are never gathered.
- `triplet_loss`: batch-hard triplet loss (soft margin or hinge) on Euclidean distances.
- `combine_losses`: weighted total over tasks plus a flat dict of metrics.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array

_NORM_EPS = 1e-12  # L2-normalisation: ||x|| is clamped at this value (as torch F.normalize).
_DIST_EPS = 1e-12  # Triplet: squared distances are clamped at this value before the sqrt.
_PAD_LOGIT = -1e30  # Logit of a padding class: exp(_PAD_LOGIT - max) == 0, and 0 * it is finite.
_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matrix products on every backend


def _matmul_f32(a: Array, b: Array) -> Array:
  """`a @ b` in float32 at `precision=HIGHEST` (inputs cast to float32 first)."""
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


def l2_normalize(x: Array, axis: int = -1) -> Array:
  """Returns `x / max(||x||, 1e-12)` along `axis`, in float32 (finite gradient at 0)."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def _gather_explicit(x: Array) -> Array:
  """Replicates `x` when it is sharded over explicit mesh axes (explicit sharding mode).

  The batch-wide losses pair every example with every class / every other example, so they
  work on the whole (gathered) batch. Under auto (GSPMD) sharding the compiler inserts the
  gathers itself and `x` is returned unchanged, as it is outside any mesh.
  """
  sharding = jax.typeof(x).sharding
  if not sharding.mesh.explicit_axes or all(s is None for s in sharding.spec):
    return x
  return jax.reshard(x, NamedSharding(sharding.mesh, P()))


def _reshard_explicit(x: Array, mesh: Mesh, spec: P) -> Array:
  """Reshards `x` to `NamedSharding(mesh, spec)` if it is sharded over explicit mesh axes.

  `jax.shard_map` over a mesh with explicit axes requires its inputs to match its `in_specs`;
  under auto sharding `jax.jit` reshards at the boundary itself.
  """
  if not (mesh.explicit_axes or jax.typeof(x).sharding.mesh.explicit_axes):
    return x
  return jax.reshard(x, NamedSharding(mesh, spec))


def _as_mask(mask: Array | None, batch: int) -> Array:
  """Returns the float32 (B,) example mask (all ones when `mask` is None)."""
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(f'mask must have shape ({batch},) (one entry per example), '
                     f'got {mask.shape}')
  return mask.astype(jnp.float32)


def _masked_mean(values: Array, weights: Array) -> Array:
  """Returns `sum(weights * values) / max(sum(weights), 1)`; unweighted entries may be inf/NaN."""
  values = jnp.where(weights > 0, values, 0.0)
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_cosface_shapes(features: Array, class_weights: Array, labels: Array,
                          num_classes: int | None = None) -> None:
  """Raises ValueError unless the CosFace shapes (B, D), (D, C), (B,) and num_classes agree."""
  if features.ndim != 2 or class_weights.ndim != 2:
    raise ValueError('cosface: features must be (batch, dim) and class_weights (dim, classes), '
                     f'got {features.shape} and {class_weights.shape}')
  if features.shape[1] != class_weights.shape[0]:
    raise ValueError(f'cosface: feature dim {features.shape[1]} != class_weights dim '
                     f'{class_weights.shape[0]} (class_weights must be (dim, classes))')
  if labels.shape != (features.shape[0],):
    raise ValueError(f'cosface: labels must have shape ({features.shape[0]},), '
                     f'got {labels.shape}')
  if num_classes is not None and not 1 <= num_classes <= class_weights.shape[1]:
    raise ValueError(f'cosface: num_classes={num_classes} must be in [1, '
                     f'{class_weights.shape[1]}] (the class_weights columns, padding included)')


def _mask_padding(logits: Array, num_classes: int | None, first_class: Array | int = 0) -> Array:
  """Sets the logits of padding classes (global index >= num_classes) to _PAD_LOGIT."""
  if num_classes is None:
    return logits
  index = first_class + jnp.arange(logits.shape[1])
  return jnp.where(index < num_classes, logits, _PAD_LOGIT)


def cosface_logits(features: Array, class_weights: Array, labels: Array | None = None, *,
                   scale: float = 1.0, margin: float = 0.0,
                   num_classes: int | None = None) -> Array:
  """Returns the (B, C) float32 CosFace logits `scale * (cos(theta_j) - margin * [j == y])`.

  Args:
    features: (B, D) embeddings (any float dtype); L2-normalised here.
    class_weights: (D, C) class weight matrix; each column is L2-normalised here.
    labels: (B,) int labels; None (or margin 0) gives the plain scaled cosines, whose argmax is
      the classifier's prediction (for accuracy metrics). Out-of-range labels get no margin.
    scale: the CosFace scale s.
    margin: the CosFace margin m.
    num_classes: the number of real classes when class_weights has zero padding columns after
      them (to split evenly over devices); padding logits are -1e30. None: no padding.
  """
  cos = _matmul_f32(l2_normalize(features, axis=1), l2_normalize(class_weights, axis=0))
  if labels is not None and margin:
    cos = cos - margin * jax.nn.one_hot(labels, cos.shape[1], dtype=cos.dtype)
  return _mask_padding(scale * cos, num_classes)


def cosface_loss(features: Array, class_weights: Array, labels: Array, *, scale: float,
                 margin: float, mask: Array | None = None,
                 num_classes: int | None = None) -> Array:
  """Returns the mean CosFace cross-entropy (float32 scalar).

  The per-example loss is `logsumexp_j(z_j) - z_y` with `z = cosface_logits(...)` (stable
  log-sum-exp). With `mask`, the mean is over the masked examples; the labels of masked-out rows
  may be anything (out of range included) without affecting the value or producing NaN.

  Exact when `class_weights` is sharded over the class dimension under `jax.jit` (GSPMD inserts
  the reductions); `cosface_loss_sharded` is the variant that never gathers the (B, C) logits.

  Args:
    features: (B, D) embeddings.
    class_weights: (D, C) class weights.
    labels: (B,) int labels in [0, C) for the masked examples.
    scale: the CosFace scale s (e.g. 50 for faces, 30 for persons).
    margin: the CosFace margin m (e.g. 0.3 for faces, 0.2 otherwise).
    mask: optional (B,) bool/float mask of the examples this loss covers.
    num_classes: the number of real classes when class_weights ends with padding columns
      (they are left out of the softmax and get no gradient); None: all columns are classes.
  """
  features, labels = _gather_explicit(features), _gather_explicit(jnp.asarray(labels))
  _check_cosface_shapes(features, class_weights, labels, num_classes)
  weights = _gather_explicit(_as_mask(mask, features.shape[0]))
  logits = cosface_logits(features, class_weights, labels, scale=scale, margin=margin,
                          num_classes=num_classes)
  onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
  target = jnp.sum(onehot * logits, axis=1)
  per_example = jax.nn.logsumexp(logits, axis=1) - target
  return _masked_mean(per_example, weights)


def _axes_tuple(class_axes: str | Sequence[str]) -> tuple[str, ...]:
  """Normalises a mesh axis name or sequence of names to a tuple of names."""
  axes = (class_axes,) if isinstance(class_axes, str) else tuple(class_axes)
  if not axes:
    raise ValueError('cosface_loss_sharded: class_axes must name at least one mesh axis')
  return axes


def cosface_loss_sharded(features: Array, class_weights: Array, labels: Array, *, scale: float,
                         margin: float, mesh: Mesh, class_axes: str | Sequence[str],
                         mask: Array | None = None, num_classes: int | None = None) -> Array:
  """CosFace loss with a model-parallel softmax over class-sharded weights (Partial FC style).

  Same value and gradients as `cosface_loss`. `class_weights` (D, C) is split over its class
  dimension across the mesh axes `class_axes` (layout `P(None, class_axes)`); features, labels and
  mask are replicated inside (the (B, D) features are gathered, the (B, C) logits never are).
  Each device computes the logits of its C / n classes; the global softmax comes from a `pmax`
  of the row maxima, a `psum` of the exponential sums, and a `psum` of the target logit, to which
  only the device holding the label's class contributes. Call it inside or outside `jax.jit`.

  Args:
    features: (B, D) embeddings.
    class_weights: (D, C) class weights; C must be divisible by the size of `class_axes`.
    labels: (B,) int labels in [0, C) for the masked examples.
    scale: the CosFace scale s.
    margin: the CosFace margin m.
    mesh: the device mesh.
    class_axes: mesh axis name(s) the class dimension is split over (major to minor).
    mask: optional (B,) bool/float mask of the examples this loss covers.
    num_classes: the number of real classes when class_weights ends with padding columns
      (to make C divisible by the shard count); None: all columns are classes.
  """
  labels = jnp.asarray(labels)
  _check_cosface_shapes(features, class_weights, labels, num_classes)
  axes = _axes_tuple(class_axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f'cosface_loss_sharded: class_axes {unknown} are not axes of the mesh '
                     f'{dict(mesh.shape)}')
  num_shards = 1
  for a in axes:
    num_shards *= mesh.shape[a]
  total_columns = class_weights.shape[1]
  if total_columns % num_shards:
    raise ValueError(f'cosface_loss_sharded: {total_columns} classes cannot be split evenly '
                     f'over {num_shards} devices (mesh axes {axes}); pad the class weights with '
                     'zero columns and pass num_classes')
  weights = _as_mask(mask, features.shape[0])
  local_classes = total_columns // num_shards

  def local_loss(feats, w_local, lab, wts):
    cos = _matmul_f32(l2_normalize(feats, axis=1), l2_normalize(w_local, axis=0))  # (B, C/n)
    offset = jax.lax.axis_index(axes) * local_classes
    onehot = jax.nn.one_hot(lab - offset, local_classes, dtype=cos.dtype)  # 0 off this shard
    logits = _mask_padding(scale * (cos - margin * onehot), num_classes, offset)
    row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=1)), axes)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), axes)
    target = jax.lax.psum(jnp.sum(onehot * logits, axis=1), axes)
    per_example = jnp.log(sum_exp) + row_max - target
    return _masked_mean(per_example, wts)

  in_specs = (P(), P(None, axes), P(), P())
  args = [_reshard_explicit(x, mesh, spec)
          for x, spec in zip((features, class_weights, labels, weights), in_specs)]
  fn = jax.shard_map(local_loss, mesh=mesh, in_specs=in_specs, out_specs=P())
  return fn(*args)


def triplet_loss(features: Array, labels: Array, *, margin: float = 0.0,
                 mask: Array | None = None) -> Array:
  """Returns the batch-hard triplet loss (float32 scalar), as fast-reid computes it.

  Distances are Euclidean, `sqrt(max(||a||^2 + ||b||^2 - 2 a.b, 1e-12))` in float32 with the
  Gram matrix at `precision=HIGHEST` (the diagonal is exactly 0 before the clamp). For each
  masked anchor: the hardest positive is the largest distance to a masked example of the same
  label (the anchor itself included), the hardest negative the smallest distance to a masked
  example of another label. Margin 0 gives the soft margin `softplus(d_ap - d_an)`, margin > 0
  the hinge `relu(d_ap - d_an + margin)`. The loss is the mean over masked anchors that have a
  negative; anchors without one contribute nothing.

  Args:
    features: (B, D) embeddings (not normalised).
    labels: (B,) int labels; only equality matters (masked-out rows are ignored).
    margin: 0 for the soft margin, > 0 for the hinge margin.
    mask: optional (B,) bool/float mask of the examples this loss covers.
  """
  if margin < 0:
    raise ValueError(f'triplet_loss: margin must be >= 0 (0 = soft margin), got {margin}')
  features, labels = _gather_explicit(features), _gather_explicit(jnp.asarray(labels))
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError('triplet_loss: features must be (batch, dim) and labels (batch,), '
                     f'got {features.shape} and {labels.shape}')
  batch = features.shape[0]
  valid = _gather_explicit(_as_mask(mask, batch)) > 0
  x = features.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=1)
  dist2 = sq[:, None] + sq[None, :] - 2.0 * _matmul_f32(x, x.T)
  dist2 = jnp.where(jnp.eye(batch, dtype=bool), 0.0, dist2)
  dist = jnp.sqrt(jnp.maximum(dist2, _DIST_EPS))
  pair_valid = valid[:, None] & valid[None, :]
  same = labels[:, None] == labels[None, :]
  is_pos = same & pair_valid
  is_neg = ~same & pair_valid
  d_ap = jnp.max(jnp.where(is_pos, dist, 0.0), axis=1)
  has_neg = jnp.any(is_neg, axis=1)
  d_an = jnp.min(jnp.where(is_neg, dist, jnp.finfo(jnp.float32).max), axis=1)
  d_an = jnp.where(has_neg, d_an, 0.0)
  if margin > 0:
    per_anchor = jax.nn.relu(d_ap - d_an + margin)
  else:
    per_anchor = jax.nn.softplus(d_ap - d_an)
  return _masked_mean(per_anchor, has_neg.astype(jnp.float32))


def combine_losses(losses: Mapping[str, Mapping[str, Array]],
                   weights: Mapping[str, float]) -> tuple[Array, dict[str, Array]]:
  """Returns the weighted total loss and a flat dict of per-task metrics.

  Args:
    losses: {task: {loss_name: scalar}}, e.g. {'face': {'cosface': a},
      'person': {'cosface': b, 'triplet': c}}; every entry is a loss term of its task.
    weights: {task: weight}; every task of `losses` needs a weight (extra tasks are ignored).

  Returns:
    (total, metrics): total = sum over tasks of weight * (sum of the task's losses);
    metrics = {'<task>/<loss_name>': value, '<task>/total': unweighted sum, 'total': total}.
  """
  missing = sorted(set(losses) - set(weights))
  if missing:
    raise ValueError(f'combine_losses: no loss weight for task(s) {missing} '
                     f'(weights given for {sorted(weights)})')
  metrics: dict[str, Array] = {}
  total = jnp.zeros((), jnp.float32)
  for task, terms in losses.items():
    if not terms:
      raise ValueError(f'combine_losses: task {task!r} has no loss terms')
    task_total = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
      metrics[f'{task}/{name}'] = value
      task_total = task_total + value
    metrics[f'{task}/total'] = task_total
    total = total + weights[task] * task_total
  metrics['total'] = total
  return total, metrics
