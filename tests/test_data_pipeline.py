"""The training input over in-memory sources: batch composition, labels, resumption, workers.

Every record's image is a solid colour that encodes (dataset, record), so with
augmentation switched off each batch row says which record it came from.
"""

import io
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ufo_jax import config as config_lib
from ufo_jax.data import augment, pipeline, sampling
from ufo_jax.data.sources import MemorySplit, TaskSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(**batch):
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 8
  config.input.worker_count = 0
  for task in config.tasks:
    config.tasks[task].batch_size = batch.get(task, 8)
  return config


def _png(color) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 4, 3), color, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def _sources(config, seed=0, num_ids=7):
  """{task: TaskSource}; returns also {(dataset position in the whole mix): (name, labels)}."""
  rng = np.random.default_rng(seed)
  sources, table = {}, {}
  d_global = 0
  for task in config_lib.task_names(config):
    splits = []
    for name in config.tasks[task].datasets:
      n_ids = num_ids + d_global % 3
      counts = rng.integers(1, 8, size=n_ids)
      counts[0] = 4
      labels = np.repeat(np.arange(n_ids), counts)[rng.permutation(counts.sum())]
      examples = [{'image': _png((20 * d_global + 10, r, 200)), 'label': int(lab), 'id': int(lab),
                   'camera': 0, 'path': b''} for r, lab in enumerate(labels)]
      splits.append(MemorySplit(name, 'train', examples, num_ids=n_ids))
      table[20 * d_global + 10] = (task, name, labels, len(splits) - 1)
      d_global += 1
    sources[task] = TaskSource(task, splits)
  return sources, table


def _no_augment(config):
  config.input.augment.autoaugment_prob = 0.0
  config.input.augment.pad = 0
  config.input.augment.flip_prob = 0.0
  return config


def _origin(batch, table):
  """(task, dataset name, record, original label, dataset position) of every row."""
  out = []
  for img in batch['image']:
    c = img[0, 0]
    assert (img == c).all()
    task, name, labels, pos = table[int(c[0])]
    out.append((task, name, int(c[1]), int(labels[c[1]]), pos))
  return out


