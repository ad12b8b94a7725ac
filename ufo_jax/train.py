"""Multi-task training: setup, the loop, checkpoints, logs and the evaluation hook.

``train_and_evaluate(config, workdir)`` reads top to bottom:

1. Setup: devices and mesh, config validation, input (synthetic or the converted datasets),
   model and optimizer, the train state created directly in its sharded layout
   (``jax.jit(init, out_shardings=...)``) or restored from the latest checkpoint of the workdir.
2. Loop: next local batch -> global array (``sharding.make_global_batch``) -> the compiled
   train step, which also sums the metrics on the device and never applies a non-finite update
   -> every ``train.log_every`` steps (one host sync) the interval's averages to TensorBoard
   (clu) and one console line -> a checkpoint (state checked finite) every
   ``train.checkpoint_every`` steps, at the end and on SIGTERM / SIGINT (then exit) ->
   evaluation every ``eval.every_steps`` steps and at the end (``maybe_evaluate``).

The train step is ONE ``jax.jit`` over the split NNX state: the model's graphdef is static, the
state is a pytree ``{'step', 'params', 'model_state', 'opt_state', 'rng'}`` (``model_state``: the
BatchNorm statistics and drop-path rng streams) with ``NamedSharding``s from
``ufo_jax.sharding``, donated to the step. ``nnx.merge`` happens inside the step and, outside the
hot loop, only to evaluate.

The helpers above the loop (``build``, ``make_train_step``, ``model_flops_per_example``,
``peak_flops_per_device``) need only jax, flax and optax: ``bench/train_step.py`` uses them on
machines without grain, clu or ml_collections, which the loop imports where it needs them.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import losses, optim, sharding
from ufo_jax.data import device_ops
from ufo_jax.models import multitask, vit

TrainState = dict[str, Any]

# Dense bf16 peak FLOP/s per chip, matched against `device.device_kind` in this order.
PEAK_FLOPS_BF16: tuple[tuple[str, float], ...] = (
    ('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('GH200', 989e12),
    ('B200', 2250e12), ('A100', 312e12), ('TPU v6', 918e12), ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5', 459e12), ('TPU v4', 275e12),
)


# --------------------------------------------------------------------------------------------
# Losses of the multi-task model.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskLoss:
  """The loss settings of one task (from ``config.tasks.<task>``)."""
  scale: float
  margin: float
  triplet: bool
  triplet_margin: float
  weight: float


def task_losses(config: Any) -> dict[str, TaskLoss]:
  """The loss settings of every task, in task order."""
  return {t: TaskLoss(scale=float(c.cosface_scale), margin=float(c.cosface_margin),
                      triplet=bool(c.triplet), triplet_margin=float(c.triplet_margin),
                      weight=float(c.loss_weight))
          for t, c in ((t, config.tasks[t]) for t in config_lib.task_names(config))}


def compute_losses(model: multitask.MultiTaskModel, outputs: Mapping[str, Mapping[str, Any]],
                   labels: jax.Array, settings: Mapping[str, TaskLoss], *,
                   mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and per-task metrics: CosFace on the neck output, triplet on the feature.

  With a ``mesh`` of several devices, CosFace runs as the model-parallel softmax
  (``losses.cosface_loss_sharded``: each device scores only its slice of the classes and the
  (B, C) logits are never gathered); padded classes stay out of the softmax in both forms.
  """
  terms = {}
  for name, cfg in settings.items():
    out = dict(outputs[name])
    # The losses run in float32 whatever model.dtype is (bfloat16 features of norm ~30 make
    # the triplet's |a|^2 + |b|^2 - 2ab as wrong as a positive pair's distance).
    for key in ('embedding', 'feature'):
      out[key] = out[key].astype(jnp.float32)
    head = model.heads[name]
    if mesh is not None and mesh.size > 1:
      cosface = losses.cosface_loss_sharded(
          out['embedding'], head.class_weights[...], labels, scale=cfg.scale,
          margin=cfg.margin, mesh=mesh, class_axes=sharding.CLASS_AXES, mask=out['mask'],
          num_classes=head.num_classes)
    else:
      cosface = losses.cosface_loss(
          out['embedding'], head.class_weights_for_loss(), labels, scale=cfg.scale,
          margin=cfg.margin, mask=out['mask'])
    task_terms = {'cosface': cosface}
    if cfg.triplet:
      task_terms['triplet'] = losses.triplet_loss(out['feature'], labels,
                                                  margin=cfg.triplet_margin, mask=out['mask'])
    terms[name] = task_terms
  total, metrics = losses.combine_losses(terms, {n: c.weight for n, c in settings.items()})
  for name in settings:
    metrics[f'{name}/examples'] = jnp.sum(outputs[name]['mask'].astype(jnp.int32))
  return total, metrics


