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
