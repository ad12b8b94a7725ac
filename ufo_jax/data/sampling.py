"""Per-task samplers: which records make up step ``s``'s slice of a task.

Every sampler is a pure function of (seed, process, step): ``batch(step)``
returns the task records of that step's slice for this process, so batches can
be built in any order by any number of grain workers and a resumed run only
needs the step number. Infinite: epochs follow each other, each reshuffled
with its own seed.

Process slices (each process reads only its own disjoint part of the data,
and the parts of all processes cover it):

* ``UniformSampler`` (face): records ``r`` with ``r % process_count ==
  process_index``; an epoch is a fresh permutation of them cut into
  ``len // batch_size`` batches (the remainder waits for a later epoch).
* ``IdentitySampler`` (person, vehicle, product): identities ``c`` with
  ``c % process_count == process_index``, with all their records. A batch
  holds P = batch_size / K distinct identities with K images each. An epoch
  (as fast-reid's identity sampler) shuffles every identity's images and cuts
  them into groups of K; an identity with fewer than K images gets one group:
  all its images plus random repeats (with replacement). The groups of all
  identities, identities in random order, are dealt round-robin onto the
  epoch's batches, which guarantees P distinct identities per batch, and the
  batches are shuffled. Every identity thus appears in about
  ``images / K`` batches per epoch (capped at the number of batches).
"""

from __future__ import annotations

import numpy as np
from absl import logging

# Random streams (first entropy words after the seed) kept apart.
STREAM_UNIFORM = 1
STREAM_IDENTITY = 2
STREAM_AUGMENT = 3
STREAM_TASK_CHOICE = 4
STREAM_SUBSTITUTE = 5


def rng_for(*words: int) -> np.random.Generator:
  """A numpy Generator seeded by a tuple of non-negative ints (SeedSequence entropy)."""
  return np.random.default_rng([int(w) for w in words])


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')


