"""Tasks of your own end to end (docs/CUSTOM_DATA.md): a config with one public and two custom
tasks trains, evaluates (report.json under the custom names), exports and embeds; adding a task
to a trained run restores exactly its backbone and shared heads, and the report compares with
the source's."""

import json
import os

import jax
import numpy as np
import pytest

from data_prep import build, generate
from tests.test_custom_data import SIZE, write_csv_set, write_folders_set
from ufo_jax import config as config_lib
from ufo_jax import pytree


@pytest.fixture(scope='module')
def three_sets(tmp_path_factory):
  """market1501 (generated), shoes (csv, re-id without cameras), bikes (folders, retrieval)."""
  root = tmp_path_factory.mktemp('custom_tasks')
  out = root / 'out'
  gen = generate.write_dataset('market1501', root / 'raw',
                               sizes=generate.Sizes(num_ids=4, images_per_id=4, image_size=SIZE))
  build.convert('market1501', gen.path, out, skip_count_check=True)
  build.convert('shoes', write_csv_set(str(root / 'raw' / 'shoes'), cameras=False), out,
                layout='csv', task='shoes')
  build.convert('bikes', write_folders_set(str(root / 'raw' / 'bikes')), out, layout='folders',
                task='bikes')
  return str(out)


def _config(data_dir, tasks):
  config = config_lib.load_config('ufo_tiny')
  config.input.source, config.input.data_dir, config.input.image_size = 'tfds', data_dir, SIZE
  config.input.synthetic_num_classes = 0
  config.model.depth, config.model.scan_layers, config.model.drop_path_rate = 2, True, 0.1
  config.tasks = config_lib.load_config('ufo_tiny').tasks  # replaced below
  for name in list(config.tasks):
    del config.tasks[name]
  for name, datasets in tasks.items():
    config.tasks[name] = config_lib.task_config(datasets=datasets, batch_size=8, scale=30.0,
                                                margin=0.2, triplet=True)
  config.train.steps, config.train.log_every, config.train.checkpoint_every = 2, 1, 2
  config.eval.sets = tuple(d for ds in tasks.values() for d in ds)
  config.eval.batch_size, config.eval.figures = 16, False
  return config


def _flat(tree, prefix):
  return {pytree.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
          if pytree.path_name(p).startswith(prefix)}


def test_three_tasks_train_evaluate_export_embed_and_add_a_task(three_sets, tmp_path, caplog,
                                                                monkeypatch):
  from ufo_jax import embed, export, train  # pylint: disable=g-import-not-at-top
  # A run with the public task and one custom task.
  two = _config(three_sets, {'person': ('market1501',), 'shoes': ('shoes',)})
  first = str(tmp_path / 'first')
  trained = train.train_and_evaluate(two, first)
  before_json = os.path.join(first, 'eval', 'step_2', 'report.json')
  before = json.load(open(before_json))
  assert set(before['ours']) == {'market1501', 'shoes'}
  assert before['columns'][-1] == 'shoes' and len(before['ours']['shoes']) == 2  # rank-1, mAP
  assert before['metrics']['shoes']['num_valid_queries'] == 3  # the lonely query is left out

  # Add a third task (bikes, retrieval) on top of the first run: the started run's state (before
  # its first step donates it) holds exactly the first run's backbone and shared heads.
  three = _config(three_sets, {'person': ('market1501',), 'shoes': ('shoes',),
                               'bikes': ('bikes',)})
  three.eval.compare_to = before_json
  started = {}

  def start(*args, **kwargs):
    run = real_start(*args, **kwargs)
    started['step'] = int(run.state['step'])
    started['state'] = jax.device_get({k: run.state[k] for k in ('params', 'model_state')})
    return run

  real_start = train.start
  monkeypatch.setattr(train, 'start', start)
  second = str(tmp_path / 'second')
  with caplog.at_level('INFO'):
    train.train_and_evaluate(three, second, checkpoint_path=first)
  assert started['step'] == 0
  for prefix in ('params/backbone', 'params/heads/person', 'params/heads/shoes',
                 'model_state/heads/person'):
    want, got = _flat(trained, prefix), _flat(started['state'], prefix)
    assert want and set(want) == set(got), prefix
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert _flat(started['state'], 'params/heads/bikes')
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('adding task')]
  assert len(lines) == 1 and 'heads person, shoes from there, heads bikes new' in lines[0]

  # Its evaluation has the comparison row; export and embed.
  report = json.load(open(os.path.join(second, 'eval', 'step_2', 'report.json')))
  assert set(report['ours']) == {'market1501', 'shoes', 'bikes'}
  assert report['columns'][-2:] == ['shoes', 'bikes']
  assert {'1', '10'} <= set(report['metrics']['bikes'])  # Recall@K
  assert len(report['ours']['bikes']) == 1 and 0.0 <= report['ours']['bikes'][0] <= 100.0
  assert report['before']['source'] == before_json
  change = report['before']['change']['shoes']
  np.testing.assert_allclose(change, np.subtract(report['ours']['shoes'],
                                                 before['ours']['shoes']), atol=1e-9)
  md = open(os.path.join(second, 'eval', 'step_2', 'report.md')).read()
  assert '| shoes | bikes |' in md and f'before ({before_json})' in md and '| change |' in md
  assert report['notes'] == ['shoes: no camera ids, so only the query image itself is removed '
                             'from its gallery (no same-identity-same-camera removal)']
  assert 'Notes: shoes: no camera ids' in md
  out = str(tmp_path / 'export')
  info = export.export(second, out, formats='onnx', print_fn=lambda *_: None)
  assert info['tasks'] == ['bikes', 'person', 'shoes']  # the config's order (sorted names)
  import onnx  # pylint: disable=g-import-not-at-top
  graph = onnx.load(os.path.join(out, 'embed.onnx')).graph
  assert [o.name for o in graph.output] == ['bikes', 'person', 'shoes']
  summary = embed.run(out, os.path.join(three_sets, '..', 'raw', 'bikes', 'test'),
                      str(tmp_path / 'e.npz'), runtime='onnx', print_fn=lambda *_: None)
  data = np.load(tmp_path / 'e.npz')
  assert summary['images'] == 12
  for task in ('person', 'shoes', 'bikes'):
    assert data[task].shape == (12, 192)
    np.testing.assert_allclose(np.linalg.norm(data[task], axis=1), 1.0, rtol=1e-4)


