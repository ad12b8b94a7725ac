"""The evaluation run: model + converted test sets -> metrics, report, figures (docs/EVALUATION.md).

    results = evaluate(config, workdir, model, step, writer)   # the training hook
    results = evaluate_checkpoint(config, workdir)             # --mode=eval
    results = evaluate_checkpoint(config, workdir, exported=DIR)  # --mode=eval --exported=DIR

For every benchmark of ``config.eval.sets`` (``catalog.BENCHMARKS`` names), in order, through
its protocol (``protocols.of(name)``, which knows the splits, metrics, chance level, scalars,
report cell and curves; this module knows no protocol by name):

1. extract the task's embedding (``catalog.get(name).task``: face sets -> the face head, re-id
   sets -> person / vehicle, SOP -> product) of the protocol's split(s) with
   ``extract.extract_embeddings``;
2. compute the protocol's metrics, the chance level of its headline metrics from the data
   (the expected value under a uniformly random ranking, ``protocols.chance_*``) and, unless
   ``config.eval.thresholds`` is False, its operating points (``metrics['operating_points']``:
   the cosine thresholds at FAR 1e-2, 1e-3, 1e-4 and the TAR there, ``thresholds``).

``should_stop`` (the training loop's stop request) is asked before each benchmark: when it says
True, ``evaluate`` returns the results so far and writes no report for the incomplete list.

Then, on process 0: ``report.md`` / ``report.json`` (our row beside the published rows and the
chance row; ``workdir/eval/step_N/`` for a training step, else ``workdir``), PNG figures in the
same folder (``workdir/eval/`` without a step): one PNG per curve kind of the protocols
(``cmc.png``: re-id sets and VehicleID, ``roc.png``: face sets) and each protocol's own
figures (``rank_list_<set>_q<i>.png``: a query and its top-10 gallery images framed green /
red, for ``config.eval.rank_list_queries`` queries, default 3, of each re-id set); and on
every process TensorBoard scalars ``eval/<set>/<metric>`` through the clu writer.

A benchmark whose converted folder is missing is an error raised BEFORE any extraction
(``FileNotFoundError`` naming every missing folder and the ``data_prep.build`` command), unless
``config.eval.skip_missing`` is True: then those sets are skipped with a warning and show as
"not evaluated" in the report. A benchmark whose task the model has no head for is skipped with
a warning. A run with no test data at all (synthetic input and no ``input.data_dir``) logs that
evaluation is skipped and returns ``{}``, so a synthetic training run still finishes.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from absl import logging
from jax.sharding import Mesh

from ufo_jax import catalog, inference, sharding
from ufo_jax import config as config_lib
from ufo_jax import data as data_lib
from ufo_jax.evaluation import figures, protocols, report
from ufo_jax.evaluation.extract import (
    Embeddings,
    extract_embeddings,
    model_tasks,
    split_model,
    state_mesh,
)

# One figure per curve kind of the protocols (``Protocol.curve_kind``): file, plot, title.
CURVE_FIGURES = {
    'cmc': ('cmc.png', figures.plot_cmc, 'CMC'),
    'roc': ('roc.png', figures.plot_roc, 'Face verification ROC'),
}


# --------------------------------------------------------------------------------------------
# Sets and splits.
# --------------------------------------------------------------------------------------------
def set_names(sets: str | Sequence[str]) -> list[str]:
  """Benchmark names from ``config.eval.sets``: a sequence, also 'a,b' strings (command line).

  Unknown names raise ``ConfigError`` (``main`` prints it as one line).
  """
  names = list(config_lib.parse_sets(sets))
  unknown = [n for n in names if n not in catalog.benchmarks()]
  if unknown:
    raise config_lib.ConfigError(
        f'config.eval.sets: unknown benchmark(s) {unknown}; expected names from '
        f'{", ".join(catalog.benchmarks())} (on the command line: --config.eval.sets=lfw,sop; '
        'a custom set is known once converted into input.data_dir)')
  return names


def missing_sets(data_dir: str, sets: Sequence[str]) -> dict[str, str]:
  """{set: why} for every set whose converted folder (or split) cannot be opened."""
  missing = {}
  for name in sets:
    for split in protocols.splits(name):
      try:
        data_lib.open_split(data_dir, name, split)
      except (FileNotFoundError, ValueError) as e:
        missing[name] = str(e)
        break
  return missing


def check_sets(data_dir: str, sets: Sequence[str], *, skip_missing: bool = False,
               allow_partial: bool = False) -> list[str]:
  """The sets to evaluate: all of ``sets``, or a clear error naming the missing ones.

  With ``skip_missing`` the missing sets are dropped with a warning instead. A withdrawn set
  (DukeMTMC-reID) that is not converted is always dropped with a warning. The sets kept have
  their provenance logged; partial ones raise ``PartialDataError`` unless ``allow_partial``.
  """
  sets = set_names(sets)
  missing = missing_sets(data_dir, sets)
  for n in [n for n in missing if catalog.get(n).withdrawn]:
    logging.warning('evaluation: skipping %s, not converted under %s (%s)', n, data_dir,
                    catalog.get(n).withdrawn)
    sets = [s for s in sets if s != n]
    del missing[n]
  if missing and not skip_missing:
    lines = '\n'.join(f'  {n}: {why}' for n, why in missing.items())
    raise FileNotFoundError(
        f'{len(missing)} of the {len(sets)} evaluation sets are not converted under {data_dir}:'
        f'\n{lines}\nConvert them with `python -m data_prep.build --dataset=NAME '
        f'--raw_dir=RAW_ROOT --out_dir={data_dir}`, or leave them out of --config.eval.sets, '
        'or pass --config.eval.skip_missing=True to evaluate the others.')
  for n, why in missing.items():
    logging.warning('evaluation: skipping %s (config.eval.skip_missing): %s', n, why)
  sets = [n for n in sets if n not in missing]
  data_lib.check_sets(data_dir, sets, allow_partial=allow_partial, purpose='evaluation')
  return sets


def eval_batch_size(batch_size: int, num_devices: int) -> int:
  """The global eval batch: ``batch_size`` rounded up to a multiple of the device count."""
  if batch_size < 1:
    raise ValueError(f'config.eval.batch_size must be positive, got {batch_size}')
  return -(-int(batch_size) // num_devices) * num_devices


def extract_split(graphdef, states, data_dir: str, name: str, split: str, task: str, *,
                  config: Any, mesh: Mesh) -> Embeddings:
  """The ``task`` embeddings of one converted split, in dataset order, on every process."""
  ds = data_lib.create_eval_dataset(
      data_dir, name, split, image_size=int(config.input.image_size),
      batch_size=eval_batch_size(int(config.eval.batch_size), mesh.size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=int(config.eval.get('worker_count', 0)))
  return extract_embeddings(graphdef, states, ds, task, mesh=mesh,
                            augment_config=config.input.augment, name=f'{name}/{split}',
                            num_rows=ds.num_examples,
                            dtype=config.eval.get('dtype', 'float32'))


# --------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------
def write_curves(out_dir: str, results: Mapping[str, Any]) -> list[str]:
  """One PNG per curve kind in ``out_dir`` (``CURVE_FIGURES``), of the results that have it."""
  paths = []
  for kind, (file_name, plot, title) in CURVE_FIGURES.items():
    curves = protocols.by_kind(results, kind)
    if curves:
      paths.append(plot({report.HEADERS[n]: c for n, c in curves.items()},
                        os.path.join(out_dir, file_name), title=title))
  return paths


def _append_figures(md_path: str, paths: Sequence[str]) -> None:
  base = os.path.dirname(md_path)
  lines = ['', '## Figures', '']
  lines += [f'![{os.path.basename(p)}]({os.path.relpath(p, base)})' for p in paths]
  with open(md_path, 'a', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------
def _restore(config: Any, path: str, mesh: Mesh | None = None) -> inference.Loaded:
  """``ufo_jax.inference.load_model``: the model in eval mode (float32), its step, ...;
  backbone and necks only."""
  return inference.load_model(path, config, mesh=mesh)


def _exported_model(config: Any, directory: str) -> tuple[Any, inference.Loaded]:
  """``(config, loaded)`` of an export folder; the config takes the model's input format."""
  loaded = inference.load_exported(directory)
  config = copy.deepcopy(config)
  mean, std = loaded.normalization
  with config.unlocked():
    for field, value in (('input.image_size', loaded.image_size),
                         ('input.augment.mean', mean), ('input.augment.std', std)):
      old = config_lib.set_field(config, field, value)
      if old != value:
        logging.warning('evaluation: config.%s=%s replaced by the exported model\'s %s', field,
                        old, value)
  return config, loaded


