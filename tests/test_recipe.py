"""Recipe fidelity: evaluation compute dtype, the pretrained-checkpoint requirement, configs."""

import numpy as np
import pytest
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import sharding
from ufo_jax.evaluation import extract
from ufo_jax.models import multitask

SIZE = 32
CLASSES = {'face': 3, 'person': 3, 'vehicle': 3, 'product': 3}


def tiny_config(dtype='float32'):
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = SIZE
  config.model.depth = 1
  config.model.scan_layers = False
  config.model.dtype = dtype
  return config


def _batches(images):
  n = len(images)
  return [{'image': images, 'mask': np.ones(n, bool), 'index': np.arange(n),
           'id': np.arange(n), 'camera': np.zeros(n, int)}]


def test_evaluation_embeds_in_float32_whatever_the_model_dtype():
  """A bfloat16-trained model embeds as its float32 twin (same weights) unless told bf16."""
  images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
  mesh = sharding.create_mesh(tiny_config().mesh)
  aug = tiny_config().input.augment
  emb = {}
  for model_dtype, dtypes in (('bfloat16', ('float32', 'bfloat16')), ('float32', ('float32',))):
    model = multitask.create_model(tiny_config(model_dtype), CLASSES,
                                   rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, state = nnx.split(model)
    for dtype in dtypes:
      emb[model_dtype, dtype] = extract.extract_embeddings(
          graphdef, state, _batches(images), 'person', mesh=mesh, augment_config=aug,
          progress=False, **({} if dtype == 'float32' else {'dtype': dtype})).features
  # Default (float32) on the bf16 model == the float32 model: the same parameters.
  np.testing.assert_allclose(emb['bfloat16', 'float32'], emb['float32', 'float32'], rtol=1e-5,
                             atol=1e-5)
  # ... and bf16 embeddings really differ (the option is not a no-op).
  assert np.abs(emb['bfloat16', 'bfloat16'] - emb['float32', 'float32']).max() > 1e-3
  with pytest.raises(ValueError, match='eval.dtype'):
    extract.with_compute_dtype(graphdef, (state,), 'float16')


def test_eval_dtype_and_pretrained_validation(tmp_path):
  config = tiny_config()
  assert config_lib.load_config('ufo_l').eval.dtype == 'float32'
  config.eval.dtype = 'float16'
  with pytest.raises(config_lib.ConfigError, match='eval.dtype'):
    config_lib.validate(config)
  config = tiny_config()
  config.model.pretrained = str(tmp_path / 'vit.pth')
  with pytest.raises(config_lib.ConfigError, match='model.pretrained.*checkpoint file'):
    config_lib.validate(config)
  config.model.pretrained = str(tmp_path / 'vit.safetensors')
  config_lib.validate(config)  # the file is checked when training starts, not here
  config.model.backbone, config.model.variant = 'resnet', '18'
  with pytest.raises(config_lib.ConfigError, match='ViT backbone only'):
    config_lib.validate(config)


def test_pretrained_path_requirement(tmp_path):
  config = config_lib.load_config('ufo_l')
  assert config.model.pretrained == ''  # ufo_l: required, no silent from-scratch default
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.pretrained_path(config)
  message = str(e.value)
  assert '\n' not in message and 'vit_large_patch16_224.augreg_in21k' in message
  assert 'huggingface-cli download' in message and 'pretrained=none' in message
  config.model.pretrained = str(tmp_path / 'absent.safetensors')
  with pytest.raises(config_lib.ConfigError, match='absent.safetensors: no such file.*'
                                                   'augreg_in21k'):
    config_lib.pretrained_path(config)
  (tmp_path / 'absent.safetensors').write_bytes(b'x')
  assert config_lib.pretrained_path(config) == str(tmp_path / 'absent.safetensors')
  config.model.pretrained = 'none'
  assert config_lib.pretrained_path(config) is None
  assert config_lib.load_config('ufo_tiny').model.pretrained == 'none'
  # 'none' builds a model without reading anything.
  multitask.create_model(tiny_config(), CLASSES, rngs=nnx.Rngs(0))


def test_ablation_batch_r50_config():
  config = config_lib.load_config('ablation_batch_r50')
  assert config_lib.task_names(config) == ('person', 'product')
  assert config.tasks.person.datasets == ('market1501',)
  assert config.tasks.product.datasets == ('sop',)
  assert (config.model.backbone, config.model.variant) == ('resnet', '50')
  assert tuple(config.eval.sets) == ('market1501', 'sop')
  assert config.input.batch_mode == 'heterogeneous'
  recipe = config_lib.load_config('ufo_l')
  for task in ('person', 'product'):  # the recipe otherwise
    for key in ('batch_size', 'cosface_scale', 'cosface_margin', 'triplet', 'sampler'):
      assert config.tasks[task][key] == recipe.tasks[task][key]
  assert config.input.augment.to_dict() == recipe.input.augment.to_dict()
  assert config.optim.to_dict() == recipe.optim.to_dict()
  assert config.input.image_size == recipe.input.image_size
  config.input.data_dir = '/data'
  config.input.batch_mode = 'homogeneous'
  config_lib.validate(config, num_devices=8)


@pytest.fixture(scope='module')
def person_product_data(tmp_path_factory):
  from data_prep import build, generate  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('two_tasks')
  sizes = generate.Sizes(num_ids=4, images_per_id=4, image_size=SIZE)
  for name in ('market1501', 'sop'):
    gen = generate.write_dataset(name, root / 'raw', sizes=sizes)
    build.convert(name, gen.path, root / 'out', skip_count_check=True)
  return str(root / 'out')


def test_two_task_config_trains_evaluates_and_reports(person_product_data, tmp_path):
  """The ablation's two-task config end to end, in its homogeneous arm (one task per step, so
  one head sees no example in a step); a 1-block ViT-Ti stands in for the ResNet (compile
  time). The heterogeneous arm of the same config runs in `demo --ablation=batch`."""
  import json  # pylint: disable=g-import-not-at-top

  from ufo_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('ablation_batch_r50')
  config.input.data_dir = person_product_data
  config.input.image_size = SIZE
  config.input.worker_count = 0
  config.input.batch_mode = 'homogeneous'
  config.input.allow_partial_data = True  # small generated sets
  for task in config.tasks:
    config.tasks[task].batch_size = 8
  config.model.backbone, config.model.variant, config.model.depth = 'vit', 'Ti/16', 1
  config.model.dtype, config.model.scan_layers, config.model.remat_policy = 'float32', False, 'none'
  config.train.steps, config.train.log_every, config.train.checkpoint_every = 2, 1, 2
  config.train.keep_every = 0
  config.eval.every_steps, config.eval.batch_size, config.eval.figures = 0, 16, False
  train.train_and_evaluate(config, str(tmp_path))
  reports = sorted(tmp_path.glob('**/report.json'))
  assert reports, 'no report written'
  report = json.loads(reports[-1].read_text())
  evaluated = {name for name, v in report['ours'].items() if v}
  assert evaluated == {'market1501', 'sop'}, report['ours']
  assert len(report['ours']['market1501']) == 2 and len(report['ours']['sop']) == 1
  assert all(0.0 <= v <= 100.0 for name in evaluated for v in report['ours'][name])
  md = next(tmp_path.glob('**/report.md')).read_text()
  assert 'Market1501' in md and 'SOP' in md


def test_training_without_the_pretrained_file_stops_at_start(tmp_path, monkeypatch):
  """ufo_l with no checkpoint: a one-line ConfigError (main prints it as `error: ...`, exit 2,
  tests/test_main.py) before any data is read or any model is built."""
  from ufo_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('ufo_l')
  config.input.source = 'synthetic'
  config.model.pretrained = str(tmp_path / 'vit.npz')

  def no_data(*args, **kwargs):
    raise AssertionError('data read before the pretrained check')

  monkeypatch.setattr(train, 'create_dataset', no_data)
  with pytest.raises(config_lib.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert '\n' not in message and 'vit.npz: no such file' in message
  assert 'augreg_in21k' in message and 'huggingface-cli download' in message
