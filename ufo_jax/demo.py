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

    python -m ufo_jax.demo --ablation=batch --difficulty=hard --seeds=3 --workdir=demo_workdir

replicates the seed's batch-composition ablation at laptop scale instead: a small ResNet
(configs/ablation_batch_r50.py scaled down) trained on generated Market1501 + SOP data with
homogeneous and with heterogeneous batches, for each seed; writes workdir/ablation/batch.json
and prints the mean ± std of each arm beside the seed's rows. `--ablation=drop_path`: drop path
0.1 vs 0.2 on the same harness (ufo_tiny's ViT). `--difficulty=hard` (also for the demo itself):
fine-grained identities under strong nuisances (data_prep/generate.py, docs/TRAINING.md "What a
laptop can and cannot show").
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

import numpy as np
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
# --difficulty=hard: more identities (fine-grained ones, data_prep/generate.py), same budgets.
HARD_SIZES = {
    # 96 test identities: 96 Market1501 queries, so rank-1 moves in steps of about 1 %, not 3 %.
    'demo': DemoSize(num_ids=96, num_test_ids=96, images_per_id=6, raw_image_size=48,
                     num_pairs=200, steps=600, image_size=32),
    'test': DemoSize(num_ids=48, num_test_ids=24, images_per_id=4, raw_image_size=32,
                     num_pairs=200, steps=150, image_size=32),
}


def resolve_size(size_name: str, difficulty: str = 'easy') -> DemoSize:
  """The size preset ``size_name`` of ``difficulty`` ('easy' or 'hard')."""
  return (HARD_SIZES if difficulty == 'hard' else SIZES)[size_name]

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'demo_workdir', 'Where the generated data, the converted data, '
                    'checkpoints, TensorBoard logs, report and figures go.')
flags.DEFINE_enum('size', 'demo', list(SIZES), 'Data and training size.')
flags.DEFINE_integer('steps', 0, 'Training steps (0: the size preset).')
flags.DEFINE_integer('seed', 0, 'Seed of the generated data and of training.')
flags.DEFINE_enum('ablation', '', ['', 'batch', 'drop_path'], "'batch': the batch-composition "
                  'ablation (homogeneous vs heterogeneous, small ResNet, person + product) '
                  "instead; 'drop_path': drop path 0.1 vs 0.2 (ufo_tiny, person + product).")
flags.DEFINE_enum('difficulty', 'easy', ['easy', 'hard'], "Generated data: 'easy' (block "
                  "patterns, `make demo`) or 'hard' (fine-grained identities, strong nuisances).")
flags.DEFINE_integer('seeds', 1, 'Ablations: training seeds seed .. seed + seeds - 1 per arm.')


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
  from ufo_jax.data import augment
  from ufo_jax import config as config_lib

  config = config_lib.load_config('ufo_tiny')
  config.seed = seed
  config.input.source = 'tfds'
  config.input.data_dir = data_dir
  config.input.image_size = size.image_size
  config.input.augment.pad = augment.scaled_pad(size.image_size)  # the crop pad, scaled
  config.input.worker_count = 0
  config.input.allow_partial_data = True  # the generated sets are small, not the published ones
  config.train.steps = steps
  config.train.log_every = max(1, steps // 10)
  config.train.checkpoint_every = steps
  config.eval.every_steps = 0  # evaluate once, at the end
  return config


def _raw_dir(workdir: str, difficulty: str) -> str:
  return os.path.join(workdir, 'raw' if difficulty == 'easy' else f'raw_{difficulty}')


def generate_and_convert(workdir: str, size: DemoSize, seed: int,
                         difficulty: str = 'easy') -> str:
  """Writes every raw layout under workdir/raw and converts it into workdir/data.

  ``difficulty='hard'``: workdir/raw_hard and workdir/data_hard.
  """
  raw = _raw_dir(workdir, difficulty)
  data = os.path.join(workdir, 'data' if difficulty == 'easy' else f'data_{difficulty}')
  if not os.path.exists(os.path.join(raw, '.complete')):
    _say(f'[1/4] Generating SYNTHETIC data (not the real datasets) in every raw layout: {raw}')
    _run(['-m', 'data_prep.generate', f'--raw_root={raw}', f'--seed={seed}',
          f'--num_ids={size.num_ids}', f'--num_test_ids={size.num_test_ids}',
          f'--images_per_id={size.images_per_id}', f'--image_size={size.raw_image_size}',
          f'--num_pairs={size.num_pairs}', f'--difficulty={difficulty}'])
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


def run(workdir: str, size_name: str = 'demo', *, steps: int = 0, seed: int = 0,
        difficulty: str = 'easy') -> dict:
  """The whole demo; returns the evaluation results (benchmark -> metrics)."""
  from ufo_jax import train

  size = resolve_size(size_name, difficulty)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  data_dir = generate_and_convert(workdir, size, seed, difficulty)
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
  served = export_and_search(workdir, run_dir, config, _raw_dir(workdir, difficulty))
  _say(f'Checkpoint:  {os.path.join(run_dir, "checkpoints")}')
  tensorboard = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
  _say(f'TensorBoard: {tensorboard if os.path.exists(tensorboard) else "tensorboard"} '
       f'--logdir {run_dir}')
  _say(f'Report:      {report["md"]} (and report.json)')
  _say(f'Figures:     {os.path.dirname(report["md"])}/*.png')
  _say(f'Exported:    {served["export"]} (model.json, {", ".join(served["files"])})')
  _say(f'Rank list:   {served["rank_list"]} (Market-1501 search, results.json beside it)')
  _say(f'Total time:  {time.time() - t0:.0f}s')
  _say('Your own data and tasks: docs/CUSTOM_DATA.md')
  with open(report['json'], encoding='utf-8') as f:
    return json.load(f)


# --------------------------------------------------------------------------- --ablation=...

ABLATION_SETS = ('market1501', 'sop')
ABLATION_RESNET = '18'  # the laptop-scale stand-in for the seed's ResNet-50
ABLATION_STEPS = {'demo': 250, 'test': 40}
# The arms of each ablation: {ablation: (arm, ...)}; batch: config.input.batch_mode, drop_path:
# config.model.drop_path_rate of configs/ufo_tiny.py's ViT (the seed: 0.1 -> 0.2 helps the small
# person and product sets).
ABLATIONS = {'batch': ('homogeneous', 'heterogeneous'), 'drop_path': ('0.1', '0.2')}
SEED_DROP_PATH = 'the seed: drop path 0.1 -> 0.2 helps the small person and product sets'


def ablation_config(data_dir: str, size: DemoSize, *, batch_mode: str, steps: int, seed: int):
  """configs/ablation_batch_r50.py at laptop scale: ResNet-18, small batches and images."""
  from ufo_jax.data import augment
  from ufo_jax import config as config_lib

  config = config_lib.load_config('ablation_batch_r50')
  config.name = f'ablation_batch_resnet{ABLATION_RESNET}'  # the reports name the model trained
  config.seed = seed
  config.input.data_dir = data_dir
  config.input.image_size = size.image_size
  config.input.worker_count = 0
  config.input.batch_mode = batch_mode
  config.input.augment.pad = augment.scaled_pad(size.image_size)  # the crop pad, scaled
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


def person_and_product(config):
  """``config`` with two tasks only: person on Market1501, product on SOP (in place)."""
  import ml_collections

  tasks = config.tasks
  config.tasks = ml_collections.ConfigDict()
  for task, dataset in (('person', 'market1501'), ('product', 'sop')):
    config.tasks[task] = tasks[task]
    config.tasks[task].datasets = (dataset,)
  return config


def drop_path_config(data_dir: str, size: DemoSize, *, rate: float, steps: int, seed: int):
  """configs/ufo_tiny.py on person (Market1501) + product (SOP) only, at drop path ``rate``."""
  config = person_and_product(demo_config(data_dir, size, steps=steps, seed=seed))
  config.model.drop_path_rate = rate
  config.train.keep_checkpoints = 1
  config.eval.sets = ABLATION_SETS
  config.eval.figures = False
  return config


def _ablation_row(label: str, results: dict) -> str:
  market, sop = results.get('market1501'), results.get('sop')
  cell = lambda v, n: '-' if v is None else '/'.join(f'{x:.2f}' for x in v[:n])  # noqa: E731
  return f'| {label} | {cell(market, 2)} | {cell(sop, 1)} |'


def _mean_std_row(label: str, rows: list[dict]) -> str:
  """``label | rank-1 / mAP (mean ± std) | Recall@1 (mean ± std)`` over the seeds' rows."""

  def cell(name: str, n: int) -> str:
    values = np.array([r[name][:n] for r in rows if r.get(name) is not None], np.float64)
    if not len(values):
      return '-'
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(n)
    return ' / '.join(f'{m:.2f} ± {s:.2f}' for m, s in zip(values.mean(axis=0), std))
  return f'| {label} | {cell("market1501", 2)} | {cell("sop", 1)} |'


def _enable_compilation_cache(path: str) -> None:
  """Reuses XLA executables across the runs of an ablation (same shapes: only seeds differ)."""
  import jax

  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _test_images(raw: str, dataset: str, image_size: int, count: int) -> np.ndarray:
  """Up to ``count`` test JPEGs of a generated ``dataset`` (sorted), resized as uint8 NHWC."""
  from PIL import Image

  from ufo_jax import catalog

  folder = os.path.join(raw, catalog.get(dataset).raw_folder)
  if dataset == 'sop':
    with open(os.path.join(folder, 'Ebay_test.txt'), encoding='utf-8') as f:
      paths = [os.path.join(folder, line.split()[-1]) for line in f.read().splitlines()[1:]]
  else:  # Market-1501 layout
    test = os.path.join(folder, 'bounding_box_test')
    paths = sorted(os.path.join(test, f) for f in os.listdir(test) if f.endswith('.jpg'))
  step = max(1, len(paths) // count)
  return np.stack([np.asarray(Image.open(p).convert('RGB').resize(
      (image_size, image_size), Image.BICUBIC)) for p in paths[::step][:count]])


def batchnorm_statistics(run_dir: str, images: dict[str, np.ndarray],
                         normalization: tuple[float, float]) -> dict:
  """How far each task's BatchNorm statistics are from the mixed ones, layer by layer.

  For every BatchNorm of the trained backbone, the batch mean/variance of each task's test
  images alone (what a homogeneous step normalises with), of the equal mix of the tasks (what a
  heterogeneous step normalises with) and the running averages (what evaluation uses). Returns
  per layer: ``shift[task]`` = mean over channels of |mean_task - mean_mix| / std_mix,
  ``log_var[task]`` = mean |log(var_task / var_mix)|, and ``running_shift`` = the same shift
  for the running mean; and their means over the layers (``summary``).
  """
  import jax.numpy as jnp
  from flax import nnx

  from ufo_jax import inference

  loaded = inference.load_model(run_dir)
  model = loaded[0] if isinstance(loaded, tuple) else loaded.model

  def layers() -> list[tuple[str, nnx.BatchNorm]]:
    return [('.'.join(map(str, path)), m) for path, m in nnx.iter_modules(model.backbone)
            if isinstance(m, nnx.BatchNorm)]

  running = {name: (np.array(m.mean[...]), np.array(m.var[...])) for name, m in layers()}

  def batch_stats(x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    before = {name: (np.array(m.mean[...]), np.array(m.var[...])) for name, m in layers()}
    model.train()
    mean, std = normalization
    model.backbone((jnp.asarray(x, jnp.float32) - mean) / std)
    model.eval()
    out = {}  # a train-mode pass moved the running averages by (1 - momentum) * batch: invert
    for name, m in layers():
      mom = float(m.momentum)
      new_mean, new_var = np.array(m.mean[...]), np.array(m.var[...])
      out[name] = ((new_mean - mom * before[name][0]) / (1 - mom),
                   (new_var - mom * before[name][1]) / (1 - mom))
      m.mean[...], m.var[...] = jnp.asarray(before[name][0]), jnp.asarray(before[name][1])
    return out

  per_task = {task: batch_stats(x) for task, x in images.items()}
  mixed = batch_stats(np.concatenate(list(images.values())))
  result: dict = {'layers': {}, 'summary': {}}
  for name in running:
    mix_mean, mix_var = mixed[name]
    mix_std = np.sqrt(np.maximum(mix_var, 0) + 1e-5)
    entry = {'shift': {}, 'log_var': {},
             'running_shift': float(np.mean(np.abs(running[name][0] - mix_mean) / mix_std))}
    for task, stats in per_task.items():
      entry['shift'][task] = float(np.mean(np.abs(stats[name][0] - mix_mean) / mix_std))
      entry['log_var'][task] = float(np.mean(np.abs(np.log(
          (np.maximum(stats[name][1], 0) + 1e-5) / (np.maximum(mix_var, 0) + 1e-5)))))
    result['layers'][name] = entry
  entries = list(result['layers'].values())
  result['summary'] = {
      'shift': {t: float(np.mean([e['shift'][t] for e in entries])) for t in images},
      'log_var': {t: float(np.mean([e['log_var'][t] for e in entries])) for t in images},
      'running_shift': float(np.mean([e['running_shift'] for e in entries])),
      'layers': len(entries)}
  return result


def run_ablation(workdir: str, ablation: str = 'batch', size_name: str = 'demo', *,
                 steps: int = 0, seed: int = 0, seeds: int = 1,
                 difficulty: str = 'easy') -> dict:
  """Both arms of ``ablation`` on generated person + product data, for ``seeds`` seeds.

  The data is generated once (seed ``seed``); the runs train with seeds ``seed .. seed +
  seeds - 1``. Writes ``workdir/ablation/<ablation>.json``: ``{arm: [{"seed": s, "market1501":
  [rank-1, mAP], "sop": [Recall@1]}, ...]}`` in percent, and prints the mean ± std of each arm
  beside the seed's rows. Returns that dict.
  """
  from ufo_jax import config as config_lib
  from ufo_jax import train

  size = resolve_size(size_name, difficulty)
  steps = steps or (ABLATION_STEPS[size_name] if ablation == 'batch' else size.steps)
  workdir = os.path.abspath(workdir)
  root = os.path.join(workdir, 'ablation', ablation)
  raw = os.path.join(workdir, 'ablation', f'raw_{difficulty}')
  data = os.path.join(workdir, 'ablation', f'data_{difficulty}')
  t0 = time.time()
  names = ','.join(ABLATION_SETS)
  if not os.path.exists(os.path.join(raw, '.complete')):
    _say(f'Generating SYNTHETIC {difficulty} Market1501 and SOP data (not the real datasets): '
         f'{raw}')
    _run(['-m', 'data_prep.generate', f'--raw_root={raw}', f'--datasets={names}',
          f'--seed={seed}', f'--num_ids={size.num_ids}', f'--num_test_ids={size.num_test_ids}',
          f'--images_per_id={size.images_per_id}', f'--image_size={size.raw_image_size}',
          f'--difficulty={difficulty}'])
    open(os.path.join(raw, '.complete'), 'w').close()
  _run(['-m', 'data_prep.build', f'--dataset={names}', f'--raw_root={raw}', f'--out_dir={data}',
        '--skip_count_check'])
  _enable_compilation_cache(os.path.join(workdir, 'ablation', 'xla_cache'))
  arms = ABLATIONS[ablation]
  rows: dict[str, list[dict]] = {arm: [] for arm in arms}
  out = os.path.join(workdir, 'ablation', f'{ablation}.json')
  chance = {}
  bn_stats: dict[str, list[dict]] = {}
  total = len(arms) * seeds
  for k in range(seeds):
    run_seed = seed + k
    for i, arm in enumerate(arms):
      if ablation == 'batch':
        config = ablation_config(data, size, batch_mode=arm, steps=steps, seed=run_seed)
        what = (f'ResNet-{ABLATION_RESNET} at {size.image_size}px, {arm} batches of '
                f'{config_lib.global_batch_size(config)} (person + product)')
      else:
        config = drop_path_config(data, size, rate=float(arm), steps=steps, seed=run_seed)
        what = (f'ViT-{config.model.variant} at {size.image_size}px, drop path {arm}, '
                f'{config_lib.global_batch_size(config)} images a step (person + product)')
      run_dir = os.path.join(root, f'{arm}_seed{run_seed}')
      if not _finished(run_dir, steps):  # a run trains from scratch unless it has finished
        shutil.rmtree(run_dir, ignore_errors=True)  # (then it is only evaluated again)
      _say(f'[{k * len(arms) + i + 1}/{total}] seed {run_seed}: {what}, {steps} steps '
           f'in {run_dir}')
      train.train_and_evaluate(config, run_dir)
      with open(_latest_report(run_dir)['json'], encoding='utf-8') as f:
        report = json.load(f)
      row = {'seed': run_seed}
      row.update({name: report['ours'].get(name) for name in ABLATION_SETS})
      rows[arm].append(row)
      with open(out, 'w', encoding='utf-8') as f:  # after every run: partial results survive
        json.dump(rows, f, indent=1)
      chance = {name: report.get('chance', {}).get(name) for name in ABLATION_SETS}
      _say(_ablation_row(f'{arm}, seed {run_seed}', row))
      if ablation == 'batch':  # which BatchNorm statistics differ between the tasks, measured
        images = {'person': _test_images(raw, 'market1501', size.image_size, 64),
                  'product': _test_images(raw, 'sop', size.image_size, 64)}
        aug = config.input.augment
        stats = batchnorm_statistics(run_dir, images, (float(aug.mean), float(aug.std)))
        bn_stats.setdefault(arm, []).append({'seed': run_seed, **stats})
        summary = stats['summary']
        _say('      BatchNorm statistics of the backbone (mean over its '
             f'{summary["layers"]} layers, test images): |task mean - mixed mean| / mixed std '
             + ', '.join(f'{t} {v:.3f}' for t, v in summary['shift'].items())
             + '; |log(task var / mixed var)| '
             + ', '.join(f'{t} {v:.3f}' for t, v in summary['log_var'].items())
             + f'; running mean vs mixed {summary["running_shift"]:.3f}')
  if bn_stats:
    with open(os.path.join(workdir, 'ablation', 'batch_bn_stats.json'), 'w',
              encoding='utf-8') as f:
      json.dump(bn_stats, f, indent=1)
  lines = ['| run | Market1501 rank-1 / mAP | SOP Recall@1 |', '|---|---|---|']
  if ablation == 'batch':
    spec = importlib.util.spec_from_file_location(
        'ufo_jax_configs_ablation', os.path.join(ROOT, 'configs', 'ablation_batch_r50.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arm in arms:
      lines.append(_ablation_row(f'{arm} (seed: ResNet-50, real data)',
                                 module.SEED_RESULTS[arm]))
    model = f'ResNet-{ABLATION_RESNET}'
  else:
    model = f'ViT-{config.model.variant}'
  for arm in arms:
    label = arm if ablation == 'batch' else f'drop path {arm}'
    lines.append(_mean_std_row(f'{label} (ours: {model}, {difficulty} generated data, {steps} '
                               f'steps, mean ± std of {seeds} seeds)', rows[arm]))
  lines.append(_ablation_row('chance level', chance))
  print('\n'.join(lines), flush=True)
  if ablation == 'drop_path':
    _say(f'({SEED_DROP_PATH}; no published numbers for this pair.)')
  _say('Our rows come from GENERATED data and a small model trained briefly, not the published '
       'accuracy; docs/TRAINING.md ("What a laptop can and cannot show") discusses them.')
  _say(f'Results:     {out}')
  _say(f'Runs:        {root}/<arm>_seed<s> (reports, checkpoints)')
  _say(f'Total time:  {time.time() - t0:.0f}s')
  return rows


def export_and_search(workdir: str, run_dir: str, config, raw_dir: str | None = None) -> dict:
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
  market = os.path.join(raw_dir or os.path.join(workdir, 'raw'),
                        catalog.get('market1501').raw_folder)
  npz = {}
  for split, folder in (('gallery', 'bounding_box_test'), ('query', 'query')):
    npz[split] = os.path.join(workdir, 'search', f'market1501_{split}.npz')
    embed_lib.run(export_dir, os.path.join(market, folder), npz[split], tasks=['person'],
                  print_fn=_say)
  search_lib.search(npz['gallery'], npz['query'], 'person', topk=10,
                    out_dir=os.path.join(workdir, 'search'), print_fn=_say)
  return {'export': export_dir, 'files': list(info['files'].values()),
          'rank_list': os.path.join(workdir, 'search', search_lib.RANK_LIST_FILE)}


def _finished(run_dir: str, steps: int) -> bool:
  """Whether ``run_dir`` holds the checkpoint of its last step (training it resumes there)."""
  return os.path.isdir(os.path.join(run_dir, 'checkpoints', str(steps)))


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
  if FLAGS.seeds < 1:
    raise app.UsageError(f'--seeds must be >= 1, got {FLAGS.seeds}')
  if FLAGS.ablation:
    run_ablation(FLAGS.workdir, FLAGS.ablation, FLAGS.size, steps=FLAGS.steps, seed=FLAGS.seed,
                 seeds=FLAGS.seeds, difficulty=FLAGS.difficulty)
    return
  if FLAGS.seeds != 1:
    raise app.UsageError('--seeds is for --ablation=batch|drop_path only')
  run(FLAGS.workdir, FLAGS.size, steps=FLAGS.steps, seed=FLAGS.seed, difficulty=FLAGS.difficulty)


if __name__ == '__main__':
  app.run(main)
