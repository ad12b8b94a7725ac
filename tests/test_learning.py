"""The reduced learning-quality benchmark (bench/learning.py --reduced): a recipe bug is caught.

One subprocess trains the reduced recipe (depth-2 ViT-Ti, person on Market-1501 + product on
SOP, hard generated data, REDUCED_SIZE) twice: correctly and with the training labels shuffled
within each task. The correct recipe must beat the chance level and the shuffled-label recipe by
margins learned from the benchmark runs recorded in docs/PERFORMANCE.md ("Learning quality").
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Margins in points of Market-1501 rank-1 and SOP Recall@1 (docs/PERFORMANCE.md: measured over
# seeds of the reduced benchmark; each margin is well under the smallest measured gap).
MARGIN_OVER_CHANCE = {'market1501': 15.0, 'sop': 15.0}
MARGIN_OVER_SHUFFLED = {'market1501': 10.0, 'sop': 10.0}


def test_correct_recipe_beats_chance_and_shuffled_labels(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'learning.py'), '--reduced',
       '--recipe=correct,shuffled_labels', f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  runs = {r['recipe']: r for r in lines}
  assert set(runs) == {'correct', 'shuffled_labels'}, proc.stdout[-3000:]
  correct, shuffled = runs['correct'], runs['shuffled_labels']
  assert correct['reduced'] and correct['steps'] == shuffled['steps']
  for name in ('market1501', 'sop'):
    ours, chance, bad = correct['numbers'][name], correct['chance'][name], \
        shuffled['numbers'][name]
    assert 0.0 <= ours <= 100.0 and 0.0 <= bad <= 100.0
    assert ours > chance + MARGIN_OVER_CHANCE[name], (name, correct, shuffled)
    assert ours > bad + MARGIN_OVER_SHUFFLED[name], (name, correct, shuffled)


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
    outs[stats] = model(images, task)
  feature = np.asarray(outs['task']['a']['feature'])
  for name, rows in (('a', slice(0, 6)), ('b', slice(6, 12))):
    for stats, ref_rows in (('task', rows), ('batch', slice(0, 12))):
      ref = feature[ref_rows]
      want = (feature - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-5)
      np.testing.assert_allclose(np.asarray(outs[stats][name]['embedding'])[rows], want[rows],
                                 rtol=1e-4, atol=1e-4)
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 32
  config.model.depth = 1
  config.model.sabotage_neck_statistics = 'rows'
  with pytest.raises(ValueError, match='sabotage_neck_statistics'):
    multitask.create_model(config, {t: 4 for t in config.tasks}, rngs=nnx.Rngs(0))