def batch_accuracy(model: multitask.MultiTaskModel, outputs: Mapping[str, Mapping[str, Any]],
                   labels: jax.Array, settings: Mapping[str, TaskLoss], *,
                   mesh: jax.sharding.Mesh | None = None) -> dict[str, jax.Array]:
  """Per-task CosFace top-1 accuracy on the batch: ``argmax_j cos(embedding, w_j) == label`` over
  the task's examples (no margin; no gradient). On a mesh the (B, C) scores stay split over the
  classes like the classifier (the embeddings are gathered, never the class weights)."""
  out = {}
  for name in settings:
    head = model.heads[name]
    embedding = jax.lax.stop_gradient(outputs[name]['embedding'])
    weights = jax.lax.stop_gradient(head.class_weights[...])
    if mesh is not None and mesh.size > 1:
      embedding = jax.lax.with_sharding_constraint(embedding, sharding.replicated(mesh))
    logits = losses.cosface_logits(embedding, weights, num_classes=head.num_classes)
    if mesh is not None and mesh.size > 1:
      logits = jax.lax.with_sharding_constraint(
          logits, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
              None, sharding.CLASS_AXES)))
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    mask = outputs[name]['mask'].astype(jnp.float32)
    out[f'{name}/accuracy'] = jnp.sum(hit * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return out


def metric_names(config: Any) -> tuple[str, ...]:
  """The scalars of one train step: ``total``, ``grad_norm``, ``lr`` and per task
  ``<task>/cosface``, ``<task>/triplet`` (where it applies), ``<task>/total``,
  ``<task>/accuracy``, ``<task>/examples``."""
  names = ['total', 'grad_norm', 'lr']
  for task, cfg in task_losses(config).items():
    names += [f'{task}/cosface'] + ([f'{task}/triplet'] if cfg.triplet else [])
    names += [f'{task}/total', f'{task}/accuracy', f'{task}/examples']
  return tuple(names)


def loss_terms(config: Any) -> tuple[str, ...]:
  """The loss terms whose finiteness is reported (``<task>/cosface``, ``<task>/triplet``)."""
  return tuple(n for n in metric_names(config) if n.endswith(('/cosface', '/triplet')))


def lr_scale_fn(config: Any) -> Callable[[tuple[str, ...]], float]:
  """Per-parameter LR multiplier: ``config.tasks.<t>.lr_scale`` for head ``t``, else 1."""
  scales = {t: float(config.tasks[t].lr_scale) for t in config_lib.task_names(config)}

  def scale(path: tuple[str, ...]) -> float:
    if len(path) >= 2 and path[0] == 'heads' and path[1] in scales:
      return scales[path[1]]
    return 1.0

  return scale


# --------------------------------------------------------------------------------------------
# State, train step, sharding.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything the loop (and dry runs, benchmarks, tests) needs, built by ``build``.

  Attributes:
    mesh: the device mesh.
    graphdef: the static structure of the model in train mode.
    abstract_state: the state's ``ShapeDtypeStruct``s, each with its ``sharding``.
    state_shardings: the state's ``NamedSharding``s.
    batch_shapes: global batch ``ShapeDtypeStruct``s (with the batch sharding).
    init: jitted ``() -> state``, created directly sharded.
    train_step: jitted ``(state, batch) -> (state, metrics)``, state donated.
    schedule: the learning-rate schedule.
    num_classes, padded_classes: classes per task, real and padded.
    model_flops_per_example: analytic training FLOPs per example (ViT), None if unknown.
  """
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract_state: TrainState
  state_shardings: Any
  batch_shapes: dict[str, jax.ShapeDtypeStruct]
  init: Callable[[], TrainState]
  train_step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, Any]]]
  schedule: optax.Schedule
  num_classes: dict[str, int]
  padded_classes: dict[str, int]
  model_flops_per_example: float | None
  loop_step: Callable | None = None
  init_metrics: Callable | None = None
  reset_metrics: Callable | None = None
  state_finite: Callable | None = None


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: Any,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The functional train step ``(state, batch) -> (state, metrics)`` (not jitted).

  ``batch``: ``image`` (B, H, W, 3) uint8, ``label`` (B,) int32, ``task`` (B,) int32. The step
  normalises and randomly erases on the device, runs one forward/backward pass of the
  multi-task model, and applies the optimizer. With a ``mesh`` and
  ``config.model.sharded_softmax`` (default True), CosFace is the model-parallel softmax.

  A step whose total loss or gradient norm is not finite leaves the parameters, optimizer
  state and BatchNorm statistics as they were (``jnp.where`` on the update; only ``step``
  advances); its ``metrics['nonfinite']`` is 1.

  Called as ``(state, batch, metrics=acc)`` it returns ``(state, acc)`` instead: the interval
  sums of ``metric_accumulator`` updated on the device (the loop's form: no host sync per
  step). Once ``acc['halted']`` is set (a non-finite step under ``train.on_nonfinite='stop'``,
  or ``train.max_nonfinite_steps`` in a row under ``'skip'``) no step updates the state.
  """
  settings = task_losses(config)
  loss_mesh = mesh if config.model.get('sharded_softmax', True) else None
  augment = config.input.augment
  accumulate = make_accumulate(config)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], metrics=None):
    acc = metrics
    step = state['step']
    images = device_ops.preprocess(batch['image'], jax.random.fold_in(state['rng'], step),
                                   augment, train=True)

    # The values before the step, in Variables of their own (the forward pass updates the
    # merged model's BatchNorm statistics in place).
    old_state = {k: jax.tree.unflatten(jax.tree.structure(state[k]), jax.tree.leaves(state[k]))
                 for k in ('params', 'model_state', 'opt_state')}
    model = nnx.merge(graphdef, state['params'], state['model_state'])

    def loss_fn(model):
      outputs = model(images, batch['task'])
      total, metrics = compute_losses(model, outputs, batch['label'], settings, mesh=loss_mesh)
      metrics.update(batch_accuracy(model, outputs, batch['label'], settings, mesh=loss_mesh))
      return total, metrics

    # Gradients with respect to the nnx.Param leaves; BatchNorm statistics and rng counts
    # updated by the forward pass flow back into `model`.
    (total, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    apply = finite if acc is None else finite & jnp.logical_not(acc['halted'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)

    def keep(new, old):  # the update, or the old values after a non-finite step
      return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)

    metrics['lr'] = schedule(step)
    metrics['grad_norm'] = grad_norm
    new_state = {'step': step + 1, 'params': keep(params, old_state['params']),
                 'model_state': keep(model_state, old_state['model_state']),
                 'opt_state': keep(opt_state, old_state['opt_state']), 'rng': state['rng']}
    if acc is None:
      metrics['nonfinite'] = jnp.logical_not(finite).astype(jnp.int32)
      return new_state, metrics
    return new_state, accumulate(acc, metrics, finite, step + 1)

  return train_step


def metric_accumulator(config: Any) -> dict[str, Any]:
  """Zeros of the loop's on-device metrics: interval ``sums`` of every ``metric_names`` scalar,
  ``counts`` of the steps that entered them (``steps``; per task, the steps with examples of
  it), ``nonfinite`` (non-finite steps in the interval), ``consecutive`` (non-finite steps in a
  row), ``halted``, ``bad_step`` / ``bad_terms``: the step that halted the run and which loss
  terms (and ``grad_norm``) were non-finite in it, and ``limit``: the non-finite steps in a row
  that halt the run (1 for ``train.on_nonfinite='stop'``, ``train.max_nonfinite_steps`` for
  ``'skip'``; a value, not a constant of the compiled step)."""
  f32, i32 = jnp.float32, jnp.int32
  names = metric_names(config)
  limit = (1 if config.train.get('on_nonfinite', 'stop') == 'stop'
           else int(config.train.get('max_nonfinite_steps', 10)))
  return {
      'sums': {n: jnp.zeros((), f32) for n in names},
      'counts': {'steps': jnp.zeros((), i32),
                 **{t: jnp.zeros((), i32) for t in config_lib.task_names(config)}},
      'nonfinite': jnp.zeros((), i32), 'consecutive': jnp.zeros((), i32),
      'halted': jnp.zeros((), jnp.bool_), 'bad_step': jnp.full((), -1, i32),
      'bad_terms': {n: jnp.zeros((), jnp.bool_) for n in loss_terms(config) + ('grad_norm',)},
      'limit': jnp.full((), limit, i32),
  }


def make_accumulate(config: Any) -> Callable:
  """``(acc, metrics, finite, step) -> acc``: adds one step to ``metric_accumulator``'s sums and
  applies ``train.on_nonfinite`` / ``train.max_nonfinite_steps`` (traced inside the step)."""
  names = metric_names(config)
  tasks = config_lib.task_names(config)
  def accumulate(acc, metrics, finite, step):
    halted = acc['halted']
    counted = finite & jnp.logical_not(halted)
    has = {t: counted & (metrics[f'{t}/examples'] > 0) for t in tasks}
    sums = {}
    for name in names:
      task = name.split('/')[0] if '/' in name and not name.endswith('/examples') else None
      weight = has[task] if task else counted
      value = jnp.asarray(metrics[name], jnp.float32)
      sums[name] = acc['sums'][name] + jnp.where(weight, value, 0.0)
    counts = {'steps': acc['counts']['steps'] + counted.astype(jnp.int32),
              **{t: acc['counts'][t] + has[t].astype(jnp.int32) for t in tasks}}
    bad = jnp.logical_not(finite) & jnp.logical_not(halted)
    consecutive = jnp.where(halted, acc['consecutive'],
                            jnp.where(finite, 0, acc['consecutive'] + 1))
    stop = bad & (consecutive >= acc['limit'])
    bad_terms = {n: jnp.where(bad, jnp.logical_not(jnp.isfinite(metrics[n])), v)
                 for n, v in acc['bad_terms'].items()}
    return {'sums': sums, 'counts': counts,
            'nonfinite': acc['nonfinite'] + bad.astype(jnp.int32), 'consecutive': consecutive,
            'halted': halted | stop, 'bad_step': jnp.where(bad, step, acc['bad_step']),
            'bad_terms': bad_terms, 'limit': acc['limit']}

  return accumulate


def interval_averages(acc: Mapping[str, Any]) -> dict[str, float]:
  """The averages over the logging interval of a fetched ``metric_accumulator``: each task's
  scalars over the steps that had examples of the task, the rest over all counted steps."""
  counts = acc['counts']
  out = {}
  for name, total in acc['sums'].items():
    task = name.split('/')[0] if '/' in name and not name.endswith('/examples') else None
    n = int(counts[task] if task else counts['steps'])
    if n:
      out[name] = float(total) / n
  return out


def _reset_metrics(acc: dict[str, Any]) -> dict[str, Any]:
  """Zeroes the interval sums and counts; keeps the non-finite streak and the halt."""
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return dict(acc, sums=zeros(acc['sums']), counts=zeros(acc['counts']),
              nonfinite=jnp.zeros_like(acc['nonfinite']))


def _state_finite(state: TrainState) -> jax.Array:
  """Whether every floating-point array of the state is finite (checked before each save)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
           if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def build(config: Any, num_classes: Mapping[str, int], mesh: jax.sharding.Mesh, *,
          padded_classes: Mapping[str, int] | None = None,
          compiler_options: Mapping[str, Any] | None = None) -> Setup:
  """Builds the sharded init, the jitted train step and their shardings (nothing allocated).

  Args:
    config: the experiment config.
    num_classes: classes per task.
    mesh: the device mesh.
    padded_classes: padded class counts per task (a checkpoint's); default: the class counts
      rounded up to a multiple of the number of devices.
    compiler_options: XLA options for both jits (e.g. the CPU tests compile faster with
      ``{'xla_backend_optimization_level': 0}``).
  """
  tasks = config_lib.task_names(config)
  num_classes = {t: int(num_classes[t]) for t in tasks}
  tx, schedule = optim.create_optimizer(config.optim, total_steps=int(config.train.steps),
                                        lr_scale_fn=lr_scale_fn(config))
  seed = int(config.seed)

  def make_model() -> multitask.MultiTaskModel:
    model = multitask.create_model(
        config, num_classes, rngs=nnx.Rngs(params=seed, dropout=seed + 1),
        class_multiple=mesh.size, padded_classes=padded_classes, load_pretrained=False)
    model.train()
    return model

  abstract_model = nnx.eval_shape(make_model)
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  padded = {t: abstract_model.heads[t].padded_classes for t in tasks}

  def init() -> TrainState:
    _, params, model_state = nnx.split(make_model(), nnx.Param, ...)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'model_state': model_state,
            'opt_state': tx.init(params), 'rng': jax.random.key(seed + 2)}

  shapes = jax.eval_shape(init)
  state_shardings = sharding.tree_shardings(shapes, mesh)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings)

  size = int(config.input.image_size)
  batch = config_lib.global_batch_size(config)
  batch_shapes = sharding.abstract_batch({
      'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
      'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
      'task': jax.ShapeDtypeStruct((batch,), jnp.int32)}, mesh)
  batch_shardings = {k: v.sharding for k, v in batch_shapes.items()}

  step_fn = make_train_step(graphdef, tx, schedule, config, mesh)
  options = dict(compiler_options) if compiler_options else None
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,), compiler_options=options)
  rep = sharding.replicated(mesh)
  loop_step = jax.jit(lambda state, acc, batch: step_fn(state, batch, acc),
                      in_shardings=(state_shardings, rep, batch_shardings),
                      out_shardings=(state_shardings, rep), donate_argnums=(0, 1),
                      compiler_options=options)
  return Setup(
      mesh=mesh, graphdef=graphdef, abstract_state=abstract_state,
      state_shardings=state_shardings, batch_shapes=batch_shapes,
      init=jax.jit(init, out_shardings=state_shardings, compiler_options=options),
      train_step=train_step,
      schedule=schedule, num_classes=num_classes, padded_classes=padded,
      model_flops_per_example=model_flops_per_example(abstract_model),
      loop_step=loop_step,
      init_metrics=jax.jit(lambda: metric_accumulator(config), out_shardings=rep),
      reset_metrics=jax.jit(_reset_metrics, out_shardings=rep, donate_argnums=(0,)),
      state_finite=jax.jit(_state_finite, out_shardings=rep))


def merge_model(setup: Setup, state: TrainState) -> multitask.MultiTaskModel:
  """The NNX model of ``state`` (train mode; ``embed`` evaluates in eval mode)."""
  return nnx.merge(setup.graphdef, state['params'], state['model_state'])


def load_pretrained(config: Any, setup: Setup, state: TrainState) -> TrainState:
  """Loads ``config.model.pretrained`` into the backbone of a freshly initialised state."""
  model = merge_model(setup, state)
  info = multitask.load_backbone_weights(model, config.model.pretrained)
  logging.info('pretrained backbone %s (%s): %d tensors loaded, %d ignored, position '
               'embedding resized %s', config.model.pretrained, info.get('format'),
               len(info.get('loaded', ())), len(info.get('ignored', ())),
               info.get('pos_embed_resized'))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  state = dict(state, params=jax.device_put(params, setup.state_shardings['params']))
  # The optimizer state is a function of the parameters only through its shapes (SGD, with or
  # without momentum buffers at zero), so it stays valid.
  return state


def param_count(state: TrainState) -> int:
  """Number of parameters (padded classifier columns included)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state['params'])))


