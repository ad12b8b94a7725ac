"""The train step on one device: loss assembly, LR scales, synthetic input, learning, FLOPs, and
the loop's stop during an evaluation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufo_jax import config as config_lib
from ufo_test_utils import FlatBackbone
from ufo_jax import checkpoint, hardware, losses, sharding, train
from ufo_jax import step as step_lib
from ufo_jax.data import synthetic
from ufo_jax.models import multitask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {'xla_backend_optimization_level': 0}  # tiny CPU programs: compile time rules


def small_config(**batch_sizes):
  """configs/ufo_tiny.py at 32x32 with 2 scanned ViT blocks (drop path on) and small batches."""
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 32
  config.model.depth = 2
  config.model.scan_layers = True
  sizes = dict(face=8, person=8, product=8, vehicle=8)
  sizes.update(batch_sizes)
  for task, size in sizes.items():
    config.tasks[task].batch_size = size
  return config


def test_compute_losses_equals_per_task_losses_on_each_tasks_examples():
  config = small_config()
  config.tasks.vehicle.loss_weight = 0.5
  config.tasks.person.triplet_margin = 0.3
  settings = step_lib.task_losses(config)
  rngs = nnx.Rngs(0)
  classes = {'face': 6, 'person': 5, 'product': 4, 'vehicle': 3}
  model = multitask.MultiTaskModel(FlatBackbone(48, 8, rngs=rngs), classes, rngs=rngs,
                                   class_multiple=4)
  model.train()
  rng = np.random.default_rng(0)
  task = jnp.asarray([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0])
  labels = jnp.asarray([0, 5, 2, 1, 1, 4, 4, 3, 3, 0, 0, 2, 2, 1, 1, 5])
  images = jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images, task, labels):
    model = nnx.merge(graphdef, state)
    outputs = model(images, task)
    total, metrics = step_lib.compute_losses(model, outputs, labels, settings)
    weights = {name: model.heads[name].class_weights[...] for name in model.tasks}
    return outputs, weights, total, metrics

  task_np = np.asarray(task)

  @jax.jit
  def reference(outputs, weights, labels):
    """Each task's losses on its own examples alone, unmasked, on the real classes."""
    out = {}
    for index, name in enumerate(model.tasks):
      rows = task_np == index  # static row selection: the task vector is a constant
      cfg = config.tasks[name]
      out[f'{name}/cosface'] = losses.cosface_loss(
          outputs[name]['embedding'][rows], weights[name][:, :classes[name]], labels[rows],
          scale=cfg.cosface_scale, margin=cfg.cosface_margin)
      if cfg.triplet:
        out[f'{name}/triplet'] = losses.triplet_loss(outputs[name]['feature'][rows],
                                                     labels[rows], margin=cfg.triplet_margin)
    return out

  outputs, weights, total, metrics = run(state, images, task, labels)
  expected = reference(outputs, weights, labels)
  expected_total = 0.0
  for index, name in enumerate(model.tasks):
    cfg = config.tasks[name]
    task_total = 0.0
    for term in ('cosface', 'triplet'):
      key = f'{name}/{term}'
      assert (key in metrics) == (key in expected)
      if key in expected:
        np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-5, atol=1e-6)
        task_total += float(expected[key])
    assert int(metrics[f'{name}/examples']) == int(np.sum(np.asarray(task) == index))
    expected_total += cfg.loss_weight * task_total
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)


def test_lr_scale_applies_to_each_head_only():
  config = small_config()
  config.tasks.person.lr_scale = 10.0
  scale = step_lib.lr_scale_fn(config)
  assert scale(('heads', 'person', 'class_weights')) == 10.0
  assert scale(('heads', 'person', 'neck', 'scale')) == 10.0
  assert scale(('heads', 'face', 'class_weights')) == 1.0
  assert scale(('backbone', 'blocks', '0', 'mlp', 'fc1', 'kernel')) == 1.0


def test_synthetic_batches_layout_and_determinism():
  config = small_config(face=8, person=8, product=4, vehicle=4)
  classes = {'face': 50, 'person': 3, 'product': 20, 'vehicle': 20}
  ds = synthetic.create_synthetic_dataset(config, classes)
  it = iter(ds)
  first = next(it)
  assert first['image'].shape == (24, 32, 32, 3) and first['image'].dtype == np.uint8
  np.testing.assert_array_equal(first['task'], [0] * 8 + [1] * 8 + [2] * 4 + [3] * 4)
  for index, name in enumerate(('face', 'person', 'product', 'vehicle')):
    labels = first['label'][first['task'] == index]
    assert labels.min() >= 0 and labels.max() < classes[name]
    if config.tasks[name].sampler == 'identity':  # P identities x K = 4 instances
      assert np.all(labels.reshape(-1, 4) == labels.reshape(-1, 4)[:, :1])
  state = it.get_state()
  second = next(it)
  it2 = iter(ds)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)['image'], second['image'])
  # Two processes each get half of every task, with different examples.
  half = synthetic.SyntheticBatches(config, classes, process_index=1, process_count=2)(0)
  np.testing.assert_array_equal(half['task'], [0] * 4 + [1] * 4 + [2] * 2 + [3] * 2)
  # Same class, same pattern: images of one identity differ by the noise only.
  person = first['image'][first['task'] == 1].astype(int)
  assert np.abs(person[0] - person[1]).max() <= 2 * synthetic.NOISE_AMPLITUDE
  config.input.batch_mode = 'homogeneous'
  batches = synthetic.SyntheticBatches(config, classes, process_index=0, process_count=1)
  assert [np.unique(batches(s)['task']).tolist() for s in range(5)] == [[0], [1], [2], [3],
                                                                      [0]]


