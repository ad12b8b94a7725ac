"""The configs hold the recipe of docs/TRAINING.md and are validated with clear errors."""

import os

import pytest

from ufo_jax import catalog
from ufo_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return config_lib.load_config(name)


def test_load_config_by_name_or_path_and_clear_errors(tmp_path):
  by_path = config_lib.load_config(os.path.join(ROOT, 'configs', 'ufo_tiny.py'))
  assert by_path.to_dict() == config_lib.load_config('ufo_tiny').to_dict()
  with pytest.raises(config_lib.ConfigError, match='ufo_huge.py not found'):
    config_lib.load_config('ufo_huge')
  empty = tmp_path / 'empty.py'
  empty.write_text('x = 1\n')
  with pytest.raises(config_lib.ConfigError, match='defines no get_config'):
    config_lib.load_config(str(empty))


def test_ufo_l_is_the_published_recipe():
  c = load('ufo_l')
  assert config_lib.task_names(c) == ('face', 'person', 'product', 'vehicle')
  assert {t: c.tasks[t].batch_size for t in c.tasks} == {
      'face': 1024, 'person': 512, 'product': 512, 'vehicle': 512}
  assert config_lib.global_batch_size(c) == 2560
  assert {t: (c.tasks[t].cosface_scale, c.tasks[t].cosface_margin) for t in c.tasks} == {
      'face': (50.0, 0.3), 'person': (30.0, 0.2), 'vehicle': (20.0, 0.2),
      'product': (30.0, 0.2)}
  assert not c.tasks.face.triplet
  assert all(c.tasks[t].triplet and c.tasks[t].num_instances == 4
             for t in ('person', 'vehicle', 'product'))
  assert tuple(c.tasks.vehicle.datasets) == ('veri776', 'vehicleid', 'veriwild')
  assert tuple(c.tasks.person.datasets) == ('market1501', 'dukemtmc', 'msmt17')
  assert c.input.image_size == 384 and c.input.source == 'tfds'
  a = c.input.augment
  assert (a.autoaugment_prob, a.autoaugment_fill, a.pad, a.flip_prob) == (0.5, 128, 10, 0.5)
  assert (a.mean, a.std, a.erasing_prob) == (127.5, 127.5, 0.5)
  assert tuple(a.erasing_area) == pytest.approx((0.02, 1 / 3))
  assert tuple(a.erasing_aspect) == (0.3, 3.3)
  assert (c.model.backbone, c.model.variant, c.model.drop_path_rate) == ('vit', 'L/16', 0.2)
  o = c.optim
  assert (o.name, o.lr, o.momentum, o.weight_decay, o.grad_clip, o.clip_mode) == (
      'sgd', 0.2, 0.0, 1e-4, 5.0, 'per_param')
  assert (o.warmup_fraction, o.final_lr_fraction) == (0.1, 0.02)
  assert c.train.steps == 100_000
  assert tuple(c.eval.sets) == catalog.BENCHMARKS and len(catalog.BENCHMARKS) == 13
  c.input.data_dir = '/data'
  config_lib.validate(c, num_devices=256, num_processes=32)


def test_full_size_class_counts_from_catalog():
  c = load('ufo_l')
  c.input.source = 'synthetic'
  got = {t: config_lib.num_classes(c, t) for t in c.tasks}
  assert got == {'face': 93_431, 'person': 751 + 702 + 1_041,
                 'vehicle': 576 + 13_164 + 30_671, 'product': 11_318}
  # Converted data wins over the catalog; a config value below it is an error.
  assert config_lib.num_classes(c, 'product', {'product': 10}) == 10
  c.tasks.product.num_classes = 5
  with pytest.raises(config_lib.ConfigError, match='tasks.product.num_classes'):
    config_lib.num_classes(c, 'product', {'product': 10})


def test_tiny_validates_on_one_and_eight_devices():
  c = load('ufo_tiny')
  assert c.model.variant == 'Ti/16' and c.input.source == 'synthetic'
  for n in (1, 8):
    config_lib.validate(c, num_devices=n)
  assert config_lib.mesh_shape(c.mesh, 8) == {'data': 8, 'fsdp': 1}
  c.mesh.fsdp = 4
  assert config_lib.mesh_shape(c.mesh, 8) == {'data': 2, 'fsdp': 4}


