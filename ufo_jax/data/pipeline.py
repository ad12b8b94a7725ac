"""The training input: a resumable grain ``IterDataset`` of mixed batches.

  data = ufo_jax.data.open_training_data(config, data_dir)  # provenance checked once
  data.num_classes               # {task: identities of its label space}
  ds = ufo_jax.data.build_train_dataset(config, data.sources)
  # or, in one call: ufo_jax.data.create_train_dataset(config, data_dir)
  it = iter(ds)                  # a grain DatasetIterator
  batch = next(it)               # {'image': (B, S, S, 3) uint8, 'label': (B,) int32,
                                 #  'task': (B,) int32}, B = this process's share
  it.get_state()                 # {'step': n}: the number of batches consumed

Under the hood: ``grain.MapDataset.range(step, ...).map(BatchMaker)`` (one
element = one whole local batch, a pure function of the step), turned into an
``IterDataset`` and prefetched by ``config.input.worker_count`` grain worker
processes (``mp_prefetch``; worker ``w`` builds steps ``w, w + W, ...`` and
grain interleaves them back in order, so the batches do not depend on the
number of workers). The iterator's state is the next step number: restoring it
rebuilds the pipeline from that step, with any worker count. It saves into an
orbax checkpoint with ``grain.checkpoint.CheckpointSave(iterator)`` /
``CheckpointRestore(iterator)`` (see docs/INPUT.md).
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Callable, Mapping, NamedTuple

import grain
from absl import flags

from ufo_jax import config as config_lib
from ufo_jax.data import augment, mixing, provenance, sampling, workers
from ufo_jax.data.sources import TaskSource, open_task_sources

_END = 2**62  # "infinite" number of steps


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  return int(process_index), int(process_count)


def _unlink_in_flight(prefix: str, first_step: int, count: int) -> None:
  """Unlinks the shared-memory blocks of steps ``first_step ..`` that the stopped workers
  built but grain never delivered (without this, each pipeline stop leaves them to the
  resource tracker at exit: "leaked shared_memory objects")."""
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top

  for step in range(first_step, first_step + count):
    for suffix in ('', 'l', 't'):
      try:
        block = shared_memory.SharedMemory(name=mixing.shm_name(prefix, step) + suffix)
      except (FileNotFoundError, OSError):
        continue
      block.close()
      block.unlink()


class TrainIterator(grain.DatasetIterator):
  """Iterator over the training batches; its state is ``{'step': next step}``."""

  def __init__(self, dataset: 'TrainDataset'):
    super().__init__()
    self._dataset = dataset
    self._step = dataset.start_step
    self._inner = None
    self._shm_prefix = ''

  def _inner_iterator(self):
    if self._inner is None:
      # A fresh name prefix per pipeline for the workers' shared-memory blocks (short: macOS
      # allows 31 characters).
      self._shm_prefix = f'ufo{os.getpid()}_{secrets.token_hex(3)}_'
      self._inner = iter(self._dataset.pipeline(self._step, shm_prefix=self._shm_prefix))
    return self._inner

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    batch = next(self._inner_iterator())
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or 'step' not in state:
      raise ValueError(f"not a ufo_jax input state (expected {{'step': int}}): {state!r}")
    step = int(state['step'])
    if step < 0:
      raise ValueError(f'input state step must be >= 0, got {step}')
    if step != self._step or self._inner is None:
      self._close_inner()
      self._step = step

  def start_prefetch(self) -> None:
    self._inner_iterator().start_prefetch()

  def _close_inner(self) -> None:
    if self._inner is not None:
      self._inner.close()  # stops the worker processes
      self._inner = None
      if self._dataset.worker_count:
        _unlink_in_flight(self._shm_prefix, self._step, self._dataset.in_flight_bound())

  def close(self) -> None:
    if not self._closed:
      self._close_inner()
    super().close()

  def __str__(self) -> str:
    return f'TrainIterator(step={self._step})'


class TrainDataset(grain.IterDataset):
  """Infinite ``IterDataset`` of local batches built by ``make_batch(step)``."""

  def __init__(self, make_batch: Callable[[int], dict[str, Any]], *, worker_count: int = 0,
               worker_buffer_size: int = 2, start_step: int = 0):
    super().__init__()
    if worker_count < 0:
      raise ValueError(f'config.input.worker_count must be >= 0, got {worker_count}')
    if worker_buffer_size < 1:
      raise ValueError(f'config.input.worker_buffer_size must be >= 1, got {worker_buffer_size}')
    self.make_batch = make_batch
    self.worker_count = int(worker_count)
    self.worker_buffer_size = int(worker_buffer_size)
    self.start_step = int(start_step)

  def in_flight_bound(self) -> int:
    """More than the batches the workers can have built but not delivered: each worker's
    buffer, the one it is building, and grain's hand-over queue."""
    return 4 * self.worker_count * (self.worker_buffer_size + 2) + 16

  def pipeline(self, start_step: int, shm_prefix: str = '') -> grain.IterDataset:
    """The grain pipeline from ``start_step`` on (``shm_prefix``: name the workers' shared
    memory blocks ``shm_prefix + step``, see ``BatchMaker.with_shared_memory``)."""
    steps = grain.MapDataset.range(start_step, _END)
    if self.worker_count == 0:
      # In process: one background thread builds the next batches during the train step.
      return steps.map(self.make_batch).to_iter_dataset(grain.ReadOptions(
          num_threads=1, prefetch_buffer_size=self.worker_buffer_size))
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside an absl app use their defaults.
      flags.FLAGS.mark_as_parsed()
    make_batch = self.make_batch
    if hasattr(make_batch, 'with_shared_memory'):
      make_batch = make_batch.with_shared_memory(shm_prefix)  # workers fill shared memory
    ds = steps.map(make_batch).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self.worker_count, per_worker_buffer_size=self.worker_buffer_size),
        worker_init_fn=workers.ignore_stop_signals)

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self)

  def __str__(self) -> str:
    return f'TrainDataset(workers={self.worker_count})'


