"""The entry point: config errors, train -> resume end to end, dry run on 8 simulated devices."""

from ufo_jax import config as config_lib
import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def _main(args, *, devices=1, cache_dir=None):
  flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  if cache_dir:  # the second run reuses the first run's compiled programs
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return subprocess.run([sys.executable, '-m', 'ufo_jax.main', *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize('override, field', [
    ('--config.tasks.person.batch_size=6', 'config.tasks.person.batch_size'),
    ('--config.train.stepz=5', 'stepz'),
])
def test_config_errors_exit_2_with_the_field(tmp_path, override, field):
  proc = _main(['--config=configs/ufo_tiny.py', f'--workdir={tmp_path}', override])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert field in proc.stderr
  assert 'Traceback' not in proc.stderr


def _restore(workdir, step):
  """The train state of checkpoint ``step`` of a ufo_tiny run at 32x32, on this process."""
  from ufo_jax import checkpoint, sharding, train

  config = _tiny_config()
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'), read_only=True)
  meta = checkpoint.restore_meta(manager, step)
  setup = train.build(config, meta['num_classes'], sharding.create_mesh(config.mesh),
                      padded_classes=meta['padded_classes'])
  state = checkpoint.restore(manager, setup.abstract_state, step=step)
  manager.close()
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x), state)


def _tiny_config():
  config = config_lib.load_config('ufo_tiny')
  for key, value in TRAIN_OVERRIDES.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


TRAIN_OVERRIDES = {'train.steps': 4, 'train.log_every': 2, 'train.checkpoint_every': 2,
                   'input.image_size': 32, 'tasks.face.batch_size': 8,
                   'tasks.person.batch_size': 8, 'tasks.product.batch_size': 8,
                   'tasks.vehicle.batch_size': 8}


def test_train_writes_events_and_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  args = ['--config=configs/ufo_tiny.py', f'--workdir={workdir}']
  args += [f'--config.{k}={v}' for k, v in TRAIN_OVERRIDES.items()]
  first = _main(args, cache_dir=tmp_path / 'cache')
  assert first.returncode == 0, first.stderr[-5000:]
  checkpoints = workdir / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['2', '4']
  events = glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert events
  content = b''.join(open(e, 'rb').read() for e in events)
  for tag in (b'train/face/cosface', b'train/person/triplet', b'train/lr',
              b'perf/images_per_sec', b'steps_per_sec'):
    assert tag in content, tag
  assert 'ETA' in first.stderr  # clu ReportProgress on the console

  # Lose the last checkpoint (as a preemption would) and run the same command again: it
  # resumes from step 2 and reproduces step 4 exactly.
  expected = _restore(workdir, 4)
  shutil.rmtree(checkpoints / '4')
  second = _main(args, cache_dir=tmp_path / 'cache')
  assert second.returncode == 0, second.stderr[-5000:]
  assert 'restoring step 2' in second.stderr
  assert sorted(os.listdir(checkpoints)) == ['2', '4']
  got = _restore(workdir, 4)
  for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                                jax.tree.leaves(got)):
    np.testing.assert_array_equal(have, want, err_msg=jax.tree_util.keystr(path))


def _vit_l_params(image_size, padded_classes):
  """Parameter count of ViT-L/16 plus the heads, from the architecture (SPEC §3)."""
  d, m, depth, patch = 1024, 4096, 24, 16
  tokens = (image_size // patch) ** 2 + 1
  block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
  backbone = patch * patch * 3 * d + d + d + tokens * d + depth * block + 2 * d
  heads = sum(d + d * c for c in padded_classes)
  return backbone + heads


def test_dry_run_ufo_l_on_8_simulated_devices():
  # The full ViT-L/16 with the full class counts, at a small image and batch for test time.
  proc = _main(['--config=configs/ufo_l.py', '--mode=dry_run', '--config.mesh.fsdp=4',
                '--config.input.image_size=64', '--config.tasks.face.batch_size=8',
                '--config.tasks.person.batch_size=8', '--config.tasks.product.batch_size=8',
                '--config.tasks.vehicle.batch_size=8'], devices=8)
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = proc.stdout
  assert "mesh: {'data': 2, 'fsdp': 4} over 8 cpu devices" in out
  # 93,431 / 2,494 / 11,318 / 44,411 classes, padded to multiples of 8.
  padded = (93432, 2496, 11320, 44416)
  assert f'parameters: {_vit_l_params(64, padded):,} ' in out
  assert 'FLOPs per step: model' in out and 'memory per device: argument' in out
  lines = out.splitlines()
  face = [line for line in lines if line.strip().startswith('params/heads/face/class_weights')]
  assert face and "(None, ('data', 'fsdp'))" in face[0] and '(1024, 93432)' in face[0]
  fc1 = [line for line in lines if line.strip().startswith('params/backbone/blocks/mlp/fc1/kernel')]
  assert fc1 and "'fsdp'" in fc1[0]
