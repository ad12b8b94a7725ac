"""Checkpoints with an orbax ``CheckpointManager``: train state, data iterator and head sizes.

One checkpoint (``<workdir>/checkpoints/<step>/``) holds three items:

- ``state``: the whole train state pytree (step, parameters, optimizer state, BatchNorm
  statistics, rng state), written by every process for its own shards (``StandardSave``);
- ``data``: the grain iterator state of every process (``grain.checkpoint.CheckpointSave``; one
  ``process_<i>-of-<n>.json`` file per process), so a resumed run reads exactly the batches the
  interrupted one would have read;
- ``meta``: JSON ``{'num_classes': {task: C}, 'padded_classes': {task: C_pad}, 'checksums':
  {array path: hex}, 'devices': N, 'processes': P}``, so a model can be rebuilt from the
  checkpoint alone (evaluation, export, restoring onto another mesh) and checked.

Integrity: ``save`` records a checksum of every array of the state (``checksums``: two 32-bit
position-weighted sums of the array's bits, computed on the devices where the array lives, one
pass; a flipped bit always changes the first) and ``restore`` recomputes them on what it read. A
mismatch, a missing or truncated file or missing metadata raises ``DamagedError``: one line
naming the step and what is wrong (``damaged_message`` adds the steps that are intact).

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
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
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
  items[META] = ocp.args.JsonSave({**dict(meta or {}), 'checksums': checksums(state)})
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
    The restored state (arrays laid out as ``abstract_state`` says), its checksums verified.

  Raises:
    DamagedError: a file of the step is missing, truncated or does not read, or an array's
      checksum differs from the one recorded when it was saved.
  """
  step = resolve_step(manager, step)
  where = step_dir(manager, step)
  expected = _read(lambda: restore_meta(manager, step), where, 'its meta').get('checksums', {})
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = _read(lambda: manager.restore(step, args=ocp.args.Composite(**items)), where,
                   'its state')
  verify(restored[STATE], expected, where)
  return restored[STATE]


class MismatchError(ValueError):
  """A checkpoint that does not fit the config (one line naming what differs)."""


