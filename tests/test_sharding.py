"""Sharding on simulated devices: layouts, sharded == single-device steps, 8 -> 4 restore,
drop-path masks per example on a 4-device mesh, and two processes (jax.distributed, 2 CPU
devices each) == one process with 4 devices. The model is the recipe's layout: 2 scanned ViT
blocks with drop path.

All multi-device checks run in ONE subprocess with 8 simulated CPU devices (this file is also
the child script: ``python tests/test_sharding.py multidevice OUT``); the multi-host test starts
two more (``python tests/test_sharding.py multihost PID PORT OUT``).
"""

from ufo_jax import config as config_lib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {'xla_backend_optimization_level': 0}
CLASSES = {'face': 13, 'person': 5}
TIMEOUT_S = 600


# --------------------------------------------------------------------------------------------
# Child processes.
# --------------------------------------------------------------------------------------------
def _small_config():
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 32
  config.model.depth = 2
  config.model.scan_layers = True
  assert config.model.drop_path_rate > 0
  config.optim.momentum = 0.9
  config.train.steps = 10
  # Two tasks cover every path (CosFace only; CosFace + triplet) and compile faster than four.
  del config.tasks['product']
  del config.tasks['vehicle']
  config.tasks.face.batch_size = 16
  config.tasks.person.batch_size = 16
  return config


def _setup_child():
  sys.path.insert(0, ROOT)
  from ufo_jax import sharding

  # Shard the tiny ViT's kernels too (the production threshold keeps them replicated).
  sharding.FSDP_MIN_SIZE = 4096


def _host(tree):
  from ufo_test_utils import host_copy  # imports jax: after the child set its device count

  return host_copy(tree)


