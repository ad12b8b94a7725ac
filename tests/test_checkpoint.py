"""Checkpoints: exact resume (state, rng, data iterator), retention, metadata, paths.

Restoring a checkpoint written on 8 devices onto 4 is checked in tests/test_sharding.py (the
subprocess with simulated devices).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufo_jax import config as config_lib
from ufo_test_utils import assert_trees_equal, host_copy
from ufo_jax import checkpoint, optim, pytree, sharding, train
from ufo_jax import step as step_lib
from ufo_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def small_config():
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 32
  config.model.depth = 2  # the recipe's layout: scanned blocks, drop path active
  config.model.scan_layers = True
  assert config.model.drop_path_rate > 0
  config.optim.momentum = 0.9  # an optimizer state that is not empty
  config.train.steps = 6
  for task in config.tasks:
    config.tasks[task].batch_size = 8
  return config


def _run(setup, mesh, state, data, steps):
  totals = []
  for _ in range(steps):
    state, metrics = setup.train_step(state, sharding.make_global_batch(next(data), mesh))
    totals.append(float(metrics['total']))
  return state, totals


def test_save_restore_continue_equals_uninterrupted_training(tmp_path):
  config = small_config()
  mesh = sharding.create_mesh(config.mesh)
  setup = step_lib.build(config, {t: 8 for t in config.tasks}, mesh,
                      compiler_options=FAST_COMPILE)
  dataset = synthetic.create_synthetic_dataset(config, setup.num_classes)
  meta = {'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes}

  # Uninterrupted: 6 steps.
  state, straight = _run(setup, mesh, setup.init(), iter(dataset), 6)
  expected = host_copy(state)

  # Interrupted: 3 steps, an asynchronous checkpoint, one more step (its buffers donated while
  # the checkpoint is written), then a new process's view: new manager, new iterator.
  data = iter(dataset)
  state, first = _run(setup, mesh, setup.init(), data, 3)
  manager = checkpoint.create_manager(str(tmp_path / 'ckpt'), keep_checkpoints=2)
  assert checkpoint.save(manager, 3, state, data_iterator=data, meta=meta)
  _run(setup, mesh, state, data, 1)
  manager.wait_until_finished()
  manager.close()

  manager = checkpoint.create_manager(str(tmp_path / 'ckpt'), keep_checkpoints=2)
  assert manager.latest_step() == 3
  data = iter(dataset)
  restored = checkpoint.restore(manager, setup.abstract_state, data_iterator=data)
  assert int(restored['step']) == 3
  state, second = _run(setup, mesh, restored, data, 3)

  assert first + second == straight  # the same losses, bit for bit
  assert_trees_equal(state, expected)
  saved_meta = checkpoint.restore_meta(manager)
  assert set(saved_meta.pop('checksums')) == {pytree.path_name(p) for p, _ in
                                              jax.tree_util.tree_flatten_with_path(state)[0]}
  assert saved_meta == meta

  # A checkpoint that does not fit: one line naming the array and both shapes.
  other = dict(setup.abstract_state)
  other['params'] = jax.tree.map(lambda x: x, setup.abstract_state['params'])
  w = other['params']['heads']['face']['class_weights']
  w.set_value(jax.ShapeDtypeStruct((w.get_value().shape[0], 16), w.get_value().dtype))
  with pytest.raises(checkpoint.MismatchError,
                     match=r'params/heads/face/class_weights has shape \(192, 8\) in the '
                           r'checkpoint, \(192, 16\) for the config'):
    checkpoint.check_fits(manager, 3, other)
  checkpoint.check_fits(manager, 3, setup.abstract_state)
  manager.close()


def test_retention_keeps_last_n_and_every_mth(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), keep_checkpoints=2, keep_every=4)
  for step in range(1, 10):
    checkpoint.save(manager, step, {'x': jnp.full((3,), step, jnp.float32)})
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [4, 8, 9]
  assert not checkpoint.save(manager, 9, {'x': jnp.zeros((3,))})  # already there
  target = {'x': jax.ShapeDtypeStruct((3,), jnp.float32)}
  np.testing.assert_array_equal(checkpoint.restore(manager, target, step=4)['x'], [4, 4, 4])
  with pytest.raises(FileNotFoundError, match='step 5'):
    checkpoint.restore(manager, target, step=5)
  manager.close()


def test_locate_accepts_workdir_manager_dir_and_step_dir(tmp_path):
  directory = tmp_path / 'checkpoints'
  manager = checkpoint.create_manager(str(directory), keep_checkpoints=0)
  checkpoint.save(manager, 7, {'x': jnp.ones((2,))})
  manager.wait_until_finished()
  manager.close()
  assert checkpoint.locate(str(tmp_path)) == (str(directory), None)
  assert checkpoint.locate(str(directory)) == (str(directory), None)
  assert checkpoint.locate(str(directory / '7')) == (str(directory), 7)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.locate(str(tmp_path / 'nowhere'))
  empty = checkpoint.create_manager(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    checkpoint.restore_meta(empty)


def test_new_workdir_starts_from_another_runs_checkpoint(tmp_path, caplog):
  """train --checkpoint=OTHER/checkpoints/2 continues that run exactly, in a new workdir; a
  rerun with more train.steps says how the lr schedule changes."""
  config = small_config()
  config.train.steps = 4
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 10
  config.train.log_every = 0
  config.eval.every_steps = 0
  first = tmp_path / 'first'
  straight = host_copy(train.train_and_evaluate(config, str(first), compiler_options=FAST_COMPILE))
  assert sorted(int(p.name) for p in (first / 'checkpoints').iterdir()
                if p.name.isdigit()) == [1, 2, 3, 4]

  second = tmp_path / 'second'
  resumed = train.train_and_evaluate(config, str(second), compiler_options=FAST_COMPILE,
                                     checkpoint_path=str(first / 'checkpoints' / '2'))
  # The new workdir saved only the steps it ran, and ended where the first run ended.
  assert sorted(int(p.name) for p in (second / 'checkpoints').iterdir()
                if p.name.isdigit()) == [3, 4]
  assert_trees_equal(resumed, straight)

  # More steps on resume: the cosine is re-stretched, and one line says what the lr does.
  config.train.steps = 6
  with caplog.at_level('INFO'):
    assert int(train.train_and_evaluate(config, str(first),
                                        compiler_options=FAST_COMPILE)['step']) == 6
  old, new = (optim.create_optimizer(config.optim, total_steps=n)[1](4) for n in (4, 6))
  lines = [r.getMessage() for r in caplog.records if 'config.train.steps' in r.getMessage()]
  assert lines == [f'config.train.steps: 4 in the saved run, now 6: the lr schedule is '
                   f're-stretched over 6 steps; the lr at the resume step 4 goes from '
                   f'{float(old):.6g} to {float(new):.6g}'], lines
  assert float(old) != float(new)


def test_a_save_killed_in_flight_resumes_from_the_last_complete_checkpoint(tmp_path):
  """kill -9 during an asynchronous save leaves the step's uncommitted temporary folder
  (orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete): a new manager
  ignores it, restores the last complete step, and saves that step again later."""
  import shutil

  directory = tmp_path / 'checkpoints'
  manager = checkpoint.create_manager(str(directory), keep_checkpoints=3)
  for step in (1, 2):
    checkpoint.save(manager, step, {'x': jnp.full((4,), step, jnp.float32)})
  manager.wait_until_finished()
  manager.close()
  # What a process killed while writing step 3 leaves: a partial, uncommitted copy.
  partial = directory / '3.orbax-checkpoint-tmp-1234567'
  shutil.copytree(directory / '2', partial)
  for f in partial.rglob('*'):
    if f.is_file() and f.name != 'manifest.ocdbt':
      f.unlink()
      break
  manager = checkpoint.create_manager(str(directory), keep_checkpoints=3)
  assert manager.latest_step() == 2
  target = {'x': jax.ShapeDtypeStruct((4,), jnp.float32)}
  np.testing.assert_array_equal(checkpoint.restore(manager, target)['x'], [2, 2, 2, 2])
  assert checkpoint.save(manager, 3, {'x': jnp.full((4,), 3, jnp.float32)})
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [1, 2, 3]
  np.testing.assert_array_equal(checkpoint.restore(manager, target, step=3)['x'], [3, 3, 3, 3])
  manager.close()


# --------------------------------------------------------------------------------------------
# Damaged checkpoints, failed saves.
# --------------------------------------------------------------------------------------------
def _data_files(step_dir):
  """The array data files of a step (orbax OCDBT chunks, zstd-compressed)."""
  return [p for p in step_dir.glob('state/**/d/*') if p.is_file()]


def _flip_bytes(step_dir, every=False):
  """One bit flipped in the middle of the step's largest data file (the arrays' chunks), or of
  every one of them."""
  files = _data_files(step_dir)
  for path in files if every else [max(files, key=lambda p: p.stat().st_size)]:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage, what', [
    ('flip', r'w does not match the checksum recorded when it was saved \(1 of 3 arrays'),
    ('truncate', r'its state does not read \(ValueError: OUT_OF_RANGE'),
    ('delete', r'its state does not read \(ValueError: '),
    ('metadata', r'its state metadata \(_METADATA\) is missing|its state metadata does not read'),
])
def test_a_damaged_step_is_one_line_naming_it_and_the_intact_steps(tmp_path, damage, what):
  directory = tmp_path / 'checkpoints'
  manager = checkpoint.create_manager(str(directory), keep_checkpoints=0)
  state = {'w': jnp.arange(50_000, dtype=jnp.float32), 'k': jax.random.key(0),
           'n': jnp.int32(3)}
  for step in (1, 2):
    checkpoint.save(manager, step, state, meta={'num_classes': {}})
  manager.wait_until_finished()
  assert set(checkpoint.restore_meta(manager, 2)['checksums']) == {'w', 'k', 'n'}
  big = max(_data_files(directory / '2'), key=lambda p: p.stat().st_size)
  if damage == 'flip':
    _flip_bytes(directory / '2')
  elif damage == 'truncate':
    big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
  elif damage == 'delete':
    big.unlink()
  else:
    (directory / '2' / 'state' / '_METADATA').unlink()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(checkpoint.DamagedError) as e:
    checkpoint.check_fits(manager, 2, target)
    checkpoint.restore(manager, target, step=2)
  message = str(e.value)
  assert message.startswith(f'checkpoint {directory / "2"} is damaged: ') and '\n' not in message
  assert re.search(what, message), message
  np.testing.assert_array_equal(checkpoint.restore(manager, target, step=1)['w'], state['w'])
  with pytest.raises(checkpoint.DamagedError, match=r'; intact steps: 1 \(e\.g\. --checkpoint='):
    checkpoint.check_step(str(directory), 2)
  manager.close()


def test_a_damaged_latest_step_falls_back_and_load_model_refuses_it(tmp_path, caplog):
  """Flipped bytes in the latest step of a real run: ``on_bad_checkpoint=stop`` refuses in one
  line, ``fallback`` (the default) sets the step aside and resumes from the newest intact one,
  ending where the undamaged run ended; ``inference.load_model`` refuses it naming the intact
  steps."""
  from ufo_jax import inference

  config = small_config()
  config.train.steps, config.train.checkpoint_every, config.train.log_every = 4, 2, 0
  config.eval.every_steps = 0
  work = tmp_path / 'run'
  straight = host_copy(train.train_and_evaluate(config, str(work), compiler_options=FAST_COMPILE))
  directory = work / 'checkpoints'
  _flip_bytes(directory / '4', every=True)  # whichever arrays a tool reads, some are damaged

  with pytest.raises(checkpoint.DamagedError, match=r'intact steps: 2 ') as e:
    inference.load_model(str(work), step=4)
  assert '\n' not in str(e.value) and f'checkpoint {directory / "4"} is damaged' in str(e.value)

  config.train.on_bad_checkpoint = 'stop'
  with pytest.raises(checkpoint.DamagedError,
                     match=r'/4 is damaged: .*\(train\.on_bad_checkpoint=stop\)$'):
    train.train_and_evaluate(config, str(work), compiler_options=FAST_COMPILE)

  config.train.on_bad_checkpoint = 'fallback'
  with caplog.at_level('WARNING'):
    resumed = train.train_and_evaluate(config, str(work), compiler_options=FAST_COMPILE)
  lines = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
  assert len(lines) == 1 and 'resuming from step 2 instead' in lines[0], lines
  assert f'kept as {directory / "4"}.damaged' in lines[0]
  assert (directory / '4.damaged').is_dir()
  assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [2, 4]
  assert_trees_equal(resumed, straight)  # steps 3 and 4 again, as the first time


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_earlier_checkpoints(
    tmp_path, monkeypatch):
  """ENOSPC while step 3 is written (mocked in orbax's write of the step's meta file): the run
  ends with one line naming the folder, the error and the free space; steps 1 and 2 are intact
  and no temporary folder is left."""
  import errno

  import orbax.checkpoint as ocp

  write = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access
  calls = []

  async def full_disk(self, x, directory):
    calls.append(str(directory))
    if len(calls) >= 3:
      raise OSError(errno.ENOSPC, 'No space left on device', str(directory / 'metadata'))
    return await write(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', full_disk)
  config = small_config()
  config.train.steps, config.train.checkpoint_every, config.train.log_every = 8, 1, 0
  config.train.keep_checkpoints = 0
  config.eval.every_steps = 0
  directory = tmp_path / 'checkpoints'
  with pytest.raises(checkpoint.SaveError) as e:
    train.train_and_evaluate(config, str(tmp_path), compiler_options=FAST_COMPILE)
  message = str(e.value)
  assert '\n' not in message and message.startswith('saving ')
  assert f'to {directory} failed (OSError: [Errno 28] No space left on device' in message
  assert re.search(r'; [\d.]+ GiB free there;', message), message
  assert 'earlier checkpoints (1, 2)' in message
  assert sorted(os.listdir(directory)) == ['1', '2']  # no step 3, no *.orbax-checkpoint-tmp*
  assert len(calls) <= 4  # at most the save after the failed one was started
  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', write)
  manager = checkpoint.create_manager(str(directory), read_only=True)
  setup = step_lib.build(config, checkpoint.restore_meta(manager, 2)['num_classes'],
                         sharding.create_mesh(config.mesh))
  assert int(checkpoint.restore(manager, setup.abstract_state, step=2)['step']) == 2
  manager.close()
