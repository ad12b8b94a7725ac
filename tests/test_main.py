"""The entry point: config errors, train -> SIGTERM -> resume bit for bit, refused resumes,
--mode=eval from the command line, dry run on 8 simulated devices."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ufo_jax import config as config_lib
from ufo_test_utils import assert_trees_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def _env(devices=1, cache_dir=None):
  flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  if cache_dir:  # later runs reuse the first run's compiled programs
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _main(args, *, devices=1, cache_dir=None):
  return subprocess.run([sys.executable, '-m', 'ufo_jax.main', *args],
                        env=_env(devices, cache_dir), cwd=ROOT, capture_output=True, text=True,
                        timeout=TIMEOUT_S)


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
  """The train state of checkpoint ``step`` of a run, rebuilt from the run's config.json."""
  from ufo_jax import checkpoint, sharding
  from ufo_jax import step as step_lib

  config = config_lib.load_run_config(str(workdir))
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'), read_only=True)
  meta = checkpoint.restore_meta(manager, step)
  setup = step_lib.build(config, meta['num_classes'], sharding.create_mesh(config.mesh),
                      padded_classes=meta['padded_classes'])
  state = checkpoint.restore(manager, setup.abstract_state, step=step)
  manager.close()
  return state


STEPS = 30
TRAIN_OVERRIDES = {'train.steps': STEPS, 'train.log_every': 1, 'train.checkpoint_every': 0,
                   'input.image_size': 32, 'model.depth': 2, 'tasks.face.batch_size': 8,
                   'tasks.person.batch_size': 8, 'tasks.product.batch_size': 8,
                   'tasks.vehicle.batch_size': 8}
CONSOLE_LINE = re.compile(r'step 2/30 \| ETA \d+m\d\ds \| loss [\d.]+ \| face [\d.]+ person '
                          r'[\d.]+ product [\d.]+ vehicle [\d.]+ \| [\d.]+ img/s')


