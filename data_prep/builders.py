"""tensorflow-datasets builders that convert the raw datasets to ArrayRecord.

One ``GeneratorBasedBuilder`` per dataset (``BUILDERS[name]``), written with
``file_format='array_record'`` to ``<data_dir>/<name>/1.0.0/``. The raw folder
is the builder kwarg ``raw_dir`` (else ``DownloadConfig(manual_dir=...)``).
Examples keep the generation order (``disable_shuffling``).

Features (the contract the input pipeline and evaluation read):
  image sets: image (``tfds.features.Image``, HxWx3 uint8 when TFDS decodes it; stored as the
    original encoded bytes of the raw file, never re-encoded), id (int64,
    the dataset's identity number), label (int64, 0..C-1 over the sorted train
    ids; -1 outside train), camera (int64, -1 where none), path (Text, relative
    to the raw folder; ``train.rec#<key>`` for MS1M RecordIO).
  face pair sets (split ``test``): image_a, image_b (``tfds.features.Image``, original bytes),
    is_same (bool), index (int64, the pair index).
Metadata (``builder.info.metadata``): num_ids {split: distinct ids written},
num_listed, num_skipped, skipped (path, id, error; first 1000 per split),
num_classes, per-dataset facts (num_pairs, gallery_query_lines_dropped, ...), and
``provenance`` (``provenance()``): how the set was built (data_prep version, raw folder,
options, count check, counts per split, corrupt files skipped, the size and SHA-256 of every
shard file).

With a Beam runner in the DownloadConfig (``beam_runner`` / ``beam_options``)
``_generate_examples`` returns a Beam PTransform over chunks of the listing.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError

import data_prep
from data_prep import face_bin, layouts, recordio, ufo_archive
from ufo_jax import catalog

VERSION = '1.0.0'
MAX_SKIPPED_NAMES = 1000  # skipped files named in the metadata, per split
_METRICS_NAMESPACE = 'data_prep'


class CountMismatchError(ValueError):
  """The raw folder does not hold the catalog's full-size counts."""


class CorruptImageError(ValueError):
  """A corrupt or unreadable image while converting with ``strict``."""