def model_flops_per_example(model: multitask.MultiTaskModel) -> float | None:
  """Analytic training FLOPs (forward + backward = 3 x forward) per example; None if unknown.

  ViT: matmuls ``2 * tokens * depth * (4 D^2 + 2 D M)``, patch embedding ``2 * patches * 3 p^2
  D``, attention ``4 * tokens^2 * D`` per block; heads ``2 * D * C`` per task (every head scores
  every example). Counts no recomputation (MFU, not hardware FLOPs utilisation): about 1.15
  TFLOP per 384 x 384 image for ViT-L/16 (SPEC §8).
  """
  backbone = model.backbone
  if not isinstance(backbone, vit.VisionTransformer):
    return None
  cfg = backbone.cfg
  patches = backbone.grid ** 2
  tokens = patches + 1
  d, m = cfg.width, cfg.mlp_dim
  forward = (2 * tokens * cfg.depth * (4 * d * d + 2 * d * m)
             + 2 * patches * 3 * cfg.patch ** 2 * d
             + cfg.depth * 4 * tokens ** 2 * d)
  forward += sum(2 * d * head.num_classes for head in model.heads.values())
  return 3.0 * forward


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of ``device`` (default: the first), None if unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return None
  kind = device.device_kind
  for name, flops in PEAK_FLOPS_BF16:
    if name.lower() in kind.lower():
      return flops
  return None


