"""Checkpoints with an orbax ``CheckpointManager``: train state, data iterator and head sizes.

One checkpoint (``<workdir>/checkpoints/<step>/``) holds three items:

- ``state``: the whole train state pytree (step, parameters, optimizer state, BatchNorm
  statistics, rng state), written by every process for its own shards (``StandardSave``);
- ``data``: the grain iterator state of every process (``grain.checkpoint.CheckpointSave``; one
  ``process_<i>-of-<n>.json`` file per process), so a resumed run reads exactly the batches the
  interrupted one would have read;
- ``meta``: JSON ``{'num_classes': {task: C}, 'padded_classes': {task: C_pad}}``, so a model can
  be rebuilt from the checkpoint alone (evaluation, export, restoring onto another mesh).

Saving is asynchronous: ``save`` returns once the arrays are copied off the devices and the
iterator state is written; the files are committed in the background (``wait`` blocks on it).
Retention: the last ``keep_checkpoints`` plus every checkpoint whose step is a multiple of
``keep_every`` (orbax preservation policies ``LatestN`` and ``EveryNSteps``).

Restoring takes an abstract target state (``jax.ShapeDtypeStruct`` leaves carrying the target
``NamedSharding``): each process reads only its shards, and a checkpoint written on one mesh
restores onto another (8 devices -> 4) as long as every sharded dimension divides.

The training loop's checkpoint policy lives here too: ``open_source`` (resume from the workdir,
else start from ``--checkpoint``), ``check_meta`` (its tasks and class counts against the
config), ``restore_checked`` (shapes, then the state and iterator) and ``maybe_save`` (the state
checked finite, saved, and on a stop waited for until committed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ufo_jax import pytree

STATE, DATA, META = 'state', 'data', 'meta'


def create_manager(directory: str, *, keep_checkpoints: int = 3, keep_every: int = 0,
                   async_checkpointing: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` in ``directory`` with the retention of ``config.train``.

  Args:
    directory: where the step folders live (created if missing, unless ``read_only``).
    keep_checkpoints: keep the latest N checkpoints (0: keep all).
    keep_every: also keep forever every checkpoint whose step is a multiple of this (0: none).
    async_checkpointing: write in the background.
    read_only: open existing checkpoints without creating or deleting anything.
  """
  policies: list[pp.PreservationPolicy] = [pp.LatestN(keep_checkpoints or None)]
  if keep_every:
    policies.append(pp.EveryNSteps(keep_every))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=pp.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_checkpointing, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=(STATE, DATA, META),
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     DATA: grain.checkpoint.CheckpointHandler(),
                     META: ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, data_iterator: Any = None,
         meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
  """Starts saving ``state`` (and the iterator state and ``meta``) as checkpoint ``step``.

  Returns whether a checkpoint was started (False when ``step`` already exists).
  """
  if step in manager.all_steps():
    return False
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  if meta is not None:
    items[META] = ocp.args.JsonSave(dict(meta))
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None,
            data_iterator: Any = None) -> Any:
  """Restores checkpoint ``step`` (default: the latest) onto ``abstract_state``'s shardings.

  Args:
    manager: the checkpoint manager.
    abstract_state: the target pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
    step: the step to restore; None for the latest.
    data_iterator: a grain iterator whose state is set to the saved one (in place).

  Returns:
    The restored state (arrays laid out as ``abstract_state`` says).
  """
  step = resolve_step(manager, step)
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE]


class MismatchError(ValueError):
  """A checkpoint that does not fit the config (one line naming what differs)."""


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite values (``train.on_nonfinite``, or a train state that is not
  finite when it is due to be saved); one line for the user."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata; typed
  PRNG keys count as their key data (as orbax stores them)."""
  import jax

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(getattr(leaf, 'shape', ()) or ())
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      shape = tuple(jax.eval_shape(jax.random.key_data,
                                   jax.ShapeDtypeStruct(shape, dtype)).shape)
    out[pytree.path_name(path)] = shape
  return out


def check_fits(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises ``MismatchError`` naming the first array whose path or shape differs between
  checkpoint ``step`` and ``abstract_state`` (instead of a library traceback at restore)."""
  where = os.path.join(os.fspath(manager.directory), str(step))
  try:
    metadata = manager.item_metadata(step)[STATE]
  except Exception as e:  # pylint: disable=broad-except
    raise MismatchError(f'checkpoint {where}: cannot read its state metadata '
                        f'({type(e).__name__}: {e})') from None
  if metadata is None:
    return
  saved = _shapes(getattr(metadata, 'tree', metadata))
  wanted = _shapes(abstract_state)
  missing = [p for p in wanted if p not in saved]
  extra = [p for p in saved if p not in wanted]
  if missing or extra:
    what = (f'the config has {missing[0]}, the checkpoint does not' if missing else
            f'the checkpoint has {extra[0]}, the config does not')
    raise MismatchError(
        f'checkpoint {where} does not fit the config: {what} ({len(missing)} arrays missing, '
        f'{len(extra)} extra); was it trained with another model.backbone, model.variant, '
        'model.scan_layers or optim settings?')
  for path, shape in wanted.items():
    if saved[path] != shape:
      raise MismatchError(
          f'checkpoint {where} does not fit the config: {path} has shape {saved[path]} in '
          f'the checkpoint, {shape} for the config (model.variant, model.depth, '
          'input.image_size or the class counts differ)')


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
  """The ``meta`` item of checkpoint ``step`` (default: the latest)."""
  step = resolve_step(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  return dict(restored[META])


def resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """``step`` if ``manager`` holds it, else the latest step for None; else FileNotFoundError
  (one line naming the folder and the steps found)."""
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  elif step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint for step {step} in {manager.directory} '
                            f'(found steps {list(manager.all_steps())})')
  return step


