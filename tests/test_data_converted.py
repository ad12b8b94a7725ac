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
  counts = data.num_classes(config, data_dir)
  for task in config_lib.task_names(config):
    want = sum(len({it.id for it in truth[n].splits['train']}) for n in config.tasks[task].datasets)
    assert counts[task] == want
    assert config_lib.num_classes(config, task, counts) == want
  sources = data.open_task_sources(config, data_dir)
  for task, src in sources.items():
    labels = src.labels()
    for d in range(len(src.splits)):
      part = labels[src.record_offsets[d]:src.record_offsets[d + 1]]
      assert src.label_offsets[d] <= part.min() and part.max() < src.label_offsets[d + 1]
    assert len(np.unique(labels)) == counts[task]


def test_create_train_dataset_from_converted_data(converted):
  data_dir, _ = converted
  config = _config(data_dir)
  counts = data.num_classes(config, data_dir)
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
