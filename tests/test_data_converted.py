"""The input pipeline on the real record format: data_prep's converted fixtures.

One session-scoped fixture writes tiny raw datasets with ``data_prep.generate``
and converts them with ``data_prep.build.convert`` (ufo_jax itself never
imports data_prep: it reads the on-disk format only).
"""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ufo_jax import config as config_lib
from ufo_jax import data
from ufo_jax.data import augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SETS = ('ms1mv3', 'market1501', 'dukemtmc', 'msmt17', 'veri776', 'vehicleid', 'veriwild',
              'sop')


@pytest.fixture(scope='session')
def converted(converted_data):
  """tests/conftest.py's session fixture: every training set and LFW, converted by data_prep."""
  return converted_data


def _config(data_dir):
  config = config_lib.load_config('ufo_tiny')
  config.input.source = 'tfds'
  config.input.data_dir = data_dir
  config.input.image_size = 32
  config.input.worker_count = 0
  for task in config.tasks:
    config.tasks[task].batch_size = 8
  return config


def test_num_classes_and_label_spaces(converted):
  data_dir, truth = converted
  config = _config(data_dir)
  sources, counts = data.open_training_data(config, data_dir)
  for task in config_lib.task_names(config):
    want = sum(len({it.id for it in truth[n].splits['train']}) for n in config.tasks[task].datasets)
    assert counts[task] == want
    assert config_lib.num_classes(config, task, counts) == want
  for task, src in sources.items():
    labels = src.labels()
    for d in range(len(src.splits)):
      part = labels[src.record_offsets[d]:src.record_offsets[d + 1]]
      assert src.label_offsets[d] <= part.min() and part.max() < src.label_offsets[d + 1]
    assert len(np.unique(labels)) == counts[task]


def test_create_train_dataset_from_converted_data(converted):
  data_dir, _ = converted
  config = _config(data_dir)
  counts = data.open_training_data(config, data_dir).num_classes
  tasks = config_lib.task_names(config)
  it = iter(data.create_train_dataset(config, data_dir, process_index=0, process_count=1))
  for _ in range(3):
    batch = next(it)
    assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].dtype == np.uint8
    np.testing.assert_array_equal(batch['task'], np.repeat(np.arange(4), 8))
    for t_idx, task in enumerate(tasks):
      lab = batch['label'][batch['task'] == t_idx]
      assert lab.min() >= 0 and lab.max() < counts[task]
      if config.tasks[task].sampler == 'identity':
        groups = lab.reshape(-1, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 2
  assert it.get_state() == {'step': 3}
  it.close()


def test_eval_input_in_order_with_mask(converted):
  data_dir, truth = converted
  items = {it.path: it for it in truth['market1501'].splits['query']}
  split = data.open_split(data_dir, 'market1501', 'query')
  n = len(split)
  assert n == len(items)
  rows, lengths = [], []
  for p in range(2):
    ev = data.create_eval_dataset(data_dir, 'market1501', 'query', image_size=16, batch_size=4,
                                  process_index=p, process_count=2)
    batches = list(ev)
    lengths.append(len(batches))
    assert len(batches) == len(ev)
    for b in batches:
      assert b['image'].shape == (2, 16, 16, 3) and b['image'].dtype == np.uint8
      assert (b['index'][~b['mask']] == -1).all()
      for i in np.flatnonzero(b['mask']):
        rows.append((int(b['index'][i]), b['image'][i], int(b['id'][i]), int(b['camera'][i])))
  assert lengths[0] == lengths[1]
  assert [r[0] for r in rows] == list(range(n))
  for (_index, image, pid, cam), ex in zip(rows, split.read(range(n))):
    item = items[ex['path'].decode()]
    assert (pid, cam) == (item.id, item.camera)
    want = augment.eval_transform(augment.decode_image(truth['market1501'].images[item.path]), 16)
    np.testing.assert_array_equal(image, want)


def test_face_pairs_in_pair_order(converted):
  data_dir, truth = converted
  gen = truth['lfw']
  np.testing.assert_array_equal(data.load_pairs_labels(data_dir, 'lfw'), gen.pairs)
  ev = data.create_eval_dataset(data_dir, 'lfw', 'test', image_size=16, batch_size=8)
  assert ev.is_pairs and ev.num_examples == 2 * len(gen.pairs)
  batches = list(ev)
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])
  assert mask.sum() == ev.num_examples and not mask[ev.num_examples:].any()
  np.testing.assert_array_equal(index[:ev.num_examples], np.arange(ev.num_examples))
  for row in range(ev.num_examples):  # rows 2i, 2i + 1 = image_a, image_b of pair i
    want = augment.eval_transform(augment.decode_image(gen.images[str(row)]), 16)
    np.testing.assert_array_equal(images[row], want)