def locate(path: str) -> tuple[str, int | None]:
  """Splits a ``--checkpoint`` path into (manager directory, step or None for the latest).

  Accepts a manager directory (``<workdir>/checkpoints``), a workdir containing
  ``checkpoints/``, or one step folder (``<workdir>/checkpoints/2000``).
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint path {path} does not exist')
  if p.name.isdigit() and (p / STATE).exists():
    return os.fspath(p.parent), int(p.name)
  if (p / 'checkpoints').is_dir():
    return os.fspath(p / 'checkpoints'), None
  return os.fspath(p), None


# --------------------------------------------------------------------------------------------
# The training loop's policy: where to start from, and when a save is allowed.
# --------------------------------------------------------------------------------------------
def open_source(manager: ocp.CheckpointManager, checkpoint_path: str | None
                ) -> tuple[ocp.CheckpointManager, int | None]:
  """Where a run starts: the latest step of its own ``manager``, else (a new workdir) the
  checkpoint ``checkpoint_path`` names (``--checkpoint``: a workdir, its ``checkpoints/`` or one
  step folder, opened read-only), else nothing (``(manager, None)``: a fresh start)."""
  step = manager.latest_step()
  if step is not None or not checkpoint_path:
    return manager, step
  directory, step = locate(checkpoint_path)
  source = create_manager(directory, read_only=True)
  step = step if step is not None else source.latest_step()
  if step is None:
    source.close()
    raise FileNotFoundError(f'--checkpoint={checkpoint_path}: no checkpoint in {directory}')
  return source, step


def check_meta(manager: ocp.CheckpointManager, step: int,
               num_classes: Mapping[str, int]) -> dict[str, Any]:
  """The ``meta`` of checkpoint ``step``; ``MismatchError`` (one line) if its tasks or class
  counts differ from ``num_classes`` (the config's)."""
  meta = restore_meta(manager, step)
  where = os.path.join(os.fspath(manager.directory), str(step))
  saved = dict(meta.get('num_classes', {}))
  if set(saved) != set(num_classes):
    raise MismatchError(
        f'checkpoint {where} does not fit the config: it has the tasks {sorted(saved)}, the '
        f'config {sorted(num_classes)}')
  for task, n in num_classes.items():
    if int(saved[task]) != int(n):
      raise MismatchError(
          f'checkpoint {where} does not fit the config: tasks.{task} has {saved[task]} classes '
          f'in the checkpoint, {n} for the config (tasks.{task}.num_classes, its datasets or '
          'input.synthetic_num_classes differ)')
  return meta


def restore_checked(manager: ocp.CheckpointManager, step: int, abstract_state: Any, *,
                    data_iterator: Any = None) -> Any:
  """``check_fits``, then ``restore``: a checkpoint that does not fit is one line, not an orbax
  traceback."""
  check_fits(manager, step, abstract_state)
  return restore(manager, abstract_state, step=step, data_iterator=data_iterator)


def maybe_save(manager: ocp.CheckpointManager, step: int, state: Any, *,
               state_finite: Callable[[Any], Any], last_saved: int | None,
               data_iterator: Any = None, meta: Mapping[str, Any] | None = None,
               stopping: bool = False) -> int | None:
  """Saves ``state`` as checkpoint ``step`` if it is finite; returns the last saved step.

  Raises ``NonFiniteError`` (naming ``last_saved``, which is kept) instead of saving a state with
  non-finite values. On a stop (a signal or a preemption) it waits until the checkpoint is
  committed, so the process can exit.
  """
  import jax

  if not bool(jax.device_get(state_finite(state))):
    raise NonFiniteError(f'step {step}: the train state holds non-finite values; not saved '
                         f'(the last checkpoint, step {last_saved}, is kept)')
  if save(manager, step, state, data_iterator=data_iterator, meta=meta, force=True):
    last_saved = step
  if stopping:
    manager.wait_until_finished()
  return last_saved
