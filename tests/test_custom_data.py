"""Custom sets (docs/CUSTOM_DATA.md): the csv and folders layouts, their bad inputs, the catalog
learning them from their metadata, and tasks defined in a config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import build, custom
from ufo_jax import catalog
from ufo_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def _image(path, rng, size=SIZE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_csv_set(root, *, train_ids=4, test_ids=3, per_id=4, cameras=True, seed=0,
                  extra_rows=()):
  """``root/images.csv``: train ids t0.., query/gallery ids q0.. (per id: 1 query, rest gallery
  on another camera), one query id with no gallery image, ``extra_rows`` appended verbatim."""
  rng = np.random.default_rng(seed)
  header = 'path,identity,split' + (',camera' if cameras else '')
  rows = [header]

  def add(rel, identity, split, camera):
    _image(os.path.join(root, rel), rng)
    rows.append(f'{rel},{identity},{split}' + (f',{camera}' if cameras else ''))

  for i in range(train_ids):
    for k in range(per_id):
      add(f'train/t{i}_{k}.jpg', f't{i}', 'train', f'c{k % 2}')
  for i in range(test_ids):
    add(f'eval/q{i}_0.jpg', f'q{i}', 'query', 'c0')
    for k in range(1, per_id):
      add(f'eval/q{i}_{k}.jpg', f'q{i}', 'gallery', 'c1')
  add('eval/lonely.jpg', 'lonely', 'query', 'c0')  # no gallery image of its identity
  rows.extend(extra_rows)
  with open(os.path.join(root, 'images.csv'), 'w') as f:
    f.write('\n'.join(rows) + '\n')
  return root


def write_folders_set(root, *, train_ids=4, test_ids=4, per_id=3, seed=1):
  """``root/<split>/<identity>/<images>`` with train and test (retrieval) splits."""
  rng = np.random.default_rng(seed)
  for split, n in (('train', train_ids), ('test', test_ids)):
    for i in range(n):
      for k in range(per_id):
        _image(os.path.join(root, split, f'{split}_item{i}', f'{k}.png'), rng)
  with open(os.path.join(root, 'test', 'test_item0', 'notes.txt'), 'w') as f:
    f.write('not an image')
  return root


def test_csv_and_folders_conversion_counts_and_the_catalog_learns_them(tmp_path):
  raw, out = tmp_path / 'raw', tmp_path / 'out'
  csv_dir = write_csv_set(str(raw / 'shoes'), extra_rows=['eval/absent.jpg,q0,gallery,c1'])
  folders_dir = write_folders_set(str(raw / 'bikes'))
  summary = build.convert('shoes', csv_dir, out, layout='csv', task='shoes')
  counts = {s: (v.examples, v.ids, v.skipped) for s, v in summary.splits.items()}
  # query: 3 + the lonely one; gallery: 3 x 3 listed + the absent file (skipped, named).
  assert counts == {'train': (16, 4, 0), 'query': (4, 4, 0), 'gallery': (9, 3, 1)}
  assert summary.splits['gallery'].skipped_files == ['eval/absent.jpg']
  text = summary.format()
  assert 'task shoes, protocol reid, cameras, csv layout' in text
  assert '1 query image(s) of 1 identities have no gallery image' in text
  summary = build.convert('bikes', folders_dir, out, layout='folders', task='bikes')
  assert {s: (v.examples, v.ids) for s, v in summary.splits.items()} == {
      'train': (12, 4), 'test': (12, 4)}
  assert 'protocol retrieval, no cameras, folders layout' in summary.format()
  assert '1 file(s) that are not images' in summary.format()

  with open(out / 'shoes' / '1.0.0' / 'metadata.json') as f:
    md = json.load(f)
  record = md[catalog.CUSTOM_KEY]
  assert record['task'] == 'shoes' and record['protocol'] == 'reid'
  assert record['splits']['gallery'] == {'images': 10, 'ids': 3}  # listed
  assert record['queries_without_gallery'] == 1 and record['num_cameras'] == 2
  assert md['provenance']['count_check']['passed']  # no published counts: nothing refused
  assert catalog.learn(out) == ['bikes', 'shoes']
  shoes, bikes = catalog.get('shoes'), catalog.get('bikes')
  assert (shoes.task, shoes.protocol, shoes.eval_split, shoes.has_camera, shoes.custom) == (
      'shoes', 'reid', 'query', True, True)
  assert (bikes.task, bikes.protocol, bikes.eval_split, bikes.has_camera) == (
      'bikes', 'retrieval', 'test', False)
  assert shoes.num_train_ids == 4 and {'bikes', 'shoes'} <= set(catalog.benchmarks())
  # The same conversion again reuses the output; another --task is refused.
  assert build.convert('shoes', csv_dir, out, layout='csv', task='shoes').reused
  with pytest.raises(build.ReuseError, match='--task=shoes, now --task=boots'):
    build.convert('shoes', csv_dir, out, layout='csv', task='boots')
  # --strict: the missing image is an error naming it.
  with pytest.raises(ValueError, match="absent.jpg"):
    build.convert('shoes2', csv_dir, out, layout='csv', task='shoes', strict=True)
  # The data pipeline reads the custom set like a public one.
  from ufo_jax import data  # pylint: disable=g-import-not-at-top
  split = data.open_split(str(out), 'shoes', 'train')
  assert len(split) == 16 and split.num_ids == 4


def _listing_error(raw_dir, layout='csv', protocol=None):
  with pytest.raises(custom.InputError) as e:
    custom.listing(str(raw_dir), layout=layout, task='shoes', protocol=protocol)
  message = str(e.value)
  assert '\n' not in message
  return message


def test_bad_inputs_are_one_line_naming_file_line_and_value(tmp_path):
  d = tmp_path / 'bad'
  write_csv_set(str(d), train_ids=1, test_ids=1, per_id=2,
                extra_rows=['eval/x.jpg,q0,validation,c0'])
  csv_path = os.path.join(str(d), 'images.csv')
  lines = open(csv_path).read().splitlines()
  bad_line = len(lines)
  assert _listing_error(d) == (f"{csv_path}: line {bad_line}: split 'validation' is not one "
                               'of train, query, gallery, test')
  # A missing column (the header is line 1), an empty value.
  with open(csv_path, 'w') as f:
    f.write('path,split\na.jpg,train\n')
  assert _listing_error(d) == (f"{csv_path}: line 1: missing column(s) identity in the header "
                               "'path,split'; expected path,identity,split[,camera]")
  with open(csv_path, 'w') as f:
    f.write('path,identity,split\na.jpg,,train\n')
  assert _listing_error(d) == f"{csv_path}: line 2: empty identity in 'a.jpg,,train'"
  # An empty split: queries without any gallery.
  with open(csv_path, 'w') as f:
    f.write('path,identity,split\na.jpg,1,train\nb.jpg,1,query\n')
  assert _listing_error(d).startswith(f"{csv_path}: split 'gallery' is empty, found 'query'")
  # --protocol must have its splits.
  with open(csv_path, 'w') as f:
    f.write('path,identity,split\na.jpg,1,train\nb.jpg,1,test\n')
  assert 'needs the split(s) query and gallery; found train, test' in _listing_error(
      d, protocol='reid')
  # Folders: an unknown split folder, an empty split.
  f = tmp_path / 'folders'
  write_folders_set(str(f), train_ids=1, test_ids=1, per_id=1)
  os.makedirs(f / 'val' / 'x')
  assert _listing_error(f, 'folders') == (f"{f / 'val'}: split folder 'val' is not one of "
                                          'train, query, gallery, test')
  os.rmdir(f / 'val' / 'x')
  os.rmdir(f / 'val')
  os.makedirs(f / 'query' / 'someone')
  assert _listing_error(f, 'folders').startswith(f"{f / 'query'}: split 'query' holds no images")
  # A catalog name is refused; so is a task name that is no lower-case identifier.
  with pytest.raises(custom.InputError, match="'sop' is a catalog dataset"):
    custom.make_builder('sop', layout='csv', task='product')
  with pytest.raises(custom.InputError, match='--task=Shoes: expected a lower-case name'):
    custom.make_builder('shoes', layout='csv', task='Shoes')


def test_command_line_error_line(tmp_path):
  d = write_csv_set(str(tmp_path / 'raw'), train_ids=1, test_ids=1, per_id=2,
                    extra_rows=['eval/x.jpg,q0,holdout,c0'])
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', '--dataset=shoes', '--layout=csv',
       '--task=shoes', f'--raw_dir={d}', f'--out_dir={tmp_path / "out"}'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f"error: {d}/images.csv: line 7: split 'holdout' is not one of train, "
                    'query, gallery, test'], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'out' / 'shoes')


def test_task_config_is_the_recipes_and_configs_define_any_task(tmp_path):
  recipe = config_lib.load_config('ufo_l')
  person = config_lib.task_config(datasets=('market1501', 'dukemtmc', 'msmt17'), batch_size=512,
                                  scale=30.0, margin=0.2, triplet=True)
  assert person.to_dict() == recipe.tasks.person.to_dict()
  face = config_lib.task_config(datasets=('ms1mv3',), batch_size=1024, scale=50.0, margin=0.3,
                                triplet=False)
  assert face.to_dict() == recipe.tasks.face.to_dict()
  # A fifth task over a custom set, known from its converted metadata alone.
  out = tmp_path / 'out'
  build.convert('bikes', write_folders_set(str(tmp_path / 'raw')), out, layout='folders',
                task='bikes')
  config = config_lib.load_config('ufo_tiny')
  config.input.data_dir = str(out)
  config.input.synthetic_num_classes = 0  # the class counts of the datasets
  config.tasks.bikes = config_lib.task_config(datasets=('bikes',), batch_size=8, scale=30.0,
                                              margin=0.2, triplet=True)
  config.eval.sets = ('sop', 'bikes')
  config_lib.validate(config)
  assert config_lib.num_classes(config, 'bikes') == 4
  config.tasks.Bad = config.tasks.bikes
  with pytest.raises(config_lib.ConfigError, match='tasks.Bad'):
    config_lib.validate(config)
  del config.tasks['Bad']
  config.tasks.cars = config_lib.task_config(datasets=('bikes',), batch_size=8, scale=30.0,
                                             margin=0.2, triplet=True)
  with pytest.raises(config_lib.ConfigError, match="belongs to task 'bikes'.*--task=bikes"):
    config_lib.validate(config)


def test_report_columns_for_custom_sets_and_the_before_row(tmp_path, monkeypatch):
  from ufo_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  record = {'task': 'shoes', 'protocol': 'reid', 'eval_split': 'query', 'has_camera': False,
            'layout': 'csv', 'splits': {'query': {'images': 4, 'ids': 4},
                                        'gallery': {'images': 9, 'ids': 3}}}
  monkeypatch.setitem(catalog.CUSTOM, 'shoes', catalog.custom_info('shoes', record))
  before = {'market1501': {'cmc': [0.5, 0.6], 'mAP': 0.25}, 'shoes': {'cmc': [0.2], 'mAP': 0.1}}
  report.write_report(before, str(tmp_path / 'a'), name='before')
  now = {'market1501': {'cmc': [0.4, 0.6], 'mAP': 0.30}, 'shoes': {'cmc': [0.5], 'mAP': 0.4}}
  first = str(tmp_path / 'a' / 'report.json')
  md = report.write_report(now, str(tmp_path / 'b'), compare_to=first)
  payload = json.load(open(tmp_path / 'b' / 'report.json'))
  assert payload['columns'][-1] == 'shoes' and payload['headers'][-1] == 'shoes'
  assert payload['ours']['shoes'] == [50.0, 40.0]
  np.testing.assert_allclose(payload['before']['change']['market1501'], [-10.0, 5.0])
  np.testing.assert_allclose(payload['before']['change']['shoes'], [30.0, 30.0])
  rows = {line.split(' | ')[0].strip('| *'): line for line in md.splitlines()
          if line.startswith('|')}
  assert rows[f'before ({first})'].endswith('| 50.00/25.00 | - | - | - | - | - | - | 20.00/10.00 |')
  assert rows['change'].endswith('| -10.00/+5.00 | - | - | - | - | - | - | +30.00/+30.00 |')
  assert rows['UFO ViT-L, drop path 0.2'].endswith('| 89.23 | - |')  # no published cell
  assert payload['notes'] == ['shoes: no camera ids, so only the query image itself is removed '
                              'from its gallery (no same-identity-same-camera removal)']
  with pytest.raises(ValueError, match='compare_to=.*not a readable report.json'):
    report.write_report(now, str(tmp_path / 'c'), compare_to=str(tmp_path / 'missing.json'))