def compiled_cost(compiled: Any) -> dict[str, float]:
  """FLOPs and bytes of a compiled executable (per device, as XLA reports them)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k: float(cost[k]) for k in ('flops', 'bytes accessed') if k in cost}


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Per-device memory of a compiled executable (bytes)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  return {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}


# --------------------------------------------------------------------------------------------
# Input and class counts.
# --------------------------------------------------------------------------------------------
def resolve_num_classes(config: Any) -> dict[str, int]:
  """Classes per task: config, else the converted data (tfds), else synthetic/catalog sizes."""
  counts = None
  if config.input.source == 'tfds':
    from ufo_jax import data as data_lib

    counts = data_lib.open_training_data(config, config.input.data_dir).num_classes
  return {t: config_lib.num_classes(config, t, counts) for t in config_lib.task_names(config)}


def create_dataset(config: Any, num_classes: Mapping[str, int]) -> Any:
  """The grain dataset of this process's local batches (synthetic or the converted data)."""
  if config.input.source == 'synthetic':
    from ufo_jax.data import synthetic

    return synthetic.create_synthetic_dataset(config, num_classes)
  from ufo_jax import data as data_lib

  return data_lib.create_train_dataset(config, config.input.data_dir)


# --------------------------------------------------------------------------------------------
# Evaluation hook.
# --------------------------------------------------------------------------------------------
def evaluation_available() -> bool:
  """Whether the evaluation module ``ufo_jax.evaluation.run`` is installed."""
  return importlib.util.find_spec('ufo_jax.evaluation.run') is not None