def test_an_export_folder_gives_the_backbone_and_shared_necks_to_a_config_with_more_tasks(
    tmp_path):
  """``--checkpoint=EXPORT_DIR`` (or ``model.pretrained=EXPORT_DIR``) with more tasks: the backbone
  and the necks of the tasks both have come from the export's params/, the new task's head and
  every class weight stay as initialised; a shape that differs is one line."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from ufo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ufo_jax import inference, train  # pylint: disable=g-import-not-at-top
  from ufo_jax.models import multitask  # pylint: disable=g-import-not-at-top

  def tiny(tasks):
    config = config_lib.load_config('configs/ufo_tiny.py')
    config.model.depth, config.model.scan_layers, config.model.drop_path_rate = 2, True, 0.1
    config.model.pretrained = 'none'
    with config.tasks.unlocked():
      for task in list(config.tasks.keys()):
        if task not in tasks:
          delattr(config.tasks, task)
    return config

  small = tiny(('person', 'product'))
  exported = inference.create_model(small, rngs=nnx.Rngs(7)).model
  folder = tmp_path / 'export'
  folder.mkdir()
  (folder / 'model.json').write_text(json.dumps({'tasks': ['person', 'product']}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(folder / 'params'), nnx.to_pure_dict(nnx.state(exported)))

  big = tiny(('face', 'person', 'product', 'vehicle'))
  assert train._export_as_pretrained(big, str(tmp_path / 'run'), str(folder)) is None
  assert config_lib.pretrained_path(big) == str(folder)  # a folder is accepted
  model = multitask.create_model(big, {t: 5 for t in ('face', 'person', 'product', 'vehicle')},
                                 rngs=nnx.Rngs(1), load_pretrained=False)
  fresh = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  info = multitask.load_backbone_weights(model, str(folder))
  assert info['heads'] == 'person, product' and info['ignored'] == []
  got = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  want = jax.device_get(nnx.to_pure_dict(nnx.state(exported)))
  np.testing.assert_array_equal(got['backbone']['blocks']['attn']['qkv']['kernel'],
                                want['backbone']['blocks']['attn']['qkv']['kernel'])
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)  # parameters and statistics
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
                       if jax.numpy.issubdtype(v.dtype, jax.numpy.floating)}
  got, want, fresh = flat(got), flat(want), flat(fresh)
  for name, value in want.items():  # every exported array arrived
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  kept = [n for n in got if n not in want]
  assert any("'face'" in n for n in kept) and any("'vehicle'" in n for n in kept)
  assert any('class_weights' in n for n in kept)
  for name in kept:  # the new heads and every class weight as initialised
    np.testing.assert_array_equal(got[name], fresh[name], err_msg=name)

  wide = tiny(('person',))
  wide.model.variant = 'S/16'
  other = multitask.create_model(wide, {'person': 5}, rngs=nnx.Rngs(1), load_pretrained=False)
  with pytest.raises(ValueError, match=r'has shape .* in the export, .* for the config'):
    multitask.load_backbone_weights(other, str(folder))