def _take(ds, n, start_state=None):
  it = iter(ds)
  if start_state is not None:
    it.set_state(start_state)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_heterogeneous_batches_counts_labels_and_identities():
  config = _no_augment(_tiny_config(face=8, person=8, product=4, vehicle=12))
  sources, table = _sources(config)
  ds = pipeline.build_train_dataset(config, sources)
  tasks = config_lib.task_names(config)
  sizes = [int(config.tasks[t].batch_size) for t in tasks]
  for batch in _take(ds, 6):
    assert batch['image'].shape == (sum(sizes), 8, 8, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['task'].dtype == np.int32
    np.testing.assert_array_equal(batch['task'], np.repeat(np.arange(len(tasks)), sizes))
    rows = _origin(batch, table)
    for (task, _name, _, label, pos), t_idx, lab in zip(rows, batch['task'], batch['label']):
      assert tasks[t_idx] == task
      src = sources[task]
      offset = int(src.label_offsets[pos])  # label + train ids of the datasets before it
      assert lab == label + offset
      assert 0 <= lab < src.num_classes
    for t_idx, task in enumerate(tasks):
      if config.tasks[task].sampler != 'identity':
        continue
      lab = batch['label'][batch['task'] == t_idx].reshape(-1, 4)
      assert (lab == lab[:, :1]).all() and len(set(lab[:, 0])) == len(lab)


def test_labels_distinct_across_datasets_of_a_task():
  config = _tiny_config()
  sources, _ = _sources(config)
  for _task, src in sources.items():
    labels = src.labels()
    ranges = []
    for d, _s in enumerate(src.splits):
      part = labels[src.record_offsets[d]:src.record_offsets[d + 1]]
      ranges.append(set(part.tolist()))
      assert part.min() >= src.label_offsets[d] and part.max() < src.label_offsets[d + 1]
    for i in range(len(ranges)):
      for j in range(i + 1, len(ranges)):
        assert not ranges[i] & ranges[j]
    assert src.num_classes == sum(s.num_ids for s in src.splits)


def test_same_seed_same_batches_other_seed_differs():
  config = _tiny_config()
  sources, _ = _sources(config)
  a = _take(pipeline.build_train_dataset(config, sources), 3)
  b = _take(pipeline.build_train_dataset(config, sources), 3)
  _assert_same(a, b)
  config.seed = 1
  c = _take(pipeline.build_train_dataset(config, sources), 1)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_restore_state_and_orbax_round_trip(tmp_path):
  config = _tiny_config()
  sources, _ = _sources(config)
  ds = pipeline.build_train_dataset(config, sources)
  reference = _take(ds, 6)
  it = iter(ds)
  for _ in range(3):
    next(it)
  assert it.get_state() == {'step': 3}
  mngr = ocp.CheckpointManager(tmp_path / 'ckpt')
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  _assert_same([next(it), next(it)], reference[3:5])
  it.close()
  restored = iter(pipeline.build_train_dataset(config, sources))
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert restored.get_state() == {'step': 3}
  _assert_same([next(restored) for _ in range(3)], reference[3:6])
  restored.close()
  with pytest.raises(ValueError, match='step'):
    iter(ds).set_state({'nope': 1})


def test_two_processes_read_disjoint_slices_covering_the_data():
  config = _no_augment(_tiny_config(face=8, person=16, product=8, vehicle=16))
  sources, table = _sources(config)
  tasks = config_lib.task_names(config)
  used, local = [], []
  for p in range(2):
    ds = pipeline.build_train_dataset(config, sources, process_index=p, process_count=2)
    local.append({t.name: set(t.sampler.local_records().tolist()) for t in ds.make_batch.tasks})
    rows = set()
    for batch in _take(ds, 4):
      assert len(batch['label']) == sum(int(config.tasks[t].batch_size) // 2 for t in tasks)
      for task, _, rec, _, pos in _origin(batch, table):
        rows.add((task, int(sources[task].record_offsets[pos]) + rec))
    used.append(rows)
  for task in tasks:
    assert not local[0][task] & local[1][task]
    assert local[0][task] | local[1][task] == set(range(sources[task].num_records))
    for p in range(2):
      assert {r for t, r in used[p] if t == task} <= local[p][task]


def test_undecodable_record_is_counted_and_replaced():
  config = _no_augment(_tiny_config())
  sources, table = _sources(config)
  person = sources['person']
  split = person.splits[0]
  labels = split.column('label')
  bad = int(np.flatnonzero(labels == 0)[0])  # identity 0 has exactly 4 images
  split.examples[bad]['image'] = b'\xff\xd8 truncated jpeg'
  before = augment.decode_failure_counts().get(split.dataset, 0)
  ds = pipeline.build_train_dataset(config, sources)
  sampler = ds.make_batch.tasks[config_lib.task_names(config).index('person')].sampler
  for batch in _take(ds, 2 * sampler.steps_per_epoch):
    assert len(batch['label']) == 32
    for (task, name, rec, label, pos), lab in zip(_origin(batch, table), batch['label']):
      assert not (name == split.dataset and rec == bad)
      assert lab == label + int(sources[task].label_offsets[pos])
  assert augment.decode_failure_counts()[split.dataset] > before


def test_homogeneous_batches_one_task_in_proportion():
  config = _no_augment(_tiny_config(face=16, person=8, product=8, vehicle=8))
  config.input.batch_mode = 'homogeneous'
  sources, table = _sources(config, num_ids=16)
  tasks = config_lib.task_names(config)
  seen = []
  for batch in _take(pipeline.build_train_dataset(config, sources), 40):
    assert len(batch['task']) == 40
    t = int(batch['task'][0])
    assert (batch['task'] == t).all()
    assert {row[0] for row in _origin(batch, table)} == {tasks[t]}
    if config.tasks[tasks[t]].sampler == 'identity':
      lab = batch['label'].reshape(-1, 4)
      assert (lab == lab[:, :1]).all() and len(set(lab[:, 0])) == 10
    seen.append(t)
  # The task of each step is the seeded draw ∝ batch size (its statistics: test_data_sampling).
  chooser = sampling.TaskChooser([16, 8, 8, 8], seed=int(config.seed))
  assert seen == [chooser.choose(s)[0] for s in range(40)]
  assert set(seen) == {0, 1, 2, 3}


def test_worker_processes_give_the_same_batches_and_resume():
  config = _tiny_config()
  sources, _ = _sources(config)
  reference = _take(pipeline.build_train_dataset(config, sources), 5)
  config.input.worker_count = 2
  ds = pipeline.build_train_dataset(config, sources)
  it = iter(ds)
  got = [next(it) for _ in range(3)]
  assert it.get_state() == {'step': 3}
  it.set_state({'step': 2})  # a restored state restarts the workers at that step
  rest = [next(it) for _ in range(3)]
  it.close()
  _assert_same(got, reference[:3])
  _assert_same(rest, reference[2:5])