def maybe_evaluate(config: Any, workdir: str, model: multitask.MultiTaskModel, step: int,
                   writer: Any) -> bool:
  """Evaluates ``model`` on ``config.eval.sets`` through ``ufo_jax.evaluation.run.evaluate``.

  Does nothing and returns False when the module ``ufo_jax.evaluation.run`` is not present
  (training then runs without periodic evaluation); returns True after an evaluation.
  """
  if not evaluation_available():
    return False
  from ufo_jax.evaluation import run as evaluation_run

  evaluation_run.evaluate(config, workdir, model, step, writer)
  return True


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
  """Training stopped on non-finite losses (``train.on_nonfinite``); one line for the user."""


class StopSignals:
  """SIGTERM / SIGINT -> finish the step, save, exit 0; a second SIGINT exits at once.

  ``requested`` is the name of the first signal received. With several processes,
  ``agreed(step)`` all-gathers the flags every ``every`` steps, so that all processes stop (and
  save) at the same step whichever of them got the signal.
  """

  def __init__(self, every: int = 10):
    self.every = max(1, int(every))
    self.requested: str | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set in the main thread
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested is not None:
      if signum == signal.SIGINT:
        sys.stderr.write('second SIGINT: exiting at once, without a checkpoint\n')
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)
      return
    self.requested = name
    sys.stderr.write(f'{name}: finishing the current step, then saving a checkpoint and '
                     'exiting (SIGINT again: exit at once)\n')
    sys.stderr.flush()

  def agreed(self, step: int) -> bool:
    """Whether every process stops after ``step`` (a collective every ``every`` steps when
    there are several processes; a local flag otherwise)."""
    if jax.process_count() == 1:
      return self.requested is not None
    if step % self.every:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
    if np.any(flags) and self.requested is None:
      self.requested = 'signal in another process'
    return bool(np.any(flags))


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and writes a probe file there; a ``ConfigError`` (one line) if that
  fails, so an unwritable workdir stops the run before anything is built or compiled."""
  from etils import epath

  probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}_{os.getpid()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError, GCS errors, ...)
    raise config_lib.ConfigError(f'--workdir={workdir}: cannot write there '
                                 f'({type(e).__name__}: {e})') from None


def _nonfinite_message(acc: Mapping[str, Any], config: Any, last_checkpoint: int | None) -> str:
  terms = [n for n, bad in acc['bad_terms'].items() if bool(bad) and n != 'grad_norm']
  what = ('non-finite loss ' + ', '.join(terms)) if terms else 'non-finite gradient norm'
  if terms and bool(acc['bad_terms']['grad_norm']):
    what += ' and gradient norm'
  policy = config.train.get('on_nonfinite', 'stop')
  if policy == 'skip':
    what = (f'{int(acc["consecutive"])} non-finite steps in a row '
            f'(train.max_nonfinite_steps), the last with {what}')
  kept = (f'checkpoint step {last_checkpoint} is the last, and good'
          if last_checkpoint is not None else 'no checkpoint was written')
  return (f'step {int(acc["bad_step"])}: {what} (train.on_nonfinite={policy}); the state was '
          f'not updated by it and {kept}; lower optim.lr, or set '
          '--config.train.on_nonfinite=skip')


def _format_eta(seconds: float) -> str:
  seconds = int(max(0.0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def console_line(step: int, total_steps: int, eta_s: float, averages: Mapping[str, float],
                 tasks: tuple[str, ...], images_per_sec: float, skipped: int = 0) -> str:
  """The one console line of a log step: step/total, ETA, total loss, each task's loss, img/s."""
  parts = [f'step {step}/{total_steps}', f'ETA {_format_eta(eta_s)}',
           f'loss {averages.get("total", float("nan")):.4g}']
  parts.append(' '.join(f'{t} {averages[f"{t}/total"]:.4g}' for t in tasks
                        if f'{t}/total' in averages))
  parts.append(f'{images_per_sec:.1f} img/s')
  if skipped:
    parts.append(f'{skipped} non-finite steps skipped')
  return ' | '.join(p for p in parts if p)


