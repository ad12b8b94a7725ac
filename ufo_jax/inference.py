"""Inference: a trained or exported model -> the embeddings of uint8 images, for every task.

    loaded = load_model('/runs/ufo_l')          # a workdir, its checkpoints/ or one step folder
    feats = embed(loaded, images)               # images uint8 (B, S, S, 3) RGB
    feats['person']                             # (B, D) float32, L2-normalised
    loaded = load_exported('/models/ufo_l')     # the folder of `python -m ufo_jax.export`
    loaded.step, loaded.image_size, loaded.tasks, loaded.normalization, loaded.source

``load_model``, ``load_exported`` and ``create_model`` return one frozen ``Loaded``: the model
and what using it needs (image size, input normalisation, tasks in output order, training step,
where it came from), read once from its source.

The inference model is the training's ``MultiTaskModel`` without what only training needs: the
CosFace class weights are not built (every head keeps its BatchNorm neck), drop path and
rematerialisation are off, and the model is in eval mode. ``load_model`` restores ONLY the
backbone parameters and the necks' scale and running statistics from a training checkpoint (an
orbax partial restore: the optimizer state, the class weights and the rng state stay on disk).
It computes in float32 (the evaluation's features) unless a ``dtype`` is asked for, whatever
dtype the run trained in; ``attention_impl='cudnn'`` becomes ``'xla'`` in float32 (cuDNN
attention takes bfloat16 / float16 only; ``ufo_jax.models.vit.attention_for_dtype``).

``embed`` runs ONE backbone pass for all tasks: it normalises the uint8 images on the device
(``(x - mean) / std`` of ``config.input.augment``, as the evaluation does), and returns every
task's neck output in eval mode, L2-normalised. These are the features of the evaluation
(``ufo_jax.evaluation.extract``: every protocol compares L2-normalised features), in float32.
Images must already be at the model's size: ``ufo_jax.embed`` resizes files exactly as the
evaluation does (``ufo_jax.data.augment.eval_transform``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from ufo_jax import checkpoint as ckpt_lib
from ufo_jax import config as config_lib
from ufo_jax import sharding
from ufo_jax.data import augment, device_ops
from ufo_jax.models import multitask, ufo_release, vit

MODEL_JSON = 'model.json'
PARAMS_DIR = 'params'
EXPORT_FORMAT = 'ufo-jax-export'
EXPORT_FORMAT_VERSION = 1
NORM_EPS = 1e-12  # floor of the feature norm in the L2 normalisation
DEFAULT_DTYPE = 'float32'  # load_model's compute dtype: the evaluation's
MODEL_ID_CHARS = 16  # hex digits of the sha256 kept as the model_id


@dataclasses.dataclass(frozen=True)
class Loaded:
  """An inference model and what using it needs, read once from where it came from.

  Attributes:
    model: the ``MultiTaskModel`` in eval mode (backbone and necks, no class weights).
    image_size: the square input side in pixels.
    normalization: ``(mean, std)``: the uint8 inputs are computed as ``(pixel - mean) / std``.
    tasks: the task names in output order (alphabetical: face, person, product, vehicle).
    step: the training step of the parameters (None for a randomly initialised model).
    source: the checkpoint step folder or export folder it was read from, or ``'random'``.
    model_id: the export's fingerprint (``model_id``); None until exported (``load_model``,
      ``create_model``: ``model_id(loaded)`` computes it).
  """
  model: multitask.MultiTaskModel
  image_size: int
  normalization: tuple[float, float]
  tasks: tuple[str, ...]
  step: int | None
  source: str
  model_id: str | None = None


def preprocessing(loaded: Loaded) -> dict[str, Any]:
  """What turns an image file into the model's input: size, normalisation and resize."""
  mean, std = loaded.normalization
  return {'image_size': loaded.image_size,
          'normalization': {'mean': mean, 'std': std, 'formula': '(pixel - mean) / std'},
          'resize': {'method': 'bicubic', 'function': 'ufo_jax.data.augment.eval_transform',
                     'backend': augment.DEFAULT_RESIZE_BACKEND}}