def _max_diff(a, b):
  import jax
  return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _two_process_batches(config, step):
  """The global batch of a 2-process run at ``step``: process 0's rows, then process 1's."""
  from ufo_jax.data import synthetic
  parts = [synthetic.SyntheticBatches(config, CLASSES, process_index=p, process_count=2)(step)
           for p in range(2)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _child_multidevice(out_path):
  _setup_child()
  import jax
  import ml_collections
  from jax.sharding import PartitionSpec as P

  from ufo_jax import checkpoint, sharding
  from ufo_jax import step as step_lib
  from ufo_jax.data import synthetic

  assert jax.device_count() == 8, jax.devices()
  results = {}
  config = _small_config()
  config.mesh.data, config.mesh.fsdp = 2, 4
  mesh8 = sharding.create_mesh(config.mesh)
  s8 = step_lib.build(config, CLASSES, mesh8, compiler_options=FAST_COMPILE)
  mesh1 = sharding.create_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1}),
                               jax.devices()[:1])
  s1 = step_lib.build(config, CLASSES, mesh1, padded_classes=s8.padded_classes,
                   compiler_options=FAST_COMPILE)

  # Layouts.
  state8 = s8.init()
  params = state8['params']
  face_w = params['heads']['face']['class_weights'][...]
  fc1 = params['backbone']['blocks']['mlp']['fc1']  # stacked over the 2 layers
  batch = sharding.make_global_batch(
      next(iter(synthetic.create_synthetic_dataset(config, CLASSES))), mesh8)
  results['layout'] = {
      'padded': s8.padded_classes,
      'class_weights': [str(face_w.sharding.spec), face_w.shape,
                        sorted({s.data.shape for s in face_w.addressable_shards})],
      'class_columns': sorted(
          (s.index[1].start, s.index[1].stop) for s in face_w.addressable_shards),
      'fc1_kernel': [str(fc1['kernel'][...].sharding.spec),
                     sorted({s.data.shape for s in fc1['kernel'][...].addressable_shards})],
      'fc1_bias': str(fc1['bias'][...].sharding.spec),
      'neck_mean': str(state8['model_state']['heads']['face']['neck']['mean'][...].sharding.spec),
      'image': [str(batch['image'].sharding.spec),
                sorted({s.data.shape for s in batch['image'].addressable_shards})],
      'expected_class_spec': str(P(None, ('data', 'fsdp'))),
      'expected_fc1_spec': str(P(None, None, 'fsdp')),  # (layers, in, out)
      'expected_replicated_spec': str(P()),
      'expected_batch_spec': str(P(('data', 'fsdp'))),
  }

  # Sharded steps == single-device steps.
  state1 = s1.init()
  results['init_diff'] = _max_diff(_host(state8['params']), _host(state1['params']))
  data = iter(synthetic.create_synthetic_dataset(config, CLASSES))
  metrics8, metrics1 = [], []
  for _ in range(2):
    local = next(data)
    state8, m8 = s8.train_step(state8, sharding.make_global_batch(local, mesh8))
    state1, m1 = s1.train_step(state1, sharding.make_global_batch(local, mesh1))
    metrics8.append({k: float(v) for k, v in m8.items()})
    metrics1.append({k: float(v) for k, v in m1.items()})
  results['metrics8'], results['metrics1'] = metrics8, metrics1
  results['params_diff'] = _max_diff(_host(state8['params']), _host(state1['params']))
  results['stats_diff'] = _max_diff(_host(state8['model_state']), _host(state1['model_state']))
  results['opt_diff'] = _max_diff(_host(state8['opt_state']), _host(state1['opt_state']))

  # A checkpoint written on 8 devices restores onto 4.
  ckpt_dir = os.path.join(os.path.dirname(out_path), 'ckpt8')
  manager = checkpoint.create_manager(ckpt_dir)
  checkpoint.save(manager, 2, state8, meta={'num_classes': s8.num_classes,
                                            'padded_classes': s8.padded_classes})
  manager.wait_until_finished()
  saved = _host(state8)
  config4 = _small_config()
  config4.mesh.data, config4.mesh.fsdp = 2, 2
  mesh4 = sharding.create_mesh(config4.mesh, jax.devices()[:4])
  meta = checkpoint.restore_meta(manager)
  s4 = step_lib.build(config4, meta['num_classes'], mesh4, padded_classes=meta['padded_classes'],
                   compiler_options=FAST_COMPILE)
  restored = checkpoint.restore(manager, s4.abstract_state)
  face4 = restored['params']['heads']['face']['class_weights'][...]
  results['restore4'] = {
      'devices': sorted({d.id for x in jax.tree.leaves(restored) for d in x.devices()}),
      'class_weights': [str(face4.sharding.spec),
                        sorted({s.data.shape for s in face4.addressable_shards})],
      'equal': all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_host(restored)),
                                                        jax.tree.leaves(saved))),
      'step': int(restored['step']),
  }

  # Reference for the multi-host test: one process, 4 devices, the two processes' batches.
  state4 = s4.init()
  reference = []
  for step in range(2):
    batch = sharding.make_global_batch(_two_process_batches(config4, step), mesh4)
    state4, m4 = s4.train_step(state4, batch)
    reference.append({k: float(v) for k, v in m4.items()})
  results['reference4'] = reference
  results['drop_path'] = _drop_path_on_4_devices()
  with open(out_path, 'w') as f:
    json.dump(results, f)


