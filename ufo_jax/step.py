"""The jitted train step and what builds it: the train state, the losses of the multi-task model,
``build`` (sharded init, the step, their shardings) and the pretrained backbone.

The train step is ONE ``jax.jit`` over the split NNX state: the model's graphdef is static, the
state is a pytree ``{'step', 'params', 'model_state', 'opt_state', 'rng'}`` (``model_state``: the
BatchNorm statistics and drop-path rng streams) with ``NamedSharding``s from
``ufo_jax.sharding``, donated to the step. ``nnx.merge`` happens inside the step and, outside the
hot loop, only to evaluate (``merge_model``).

Only jax, flax and optax are needed here (``bench/train_step.py`` runs on machines without grain
or clu). The on-device metric sums come from ``ufo_jax.metrics``, the parameter count from
``ufo_jax.hardware``; neither imports this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import losses, metrics, optim, pytree, sharding
from ufo_jax.data import device_ops
from ufo_jax.models import multitask, vit

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TaskLoss:
  """The loss settings of one task (from ``config.tasks.<task>``)."""
  scale: float
  margin: float
  triplet: bool
  triplet_margin: float
  weight: float


def task_losses(config: Any) -> dict[str, TaskLoss]:
  """The loss settings of every task, in task order.

  ``config.train.sabotage_margin_sign = -1`` (absent: +1) flips every CosFace margin's sign: a
  BENCHMARK SABOTAGE that bench/learning.py's ``wrong_margin_sign`` recipe must catch
  (docs/PERFORMANCE.md, "Learning quality"); never set it otherwise (``config.validate``
  checks it).
  """
  sign = config.train.get('sabotage_margin_sign', 1)
  return {t: TaskLoss(scale=float(c.cosface_scale), margin=sign * float(c.cosface_margin),
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


def lr_scale_fn(config: Any) -> Callable[[tuple[str, ...]], float]:
  """Per-parameter LR multiplier: ``config.tasks.<t>.lr_scale`` for head ``t``, else 1."""
  scales = {t: float(config.tasks[t].lr_scale) for t in config_lib.task_names(config)}

  def scale(path: tuple[str, ...]) -> float:
    if len(path) >= 2 and path[0] == 'heads' and path[1] in scales:
      return scales[path[1]]
    return 1.0

  return scale


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
    train_step: jitted ``(state, batch) -> (state, metrics)``, state donated (one step's
      metrics: tests and benchmarks).
    schedule: the learning-rate schedule.
    num_classes, padded_classes: classes per task, real and padded.
    model_flops: analytic training FLOPs per example (``model_flops``), None if unknown.
    loop_step: jitted ``(state, acc, batch) -> (state, acc)``, both donated: what the training
      loop runs (and ``--mode=aot`` / ``dry_run`` compile), the metrics summed on the device.
    init_metrics, reset_metrics: jitted ``metrics.metric_accumulator`` / ``reset_metrics``.
    state_finite: jitted ``state -> bool``, whether every float array is finite.
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
  model_flops: dict[str, float] | None
  loop_step: Callable
  init_metrics: Callable
  reset_metrics: Callable
  state_finite: Callable

  @property
  def model_flops_per_example(self) -> float | None:
    """Analytic training FLOPs per example (the MFU numerator), None if unknown."""
    return self.model_flops['total'] if self.model_flops else None

  def abstract_metrics(self) -> Any:
    """The ``ShapeDtypeStruct``s of the metric accumulator (to lower ``loop_step``)."""
    return jax.eval_shape(self.init_metrics)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: Any,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The functional train step ``(state, batch) -> (state, metrics)`` (not jitted).

  ``batch``: ``image`` (B, H, W, 3) uint8, ``label`` (B,) int32, ``task`` (B,) int32. The step
  normalises and randomly erases on the device, runs one forward/backward pass of the
  multi-task model, and applies the optimizer. With a ``mesh`` and
  ``config.model.sharded_softmax`` (default True), CosFace is the model-parallel softmax.

  A step whose total loss or gradient norm is not finite leaves the parameters, the optimizer
  moments and the BatchNorm statistics as they were (``jnp.where`` on the update). The counters
  advance as after any step: ``step``, the schedule's count in the optimizer state and the
  drop-path rng counts, so the lr applied next is ``schedule(step)``, the lr logged, and the next
  step draws fresh drop-path masks. Its ``metrics['nonfinite']`` is 1.

  Called as ``(state, batch, acc)`` it returns ``(state, acc)`` instead: the interval
  sums of ``metric_accumulator`` updated on the device (the loop's form: no host sync per
  step). Once ``acc['halted']`` is set (a non-finite step under ``train.on_nonfinite='stop'``,
  or ``train.max_nonfinite_steps`` in a row under ``'skip'``) no step updates the state.
  """
  settings = task_losses(config)
  loss_mesh = mesh if config.model.get('sharded_softmax', True) else None
  augment = config.input.augment
  accumulate = metrics.make_accumulate(config)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], acc=None):
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
      total, scalars = compute_losses(model, outputs, batch['label'], settings, mesh=loss_mesh)
      scalars.update(batch_accuracy(model, outputs, batch['label'], settings, mesh=loss_mesh))
      return total, scalars

    # Gradients with respect to the nnx.Param leaves; BatchNorm statistics and rng counts
    # updated by the forward pass flow back into `model`.
    (total, scalars), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    apply = finite if acc is None else finite & jnp.logical_not(acc['halted'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)

    def keep(new, old):  # the update, or the old values after a non-finite step
      return jax.tree_util.tree_map_with_path(
          lambda path, n, o: n if _is_counter(path) else jnp.where(apply, n, o), new, old)

    scalars['lr'] = schedule(step)
    scalars['grad_norm'] = grad_norm
    new_state = {'step': step + 1, 'params': keep(params, old_state['params']),
                 'model_state': keep(model_state, old_state['model_state']),
                 'opt_state': keep(opt_state, old_state['opt_state']), 'rng': state['rng']}
    if acc is None:
      scalars['nonfinite'] = jnp.logical_not(finite).astype(jnp.int32)
      return new_state, scalars
    return new_state, accumulate(acc, scalars, finite, step + 1)

  return train_step


def _is_counter(path: tuple[Any, ...]) -> bool:
  """Whether a state leaf counts steps (optax's schedule ``count``, an nnx ``RngCount``): those
  advance even after a non-finite step."""
  return pytree.path_to_strings(path)[-1:] == ('count',)


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
      model_flops=model_flops(abstract_model),
      loop_step=loop_step,
      init_metrics=jax.jit(lambda: metrics.metric_accumulator(config), out_shardings=rep),
      reset_metrics=jax.jit(metrics.reset_metrics, out_shardings=rep, donate_argnums=(0,)),
      state_finite=jax.jit(_state_finite, out_shardings=rep))