def test_missing_dataset_names_the_folder_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='data_prep.build --dataset=sop') as e:
    data.open_split(tmp_path, 'sop', 'train')
  assert str(tmp_path / 'sop') in str(e.value)
  with pytest.raises(ValueError, match='unknown dataset'):
    data.open_split(tmp_path, 'imagenet', 'train')


def test_missing_split_is_a_clear_error(converted):
  data_dir, _ = converted
  with pytest.raises(ValueError, match="not 'query'"):
    data.open_split(data_dir, 'sop', 'query')


def test_eval_undecodable_row_is_masked_not_dropped():
  examples = []
  for r in range(5):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 10 * r, np.uint8)).save(buf, 'PNG')
    examples.append({'image': buf.getvalue(), 'id': r, 'camera': 1, 'label': -1})
  examples[2]['image'] = b'garbage'
  split = data.MemorySplit('unit_eval', 'query', examples, num_ids=5)
  before = augment.decode_failure_counts().get('unit_eval/query', 0)
  batches = list(data.EvalDataset(split, image_size=4, batch_size=4))
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(mask, [True, True, False, True, True, False, False, False])
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, -1, -1, -1])
  assert batches[1]['image'][0, 0, 0, 0] == 40
  assert augment.decode_failure_counts()['unit_eval/query'] == before + 1


def _without(data_dir, tmp_path, *names):
  """A data_dir holding every converted set of ``data_dir`` but ``names`` (symlinks)."""
  out = tmp_path / 'data'
  out.mkdir()
  for name in os.listdir(data_dir):
    if name not in names:
      os.symlink(os.path.join(data_dir, name), out / name)
  return str(out)


def test_partial_data_refused_unless_allowed(converted, caplog):
  from ufo_jax.data import provenance  # pylint: disable=g-import-not-at-top
  data_dir, truth = converted
  config = _config(data_dir)
  assert config.input.allow_partial_data is True  # configs/ufo_tiny.py
  provenance._LOGGED.clear()  # pylint: disable=protected-access
  provenance._WARNED.clear()  # pylint: disable=protected-access
  with caplog.at_level('INFO'):
    assert data.open_training_data(config, data_dir).num_classes['product'] == 6
  logged = caplog.text
  assert f'training data: sop: {data_dir}/sop/1.0.0; data_prep ' in logged
  assert 'count check SKIPPED' in logged and 'train 24 images / 6 ids' in logged
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 2  # one line for the training sets, one for the test sets
  assert warnings[0].startswith('training: using PARTIAL data (counts differ')
  assert 'market1501, dukemtmc, msmt17' in warnings[0] and warnings[1].endswith(': lfw')
  config.input.allow_partial_data = False
  for fn in (data.open_training_data, data.create_train_dataset):
    with pytest.raises(data.PartialDataError) as e:
      fn(config, data_dir)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('partial converted data for training')
    train, query = (truth['market1501'].splits[s] for s in ('train', 'query'))
    assert (f'market1501 has train {len(train)} images / {len({i.id for i in train})} ids '
            '(expected 12,936 images / 751 ids), '
            f'query {len(query)} images / {len({i.id for i in query})} ids '
            '(expected 3,368 images / 750 ids)') in msg
    assert 'sop has train 24 images / 6 ids (expected 59,551 images / 11,318 ids)' in msg
    assert '--config.input.allow_partial_data=True' in msg