class DamagedError(ValueError):
  """A checkpoint step that is damaged or incomplete (one line naming the step and what; a
  ``ValueError``, as the command-line tools report bad input in one line)."""


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite values (``train.on_nonfinite``, or a train state that is not
  finite when it is due to be saved); one line for the user."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata; typed
  PRNG keys count as their key data (as orbax stores them)."""
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
  where = step_dir(manager, step)
  metadata = _read(lambda: manager.item_metadata(step)[STATE], where, 'its state metadata')
  if metadata is None:
    raise DamagedError(f'checkpoint {where} is damaged: its state metadata (_METADATA) is '
                       'missing')
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
  """The ``meta`` item of checkpoint ``step`` (default: the latest); ``DamagedError`` if it does
  not read."""
  step = resolve_step(manager, step)
  restored = _read(lambda: manager.restore(
      step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})),
      step_dir(manager, step), 'its meta')
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
  if not bool(_to_host(state_finite(state))):
    raise NonFiniteError(f'step {step}: the train state holds non-finite values; not saved '
                         f'(the last checkpoint, step {last_saved}, is kept)')
  try:
    check_saves(manager)
    if save(manager, step, state, data_iterator=data_iterator, meta=meta, force=True):
      last_saved = step
    if stopping:
      manager.wait_until_finished()
  except SaveError:
    raise
  except Exception as e:  # noqa: BLE001 -- a full disk, a permission, a network filesystem
    raise SaveError(_save_failed(manager, step, e)) from None
  return last_saved


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last checkpoint to commit (``SaveError`` if it failed) and closes."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise SaveError(_save_failed(manager, None, e)) from None
  finally:
    manager.close()


def quiet_save_threads() -> Callable[[], None]:
  """Keeps the tracebacks of orbax's background save threads off the console (their error is
  reported once, as ``SaveError``, by ``check_saves`` / ``finish``); returns the undo."""
  previous = threading.excepthook

  def hook(args: Any) -> None:
    frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
    if any('/orbax/' in f.filename for f in frames):
      logging.debug('background save thread %s: %s', args.thread, args.exc_value)
      return
    previous(args)

  threading.excepthook = hook
  return lambda: setattr(threading, 'excepthook', previous)


class SaveError(RuntimeError):
  """A checkpoint could not be written (one line: the path, the error and the free space)."""


def check_saves(manager: ocp.CheckpointManager) -> None:
  """``SaveError`` if the background commit of an earlier save failed. Called at every step of
  the loop, it costs nothing while a commit runs and, once it ended, returns at once or raises
  its error: training goes on past a failed save only until its commit ends."""
  try:
    manager.check_for_errors()
    if not manager.is_saving_in_progress():
      manager.wait_until_finished()  # done: returns at once, or raises the commit's error
  except Exception as e:  # noqa: BLE001
    raise SaveError(_save_failed(manager, None, e)) from None


def _remove_partial(directory: str) -> list[str]:
  """Removes orbax's temporary step folders (``*.orbax-checkpoint-tmp*``) of failed saves. Writes
  of the failed save that were still in flight may recreate them for a moment: it removes them
  until none came back for half a second (at most ~5 s)."""
  removed: list[str] = []
  quiet = 0
  for _ in range(50):
    found = [n for n in (os.listdir(directory) if os.path.isdir(directory) else ())
             if '.orbax-checkpoint-tmp' in n]
    for name in found:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    removed += [n for n in found if n not in removed]
    quiet = 0 if found else quiet + 1
    if quiet >= 5:
      break
    time.sleep(0.1)
  return removed


def _save_failed(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> str:
  """The one line of a failed save; removes the temporary folders orbax left (once its writes in
  flight have ended)."""
  directory = os.fspath(manager.directory)
  try:
    manager.wait_until_finished()
  except Exception:  # noqa: BLE001 -- the same failure again
    pass
  removed = _remove_partial(directory)
  try:
    free = f'{shutil.disk_usage(directory).free / 2 ** 30:.2f} GiB free there'
  except OSError:
    free = 'free space unknown'
  what = f'step {step}' if step is not None else 'a checkpoint'
  try:  # the steps on disk now: the manager's cached list still has the step that failed when
    manager.reload()  # the failure surfaced later (step None, an asynchronous write)
  except Exception:  # noqa: BLE001 -- then the cached list, less the failed step
    pass
  kept = ', '.join(str(s) for s in sorted(manager.all_steps()) if s != step) or 'none'
  partial = f'removed the partial {", ".join(removed)}; ' if removed else ''
  return (f'saving {what} to {directory} failed ({_cause(error)}); {free}; '
          f'{partial}training stopped; the earlier checkpoints ({kept}) are intact: free space '
          'and run the same command again')


# --------------------------------------------------------------------------------------------
# Integrity: checksums per array, damaged steps.
# --------------------------------------------------------------------------------------------
def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  """The folder of checkpoint ``step``."""
  return os.path.join(os.fspath(manager.directory), str(step))


def _read(fn: Callable[[], Any], where: str, what: str) -> Any:
  """``fn()``; any failure to read is a ``DamagedError`` naming the step and ``what``."""
  try:
    return fn()
  except (DamagedError, MismatchError):
    raise
  except Exception as e:  # noqa: BLE001 -- orbax / tensorstore / zstd errors of a bad file
    raise DamagedError(f'checkpoint {where} is damaged: {what} does not read '
                       f'({_cause(e)})') from None


def _cause(error: BaseException) -> str:
  """``Type: first line`` of the innermost cause of ``error`` (tensorstore's own words)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip()
  text = text.split(' See full TensorStore details')[0]
  return f'{type(error).__name__}: {(text.splitlines() or [""])[0][:300]}'


def _words(x: Any) -> Any:
  """The bits of array ``x`` as uint32 words (keys as their key data; 8-byte types as 2 words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_checksum(x: Any) -> Any:
  """Two uint32 sums over the array's words ``w_i``: ``sum w_i (2 i + 1)`` (odd weights: any
  single flipped bit changes it) and ``sum (w_i ^ (i * 2654435761))``; the position ``i`` is the
  row-major index, built per dimension so that a sharded array is summed where it lives."""
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis, n in enumerate(words.shape):
    index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  first = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  second = jnp.sum(words ^ (index * jnp.uint32(2654435761)), dtype=jnp.uint32)
  return jnp.stack([first, second])


def _key(path: Any) -> str:
  names = list(pytree.path_to_strings(path))
  while names and names[-1] in ('value', 'raw_value'):
    names.pop()
  return '/'.join(names)


def checksums(tree: Any) -> dict[str, str]:
  """``{array path: '16 hex digits:dtype'}`` of every array of ``tree`` (one jitted pass on the
  devices that hold the arrays; one small transfer)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  is_array = lambda leaf: isinstance(leaf, (jax.Array, np.ndarray, np.generic))
  arrays = [leaf for _, leaf in leaves if is_array(leaf)]  # not abstract (absent) leaves
  if not arrays:
    return {}
  sums = _to_host(_checksum_fn(arrays)).astype(np.uint64)
  keys = [_key(path) for path, leaf in leaves if is_array(leaf)]
  return {k: f'{int(a):08x}{int(b):08x}:{_dtype_name(x)}'
          for k, (a, b), x in zip(keys, sums, arrays)}


