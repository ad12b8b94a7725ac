"""The end-to-end demo: generated raw data -> data_prep -> training -> the 13-benchmark table.

    python -m ufo_jax.demo --workdir=demo_workdir        (what `make demo` runs)

Every dataset here is GENERATED: small identities drawn as coloured block patterns, written in
the real raw layout of each public dataset (RecordIO, .bin pickles, Market/Duke/MSMT/VeRi/
VehicleID/VeRi-Wild/SOP folders and lists). The demo converts them with the same `data_prep`
command a user runs on the real downloads, trains `configs/ufo_tiny.py` on the CPU with
heterogeneous batches of all four tasks, evaluates all 13 protocols and prints the report beside
the published rows, with the chance level of every metric. It ends by exporting the model
(`ufo_jax.export`), embedding the generated Market-1501 gallery and query images with the export
(`ufo_jax.embed`) and searching the gallery (`ufo_jax.search`): it prints where the rank list is.

`data_prep` runs as a subprocess (the library never imports it: the on-disk format is the
interface).

    python -m ufo_jax.demo --ablation=batch --workdir=demo_workdir

replicates the seed's batch-composition ablation at laptop scale instead: a small ResNet
(configs/ablation_batch_r50.py scaled down) trained on generated Market1501 + SOP data with
homogeneous and with heterogeneous batches, both rows printed beside the seed's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
flags.DEFINE_enum('ablation', '', ['', 'batch'], "'batch': the batch-composition ablation "
                  '(homogeneous vs heterogeneous, small ResNet, person + product) instead.')


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
  served = export_and_search(workdir, run_dir, config)
  _say(f'Checkpoint:  {os.path.join(run_dir, "checkpoints")}')
  tensorboard = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
  _say(f'TensorBoard: {tensorboard if os.path.exists(tensorboard) else "tensorboard"} '
       f'--logdir {run_dir}')
  _say(f'Report:      {report["md"]} (and report.json)')
  _say(f'Figures:     {os.path.dirname(report["md"])}/*.png')
  _say(f'Exported:    {served["export"]} (model.json, {", ".join(served["files"])})')
  _say(f'Rank list:   {served["rank_list"]} (Market-1501 search, results.json beside it)')
  _say(f'Total time:  {time.time() - t0:.0f}s')
  with open(report['json'], encoding='utf-8') as f:
    return json.load(f)


# --------------------------------------------------------------------------- --ablation=batch

ABLATION_SETS = ('market1501', 'sop')
ABLATION_RESNET = '18'  # the laptop-scale stand-in for the seed's ResNet-50
ABLATION_STEPS = {'demo': 250, 'test': 40}


def ablation_config(data_dir: str, size: DemoSize, *, batch_mode: str, steps: int, seed: int):
  """configs/ablation_batch_r50.py at laptop scale: ResNet-18, small batches and images."""
  from ufo_jax import config as config_lib

  config = config_lib.load_config('ablation_batch_r50')
  config.seed = seed
  config.input.data_dir = data_dir
  config.input.image_size = size.image_size
  config.input.worker_count = 0
  config.input.batch_mode = batch_mode
  config.input.allow_partial_data = True  # the generated sets are small
  for task in config.tasks:
    config.tasks[task].batch_size = 16
  config.model.variant = ABLATION_RESNET
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  config.optim.lr = 0.05  # as configs/ufo_tiny.py: 0.2 is for the full batch of 1024
  config.train.steps = steps
  config.train.log_every = max(1, steps // 5)
  config.train.checkpoint_every = steps
  config.train.keep_checkpoints = 1
  config.train.keep_every = 0
  config.eval.every_steps = 0  # evaluate once, at the end
  config.eval.batch_size = 64
  config.eval.figures = False
  return config


def _ablation_row(label: str, results: dict) -> str:
  market, sop = results.get('market1501'), results.get('sop')
  cell = lambda v, n: '-' if v is None else '/'.join(f'{x:.2f}' for x in v[:n])  # noqa: E731
  return f'| {label} | {cell(market, 2)} | {cell(sop, 1)} |'


def run_batch_ablation(workdir: str, size_name: str = 'demo', *, steps: int = 0,
                       seed: int = 0) -> dict:
  """Both arms of the batch ablation on generated data; returns {batch_mode: report 'ours'}."""
  from ufo_jax import config as config_lib
  from ufo_jax import train

  size = SIZES[size_name]
  steps = steps or ABLATION_STEPS[size_name]
  root = os.path.join(os.path.abspath(workdir), 'ablation_batch')
  raw, data = os.path.join(root, 'raw'), os.path.join(root, 'data')
  t0 = time.time()
  names = ','.join(ABLATION_SETS)
  if not os.path.exists(os.path.join(raw, '.complete')):
    _say(f'[1/3] Generating SYNTHETIC Market1501 and SOP data (not the real datasets): {raw}')
    _run(['-m', 'data_prep.generate', f'--raw_root={raw}', f'--datasets={names}',
          f'--seed={seed}', f'--num_ids={size.num_ids}', f'--num_test_ids={size.num_test_ids}',
          f'--images_per_id={size.images_per_id}', f'--image_size={size.raw_image_size}'])
    open(os.path.join(raw, '.complete'), 'w').close()
  _run(['-m', 'data_prep.build', f'--dataset={names}', f'--raw_root={raw}', f'--out_dir={data}',
        '--skip_count_check'])
  ours = {}
  for i, mode in enumerate(('homogeneous', 'heterogeneous')):
    config = ablation_config(data, size, batch_mode=mode, steps=steps, seed=seed)
    run_dir = os.path.join(root, mode)
    if os.path.exists(run_dir):  # every run trains from scratch
      shutil.rmtree(run_dir)
    _say(f'[{2 + i}/3] Training ResNet-{ABLATION_RESNET} at {size.image_size}px, {steps} steps, '
         f'{mode} batches of {config_lib.global_batch_size(config)} (person + product) '
         f'in {run_dir}')
    train.train_and_evaluate(config, run_dir)
    with open(_latest_report(run_dir)['json'], encoding='utf-8') as f:
      report = json.load(f)
    ours[mode] = {name: report['ours'].get(name) for name in ABLATION_SETS}
    ours[mode]['chance'] = {name: report.get('chance', {}).get(name) for name in ABLATION_SETS}
  spec = importlib.util.spec_from_file_location(
      'ufo_jax_configs_ablation', os.path.join(ROOT, 'configs', 'ablation_batch_r50.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  lines = ['| batch | Market1501 rank-1 / mAP | SOP Recall@1 |', '|---|---|---|']
  for mode in ('homogeneous', 'heterogeneous'):
    lines.append(_ablation_row(f'{mode} (seed: ResNet-50, real data)', module.SEED_RESULTS[mode]))
  for mode in ('homogeneous', 'heterogeneous'):
    lines.append(_ablation_row(f'{mode} (ours: ResNet-{ABLATION_RESNET}, generated data, '
                               f'{steps} steps)', ours[mode]))
  lines.append(_ablation_row('chance level', ours['heterogeneous']['chance']))
  print('\n'.join(lines), flush=True)
  _say('Our rows come from GENERATED data and a small model trained briefly: they show both '
       'arms run end to end, not the published accuracy. The generated identities are easy '
       '(both arms may reach 100%), so a gap here, or none, says little about the seed\'s.')
  _say(f'Runs:        {root}/homogeneous, {root}/heterogeneous (reports, checkpoints)')
  _say(f'Total time:  {time.time() - t0:.0f}s')
  return ours


def export_and_search(workdir: str, run_dir: str, config) -> dict:
  """Exports the trained model, embeds the generated Market-1501 gallery and query, searches."""
  import importlib.util

  from ufo_jax import catalog
  from ufo_jax import embed as embed_lib
  from ufo_jax import export as export_lib
  from ufo_jax import search as search_lib

  formats = ['orbax', 'jax_export'] + (['onnx'] if importlib.util.find_spec('jax2onnx') else [])
  export_dir = os.path.join(workdir, 'export')
  _say(f'Exporting the model ({", ".join(formats)}) to {export_dir}, embedding the generated '
       'Market-1501 gallery and query images with it, searching the gallery')
  info = export_lib.export(run_dir, export_dir, config, formats=formats, overwrite=True,
                           print_fn=logging.info)
  market = os.path.join(workdir, 'raw', catalog.get('market1501').raw_folder)
  npz = {}
  for split, folder in (('gallery', 'bounding_box_test'), ('query', 'query')):
    npz[split] = os.path.join(workdir, 'search', f'market1501_{split}.npz')
    embed_lib.run(export_dir, os.path.join(market, folder), npz[split], tasks=['person'],
                  print_fn=_say)
  search_lib.search(npz['gallery'], npz['query'], 'person', topk=10,
                    out_dir=os.path.join(workdir, 'search'), print_fn=_say)
  return {'export': export_dir, 'files': list(info['files'].values()),
          'rank_list': os.path.join(workdir, 'search', search_lib.RANK_LIST_FILE)}


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
  if FLAGS.ablation == 'batch':
    run_batch_ablation(FLAGS.workdir, FLAGS.size, steps=FLAGS.steps, seed=FLAGS.seed)
    return
  run(FLAGS.workdir, FLAGS.size, steps=FLAGS.steps, seed=FLAGS.seed)


if __name__ == '__main__':
  app.run(main)
