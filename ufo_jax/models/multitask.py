"""The multi-task model: one shared backbone and one head per task.

See docs/TRAINING.md, "The model and the step".

A batch mixes the tasks: every example carries ``task`` (its index in config order). The model
runs ONE backbone forward pass over the whole batch; every head then sees the whole batch with
the mask ``task == its index``, so its BatchNorm neck takes its statistics from that task's
examples of the whole global batch, and its losses are masked means. The same compiled step
serves heterogeneous batches (all tasks in every step) and homogeneous ones (one task per step).

    model = create_model(config, {'face': 93431, ...}, rngs=nnx.Rngs(params=0, dropout=1))
    outputs = model(images, task)      # {task: {'feature', 'embedding', 'mask'}}
    emb = model.embed(images, 'person')  # eval-mode neck output: the test-time embedding

Images given to the model are normalised float images (``ufo_jax.data.device_ops.preprocess``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ufo_jax import pytree
from ufo_jax.config import task_names
from ufo_jax.models import ufo_release, vit
from ufo_jax.models.heads import TaskHead, padded_num_classes
from ufo_jax.models.resnet import create_resnet

Array = jax.Array


# Where a neck's BatchNorm takes its training statistics: 'task' (the recipe) or 'batch' (a
# benchmark sabotage, ``config.model.sabotage_neck_statistics``; docs/PERFORMANCE.md).
NECK_STATISTICS = ('task', 'batch')


class MultiTaskModel(nnx.Module):
  """A backbone ``(B, H, W, 3) -> (B, D)`` shared by one ``TaskHead`` per task.

  Attributes:
    backbone: the feature extractor (``.width`` = D).
    heads: ``nnx.Dict`` task name -> ``TaskHead``, in task order.
    tasks: the task names; ``tasks[i]`` is the task whose examples carry ``task == i``.
  """

  def __init__(self, backbone: nnx.Module, num_classes: Mapping[str, int], *,
               rngs: nnx.Rngs, tasks: tuple[str, ...] | None = None, class_multiple: int = 1,
               padded_classes: Mapping[str, int] | None = None, neck_statistics: str = 'task'):
    """Builds the heads on top of ``backbone``.

    Args:
      backbone: an NNX module with ``.width`` mapping images to (B, width) float32 features.
      num_classes: classes per task.
      rngs: ``nnx.Rngs`` with a 'params' stream (class weight init).
      tasks: the task order (default: the order of ``num_classes``).
      class_multiple: pad every head's class count up to a multiple of this (the number of
        devices the class weights are split over); padded classes never enter the loss.
      padded_classes: explicit padded class count per task (e.g. a checkpoint's), overriding
        ``class_multiple``.
      neck_statistics: 'task' (the recipe): each neck's BatchNorm statistics come from its own
        task's rows. 'batch' is a BENCHMARK SABOTAGE (bench/learning.py): statistics over the
        whole mixed batch, a recipe bug the learning benchmark must catch.
    """
    if neck_statistics not in NECK_STATISTICS:
      raise ValueError(f'config.model.sabotage_neck_statistics: expected one of '
                       f'{NECK_STATISTICS}, got {neck_statistics!r}')
    self.neck_statistics = neck_statistics
    self.tasks = tuple(num_classes) if tasks is None else tuple(tasks)
    missing = [t for t in self.tasks if t not in num_classes]
    if missing:
      raise ValueError(f'MultiTaskModel: no num_classes for task(s) {missing}')
    self.backbone = backbone
    self.feature_dim = int(backbone.width)
    padded = {t: padded_num_classes(int(num_classes[t]), class_multiple) for t in self.tasks}
    padded.update(padded_classes or {})
    self.heads = nnx.Dict({
        t: TaskHead(self.feature_dim, int(num_classes[t]), rngs=rngs,
                    padded_classes=int(padded[t]))
        for t in self.tasks})

  def features(self, images: Array) -> Array:
    """The backbone feature (B, D) in float32 of normalised float images."""
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'the model takes normalised float images, got dtype {images.dtype}; '
                       'apply ufo_jax.data.device_ops.preprocess to uint8 images first')
    return self.backbone(images).astype(jnp.float32)

  def __call__(self, images: Array, task: Array) -> dict[str, dict[str, Array]]:
    """One backbone pass, every head on the whole batch.

    Args:
      images: (B, H, W, 3) normalised float images.
      task: (B,) int task index of every example (position in ``self.tasks``).

    Returns:
      ``{task_name: {'feature': (B, D) backbone feature (the triplet input), 'embedding': (B, D)
      neck output (the CosFace input), 'mask': (B,) bool, the examples of this task}}``.
    """
    if task.shape != images.shape[:1]:
      raise ValueError(f'task must have shape ({images.shape[0]},), got {task.shape}')
    feature = self.features(images)
    outputs = {}
    for index, name in enumerate(self.tasks):
      mask = task == index
      neck_rows = mask if self.neck_statistics == 'task' else None  # None: the whole batch
      outputs[name] = {'feature': feature, 'embedding': self.heads[name](feature, neck_rows),
                       'mask': mask}
    return outputs

  def embed(self, images: Array, task_name: str) -> Array:
    """The test-time embedding (B, D) of ``task_name``: the neck output in eval mode.

    Uses the running BatchNorm statistics and no drop path, whatever mode the model is in
    (through ``nnx.view``; the model itself is not changed).
    """
    if task_name not in self.tasks:
      raise ValueError(f'unknown task {task_name!r}; the model has heads {self.tasks}')
    view = nnx.view(self, deterministic=True, use_running_average=True,
                    raise_if_not_found=False)
    return view.heads[task_name](view.features(images))


def create_backbone(config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
  """The backbone of ``config.model`` (ViT or ResNet) for ``config.input.image_size``.

  ``config.model.depth`` (optional, 0 = the variant's) overrides the ViT depth, for tests.
  """
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.backbone == 'vit':
    cfg = vit.VARIANTS.get(m.variant)
    if cfg is None:
      raise ValueError(f'config.model.variant: unknown ViT variant {m.variant!r}; expected one '
                       f'of {list(vit.VARIANTS)}')
    depth = int(m.get('depth', 0) or 0)
    if depth:
      cfg = dataclasses.replace(cfg, depth=depth)
    return vit.VisionTransformer(
        cfg, image_size=int(config.input.image_size), drop_path_rate=float(m.drop_path_rate),
        rngs=rngs, dtype=dtype, scan_layers=bool(m.scan_layers), remat_policy=m.remat_policy,
        attention_impl=m.attention_impl)
  if m.backbone == 'resnet':
    return create_resnet(int(m.variant), rngs=rngs, dtype=dtype)
  raise ValueError(f"config.model.backbone: expected 'vit' or 'resnet', got {m.backbone!r}")


def create_model(config: Any, num_classes: Mapping[str, int], *, rngs: nnx.Rngs,
                 class_multiple: int = 1, padded_classes: Mapping[str, int] | None = None,
                 load_pretrained: bool = True) -> MultiTaskModel:
  """The multi-task model of ``config`` (backbone of ``config.model``, heads of ``config.tasks``).

  Args:
    config: the experiment config.
    num_classes: classes per task (every task of ``config.tasks``).
    rngs: ``nnx.Rngs(params=..., dropout=...)``; 'dropout' drives drop path.
    class_multiple: pad each head's classes to a multiple of this (see ``MultiTaskModel``).
    padded_classes: explicit padded class counts per task (see ``MultiTaskModel``).
    load_pretrained: load ``config.model.pretrained`` (if set) into the backbone. The sharded
      initialisation in ``ufo_jax.train`` passes False (no file reads inside ``jax.jit``) and
      loads the weights afterwards.
  """
  tasks = task_names(config)
  missing = [t for t in tasks if t not in num_classes]
  if missing:
    raise ValueError(f'create_model: no class count for task(s) {missing}')
  neck_statistics = config.model.get('sabotage_neck_statistics', 'task')
  if neck_statistics not in NECK_STATISTICS:  # checked before building anything
    raise ValueError(f'config.model.sabotage_neck_statistics: expected one of '
                     f'{NECK_STATISTICS}, got {neck_statistics!r}')
  backbone = create_backbone(config, rngs=rngs)
  model = MultiTaskModel(backbone, {t: int(num_classes[t]) for t in tasks}, rngs=rngs,
                         tasks=tasks, class_multiple=class_multiple,
                         padded_classes=padded_classes,
                         neck_statistics=neck_statistics)
  pretrained = config.model.get('pretrained', '')
  if load_pretrained and pretrained and pretrained != 'none':  # 'none': from scratch
    load_backbone_weights(model, pretrained)
  return model


def load_backbone_weights(model: MultiTaskModel, path: str) -> dict[str, Any]:
  """Loads pretrained ViT weights (``config.model.pretrained``) into ``model.backbone``.

  An export folder (``python -m ufo_jax.export``: ``model.json`` + ``params/``) loads the backbone
  and the necks of the tasks both have (``load_export_folder``). A UFO release (``.pdmodel`` /
  ``.pdparams``, ``ufo_jax.models.ufo_release``) also loads the necks of the tasks it has
  (face, person, vehicle, product in its training order); the class
  weights and any other task's neck start as usual. Returns the loader's summary
  (``ufo_jax.models.pretrained.load_vit_weights`` / ``ufo_release.load_into``).
  """
  if not isinstance(model.backbone, vit.VisionTransformer):
    raise ValueError(f'config.model.pretrained={path!r}: pretrained weights are supported for '
                     'the ViT backbone only')
  if str(path).lower().endswith(ufo_release.SUFFIXES):
    return ufo_release.load_into(model, path, heads='training')
  if is_export_folder(path):
    return load_export_folder(model, path)
  from ufo_jax.models.pretrained import load_vit_weights  # reads safetensors / npz on use

  return load_vit_weights(model.backbone, path)


EXPORT_MODEL_JSON, EXPORT_PARAMS = 'model.json', 'params'  # as ufo_jax.inference writes them


def is_export_folder(path: str) -> bool:
  """Whether ``path`` is an export folder of ``python -m ufo_jax.export`` (its model.json)."""
  return os.path.isfile(os.path.join(os.fspath(path), EXPORT_MODEL_JSON))


def load_export_folder(model: MultiTaskModel, folder: str) -> dict[str, Any]:
  """Loads an export folder's ``params/`` (the backbone and the necks of its tasks: no class
  weights) into ``model``: the backbone, and the neck of every task both have; the other tasks'
  heads and every class weight stay as initialised (docs/CUSTOM_DATA.md, "Add a task to a
  trained model"). A shape that differs is one ``ValueError`` naming the array and both shapes.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  params_dir = os.path.join(os.path.abspath(os.fspath(folder)), EXPORT_PARAMS)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'{params_dir} does not exist: the export was written without '
                            'orbax params (export again with --formats=orbax,...)')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(params_dir)
    meta = getattr(meta, 'item_metadata', meta)
    meta = getattr(meta, 'tree', meta)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            meta)
    saved_tree = ckptr.restore(params_dir, abstract)
  saved = {pytree.path_name(p): leaf
           for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  state = nnx.state(model)
  target = nnx.to_pure_dict(state)
  loaded, heads = [], set()

  def take(path, leaf):
    name = pytree.path_name(path)
    if name not in saved or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf  # rng keys and counters start fresh
    value = saved[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f'{folder}: {name} has shape {tuple(value.shape)} in the export, '
                       f'{tuple(leaf.shape)} for the config (model.variant, model.depth, '
                       'model.scan_layers and the image size must be the same)')
    loaded.append(name)
    if name.startswith('heads/'):
      heads.add(name.split('/')[1])
    return jnp.asarray(value, dtype=leaf.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(take, target))
  nnx.update(model, state)
  ignored = sorted(n for n, v in saved.items()
                   if n not in loaded and jnp.issubdtype(v.dtype, jnp.floating))
  return {'format': 'export folder', 'loaded': loaded, 'ignored': ignored,
          'heads': ', '.join(sorted(heads)) or '-', 'pos_embed_resized': False}