def _drop_path_on_4_devices():
  """The class-token features of 16 identical images in train mode on a 4-device data mesh:
  only drop path (4 blocks, rates 0 .. 0.9) tells them apart. Per device, rows as bytes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ufo_jax import sharding
  from ufo_jax import step as step_lib

  config = _small_config()
  config.model.depth, config.model.drop_path_rate = 4, 0.9
  config.mesh.data, config.mesh.fsdp = 4, 1
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:4])
  setup = step_lib.build(config, CLASSES, mesh, compiler_options=FAST_COMPILE)
  state = setup.init()
  images = jax.device_put(jnp.full((16, 32, 32, 3), 0.5, jnp.float32),
                          sharding.batch_sharding(mesh))

  @jax.jit
  def features(params, model_state, images):
    return nnx.merge(setup.graphdef, params, model_state).backbone(images)

  out = features(state['params'], state['model_state'], images)
  shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
  return [[np.asarray(row).tobytes().hex() for row in np.asarray(s.data)] for s in shards]


def _child_multihost(process_id, port, out_path):
  import jax
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=process_id)
  _setup_child()
  from ufo_jax import sharding
  from ufo_jax import step as step_lib
  from ufo_jax.data import synthetic

  config = _small_config()
  config.mesh.data, config.mesh.fsdp = -1, 2
  mesh = sharding.create_mesh(config.mesh)
  setup = step_lib.build(config, CLASSES, mesh, compiler_options=FAST_COMPILE)
  state = setup.init()
  data = iter(synthetic.create_synthetic_dataset(config, CLASSES))
  metrics = []
  for _ in range(2):
    state, m = setup.train_step(state, sharding.make_global_batch(next(data), mesh))
    metrics.append({k: float(v) for k, v in m.items()})
  with open(out_path, 'w') as f:
    json.dump({'devices': jax.device_count(), 'local': jax.local_device_count(),
               'processes': jax.process_count(), 'metrics': metrics}, f)


def _child_env(devices):
  flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


# --------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def multidevice(tmp_path_factory):
  out = tmp_path_factory.mktemp('multidevice') / 'results.json'
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), 'multidevice', str(out)],
                        env=_child_env(8), cwd=ROOT, capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(out) as f:
    return json.load(f)


def test_class_sharded_classifier_and_fsdp_layout(multidevice):
  layout = multidevice['layout']
  assert layout['padded'] == {'face': 16, 'person': 8}
  spec, shape, shard_shapes = layout['class_weights']
  assert spec == layout['expected_class_spec'] and shape == [192, 16]
  assert shard_shapes == [[192, 2]]  # 16 classes over all 8 devices, 2 each
  # Every device holds a different slice of the classes: together they cover 0..15.
  assert sorted({tuple(c) for c in layout['class_columns']}) == [(i, i + 2)
                                                                 for i in range(0, 16, 2)]
  assert layout['fc1_kernel'] == [layout['expected_fc1_spec'], [[2, 192, 192]]]  # 768 / fsdp 4
  assert layout['fc1_bias'] == layout['expected_replicated_spec']  # small: replicated
  assert layout['neck_mean'] == layout['expected_replicated_spec']
  assert layout['image'] == [layout['expected_batch_spec'], [[4, 32, 32, 3]]]  # 32 / 8


def test_sharded_steps_equal_single_device_steps(multidevice):
  assert multidevice['init_diff'] == 0.0  # the same initial state, whatever the layout
  for m8, m1 in zip(multidevice['metrics8'], multidevice['metrics1']):
    assert m8.keys() == m1.keys()
    for key in m8:
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-4, atol=1e-5, err_msg=key)
  assert multidevice['params_diff'] < 1e-5
  assert multidevice['stats_diff'] < 1e-4
  assert multidevice['opt_diff'] < 1e-4


def test_drop_path_masks_differ_across_the_batch_on_every_device(multidevice):
  per_device = multidevice['drop_path']
  assert [len(rows) for rows in per_device] == [4, 4, 4, 4]
  # Within each device's examples the masks differ (identical images, different features) ...
  assert all(len(set(rows)) > 1 for rows in per_device), [len(set(r)) for r in per_device]
  # ... and no device repeats another's masks (each shard draws its own part of the batch).
  assert len({tuple(rows) for rows in per_device}) == 4
  assert len({row for rows in per_device for row in rows}) > 4


def test_checkpoint_from_8_devices_restores_onto_4(multidevice):
  restored = multidevice['restore4']
  assert restored['equal'] and restored['step'] == 2
  assert restored['devices'] == [0, 1, 2, 3]
  expected_spec = multidevice['layout']['expected_class_spec']
  assert restored['class_weights'] == [expected_spec, [[192, 4]]]  # 16 classes / 4 devices


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(multidevice, tmp_path):
  port = _free_port()
  outs = [tmp_path / f'process_{i}.json' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), 'multihost', str(i),
                             str(port), str(outs[i])], env=_child_env(2), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errors = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, err = proc.communicate()
    errors.append(err)
  for proc, err in zip(procs, errors):
    assert proc.returncode == 0, err[-5000:]
  for out in outs:
    with open(out) as f:
      result = json.load(f)
    assert (result['devices'], result['local'], result['processes']) == (4, 2, 2)
    for got, want in zip(result['metrics'], multidevice['reference4']):
      assert got.keys() == want.keys()
      for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=1e-5, err_msg=key)


if __name__ == '__main__':
  if sys.argv[1] == 'multidevice':
    _child_multidevice(sys.argv[2])
  elif sys.argv[1] == 'multihost':
    _child_multihost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    raise SystemExit(f'unknown child mode {sys.argv[1]!r}')
