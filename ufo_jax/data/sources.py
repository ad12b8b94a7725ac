"""Readers of the converted datasets and the per-task sources built on them.

data_prep writes every dataset as a TFDS ArrayRecord folder
``DATA_DIR/<name>/1.0.0``. Image sets hold ``image`` (a ``tfds.features.Image``
storing the original encoded bytes), ``id``, ``label`` (0..C-1 in the train
split, -1 elsewhere), ``camera`` (-1 where none) and ``path``; face
verification sets hold ``image_a``, ``image_b`` (images), ``is_same`` and
``index``. ``builder.info.metadata['num_ids'][split]`` is the number of
identities, ``metadata['provenance']`` how the set was built (checked by
``ufo_jax.data.provenance`` before training and evaluation).

``open_split`` returns a ``TfdsSplit``: random access to a split through TFDS's
data-source API (``builder.as_data_source(split, decoders=...)``) with the
image features left encoded (``tfds.decode.SkipDecoding``): the pipelines
decode them with ``augment.decode_image``. ``MemorySplit`` holds the same kind
of examples in memory (tests, tools).

A ``TaskSource`` puts the train splits of a task's datasets into one label
space (docs/INPUT.md): dataset ``i``'s labels are shifted by the train identities of
the datasets before it, in config order, so ``market1501/0002`` and
``dukemtmc/0002`` are different classes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ufo_jax import catalog
from ufo_jax import config as config_lib

DEFAULT_VERSION = '1.0.0'
_LABEL_CHUNK = 8192  # records per read when scanning a column


def _build_hint(data_dir: str, dataset: str) -> str:
  hint = (f'run `python -m data_prep.build --dataset={dataset} --raw_dir=RAW_ROOT '
          f'--out_dir={data_dir}` first')
  withdrawn = catalog.DATASETS[dataset].withdrawn if dataset in catalog.DATASETS else ''
  return f'{hint} ({withdrawn})' if withdrawn else hint


def builder_dir(data_dir: str | os.PathLike, dataset: str) -> str:
  """``data_dir/<dataset>/<version>``: the folder ``tfds.builder_from_directory`` reads."""
  data_dir = os.fspath(data_dir)
  if not data_dir:
    raise ValueError('no data_dir given: set --config.input.data_dir to the data_prep output')
  root = os.path.join(data_dir, dataset)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'converted dataset {dataset!r} not found: {root} does not exist; '
        + _build_hint(data_dir, dataset))
  preferred = os.path.join(root, DEFAULT_VERSION)
  if os.path.isfile(os.path.join(preferred, 'dataset_info.json')):
    return preferred
  versions = sorted(
      (v for v in os.listdir(root)
       if re.fullmatch(r'\d+\.\d+\.\d+', v)
       and os.path.isfile(os.path.join(root, v, 'dataset_info.json'))),
      key=lambda v: tuple(int(x) for x in v.split('.')))
  if not versions:
    raise FileNotFoundError(
        f'{root} holds no finished conversion (no <version>/dataset_info.json, the '
        f'conversion may have stopped early); ' + _build_hint(data_dir, dataset))
  return os.path.join(root, versions[-1])


class Split(Protocol):
  """Random access to the raw features of one split (bytes and ints, nothing decoded)."""

  dataset: str
  split: str
  num_ids: int | None
  features: frozenset[str]

  def __len__(self) -> int:
    ...

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The examples at ``indices`` as {feature: bytes | int | float}."""
    ...

  def column(self, key: str) -> np.ndarray:
    """One scalar integer feature of every example, in record order (no image decoding)."""
    ...


class OldFormatError(config_lib.ConfigError):
  """A set converted by an earlier data_prep (images as raw byte tensors): convert it again."""


def image_features(info) -> tuple[str, ...]:
  """The ``tfds.features.Image`` features of a converted set (``info``: its DatasetInfo)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tuple(k for k, f in info.features.items() if isinstance(f, tfds.features.Image))


class DamagedDataError(config_lib.ConfigError):
  """A converted set whose files are damaged or not the set they should be: one line naming the
  file and the ``data_prep.build ... --overwrite`` command that converts it again."""


def rebuild_command(path: str, dataset: str, info=None) -> str:
  """The command that converts ``dataset`` into the data_dir of ``path`` again (its raw folder
  from the provenance of ``info`` when there is one)."""
  record = dict((getattr(info, 'metadata', None) or {}).get('provenance') or {})
  return (f'python -m data_prep.build --dataset={dataset} '
          f'--raw_dir={record.get("raw_dir") or "RAW"} '
          f'--out_dir={os.path.dirname(os.path.dirname(os.path.abspath(path)))} --overwrite')


def _short(error: BaseException) -> str:
  return f'{type(error).__name__}: {" ".join(str(error).split())[:100]}'


def open_builder(path: str, dataset: str):
  """``tfds.builder_from_directory(path)``; an unreadable ``dataset_info.json`` is one line."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder_from_directory(path)
  except Exception as e:  # noqa: BLE001 - a damaged or partial dataset_info.json
    raise DamagedDataError(f'{dataset}: {os.path.join(path, "dataset_info.json")} cannot be '
                           f'read ({_short(e)}); convert it again: '
                           f'{rebuild_command(path, dataset)}') from None


