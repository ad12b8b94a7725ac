"""Parsers of the raw layouts of docs/DATA.md: which file is which identity and camera.

Each ``list_<dataset>(raw_dir)`` returns a ``Listing``: per split, the images
in the order they are converted (folder datasets: sorted file names; list-file
datasets: the list order), with their identity as the dataset numbers it and
their camera (-1 where there is none). Nothing here reads image bytes; a
missing folder or list file raises ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Callable, Iterable

import numpy as np

from data_prep import recordio

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
  """One image: path relative to the raw folder, identity, camera (-1: none)."""

  path: str
  id: int
  camera: int = -1


@dataclasses.dataclass
class Listing:
  """The images of every split, and extra facts for the metadata."""

  splits: dict[str, list[Entry]]
  extra: dict[str, object] = dataclasses.field(default_factory=dict)


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{what}: folder not found: {path}')
  return path


def require_file(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what}: file not found: {path}')
  return path


def _read_lines(path: str, what: str, header: bool = False) -> list[tuple[int, str]]:
  """Non-empty stripped lines with their 1-based line numbers."""
  with open(require_file(path, what)) as f:
    lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
  return lines[1:] if header else lines


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTS)


def _folder(raw_dir: str, sub: str, what: str, parse: Callable[[str], tuple[int, int] | None],
            ignored: list[str]) -> list[Entry]:
  """Entries of a flat image folder, sorted by name; ``parse`` -> (id, camera) or None."""
  folder = require_dir(os.path.join(raw_dir, sub), what)
  out = []
  for name in sorted(os.listdir(folder)):
    if not _is_image(name):
      ignored.append(f'{sub}/{name}')
      continue
    parsed = parse(name)
    if parsed is not None:
      out.append(Entry(f'{sub}/{name}', *parsed))
  return out


_MARKET_RE = re.compile(r'([-\d]+)_c(\d)')


def _market_like(raw_dir: str, name: str) -> Listing:
  """Market-1501 / DukeMTMC-reID: pid -1 (junk) dropped, pid 0 (distractors) kept."""
  ignored: list[str] = []
  junk: list[str] = []

  def parse(fname: str) -> tuple[int, int] | None:
    m = _MARKET_RE.search(fname)
    if m is None:
      raise ValueError(f'{name}: file name {fname!r} does not match <pid>_c<camera>')
    pid, cam = int(m.group(1)), int(m.group(2))
    if pid == -1:
      junk.append(fname)
      return None
    return pid, cam

  splits = {
      'train': _folder(raw_dir, 'bounding_box_train', name, parse, ignored),
      'query': _folder(raw_dir, 'query', name, parse, ignored),
      'gallery': _folder(raw_dir, 'bounding_box_test', name, parse, ignored),
  }
  return Listing(splits, {'ignored_files': ignored, 'num_junk_dropped': len(junk)})


def list_market1501(raw_dir: str) -> Listing:
  return _market_like(raw_dir, 'market1501')


def list_dukemtmc(raw_dir: str) -> Listing:
  return _market_like(raw_dir, 'dukemtmc')


def list_msmt17(raw_dir: str, folders: tuple[str, str] = ('train', 'test')) -> Listing:
  """MSMT17_V1: list_{train,query,gallery}.txt (``path pid``); camera from the name.

  ``folders``: the train and test image folders (MSMT17_V2: ``mask_train_v2``, ``mask_test_v2``).
  """
  splits = {}
  for split, folder in (('train', folders[0]), ('query', folders[1]), ('gallery', folders[1])):
    require_dir(os.path.join(raw_dir, folder), 'msmt17')
    list_path = os.path.join(raw_dir, f'list_{split}.txt')
    entries = []
    for n, line in _read_lines(list_path, 'msmt17'):
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f'{list_path}:{n}: expected "<path> <pid>", got {line!r}')
      fields = os.path.basename(parts[0]).split('_')
      if len(fields) < 3 or not fields[2].isdigit():
        raise ValueError(f'{list_path}:{n}: cannot read the camera from {parts[0]!r}')
      entries.append(Entry(f'{folder}/{parts[0]}', int(parts[1]), int(fields[2])))
    splits[split] = entries
  return Listing(splits)


_VERI_RE = re.compile(r'(\d+)_c(\d\d\d)')


def list_veri776(raw_dir: str) -> Listing:
  """VeRi: image_{train,query,test}; the query images also appear in image_test."""
  ignored: list[str] = []

  def parse(fname: str) -> tuple[int, int]:
    m = _VERI_RE.search(fname)
    if m is None:
      raise ValueError(f'veri776: file name {fname!r} does not match <vid>_c<ccc>')
    return int(m.group(1)), int(m.group(2))

  splits = {split: _folder(raw_dir, sub, 'veri776', parse, ignored)
            for split, sub in (('train', 'image_train'), ('query', 'image_query'),
                               ('gallery', 'image_test'))}
  return Listing(splits, {'ignored_files': ignored})


def list_vehicleid(raw_dir: str) -> Listing:
  """VehicleID: image/<imgid>.jpg, train_test_split lists of ``<imgid> <vid>``; no camera."""
  require_dir(os.path.join(raw_dir, 'image'), 'vehicleid')
  splits = {}
  for split, fname in (('train', 'train_list.txt'), ('test', 'test_list_2400.txt'),
                       ('test_800', 'test_list_800.txt'), ('test_1600', 'test_list_1600.txt')):
    path = os.path.join(raw_dir, 'train_test_split', fname)
    entries = []
    for n, line in _read_lines(path, 'vehicleid'):
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f'{path}:{n}: expected "<imgid> <vid>", got {line!r}')
      entries.append(Entry(f'image/{parts[0]}.jpg', int(parts[1])))
    splits[split] = entries
  return Listing(splits)


def list_veriwild(raw_dir: str, test_size: int = 10000, query_list: str | None = None,
                  gallery_list: str | None = None) -> Listing:
  """VERI-Wild, large test split: gallery = test_10000.txt minus the query lines.

  ``test_10000.txt`` lists the whole test set, query images included (138,517
  lines = 10,000 query + 128,517 gallery); the query lines are dropped from the
  gallery (they would be removed by the same-id-same-camera rule anyway). The
  camera comes from ``vehicle_info.txt`` (a header line, then ``vid/imgid;camid;...``; a
  first line that is already such an entry is read as one). ``query_list`` /
  ``gallery_list`` name other list files (UFO's test archive: ``test_10000_id_query.txt``,
  ``test_10000_id.txt``); list lines may end in ``.jpg``.
  """
  split_dir = os.path.join(raw_dir, 'train_test_split')
  require_dir(os.path.join(raw_dir, 'images'), 'veriwild')
  info_path = os.path.join(split_dir, 'vehicle_info.txt')
  cameras = {}
  for n, line in _read_lines(info_path, 'veriwild'):
    fields = line.split(';')
    if n == 1 and (len(fields) < 2 or not fields[1].strip().isdigit()):
      continue  # the header line
    if len(fields) < 2 or not fields[1].strip().isdigit():
      raise ValueError(f'{info_path}:{n}: expected "vid/imgid;camid;...", got {line!r}')
    cameras[fields[0].strip()] = int(fields[1])

  def read(fname: str) -> list[str]:
    lines = [line for _, line in _read_lines(os.path.join(split_dir, fname), 'veriwild')]
    return [k[:-4] if k.lower().endswith('.jpg') else k for k in lines]

  def entries(keys: Iterable[str], fname: str) -> list[Entry]:
    out = []
    for key in keys:
      if key not in cameras:
        raise ValueError(f'veriwild: {key!r} of {fname} has no camera in {info_path}')
      out.append(Entry(f'images/{key}.jpg', int(key.split('/')[0]), cameras[key]))
    return out

  qname = query_list or f'test_{test_size}_query.txt'
  gname = gallery_list or f'test_{test_size}.txt'
  query = read(qname)
  qset = set(query)
  full = read(gname)
  gallery = [k for k in full if k not in qset]
  splits = {'train': entries(read('train_list.txt'), 'train_list.txt'),
            'query': entries(query, qname), 'gallery': entries(gallery, gname)}
  return Listing(splits, {'gallery_query_lines_dropped': len(full) - len(gallery)})


def list_sop(raw_dir: str) -> Listing:
  """Stanford Online Products: Ebay_{train,test}.txt (header, ``image_id class_id super path``)."""
  splits = {}
  for split in ('train', 'test'):
    path = os.path.join(raw_dir, f'Ebay_{split}.txt')
    entries = []
    for n, line in _read_lines(path, 'sop', header=True):
      parts = line.split()
      if len(parts) != 4:
        raise ValueError(f'{path}:{n}: expected "image_id class_id super_class_id path", '
                         f'got {line!r}')
      entries.append(Entry(parts[3], int(parts[1])))
    splits[split] = entries
  return Listing(splits)


def list_ms1m_folder(raw_dir: str) -> Listing:
  """The folder form of MS1M: ``<id>/*.jpg`` (numeric ids, sorted)."""
  ids = []
  for name in os.listdir(raw_dir):
    if os.path.isdir(os.path.join(raw_dir, name)):
      if not name.isdigit():
        raise ValueError(f'ms1mv3: folder {name!r} in {raw_dir} is not a numeric identity')
      ids.append(name)
  entries = []
  for name in sorted(ids, key=int):
    for fname in sorted(os.listdir(os.path.join(raw_dir, name))):
      if _is_image(fname):
        entries.append(Entry(f'{name}/{fname}', int(name)))
  return Listing({'train': entries}, {'raw_format': 'folder'})


@dataclasses.dataclass
class RecordIOListing:
  """MS1M as train.rec + train.idx: image keys/offsets and per-identity image counts."""

  rec_path: str
  idx_path: str
  image_keys: np.ndarray  # int64, in conversion order
  image_offsets: np.ndarray  # int64 byte offsets of image_keys in train.rec
  id_counts: dict[int, int]  # identity -> number of images
  header: tuple[int, int] | None  # labels of record 0: (first identity key, end key)


def list_ms1m_recordio(raw_dir: str) -> RecordIOListing:
  """Reads train.idx and the header/identity records (not the images).

  With a header record (key 0, labels (a, b)): images are keys [1, a) and the
  identities are the records [a, b), each giving its image key range; the
  identity number is the label of its first image. Without one, every key is an
  image and the headers of all images are read to find the identities.
  """
  rec_path = require_file(os.path.join(raw_dir, 'train.rec'), 'ms1mv3')
  idx_path = require_file(os.path.join(raw_dir, 'train.idx'), 'ms1mv3')
  keys, offsets = recordio.read_index_arrays(idx_path)
  if not len(keys):
    raise ValueError(f'{idx_path}: empty index')

  def offsets_of(wanted: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    missing = wanted[keys[pos] != wanted]
    if len(missing):
      raise ValueError(f'{idx_path}: keys {missing[:5].tolist()} are missing from the index')
    return offsets[pos]

  counts: collections.Counter[int] = collections.Counter()
  with open(rec_path, 'rb') as f:
    head = recordio.read_at(f, int(offsets[0]), rec_path) if keys[0] == 0 else None
    if head is not None and head.flag > 0 and len(head.label) >= 2:
      a, b = int(head.label[0]), int(head.label[1])
      image_keys = np.arange(1, a, dtype=np.int64)
      image_offsets = offsets_of(image_keys)
      ident_offsets = offsets_of(np.arange(a, b, dtype=np.int64))
      for key, off in zip(range(a, b), ident_offsets.tolist()):
        rec = recordio.read_at(f, off, f'{rec_path} key {key}')
        if len(rec.label) < 2:
          raise ValueError(f'{rec_path}: identity record {key} has no (start, end) labels')
        start, end = int(rec.label[0]), int(rec.label[1])
        if end > start:
          first = int(offsets_of(np.array([start], np.int64))[0])
          counts[int(recordio.read_at(f, first, f'{rec_path} key {start}').label[0])] += end - start
      if sum(counts.values()) != len(image_keys):
        raise ValueError(f'{rec_path}: identity records cover {sum(counts.values())} images, '
                         f'the header record says {len(image_keys)}')
      return RecordIOListing(rec_path, idx_path, image_keys, image_offsets, dict(counts), (a, b))
    skip_first = head is not None and not head.data
    image_keys, image_offsets = (keys[1:], offsets[1:]) if skip_first else (keys, offsets)
    for key, off in zip(image_keys.tolist(), image_offsets.tolist()):
      counts[int(recordio.read_at(f, off, f'{rec_path} key {key}').label[0])] += 1
  return RecordIOListing(rec_path, idx_path, image_keys, image_offsets, dict(counts), None)


LISTERS: dict[str, Callable[[str], Listing]] = {
    'market1501': list_market1501, 'dukemtmc': list_dukemtmc, 'msmt17': list_msmt17,
    'veri776': list_veri776, 'vehicleid': list_vehicleid, 'veriwild': list_veriwild,
    'sop': list_sop,
}
