"""The end-to-end demo: generated raw data -> data_prep -> training -> the 13-benchmark table.

    python -m ufo_jax.demo --workdir=demo_workdir        (what `make demo` runs)

Every dataset here is GENERATED: small identities drawn as coloured block patterns, written in
the real raw layout of each public dataset (RecordIO, .bin pickles, Market/Duke/MSMT/VeRi/
VehicleID/VeRi-Wild/SOP folders and lists). The demo converts them with the same `data_prep`
command a user runs on the real downloads, trains `configs/ufo_tiny.py` on the CPU with
heterogeneous batches of all four tasks, evaluates all 13 protocols and prints the report beside
the published rows, with the chance level of every metric.

`data_prep` runs as a subprocess (the library never imports it: the on-disk format is the
interface).
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import shutil
import subprocess
import sys
import time
from typing import Sequence

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """How much data to generate and how long to train."""

  num_ids: int  # identities per training set
  num_test_ids: int  # identities per test split
  images_per_id: int
  raw_image_size: int  # side of the generated JPEGs
  num_pairs: int  # pairs per face verification set
  steps: int
  image_size: int  # model input


SIZES = {
    # `make demo`: a few minutes on 2 CPU cores.
    'demo': DemoSize(num_ids=48, num_test_ids=24, images_per_id=6, raw_image_size=48,
                     num_pairs=200, steps=600, image_size=32),
    # The version that runs inside `make test`.
    'test': DemoSize(num_ids=24, num_test_ids=12, images_per_id=4, raw_image_size=32,
                     num_pairs=200, steps=150, image_size=32),
}

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'demo_workdir', 'Where the generated data, the converted data, '
                    'checkpoints, TensorBoard logs, report and figures go.')
flags.DEFINE_enum('size', 'demo', list(SIZES), 'Data and training size.')
flags.DEFINE_integer('steps', 0, 'Training steps (0: the size preset).')
flags.DEFINE_integer('seed', 0, 'Seed of the generated data and of training.')


class _DemoLogFilter(py_logging.Filter):
  """Console: ufo-jax's own INFO lines and clu's progress/metric lines; warnings from all."""

  _SHOWN = ('/ufo_jax/', 'logging_writer.py', 'periodic_actions.py')

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno > py_logging.INFO:
      return True
    if str(record.msg).startswith('[Hyperparameters]'):  # one very long line; in TensorBoard
      return False
    return any(part in record.pathname for part in self._SHOWN)


def _say(message: str) -> None:
  print(message, flush=True)


def _run(args: Sequence[str]) -> None:
  """Runs a command of this repository (python -m ...), failing loudly."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p))
  t0 = time.time()
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise SystemExit(f'demo: `{" ".join(args)}` failed with exit code {proc.returncode}')
  logging.info('%s took %.1fs', ' '.join(args[:2]), time.time() - t0)


def demo_config(data_dir: str, size: DemoSize, *, steps: int, seed: int):
  """configs/ufo_tiny.py on the converted demo data."""
  from ufo_jax import config as config_lib

  config = config_lib.load_config('ufo_tiny')
  config.seed = seed
  config.input.source = 'tfds'
  config.input.data_dir = data_dir
  config.input.image_size = size.image_size
  config.input.worker_count = 0
  config.input.allow_partial_data = True  # the generated sets are small, not the published ones
  config.train.steps = steps
  config.train.log_every = max(1, steps // 10)
  config.train.checkpoint_every = steps
  config.eval.every_steps = 0  # evaluate once, at the end
  return config


def generate_and_convert(workdir: str, size: DemoSize, seed: int) -> str:
  """Writes every raw layout under workdir/raw and converts it into workdir/data."""
  raw, data = os.path.join(workdir, 'raw'), os.path.join(workdir, 'data')
  if not os.path.exists(os.path.join(raw, '.complete')):
    _say(f'[1/4] Generating SYNTHETIC data (not the real datasets) in every raw layout: {raw}')
    _run(['-m', 'data_prep.generate', f'--raw_root={raw}', f'--seed={seed}',
          f'--num_ids={size.num_ids}', f'--num_test_ids={size.num_test_ids}',
          f'--images_per_id={size.images_per_id}', f'--image_size={size.raw_image_size}',
          f'--num_pairs={size.num_pairs}'])
    open(os.path.join(raw, '.complete'), 'w').close()
  else:
    _say(f'[1/4] Reusing the generated raw data in {raw}')
  _say(f'[2/4] Converting all 14 datasets with data_prep -> {data}')
  _run(['-m', 'data_prep.build', '--dataset=all', f'--raw_root={raw}', f'--out_dir={data}',
        '--skip_count_check'])
  inspect_dir = os.path.join(workdir, 'inspect')
  _run(['-m', 'data_prep.inspect', f'--data_dir={data}', f'--out={inspect_dir}'])
  _say(f'      Converted data: counts per split in {inspect_dir}/summary.txt, a grid of images '
       f'per split in {inspect_dir}/<set>_<split>.png')
  return data


def run(workdir: str, size_name: str = 'demo', *, steps: int = 0, seed: int = 0) -> dict:
  """The whole demo; returns the evaluation results (benchmark -> metrics)."""
  from ufo_jax import train

  size = SIZES[size_name]
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  data_dir = generate_and_convert(workdir, size, seed)
  config = demo_config(data_dir, size, steps=steps or size.steps, seed=seed)
  run_dir = os.path.join(workdir, 'run')
  if os.path.exists(run_dir):  # a demo trains from scratch every time
    shutil.rmtree(run_dir)
  _say(f'[3/4] Training {config.name} (ViT-{config.model.variant} at {size.image_size}px, '
       f'{config.train.steps} steps, heterogeneous batches of '
       + ', '.join(f'{config.tasks[t].batch_size} {t}' for t in config.tasks)
       + f') in {run_dir}')
  train.train_and_evaluate(config, run_dir)
  _say('[4/4] Evaluated all 13 benchmarks (report below)')
  report = _latest_report(run_dir)
  with open(report['md'], encoding='utf-8') as f:
    print(f.read().split('\n## Figures')[0].rstrip() + '\n', flush=True)  # tables only
  _say('The numbers above come from GENERATED data: they show the whole path works and learns '
       '(compare each metric with its chance level), not the published accuracy.')
  _say(f'Checkpoint:  {os.path.join(run_dir, "checkpoints")}')
  tensorboard = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
  _say(f'TensorBoard: {tensorboard if os.path.exists(tensorboard) else "tensorboard"} '
       f'--logdir {run_dir}')
  _say(f'Report:      {report["md"]} (and report.json)')
  _say(f'Figures:     {os.path.dirname(report["md"])}/*.png')
  _say(f'Total time:  {time.time() - t0:.0f}s')
  with open(report['json'], encoding='utf-8') as f:
    return json.load(f)


def _latest_report(run_dir: str) -> dict[str, str]:
  """The newest report.md/report.json under run_dir."""
  found = []
  for dirpath, _, filenames in os.walk(run_dir):
    if 'report.md' in filenames:
      path = os.path.join(dirpath, 'report.md')
      found.append((os.path.getmtime(path), dirpath))
  if not found:
    raise SystemExit(f'demo: training finished but no report.md was written under {run_dir}')
  dirpath = max(found)[1]
  return {'md': os.path.join(dirpath, 'report.md'), 'json': os.path.join(dirpath, 'report.json')}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_DemoLogFilter())
  run(FLAGS.workdir, FLAGS.size, steps=FLAGS.steps, seed=FLAGS.seed)


if __name__ == '__main__':
  app.run(main)
