"""Adding a task to a trained model (docs/CUSTOM_DATA.md, "Add a task to a trained model").

``--checkpoint=OTHER_RUN`` with a config that has every task of that run and more starts a new
run (step 0, a fresh optimizer and schedule) whose backbone and whose heads of the tasks the
two share are the source's; the new tasks' heads start fresh. One log line says which heads
came from where and which are new. Anything else (the same tasks, fewer, others) is a resume or
fine-tune of the source as before (``ufo_jax.train``), with its checks.

    added = warm_start.added_tasks(config, workdir, checkpoint_path)   # None: not this case
    padded = warm_start.padded_classes(source, step, added, num_classes, class_multiple)
    state = setup.init()
    state = warm_start.restore_shared(source, step, state, added)     # logs the line

The source's arrays are read with the shardings of the new state's arrays of the same path
(replicated for the rest, e.g. the optimizer state, which is not used).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ufo_jax import checkpoint as ckpt_lib
from ufo_jax import config as config_lib
from ufo_jax import pytree
from ufo_jax.models import heads as heads_lib

SHARED_COLLECTIONS = ('params', 'model_state')  # what comes from the source (not opt_state)


@dataclasses.dataclass(frozen=True)
class AddedTasks:
  """A new run on top of another run's checkpoint with more tasks."""

  shared: tuple[str, ...]  # tasks of both: their heads come from the source
  new: tuple[str, ...]  # tasks only the config has: fresh heads
  source: str  # the --checkpoint given


def added_tasks(config: Any, workdir: str, checkpoint_path: str | None) -> AddedTasks | None:
  """``AddedTasks`` when ``workdir`` has no checkpoint of its own and the run saved beside
  ``checkpoint_path`` has a strict subset of the config's tasks; None otherwise (a resume, or a
  fine-tune of the source with the same tasks, checked as such)."""
  own = epath.Path(workdir) / 'checkpoints'
  if not checkpoint_path or (own.exists() and any(p.name.isdigit() for p in own.iterdir())):
    return None  # a resume of the workdir's own run
  origin = config_lib.find_run_config(checkpoint_path)
  if not origin:
    return None
  saved = config_lib.config_from_json(epath.Path(origin).read_text(), what=origin)
  before, now = config_lib.task_names(saved), config_lib.task_names(config)
  if not set(before) < set(now):
    return None
  return AddedTasks(shared=tuple(t for t in now if t in before),
                    new=tuple(t for t in now if t not in before), source=checkpoint_path)


def padded_classes(source: Any, step: int, added: AddedTasks, num_classes: Mapping[str, int],
                   class_multiple: int) -> dict[str, int]:
  """Padded class counts: the source's for the shared heads (their class weights are copied),
  the config's rounded up to ``class_multiple`` for the new ones. ``MismatchError`` if a shared
  task's class count differs from the source's."""
  meta = ckpt_lib.restore_meta(source, step)
  where = os.path.join(os.fspath(source.directory), str(step))
  out = {}
  for task in added.shared:
    saved = int(meta['num_classes'][task])
    if saved != int(num_classes[task]):
      raise ckpt_lib.MismatchError(
          f'--checkpoint={added.source}: tasks.{task} has {saved} classes in {where}, '
          f'{num_classes[task]} for the config; a shared head keeps its classes (its datasets '
          'and num_classes must be the same)')
    out[task] = int(meta['padded_classes'][task])
  for task in added.new:
    out[task] = heads_lib.padded_num_classes(int(num_classes[task]), class_multiple)
  return out


def _shared(name: str, added: AddedTasks) -> bool:
  """Whether the state array ``collection/...`` comes from the source."""
  parts = name.split('/')
  if parts[0] not in SHARED_COLLECTIONS or len(parts) < 2:
    return False
  if parts[1] == 'heads':
    return len(parts) > 2 and parts[2] in added.shared
  return True  # the backbone (and anything else outside the heads)


def restore_shared(source: Any, step: int, state: Any, added: AddedTasks) -> Any:
  """``state`` (a freshly initialised train state) with the backbone and the shared heads'
  parameters and statistics (the floating-point arrays of ``params`` and ``model_state``) of
  checkpoint ``step`` of ``source``; rng keys and counters stay fresh. Logs one line."""
  where = os.path.join(os.fspath(source.directory), str(step))
  metadata = source.item_metadata(step)[ckpt_lib.STATE]
  metadata = getattr(metadata, 'tree', metadata)
  fresh = {pytree.path_name(p): leaf
           for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  mesh = jax.tree_util.tree_leaves(state['params'])[0].sharding.mesh
  replicated = NamedSharding(mesh, P())

  def target(path, meta):
    name, shape = pytree.path_name(path), tuple(meta.shape)
    like = fresh.get(name)
    sharding = like.sharding if like is not None and tuple(like.shape) == shape else replicated
    return jax.ShapeDtypeStruct(shape, meta.dtype, sharding=sharding)

  abstract = jax.tree_util.tree_map_with_path(target, metadata)
  restored = ckpt_lib.restore(source, abstract, step=step)
  saved = {pytree.path_name(p): leaf
           for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
  copied = 0

  def take(path, leaf):
    nonlocal copied
    name = pytree.path_name(path)
    if not _shared(name, added) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf  # new heads, and the rng keys and counters, start fresh
    if name not in saved:
      raise ckpt_lib.MismatchError(f'--checkpoint={added.source}: {where} has no {name}; was '
                                   'it trained with another model.backbone or variant?')
    value = saved[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ckpt_lib.MismatchError(
          f'--checkpoint={added.source}: {name} has shape {tuple(value.shape)} in {where}, '
          f'{tuple(leaf.shape)} for the config (model.variant, model.depth and '
          'model.scan_layers must be the same)')
    copied += 1
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

  out = dict(state)
  for key in SHARED_COLLECTIONS:
    out[key] = jax.tree_util.tree_map_with_path(
        lambda path, leaf, key=key: take((jax.tree_util.DictKey(key),) + path, leaf), state[key])
  logging.info('adding task(s) %s to %s (step %d): backbone and heads %s from there, heads %s '
               'new (%d arrays copied); training starts at step 0',
               ', '.join(added.new), where, step, ', '.join(added.shared) or '-',
               ', '.join(added.new), copied)
  return out