def check_shard_sizes(info, path: str, dataset: str, splits: Sequence[str]) -> None:
  """``DamagedDataError`` for a shard file of ``splits`` that is missing or whose size differs
  from the one data_prep recorded (``provenance['shards']``): a truncated ArrayRecord shard can
  read as examples of None values. One ``stat`` per shard; sets without the record pass."""
  shards = dict((info.metadata or {}).get('provenance') or {}).get('shards') or {}
  for split in splits:
    for entry in shards.get(split, ()):
      file = os.path.join(path, entry['file'])
      size = os.path.getsize(file) if os.path.exists(file) else None
      if size != entry['bytes']:
        what = 'is missing' if size is None else (f'has {size} bytes, {entry["bytes"]} when it '
                                                  'was converted (truncated?)')
        raise DamagedDataError(f'{dataset}/{split}: {file} {what}; convert it again: '
                               f'{rebuild_command(path, dataset, info)}')


def check_format(info, path: str, dataset: str) -> tuple[str, ...]:
  """The image features of a converted set; ``OldFormatError`` for the raw-bytes format,
  ``DamagedDataError`` for a folder that holds another dataset."""
  if info.name != dataset and dataset in catalog.DATASETS:
    raise DamagedDataError(
        f'{dataset}: {path} holds the converted dataset {info.name!r} (its dataset_info.json), '
        f'not {dataset!r}; convert {dataset} there again: {rebuild_command(path, dataset)}')
  keys = image_features(info)
  if not keys:
    raise OldFormatError(
        f'{dataset}: {path} was converted by an earlier data_prep (images stored as raw byte '
        'tensors, not tfds.features.Image); convert it again with `python -m data_prep.build '
        f'--dataset={dataset} --raw_dir=RAW --out_dir={os.path.dirname(os.path.dirname(path))} '
        '--overwrite`')
  return keys


class TfdsSplit:
  """One split of a converted dataset, read through TFDS's data-source API.

  ``builder.as_data_source(split, decoders={image: SkipDecoding()})``: the images come
  out as their encoded bytes (the pipeline decodes them), every other feature as TFDS
  decodes it. Picklable: the open data source is dropped when pickled (grain worker
  processes open their own).
  """

  def __init__(self, path: str | os.PathLike, split: str, dataset: str | None = None):
    self.path = os.fspath(path)
    builder = open_builder(self.path, dataset or os.path.basename(os.path.dirname(self.path)))
    info = builder.info
    self.dataset = dataset or info.name
    self.image_keys = check_format(info, self.path, self.dataset)
    if split not in info.splits:
      raise ValueError(f'{self.path} has splits {sorted(info.splits.keys())}, not {split!r}')
    check_shard_sizes(info, self.path, self.dataset, [split])
    self.split = split
    self._shards = (list(info.splits[split].filenames),
                    np.cumsum(info.splits[split].shard_lengths))
    self._rebuild = rebuild_command(self.path, self.dataset, info)
    self._len = int(info.splits[split].num_examples)
    self.features = frozenset(info.features.keys())
    metadata = dict(info.metadata or {})
    num_ids = dict(metadata.get('num_ids') or {})
    self.num_ids = int(num_ids[split]) if split in num_ids else None
    self.provenance = metadata.get('provenance')
    self._builder = builder
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_source'] = None
    state['_builder'] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return f'TfdsSplit({self.dataset}/{self.split}, {self._len} examples)'

  def data_source(self):
    """The TFDS data source of the split, images left encoded (opened once per process)."""
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      if self._builder is None:
        self._builder = tfds.builder_from_directory(self.path)
      self._source = self._builder.as_data_source(
          self.split, decoders={k: tfds.decode.SkipDecoding() for k in self.image_keys})
    return self._source

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    if not len(indices):
      return []
    return self._records([int(i) for i in indices])

  def _records(self, indices: list[int]) -> list[dict[str, Any]]:
    """The records at ``indices``; a shard that does not read is a one-line DamagedDataError."""
    try:
      return list(self.data_source().__getitems__(indices))
    except (RuntimeError, OSError) as e:  # array_record: 'Corrupted Riegeli/records file'
      shards = sorted({int(np.searchsorted(self._shards[1], i, side='right')) for i in indices})
      files = ', '.join(os.path.join(self.path, self._shards[0][min(k, len(self._shards[0]) - 1)])
                        for k in shards[:2]) + (f' (and {len(shards) - 2} more)'
                                                if len(shards) > 2 else '')
      raise DamagedDataError(f'{self.dataset}/{self.split}: the records of {files} do not read '
                             f'({_short(e)}): the converted set is damaged; convert it again: '
                             f'{self._rebuild}') from None

  def column(self, key: str) -> np.ndarray:
    if key not in self.features:
      raise ValueError(f'{self.dataset}/{self.split} ({self.path}) has no feature {key!r}; '
                       f'features: {sorted(self.features)}')
    values = np.empty(self._len, np.int64)
    for start in range(0, self._len, _LABEL_CHUNK):
      stop = min(self._len, start + _LABEL_CHUNK)
      values[start:stop] = [ex[key] for ex in self._records(list(range(start, stop)))]
    return values