def _data_dir(config: Any, data_dir: str | None) -> str | None:
  data_dir = data_dir if data_dir is not None else config.input.get('data_dir', '')
  return os.fspath(data_dir) if data_dir else None


def evaluate(config: Any, workdir: str | None = None, model: Any = None, step: int | None = None,
             writer: Any = None, *, data_dir: str | None = None, mesh: Mesh | None = None,
             sets: Sequence[str] | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, dict]:
  """Evaluates ``model`` on the benchmarks of ``config.eval.sets`` (or ``sets``).

  Args:
    config: the experiment config (``eval.*``, ``input.image_size``, ``input.augment``).
    workdir: where the report and figures go (None: no files, metrics and scalars only).
    model: the multi-task model: an ``nnx.Module`` or ``(graphdef, state...)``; None restores
      the latest checkpoint of ``workdir``.
    step: the training step (tags the report folder and the TensorBoard scalars).
    writer: a clu ``MetricWriter`` for ``eval/<set>/<metric>`` scalars, or None.
    data_dir: the data_prep output folder (default ``config.input.data_dir``).
    mesh: the device mesh (default: the mesh of the model's arrays, else ``config.mesh``).
    sets: benchmark names (default ``config.eval.sets``).
    should_stop: asked before each benchmark; when it returns True the evaluation stops there
      and returns the results so far, without writing a report for the incomplete list (the
      scalars of the benchmarks done are written). In a multi-process run it must answer the
      same on every process (the training loop's stop agreement).

  Returns:
    ``{set: metrics}`` as the protocols return them (fractions in [0, 1]).
  """
  sets = set_names(config.eval.sets if sets is None else sets)
  data_dir = _data_dir(config, data_dir)
  if not sets:
    logging.info('evaluation: config.eval.sets is empty, nothing to evaluate')
    return {}
  if data_dir is None:
    if config.input.get('source', 'tfds') == 'synthetic':
      logging.warning('evaluation skipped: input.source=synthetic and no input.data_dir, so '
                      'there are no converted test sets (set --config.input.data_dir)')
      return {}
    raise ValueError('evaluation needs the converted test sets: set --config.input.data_dir to '
                     'the data_prep output folder')
  sets = check_sets(data_dir, sets, skip_missing=bool(config.eval.get('skip_missing', False)),
                    allow_partial=bool(config.input.get('allow_partial_data', False)))
  if model is None:
    if workdir is None:
      raise ValueError('evaluate: pass a model, or a workdir holding checkpoints')
    loaded = _restore(config, workdir, mesh)
    model = loaded.model
    step = loaded.step if step is None else step
  graphdef, states = split_model(model)
  mesh = mesh or state_mesh(states) or sharding.create_mesh(config.mesh)
  tasks = model_tasks(graphdef, states)

  writes = workdir is not None and jax.process_index() == 0
  draw = writes and bool(config.eval.get('figures', True))
  fig_dir = (report.report_dir(workdir, step) if step is not None
             else os.path.join(workdir, 'eval')) if writes else ''
  results: dict[str, dict] = {}
  chance: dict[str, dict] = {}
  figure_paths: list[str] = []
  context = protocols.context(config, data_dir)
  for done, name in enumerate(sets):
    if should_stop is not None and should_stop():
      logging.warning('evaluation stopped (stop requested) after %d of %d benchmarks; no report '
                      'is written for the incomplete list', done, len(sets))
      if writer is not None:
        writer.flush()
      return results
    info = catalog.get(name)
    if info.task not in tasks:
      logging.warning('evaluation: skipping %s, the model has no %r head (heads: %s)', name,
                      info.task, tasks)
      continue
    protocol = protocols.of(name)
    t0 = time.time()
    embs = {s: extract_split(graphdef, states, data_dir, name, s, info.task, config=config,
                             mesh=mesh) for s in protocol.splits(info)}
    t1 = time.time()
    results[name] = protocol.evaluate(name, embs, context)
    chance[name] = protocol.chance(name, embs, context)
    if context.thresholds:
      results[name]['operating_points'] = protocol.operating_points(name, embs, context)
    logging.info('eval %s: %s (chance %s); extraction %.1fs, protocol %.1fs', name,
                 report.format_cell(protocol.headline(results[name])),
                 report.format_cell(protocol.headline(chance[name])), t1 - t0, time.time() - t1)
    if draw:
      figure_paths += protocol.figures(fig_dir, name, embs, context)
    del embs  # the features of one set at a time
    if writer is not None:
      scalars = protocol.scalars(results[name])
      writer.write_scalars(int(step or 0), {f'eval/{name}/{k}': v for k, v in scalars.items()})

  if results:
    logging.info('evaluation%s:\n%s', f' at step {step}' if step is not None else '',
                 report.format_table(results, name=config.get('name', 'ufo-jax'), chance=chance,
                                     published=False))
  if writes:
    name = f'ufo-jax {config.get("name", "")}'.strip()
    report.write_report(results, workdir, step=step, name=name, chance=chance or None,
                        compare_to=config.eval.get('compare_to') or None)
    md_path = os.path.join(report.report_dir(workdir, step), 'report.md')
    if draw and results:
      figure_paths = write_curves(fig_dir, results) + figure_paths
      _append_figures(md_path, figure_paths)
      logging.info('evaluation figures: %d PNGs in %s', len(figure_paths), fig_dir)
    logging.info('evaluation report: %s', md_path)
  if writer is not None:
    writer.flush()
  return results


