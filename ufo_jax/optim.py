"""The optimizer of the training recipe (docs/TRAINING.md), built with optax from `config.optim`.

The chain, in the order torch applies it in the reference (`clip_grad_norm_` per parameter, then
`torch.optim.SGD` with coupled weight decay):

  clip (each parameter's gradient to L2 norm <= grad_clip, or the global norm)
  -> + weight_decay * param (coupled L2)
  -> SGD (momentum 0 = plain SGD) with the learning-rate schedule
  -> per-parameter learning-rate scale (e.g. each task head's `lr_scale`).

Per-parameter rules and scanned layers: a scanned ViT keeps each block parameter as one array
stacked over the layers, its nnx Variable marked with `ufo_jax.pytree.LAYER_AXIS` by the model.
Clipping and the `skip_1d` mask treat each layer's slice of such an array as its own parameter,
so `scan_layers=True` and `scan_layers=False` give the same updates for the same weights and
gradients. The lr scale is per path, and a stack's path is the same for all its layers.

Schedule: linear warmup from 0 over the first `warmup_fraction` of the steps, then cosine decay
to `final_lr_fraction * lr` at `total_steps`.

`config.optim` fields (all optional; defaults are the recipe's):
  name ('sgd'), lr (0.2), momentum (0.0), nesterov (False), weight_decay (1e-4),
  weight_decay_mask ('all' | 'skip_1d': no decay of biases and norm scales), grad_clip (5.0; 0 or
  None disables), clip_mode ('per_param' | 'global'), warmup_fraction (0.1),
  final_lr_fraction (0.02).
"""

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ufo_jax import pytree
from ufo_jax.pytree import path_to_strings

PathScaleFn = Callable[[tuple[str, ...]], float]

_FIELD = 'config.optim'
DEFAULTS: dict[str, Any] = {
    'name': 'sgd',
    'lr': 0.2,
    'momentum': 0.0,
    'nesterov': False,
    'weight_decay': 1e-4,
    'weight_decay_mask': 'all',
    'grad_clip': 5.0,
    'clip_mode': 'per_param',
    'warmup_fraction': 0.1,
    'final_lr_fraction': 0.02,
}
OPTIMIZERS = ('sgd',)
CLIP_MODES = ('per_param', 'global')
WEIGHT_DECAY_MASKS = ('all', 'skip_1d')


def create_learning_rate_schedule(*, base_lr: float, total_steps: int,
                                  warmup_fraction: float = 0.1,
                                  final_lr_fraction: float = 0.02) -> optax.Schedule:
  """Returns linear warmup 0 -> base_lr, then cosine decay to final_lr_fraction * base_lr.

  The warmup lasts `round(warmup_fraction * total_steps)` steps (at most total_steps - 1), with
  the value `base_lr` at its end;
  the cosine reaches `final_lr_fraction * base_lr` at step `total_steps` and stays there.
  """
  _check_number('lr', base_lr, low=0.0, low_inclusive=False)
  if (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
      or total_steps < 1):
    raise ValueError('total_steps must be a positive int (config.train.steps), '
                     f'got {total_steps!r}')
  total_steps = int(total_steps)
  _check_number('warmup_fraction', warmup_fraction, low=0.0, high=1.0, high_inclusive=False)
  _check_number('final_lr_fraction', final_lr_fraction, low=0.0, high=1.0)
  warmup_steps = min(int(round(warmup_fraction * total_steps)), total_steps - 1)
  if warmup_steps == 0:  # no warmup (optax warns about a linear schedule of 0 steps)
    return optax.cosine_decay_schedule(init_value=base_lr, decay_steps=total_steps,
                                       alpha=final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=final_lr_fraction * base_lr)


