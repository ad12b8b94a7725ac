"""Tests of data_prep: raw layouts -> tfds ArrayRecord, against the generator's truth."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import pickle
import re
import shutil
import socket
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_prep
from data_prep import build, builders, face_bin, generate, layouts, recordio
from ufo_jax import catalog

SIZES = generate.Sizes(num_ids=4, num_test_ids=3, images_per_id=3, image_size=24, num_pairs=10)
IMAGE_SETS = ('ms1mv3', 'market1501', 'dukemtmc', 'msmt17', 'veri776', 'vehicleid', 'veriwild',
              'sop')
IMAGE_FIELDS = {'image', 'id', 'label', 'camera', 'path'}
PAIR_FIELDS = {'image_a', 'image_b', 'is_same', 'index'}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """Every dataset generated in its raw layout and converted once (no count check)."""
  raw = tmp_path_factory.mktemp('raw')
  out = tmp_path_factory.mktemp('out')
  gens, summaries = {}, {}
  for name in catalog.DATASETS:
    gens[name] = generate.write_dataset(name, raw, seed=1, sizes=SIZES)
    raw_dir = str(raw) if name in generate.FACE_SETS else gens[name].path
    summaries[name] = build.convert(name, raw_dir, out, skip_count_check=True)
  return raw, out, gens, summaries


def _read(out, name, split):
  """The split through TFDS's data source, the images left as their stored (encoded) bytes."""
  skip = tfds.decode.SkipDecoding
  decoders = {k: skip() for k in ('image_a', 'image_b')} if name in generate.FACE_SETS else {
      'image': skip()}
  return tfds.builder_from_directory(os.path.join(out, name, '1.0.0')).as_data_source(
      split, decoders=decoders)


@pytest.mark.parametrize('name', IMAGE_SETS)
def test_image_sets_match_generator_truth(converted, name):
  _, out, gens, summaries = converted
  gen = gens[name]
  info = catalog.get(name)
  assert set(gen.splits) == set(info.splits)
  train_ids = sorted({it.id for it in gen.splits[info.train_split]})
  builder = tfds.builder_from_directory(os.path.join(out, name, '1.0.0'))
  assert set(builder.info.splits) == set(info.splits)
  for split, items in gen.splits.items():
    ds = _read(out, name, split)
    assert len(ds) == len(items) > 0
    for k, item in enumerate(items):
      ex = ds[k]
      assert set(ex) == IMAGE_FIELDS
      assert isinstance(ex['image'], bytes) and isinstance(ex['path'], bytes)
      assert isinstance(ex['id'], int) and isinstance(ex['label'], int)
      assert ex['path'].decode() == item.path
      assert ex['id'] == item.id and ex['camera'] == item.camera
      expected_label = train_ids.index(item.id) if split == info.train_split else -1
      assert ex['label'] == expected_label
      assert ex['image'] == gen.images[item.path]  # the original bytes, not re-encoded
    md = builder.info.metadata
    assert md['num_ids'][split] == len({it.id for it in items})
    assert md['num_skipped'][split] == 0
    assert summaries[name].splits[split].examples == len(items)
  assert builder.info.metadata['num_classes'] == len(train_ids)


def test_market_junk_distractors_and_stray_files(converted):
  _, out, gens, _ = converted
  gallery = _read(out, 'market1501', 'gallery')
  ids = [gallery[i]['id'] for i in range(len(gallery))]
  assert 0 in ids and -1 not in ids
  raw_names = os.listdir(os.path.join(gens['market1501'].path, 'bounding_box_test'))
  assert any(n.startswith('-1_') for n in raw_names) and 'Thumbs.db' in raw_names
  md = tfds.builder_from_directory(os.path.join(out, 'market1501', '1.0.0')).info.metadata
  assert md['num_junk_dropped'] == 2
  assert 'bounding_box_test/Thumbs.db' in md['ignored_files']