def _dtype_name(x: Any) -> str:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return 'key'
  return np.dtype(x.dtype).name


@jax.jit
def _checksum_fn(arrays: list[Any]) -> Any:
  return jnp.stack([_array_checksum(x) for x in arrays])


def _to_host(x: Any) -> np.ndarray:
  """A small result on the host, also where its array spans several processes."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_shards[0].data)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def verify(tree: Any, expected: Mapping[str, str], where: str) -> None:
  """``DamagedError`` naming the first array of ``tree`` whose checksum differs from
  ``expected``. Arrays without a recorded checksum (an older checkpoint) or read in another
  dtype than saved (a partial restore that casts) are not compared."""
  if not expected:
    return
  got = checksums(tree)
  same_dtype = lambda k: expected[k].rpartition(':')[2] == got[k].rpartition(':')[2]
  bad = [k for k in got if k in expected and same_dtype(k) and expected[k] != got[k]]
  if bad:
    raise DamagedError(
        f'checkpoint {where} is damaged: {bad[0]} does not match the checksum recorded when it '
        f'was saved ({len(bad)} of {len(got)} arrays differ)')


def intact_steps(directory: str, exclude: int | None = None) -> list[int]:
  """The steps in ``directory`` (newest first, ``exclude`` left out) whose state reads and
  matches its checksums (each one read in full: for error messages, not the hot path)."""
  manager = create_manager(directory, read_only=True)
  try:
    good = []
    for step in sorted(manager.all_steps(), reverse=True):
      if step == exclude:
        continue
      try:
        _read_in_full(manager, step)
      except DamagedError:
        continue
      good.append(step)
    return good
  finally:
    manager.close()


def _read_in_full(manager: ocp.CheckpointManager, step: int) -> None:
  """Reads the whole state of ``step`` (onto the default device) and verifies its checksums."""
  where = step_dir(manager, step)
  expected = restore_meta(manager, step).get('checksums', {})
  with ocp.StandardCheckpointer() as ckptr:
    state = _read(lambda: ckptr.restore(os.path.join(where, STATE)), where, 'its state')
  verify(state, expected, where)


def damaged_message(error: DamagedError, directory: str, step: int) -> str:
  """``error``'s line, with the steps of ``directory`` that are intact (to pass instead)."""
  good = intact_steps(directory, exclude=step)
  if not good:
    return f'{error}; no other step in {directory} is intact'
  return (f'{error}; intact steps: {", ".join(map(str, good))} (e.g. '
          f'--checkpoint={os.path.join(directory, str(good[0]))})')


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames the damaged step folder to ``<step>.damaged`` (kept for inspection; orbax does not
  take it for a step); returns the new path. Process 0 renames, every process waits for it."""
  source = step_dir(manager, step)
  target = f'{source}.damaged'
  if jax.process_index() == 0:
    n = 1
    while os.path.exists(target):
      target, n = f'{source}.damaged{n}', n + 1
    shutil.move(source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'set_aside_{step}')
  return target


def check_step(directory: str, step: int) -> None:
  """``DamagedError`` (with the intact steps) if checkpoint ``step`` of ``directory`` does not
  read in full or does not match its checksums; for tools that restore part of a step
  (``inference.load_model``) and must tell a damaged step from one that does not fit."""
  manager = create_manager(directory, read_only=True)
  try:
    _read_in_full(manager, step)
  except DamagedError as e:
    raise DamagedError(damaged_message(e, directory, step)) from None
  finally:
    manager.close()


def verify_step(tree: Any, meta: Mapping[str, Any], where: str) -> None:
  """``verify`` of a part of checkpoint ``where`` (a step folder) against its ``meta``; the
  ``DamagedError`` names the intact steps."""
  try:
    verify(tree, meta.get('checksums', {}), where)
  except DamagedError as e:
    directory, step = os.path.split(os.path.normpath(where))
    raise DamagedError(damaged_message(e, directory, int(step))) from None
