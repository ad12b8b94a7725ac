"""Batch composition: one step's local batch over all tasks (docs/INPUT.md).

``BatchMaker(step)`` builds this process's part of global batch ``step``:

* heterogeneous (default): every batch holds ``config.tasks.<t>.batch_size /
  process_count`` examples of every task, tasks in config order, each row
  tagged with its task position in ``task``;
* homogeneous (the ablation): each step draws one task, with probability
  proportional to its ``batch_size`` (the same draw on every process), and
  the whole batch (sum of the tasks' batch sizes) comes from that task.

The batch is a pure function of (seed, process, step): records come from the
task samplers, augmentation randomness from a generator seeded with (seed,
process, step, task), so any grain worker can build any step and a resumed
run rebuilds exactly the batches it would have seen. A record that does not
decode is counted, logged and replaced by another image of the same identity
(uniform tasks: another random record), so every batch keeps its exact
per-task counts.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Mapping, Sequence

import grain.python as grain_python
import numpy as np

from ufo_jax.data import augment, sampling
from ufo_jax.data.sources import TaskSource

HETEROGENEOUS = 'heterogeneous'
HOMOGENEOUS = 'homogeneous'
MAX_SUBSTITUTES = 32  # replacement draws for one undecodable record before giving up


def shm_name(prefix: str, step: int) -> str:
  """The shared-memory block name of a batch's images (``BatchMaker.with_shared_memory``);
  its labels and tasks are the same name + ``'l'`` and + ``'t'``."""
  return f'{prefix}{int(step)}'


def _shared_array(shape: tuple[int, ...], dtype: type, name: str) -> np.ndarray:
  """A grain ``SharedMemoryArray`` (a new block: zero-filled), named ``name`` if given."""
  if not name:
    return grain_python.SharedMemoryArray(shape, dtype)
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top

  size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
  block = shared_memory.SharedMemory(name=name, create=True, size=size)
  return grain_python.SharedMemoryArray.from_shared_memory(block, shape, dtype)


@dataclasses.dataclass
class TaskInput:
  """One task of the mix: its source and sampler (sized for its local slice)."""

  name: str
  index: int  # position in config order (the value of ``task`` in the batch)
  source: TaskSource
  sampler: sampling.UniformSampler | sampling.IdentitySampler


class BatchMaker:
  """Callable ``step -> {'image': (B, S, S, 3) uint8, 'label': (B,) int32, 'task': (B,) int32}``."""

  def __init__(self, tasks: Sequence[TaskInput], params: augment.AugmentParams, *, seed: int,
               process_index: int = 0, mode: str = HETEROGENEOUS,
               chooser: sampling.TaskChooser | None = None):
    if mode not in (HETEROGENEOUS, HOMOGENEOUS):
      raise ValueError(f"config.input.batch_mode must be '{HETEROGENEOUS}' or '{HOMOGENEOUS}', "
                       f'got {mode!r}')
    if mode == HOMOGENEOUS and chooser is None:
      raise ValueError('homogeneous batches need a TaskChooser')
    self.tasks = list(tasks)
    self.params = params
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.mode = mode
    self.chooser = chooser
    sizes = {t.sampler.batch_size for t in self.tasks}
    if mode == HOMOGENEOUS and len(sizes) != 1:
      raise ValueError(f'homogeneous samplers must all serve the whole batch, got sizes {sizes}')
    self.batch_size = (sizes.pop() if mode == HOMOGENEOUS
                       else sum(t.sampler.batch_size for t in self.tasks))
    self.shared_memory = False
    self.shm_prefix = ''

  def with_shared_memory(self, prefix: str = '') -> 'BatchMaker':
    """A copy that writes images straight into shared memory (for grain worker processes:
    grain then hands the block to the main process without copying the batch again).

    With a ``prefix``, the block of step ``s`` is named ``prefix + str(s)``, so that the owner
    of the pipeline can unlink the blocks still in flight when it stops the workers
    (``shm_name``); grain unlinks the ones it delivers.
    """
    maker = copy.copy(self)
    maker.shared_memory = True
    maker.shm_prefix = prefix
    return maker

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    s = self.params.image_size
    shape = (self.batch_size, s, s, 3)
    if self.shared_memory:  # all three arrays: grain would copy the others into blocks of its own
      name = shm_name(self.shm_prefix, step) if self.shm_prefix else ''
      image = _shared_array(shape, np.uint8, name)
      label = _shared_array((self.batch_size,), np.int32, name and name + 'l')
      task = _shared_array((self.batch_size,), np.int32, name and name + 't')
    else:
      image = np.empty(shape, np.uint8)  # every row is written whole (augment.shift_into)
      label = np.empty(self.batch_size, np.int32)
      task = np.empty(self.batch_size, np.int32)
    if self.mode == HETEROGENEOUS:
      parts = [(t, t.sampler.batch(step)) for t in self.tasks]
    else:
      t_pos, occurrence = self.chooser.choose(step)
      t = self.tasks[t_pos]
      parts = [(t, t.sampler.batch(occurrence))]
    row = 0
    for t, records in parts:
      n = len(records)
      self._fill(t, step, records, image[row:row + n], label[row:row + n])
      task[row:row + n] = t.index
      row += n
    return {'image': image, 'label': label, 'task': task}

  def _fill(self, t: TaskInput, step: int, records: np.ndarray, image: np.ndarray,
            label: np.ndarray) -> None:
    rng = sampling.rng_for(self.seed, sampling.STREAM_AUGMENT, self.process_index, step, t.index)
    sub_rng = None
    for i, (data, lab, ds_pos, rec) in enumerate(t.source.read(records)):
      img = None
      attempts = 0
      while img is None:
        try:
          img = augment.decode_image(data)
        except augment.DecodeError as e:
          augment.record_decode_failure(t.source.splits[ds_pos].dataset, rec, e)
          attempts += 1
          if attempts > MAX_SUBSTITUTES:
            raise ValueError(
                f'task {t.name}: {attempts} records in a row do not decode (last: record {rec} '
                f'of {t.source.splits[ds_pos].dataset}); the converted data looks corrupt, '
                'convert it again with data_prep') from None
          if sub_rng is None:
            sub_rng = sampling.rng_for(self.seed, sampling.STREAM_SUBSTITUTE, self.process_index,
                                       step, t.index)
          task_record = int(t.source.record_offsets[ds_pos]) + rec
          replacement = t.sampler.substitute(task_record, sub_rng)
          data, lab, ds_pos, rec = t.source.read([replacement])[0]
      augment.train_transform_into(image[i], img, rng, self.params)
      label[i] = lab


def make_samplers(task_names: Sequence[str], sources: Mapping[str, TaskSource], config, *,
                  process_index: int, process_count: int, mode: str):
  """The samplers of each task, sized for heterogeneous or homogeneous batches."""
  samplers = {}
  local_total = 0
  for name in task_names:
    b = int(config.tasks[name].batch_size)
    if b % process_count:
      raise ValueError(f'config.tasks.{name}.batch_size={b} is not divisible by the '
                       f'{process_count} processes')
    local_total += b // process_count
  for i, name in enumerate(task_names):
    tc = config.tasks[name]
    local = int(tc.batch_size) // process_count if mode == HETEROGENEOUS else local_total
    common = dict(seed=int(config.seed), task_index=i, process_index=process_index,
                  process_count=process_count, name=name)
    if tc.sampler == 'uniform':
      samplers[name] = sampling.UniformSampler(sources[name].num_records, local, **common)
    elif tc.sampler == 'identity':
      samplers[name] = sampling.IdentitySampler(sources[name].labels(), local,
                                                int(tc.num_instances), **common)
    else:
      raise ValueError(f"config.tasks.{name}.sampler must be 'uniform' or 'identity', "
                       f'got {tc.sampler!r}')
  return samplers