def test_recipe_trains_without_dukemtmc(converted, tmp_path):
  data_dir, truth = converted
  no_duke = _without(data_dir, tmp_path, 'dukemtmc')
  config = _config(no_duke)
  with pytest.raises(FileNotFoundError, match='withdrawn by its authors.*market1501'):
    data.open_training_data(config, no_duke)
  config.tasks.person.datasets = ('market1501', 'msmt17')
  counts = data.open_training_data(config, no_duke).num_classes
  assert counts['person'] == sum(len({it.id for it in truth[n].splits['train']})
                                 for n in ('market1501', 'msmt17'))
  it = iter(data.create_train_dataset(config, no_duke, process_index=0, process_count=1))
  batch = next(it)
  person = batch['label'][batch['task'] == config_lib.task_names(config).index('person')]
  assert len(person) == 8 and person.max() < counts['person']
  it.close()


def test_recipe_override_without_dukemtmc_and_partial_error(converted, tmp_path):
  """configs/ufo_l.py with the documented command-line override, on data without DukeMTMC."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  data_dir, _ = converted
  no_duke = _without(data_dir, tmp_path, 'dukemtmc')
  argv = ['main', f'--config={ROOT}/configs/ufo_l.py', f'--config.input.data_dir={no_duke}',
          "--config.tasks.person.datasets=('market1501','msmt17')"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)
  fv(argv)
  config = fv.config
  assert tuple(config.tasks.person.datasets) == ('market1501', 'msmt17')
  config_lib.validate(config)
  # ufo_l refuses the small converted sets: a ConfigError, which ufo_jax.main prints as one
  # `error:` line; DukeMTMC is neither needed nor named.
  with pytest.raises(config_lib.ConfigError) as e:
    data.open_training_data(config, no_duke)
  assert str(e.value).startswith('partial converted data for training')
  assert 'msmt17 has train' in str(e.value) and 'dukemtmc' not in str(e.value)
  config.input.allow_partial_data = True
  assert data.open_training_data(config, no_duke).num_classes['person'] == 12


def test_old_format_set_says_to_reconvert(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_prep import build, builders, generate  # pylint: disable=g-import-not-at-top
  # The format of the first data_prep: images as raw byte tensors.
  monkeypatch.setattr(builders, 'image_feature',
                      lambda: tfds.features.Tensor(shape=(), dtype=np.object_))
  gen = generate.write_dataset('sop', tmp_path, sizes=generate.Sizes(num_ids=2, images_per_id=2,
                                                                     image_size=16))
  build.convert('sop', gen.path, tmp_path / 'out', skip_count_check=True)
  with pytest.raises(data.OldFormatError, match=r'sop: .*converted by an earlier data_prep.*'
                     r'--dataset=sop .*--overwrite') as e:
    data.open_split(tmp_path / 'out', 'sop', 'train')
  assert '\n' not in str(e.value)


def test_allow_partial_data_in_the_configs():
  assert config_lib.load_config('ufo_l').input.allow_partial_data is False
  assert config_lib.load_config('ufo_tiny').input.allow_partial_data is True
  import ml_collections  # pylint: disable=g-import-not-at-top
  d = config_lib.load_config('ufo_tiny').to_dict()
  d['input']['allow_partial_data'] = 'yes'
  with pytest.raises(config_lib.ConfigError, match='input.allow_partial_data'):
    config_lib.validate(ml_collections.ConfigDict(d))


def test_partial_test_set_refused_at_the_start_of_training(converted, monkeypatch):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from ufo_jax import catalog  # pylint: disable=g-import-not-at-top
  data_dir, truth = converted
  sop = {s: catalog.SplitInfo(len(v), len({it.id for it in v}))
         for s, v in truth['sop'].splits.items()}  # the fixture's sop counts as the published
  monkeypatch.setitem(catalog.DATASETS, 'sop',
                      dataclasses.replace(catalog.DATASETS['sop'], splits=sop))
  config = _config(data_dir)
  for task in ('face', 'person', 'vehicle'):
    del config.tasks[task]
  config.input.allow_partial_data = False
  config.eval.sets = ('lfw', 'sop', 'cplfw')  # cplfw is not converted: left to the evaluation
  with pytest.raises(data.PartialDataError, match=r'^partial converted data for evaluation .*'
                     r'lfw has test 20 images \(expected 12,000 images\)'):
    data.open_training_data(config, data_dir)
  config.eval.sets = ('sop', 'cplfw')
  assert data.open_training_data(config, data_dir).num_classes == {'product': 6}


def test_a_damaged_set_is_one_line_in_training_and_evaluation(converted, tmp_path):
  """Real damaged shards: a truncated copy, flipped bytes (read through a grain worker
  process, as evaluation with eval.worker_count reads), an invalid dataset_info.json and a
  folder holding another dataset. Each is one line naming the file and the fix."""
  import glob
  import re
  import shutil

  from ufo_jax.data import eval_input, sources

  data_dir, truth = converted
  copy = tmp_path / 'data'
  shutil.copytree(os.path.join(data_dir, 'market1501'), copy / 'market1501')
  folder = copy / 'market1501' / '1.0.0'
  fix = (f'convert it again: python -m data_prep.build --dataset=market1501 '
         f'--raw_dir={os.path.abspath(truth["market1501"].path)} --out_dir={copy} --overwrite')

  def damaged(pattern, fn):
    with pytest.raises(sources.DamagedDataError, match=pattern) as e:
      fn()
    assert isinstance(e.value, config_lib.ConfigError)  # ufo_jax.main: one error: line
    assert '\n' not in str(e.value) and str(e.value).endswith(fix), str(e.value)

  query = glob.glob(str(folder / 'market1501-query.array_record-*'))[0]
  good = open(query, 'rb').read()
  os.truncate(query, len(good) // 2)
  damaged(rf'market1501/query: {re.escape(query)} has {len(good) // 2} bytes, {len(good)} when '
          r'it was converted \(truncated\?\)',
          lambda: data.create_eval_dataset(copy, 'market1501', 'query', image_size=16,
                                           batch_size=4))
  with open(query, 'wb') as f:  # same size, 64 bytes flipped inside the records
    f.write(good[:1000] + bytes(b ^ 0xFF for b in good[1000:1064]) + good[1064:])
  split = data.open_split(copy, 'market1501', 'query')
  ev = eval_input.EvalDataset(split, image_size=16, batch_size=4, worker_count=1)
  damaged(rf'market1501/query: the records of {re.escape(query)} do not read \(RuntimeError: '
          r'Corrupted Riegeli', lambda: list(ev))
  train = glob.glob(str(folder / 'market1501-train.array_record-*'))[0]
  with open(train, 'r+b') as f:
    f.seek(1000)
    f.write(bytes(b ^ 0xFF for b in open(train, 'rb').read()[1000:1064]))
  damaged(rf'market1501/train: the records of {re.escape(train)} do not read',
          lambda: sources.TaskSource('person', [sources.open_train_split(copy, 'market1501')])
          .labels())
  shutil.copytree(os.path.join(data_dir, 'market1501'), copy / 'dukemtmc')
  with pytest.raises(sources.DamagedDataError, match=r"dukemtmc: .* holds the converted dataset "
                     r"'market1501' \(its dataset_info.json\), not 'dukemtmc'"):
    data.open_split(copy, 'dukemtmc', 'train')
  (folder / 'dataset_info.json').write_text('{"name": "market1501", "splits": [')
  with pytest.raises(sources.DamagedDataError, match=r'market1501: .*dataset_info.json cannot be '
                     r'read \(') as e:
    data.open_split(copy, 'market1501', 'query')
  assert '\n' not in str(e.value)