def map_per_layer(fn: Callable[[jax.Array, int | None], Any], tree: Any) -> Any:
  """``fn(array, layer_axis)`` on every leaf of ``tree``, keeping its structure.

  ``layer_axis`` is the axis of an nnx Variable stacked over layers (a scanned ViT's blocks,
  marked with ``ufo_jax.pytree.LAYER_AXIS``), else None: per-parameter rules then treat each
  layer's slice as its own parameter, as the unscanned model and the reference do.
  """
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      axis = pytree.layer_axis(leaf)
      return jax.tree_util.tree_map(lambda x: fn(x, axis), leaf)
    return fn(leaf, None)

  return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def clip_by_norm_per_param(max_norm: float) -> optax.GradientTransformation:
  """Rescales each parameter's update so that its own L2 norm is <= max_norm.

  torch's `clip_grad_norm_(p, max_norm)` applied to every parameter tensor separately:
  `g * min(1, max_norm / (||g|| + 1e-6))`, the norm computed in float32. A parameter stacked
  over layers (``map_per_layer``) is clipped layer by layer, like the unscanned model's
  separate per-layer tensors.
  """
  _check_number('grad_clip', max_norm, low=0.0, low_inclusive=False)

  def clip(g: jax.Array, axis: int | None) -> jax.Array:
    axes = tuple(d for d in range(g.ndim) if d != axis) if axis is not None else None
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return (g * factor).astype(g.dtype)

  def update_fn(updates, state, params=None):
    del params
    return map_per_layer(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def decay_mask_skip_1d(params: Any) -> Any:
  """The `skip_1d` weight-decay mask: True for parameters with more than one dimension per layer
  (biases and norm scales stacked over layers are 1-D per layer, so they are not decayed)."""
  return map_per_layer(lambda p, axis: jnp.ndim(p) - (axis is not None) > 1, params)


def _path_scales(tree: Any, scale_fn: PathScaleFn) -> Any:
  """Returns the tree of per-leaf float scales, checking each is a finite number >= 0."""

  def scale(path, _):
    name = '/'.join(path_to_strings(path))
    value = scale_fn(path_to_strings(path))
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value >= 0):
      raise ValueError(f'lr_scale_fn returned {value!r} for parameter {name!r}; expected a '
                       'finite number >= 0 (check the heads\' lr_scale in the config)')
    return float(value)

  return jax.tree_util.tree_map_with_path(scale, tree)


def scale_by_path(scale_fn: PathScaleFn) -> optax.GradientTransformation:
  """Multiplies each leaf's update by `scale_fn(path)` (path: tuple of str, see path_to_strings).

  Works on any pytree of parameters (plain dicts, `nnx.State`). The scales are Python floats
  derived from the tree's static paths: they are checked once at `init` and fold into the
  compiled update as constants (nothing is stored in the optimizer state).
  """

  def init_fn(params):
    _path_scales(params, scale_fn)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scales = _path_scales(updates, scale_fn)
    updates = jax.tree_util.tree_map(
        lambda u, s: u if s == 1.0 else (u * s).astype(u.dtype), updates, scales)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


class OptimConfig(NamedTuple):
  """The validated `config.optim` values."""
  name: str
  lr: float
  momentum: float
  nesterov: bool
  weight_decay: float
  weight_decay_mask: str
  grad_clip: float | None
  clip_mode: str
  warmup_fraction: float
  final_lr_fraction: float


def _check_number(field: str, value: Any, *, low: float | None = None,
                  high: float | None = None, low_inclusive: bool = True,
                  high_inclusive: bool = True) -> None:
  """Raises ValueError naming `config.optim.<field>` unless value is a real number in range."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f'{_FIELD}.{field} must be a finite number, got {value!r}')
  bad_low = low is not None and (value < low if low_inclusive else value <= low)
  bad_high = high is not None and (value > high if high_inclusive else value >= high)
  if bad_low or bad_high:
    lo = '' if low is None else ('[' if low_inclusive else '(') + f'{low}'
    hi = '' if high is None else f'{high}' + (']' if high_inclusive else ')')
    expected = f'in {lo or "(-inf"}, {hi or "inf)"}'
    raise ValueError(f'{_FIELD}.{field} must be {expected}, got {value!r}')


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ValueError naming `config.optim.<field>` unless value is one of `choices`."""
  if value not in choices:
    raise ValueError(f'{_FIELD}.{field} must be one of {list(choices)}, got {value!r}')


