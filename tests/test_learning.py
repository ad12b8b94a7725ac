"""The pieces of the learning-quality benchmark (bench/learning.py): the hard generated data,
its shuffled-label sabotage and the neck-statistics and margin-sign sabotage knobs.

The reduced correct-vs-shuffled training comparison is tests/test_learning_reduced.py."""

import pytest


def test_hard_data_shapes_determinism_and_shuffled_labels(tmp_path):
  """--difficulty=hard: per-task image shapes, deterministic, shuffled labels touch train only."""
  import io

  import numpy as np
  from PIL import Image

  from data_prep import generate

  sizes = generate.Sizes(num_ids=6, num_test_ids=3, images_per_id=3, image_size=32,
                         num_pairs=4)
  shapes = {'market1501': (32, 16), 'veri776': (20, 32), 'sop': (32, 32), 'lfw': (32, 32)}
  for name, shape in shapes.items():
    a = generate.write_dataset(name, tmp_path / 'a', sizes=sizes, difficulty='hard')
    b = generate.write_dataset(name, tmp_path / 'b', sizes=sizes, difficulty='hard')
    easy = generate.write_dataset(name, tmp_path / 'e', sizes=sizes)
    assert a.images == b.images and a.images.keys() == easy.images.keys()
    for data in a.images.values():
      assert np.asarray(Image.open(io.BytesIO(data))).shape == (*shape, 3), name
    assert all(a.images[k] != easy.images[k] for k in a.images)
  # Same identity, different images: the nuisances vary per image (pixels far apart).
  market = generate.write_dataset('market1501', tmp_path / 'm', sizes=sizes, difficulty='hard')
  train = [it for it in market.splits['train'] if it.id == market.splits['train'][0].id]
  x, y = (np.asarray(Image.open(io.BytesIO(market.images[it.path])), np.float32)
          for it in train[:2])
  assert np.mean(np.abs(x - y)) > 20
  # Shuffled labels: the test splits are byte for byte the same, the training images change.
  shuffled = generate.write_dataset('market1501', tmp_path / 's', sizes=sizes,
                                    difficulty='hard', shuffled_labels=True)
  for split in ('query', 'gallery'):
    for it in market.splits[split]:
      assert shuffled.images[it.path] == market.images[it.path]
  changed = [shuffled.images[it.path] != market.images[it.path] for it in market.splits['train']]
  assert sum(changed) >= len(changed) - 3  # a random identity may be the labelled one
  with pytest.raises(ValueError, match='difficulty'):
    generate.write_dataset('sop', tmp_path / 'x', sizes=sizes, difficulty='medium')


def test_neck_batch_statistics_sabotage_knob():
  """config.model.sabotage_neck_statistics='batch': every neck normalises over the whole batch."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ufo_jax import config as config_lib
  from ufo_jax.models import multitask
  from ufo_test_utils import FlatBackbone

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(12, 2, 2, 3)), jnp.float32)
  task = jnp.asarray([0] * 6 + [1] * 6)
  outs = {}
  for stats in ('task', 'batch'):
    model = multitask.MultiTaskModel(FlatBackbone(12, 8, rngs=nnx.Rngs(0)), {'a': 3, 'b': 4},
                                     rngs=nnx.Rngs(1), neck_statistics=stats)
    outs[stats] = nnx.jit(lambda m, x, t: m(x, t))(model, images, task)  # one compile
  feature = np.asarray(outs['task']['a']['feature'])
  for name, rows in (('a', slice(0, 6)), ('b', slice(6, 12))):
    for stats, ref_rows in (('task', rows), ('batch', slice(0, 12))):
      ref = feature[ref_rows]
      want = (feature - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-5)
      np.testing.assert_allclose(np.asarray(outs[stats][name]['embedding'])[rows], want[rows],
                                 rtol=1e-4, atol=1e-4)
  config = config_lib.load_config('ufo_tiny')
  config.model.sabotage_neck_statistics = 'rows'
  with pytest.raises(ValueError, match="sabotage_neck_statistics: expected one of .* 'rows'"):
    multitask.create_model(config, {t: 4 for t in config.tasks}, rngs=nnx.Rngs(0))


def test_wrong_margin_sign_sabotage_knob():
  """config.train.sabotage_margin_sign=-1: every task's CosFace margin enters with the wrong sign.

  Checked on the loss itself: the target logit becomes s * (cos + m), so the loss on the same
  features and weights equals the numpy CosFace reference at margin -m and is lower than the
  recipe's."""
  import jax.numpy as jnp
  import numpy as np

  from ufo_jax import config as config_lib
  from ufo_jax import losses
  from ufo_jax import step

  config = config_lib.load_config('ufo_tiny')
  recipe = step.task_losses(config)
  config.train.sabotage_margin_sign = -1
  sabotaged = step.task_losses(config)
  assert recipe.keys() == sabotaged.keys()
  for task in recipe:
    assert recipe[task].margin > 0
    assert sabotaged[task].margin == -recipe[task].margin
    assert sabotaged[task].scale == recipe[task].scale

  rng = np.random.default_rng(0)
  features, weights = rng.normal(size=(6, 8)), rng.normal(size=(8, 5))  # weights (D, C)
  labels = np.array([0, 1, 2, 3, 4, 0])

  def reference(m, s):  # plain numpy CosFace: softmax cross-entropy of s * (cos - m * onehot)
    cos = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ (
        weights / np.linalg.norm(weights, axis=0, keepdims=True))
    logits = s * (cos - m * np.eye(5)[labels])
    logits = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(6), labels]))

  task = next(iter(recipe))
  got = {}
  for name, setting in (('recipe', recipe[task]), ('sabotaged', sabotaged[task])):
    loss = losses.cosface_loss(jnp.asarray(features, jnp.float32),
                               jnp.asarray(weights, jnp.float32), jnp.asarray(labels),
                               scale=setting.scale, margin=setting.margin)
    got[name] = float(loss)
    np.testing.assert_allclose(got[name], reference(setting.margin, setting.scale), rtol=1e-4)
  assert got['sabotaged'] < got['recipe']
  config.train.sabotage_margin_sign = -1
  config_lib.validate(config)  # the sabotage is a valid config
  config.train.sabotage_margin_sign = 0
  with pytest.raises(config_lib.ConfigError,
                     match='train.sabotage_margin_sign: expected 1 .* got 0'):
    config_lib.validate(config)