def model_id(loaded: Loaded) -> str:
  """The fingerprint of what the model computes from a file: a short sha256 of every inference
  array (path, dtype, shape, bytes; backbone and necks) and of ``preprocessing``. Two exports
  of the same checkpoint share it (the compute dtype is not part of it); any other parameters,
  image size, normalisation or resize give another."""
  digest = hashlib.sha256(json.dumps(preprocessing(loaded), sort_keys=True).encode())
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(loaded.model)))[0]
  for path, leaf in leaves:
    a = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|'.encode())
    digest.update(a.tobytes())
  return digest.hexdigest()[:MODEL_ID_CHARS]


# --------------------------------------------------------------------------------------------
# The inference model.
# --------------------------------------------------------------------------------------------
def inference_config(config: Any, *, dtype: str | None = None) -> Any:
  """A copy of ``config`` for inference: no drop path, no remat, no pretrained file to load.

  ``dtype`` overrides the compute dtype (``config.model.dtype``); parameters stay float32.
  ``attention_impl='cudnn'`` becomes ``'xla'`` when the compute dtype is not bfloat16 / float16
  (logged once).
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.drop_path_rate = 0.0
    config.model.remat_policy = 'none'
    config.model.pretrained = ''
    if dtype is not None:
      config.model.dtype = dtype
    if 'attention_impl' in config.model:
      config.model.attention_impl = vit.attention_for_dtype(config.model.attention_impl,
                                                            config.model.dtype)
  return config


def output_tasks(model: multitask.MultiTaskModel) -> tuple[str, ...]:
  """The tasks of ``model`` in output order (alphabetical: face, person, product, vehicle)."""
  return tuple(sorted(model.tasks))


def _build(config: Any, rngs: nnx.Rngs | None = None) -> multitask.MultiTaskModel:
  """The inference model of an ``inference_config``: heads without class weights, eval mode."""
  tasks = config_lib.task_names(config)
  model = multitask.create_model(config, {t: 1 for t in tasks}, rngs=rngs or nnx.Rngs(0),
                                 load_pretrained=False)
  for task in tasks:  # the CosFace class weights: training only
    head = model.heads[task]
    del head.class_weights
    head.num_classes = head.padded_classes = 0
  model.eval()
  return model


def _loaded(model: multitask.MultiTaskModel, config: Any, step: int | None,
            source: str) -> Loaded:
  aug = config.input.augment
  return Loaded(model=model, image_size=int(config.input.image_size),
                normalization=(float(aug.mean), float(aug.std)), tasks=output_tasks(model),
                step=step, source=source)


def create_model(config: Any, *, rngs: nnx.Rngs | None = None,
                 dtype: str | None = None) -> Loaded:
  """The inference model of ``config`` with random weights (benchmarks, tests), as ``Loaded``.

  ``dtype``: the compute dtype (default: ``config.model.dtype``).
  """
  config = inference_config(config, dtype=dtype)
  return _loaded(_build(config, rngs), config, None, 'random')


def abstract_model(config: Any) -> multitask.MultiTaskModel:
  """The inference model's structure with ``jax.ShapeDtypeStruct`` leaves (nothing allocated).

  ``config`` is used as given (pass an ``inference_config``).
  """
  return nnx.eval_shape(lambda: _build(config))


def _sharded_abstract_state(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """The state's ``ShapeDtypeStruct``s with the training's sharding rules on ``mesh``."""
  shardings = sharding.tree_shardings(state, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state, shardings)


def _with_values(tree: Any) -> Any:
  """A pure dict as the training checkpoint stores an ``nnx.State``: ``{'value': leaf}``."""
  if isinstance(tree, Mapping):
    return {k: _with_values(v) for k, v in tree.items()}
  return {'value': tree}


def _without_values(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    if set(tree) == {'value'} and not isinstance(tree['value'], Mapping):
      return tree['value']
    return {k: _without_values(v) for k, v in tree.items()}
  return tree


def _open_checkpoint(checkpoint_path: str, step: int | None) -> tuple[str, int, dict[str, Any]]:
  """``(step folder, step, meta)`` of the checkpoint ``checkpoint_path`` and ``step`` name."""
  directory, path_step = ckpt_lib.locate(checkpoint_path)
  manager = ckpt_lib.create_manager(directory, read_only=True)
  try:
    step = ckpt_lib.resolve_step(manager, step if step is not None else path_step)
    meta = ckpt_lib.restore_meta(manager, step)
  finally:
    manager.close()
  return os.path.join(os.path.abspath(directory), str(step)), step, meta


def load_model(checkpoint_path: str, config: Any = None, *, step: int | None = None,
               mesh: jax.sharding.Mesh | None = None,
               dtype: str | None = DEFAULT_DTYPE) -> Loaded:
  """The inference model of a training checkpoint, as ``Loaded`` (model in eval mode, step, ...).

  Args:
    checkpoint_path: a workdir, its ``checkpoints/`` folder or one step folder.
    config: the experiment config the checkpoint was trained with; None reads the config saved
      with the run (``WORKDIR/config.json``, ``ufo_jax.config.load_run_config``).
    step: the step to load (default: the one the path names, else the latest).
    mesh: where to place the parameters (default: ``config.mesh`` over all devices, with the
      training's sharding rules).
    dtype: the compute dtype: 'float32' (default, the evaluation's features) or 'bfloat16';
      None: the dtype the run trained in (``config.model.dtype``).

  Only the backbone parameters and the necks (scale, running mean and variance) are read: no
  optimizer state, no CosFace class weights, no rng state.
  """
  if config is None:
    config = config_lib.load_run_config(checkpoint_path)
  step_dir, step, meta = _open_checkpoint(checkpoint_path, step)
  tasks = config_lib.task_names(config)
  saved = list(meta.get('num_classes', {}))
  missing = [t for t in tasks if t not in saved]
  if missing:
    raise ValueError(f'checkpoint {step_dir} has no head for task(s) {missing} of the config '
                     f'(its heads: {saved}); pass the config it was trained with')
  config = inference_config(config, dtype=dtype)
  mesh = mesh or sharding.create_mesh(config.mesh)
  model = abstract_model(config)
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  target = {'params': _with_values(nnx.to_pure_dict(params)),
            'model_state': _with_values(nnx.to_pure_dict(stats))}
  target = _sharded_abstract_state(target, mesh)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    try:
      restored = ckptr.restore(
          os.path.join(step_dir, ckpt_lib.STATE),
          args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                      partial_restore=True))
    except (ValueError, KeyError, OSError) as e:
      ckpt_lib.check_step(os.path.dirname(step_dir), step)  # damaged, rather than another model?
      raise ValueError(f'checkpoint {step_dir} does not match the config\'s model '
                       f'({config.model.backbone} {config.model.get("variant", "")}, '
                       f'image size {config.input.image_size}): {str(e)[:300]}') from None
  ckpt_lib.verify_step(restored, meta, step_dir)
  restored = _fill_absent(restored, step_dir)
  nnx.replace_by_pure_dict(params, _without_values(restored['params']))
  nnx.replace_by_pure_dict(stats, _without_values(restored['model_state']))
  model = nnx.merge(graphdef, params, stats, rest)
  model.eval()
  return _loaded(model, config, step, step_dir)


def _fill_absent(restored: Any, step_dir: str) -> Any:
  """A partial restore leaves the arrays the checkpoint lacks abstract. The necks' frozen bias
  (zeros, never trained: ``ufo_jax.models.heads``) is absent from checkpoints written before it
  existed, and zeros are exactly what those necks computed; any other absent array is a
  one-line ``ValueError`` naming it."""
  filled = []

  def fill(path, leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    name = jax.tree_util.keystr(path)
    if "['neck']['bias']" not in name:
      raise ValueError(f'checkpoint {step_dir} has no array {name} that the model needs '
                       '(written by another version or model?); pass the config it was '
                       'trained with')
    filled.append(name)
    return jax.device_put(jnp.zeros(leaf.shape, leaf.dtype), leaf.sharding)

  out = jax.tree_util.tree_map_with_path(fill, restored)
  if filled:
    logging.info('checkpoint %s has no neck bias (written before it existed): zeros, as its '
                 'necks computed', step_dir)
  return out


# --------------------------------------------------------------------------------------------
# Embedding.
# --------------------------------------------------------------------------------------------
def embedding_function(loaded: Loaded, tasks: Sequence[str] | None = None
                       ) -> tuple[Callable[[Any, jax.Array], dict[str, jax.Array]], Any]:
  """``(fn, state)``: the pure ``fn(state, images uint8 (B, S, S, 3)) -> {task: (B, D)}``.

  One backbone pass, every task's neck in eval mode, L2-normalised float32 outputs. The export
  closes ``fn`` over ``state``; ``embed`` jits it.
  """
  tasks = loaded.tasks if tasks is None else tuple(tasks)
  unknown = [t for t in tasks if t not in loaded.tasks]
  if unknown:
    raise ValueError(f'unknown task(s) {unknown}; the model has {loaded.tasks}')
  mean, std = loaded.normalization
  graphdef, state = nnx.split(loaded.model)

  def fn(state, images):
    # New Variable objects at this trace level (a closed-over state's would be of the outer one).
    m = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    view = nnx.view(m, deterministic=True, use_running_average=True, raise_if_not_found=False)
    x = device_ops.normalize(images, mean, std)
    feature = view.features(x)
    out = {}
    for task in tasks:
      e = view.heads[task](feature).astype(jnp.float32)
      norm = jnp.sqrt(jnp.sum(jnp.square(e), axis=-1, keepdims=True))
      out[task] = e / jnp.maximum(norm, NORM_EPS)
    return out

  return fn, state


def check_images(images: Any, image_size: int) -> np.ndarray:
  """``images`` as uint8 ``(B, S, S, 3)`` at the model's size, or a one-line error."""
  a = np.asarray(images)
  if a.dtype != np.uint8:
    raise ValueError(f'images must be uint8 RGB, got dtype {a.dtype}')
  if a.ndim != 4 or a.shape[1:] != (image_size, image_size, 3):
    raise ValueError(f'images must have shape (batch, {image_size}, {image_size}, 3) (the '
                     f'model\'s image size), got {a.shape}; resize with '
                     'ufo_jax.data.augment.eval_transform')
  return a


def embed(loaded: Loaded, images: Any, *, tasks: Sequence[str] | None = None
          ) -> dict[str, np.ndarray]:
  """The L2-normalised embedding of every task: ``{task: float32 (B, D)}``.

  Args:
    loaded: an inference model (``load_model``, ``load_exported``, ``create_model``).
    images: uint8 ``(B, S, S, 3)`` RGB at the model's image size.
    tasks: the tasks to compute (default: all, in output order).
  """
  images = check_images(images, loaded.image_size)
  fn, state = embedding_function(loaded, tasks)
  out = _jit_cache(fn, loaded, tasks)(state, images)
  return {t: np.asarray(v, np.float32) for t, v in out.items()}


_JITS: dict[Any, Callable] = {}


def _jit_cache(fn: Callable, loaded: Loaded, tasks) -> Callable:
  """One jitted ``fn`` per (model structure, tasks, normalisation)."""
  graphdef = nnx.graphdef(loaded.model)
  key = (graphdef, None if tasks is None else tuple(tasks), loaded.normalization)
  if key not in _JITS:
    if len(_JITS) >= 8:
      _JITS.pop(next(iter(_JITS)))
    _JITS[key] = jax.jit(fn)
  return _JITS[key]


# --------------------------------------------------------------------------------------------
# Exported folders.
# --------------------------------------------------------------------------------------------
def read_model_json(directory: str) -> dict[str, Any]:
  """The ``model.json`` of an export folder, or a one-line error."""
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: --model / load_exported needs the folder '
                            'written by `python -m ufo_jax.export`')
  with open(path, encoding='utf-8') as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  if info.get('format') != EXPORT_FORMAT:
    raise ValueError(f'{path}: not a ufo-jax export (format {info.get("format")!r})')
  return info


def config_from_model_json(info: Mapping[str, Any]) -> Any:
  """A config with what the inference model needs, rebuilt from ``model.json``."""
  import ml_collections

  model = dict(info['model_config'])
  return ml_collections.ConfigDict({
      'model': model,
      'input': {'image_size': int(info['image_size']),
                'augment': {'mean': float(info['normalization']['mean']),
                            'std': float(info['normalization']['std'])}},
      'tasks': {t: {} for t in info['config_tasks']},
      'mesh': {'data': -1, 'fsdp': 1},
  })


def _check_params_fit(ckptr: Any, params_dir: str, target: Any, model_json: str) -> None:
  """A one-line ``ValueError`` naming the first array of ``params_dir`` whose shape differs
  from what ``model_json`` describes (not orbax's advice to pass ``strict=False``, which would
  pad or truncate the weights)."""
  try:
    metadata = ckptr.metadata(params_dir)
  except Exception as e:  # noqa: BLE001 - a damaged or partial params/ folder
    raise ValueError(f'{params_dir}: cannot read its metadata ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:200]}); export again') from None
  stored = {jax.tree_util.keystr(p): tuple(getattr(leaf, 'shape', ()) or ())
            for p, leaf in jax.tree_util.tree_flatten_with_path(
                getattr(metadata, 'item_metadata', metadata))[0]}
  for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    key = jax.tree_util.keystr(p)
    if stored.get(key, tuple(leaf.shape)) != tuple(leaf.shape):
      raise ValueError(f'{params_dir} does not fit {model_json}: {key} has shape {stored[key]} '
                       f'there, {tuple(leaf.shape)} for the model model.json describes (was '
                       'model.json edited, or params/ copied from another export?); export again')


def load_exported(directory: str, *, mesh: jax.sharding.Mesh | None = None,
                  info: Mapping[str, Any] | None = None) -> Loaded:
  """The inference model of an export folder (``model.json`` + ``params/``), as ``Loaded``.

  No training config is needed; ``step`` is the training step it was exported from
  (``read_model_json`` gives the whole ``model.json``; ``info``: it, already read).
  """
  info = read_model_json(directory) if info is None else info
  config = inference_config(config_from_model_json(info))
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  mesh = mesh or sharding.create_mesh(config.mesh)
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
      nnx.to_pure_dict(state))
  params_dir = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'{params_dir} does not exist (export with --formats=orbax)')
  with ocp.StandardCheckpointer() as ckptr:
    _check_params_fit(ckptr, params_dir, target, os.path.join(directory, MODEL_JSON))
    restored = ckptr.restore(params_dir, target)
  nnx.replace_by_pure_dict(state, restored)
  model = nnx.merge(graphdef, state)
  model.eval()
  step = info.get('source', {}).get('step')
  loaded = _loaded(model, config, None if step is None else int(step),
                   os.path.abspath(directory))
  return dataclasses.replace(loaded, model_id=info.get('model_id'))