def check_image(data: bytes) -> str | None:
  """Returns why ``data`` is not a decodable image, or None if it decodes.

  JPEGs are decoded in draft mode (1/8 scale), which still reads every
  entropy-coded block, so truncated or garbled files are caught cheaply.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.format == 'JPEG':
        img.draft('RGB', (max(1, img.width // 8), max(1, img.height // 8)))
      img.load()
  except UnidentifiedImageError:
    return 'not a recognised image format'
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
    return f'{type(e).__name__}: {e}'
  return None


@dataclasses.dataclass(frozen=True)
class Skip:
  """An image that was not converted: where, whose, and why."""

  path: str
  id: int
  error: str


def _bad(name: str, strict: bool, path: str, id_: int, error: str) -> Skip:
  if strict:
    raise CorruptImageError(f'{name}: corrupt or unreadable image {path!r}: {error} '
                            '(drop --strict to skip such images)')
  return Skip(path, id_, error)


Item = tuple  # one unit of work of a processor (see the processors below)
_KEY_RANGE = 2**128  # tfds example keys (and its shuffle buckets) span 128 bits


def order_key(index: int, count: int) -> int:
  """The tfds example key of item ``index`` of ``count``: ordered and spread out.

  With ``disable_shuffling`` tfds sorts a split by key. Its local (non-Beam) writer keeps
  up to 1 GB in memory, then files examples into 1000 buckets by
  ``key * 1000 // 2**128`` and sorts one bucket at a time in memory: small keys
  would all share bucket 0 (all of MS1M in memory). Keys spread over the range
  keep the order and each bucket about 1/1000 of the data. (The Beam writer
  shards by key range itself and its coders need int64 keys: Beam uses ``index``.)
  """
  return index * (_KEY_RANGE // (count + 1))


@dataclasses.dataclass(frozen=True)
class _FileImages:
  """Items (index, path, id, label, camera) -> examples, reading files under raw_dir."""

  name: str
  raw_dir: str
  strict: bool

  def __call__(self, items: Iterable[Item]) -> Iterator[Any]:
    for index, path, id_, label, camera in items:
      try:
        with open(os.path.join(self.raw_dir, path), 'rb') as f:
          data = f.read()
        error = check_image(data)
      except OSError as e:
        error = f'unreadable: {e}'
      if error:
        yield _bad(self.name, self.strict, path, id_, error)
        continue
      yield index, {'image': data, 'id': id_, 'label': label, 'camera': camera, 'path': path}


@dataclasses.dataclass(frozen=True)
class _RecordImages:
  """Items (index, record key, offset) -> examples; labels maps id -> label."""

  name: str
  rec_path: str
  strict: bool
  labels: dict[int, int]

  def __call__(self, items: Iterable[Item]) -> Iterator[Any]:
    with open(self.rec_path, 'rb', buffering=1 << 20) as f:
      for index, key, offset in items:
        path = f'train.rec#{key}'
        try:
          rec = recordio.read_at(f, offset, f'{self.rec_path} key {key}')
        except ValueError as e:
          yield _bad(self.name, self.strict, path, -1, str(e))
          continue
        id_ = int(rec.label[0])
        if id_ not in self.labels:
          raise ValueError(f'{self.rec_path}: key {key} has label {id_}, which no identity '
                           'record lists')
        error = check_image(rec.data)
        if error:
          yield _bad(self.name, self.strict, path, id_, error)
          continue
        yield index, {'image': rec.data, 'id': id_, 'label': self.labels[id_], 'camera': -1,
                      'path': path}


@dataclasses.dataclass(frozen=True)
class _FacePairs:
  """Items (index, pair index) -> pair examples (the .bin read by the safe unpickler)."""

  name: str
  bin_path: str
  strict: bool

  def __call__(self, items: Iterable[Item]) -> Iterator[Any]:
    images, same = face_bin.load_bin(self.bin_path)
    for index, i in items:
      a, b = images[2 * i], images[2 * i + 1]
      error = check_image(a) or check_image(b)
      if error:
        yield _bad(self.name, self.strict, f'{os.path.basename(self.bin_path)}#pair{i}', -1,
                   error)
        continue
      yield index, {'image_a': a, 'image_b': b, 'is_same': same[i], 'index': i}


@dataclasses.dataclass(frozen=True)
class _BeamRun:
  """Runs a processor on one chunk inside Beam; skips become Beam metrics."""

  processor: Any
  split: str

  def __call__(self, chunk: Sequence[Item]) -> Iterator[tuple[int, dict[str, Any]]]:
    from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top

    for out in self.processor(chunk):
      if isinstance(out, Skip):
        Metrics.counter(_METRICS_NAMESPACE, f'{self.split}/num_skipped').inc()
        Metrics.string_set(_METRICS_NAMESPACE, f'{self.split}/skipped').add(
            json.dumps([out.path, out.id, out.error]))
        continue
      yield out


def image_feature() -> tfds.features.Image:
  """An RGB image stored as given: ``Image.encode_example`` keeps ``bytes`` unchanged (only
  numpy arrays and PIL images would be encoded), so the raw JPEG/PNG bytes are what is stored."""
  return tfds.features.Image(shape=(None, None, 3))


def _image_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': image_feature(),
      'id': tfds.features.Scalar(dtype=np.int64),
      'label': tfds.features.Scalar(dtype=np.int64),
      'camera': tfds.features.Scalar(dtype=np.int64),
      'path': tfds.features.Text(),
  })


def _pair_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image_a': image_feature(),
      'image_b': image_feature(),
      'is_same': tfds.features.Scalar(dtype=np.bool_),
      'index': tfds.features.Scalar(dtype=np.int64),
  })


@dataclasses.dataclass
class _SplitPlan:
  """What one split converts: the processor, its items, and the listed id counts."""

  processor: Any
  items: Any  # an iterable of items (a generator for the local path)
  chunks: Any  # a callable returning a list of item chunks (for Beam)
  id_counts: dict[int, int]
  num_listed: int  # images (2 per pair for face sets)
  num_items: int  # examples if none is skipped


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: raw folder, count check, corrupt images, metadata, Beam."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Conversion of the published raw release (docs/DATA.md).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the dataset in its published layout and pass its folder as raw_dir '
      '(python -m data_prep.build --dataset=NAME --raw_dir=DIR); see docs/DATA.md.')
  pairs = False

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (tfds' default lookup needs the optional ``importlib_resources``.)"""
    return epath.Path(__file__)

  def __init__(self, *, raw_dir: str | os.PathLike | None = None, strict: bool = False,
               check_counts: bool = False, beam_chunk_size: int = 2000, **kwargs):
    """``raw_dir``: the raw folder; ``strict``: a corrupt image is an error;
    ``check_counts``: compare the listing with catalog.py before converting."""
    self._raw_dir = None if raw_dir is None else os.fspath(raw_dir)
    self._strict = strict
    self._check_counts = check_counts
    self._chunk = beam_chunk_size
    self._use_beam = False
    self._plans: dict[str, _SplitPlan] = {}
    self._skipped: dict[str, list[Skip]] = {}
    self._extra: dict[str, Any] = {}
    self._raw_used: str | None = None  # the raw folder (or .bin) actually read
    self._count_problems: list[str] = []  # differences of the listing from catalog.py
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.dataset_info().description,
        features=_pair_features() if self.pairs else _image_features(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def dataset_info(self) -> catalog.DatasetInfo:
    """What ufo_jax.catalog knows of this set (a custom set's builder says it itself)."""
    return catalog.get(self.name)

  def count_problems(self, found: dict[str, tuple[int, int]],
                     absent: Sequence[str] = ()) -> list[str]:
    """How the listing ``found`` {split: (images, ids)} differs from the published counts."""
    return count_differences(self.name, found, absent=absent)

  def _raw(self, dl_manager: tfds.download.DownloadManager) -> str:
    return self._raw_dir if self._raw_dir is not None else os.fspath(dl_manager.manual_dir)

  @abc.abstractmethod
  def _plan(self, raw_dir: str) -> dict[str, _SplitPlan]:
    """Returns {split: _SplitPlan} for the raw folder (or .bin) ``raw_dir``."""

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    self._use_beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
    super()._download_and_prepare(dl_manager, download_config)
    self._finalize_metadata()

  def _split_generators(self, dl_manager):
    self._raw_used = os.path.abspath(self._raw(dl_manager))
    self._plans = self._plan(self._raw(dl_manager))
    self._skipped = {split: [] for split in self._plans}
    for split, plan in self._plans.items():
      if not plan.num_items:
        raise ValueError(f'{self.name}/{split}: the raw data lists no images '
                         f'({self._raw(dl_manager)})')
    found = {s: (p.num_listed, len(p.id_counts)) for s, p in self._plans.items()}
    absent = tuple(self._extra.get('absent_splits', ()))  # a train split UFO's test archive lacks
    self._count_problems = self.count_problems(found, absent)
    if self._check_counts:
      check_counts(self.name, found, absent=absent)
    return {split: self._generate_examples(split) for split in self._plans}

  def _generate_examples(self, split: str):
    plan = self._plans[split]
    if self._use_beam:
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
      return (beam.Create(plan.chunks()) | beam.Reshuffle()
              | beam.FlatMap(_BeamRun(plan.processor, split)))
    return self._local(split, plan)

  def _local(self, split: str, plan: _SplitPlan) -> Iterator[tuple[int, dict[str, Any]]]:
    written = 0
    for out in plan.processor(plan.items):
      if isinstance(out, Skip):
        self._skipped[split].append(out)
        continue
      written += 1
      yield order_key(out[0], plan.num_items), out[1]
    if not written:
      first = self._skipped[split][0]
      raise ValueError(f'{self.name}/{split}: all {plan.num_items} listed examples are corrupt '
                       f'or unreadable, e.g. {first.path}: {first.error}')

  def _process_pipeline_result(self, pipeline_result) -> None:
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top

    results = pipeline_result.metrics().query(
        MetricsFilter().with_namespace(_METRICS_NAMESPACE))
    for res in results.get('string_sets', []):
      split = res.key.metric.name.split('/')[0]
      values = res.committed if res.committed is not None else res.attempted
      self._skipped.setdefault(split, []).extend(Skip(*json.loads(v)) for v in values or ())

  def _finalize_metadata(self) -> None:
    md = self.info.metadata
    skipped = {s: sorted(v, key=lambda k: k.path) for s, v in self._skipped.items()}
    md['num_listed'] = {s: p.num_listed for s, p in self._plans.items()}
    # Exact on every runner (Beam metrics may be missing or capped): listed - written.
    md['num_skipped'] = {s: p.num_items - self.info.splits[s].num_examples
                         for s, p in self._plans.items()}
    md['skipped'] = {s: [dataclasses.asdict(k) for k in skipped.get(s, [])[:MAX_SKIPPED_NAMES]]
                     for s in self._plans}
    if not self.pairs:
      num_ids = {}
      for split, plan in self._plans.items():
        left = collections.Counter(plan.id_counts)
        left.subtract(k.id for k in skipped.get(split, []))
        num_ids[split] = sum(1 for n in left.values() if n > 0)
      md['num_ids'] = num_ids
      train = self.dataset_info().train_split
      md['num_classes'] = len(self._plans[train].id_counts) if train in self._plans else 0
    md.update(self._extra)
    md['provenance'] = self._provenance(md)

  def _provenance(self, md: dict[str, Any]) -> dict[str, Any]:
    """How this set was built (see ``provenance``); written last, so its presence in a
    finished output means the conversion completed."""
    counts = {}
    for split, plan in self._plans.items():
      counts[split] = {
          'images': plan.num_listed,  # listed in the raw data (2 per pair for face sets)
          'ids': None if self.pairs else len(plan.id_counts),  # listed identities
          'examples': int(self.info.splits[split].num_examples),  # written (pairs for faces)
          'skipped': int(md['num_skipped'][split]),  # corrupt or unreadable, left out
      }
    return {
        'data_prep_version': data_prep.__version__,
        'tfds_version': tfds.__version__,
        'raw_dir': self._raw_used,
        'options': {'strict': self._strict, 'skip_count_check': not self._check_counts},
        'count_check': {'ran': self._check_counts, 'passed': not self._count_problems,
                        'differences': list(self._count_problems)},
        'counts': counts,
        'absent_splits': list(self._extra.get('absent_splits', ())),  # UFO's test archive
        'skipped_files': {s: [k['path'] for k in v] for s, v in md['skipped'].items()},
        'built_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'shards': {s: shard_records(os.fspath(self.data_dir), self.info.splits[s].filenames)
                   for s in self._plans},
        'complete': True,
    }


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  """The SHA-256 of a file (hex), read in 4 MiB chunks (about 1.8 GB/s with SHA-NI)."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def shard_records(folder: str, filenames: Sequence[str]) -> list[dict[str, Any]]:
  """``[{file, bytes, sha256}]`` of the shard files of one split, recorded at build time so that
  a truncated or damaged shard is not reused (``data_prep.build.shard_differences``)."""
  out = []
  for name in filenames:
    full = epath.Path(folder) / name
    out.append({'file': name, 'bytes': full.stat().length, 'sha256': file_sha256(full)})
  return out


def _chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
  return [list(items[i:i + size]) for i in range(0, len(items), size)]


def label_map(train_ids: Iterable[int]) -> dict[int, int]:
  """{id: label}: labels 0..C-1 in sorted order of the distinct train ids."""
  return {id_: i for i, id_ in enumerate(sorted(set(train_ids)))}


class ListedImageBuilder(_Builder, skip_registration=True):
  """Datasets whose listing comes from ``layouts.LISTERS`` (files on disk)."""

  def _listing(self, raw_dir: str) -> layouts.Listing:
    layouts.require_dir(raw_dir, self.name)
    archived = ufo_archive.listing(self.name, raw_dir)  # UFO's test archive layout
    return archived if archived is not None else layouts.LISTERS[self.name](raw_dir)

  def _plan(self, raw_dir: str) -> dict[str, _SplitPlan]:
    listing = self._listing(raw_dir)
    self._extra = dict(listing.extra)
    train = self.dataset_info().train_split
    labels = label_map(e.id for e in listing.splits[train]) if train in listing.splits else {}
    processor = _FileImages(self.name, raw_dir, self._strict)
    plans = {}
    for split, entries in listing.splits.items():
      items = [(k, e.path, e.id, labels[e.id] if split == train else -1, e.camera)
               for k, e in enumerate(entries)]
      plans[split] = _SplitPlan(
          processor, items, lambda items=items: _chunks(items, self._chunk),
          dict(collections.Counter(e.id for e in entries)), len(entries), len(entries))
    return plans


class Ms1mv3(ListedImageBuilder, skip_registration=True):
  """MS1M-V3 (insightface ms1m-retinaface-t1): train.rec + train.idx, or ``<id>/*.jpg``."""

  name = 'ms1mv3'

  def _listing(self, raw_dir: str) -> layouts.Listing:
    return layouts.list_ms1m_folder(raw_dir)

  def _plan(self, raw_dir: str) -> dict[str, _SplitPlan]:
    layouts.require_dir(raw_dir, self.name)
    if not os.path.exists(os.path.join(raw_dir, 'train.rec')) and any(
        e.is_dir() for e in os.scandir(raw_dir)):
      return super()._plan(raw_dir)  # the folder form <id>/*.jpg
    rec = layouts.list_ms1m_recordio(raw_dir)
    self._extra = {'raw_format': 'recordio', 'recordio_header': list(rec.header or ())}
    processor = _RecordImages(self.name, rec.rec_path, self._strict, label_map(rec.id_counts))
    keys, offsets = rec.image_keys, rec.image_offsets

    n = len(keys)

    def chunks() -> list[list[Item]]:
      triples = [(i, k, o) for i, (k, o) in enumerate(zip(keys.tolist(), offsets.tolist()))]
      return _chunks(triples, self._chunk)

    items = ((i, int(k), int(o)) for i, (k, o) in enumerate(zip(keys, offsets)))
    return {'train': _SplitPlan(processor, items, chunks, rec.id_counts, n, n)}


class Market1501(ListedImageBuilder, skip_registration=True):
  """Market-1501 (pid -1 junk dropped; pid 0 distractors kept in the gallery)."""

  name = 'market1501'


class Dukemtmc(ListedImageBuilder, skip_registration=True):
  """DukeMTMC-reID."""

  name = 'dukemtmc'


class Msmt17(ListedImageBuilder, skip_registration=True):
  """MSMT17_V1 (train = list_train.txt)."""

  name = 'msmt17'


class Veri776(ListedImageBuilder, skip_registration=True):
  """VeRi-776 (query images are also in the gallery, as released)."""

  name = 'veri776'


class Vehicleid(ListedImageBuilder, skip_registration=True):
  """PKU VehicleID (test = test_list_2400, plus test_800 and test_1600)."""

  name = 'vehicleid'


class Veriwild(ListedImageBuilder, skip_registration=True):
  """VeRi-Wild, large test split."""

  name = 'veriwild'


class Sop(ListedImageBuilder, skip_registration=True):
  """Stanford Online Products."""

  name = 'sop'


def find_face_bin(name: str, raw_dir: str) -> str:
  """The .bin of face set ``name``: raw_dir itself, raw_dir/<name>.bin, or
  raw_dir/ms1m-retinaface-t1/<name>.bin (insightface ships them with MS1M)."""
  if os.path.isfile(raw_dir):
    return raw_dir
  folder = catalog.get(name).raw_folder
  candidates = [os.path.join(raw_dir, folder),
                os.path.join(raw_dir, catalog.get('ms1mv3').raw_folder, folder)]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'{name}: face verification file not found; looked for '
                          f'{" and ".join(candidates)}')


def find_face_source(name: str, raw_dir: str) -> str:
  """UFO's ``faces_emore_val/<name>.filelist`` when there is one, else ``find_face_bin``."""
  filelist = ufo_archive.face_filelist(name, raw_dir)
  if filelist is not None:
    return filelist
  try:
    return find_face_bin(name, raw_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e} (or UFO\'s {ufo_archive.FACE_FOLDER}/{name}.filelist)') from None


@dataclasses.dataclass(frozen=True)
class _FileFacePairs:
  """Items (index, pair index) -> pair examples from two image files each (UFO's archive)."""

  name: str
  folder: str
  pairs: tuple[tuple[str, str], ...]
  same: tuple[bool, ...]
  strict: bool

  def __call__(self, items: Iterable[Item]) -> Iterator[Any]:
    for index, i in items:
      data, error = [], None
      for rel in self.pairs[i]:
        try:
          with open(os.path.join(self.folder, rel), 'rb') as f:
            data.append(f.read())
          error = error or check_image(data[-1])
        except OSError as e:
          error = f'unreadable: {e}'
      if error:
        yield _bad(self.name, self.strict, f'{self.pairs[i][0]}#pair{i}', -1, error)
        continue
      yield index, {'image_a': data[0], 'image_b': data[1], 'is_same': self.same[i], 'index': i}


class _FaceBuilder(_Builder, skip_registration=True):
  """insightface verification .bin (or UFO's .filelist): one example per pair, split ``test``."""

  pairs = True

  def _plan(self, raw_dir: str) -> dict[str, _SplitPlan]:
    filelist = ufo_archive.face_filelist(self.name, raw_dir)
    if filelist is not None:  # UFO's test archive: image files + <name>_label.npy
      pairs, same = ufo_archive.face_pairs(self.name, filelist)
      self._extra = {'num_pairs': len(same), 'num_same': int(sum(same)),
                     'filelist': os.path.basename(filelist), 'layout': 'ufo_test_archive'}
      items = [(i, i) for i in range(len(same))]
      processor = _FileFacePairs(self.name, os.path.dirname(filelist), tuple(pairs),
                                 tuple(same), self._strict)
      return {'test': _SplitPlan(processor, items, lambda: _chunks(items, self._chunk), {},
                                 2 * len(same), len(same))}
    path = find_face_bin(self.name, raw_dir)
    _, same = face_bin.load_bin(path)
    self._extra = {'num_pairs': len(same), 'num_same': int(sum(same)),
                   'bin_file': os.path.basename(path)}
    items = [(i, i) for i in range(len(same))]
    # Count check: pairs of a face set are counted as 2 images each.
    return {'test': _SplitPlan(_FacePairs(self.name, path, self._strict), items,
                               lambda: _chunks(items, self._chunk), {}, 2 * len(same),
                               len(same))}


def _face_class(name: str) -> type[_FaceBuilder]:
  cls_name = ''.join(p.capitalize() for p in name.split('_'))
  return type(cls_name, (_FaceBuilder,), {'name': name, '__doc__': catalog.get(name).description},
              skip_registration=True)


BUILDERS: dict[str, type[_Builder]] = {
    c.name: c for c in (Ms1mv3, Market1501, Dukemtmc, Msmt17, Veri776, Vehicleid, Veriwild, Sop)}
BUILDERS.update({n: _face_class(n) for n in ('lfw', 'cfp_fp', 'cfp_ff', 'agedb_30', 'calfw',
                                             'cplfw')})


def count_differences(name: str, found: dict[str, tuple[int, int]],
                      absent: Sequence[str] = ()) -> list[str]:
  """How ``found`` {split: (images, ids)} differs from catalog.py (empty: it matches).

  Face sets count 2 images per pair and have no ids. ``absent``: splits known to be left out
  (the train split of UFO's test archive), not counted as missing.
  """
  info = catalog.get(name)
  problems = []
  for split, expected in info.splits.items():
    if split in absent and split not in found:
      continue
    if split not in found:
      problems.append(f'split {split!r} is missing')
      continue
    images, ids = found[split]
    if images != expected.images:
      problems.append(f'split {split!r}: expected {expected.images} images, found {images}')
    if expected.ids is not None and ids != expected.ids:
      problems.append(f'split {split!r}: expected {expected.ids} ids, found {ids}')
  return problems


def check_counts(name: str, found: dict[str, tuple[int, int]],
                 absent: Sequence[str] = ()) -> None:
  """Raises CountMismatchError when ``found`` {split: (images, ids)} differs from catalog.py."""
  problems = count_differences(name, found, absent)
  if problems:
    raise CountMismatchError(
        f'{name}: the raw data does not match the full-size release ('
        + '; '.join(problems) + '). A wrong or partial download? Pass --skip_count_check '
        'to convert it anyway.')