def train_and_evaluate(config: Any, workdir: str, *, checkpoint_path: str | None = None,
                       profile_steps: int = 0,
                       compiler_options: Mapping[str, Any] | None = None) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Args:
    config: the experiment config (validated here). Rerunning a workdir, it must agree with
      the run's saved ``WORKDIR/config.json`` on every field of ``config.LOCKED_FIELDS``; other
      differences (steps, intervals, data_dir, evaluation, workers) apply and are logged.
    workdir: ``config.json``, TensorBoard events and ``checkpoints/`` go here.
    checkpoint_path: when the workdir has no checkpoint yet, start from this checkpoint
      (state and data iterator) instead of a fresh initialisation.
    profile_steps: capture a profiler trace of this many steps after the first logging
      interval, into ``workdir/profile``.
    compiler_options: XLA options for the compiled programs (as ``build``'s).

  Returns:
    The final train state (the state of the stop step after SIGTERM / SIGINT).

  Raises:
    config.ConfigError: the config, the workdir or a resume that changes a locked field.
    checkpoint.MismatchError: a checkpoint that does not fit the config.
    NonFiniteError: training stopped on non-finite losses (``train.on_nonfinite``).
  """
  from clu import metric_writers
  from etils import epath

  from ufo_jax import checkpoint as ckpt_lib

  # ---- Setup: config, workdir, the run's saved config, devices and mesh.
  config_lib.normalize(config)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  check_workdir(workdir)
  saved_path = epath.Path(workdir) / config_lib.RUN_CONFIG_FILE
  origin = os.fspath(saved_path) if saved_path.exists() else (
      config_lib.find_run_config(checkpoint_path) if checkpoint_path else None)
  if origin:
    saved = config_lib.config_from_json(epath.Path(origin).read_text(), what=origin)
    for field, old, new in config_lib.check_resume(saved, config, origin):
      logging.info('config.%s: %r in %s, now %r', field, old, origin, new)
  mesh = sharding.create_mesh(config.mesh)
  logging.info('devices: %d (%d processes) %s; mesh %s', jax.device_count(),
               jax.process_count(), jax.devices()[0].device_kind, dict(mesh.shape))
  total_steps = int(config.train.steps)

  stop = StopSignals(int(config.train.get('stop_sync_every', 10)))
  stop.install()
  manager = source = data_iter = writer = None
  profiling = False
  try:
    # ---- Checkpoints: resume from the workdir, or start from --checkpoint, or from scratch.
    manager = ckpt_lib.create_manager(
        os.path.join(workdir, 'checkpoints'), keep_checkpoints=int(config.train.keep_checkpoints),
        keep_every=int(config.train.keep_every))
    source, source_step = manager, manager.latest_step()
    if source_step is None and checkpoint_path:
      directory, source_step = ckpt_lib.locate(checkpoint_path)
      source = ckpt_lib.create_manager(directory, read_only=True)
      source_step = source_step if source_step is not None else source.latest_step()
      if source_step is None:
        raise FileNotFoundError(f'--checkpoint={checkpoint_path}: no checkpoint in {directory}')
    pretrained = None
    if source_step is None:  # a fresh start: the pretrained file (or 'none') before any data
      pretrained = config_lib.pretrained_path(config)
      if pretrained is None:
        logging.info('config.model.pretrained=none: training from scratch')
    padded = None
    num_classes = resolve_num_classes(config)
    if source_step is not None:
      meta = ckpt_lib.restore_meta(source, source_step)
      _check_meta(meta, num_classes, os.path.join(os.fspath(source.directory), str(source_step)))
      padded = meta['padded_classes']

    # ---- Data, model, optimizer, state.
    dataset = create_dataset(config, num_classes)
    data_iter = iter(dataset)
    setup = build(config, num_classes, mesh, padded_classes=padded,
                  compiler_options=compiler_options)
    if source_step is not None:
      logging.info('restoring step %d from %s', source_step, source.directory)
      ckpt_lib.check_fits(source, source_step, setup.abstract_state)
      state = ckpt_lib.restore(source, setup.abstract_state, step=source_step,
                               data_iterator=data_iter)
    else:
      state = setup.init()
      if pretrained is not None:
        state = load_pretrained(config, setup, state)
    meta = {'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes}
    first_step = int(jax.device_get(state['step']))
    if jax.process_index() == 0:
      config_lib.save_run_config(config, workdir)
    logging.info('parameters: %d; starting at step %d of %d; config %s', param_count(state),
                 first_step, total_steps, saved_path)
    if first_step >= total_steps:
      logging.info('nothing to train: the run is at step %d of %d', first_step, total_steps)
      return state

    # ---- Compile once (ahead of time), report its cost.
    t0 = time.time()
    acc = setup.init_metrics()
    compiled = setup.loop_step.lower(state, acc, setup.batch_shapes).compile()
    logging.info('train step compiled in %.1fs; XLA cost per device %s; memory %s',
                 time.time() - t0, compiled_cost(compiled), compiled_memory(compiled))

    if jax.process_index() == 0:  # TensorBoard only: the console gets one line per log step
      writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    else:
      writer = metric_writers.MultiWriter([])
    if first_step == 0:
      writer.write_hparams(_flat_hparams(config))
    tasks = config_lib.task_names(config)
    global_batch = config_lib.global_batch_size(config)
    peak = peak_flops_per_device()
    # MFU numerator: analytic model FLOPs (ViT), else XLA's count of the compiled step (ResNet).
    if setup.model_flops_per_example:
      flops_per_step = setup.model_flops_per_example * global_batch
    else:
      flops_per_step = compiled_cost(compiled).get('flops', 0.0) * jax.device_count()
    log_every = int(config.train.log_every)
    ckpt_every = int(config.train.checkpoint_every)
    eval_every = int(config.eval.every_steps)
    profile_start = first_step + max(log_every, 1) if profile_steps else -1
    profile_dir = os.path.join(workdir, 'profile')
    last_log_time, last_log_step = time.time(), first_step
    last_saved = manager.latest_step()

    # ---- Loop.
    for step in range(first_step + 1, total_steps + 1):
      if step == profile_start + 1:
        jax.profiler.start_trace(profile_dir)
        profiling = True
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.make_global_batch(next(data_iter), mesh)
        state, acc = compiled(state, acc, batch)
      if profiling and step == profile_start + profile_steps:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
        logging.info('profiler trace of steps %d-%d written to %s', profile_start + 1, step,
                     profile_dir)

      is_last = step == total_steps
      is_log = bool(log_every) and (step % log_every == 0 or is_last)
      is_ckpt = bool(ckpt_every and step % ckpt_every == 0) or is_last
      is_eval = bool(eval_every and step % eval_every == 0) or is_last
      stopping = stop.agreed(step) or manager.reached_preemption(step)
      if is_log or is_ckpt or is_eval or stopping:
        # The one host sync of a boundary: the interval's metrics and the non-finite state.
        values = jax.device_get(acc)
        if bool(values['halted']):
          raise NonFiniteError(_nonfinite_message(values, config, last_saved))
        if is_log:
          now = time.time()
          elapsed, steps = now - last_log_time, step - last_log_step
          averages = interval_averages(values)
          scalars = {f'train/{k}': v for k, v in averages.items()}
          scalars['train/nonfinite_steps'] = int(values['nonfinite'])
          scalars['perf/images_per_sec'] = steps * global_batch / elapsed
          scalars['perf/step_time_s'] = elapsed / steps
          if peak and flops_per_step:
            scalars['perf/mfu'] = flops_per_step * steps / elapsed / (peak * jax.device_count())
          writer.write_scalars(step, scalars)
          logging.info('%s', console_line(
              step, total_steps, (total_steps - step) * elapsed / steps, averages, tasks,
              scalars['perf/images_per_sec'], int(values['nonfinite'])))
          acc = setup.reset_metrics(acc)
          last_log_time, last_log_step = time.time(), step

      if is_ckpt or stopping:
        if not bool(jax.device_get(setup.state_finite(state))):
          raise NonFiniteError(f'step {step}: the train state holds non-finite values; not '
                               f'saved (the last checkpoint, step {last_saved}, is kept)')
        if ckpt_lib.save(manager, step, state, data_iterator=data_iter, meta=meta, force=True):
          last_saved = step
      if stopping:
        manager.wait_until_finished()
        logging.warning('%s: stopped after step %d; checkpoint %s committed; run the same '
                        'command again to resume', stop.requested or 'preemption', step,
                        os.path.join(os.fspath(manager.directory), str(step)))
        break

      if is_eval:
        maybe_evaluate(config, workdir, merge_model(setup, state), step, writer)
  finally:
    # ---- Finish: let the last checkpoint commit, stop the input workers, flush the logs.
    if profiling:
      jax.profiler.stop_trace()
    for m in {id(x): x for x in (manager, source) if x is not None}.values():
      m.wait_until_finished()
      m.close()
    if data_iter is not None and hasattr(data_iter, 'close'):
      data_iter.close()
      # Batches from grain workers live in shared memory, unlinked when their arrays are
      # collected: collect the last ones now, not at interpreter exit (if ever).
      batch = None
      gc.collect()
    if writer is not None:
      writer.flush()
      writer.close()
    stop.restore()
  return state


def _check_meta(meta: Mapping[str, Any], num_classes: Mapping[str, int], where: str) -> None:
  """One line if a checkpoint's tasks or class counts differ from the config's."""
  from ufo_jax import checkpoint as ckpt_lib

  saved = dict(meta.get('num_classes', {}))
  if set(saved) != set(num_classes):
    raise ckpt_lib.MismatchError(
        f'checkpoint {where} does not fit the config: it has the tasks {sorted(saved)}, the '
        f'config {sorted(num_classes)}')
  for task, n in num_classes.items():
    if int(saved[task]) != int(n):
      raise ckpt_lib.MismatchError(
          f'checkpoint {where} does not fit the config: tasks.{task} has {saved[task]} classes '
          f'in the checkpoint, {n} for the config (tasks.{task}.num_classes, its datasets or '
          'input.synthetic_num_classes differ)')


def _flat_hparams(config: Any) -> dict[str, Any]:
  """The config as a flat {dotted.name: scalar} dict for TensorBoard's hparams."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if hasattr(node, 'items'):
      for key, value in node.items():
        visit(f'{prefix}{key}.', value)
    else:
      value = node if isinstance(node, (bool, int, float, str)) else str(node)
      flat[prefix[:-1]] = value

  visit('', config)
  return flat


# --------------------------------------------------------------------------------------------
# Dry run and checkpointed models.
# --------------------------------------------------------------------------------------------
def dry_run(config: Any, *, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Lowers and compiles the train step of ``config`` for the current devices, allocating nothing.

  Prints the mesh, parameter count, FLOPs per step (compiled cost analysis), per-device memory
  (compiled memory analysis) and the sharding of every state array. Returns the numbers.
  """
  if config.input.source == 'tfds' and not config.input.data_dir:
    # No data needed to compile: validate the rest; class counts come from the catalog.
    config = copy.deepcopy(config)
    config.input.source = 'synthetic'
    print_fn('input.data_dir is not set: class counts from the catalog (full datasets)')
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  mesh = sharding.create_mesh(config.mesh)
  num_classes = {t: config_lib.num_classes(config, t) for t in config_lib.task_names(config)}
  setup = build(config, num_classes, mesh)
  t0 = time.time()
  compiled = setup.train_step.lower(setup.abstract_state, setup.batch_shapes).compile()
  compile_s = time.time() - t0
  params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state['params'])))
  cost = compiled_cost(compiled)
  memory = compiled_memory(compiled)
  flops_device = cost.get('flops', 0.0)
  result = {
      'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'params': params,
      'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes,
      'global_batch': config_lib.global_batch_size(config),
      'flops_per_step_xla': flops_device * jax.device_count(),
      'flops_per_step_model': (setup.model_flops_per_example or 0.0)
                              * config_lib.global_batch_size(config),
      'memory_per_device': memory, 'compile_s': compile_s}
  gib = 2.0 ** 30
  print_fn(f'mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} '
           'devices')
  print_fn(f'parameters: {params:,} (classes {setup.num_classes}, padded to '
           f'{setup.padded_classes})')
  print_fn(f'global batch: {result["global_batch"]}; image size {config.input.image_size}')
  print_fn(f'FLOPs per step: model {result["flops_per_step_model"]:.4g} (analytic, 3 x '
           f'forward); XLA cost analysis {result["flops_per_step_xla"]:.4g} (all devices; counts '
           'rematerialisation, and a scanned layer stack once)')
  mem_line = ', '.join(f'{k.replace("_size_in_bytes", "")} {v / gib:.2f} GiB'
                       for k, v in memory.items())
  print_fn(f'memory per device: {mem_line}')
  print_fn(f'compile time: {compile_s:.1f}s')
  print_fn('state shardings:')
  for line in sharding.describe(setup.abstract_state, setup.state_shardings):
    print_fn('  ' + line)
  return result