# --------------------------------------------------------------------------------------------
# UFO's released model (ufo_jax.models.ufo_release).
# --------------------------------------------------------------------------------------------
def ufo_release_config(path: str, config: Any = None, *, state: Mapping[str, Any] | None = None
                       ) -> tuple[Any, Mapping[str, Any]]:
  """``(config, state dict)`` of a UFO release: ``config`` (default: configs/ufo_l.py, else a
  minimal one) with the release's backbone (variant, depth) and input (size, 127.5 / 127.5).

  The tasks are face, person, vehicle, product (a ``config`` may name fewer).
  """
  state = ufo_release.read_state_dict(path) if state is None else state
  arch = ufo_release.architecture(state, path)
  variant, depth = ufo_release.vit_config(arch)
  if config is None:
    try:
      config = config_lib.load_config('ufo_l')
    except config_lib.ConfigError:  # an install without configs/
      config = ufo_release.release_config(arch)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.backbone, config.model.variant, config.model.depth = 'vit', variant, depth
    config.model.pretrained = os.path.abspath(path)
    config.name = f'UFO release {os.path.basename(path)} (imported)'  # the report's row
    config.input.image_size = arch.image_size
    config.input.augment.mean, config.input.augment.std = ufo_release.NORMALIZATION
  unknown = [t for t in config_lib.task_names(config) if t not in ufo_release.EVALUATION_HEADS]
  if unknown:
    raise ValueError(f'{path}: the release has heads for {list(ufo_release.EVALUATION_HEADS)}, '
                     f'not for config task(s) {unknown}')
  return config, state


def load_ufo_release(path: str, config: Any = None, *, heads: Any = None,
                     dtype: str | None = 'float32',
                     state: Mapping[str, Any] | None = None) -> Loaded:
  """The inference model of UFO's released ``allinone_vitlarge.pdmodel`` (no Paddle needed).

  The value ``load_exported`` returns; ``source`` is the release file. ``heads``: which release
  head gives each task (``ufo_release.parse_heads``; default UFO's evaluation_script.py).
  ``config``: see ``ufo_release_config``.
  """
  config, state = ufo_release_config(path, config, state=state)
  config = inference_config(config, dtype=dtype)
  model = _build(config)
  ufo_release.load_into(model, path, heads=heads, state=state)
  model.eval()
  return _loaded(model, config, None, os.path.abspath(path))