def merge_model(setup: Setup, state: TrainState) -> multitask.MultiTaskModel:
  """The NNX model of ``state`` (train mode; ``embed`` evaluates in eval mode)."""
  return nnx.merge(setup.graphdef, state['params'], state['model_state'])


def load_pretrained(config: Any, setup: Setup, state: TrainState) -> TrainState:
  """Loads ``config.model.pretrained`` into the backbone of a freshly initialised state.

  A UFO release (``.pdmodel``) also fills the necks of its tasks (scale, frozen bias and running
  statistics: ``model_state``; ``ufo_jax.models.ufo_release``).
  """
  model = merge_model(setup, state)
  info = multitask.load_backbone_weights(model, config.model.pretrained)
  logging.info('pretrained backbone %s (%s): %d tensors loaded, %d ignored, position '
               'embedding resized %s%s', config.model.pretrained, info.get('format'),
               len(info.get('loaded', ())), len(info.get('ignored', ())),
               info.get('pos_embed_resized'),
               f"; necks {info['heads']}" if info.get('heads') else '')
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  state = dict(state, params=jax.device_put(params, setup.state_shardings['params']),
               model_state=jax.device_put(model_state, setup.state_shardings['model_state']))
  # The optimizer state is a function of the parameters only through its shapes (SGD, with or
  # without momentum buffers at zero), so it stays valid.
  return state


def model_flops(model: multitask.MultiTaskModel) -> dict[str, float] | None:
  """Analytic training FLOPs per example (forward + backward = 3 x forward) of a ViT model (an
  abstract one will do), split into one layer and the rest; None for other backbones.

  Per layer ``2 T (4 D^2 + 2 D M) + 4 T^2 D`` (matmuls, attention; T tokens, D width, M MLP
  width); the rest: the patch embedding ``2 N 3 p^2 D`` (N patches of p x p) and the heads
  ``2 D C`` per task (every head scores every example). Counts no recomputation (MFU, not
  hardware FLOPs utilisation): about 1.15 TFLOP per 384 x 384 image for ViT-L/16
  (docs/PERFORMANCE.md). One function for the training log's MFU and the compile report's
  rematerialisation overhead (``ufo_jax.aot``).

  Returns:
    ``{'layer', 'rest', 'depth', 'total'}``: FLOPs of one layer, of the rest, the depth and
    ``depth * layer + rest``.
  """
  backbone = model.backbone
  if not isinstance(backbone, vit.VisionTransformer):
    return None
  cfg = backbone.cfg
  patches = backbone.grid ** 2
  tokens = patches + 1
  d, m = cfg.width, cfg.mlp_dim
  layer = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens ** 2 * d
  rest = 2 * patches * 3 * cfg.patch ** 2 * d
  rest += sum(2 * d * head.num_classes for head in model.heads.values())
  return {'layer': 3.0 * layer, 'rest': 3.0 * rest, 'depth': cfg.depth,
          'total': 3.0 * (cfg.depth * layer + rest)}