class UniformSampler:
  """Epoch-wise shuffled batches over this process's records of a task."""

  def __init__(self, num_records: int, batch_size: int, *, seed: int, task_index: int = 0,
               process_index: int = 0, process_count: int = 1, name: str = 'task'):
    _check_process(process_index, process_count)
    self.name = name
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.task_index = int(task_index)
    self.process_index = process_index
    self.process_count = process_count
    self.num_records = int(num_records)
    self.num_local = len(range(process_index, self.num_records, process_count))
    if self.batch_size < 1:
      raise ValueError(f'{name}: batch size per process must be positive, got {batch_size}')
    if self.num_local < 1:
      raise ValueError(f'task {name}: process {process_index} of {process_count} holds no '
                       'records; use fewer processes')
    # Epochs of len // batch_size batches (no record twice in a batch); a split smaller than
    # the batch is read as one stream of epochs instead (batches then repeat records).
    self.wraps = self.num_local < self.batch_size
    if self.wraps:
      logging.warning('task %s: process %d holds only %d records for a batch of %d; batches '
                      'repeat records', name, process_index, self.num_local, self.batch_size)
    self.steps_per_epoch = max(1, self.num_local // self.batch_size)
    self._cache: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cache'] = {}
    return state

  def local_records(self) -> np.ndarray:
    """The task records of this process's slice."""
    return np.arange(self.process_index, self.num_records, self.process_count, dtype=np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      if len(self._cache) >= 2:  # workers near an epoch boundary need two
        self._cache.pop(max(self._cache, key=lambda e: abs(e - epoch)))
      rng = rng_for(self.seed, STREAM_UNIFORM, self.task_index, self.process_index, epoch)
      perm = rng.permutation(self.num_local)
      self._cache[epoch] = perm.astype(np.int32) if self.num_local < 2**31 else perm
    return self._cache[epoch]

  def batch(self, step: int) -> np.ndarray:
    """Task records of step ``step``'s slice: (batch_size,) int64."""
    b = self.batch_size
    if self.wraps:
      pos = np.arange(int(step) * b, (int(step) + 1) * b)
      epochs, offsets = np.divmod(pos, self.num_local)
      local = np.concatenate([self._permutation(int(e))[offsets[epochs == e]]
                              for e in np.unique(epochs)])
    else:
      epoch, j = divmod(int(step), self.steps_per_epoch)
      local = self._permutation(epoch)[j * b:(j + 1) * b]
    return self.process_index + self.process_count * local.astype(np.int64)

  def substitute(self, record: int, rng: np.random.Generator) -> int:
    """A random record of this process's slice to use instead of an undecodable one."""
    del record
    return self.process_index + self.process_count * int(rng.integers(self.num_local))


class IdentitySampler:
  """P identities x K images per batch over this process's identities of a task."""

  def __init__(self, labels: np.ndarray, batch_size: int, num_instances: int, *, seed: int,
               task_index: int = 0, process_index: int = 0, process_count: int = 1,
               name: str = 'task'):
    _check_process(process_index, process_count)
    self.name = name
    self.seed = int(seed)
    self.task_index = int(task_index)
    self.process_index = process_index
    self.process_count = process_count
    self.k = int(num_instances)
    self.batch_size = int(batch_size)
    if self.k < 1 or self.batch_size < 1 or self.batch_size % self.k:
      raise ValueError(f'task {name}: the batch per process ({batch_size}) must be a positive '
                       f'multiple of num_instances K={num_instances}')
    self.p = self.batch_size // self.k
    labels = np.asarray(labels, np.int64)
    mine = np.flatnonzero(labels % process_count == process_index)
    order = np.argsort(labels[mine], kind='stable')
    self.records = mine[order]  # this process's records, grouped by identity
    sorted_labels = labels[self.records]
    self.identities, self.starts, self.counts = np.unique(
        sorted_labels, return_index=True, return_counts=True)
    self.num_ids = len(self.identities)
    if self.num_ids < self.p:
      raise ValueError(
          f'task {name}: process {process_index} of {process_count} holds {self.num_ids} '
          f'identities, fewer than the P={self.p} distinct identities of its batch '
          f'({self.batch_size} = P x K={self.k}); lower config.tasks.{name}.batch_size or use '
          'fewer processes')
    # Groups of K per identity, capped so that no identity needs two slots of one batch.
    groups = np.maximum(self.counts // self.k, 1)
    while True:
      steps = int(groups.sum()) // self.p
      if (groups <= steps).all():
        break
      groups = np.minimum(groups, steps)
    self.groups = groups
    self.steps_per_epoch = steps
    self._cache: tuple[int, np.ndarray] | None = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cache'] = None
    return state

  def local_records(self) -> np.ndarray:
    """The task records of this process's slice (grouped by identity)."""
    return self.records

  def _schedule(self, epoch: int) -> np.ndarray:
    """(steps_per_epoch, P * K) task records of every batch of ``epoch``."""
    if self._cache is not None and self._cache[0] == epoch:
      return self._cache[1]
    rng = rng_for(self.seed, STREAM_IDENTITY, self.task_index, self.process_index, epoch)
    k, p, steps = self.k, self.p, self.steps_per_epoch
    # Shuffle the images inside every identity's block.
    block = np.repeat(np.arange(self.num_ids), self.counts)
    shuffled = self.records[np.lexsort((rng.random(len(self.records)), block))]
    # Identities in random order, each contributing its groups; keep steps * P groups.
    ident = rng.permutation(self.num_ids)
    g = self.groups[ident]
    group_ident = np.repeat(ident, g)[:steps * p]
    first = np.repeat(np.cumsum(g) - g, g)[:steps * p]
    group_j = np.arange(len(group_ident)) - first  # group number inside its identity
    # Offsets of the K images of each group inside the identity's block: group j takes
    # images jK..jK+K-1; an identity with fewer than K images repeats random ones.
    offs = group_j[:, None] * k + np.arange(k)[None, :]
    count = self.counts[group_ident][:, None]
    fill = np.floor(rng.random(offs.shape) * count).astype(np.int64)
    offs = np.where(offs < count, offs, fill)
    recs = shuffled[self.starts[group_ident][:, None] + offs]  # (steps * P, K)
    # Deal the groups round-robin: group t goes to batch t % steps, slot t // steps.
    sched = recs.reshape(p, steps, k).transpose(1, 0, 2).reshape(steps, p * k)
    sched = sched[rng.permutation(steps)]
    self._cache = (epoch, sched)
    return sched

  def batch(self, step: int) -> np.ndarray:
    """Task records of step ``step``'s slice: (P * K,) int64, K consecutive per identity."""
    epoch, j = divmod(int(step), self.steps_per_epoch)
    return self._schedule(epoch)[j]

  def substitute(self, record: int, rng: np.random.Generator) -> int:
    """Another image of the same identity (a random record if it has no other)."""
    where = np.flatnonzero(self.records == record)
    if len(where):
      i = int(np.searchsorted(self.starts, where[0], side='right')) - 1
      start, count = int(self.starts[i]), int(self.counts[i])
      if count > 1:
        other = start + int(rng.integers(count - 1))
        if other >= where[0]:
          other += 1
        return int(self.records[other])
    return int(self.records[rng.integers(len(self.records))])


class TaskChooser:
  """Homogeneous batches: the task of every step, drawn with probability ∝ its batch size.

  The same for every process (seeded by the seed alone). ``choose(step)``
  returns (task position, occurrence) where occurrence counts the earlier
  steps that chose the same task: that task's sampler serves it its batch
  number ``occurrence``, so each task still walks through its epochs in order.
  """

  BLOCK = 1024

  def __init__(self, weights, *, seed: int):
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or (w <= 0).any():
      raise ValueError(f'task weights must be positive, got {weights}')
    self.probs = w / w.sum()
    self.seed = int(seed)
    self._choices = np.zeros(0, np.int64)
    self._occurrence = np.zeros(0, np.int64)
    self._totals = np.zeros(len(w), np.int64)

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_choices'] = np.zeros(0, np.int64)
    state['_occurrence'] = np.zeros(0, np.int64)
    state['_totals'] = np.zeros(len(self.probs), np.int64)
    return state

  def _extend(self, upto: int) -> None:
    while len(self._choices) <= upto:
      block = len(self._choices) // self.BLOCK
      c = rng_for(self.seed, STREAM_TASK_CHOICE, block).choice(
          len(self.probs), size=self.BLOCK, p=self.probs)
      occ = np.empty(self.BLOCK, np.int64)
      for t in range(len(self.probs)):
        where = np.flatnonzero(c == t)
        occ[where] = self._totals[t] + np.arange(len(where))
        self._totals[t] += len(where)
      self._choices = np.concatenate([self._choices, c])
      self._occurrence = np.concatenate([self._occurrence, occ])

  def choose(self, step: int) -> tuple[int, int]:
    self._extend(int(step))
    return int(self._choices[step]), int(self._occurrence[step])