class TrainingData(NamedTuple):
  """The converted training data of a run: its task sources and each task's class count."""
  sources: dict[str, TaskSource]
  num_classes: dict[str, int]


def open_training_data(config, data_dir: str | os.PathLike | None = None) -> TrainingData:
  """Checks the provenance of the run's converted sets once, then opens its training splits.

  Args:
    config: the experiment config (``config.tasks``, ``config.eval.sets``, ``config.input``).
    data_dir: the data_prep output folder (default ``config.input.data_dir``).

  Returns:
    ``TrainingData(sources, num_classes)``: one ``TaskSource`` per task (config order) and
    ``{task: identities}`` (the datasets' train identities summed over the task).

  Raises:
    provenance.PartialDataError: a partial set without ``config.input.allow_partial_data``
      (``provenance.check_config``: the training sets and the converted test sets).
  """
  data_dir = data_dir or config.input.data_dir
  provenance.check_config(config, data_dir)
  sources = open_task_sources(config, data_dir)
  return TrainingData(sources, {t: s.num_classes for t, s in sources.items()})


def build_train_dataset(config, sources: Mapping[str, TaskSource], *, process_index: int = 0,
                        process_count: int = 1) -> TrainDataset:
  """The training dataset over already opened task sources (tests use in-memory splits)."""
  tasks = config_lib.task_names(config)
  missing = [t for t in tasks if t not in sources]
  if missing:
    raise ValueError(f'no source for the configured tasks {missing}')
  mode = config.input.get('batch_mode', mixing.HETEROGENEOUS)
  samplers = mixing.make_samplers(tasks, sources, config, process_index=process_index,
                                  process_count=process_count, mode=mode)
  inputs = [mixing.TaskInput(name=t, index=i, source=sources[t], sampler=samplers[t])
            for i, t in enumerate(tasks)]
  chooser = None
  if mode == mixing.HOMOGENEOUS:
    chooser = sampling.TaskChooser([int(config.tasks[t].batch_size) for t in tasks],
                                   seed=int(config.seed))
  maker = mixing.BatchMaker(inputs, augment.AugmentParams.from_config(config),
                            seed=int(config.seed), process_index=process_index, mode=mode,
                            chooser=chooser)
  return TrainDataset(maker, worker_count=int(config.input.get('worker_count', 0)),
                      worker_buffer_size=int(config.input.get('worker_buffer_size', 2)))


def create_train_dataset(config, data_dir: str | os.PathLike | None = None, *,
                         process_index: int | None = None,
                         process_count: int | None = None) -> TrainDataset:
  """The training input of this process: a grain ``IterDataset`` of local batches.

  Args:
    config: the experiment config (``config.tasks``, ``config.input``, ``config.seed``).
    data_dir: the data_prep output folder (default ``config.input.data_dir``).
    process_index, process_count: this process's slice (default: ``jax.process_index()``
      and ``jax.process_count()``).

  Returns:
    A ``TrainDataset`` (a ``grain.IterDataset``) whose iterator yields dicts with
    ``image`` (B, S, S, 3) uint8, ``label`` (B,) int32 (task label space) and
    ``task`` (B,) int32 (config order), B = sum of ``batch_size / process_count``
    over the tasks (homogeneous mode: the same B, all from one task).
  """
  process_index, process_count = _process(process_index, process_count)
  data = open_training_data(config, data_dir)
  return build_train_dataset(config, data.sources, process_index=process_index,
                             process_count=process_count)