def _read_fields(optim_config: Any) -> dict[str, Any]:
  """Reads the optim config (ConfigDict, Mapping or attribute object) over the defaults."""
  if isinstance(optim_config, Mapping) or hasattr(optim_config, 'keys'):
    given = {k: optim_config[k] for k in optim_config.keys()}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
      raise ValueError(f'{_FIELD} has unknown field(s) {unknown}; known fields: '
                       f'{sorted(DEFAULTS)}')
    return {**DEFAULTS, **given}
  return {k: getattr(optim_config, k, d) for k, d in DEFAULTS.items()}


def parse_optim_config(optim_config: Any) -> OptimConfig:
  """Validates `config.optim` and fills in the defaults; errors name the offending field."""
  f = _read_fields(optim_config)
  _check_choice('name', f['name'], OPTIMIZERS)
  _check_number('lr', f['lr'], low=0.0, low_inclusive=False)
  _check_number('momentum', f['momentum'], low=0.0, high=1.0, high_inclusive=False)
  if not isinstance(f['nesterov'], bool):
    raise ValueError(f'{_FIELD}.nesterov must be True or False, got {f["nesterov"]!r}')
  if f['nesterov'] and not f['momentum']:
    raise ValueError(f'{_FIELD}.nesterov=True needs {_FIELD}.momentum > 0')
  _check_number('weight_decay', f['weight_decay'], low=0.0)
  _check_choice('weight_decay_mask', f['weight_decay_mask'], WEIGHT_DECAY_MASKS)
  if f['grad_clip'] is not None:
    _check_number('grad_clip', f['grad_clip'], low=0.0)
  _check_choice('clip_mode', f['clip_mode'], CLIP_MODES)
  _check_number('warmup_fraction', f['warmup_fraction'], low=0.0, high=1.0,
                high_inclusive=False)
  _check_number('final_lr_fraction', f['final_lr_fraction'], low=0.0, high=1.0)
  return OptimConfig(
      name=f['name'], lr=float(f['lr']), momentum=float(f['momentum']), nesterov=f['nesterov'],
      weight_decay=float(f['weight_decay']), weight_decay_mask=f['weight_decay_mask'],
      grad_clip=float(f['grad_clip']) if f['grad_clip'] else None, clip_mode=f['clip_mode'],
      warmup_fraction=float(f['warmup_fraction']),
      final_lr_fraction=float(f['final_lr_fraction']))


def create_optimizer(optim_config: Any, *, total_steps: int,
                     lr_scale_fn: PathScaleFn | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax chain and the learning-rate schedule from `config.optim`.

  Args:
    optim_config: `config.optim` (ConfigDict, dict or attribute object); see the module doc.
    total_steps: the number of training steps (the schedule's horizon).
    lr_scale_fn: optional per-parameter learning-rate multiplier, called with each parameter's
      path in the params pytree as a tuple of str (e.g. ('heads', 'face', 'classifier',
      'kernel')); must return a finite number >= 0.

  Returns:
    (optimizer, schedule): the update is `-lr_scale * schedule(step) * sgd(clip(g) + wd * p)`.
  """
  cfg = parse_optim_config(optim_config)
  schedule = create_learning_rate_schedule(
      base_lr=cfg.lr, total_steps=total_steps, warmup_fraction=cfg.warmup_fraction,
      final_lr_fraction=cfg.final_lr_fraction)
  parts = []
  if cfg.grad_clip:
    if cfg.clip_mode == 'per_param':
      parts.append(clip_by_norm_per_param(cfg.grad_clip))
    else:
      parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.weight_decay:
    mask = None
    if cfg.weight_decay_mask == 'skip_1d':
      mask = decay_mask_skip_1d
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
  parts.append(optax.sgd(learning_rate=schedule, momentum=cfg.momentum or None,
                         nesterov=cfg.nesterov))
  if lr_scale_fn is not None:
    parts.append(scale_by_path(lr_scale_fn))
  return optax.chain(*parts), schedule