def test_veri776_queries_also_in_gallery_and_veriwild_query_lines_dropped(converted):
  _, out, _, _ = converted
  q = _read(out, 'veri776', 'query')
  g = _read(out, 'veri776', 'gallery')
  gallery_names = {os.path.basename(g[i]['path']) for i in range(len(g))}
  assert all(os.path.basename(q[i]['path']) in gallery_names for i in range(len(q)))
  md = tfds.builder_from_directory(os.path.join(out, 'veriwild', '1.0.0')).info.metadata
  assert md['gallery_query_lines_dropped'] == SIZES.test_ids
  wq, wg = _read(out, 'veriwild', 'query'), _read(out, 'veriwild', 'gallery')
  assert not {wq[i]['path'] for i in range(len(wq))} & {wg[i]['path'] for i in range(len(wg))}


@pytest.mark.parametrize('name', generate.FACE_SETS)
def test_face_sets_pairs(converted, name):
  _, out, gens, _ = converted
  gen = gens[name]
  ds = _read(out, name, 'test')
  assert len(ds) == len(gen.pairs) == SIZES.num_pairs
  for i in range(len(ds)):
    ex = ds[i]
    assert set(ex) == PAIR_FIELDS
    assert ex['index'] == i and ex['is_same'] is gen.pairs[i]
    assert ex['image_a'] == gen.images[str(2 * i)] and ex['image_b'] == gen.images[str(2 * i + 1)]
  assert sum(gen.pairs) == len(gen.pairs) // 2


def test_face_bin_with_numpy_arrays_and_in_ms1m_folder(tmp_path):
  gen = generate.write_dataset('cfp_fp', tmp_path, sizes=SIZES, array_bins=True,
                               path=str(tmp_path / 'ms1m-retinaface-t1' / 'cfp_fp.bin'))
  with open(gen.path, 'rb') as f:
    obj = pickle.load(f)
  assert isinstance(obj[0][0], np.ndarray) and isinstance(obj[1], np.ndarray)
  assert builders.find_face_bin('cfp_fp', str(tmp_path)) == gen.path
  assert builders.find_face_bin('cfp_fp', gen.path) == gen.path  # the .bin itself
  images, same = face_bin.load_bin(gen.path)
  assert same == gen.pairs and images[3] == gen.images['3']
  summary = build.convert('cfp_fp', str(tmp_path), tmp_path / 'out', skip_count_check=True)
  assert summary.splits['test'].examples == SIZES.num_pairs


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'lfw.bin'
  with open(path, 'wb') as f:
    pickle.dump(([b'a', b'b'], [_Evil(marker)]), f)
  with pytest.raises(face_bin.UnsafePickleError, match=r'lfw\.bin.*(posix|os)\.system'):
    face_bin.load_bin(path)
  with pytest.raises(face_bin.UnsafePickleError):
    build.convert('lfw', str(tmp_path), tmp_path / 'out', skip_count_check=True)
  assert not marker.exists()
  # A plain pickle.load would have run it: the file really is hostile.
  with open(path, 'rb') as f:
    pickle.load(f)
  assert marker.exists()