class MemorySplit:
  """A split held in memory: a list of feature dicts (as ``TfdsSplit.read`` returns)."""

  def __init__(self, dataset: str, split: str, examples: Sequence[Mapping[str, Any]],
               num_ids: int | None = None):
    self.dataset = dataset
    self.split = split
    self.examples = [dict(e) for e in examples]
    self.features = frozenset(self.examples[0]) if self.examples else frozenset()
    self.num_ids = num_ids

  def __len__(self) -> int:
    return len(self.examples)

  def __repr__(self) -> str:
    return f'MemorySplit({self.dataset}/{self.split}, {len(self.examples)} examples)'

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self.examples[int(i)] for i in indices]

  def column(self, key: str) -> np.ndarray:
    return np.asarray([e[key] for e in self.examples], np.int64)


def open_split(data_dir: str | os.PathLike, dataset: str, split: str) -> TfdsSplit:
  """Opens ``split`` of the converted ``dataset`` under ``data_dir`` (clear error if absent)."""
  catalog.get(dataset)  # unknown names fail here, listing the known ones
  return TfdsSplit(builder_dir(data_dir, dataset), split, dataset=dataset)


def open_train_split(data_dir: str | os.PathLike, dataset: str) -> TfdsSplit:
  """The train split of ``dataset`` (the split named by the catalog)."""
  info = catalog.get(dataset)
  if info.train_split is None:
    raise ValueError(f'{dataset!r} is a test-only set and has no train split')
  return open_split(data_dir, dataset, info.train_split)


class TaskSource:
  """The train splits of one task's datasets in one label space (config order).

  Records are numbered ``0..num_records-1`` over the task: dataset ``i``'s
  record ``r`` is task record ``record_offsets[i] + r``; its label is the
  record's ``label`` + ``label_offsets[i]``.
  """

  def __init__(self, task: str, splits: Sequence[Split]):
    if not splits:
      raise ValueError(f'task {task!r} has no datasets')
    self.task = task
    self.splits = list(splits)
    for s in self.splits:
      if s.num_ids is None or s.num_ids < 1:
        raise ValueError(f'{s!r}: unknown number of train identities (the converted data has no '
                         "metadata['num_ids'] for this split); convert it again with data_prep")
      if len(s) == 0:
        raise ValueError(f'{s!r} holds no examples')
    self.sizes = np.array([len(s) for s in self.splits], np.int64)
    self.record_offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
    ids = np.array([s.num_ids for s in self.splits], np.int64)
    self.label_offsets = np.concatenate([[0], np.cumsum(ids)]).astype(np.int64)
    self.num_records = int(self.record_offsets[-1])
    self.num_classes = int(self.label_offsets[-1])

  @property
  def dataset_names(self) -> list[str]:
    return [s.dataset for s in self.splits]

  def locate(self, record: int) -> tuple[int, int]:
    """(dataset position, record index in that dataset) of task record ``record``."""
    d = int(np.searchsorted(self.record_offsets, record, side='right')) - 1
    return d, int(record - self.record_offsets[d])

  def labels(self) -> np.ndarray:
    """Task labels of all task records (reads the label column only; checks its range)."""
    out = []
    for d, s in enumerate(self.splits):
      lab = s.column('label')
      bad = (lab < 0) | (lab >= s.num_ids)
      if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f'{s!r}: record {r} has label {lab[r]}, outside 0..{s.num_ids - 1} '
                         "(metadata['num_ids']); the conversion is inconsistent")
      out.append(lab + self.label_offsets[d])
    return np.concatenate(out).astype(np.int64)

  def read(self, records: Sequence[int]) -> list[tuple[bytes, int, int, int]]:
    """(image bytes, task label, dataset position, dataset record) of each task record."""
    records = np.asarray(records, np.int64)
    ds_pos = np.searchsorted(self.record_offsets, records, side='right') - 1
    out: list[Any] = [None] * len(records)
    for d in np.unique(ds_pos):
      where = np.flatnonzero(ds_pos == d)
      split = self.splits[int(d)]
      local = records[where] - self.record_offsets[d]
      for j, r, ex in zip(where, local.tolist(), split.read(local.tolist())):
        label = int(ex['label'])
        if not 0 <= label < split.num_ids:
          raise ValueError(f'{split!r}: record {r} has label {label}, outside '
                           f'0..{split.num_ids - 1}; the conversion is inconsistent')
        out[j] = (ex['image'], label + int(self.label_offsets[d]), int(d), r)
    return out


def open_task_sources(config, data_dir: str | os.PathLike) -> dict[str, TaskSource]:
  """One ``TaskSource`` per configured task (config order) over the converted train splits.

  Checks nothing about provenance: training opens its data through
  ``ufo_jax.data.pipeline.open_training_data``, which does that first.
  """
  return {task: TaskSource(task, [open_train_split(data_dir, name)
                                  for name in config.tasks[task].datasets])
          for task in config_lib.task_names(config)}
