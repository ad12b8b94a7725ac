"""Learnable synthetic training batches of the configured shapes (``input.source='synthetic'``).

For tests, CPU runs and benchmarks without the converted datasets. Each class of each task has a
fixed random low-frequency pattern (a 4 x 4 grid of colours, nearest-upsampled to the image
size); an example is its class pattern plus noise from a small fixed bank (uint8 throughout).
A small model learns to tell the classes apart in a few dozen steps, so the losses go down.

The layout follows the real pipeline (``ufo_jax.data.create_train_dataset``): every element is
this process's local batch ``{'image': (B, H, W, 3) uint8, 'label': (B,) int32, 'task': (B,)
int32}`` with ``B = sum(task batch sizes) / process_count``.

- heterogeneous batches: the tasks in config order, each with its local share
  ``batch_size / process_count``;
- homogeneous batches: step ``s`` holds ``B`` examples of task ``s mod num_tasks`` only (same
  shape every step, so the same compiled train step serves both modes);
- a task with the identity sampler gets ``P`` identities x ``K = num_instances`` images (as the
  identity sampler: positives for the triplet loss); a uniform task gets uniform labels.

Batch ``s`` of process ``p`` is a pure function of ``(config.seed, p, s)``: the dataset is a
grain ``MapDataset`` over the step index, so its iterator state (``{'next_index': s}``)
checkpoints with orbax like the real pipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np

from ufo_jax.config import task_names

PATTERN_GRID = 4  # the class pattern is a PATTERN_GRID x PATTERN_GRID grid of colours
NOISE_BANK = 8  # noise images shared by all examples (cheap batches at any size)
NOISE_AMPLITUDE = 24  # uint8 units
_NUM_BATCHES = 2 ** 62  # "infinite": a random-access dataset indexed by step


class SyntheticBatches:
  """Callable ``step index -> local batch`` (see the module docstring)."""

  def __init__(self, config: Any, num_classes: Mapping[str, int], *, process_index: int,
               process_count: int):
    self.tasks = task_names(config)
    self.num_classes = {t: int(num_classes[t]) for t in self.tasks}
    self.image_size = int(config.input.image_size)
    self.seed = int(config.seed)
    self.homogeneous = config.input.batch_mode == 'homogeneous'
    self.process_index = process_index
    self.local_sizes = {}
    for t in self.tasks:
      size = int(config.tasks[t].batch_size)
      if size % process_count:
        raise ValueError(f'config.tasks.{t}.batch_size={size} is not divisible by the '
                         f'{process_count} processes')
      self.local_sizes[t] = size // process_count
    self.local_batch = sum(self.local_sizes.values())
    self.instances = {t: (int(config.tasks[t].num_instances)
                          if config.tasks[t].sampler == 'identity' else 1) for t in self.tasks}
    # Patterns in [24, 184] plus noise in [0, 48] stay within uint8: no clipping needed.
    self.grids = {t: np.random.default_rng([self.seed, 104729, i]).integers(
        24, 185, (self.num_classes[t], PATTERN_GRID, PATTERN_GRID, 3), dtype=np.uint8)
        for i, t in enumerate(self.tasks)}
    self.noise = np.random.default_rng([self.seed, 7919]).integers(
        0, 2 * NOISE_AMPLITUDE + 1, (NOISE_BANK, self.image_size, self.image_size, 3),
        dtype=np.uint8)

  def patterns(self, task_index: int, labels: np.ndarray) -> np.ndarray:
    """The (N, H, W, 3) uint8 patterns of ``labels`` of one task (nearest-upsampled grids)."""
    grid = self.grids[self.tasks[task_index]][labels]  # (N, G, G, 3)
    n, size = grid.shape[0], self.image_size
    reps = -(-size // PATTERN_GRID)
    rows = np.repeat(grid, reps, axis=2)[:, :, :size]  # (N, G, W, 3)
    # Repeat whole rows (contiguous W * 3 bytes) rather than single pixels: much faster.
    up = np.broadcast_to(rows.reshape(n, PATTERN_GRID, 1, size * 3),
                         (n, PATTERN_GRID, reps, size * 3))
    return up.reshape(n, PATTERN_GRID * reps, size, 3)[:, :size]

  def _labels(self, rng: np.random.Generator, task: str, size: int) -> np.ndarray:
    k = self.instances[task]
    classes = self.num_classes[task]
    if k > 1:
      ids = rng.choice(classes, size=-(-size // k), replace=classes < -(-size // k))
      return np.repeat(ids, k)[:size].astype(np.int32)
    return rng.integers(0, classes, size, dtype=np.int32)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 31337, self.process_index, int(step)])
    if self.homogeneous:
      index = int(step) % len(self.tasks)
      parts = [(index, self.local_batch)]
    else:
      parts = [(i, self.local_sizes[t]) for i, t in enumerate(self.tasks)]
    label = np.concatenate([self._labels(rng, self.tasks[i], size) for i, size in parts])
    task = np.concatenate([np.full((size,), i, np.int32) for i, size in parts])
    image = np.empty((label.shape[0], self.image_size, self.image_size, 3), np.uint8)
    start = 0
    for index, size in parts:
      image[start:start + size] = self.patterns(index, label[start:start + size])
      start += size
    for row, noise_id in enumerate(rng.integers(0, NOISE_BANK, label.shape[0])):
      image[row] += self.noise[noise_id]  # row by row: no (B, H, W, 3) temporary
    return {'image': image, 'label': label, 'task': task}


def create_synthetic_dataset(config: Any, num_classes: Mapping[str, int], *,
                             process_index: int | None = None,
                             process_count: int | None = None) -> grain.IterDataset:
  """The synthetic training stream of ``config`` as a grain ``IterDataset`` of local batches.

  Args:
    config: the experiment config (tasks, batch sizes, image size, batch mode, seed).
    num_classes: classes per task (labels are drawn in ``[0, num_classes)``).
    process_index, process_count: this process's slice (default: ``jax.process_index()`` and
      ``jax.process_count()``); tests pass them to build another process's batches.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  make = SyntheticBatches(config, num_classes, process_index=process_index,
                          process_count=process_count)
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  return grain.MapDataset.range(_NUM_BATCHES).map(make).to_iter_dataset(options)
