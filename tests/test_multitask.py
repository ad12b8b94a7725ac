"""The multi-task model: masked BatchNorm necks, padded class weights, embed, create_model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufo_jax import config as config_lib
from ufo_test_utils import FlatBackbone
from ufo_jax.models import heads as heads_lib
from ufo_jax.models import multitask, vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """configs/ufo_tiny.py at 32x32 with a 1-block ViT."""
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 32
  config.model.depth = 1
  return config


def _reference_bn(features):
  return nnx.BatchNorm(features, use_bias=False, momentum=0.9, epsilon=1e-5,
                       use_fast_variance=False, rngs=nnx.Rngs(0))


def test_masked_neck_equals_per_task_batchnorm():
  rng = np.random.default_rng(0)
  batch, dim = 24, 8
  x = jnp.asarray(rng.normal(1.0, 2.0, (batch, dim)), jnp.float32)
  task = jnp.asarray(rng.integers(0, 3, batch))
  necks = [heads_lib.MaskedBatchNorm(dim) for _ in range(3)]
  refs = [_reference_bn(dim) for _ in range(3)]
  for step in range(2):  # two updates of the running averages
    xs = x * (step + 1)
    for t in range(3):
      mask = task == t
      out = necks[t](xs, mask)
      ref = refs[t](xs[np.asarray(mask)])  # the task's examples alone, torch/flax BatchNorm1d
      np.testing.assert_allclose(np.asarray(out)[np.asarray(mask)], np.asarray(ref),
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(necks[t].mean[...], refs[t].mean[...], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(necks[t].var[...], refs[t].var[...], rtol=1e-5, atol=1e-6)


def test_absent_task_keeps_running_stats_and_stays_finite():
  neck = heads_lib.MaskedBatchNorm(4)
  neck.mean[...] = jnp.full((4,), 0.5)
  x = jnp.ones((6, 4))
  out = neck(x, jnp.zeros((6,), bool))
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(neck.mean[...], np.full((4,), 0.5))
  np.testing.assert_array_equal(neck.var[...], np.ones((4,)))
  # Gradients through a head with no example are zero, not NaN.
  grad = jax.grad(lambda v: jnp.sum(heads_lib.MaskedBatchNorm(4)(v, jnp.zeros((6,), bool))
                                    * 0.0))(x)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_heads_see_the_whole_batch_with_their_mask_and_embed_uses_running_stats():
  rngs = nnx.Rngs(0)
  model = multitask.MultiTaskModel(FlatBackbone(4 * 4 * 3, 6, rngs=rngs),
                                   {'face': 5, 'person': 3}, rngs=rngs, class_multiple=4)
  model.train()
  images = jnp.asarray(np.random.default_rng(1).normal(size=(10, 4, 4, 3)), jnp.float32)
  task = jnp.asarray([0, 1, 0, 1, 1, 0, 0, 1, 1, 1])
  outputs = model(images, task)
  assert set(outputs) == {'face', 'person'}
  feature = np.asarray(model.backbone(images))
  for index, name in enumerate(('face', 'person')):
    out = outputs[name]
    np.testing.assert_array_equal(np.asarray(out['mask']), np.asarray(task) == index)
    np.testing.assert_allclose(np.asarray(out['feature']), feature, rtol=1e-6)
    rows = feature[np.asarray(task) == index]
    expected = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(out['embedding'])[np.asarray(task) == index],
                               expected, rtol=1e-4, atol=1e-4)
  # embed: eval-mode neck (running statistics), and the model stays in train mode.
  neck = model.heads['person'].neck
  expected = ((feature - np.asarray(neck.mean[...])) / np.sqrt(np.asarray(neck.var[...]) + 1e-5)
              * np.asarray(neck.scale[...]))
  np.testing.assert_allclose(np.asarray(model.embed(images, 'person')), expected, rtol=1e-5,
                             atol=1e-5)
  assert neck.use_running_average is False
  with pytest.raises(ValueError, match='unknown task'):
    model.embed(images, 'vehicle')
  with pytest.raises(ValueError, match='normalised float'):
    model(images.astype(jnp.uint8), task)


def test_class_weights_are_padded_with_zero_columns():
  head = heads_lib.TaskHead(16, 1000, rngs=nnx.Rngs(0), padded_classes=1008)
  w = np.asarray(head.class_weights[...])
  assert w.shape == (16, 1008)
  np.testing.assert_array_equal(w[:, 1000:], 0.0)
  assert abs(w[:, :1000].std() - 0.001) < 1e-4
  assert head.class_weights_for_loss().shape == (16, 1000)
  assert heads_lib.padded_num_classes(93431, 8) == 93432
  assert heads_lib.padded_num_classes(64, 8) == 64


def test_create_model_from_config():
  config = tiny_config()
  num_classes = {'face': 10, 'person': 7, 'product': 5, 'vehicle': 3}
  # Abstract (no allocation): the forward pass of the real ViT runs in tests/test_train.py.
  model = nnx.eval_shape(lambda: multitask.create_model(
      config, num_classes, rngs=nnx.Rngs(params=0, dropout=1), class_multiple=4))
  assert isinstance(model.backbone, vit.VisionTransformer)
  assert model.tasks == ('face', 'person', 'product', 'vehicle')
  assert model.backbone.cfg.depth == 1 and model.feature_dim == 192
  assert model.backbone.image_size == 32 and model.backbone.scan_layers
  assert {t: h.class_weights.shape for t, h in model.heads.items()} == {
      'face': (192, 12), 'person': (192, 8), 'product': (192, 8), 'vehicle': (192, 4)}
  assert {t: h.num_classes for t, h in model.heads.items()} == num_classes
  with pytest.raises(ValueError, match='no class count'):
    multitask.create_model(config, {'face': 3}, rngs=nnx.Rngs(0))
