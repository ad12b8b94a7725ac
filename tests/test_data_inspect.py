"""python -m data_prep.inspect: per-split statistics against the generator truth, PNG grids."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import build, generate
from data_prep import inspect as inspect_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = generate.Sizes(num_ids=5, num_test_ids=3, images_per_id=3, image_size=20, num_pairs=10)
SETS = ('market1501', 'sop', 'lfw')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  raw = tmp_path_factory.mktemp('raw')
  out = tmp_path_factory.mktemp('out')
  gens = {}
  for name in SETS:
    gens[name] = generate.write_dataset(name, raw, seed=2, sizes=SIZES)
    build.convert(name, gens[name].path, out, skip_count_check=True)
  return str(out), gens


def _triple(values):
  return int(np.min(values)), int(np.median(values)), int(np.max(values))


def test_statistics_and_grids_match_the_data(converted, tmp_path):
  data_dir, gens = converted
  lines = []
  results = inspect_lib.inspect(data_dir, None, str(tmp_path), echo=lines.append)
  assert list(results) == ['market1501', 'sop', 'lfw']  # the converted sets, catalog order
  for name in ('market1501', 'sop'):
    assert [s.split for s in results[name]] == list(gens[name].splits)
    for stats in results[name]:
      items = gens[name].splits[stats.split]
      per_id = collections.Counter(it.id for it in items)
      cams = {it.camera for it in items if it.camera >= 0}
      assert stats.images == len(items) and stats.ids == len(per_id)
      assert stats.per_id == _triple(list(per_id.values()))
      assert stats.cameras == (len(cams) if cams else None)
      assert stats.heights == stats.widths == (20, 20, 20) and stats.sampled == len(items)
      grid = Image.open(stats.grid)
      rows = min(4, len(per_id))
      assert grid.size[1] == 16 + rows * (inspect_lib.CELL + inspect_lib.CAPTION)
      assert os.path.basename(stats.grid) == f'{name}_{stats.split}.png'
  (lfw,) = results['lfw']
  pairs = gens['lfw'].pairs
  assert (lfw.pairs, lfw.positive_pairs, lfw.images) == (len(pairs), sum(pairs), 2 * len(pairs))
  # Face grid: the first 3 same and 3 different pairs in pair order, framed green / red.
  same = np.flatnonzero(pairs)[:3].tolist() + np.flatnonzero(~np.asarray(pairs))[:3].tolist()
  grid = np.asarray(Image.open(lfw.grid).convert('RGB'))
  for r, i in enumerate(sorted(same)):
    frame = grid[16 + r * (inspect_lib.CELL + inspect_lib.CAPTION) + 1, 1]
    assert tuple(frame) == ((0, 200, 0) if pairs[i] else (220, 0, 0))
  # Grid cells hold the images as TFDS decodes them: the first cell of market1501/train is its
  # first record (the first identity), scaled up from 20 x 20.
  first = gens['market1501'].splits['train'][0]
  cell = np.asarray(Image.open(results['market1501'][0].grid).convert('RGB'), np.int64)[
      16 + 3:16 + 93, 3:93]
  ref = np.asarray(Image.open(os.path.join(gens['market1501'].path, first.path)).convert(
      'RGB').resize((90, 90), Image.Resampling.BILINEAR), np.int64)
  assert np.abs(cell - ref).mean() < 8
  text = (tmp_path / 'summary.txt').read_text()
  assert text.splitlines() == lines
  assert 'PARTIAL: counts differ from the published release' in text
  assert f'grids: 6 PNGs in {tmp_path}' in text


def test_command_line(converted, tmp_path):
  data_dir, gens = converted
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, '-m', 'data_prep.inspect', f'--data_dir={data_dir}',
                        '--dataset=sop,lfw', f'--out={tmp_path}'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f'sop: {data_dir}/sop/1.0.0' in res.stdout
  assert re.search(r'\n  test +20 images, 10 pairs \(5 positive\); HxW', res.stdout)
  assert sorted(os.listdir(tmp_path)) == ['lfw_test.png', 'sop_test.png', 'sop_train.png',
                                          'summary.txt']
  res = subprocess.run([sys.executable, '-m', 'data_prep.inspect', f'--data_dir={data_dir}',
                        '--dataset=veri776'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 1 and 'Traceback' not in res.stderr
  assert res.stderr.strip().splitlines()[-1].startswith('error: veri776: not converted')


def test_a_damaged_set_is_one_line_naming_the_file_and_the_command(converted, tmp_path):
  import glob
  import shutil

  data_dir, gens = converted
  copy = str(tmp_path / 'data')
  shutil.copytree(os.path.join(data_dir, 'sop'), os.path.join(copy, 'sop'))
  shard = sorted(glob.glob(os.path.join(copy, 'sop', '1.0.0', 'sop-train.array_record-*')))[0]
  size = os.path.getsize(shard)
  command = (f'convert it again: python -m data_prep.build --dataset=sop '
             f'--raw_dir={os.path.abspath(gens["sop"].path)} --out_dir={copy} --overwrite')

  def refused(pattern):
    with pytest.raises(ValueError, match=pattern) as e:
      inspect_lib.inspect(copy, ['sop'], str(tmp_path / 'out'), echo=lambda _: None)
    assert '\n' not in str(e.value) and str(e.value).endswith(command), str(e.value)

  with open(shard, 'rb') as f:
    good = f.read()
  with open(shard, 'r+b') as f:  # bytes flipped inside the records (the first 4 KiB)
    f.seek(1000)
    f.write(bytes(b ^ 0xFF for b in good[1000:1064]))
  refused(rf'sop/train: the converted set is damaged \({re.escape(shard)} differs from the '
          r'SHA-256 recorded when it was built\); reading it: RuntimeError')
  os.truncate(shard, size // 2)  # a copy that stopped half-way
  refused(rf'sop: the converted set is damaged \({re.escape(shard)} has {size // 2} '
          rf'bytes, {size} when built\); convert')
  info = os.path.join(copy, 'sop', '1.0.0', 'dataset_info.json')
  with open(info, 'w') as f:
    f.write('{"name": "sop", ')
  with pytest.raises(ValueError, match=r'sop: .*dataset_info.json cannot be read \(') as e:
    inspect_lib.inspect(copy, ['sop'], str(tmp_path / 'out'), echo=lambda _: None)
  assert '\n' not in str(e.value)
  shutil.copytree(os.path.join(data_dir, 'sop'), os.path.join(copy, 'market1501'))
  with pytest.raises(ValueError, match="market1501: .* holds the dataset 'sop'"):
    inspect_lib.inspect(copy, ['market1501'], str(tmp_path / 'out'), echo=lambda _: None)