@pytest.mark.parametrize('mutate, field', [
    (lambda c: c.tasks.person.update(datasets=('market1502',)), 'tasks.person.datasets'),
    (lambda c: c.tasks.person.update(datasets=()), 'tasks.person.datasets'),
    (lambda c: c.tasks.person.update(datasets=('sop',)), 'tasks.person.datasets'),
    (lambda c: c.tasks.face.update(datasets=('lfw',)), 'tasks.face.datasets'),
    (lambda c: c.tasks.person.update(batch_size=18), 'tasks.person.batch_size'),
    (lambda c: c.model.update(variant='XL/16'), 'model.variant'),
    (lambda c: c.input.update(image_size=70), 'input.image_size'),
    (lambda c: c.input.update(source='tfds', data_dir=''), 'input.data_dir'),
    (lambda c: c.input.update(batch_mode='mixed'), 'input.batch_mode'),
    (lambda c: c.eval.update(sets=('lfw', 'imagenet')), 'eval.sets'),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), 'mesh'),
    (lambda c: c.mesh.update(data=3, fsdp=1), 'mesh'),
    (lambda c: c.optim.update(name='adamw'), 'optim.name'),
])
def test_bad_configs_name_the_field(mutate, field):
  c = load('ufo_tiny')
  mutate(c)
  with pytest.raises(config_lib.ConfigError, match=f'config.{field}'):
    config_lib.validate(c, num_devices=8)


def test_batch_the_mesh_cannot_divide():
  c = load('ufo_tiny')
  c.tasks.face.batch_size = 36  # global batch 84 on 8 devices
  with pytest.raises(config_lib.ConfigError, match=r'global batch 84 .* 8 devices'):
    config_lib.validate(c, num_devices=8)
  config_lib.validate(c, num_devices=4)
  with pytest.raises(config_lib.ConfigError, match='tasks.face.batch_size: 36 .* 32 processes'):
    config_lib.validate(c, num_devices=4, num_processes=32)


def test_unknown_task_name():
  c = load('ufo_tiny')
  c.tasks.animal = c.tasks.product
  with pytest.raises(config_lib.ConfigError, match='config.tasks.animal'):
    config_lib.validate(c)


def test_run_config_round_trip_and_lookup(tmp_path):
  cfg = config_lib.load_config('ufo_tiny')
  cfg.train.steps = 7
  workdir = tmp_path / 'run'
  path = config_lib.save_run_config(cfg, str(workdir))
  assert path == str(workdir / config_lib.RUN_CONFIG_FILE)
  step_dir = workdir / 'checkpoints' / '100'
  step_dir.mkdir(parents=True)
  for where in (workdir, workdir / 'checkpoints', step_dir):
    loaded = config_lib.load_run_config(str(where))
    assert loaded == cfg
    assert loaded.train.steps == 7
    assert isinstance(loaded.tasks.person.datasets, tuple)
  config_lib.validate(loaded)
  with pytest.raises(FileNotFoundError, match='config.json'):
    config_lib.load_run_config(str(tmp_path / 'elsewhere'))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'config.json').write_text('[1, 2]')
  with pytest.raises(config_lib.ConfigError, match='expected a JSON object'):
    config_lib.load_run_config(str(tmp_path / 'bad'))


def _saved_with(tmp_path, edit):
  """A run folder whose config.json (ufo_tiny) was edited by hand with ``edit(dict)``."""
  import json

  data = json.loads(config_lib.config_to_json(config_lib.load_config('ufo_tiny')))
  edit(data)
  (tmp_path / 'config.json').write_text(json.dumps(data, indent=2))
  return str(tmp_path / 'config.json')


def test_a_typo_in_a_saved_config_json_names_the_file_key_and_closest_key(tmp_path):
  import subprocess
  import sys

  path = _saved_with(tmp_path, lambda d: d['train'].update(stpes=d['train'].pop('steps')))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_run_config(str(tmp_path))
  assert str(e.value) == (f'{path}: unknown key train.stpes; the closest known key is '
                          'train.steps, which the file lacks (correct the key in the file)')
  # A task's fields are compared with a task's, whatever its name; extra keys are kept.
  _saved_with(tmp_path, lambda d: d['tasks']['person'].update(
      num_instance=d['tasks']['person'].pop('num_instances')))
  with pytest.raises(config_lib.ConfigError, match=r'tasks\.person\.num_instance; .* '
                     r'tasks\.person\.num_instances'):
    config_lib.load_run_config(str(tmp_path))
  _saved_with(tmp_path, lambda d: d['train'].update(my_note='x'))
  assert config_lib.load_run_config(str(tmp_path)).train.my_note == 'x'
  # The command line a user types to change a field of the run: the file is blamed, not it.
  _saved_with(tmp_path, lambda d: d['train'].update(stpes=d['train'].pop('steps')))
  proc = subprocess.run(
      [sys.executable, '-m', 'ufo_jax.main', f'--workdir={tmp_path}', '--config.train.steps=3'],
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT), cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f'error: {path}: unknown key train.stpes; the closest known key is train.steps, which '
      'the file lacks (correct the key in the file)'], proc.stderr[-2000:]
