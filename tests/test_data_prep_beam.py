"""data_prep on Apache Beam (DirectRunner) and the command lines end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import tensorflow_datasets as tfds

from data_prep import build, generate

SIZES = generate.Sizes(num_ids=4, num_test_ids=3, images_per_id=3, image_size=24, num_pairs=10)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(path, split):
  builder = tfds.builder_from_directory(path)
  images = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
  ds = builder.as_data_source(split, decoders={k: tfds.decode.SkipDecoding() for k in images})
  return [ds[i] for i in range(len(ds))]


def _metadata(path):
  md = dict(tfds.builder_from_directory(path).info.metadata)
  md['provenance'] = {k: v for k, v in md['provenance'].items() if k != 'built_at'}
  return md


def test_beam_direct_runner_matches_local_path(tmp_path):
  gen = generate.write_dataset('market1501', tmp_path, sizes=SIZES)
  bad = gen.splits['train'][5].path
  with open(os.path.join(gen.path, bad), 'wb') as f:
    f.write(b'corrupt')
  local = build.convert('market1501', gen.path, tmp_path / 'local', skip_count_check=True)
  beam = build.convert('market1501', gen.path, tmp_path / 'beam', skip_count_check=True,
                       beam=True, beam_chunk_size=4,  # several chunks per split
                       beam_options=['--direct_num_workers=1'])
  assert beam.splits == local.splits
  assert beam.splits['train'].skipped_files == [bad]
  for split, items in gen.splits.items():
    ex_local = _examples(local.path, split)
    assert ex_local == _examples(beam.path, split)  # same contents, same order
    assert len(ex_local) == len(items) - (split == 'train')
  assert _metadata(beam.path) == _metadata(local.path)  # provenance too, but the build time


def test_beam_recordio_and_face_pairs(tmp_path):
  gens = {n: generate.write_dataset(n, tmp_path, sizes=SIZES) for n in ('ms1mv3', 'agedb_30')}
  for name, raw in (('ms1mv3', gens['ms1mv3'].path), ('agedb_30', str(tmp_path))):
    local = build.convert(name, raw, tmp_path / 'local', skip_count_check=True)
    beam = build.convert(name, raw, tmp_path / 'beam', skip_count_check=True, beam=True,
                         beam_chunk_size=5)
    split = 'train' if name == 'ms1mv3' else 'test'
    assert _examples(local.path, split) == _examples(beam.path, split)
    assert beam.splits[split].examples == (SIZES.num_pairs if name == 'agedb_30'
                                           else SIZES.num_ids * SIZES.images_per_id)


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)


def test_command_lines_end_to_end(tmp_path):
  raw = tmp_path / 'raw'
  res = _run('data_prep.generate', f'--raw_root={raw}', '--datasets=sop,lfw', '--num_ids=3',
             '--images_per_id=2', '--image_size=16', '--num_pairs=10')
  assert res.returncode == 0, res.stderr
  assert sorted(os.listdir(raw)) == ['Stanford_Online_Products', 'lfw.bin']
  out = tmp_path / 'out'
  res = _run('data_prep.build', '--dataset=sop', f'--raw_dir={raw}/Stanford_Online_Products',
             f'--out_dir={out}')
  assert res.returncode != 0
  assert "sop: the raw data does not match" in res.stderr
  assert "'train': expected 59551 images, found 6" in res.stderr
  res = _run('data_prep.build', '--dataset=all', f'--raw_root={raw}', f'--out_dir={out}',
             '--skip_count_check')
  assert res.returncode != 0  # the other datasets are missing from the raw root
  assert 'market1501: folder not found' in res.stdout + res.stderr
  summary = res.stdout
  assert 'sop: ' in summary and 'lfw: ' in summary
  lines = summary.splitlines()
  assert any(line.split() == ['train', '6', '3', '0'] for line in lines)
  assert any(line.split() == ['test', '10', '-', '0'] for line in lines)
  assert len(_examples(out / 'sop' / '1.0.0', 'test')) == 6
  # Built from another raw folder: one `error:` line naming what differs, no traceback.
  os.rename(raw / 'Stanford_Online_Products', tmp_path / 'Stanford_Online_Products')
  res = _run('data_prep.build', '--dataset=sop', f'--raw_dir={tmp_path}/Stanford_Online_Products',
             f'--out_dir={out}', '--skip_count_check')
  assert res.returncode == 1 and 'Traceback' not in res.stderr
  error = [line for line in res.stderr.splitlines() if line.startswith('error:')]
  assert len(error) == 1 and f'it was built from {raw}/Stanford_Online_Products' in error[0]
  assert 'pass --overwrite to rebuild it' in error[0]