def test_sigterm_saves_exits_0_and_the_rerun_finishes_bit_identical(tmp_path, converted_data):
  cache = tmp_path / 'cache'
  args = ['--config=configs/ufo_tiny.py'] + [f'--config.{k}={v}' for k, v in
                                              TRAIN_OVERRIDES.items()]
  # Uninterrupted, with a profiler trace of 2 steps.
  straight = tmp_path / 'straight'
  first = _main(args + [f'--workdir={straight}', '--profile_steps=2'], cache_dir=cache)
  assert first.returncode == 0, first.stderr[-5000:]
  assert json.loads((straight / 'config.json').read_text())['train']['steps'] == STEPS
  assert sorted(os.listdir(straight / 'checkpoints')) == [str(STEPS)]
  assert CONSOLE_LINE.search(first.stderr), first.stderr[-3000:]
  assert 'optim.lr' not in first.stderr  # hyperparameters go to TensorBoard, not the console
  content = b''.join(open(e, 'rb').read() for e in glob.glob(str(straight / 'events.out.*')))
  for tag in (b'train/face/cosface', b'train/person/triplet', b'train/person/accuracy',
              b'train/lr', b'train/grad_norm', b'perf/images_per_sec', b'optim.lr'):
    assert tag in content, tag
  assert glob.glob(str(straight / 'profile' / '**' / '*.xplane.pb'), recursive=True)

  # SIGTERM after step 3 was logged: the run finishes that step, saves, exits 0.
  workdir = tmp_path / 'run'
  env = _env(1, cache)
  proc = subprocess.Popen([sys.executable, '-m', 'ufo_jax.main', *args, f'--workdir={workdir}'],
                          env=env, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f'step 3/{STEPS}' in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stderr.readlines()
  assert proc.wait(timeout=TIMEOUT_S) == 0, ''.join(lines)[-5000:]
  stopped = re.search(r'SIGTERM: stopped after step (\d+)', ''.join(lines))
  assert stopped, ''.join(lines)[-3000:]
  step = int(stopped.group(1))
  assert 3 <= step < STEPS and sorted(os.listdir(workdir / 'checkpoints')) == [str(step)]

  # The rerun needs nothing but the workdir, and ends where the uninterrupted run ended.
  second = _main([f'--workdir={workdir}'], cache_dir=cache)
  assert second.returncode == 0, second.stderr[-5000:]
  assert f'restoring step {step}' in second.stderr
  assert_trees_equal(_restore(workdir, STEPS), _restore(straight, STEPS))

  # A state-changing override is refused in one line; a harmless one would apply.
  # (no --config: the overrides are read against the saved config.json)
  refused = _main([f'--workdir={workdir}', '--config.model.variant=S/16'])
  assert refused.returncode == 2
  assert ("error: config.model.variant: the run in " in refused.stderr
          and "was trained with 'Ti/16', this run asks for 'S/16'" in refused.stderr)
  assert 'Traceback' not in refused.stderr
  # Without the saved config, the checkpoint itself is checked: one line, no orbax traceback.
  os.remove(workdir / 'config.json')
  mismatch = _main(args + [f'--workdir={workdir}', '--config.model.variant=S/16',
                           '--config.train.steps=40'])
  assert mismatch.returncode == 2, mismatch.stderr[-3000:]
  assert 'does not fit the config' in mismatch.stderr and 'Traceback' not in mismatch.stderr

  # --mode=eval of a step folder, its config found beside it; only the explicit overrides
  # (data, benchmarks as 'a,b') apply on top.
  data_dir, _ = converted_data
  report_dir = tmp_path / 'eval'
  evaluated = _main(['--mode=eval', f'--workdir={report_dir}',
                     f'--checkpoint={straight / "checkpoints" / str(STEPS)}',
                     f'--config.input.data_dir={data_dir}',
                     '--config.eval.sets=lfw,sop', '--config.eval.figures=False'],
                    cache_dir=cache)
  assert evaluated.returncode == 0, evaluated.stderr[-5000:]
  reports = glob.glob(str(report_dir / '**' / 'report.json'), recursive=True)
  assert reports, evaluated.stderr[-3000:]
  ours = json.loads(open(reports[0]).read())['ours']
  assert {k for k, v in ours.items() if v and v[0] is not None} == {'lfw', 'sop'}, ours


def _two_processes(args, *, cache, until, signal_to, sig=signal.SIGINT):
  """Two ``--distributed`` processes on localhost in one process group of their own (with their
  grain workers); once process 0 printed ``until``, ``sig`` goes to the whole group
  (``signal_to='group'``: a terminal's Ctrl-C, a scheduler) or to process 1 only. Returns the
  exit codes and the outputs."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  args = args + ['--distributed', f'--coordinator_address=localhost:{port}', '--num_processes=2']
  procs = []
  for i in range(2):
    group = {'process_group': procs[0].pid if procs else 0}
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'ufo_jax.main', *args, f'--process_id={i}'],
        env=_env(1, cache), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, **group))
  outputs = [[], []]
  readers = [threading.Thread(target=lambda i=i: outputs[i].extend(procs[i].stderr))
             for i in range(2)]
  for reader in readers:
    reader.start()
  deadline = time.time() + TIMEOUT_S
  while not any(until in line for line in list(outputs[0])):
    assert time.time() < deadline and procs[0].poll() is None, ''.join(outputs[0])[-3000:]
    time.sleep(0.05)
  if signal_to == 'group':
    os.killpg(procs[0].pid, sig)
  else:
    procs[1].send_signal(sig)
  codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  for reader in readers:
    reader.join()
  return codes, [''.join(o) for o in outputs]


def _losses(output, step):
  """Process 0's console line of ``step`` without its ETA and img/s."""
  line = re.search(rf'step {step}/200 \| ETA \S+ \| (loss .*?) \| [\d.]+ img/s', output)
  assert line, output[-3000:]
  return line.group(1)


def test_ctrl_c_to_two_processes_with_workers_saves_once_and_resumes_exactly(
    tmp_path, converted_data):
  """jax.distributed with 2 processes, each reading the converted data with 2 grain workers.
  SIGINT to the whole process group (workers too): both agree on the stop step, save it once
  and exit 0 without an error. The rerun resumes there and computes what an uninterrupted run
  computes; SIGTERM to process 1 only then stops both at the same step."""
  data_dir, _ = converted_data
  cache = tmp_path / 'cache'
  args = ['--config=configs/ufo_tiny.py', '--config.train.stop_sync_every=2',
          '--config.train.steps=200', '--config.input.source=tfds',
          f'--config.input.data_dir={data_dir}', '--config.input.worker_count=2']
  args += [f'--config.{k}={v}' for k, v in TRAIN_OVERRIDES.items() if k != 'train.steps']
  straight, run = tmp_path / 'straight', tmp_path / 'run'
  codes, reference = _two_processes(args + [f'--workdir={straight}'], cache=cache,
                                    until='step 12/200', signal_to='group')
  assert codes == [0, 0], [o[-3000:] for o in reference]

  codes, outputs = _two_processes(args + [f'--workdir={run}'], cache=cache, until='step 3/200',
                                  signal_to='group')
  assert codes == [0, 0], [o[-3000:] for o in outputs]
  for output in outputs:
    for bad in ('Traceback', 'terminated unexpectedly', 'Error', 'error:'):
      assert bad not in output, output[-3000:]
  steps = [re.search(r'SIGINT: stopped after step (\d+)', o) for o in outputs]
  assert all(steps), [o[-3000:] for o in outputs]
  step = int(steps[0].group(1))
  assert int(steps[1].group(1)) == step and step % 2 == 0 and step + 2 <= 12
  assert sorted(os.listdir(run / 'checkpoints')) == [str(step)]

  codes, rerun = _two_processes(args + [f'--workdir={run}'], cache=cache,
                                until=f'step {step + 2}/200', signal_to='process 1',
                                sig=signal.SIGTERM)
  assert codes == [0, 0], [o[-3000:] for o in rerun]
  assert f'restoring step {step}' in rerun[0]
  for k in (step + 1, step + 2):  # the same losses as the uninterrupted run, every task's
    assert _losses(rerun[0], k) == _losses(reference[0], k)
  stops = [re.search(r'(SIGTERM|signal in another process): stopped after step (\d+)', o)
           for o in rerun]
  assert all(stops) and stops[0].group(2) == stops[1].group(2), [o[-3000:] for o in rerun]
  assert (stops[0].group(1), stops[1].group(1)) == ('signal in another process', 'SIGTERM')

  # Elastic: the same run continued by one process (2 -> 1), with its own slice of the data.
  stopped = int(stops[0].group(2))
  alone = _main([f'--workdir={run}', f'--config.train.steps={stopped + 2}',
                 '--config.eval.sets=lfw', '--config.eval.figures=False'], cache_dir=cache)
  assert alone.returncode == 0, alone.stderr[-5000:]
  assert (f'step {stopped} was saved by 2 processes on 2 devices, this run has 1 on 1'
          in alone.stderr and 'the sample order from here on differs' in alone.stderr)
  assert f'step {stopped + 2}/{stopped + 2}' in alone.stderr
  assert str(stopped + 2) in os.listdir(run / 'checkpoints')


def test_two_runs_on_one_workdir_one_is_refused_and_8_devices_resume_on_4(tmp_path):
  """Two training processes started together on one workdir: one trains, the other is refused in
  one line naming the holder. The run then resumes on 4 devices (it was saved on 8): the state
  restored onto the new mesh (checksums verified), the step continuing."""
  cache = tmp_path / 'cache'
  workdir = tmp_path / 'run'
  args = ['--config=configs/ufo_tiny.py', f'--workdir={workdir}']
  args += [f'--config.{k}={v}' for k, v in TRAIN_OVERRIDES.items() if k != 'train.steps']
  procs = [subprocess.Popen([sys.executable, '-m', 'ufo_jax.main', *args, '--config.train.steps=2'],
                            env=_env(8, cache), cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True) for _ in range(2)]
  results = [(p.communicate(timeout=TIMEOUT_S)[1], p.returncode)[::-1] for p in procs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], [err[-3000:] for _, err in results]
  refused = next(err for code, err in results if code == 2)
  errors = [line for line in refused.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'is in use by another training run (host ' in errors[0], refused
  winner = next(p for p, (code, _) in zip(procs, results) if code == 0)
  assert f', pid {winner.pid}, started ' in errors[0] and 'Traceback' not in refused
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  assert not (workdir / 'run.lock').exists()

  resumed = _main([f'--workdir={workdir}', '--config.train.steps=4'], devices=4, cache_dir=cache)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  assert 'step 2 was saved on 8 devices, restored onto 4 (the sample order is unchanged)' in (
      resumed.stderr)
  assert 'restoring step 2' in resumed.stderr and 'step 4/4' in resumed.stderr
  assert int(_restore(workdir, 4)['step']) == 4


def _vit_l_params(image_size, padded_classes):
  """Parameter count of ViT-L/16 plus the heads, from the architecture (docs/MODELS.md)."""
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
  # The compile report of --mode=aot, for the local devices, of the step training runs.
  assert "8 local cpu devices (cpu): 8 chips, 1 hosts, mesh {'data': 2, 'fsdp': 4}" in out
  # 93,431 / 2,494 / 11,318 / 44,411 classes, padded to multiples of 8.
  padded = (93432, 2496, 11320, 44416)
  assert f'parameters: {_vit_l_params(64, padded):,} ' in out
  assert 'model FLOPs per step: ' in out and 'train step memory per chip: arguments' in out
  assert 'collectives per step: all-reduce' in out and 'HBM' not in out  # a CPU has none
  lines = out.splitlines()
  face = [line for line in lines if line.strip().startswith('params/heads/face/class_weights')]
  assert face and "(None, ('data', 'fsdp'))" in face[0] and '(1024, 93432)' in face[0]
  fc1 = [line for line in lines if line.strip().startswith('params/backbone/blocks/mlp/fc1/kernel')]
  assert fc1 and "'fsdp'" in fc1[0]
