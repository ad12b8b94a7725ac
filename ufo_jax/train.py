"""Multi-task training: setup, the loop, checkpoints, logs and the evaluation hook.

``train_and_evaluate(config, workdir)`` reads top to bottom:

1. Setup: devices and mesh, config validation, input (synthetic or the converted datasets),
   model and optimizer, the train state created directly in its sharded layout
   (``jax.jit(init, out_shardings=...)``) or restored from the latest checkpoint of the workdir.
2. Loop: next local batch -> global array (``sharding.make_global_batch``) -> the compiled
   train step -> every ``train.log_every`` steps the per-task losses, learning rate, images/s and
   MFU through clu (TensorBoard events in the workdir, console progress with ETA) -> a
   checkpoint every ``train.checkpoint_every`` steps and at the end -> evaluation every
   ``eval.every_steps`` steps and at the end (``maybe_evaluate``).

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
import importlib.util
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
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


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: Any,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The functional train step ``(state, batch) -> (state, metrics)`` (not jitted).

  ``batch``: ``image`` (B, H, W, 3) uint8, ``label`` (B,) int32, ``task`` (B,) int32. The step
  normalises and randomly erases on the device, runs one forward/backward pass of the
  multi-task model, and applies the optimizer. With a ``mesh`` and
  ``config.model.sharded_softmax`` (default True), CosFace is the model-parallel softmax.
  """
  settings = task_losses(config)
  loss_mesh = mesh if config.model.get('sharded_softmax', True) else None
  augment = config.input.augment

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    step = state['step']
    images = device_ops.preprocess(batch['image'], jax.random.fold_in(state['rng'], step),
                                   augment, train=True)

    model = nnx.merge(graphdef, state['params'], state['model_state'])

    def loss_fn(model):
      outputs = model(images, batch['task'])
      return compute_losses(model, outputs, batch['label'], settings, mesh=loss_mesh)

    # Gradients with respect to the nnx.Param leaves; BatchNorm statistics and rng counts
    # updated by the forward pass flow back into `model`.
    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics['lr'] = schedule(step)
    metrics['grad_norm'] = optax.global_norm(grads)
    new_state = {'step': step + 1, 'params': params, 'model_state': model_state,
                 'opt_state': opt_state, 'rng': state['rng']}
    return new_state, metrics

  return train_step


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
  return Setup(
      mesh=mesh, graphdef=graphdef, abstract_state=abstract_state,
      state_shardings=state_shardings, batch_shapes=batch_shapes,
      init=jax.jit(init, out_shardings=state_shardings, compiler_options=options),
      train_step=train_step,
      schedule=schedule, num_classes=num_classes, padded_classes=padded,
      model_flops_per_example=model_flops_per_example(abstract_model))


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

    counts = data_lib.num_classes(config, config.input.data_dir)
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
def train_and_evaluate(config: Any, workdir: str, *, checkpoint_path: str | None = None
                       ) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Args:
    config: the experiment config (validated here).
    workdir: TensorBoard events and ``checkpoints/`` go here.
    checkpoint_path: when the workdir has no checkpoint yet, start from this checkpoint
      (state and data iterator) instead of a fresh initialisation.

  Returns:
    The final train state.
  """
  from clu import metric_writers, periodic_actions

  from ufo_jax import checkpoint as ckpt_lib

  # ---- Setup: devices, mesh, config.
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  mesh = sharding.create_mesh(config.mesh)
  logging.info('devices: %d (%d processes) %s; mesh %s', jax.device_count(),
               jax.process_count(), jax.devices()[0].device_kind, dict(mesh.shape))
  total_steps = int(config.train.steps)

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
  padded = None
  if source_step is not None:
    padded = ckpt_lib.restore_meta(source, source_step)['padded_classes']
  else:  # a fresh start: the pretrained file (or 'none') before any data is read
    pretrained = config_lib.pretrained_path(config)
    if pretrained is None:
      logging.info('config.model.pretrained=none: training from scratch')

  # ---- Data, model, optimizer, state.
  num_classes = resolve_num_classes(config)
  dataset = create_dataset(config, num_classes)
  data_iter = iter(dataset)
  setup = build(config, num_classes, mesh, padded_classes=padded)
  if source_step is not None:
    logging.info('restoring step %d from %s', source_step, source.directory)
    state = ckpt_lib.restore(source, setup.abstract_state, step=source_step,
                             data_iterator=data_iter)
  else:
    state = setup.init()
    if pretrained is not None:
      state = load_pretrained(config, setup, state)
  meta = {'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes}
  first_step = int(jax.device_get(state['step']))
  logging.info('parameters: %d; starting at step %d of %d', param_count(state), first_step,
               total_steps)

  # ---- Compile once (ahead of time), report its cost.
  t0 = time.time()
  compiled = setup.train_step.lower(state, setup.batch_shapes).compile()
  logging.info('train step compiled in %.1fs; XLA cost per device %s; memory %s',
               time.time() - t0, compiled_cost(compiled), compiled_memory(compiled))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(_flat_hparams(config))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
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
  last_log_time, last_log_step = time.time(), first_step

  # ---- Loop.
  try:
    for step in range(first_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.make_global_batch(next(data_iter), mesh)
        state, metrics = compiled(state, batch)
      report(step, time.time())

      if log_every and (step % log_every == 0 or step == total_steps):
        scalars = {f'train/{k}': float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.time() - last_log_time
        steps = step - last_log_step
        scalars['perf/images_per_sec'] = steps * global_batch / elapsed
        scalars['perf/step_time_s'] = elapsed / steps
        if peak and flops_per_step:
          scalars['perf/mfu'] = flops_per_step * steps / elapsed / (peak * jax.device_count())
        writer.write_scalars(step, scalars)
        last_log_time, last_log_step = time.time(), step

      is_last = step == total_steps
      preempted = manager.reached_preemption(step)
      if (ckpt_every and step % ckpt_every == 0) or is_last or preempted:
        ckpt_lib.save(manager, step, state, data_iterator=data_iter, meta=meta, force=True)
      if preempted and not is_last:
        logging.warning('preemption signal at step %d: checkpoint saved, exiting', step)
        break

      if (eval_every and step % eval_every == 0) or is_last:
        with report.timed('eval'):
          maybe_evaluate(config, workdir, merge_model(setup, state), step, writer)
  finally:
    # ---- Finish: let the last checkpoint commit, stop the input workers, flush the logs.
    manager.wait_until_finished()
    manager.close()
    if hasattr(data_iter, 'close'):
      data_iter.close()
    writer.flush()
  return state


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


def load_model(config: Any, checkpoint_path: str, *, step: int | None = None,
               mesh: jax.sharding.Mesh | None = None
               ) -> tuple[multitask.MultiTaskModel, int]:
  """The model of a checkpoint, for evaluation or export: ``(model in eval mode, step)``.

  Args:
    config: the experiment config the checkpoint was trained with.
    checkpoint_path: a workdir, its ``checkpoints/`` folder or one step folder.
    step: the step to load (default: the one the path names, else the latest).
    mesh: where to place the state (default: ``config.mesh`` over all devices).
  """
  from ufo_jax import checkpoint as ckpt_lib

  directory, path_step = ckpt_lib.locate(checkpoint_path)
  manager = ckpt_lib.create_manager(directory, read_only=True)
  step = step if step is not None else path_step
  step = step if step is not None else manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  meta = ckpt_lib.restore_meta(manager, step)
  mesh = mesh or sharding.create_mesh(config.mesh)
  setup = build(config, meta['num_classes'], mesh, padded_classes=meta['padded_classes'])
  state = ckpt_lib.restore(manager, setup.abstract_state, step=step)
  model = merge_model(setup, state)
  model.eval()
  return model, step