def _expected_parts(payload: bytes) -> list[bytes]:
  """Reference split of a payload: at every 4-aligned magic occurrence, dropping it."""
  magic = struct.pack('<I', recordio.MAGIC)
  parts, start = [], 0
  for i in range(0, len(payload) // 4 * 4, 4):
    if payload[i:i + 4] == magic:
      parts.append(payload[start:i])
      start = i + 4
  return parts + [payload[start:]]


def test_recordio_split_records_round_trip(tmp_path):
  magic = struct.pack('<I', recordio.MAGIC)
  payloads = [
      b'',
      b'abc',
      b'abcd' + magic + b'efgh',  # one split: parts start/end
      magic + b'xyz',  # empty first part
      b'ab' + magic + b'cd',  # unaligned magic: no split
      b'1234' + magic + magic + b'5678' + magic,  # empty middle part, empty last part
  ]
  path = tmp_path / 'x.rec'
  with open(path, 'wb') as f:
    offsets = [recordio.write_record(f, p) for p in payloads]
  raw = path.read_bytes()
  # Independent parse of the bytes: headers, cflags, lengths, zero padding.
  pos, flags = 0, []
  for p in payloads:
    parts = _expected_parts(p)
    assert pos == offsets[payloads.index(p)]
    for j, part in enumerate(parts):
      m, lrec = struct.unpack_from('<II', raw, pos)
      assert m == recordio.MAGIC
      cflag = 0 if len(parts) == 1 else (1 if j == 0 else 3 if j == len(parts) - 1 else 2)
      assert lrec >> 29 == cflag and lrec & ((1 << 29) - 1) == len(part)
      flags.append(cflag)
      assert raw[pos + 8:pos + 8 + len(part)] == part
      padded = (len(part) + 3) // 4 * 4
      assert raw[pos + 8 + len(part):pos + 8 + padded] == b'\0' * (padded - len(part))
      pos += 8 + padded
  assert pos == len(raw) and {1, 2, 3} <= set(flags)
  assert list(recordio.iter_records(path)) == payloads
  with open(path, 'rb') as f:
    for off, p in zip(offsets, payloads):
      f.seek(off)
      assert recordio.read_record(f) == p


def test_recordio_pack_unpack_header():
  rec = recordio.unpack(recordio.pack(7.0, b'jpeg', id_=5))
  assert (rec.flag, rec.label, rec.id, rec.data) == (0, (7.0,), 5, b'jpeg')
  payload = recordio.pack([3.0, 9.0], b'img', id_=2, id2=4)
  assert struct.unpack_from('<IfQQ', payload) == (2, 0.0, 2, 4)
  assert np.frombuffer(payload[24:32], '<f4').tolist() == [3.0, 9.0]
  rec = recordio.unpack(payload)
  assert (rec.flag, rec.label, rec.data) == (2, (3.0, 9.0), b'img')
  with pytest.raises(ValueError, match='shorter than'):
    recordio.unpack(b'short')


def test_ms1m_recordio_header_identity_and_split_records(converted):
  _, _, gens, _ = converted
  root = gens['ms1mv3'].path
  listing = layouts.list_ms1m_recordio(root)
  n = SIZES.num_ids * SIZES.images_per_id
  assert listing.header == (n + 1, n + 1 + SIZES.num_ids)
  assert listing.image_keys.tolist() == list(range(1, n + 1))
  assert listing.id_counts == {i: SIZES.images_per_id for i in range(SIZES.num_ids)}
  raw = open(os.path.join(root, 'train.rec'), 'rb').read()
  flags, pos = [], 0
  while pos < len(raw):
    _, lrec = struct.unpack_from('<II', raw, pos)
    flags.append(lrec >> 29)
    pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
  assert flags.count(1) == 2 and flags.count(2) == 2 and flags.count(3) == 2
  with recordio.IndexedReader(os.path.join(root, 'train.rec'),
                              os.path.join(root, 'train.idx')) as reader:
    assert reader.read(1).data == gens['ms1mv3'].images['train.rec#1']
    assert reader.read(1).data.count(struct.pack('<I', recordio.MAGIC)) == 2


def test_ms1m_folder_form(tmp_path):
  gen = generate.write_dataset('ms1mv3', tmp_path, sizes=SIZES, folder_form=True)
  summary = build.convert('ms1mv3', gen.path, tmp_path / 'out', skip_count_check=True)
  ds = _read(tmp_path / 'out', 'ms1mv3', 'train')
  assert summary.splits['train'].examples == len(ds) == len(gen.splits['train'])
  for k, item in enumerate(gen.splits['train']):
    assert ds[k]['path'].decode() == item.path and ds[k]['label'] == item.id
    assert ds[k]['image'] == gen.images[item.path]


def _corrupt(root: str, rel_a: str, rel_b: str) -> None:
  with open(os.path.join(root, rel_a), 'r+b') as f:  # truncated JPEG: header still parses
    data = f.read()
    f.seek(0)
    f.truncate()
    f.write(data[:len(data) // 2])
  with open(os.path.join(root, rel_b), 'wb') as f:
    f.write(b'not an image at all')


def test_check_image():
  buf = io.BytesIO()
  Image.new('RGB', (40, 40), (10, 200, 30)).save(buf, 'JPEG')
  good = buf.getvalue()
  assert builders.check_image(good) is None
  assert builders.check_image(good[:len(good) // 2]) is not None
  assert builders.check_image(b'\xff\xd8garbage') is not None


def test_corrupt_images_skipped_counted_named_or_strict_error(tmp_path):
  gen = generate.write_dataset('sop', tmp_path, sizes=SIZES)
  train = gen.splits['train']
  bad = {train[1].path, train[4].path}
  _corrupt(gen.path, train[1].path, train[4].path)
  summary = build.convert('sop', gen.path, tmp_path / 'out', skip_count_check=True)
  assert summary.splits['train'].examples == len(train) - 2
  assert summary.splits['train'].skipped == 2
  assert set(summary.splits['train'].skipped_files) == bad
  assert summary.splits['test'].skipped == 0
  text = summary.format()
  assert all(f'skipped: {p}' in text for p in bad)
  record = _provenance(tmp_path / 'out', 'sop')
  assert record['counts']['train'] == {'images': len(train), 'ids': len({it.id for it in train}),
                                       'examples': len(train) - 2, 'skipped': 2}
  assert set(record['skipped_files']['train']) == bad and record['skipped_files']['test'] == []
  ds = _read(tmp_path / 'out', 'sop', 'train')
  assert [ds[i]['path'].decode() for i in range(len(ds))] == [
      it.path for it in train if it.path not in bad]
  with pytest.raises(builders.CorruptImageError, match=train[1].path):
    build.convert('sop', gen.path, tmp_path / 'out_strict', skip_count_check=True, strict=True)
  assert not (tmp_path / 'out_strict' / 'sop' / '1.0.0').exists()


def test_missing_folder_and_list_file_errors(tmp_path):
  market = generate.write_dataset('market1501', tmp_path, sizes=SIZES)
  shutil.rmtree(os.path.join(market.path, 'query'))
  with pytest.raises(FileNotFoundError, match=r'market1501.*query'):
    build.convert('market1501', market.path, tmp_path / 'out', skip_count_check=True)
  msmt = generate.write_dataset('msmt17', tmp_path, sizes=SIZES)
  os.remove(os.path.join(msmt.path, 'list_gallery.txt'))
  with pytest.raises(FileNotFoundError, match=r'list_gallery\.txt'):
    build.convert('msmt17', msmt.path, tmp_path / 'out', skip_count_check=True)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    build.convert('sop', tmp_path / 'nowhere', tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match=r'lfw\.bin'):
    build.convert('lfw', tmp_path, tmp_path / 'out')
  os.remove(os.path.join(generate.write_dataset('ms1mv3', tmp_path / 'm', sizes=SIZES).path,
                         'train.idx'))
  with pytest.raises(FileNotFoundError, match=r'train\.idx'):
    build.convert('ms1mv3', tmp_path / 'm' / 'ms1m-retinaface-t1', tmp_path / 'out')
  with pytest.raises(ValueError, match='unknown dataset'):
    build.convert('market', tmp_path, tmp_path / 'out')
  sop = generate.write_dataset('sop', tmp_path, sizes=SIZES)
  with open(os.path.join(sop.path, 'Ebay_test.txt'), 'w') as f:
    f.write('image_id class_id super_class_id path\n')
  with pytest.raises(ValueError, match=r"sop/test: the raw data lists no images"):
    build.convert('sop', sop.path, tmp_path / 'out', skip_count_check=True)
  with open(os.path.join(sop.path, 'Ebay_test.txt'), 'w') as f:
    f.write('image_id class_id super_class_id path\n1 2 3 nowhere/missing.JPG\n')
  with pytest.raises(ValueError, match=r"sop/test: all 1 listed examples.*missing\.JPG"):
    build.convert('sop', sop.path, tmp_path / 'out', skip_count_check=True)
  with open(os.path.join(sop.path, 'Ebay_train.txt'), 'a') as f:
    f.write('1 2 3\n')
  with pytest.raises(ValueError, match=r'Ebay_train\.txt:\d+: expected "image_id'):
    build.convert('sop', sop.path, tmp_path / 'out', skip_count_check=True)


def test_count_check(converted, tmp_path):
  raw, _, gens, _ = converted
  with pytest.raises(builders.CountMismatchError,
                     match=r"vehicleid.*'train': expected 113346 images, found 12"):
    build.convert('vehicleid', gens['vehicleid'].path, tmp_path / 'out')
  with pytest.raises(builders.CountMismatchError, match=r"lfw.*expected 12000 images, found 20"):
    build.convert('lfw', str(raw), tmp_path / 'out')
  assert not (tmp_path / 'out' / 'vehicleid' / '1.0.0').exists()
  # The full-size counts themselves pass.
  for name, info in catalog.DATASETS.items():
    builders.check_counts(name, {s: (v.images, v.ids or 0) for s, v in info.splits.items()})
  with pytest.raises(builders.CountMismatchError, match=r"market1501.*'gallery': expected 751 ids"):
    builders.check_counts('market1501', {'train': (12936, 751), 'query': (3368, 750),
                                         'gallery': (15913, 750)})


def test_generated_identities_are_learnable(tmp_path):
  """Nearest neighbour in pixel space finds the same identity: images depend on it."""
  gen = generate.write_dataset('veri776', tmp_path, sizes=generate.Sizes(
      num_ids=2, num_test_ids=12, images_per_id=3, image_size=24))

  def pixels(rel):
    return np.asarray(Image.open(io.BytesIO(gen.images[rel])), np.float32).ravel()

  query, gallery = gen.splits['query'], gen.splits['gallery']
  g = np.stack([pixels(it.path) for it in gallery])
  hits = 0
  for it in query:
    d = ((g - pixels(it.path)) ** 2).sum(1)
    others = [j for j, gi in enumerate(gallery) if gi.path.split('/')[1] != it.path.split('/')[1]]
    hits += gallery[min(others, key=lambda j: d[j])].id == it.id
  assert hits >= 0.9 * len(query)
  # Deterministic from the seed.
  again = generate.write_dataset('veri776', tmp_path / 'b', sizes=generate.Sizes(
      num_ids=2, num_test_ids=12, images_per_id=3, image_size=24))
  assert again.images == gen.images


def test_order_keys_spread_over_tfds_shuffle_buckets():
  """Local writes past tfds' 1 GB buffer sort one of 1000 buckets at a time: keys must spread."""
  from tensorflow_datasets.core import shuffle
  n = 20_000
  keys = [builders.order_key(i, n) for i in range(n)]
  assert keys == sorted(keys) and len(set(keys)) == n and keys[-1] < 2**128
  counts = np.bincount([shuffle.get_bucket_number(k, shuffle.BUCKETS_NUMBER) for k in keys],
                       minlength=shuffle.BUCKETS_NUMBER)
  assert counts.max() <= n // shuffle.BUCKETS_NUMBER + 1


def test_local_writer_bucket_path_keeps_order(tmp_path, monkeypatch):
  from tensorflow_datasets.core import shuffle
  monkeypatch.setattr(shuffle, 'MAX_MEM_BUFFER_SIZE', 1)  # force the on-disk buckets
  monkeypatch.setattr(shuffle, 'BUCKETS_NUMBER', 5)  # fewer temp files; examples span them all
  gen = generate.write_dataset('ms1mv3', tmp_path, sizes=SIZES)
  build.convert('ms1mv3', gen.path, tmp_path / 'out', skip_count_check=True)
  ds = _read(tmp_path / 'out', 'ms1mv3', 'train')
  assert [ds[i]['path'].decode() for i in range(len(ds))] == [
      it.path for it in gen.splits['train']]


def test_builders_names_versions_and_manual_dir(tmp_path):
  assert set(builders.BUILDERS) == set(catalog.DATASETS)
  for name, cls in builders.BUILDERS.items():
    assert cls.name == name and str(cls.VERSION) == '1.0.0'
  gen = generate.write_dataset('sop', tmp_path, sizes=SIZES)
  builder = builders.BUILDERS['sop'](data_dir=str(tmp_path / 'out'))  # raw folder via manual_dir
  builder.download_and_prepare(
      download_dir=str(tmp_path / 'dl'),
      download_config=tfds.download.DownloadConfig(manual_dir=gen.path))
  assert builder.info.disable_shuffling and builder.info.file_format.value == 'array_record'
  assert len(_read(tmp_path / 'out', 'sop', 'test')) == len(gen.splits['test'])
  assert os.path.isdir(tmp_path / 'out' / 'sop' / '1.0.0')


def _provenance(out, name):
  return tfds.builder_from_directory(os.path.join(out, name, '1.0.0')).info.metadata['provenance']


def _pil(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.int64)


def test_stored_bytes_are_the_source_file_bytes(converted):
  _, out, gens, _ = converted
  for name in ('market1501', 'sop'):
    ds = _read(out, name, 'train')
    for i in range(len(ds)):
      ex = ds[i]
      with open(os.path.join(gens[name].path, ex['path'].decode()), 'rb') as f:
        assert ex['image'] == f.read()


def test_tfds_decodes_the_image_features(converted):
  """``as_data_source(split)[i]['image']``: a uint8 HxWx3 RGB array, as PIL decodes the bytes."""
  _, out, gens, _ = converted
  builder = tfds.builder_from_directory(os.path.join(out, 'market1501', '1.0.0'))
  assert isinstance(builder.info.features['image'], tfds.features.Image)
  decoded, encoded = builder.as_data_source('query'), _read(out, 'market1501', 'query')
  s = SIZES.image_size
  for i in range(len(decoded)):
    img = decoded[i]['image']
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (s, s, 3)
    ref = _pil(gens['market1501'].images[encoded[i]['path'].decode()])
    assert np.abs(img - ref).mean() < 1.0  # OpenCV's and PIL's JPEG decoders; RGB order
  pairs = tfds.builder_from_directory(os.path.join(out, 'lfw', '1.0.0')).as_data_source('test')
  for i in (0, 3):
    ex = pairs[i]
    for side, row in (('image_a', 2 * i), ('image_b', 2 * i + 1)):
      assert ex[side].dtype == np.uint8 and ex[side].shape == (s, s, 3)
      assert np.abs(ex[side] - _pil(gens['lfw'].images[str(row)])).mean() < 1.0


def test_tfds_as_dataframe(converted):
  from data_prep import inspect  # pylint: disable=g-import-not-at-top
  _, out, gens, _ = converted
  df = inspect.as_dataframe(os.path.join(out, 'sop', '1.0.0'), 'train', 4)
  assert len(df) == 4 and {'image', 'id', 'label', 'camera', 'path'} <= set(df.columns)
  items = gens['sop'].splits['train'][:4]
  assert [p.decode() for p in df['path']] == [it.path for it in items]
  assert list(df['id']) == [it.id for it in items]
  assert df['image'][0].shape == (SIZES.image_size, SIZES.image_size, 3)
  first = df['image'][0].astype(np.int64)
  assert np.abs(first - _pil(gens['sop'].images[items[0].path])).mean() < 1
  assert '<img src="data:image/png;base64,' in df.current_style.to_html()  # thumbnails


def test_provenance_records_the_build(converted):
  raw, out, gens, summaries = converted
  record = _provenance(out, 'market1501')
  assert record['data_prep_version'] == data_prep.__version__
  assert record['raw_dir'] == os.path.abspath(gens['market1501'].path)
  assert record['options'] == {'strict': False, 'skip_count_check': True}
  assert record['count_check']['ran'] is False and record['count_check']['passed'] is False
  assert "split 'train': expected 12936 images, found 12" in record['count_check']['differences']
  for split, items in gens['market1501'].splits.items():
    assert record['counts'][split] == {'images': len(items), 'ids': len({it.id for it in items}),
                                       'examples': len(items), 'skipped': 0}
  assert record['complete'] is True and re.fullmatch(r'\d{4}-\d\d-\d\dT.*Z', record['built_at'])
  face = _provenance(out, 'lfw')
  assert face['raw_dir'] == os.path.abspath(raw)
  assert face['counts'] == {'test': {'images': 2 * SIZES.num_pairs, 'ids': None,
                                     'examples': SIZES.num_pairs, 'skipped': 0}}
  assert 'PARTIAL' in summaries['market1501'].format()


def test_count_check_that_ran_and_passed_is_recorded_and_accepted(tmp_path, monkeypatch):
  from ufo_jax.data import provenance  # pylint: disable=g-import-not-at-top
  gen = generate.write_dataset('sop', tmp_path, sizes=SIZES)
  small = {s: catalog.SplitInfo(len(v), len({it.id for it in v})) for s, v in gen.splits.items()}
  monkeypatch.setitem(catalog.DATASETS, 'sop',
                      dataclasses.replace(catalog.DATASETS['sop'], splits=small))
  summary = build.convert('sop', gen.path, tmp_path / 'out')  # the count check runs
  record = _provenance(tmp_path / 'out', 'sop')
  assert record['count_check'] == {'ran': True, 'passed': True, 'differences': []}
  assert 'counts match the published release' in summary.format()
  # The guard of the data layer accepts it without allow_partial_data.
  assert provenance.check_sets(tmp_path / 'out', ['sop'], allow_partial=False)['sop'] == record


def test_existing_output_reused_only_when_built_the_same_way(tmp_path):
  gen = generate.write_dataset('sop', tmp_path / 'a', sizes=SIZES)
  out = tmp_path / 'out'
  first = build.convert('sop', gen.path, out, skip_count_check=True)
  again = build.convert('sop', gen.path, out, skip_count_check=True)
  assert not first.reused and again.reused and again.splits == first.splits
  other = str(shutil.copytree(gen.path, tmp_path / 'b' / 'Stanford_Online_Products'))

  def refused(pattern, raw_dir, **kwargs):
    with pytest.raises(build.ReuseError, match=pattern) as e:
      build.convert('sop', raw_dir, out, **kwargs)
    assert '\n' not in str(e.value) and 'pass --overwrite to rebuild it' in str(e.value)

  refused(rf'sop: .*exists but it was built from {re.escape(os.path.abspath(gen.path))}, not '
          rf'from {re.escape(other)}', other, skip_count_check=True)
  refused('built without --strict, now with', gen.path, skip_count_check=True, strict=True)
  refused('built with --skip_count_check, now without', gen.path)
  rebuilt = build.convert('sop', other, out, skip_count_check=True, overwrite=True)
  assert not rebuilt.reused and _provenance(out, 'sop')['raw_dir'] == other
  shard = sorted(glob.glob(str(out / 'sop' / '1.0.0' / 'sop-train.array_record-*')))[0]
  os.remove(shard)
  refused(f'built from .*; it is incomplete .*{re.escape(shard)} is missing', gen.path,
          skip_count_check=True)  # another raw folder too: not rebuilt without --overwrite
  rebuilt = build.convert('sop', other, out, skip_count_check=True)  # built the same way
  assert not rebuilt.reused and os.path.exists(shard)
  md_path = out / 'sop' / '1.0.0' / 'metadata.json'
  md = json.loads(md_path.read_text())
  del md['provenance']  # as an earlier data_prep wrote it
  md_path.write_text(json.dumps(md))
  refused('built by an earlier data_prep', other, skip_count_check=True)


def _examples(out, name='sop', split='train'):
  """Every example of a converted split, read through TFDS (the set is usable)."""
  source = _read(out, name, split)
  return [source[i] for i in range(len(source))]


def _leftovers(out):
  return [e for e in os.listdir(out) if e.startswith('.')]


def test_overwrite_replaces_the_set_only_with_a_complete_one(tmp_path):
  good = generate.write_dataset('sop', tmp_path / 'a', sizes=SIZES)
  out = tmp_path / 'out'
  build.convert('sop', good.path, out, skip_count_check=True)
  before = _examples(out)
  empty = tmp_path / 'wrong' / 'Stanford_Online_Products'
  empty.mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='Ebay_train.txt'):  # a wrong --raw_dir
    build.convert('sop', empty, out, skip_count_check=True, overwrite=True)
  with pytest.raises(builders.CountMismatchError):  # the count check of the new raw folder
    build.convert('sop', good.path, out, overwrite=True)
  assert _provenance(out, 'sop')['raw_dir'] == os.path.abspath(good.path)
  assert [e['path'] for e in _examples(out)] == [e['path'] for e in before]
  assert _leftovers(out) == []
  # The old set is reused as it was: sizes and checksums still match.
  assert build.convert('sop', good.path, out, skip_count_check=True).reused
  # A build killed with SIGKILL leaves its folder; the next build removes it, not a live one's.
  host = socket.gethostname()
  killed, running = f'.sop.build-{host}-999999999-ab12', f'.sop.build-{host}-{os.getpid()}-cd34'
  for name in (killed, running):
    (out / name / 'sop').mkdir(parents=True)
  build.convert('sop', good.path, out, skip_count_check=True, overwrite=True)
  assert _leftovers(out) == [running]


def test_ctrl_c_during_an_overwrite_leaves_the_old_set(tmp_path):
  """A real SIGINT to ``python -m data_prep.build --overwrite`` while it reads the new raw
  folder: an image file there is a FIFO, so the conversion waits inside it when interrupted."""
  import signal
  import subprocess
  import sys
  import time

  good = generate.write_dataset('sop', tmp_path / 'a', sizes=SIZES)
  out = tmp_path / 'out'
  build.convert('sop', good.path, out, skip_count_check=True)
  new = shutil.copytree(good.path, tmp_path / 'b' / 'Stanford_Online_Products')
  blocking = os.path.join(new, layouts.list_sop(new).splits['train'][-1].path)
  os.remove(blocking)
  os.mkfifo(blocking)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, '-m', 'data_prep.build', '--dataset=sop', f'--raw_dir={new}',
       f'--out_dir={out}', '--overwrite', '--skip_count_check'],
      env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu'), cwd=root,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  writer = None
  deadline = time.time() + 120
  while writer is None and proc.poll() is None and time.time() < deadline:
    try:  # succeeds once the converter has opened the FIFO for reading
      writer = os.open(blocking, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
      time.sleep(0.05)
  assert writer is not None, proc.communicate()
  assert [e for e in _leftovers(out) if e.startswith('.sop.build-')]  # mid-conversion
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=60)
  os.close(writer)
  assert proc.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      'error: sop: interrupted; the unfinished conversion was removed '
      f'({os.path.join(out, "sop", "1.0.0")} is unchanged)'), stderr[-3000:]
  assert 'Traceback' not in stderr
  assert _provenance(out, 'sop')['raw_dir'] == os.path.abspath(good.path)
  assert len(_examples(out)) == len(good.splits['train'])
  assert _leftovers(out) == []


def test_a_truncated_or_altered_shard_is_rebuilt_not_reused(tmp_path, capsys):
  gen = generate.write_dataset('sop', tmp_path / 'a', sizes=SIZES)
  out = tmp_path / 'out'
  build.convert('sop', gen.path, out, skip_count_check=True)
  shard = sorted(glob.glob(str(out / 'sop' / '1.0.0' / 'sop-train.array_record-*')))[0]
  size = os.path.getsize(shard)
  recorded = _provenance(out, 'sop')['shards']['train']
  assert recorded == [{'file': os.path.basename(shard), 'bytes': size,
                       'sha256': builders.file_sha256(shard)}]
  capsys.readouterr()
  os.truncate(shard, size // 2)  # as a copy that stopped half-way leaves it
  assert not build.convert('sop', gen.path, out, skip_count_check=True).reused
  assert (f'sop: {out / "sop" / "1.0.0"} it is damaged ({shard} has {size // 2} bytes, {size} '
          'when built): rebuilding it\n') in capsys.readouterr().err
  assert builders.file_sha256(shard) == recorded[0]['sha256']  # the same bytes again
  with open(shard, 'r+b') as f:  # one flipped byte, same size
    f.seek(size // 3)
    byte = f.read(1)
    f.seek(size // 3)
    f.write(bytes([byte[0] ^ 0xFF]))
  assert not build.convert('sop', gen.path, out, skip_count_check=True).reused
  assert 'differs from the SHA-256 recorded when it was built' in capsys.readouterr().err
  assert build.convert('sop', gen.path, out, skip_count_check=True).reused
  # A set copied under another dataset's name is not taken for that dataset.
  shutil.copytree(out / 'sop', out / 'veri776')
  with pytest.raises(build.ReuseError, match="holds the dataset 'sop' .*, not 'veri776'"):
    build.convert('veri776', gen.path, out, skip_count_check=True)
  info_path = out / 'sop' / '1.0.0' / 'dataset_info.json'
  info_path.write_text(info_path.read_text()[:40])  # an invalid dataset_info.json
  with pytest.raises(build.ReuseError, match='its dataset_info.json cannot be read') as e:
    build.convert('sop', gen.path, out, skip_count_check=True)
  assert '\n' not in str(e.value)
