"""Evaluation input: one test split, in order, bicubic resize only (docs/EVALUATION.md).

  ev = create_eval_dataset(data_dir, 'market1501', 'query', image_size=384, batch_size=512)
  for batch in ev:          # len(ev) batches, the same number on every process
    batch['image']          # (b, S, S, 3) uint8, b = batch_size // process_count
    batch['mask']           # (b,) bool: False on padding rows and undecodable images
    batch['index']          # (b,) int32: row of the split (-1 on padding)
    batch['id'], batch['camera']  # (b,) int32 (-1 where none, and on padding)

Rows are the split's records in stored order (data_prep keeps its listing
order). A face verification set (``image_a``, ``image_b``, ``is_same``,
``index``) is read as its 2N images in pair order ``a0, b0, a1, b1, ...``
(pairs sorted by their ``index`` feature): row ``2i`` / ``2i + 1`` are the two
sides of pair ``i``, so features[0::2] and features[1::2] are the pairs, and
``load_pairs_labels`` gives ``is_same`` in the same order.

Processes: process ``p`` of ``P`` reads the contiguous rows
``[p * ceil(n / P), (p + 1) * ceil(n / P))``; every process yields
``ceil(ceil(n / P) / (batch_size / P))`` batches, the last ones padded
(``mask`` False), so multi-host collectives stay in step. Gather the valid rows
of all processes and order them by ``index``.

A record that does not decode is counted and logged; its row comes out with
``mask`` False (rows keep their place, so pairs stay aligned: treat a pair with
an invalid side as missing).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import grain
import numpy as np

from ufo_jax.data import augment, workers
from ufo_jax.data.sources import Split, open_split

PAIR_FEATURES = frozenset({'image_a', 'image_b', 'is_same', 'index'})


def _pair_order(split: Split) -> np.ndarray:
  """Records of a pairs split sorted by their ``index`` feature (checked to be 0..N-1)."""
  index = split.column('index')
  order = np.argsort(index, kind='stable')
  if not np.array_equal(index[order], np.arange(len(index))):
    raise ValueError(f'{split!r}: the pair index feature is not a permutation of '
                     f'0..{len(index) - 1}')
  return order


class EvalDataset:
  """In-order, padded batches of one split for one process (iterable, ``len`` = batches)."""

  def __init__(self, split: Split, *, image_size: int, batch_size: int, process_index: int = 0,
               process_count: int = 1, num_threads: int = 4, worker_count: int = 0):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f'eval batch_size={batch_size} must be a positive multiple of the '
                       f'{process_count} processes (it is the global batch)')
    if image_size < 1:
      raise ValueError(f'image_size must be positive, got {image_size}')
    self.split = split
    self.image_size = int(image_size)
    self.local_batch_size = batch_size // process_count
    self.is_pairs = PAIR_FEATURES <= split.features
    self.pair_records = _pair_order(split) if self.is_pairs else None
    self.num_examples = 2 * len(split) if self.is_pairs else len(split)
    per_process = math.ceil(self.num_examples / process_count)
    self.row_start = min(self.num_examples, process_index * per_process)
    self.row_stop = min(self.num_examples, (process_index + 1) * per_process)
    self.num_batches = math.ceil(per_process / self.local_batch_size)
    self.num_threads = int(num_threads)
    self.worker_count = int(worker_count)

  def __len__(self) -> int:
    return self.num_batches

  def __repr__(self) -> str:
    return (f'EvalDataset({self.split!r}, rows {self.row_start}:{self.row_stop}, '
            f'{self.num_batches} batches of {self.local_batch_size})')

  def make_batch(self, b: int) -> dict[str, np.ndarray]:
    """Batch ``b`` of this process."""
    n, s = self.local_batch_size, self.image_size
    rows = np.arange(self.row_start + b * n, self.row_start + (b + 1) * n)
    rows = rows[rows < self.row_stop]
    out = {'image': np.zeros((n, s, s, 3), np.uint8), 'mask': np.zeros(n, bool),
           'index': np.full(n, -1, np.int32), 'id': np.full(n, -1, np.int32),
           'camera': np.full(n, -1, np.int32)}
    if not len(rows):
      return out
    if self.is_pairs:
      records = self.pair_records[rows // 2]
      keys = np.where(rows % 2 == 0, 'image_a', 'image_b')
    else:
      records = rows
      keys = np.full(len(rows), 'image')
    for i, (row, rec, key, ex) in enumerate(zip(rows, records, keys,
                                               self.split.read(records.tolist()))):
      out['index'][i] = row
      out['id'][i] = int(ex.get('id', -1))
      out['camera'][i] = int(ex.get('camera', -1))
      try:
        img = augment.decode_image(ex[str(key)])
      except augment.DecodeError as e:
        augment.record_decode_failure(f'{self.split.dataset}/{self.split.split}', int(rec), e)
        continue
      out['image'][i] = augment.eval_transform(img, s)
      out['mask'][i] = True
    return out

  def as_grain(self) -> grain.IterDataset:
    """The batches as a grain ``IterDataset`` (threads or worker processes, in order)."""
    ds = grain.MapDataset.range(self.num_batches).map(self.make_batch)
    if self.worker_count > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                         per_worker_buffer_size=2),
                            worker_init_fn=workers.ignore_stop_signals)
    return ds.to_iter_dataset(grain.ReadOptions(
        num_threads=max(1, self.num_threads), prefetch_buffer_size=max(2, self.num_threads)))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    it = iter(self.as_grain())
    try:
      yield from it
    finally:
      it.close()


def create_eval_dataset(data_dir: str | os.PathLike, dataset: str, split: str, *,
                        image_size: int, batch_size: int, process_index: int = 0,
                        process_count: int = 1, num_threads: int = 4,
                        worker_count: int = 0) -> EvalDataset:
  """The in-order evaluation batches of ``dataset``/``split`` for one process.

  Args:
    data_dir: the data_prep output folder.
    dataset, split: e.g. ('market1501', 'query'), ('lfw', 'test'), ('sop', 'test').
    image_size: side of the bicubic resize.
    batch_size: the GLOBAL batch; each process yields ``batch_size // process_count`` rows.
    process_index, process_count: this process's contiguous share of the rows.
    num_threads: decoding threads (worker_count 0); worker_count: grain worker processes.

  Returns:
    An ``EvalDataset``: iterate for dict batches (``image``, ``mask``, ``index``,
    ``id``, ``camera``); ``len()`` batches; ``num_examples`` rows in the split
    (2 x pairs for face sets); ``is_pairs``.
  """
  return EvalDataset(open_split(data_dir, dataset, split), image_size=image_size,
                     batch_size=batch_size, process_index=process_index,
                     process_count=process_count, num_threads=num_threads,
                     worker_count=worker_count)


def pairs_labels(split: Split) -> np.ndarray:
  """``is_same`` of every pair of a face verification split, in pair (``index``) order."""
  if not PAIR_FEATURES <= split.features:
    raise ValueError(f'{split!r} is not a face verification split (features '
                     f'{sorted(split.features)}, expected {sorted(PAIR_FEATURES)})')
  return split.column('is_same')[_pair_order(split)].astype(bool)


def load_pairs_labels(data_dir: str | os.PathLike, dataset: str, split: str = 'test') -> np.ndarray:
  """(N,) bool ``is_same`` of a face verification set, aligned with rows 2i / 2i + 1."""
  return pairs_labels(open_split(data_dir, dataset, split))


def split_info(data_dir: str | os.PathLike, dataset: str, split: str) -> dict[str, Any]:
  """Rows and identities of a converted split (no image read)."""
  s = open_split(data_dir, dataset, split)
  is_pairs = PAIR_FEATURES <= s.features
  return {'rows': 2 * len(s) if is_pairs else len(s), 'records': len(s), 'num_ids': s.num_ids,
          'is_pairs': is_pairs}
