"""UFO's test archive (`test_datasets.tar`) converts to the same sets as the original downloads."""

from __future__ import annotations

import os

import pytest
import tensorflow_datasets as tfds
from ufo_archive_fixtures import FACE_SETS, write_archive

from data_prep import build, builders, generate, ufo_archive
from ufo_jax import catalog
from ufo_jax.data import provenance

SIZES = generate.Sizes(num_ids=3, num_test_ids=3, images_per_id=2, image_size=16, num_pairs=10)
IMAGE_SETS = ('market1501', 'msmt17', 'veri776', 'vehicleid', 'veriwild', 'sop')


def _examples(out, name, split):
  skip = tfds.decode.SkipDecoding
  keys = ('image_a', 'image_b') if name in FACE_SETS else ('image',)
  ds = tfds.builder_from_directory(os.path.join(out, name, '1.0.0')).as_data_source(
    split, decoders={k: skip() for k in keys})
  return [{k: v for k, v in ds[i].items() if k != 'path'} for i in range(len(ds))]


@pytest.fixture(scope='module')
def both(tmp_path_factory):
  """Every archive set generated in its original layout, laid out as UFO's archive, converted."""
  orig = tmp_path_factory.mktemp('orig')
  archive = tmp_path_factory.mktemp('test_datasets')
  out_orig, out_arch = tmp_path_factory.mktemp('out_orig'), tmp_path_factory.mktemp('out_arch')
  for name in (*IMAGE_SETS, *FACE_SETS):
    gen = generate.write_dataset(name, orig, seed=2, sizes=SIZES)
    build.convert(name, str(orig) if name in FACE_SETS else gen.path, out_orig,
                  skip_count_check=True)
  write_archive(orig, archive, with_train=False)
  summaries = {}
  for name in (*IMAGE_SETS, *FACE_SETS):
    raw_dir = build.raw_dir_of(name, str(archive))  # what --dataset=all --raw_root finds
    summaries[name] = build.convert(name, raw_dir, out_arch, skip_count_check=True)
  return orig, archive, out_orig, out_arch, summaries


@pytest.mark.parametrize('name', IMAGE_SETS + FACE_SETS)
def test_archive_converts_to_the_original_sets(both, name):
  """Same splits (but the absent train split), examples, ids, cameras and image bytes."""
  _, _, out_orig, out_arch, _ = both
  info = catalog.get(name)
  orig_info = tfds.builder_from_directory(os.path.join(out_orig, name, '1.0.0')).info
  arch_info = tfds.builder_from_directory(os.path.join(out_arch, name, '1.0.0')).info
  want = set(info.splits) - {info.train_split}
  assert set(arch_info.splits) == want
  for split in want:
    got, ref = _examples(out_arch, name, split), _examples(out_orig, name, split)
    assert len(got) == len(ref) > 0
    assert got == ref, f'{name}/{split} differs'
  md = arch_info.metadata
  assert md['layout'] == 'ufo_test_archive'
  if info.train_split:
    assert md['absent_splits'] == [info.train_split]
    assert md['num_classes'] == 0
    assert md['provenance']['count_check']['differences'] == [  # the same, but for train
      d for d in orig_info.metadata['provenance']['count_check']['differences']
      if not d.startswith(f"split '{info.train_split}'")]
    # Evaluation accepts the set without its train split; training does not.
    record = md['provenance']
    assert record['absent_splits'] == [info.train_split]
    missing = f'{info.train_split} missing'
    assert any(d.startswith(missing) for d in provenance.differences(name, record))
    assert not any(d.startswith(missing)
                   for d in provenance.differences(name, record, evaluation=True))


def test_archive_with_train_images_keeps_train(tmp_path, both):
  orig, _, out_orig, _, _ = both
  archive = tmp_path / 'test_datasets'
  write_archive(orig, archive, with_train=True, datasets=('sop', 'lfw'))
  build.convert('sop', build.raw_dir_of('sop', str(archive)), tmp_path / 'out',
                skip_count_check=True)
  assert _examples(tmp_path / 'out', 'sop', 'train') == _examples(out_orig, 'sop', 'train')


def test_archive_root_detection_and_counts(both, monkeypatch):
  _, archive, _, _, _ = both
  assert ufo_archive.is_archive_root(str(archive))
  assert build.raw_dir_of('veri776', str(archive)).endswith(os.sep + 'veri')
  assert build.raw_dir_of('msmt17', str(archive)).endswith('MSMT17_V2')
  assert ufo_archive.raw_dir_of('ms1mv3', str(archive)) is None
  assert builders.find_face_source('cfp_fp', str(archive)).endswith(
    os.path.join('faces_emore_val', 'cfp_fp.filelist'))
  # The count check compares the archive's test splits with the full release, train left out.
  sop = ufo_archive.listing('sop', build.raw_dir_of('sop', str(archive)))
  found = {s: (len(e), len({x.id for x in e})) for s, e in sop.splits.items()}
  problems = builders.count_differences('sop', found, absent=sop.extra['absent_splits'])
  assert problems == [f"split 'test': expected 60502 images, found {found['test'][0]}",
                      f"split 'test': expected 11316 ids, found {found['test'][1]}"]
  monkeypatch.setattr(catalog, 'DATASETS', dict(catalog.DATASETS, sop=catalog.DatasetInfo(
    **{**catalog.get('sop').__dict__, 'splits': {
      'train': catalog.SplitInfo(1, 1), 'test': catalog.SplitInfo(*found['test'])}})))
  builders.check_counts('sop', found, absent=('train',))  # the test split matches: no error
  with pytest.raises(builders.CountMismatchError, match="split 'train' is missing"):
    builders.check_counts('sop', found)