def evaluate_checkpoint(config: Any, workdir: str, *, checkpoint: str | None = None,
                        data_dir: str | None = None, sets: Sequence[str] | None = None,
                        writer: Any = None, exported: str | None = None) -> dict[str, dict]:
  """Restores the latest checkpoint of ``workdir`` (or ``checkpoint``) and evaluates it.

  The report, figures and TensorBoard scalars go to ``workdir`` at the checkpoint's step.

  Args:
    config: the experiment config the checkpoint was trained with; None: the config saved with
      the run (``config.json`` of the workdir, or of the export folder).
    workdir: output folder (and, without ``checkpoint``, where the checkpoints are).
    checkpoint: a workdir, its ``checkpoints/`` folder or one step folder.
    exported: evaluate this export folder (``python -m ufo_jax.export``) instead of a
      checkpoint; its image size and normalisation replace the config's.
    data_dir, sets: as for ``evaluate``.
    writer: a clu ``MetricWriter``; default: clu's default writer in ``workdir``
      (TensorBoard events on process 0, logging only on the others), closed at the end.
  """
  if config is None:
    config = config_lib.load_run_config(exported or checkpoint or workdir)
  sets = set_names(config.eval.sets if sets is None else sets)
  resolved = _data_dir(config, data_dir)
  if resolved is not None:  # fail on missing data before restoring a large checkpoint
    sets = check_sets(resolved, sets, skip_missing=bool(config.eval.get('skip_missing', False)),
                      allow_partial=bool(config.input.get('allow_partial_data', False)))
  if exported is not None:
    config, loaded = _exported_model(config, exported)
  else:
    loaded = _restore(config, checkpoint or workdir)
  own_writer = writer is None
  if own_writer:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
  try:
    return evaluate(config, workdir, loaded.model, loaded.step, writer, data_dir=data_dir,
                    sets=sets)
  finally:
    if own_writer:
      writer.close()