@pytest.fixture(scope='module')
def setup():
  config = small_config()
  config.optim.lr = 0.1
  config.optim.warmup_fraction = 0.0
  config.train.steps = 40
  mesh = sharding.create_mesh(config.mesh)
  classes = {'face': 8, 'person': 8, 'product': 8, 'vehicle': 8}
  return config, step_lib.build(config, classes, mesh, compiler_options=FAST_COMPILE), mesh


def test_small_model_learns_synthetic_data(setup):
  config, s, mesh = setup
  state = s.init()
  data = iter(synthetic.create_synthetic_dataset(config, s.num_classes))
  totals = []
  for _ in range(30):
    state, metrics = s.train_step(state, sharding.make_global_batch(next(data), mesh))
    totals.append(float(metrics['total']))
  assert int(state['step']) == 30
  assert np.all(np.isfinite(totals))
  first, last = np.mean(totals[:3]), np.mean(totals[-3:])
  assert last < 0.7 * first, (first, last, totals)
  # The BatchNorm running statistics moved away from their initial values.
  assert not np.allclose(state['model_state']['heads']['face']['neck']['mean'][...], 0.0)


def test_model_flops_and_peak_table():
  config = small_config()
  config.model.variant = 'L/16'
  config.model.depth = 0
  config.input.image_size = 384
  classes = {'face': 93431, 'person': 2494, 'product': 11318, 'vehicle': 44411}
  model = nnx.eval_shape(lambda: multitask.create_model(config, classes, rngs=nnx.Rngs(0)))
  flops = step_lib.model_flops(model)
  # About 1.15 TFLOP per 384x384 image for ViT-L/16, forward + backward (docs/PERFORMANCE.md).
  assert 1.1e12 < flops['total'] < 1.2e12 and flops['depth'] == 24
  assert flops['total'] == pytest.approx(24 * flops['layer'] + flops['rest'])
  assert hardware.peak_flops_per_device(jax.devices()[0]) is None  # CPU: no MFU
  assert hardware.param_count({'a': jnp.zeros((2, 3)), 'b': [jnp.zeros((4,))]}) == 10


def test_a_stop_during_evaluation_saves_that_step_and_ends_the_run(tmp_path, monkeypatch):
  """SIGINT while step 2 is evaluated: the evaluation is told to stop (``should_stop``), then the
  run saves step 2 and exits, before training another step."""
  import signal

  from ufo_jax.evaluation import run as evaluation_run

  calls = []

  def evaluate(config, workdir, model, step, writer, should_stop=None):
    os.kill(os.getpid(), signal.SIGINT)  # the handler of the run only sets its stop flag
    calls.append((step, should_stop is not None and should_stop()))

  monkeypatch.setattr(evaluation_run, 'evaluate', evaluate)
  config = small_config()
  config.train.steps, config.train.checkpoint_every, config.train.log_every = 6, 0, 0
  config.eval.every_steps = 2
  state = train.train_and_evaluate(config, str(tmp_path), compiler_options=FAST_COMPILE)
  assert calls == [(2, True)]
  assert int(state['step']) == 2
  manager = checkpoint.create_manager(str(tmp_path / 'checkpoints'), read_only=True)
  assert list(manager.all_steps()) == [2]
  manager.close()


def test_pretrained_backbone_is_loaded_into_the_sharded_state(setup, tmp_path):
  from safetensors.numpy import save_file

  from ufo_jax.models import vit

  config, s, _ = setup
  source = multitask.create_backbone(config, rngs=nnx.Rngs(params=123, dropout=0))
  p = {k: np.asarray(v) for k, v in vit.get_vit_params(source).items()}
  # timm names and torch layouts (Linear (out, in), conv OIHW), written here independently.
  sd = {'cls_token': p['cls_token'], 'pos_embed': p['pos_embed'],
        'patch_embed.proj.weight': p['patch_embed.proj.kernel'].transpose(3, 2, 0, 1),
        'patch_embed.proj.bias': p['patch_embed.proj.bias'],
        'norm.weight': p['norm.scale'], 'norm.bias': p['norm.bias']}
  for i in range(config.model.depth):
    for name in ('norm1', 'norm2'):
      sd[f'blocks.{i}.{name}.weight'] = p[f'blocks.{i}.{name}.scale']
      sd[f'blocks.{i}.{name}.bias'] = p[f'blocks.{i}.{name}.bias']
    for name in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
      sd[f'blocks.{i}.{name}.weight'] = p[f'blocks.{i}.{name}.kernel'].T
      sd[f'blocks.{i}.{name}.bias'] = p[f'blocks.{i}.{name}.bias']
  path = tmp_path / 'vit.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))

  config.model.pretrained = str(path)
  try:
    state = step_lib.load_pretrained(config, s, s.init())
  finally:
    config.model.pretrained = ''
  loaded = vit.get_vit_params(step_lib.merge_model(s, state).backbone)
  for name, value in p.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)
  face = state['params']['heads']['face']['class_weights'][...]
  want = jax.tree.leaves(s.state_shardings['params']['heads']['face']['class_weights'])[0]
  assert face.sharding == want
