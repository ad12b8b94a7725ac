"""The evaluation run: model + converted test sets -> metrics, report, figures (SPEC §6, §7).

    results = evaluate(config, workdir, model, step, writer)   # the training hook
    results = evaluate_checkpoint(config, workdir)             # --mode=eval
    results = evaluate_checkpoint(config, workdir, exported=DIR)  # --mode=eval --exported=DIR

For every benchmark of ``config.eval.sets`` (``catalog.BENCHMARKS`` names), in order:

1. extract the task's embedding (``catalog.get(name).task``: face sets -> the face head, re-id
   sets -> person / vehicle, SOP -> product) of its split(s) with ``extract.extract_embeddings``
   (re-id: ``query`` and ``gallery``; face, VehicleID, SOP: ``test``);
2. compute its protocol: face verification on rows ``[0::2]`` / ``[1::2]`` with the set's
   ``is_same``; re-id query vs gallery with pids and cameras; VehicleID with
   ``config.eval.vehicleid_repeats`` seeded gallery draws; SOP Recall@K with ``id`` as the class;
3. compute the chance level of its headline metrics from the data (the expected value under a
   uniformly random ranking, see ``chance_*``).

Then, on process 0: ``report.md`` / ``report.json`` (our row beside the published rows and the
chance row; ``workdir/eval/step_N/`` for a training step, else ``workdir``), PNG figures in the
same folder (``workdir/eval/`` without a step): ``cmc.png`` (re-id sets and VehicleID),
``roc.png`` (face sets), ``rank_list_<set>_q<i>.png`` (a query and its top-10 gallery images
framed green / red, for ``config.eval.rank_list_queries`` queries, default 3, of each re-id
set); and on every process TensorBoard scalars ``eval/<set>/<metric>`` through the clu writer.

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
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ufo_jax import catalog, inference, sharding
from ufo_jax import config as config_lib
from ufo_jax import data as data_lib
from ufo_jax.data import augment
from ufo_jax.evaluation import face, figures, reid, report, retrieval, vehicleid
from ufo_jax.evaluation.extract import (
    Embeddings,
    extract_embeddings,
    model_tasks,
    split_model,
    state_mesh,
)

MAX_RANK = 50
RECALL_KS = (1, 10, 100, 1000)
NUM_FOLDS = 10
RANK_LIST_QUERIES = 3
RANK_LIST_TOPK = 10
THUMBNAIL = 160  # longest side of the images drawn in rank lists, in pixels


# --------------------------------------------------------------------------------------------
# Sets and splits.
# --------------------------------------------------------------------------------------------
def set_names(sets: str | Sequence[str]) -> list[str]:
  """Benchmark names from ``config.eval.sets``: a sequence, also 'a,b' strings (command line).

  Unknown names raise ``ConfigError`` (``main`` prints it as one line).
  """
  names = list(config_lib.parse_sets(sets))
  unknown = [n for n in names if n not in catalog.BENCHMARKS]
  if unknown:
    raise config_lib.ConfigError(
        f'config.eval.sets: unknown benchmark(s) {unknown}; expected names from '
        f'{", ".join(catalog.BENCHMARKS)} (on the command line: --config.eval.sets=lfw,sop)')
  return names


def benchmark_splits(name: str) -> tuple[str, ...]:
  """The converted splits a benchmark reads: ('query', 'gallery') for re-id, else its eval split."""
  info = catalog.get(name)
  if info.protocol is None or info.eval_split is None:
    raise config_lib.ConfigError(
        f'{name!r} is not a benchmark; benchmarks: {", ".join(catalog.BENCHMARKS)}')
  if info.protocol == catalog.PROTOCOL_REID:
    return ('query', 'gallery')
  return (info.eval_split,)


def missing_sets(data_dir: str, sets: Sequence[str]) -> dict[str, str]:
  """{set: why} for every set whose converted folder (or split) cannot be opened."""
  missing = {}
  for name in sets:
    for split in benchmark_splits(name):
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
# Protocols on embeddings.
# --------------------------------------------------------------------------------------------
def _check_ids(emb: Embeddings, what: str, cameras: bool = False) -> None:
  if len(emb) == 0:
    raise ValueError(f'{what}: no valid image (all rows failed to decode?)')
  if np.all(emb.ids < 0):
    raise ValueError(f'{what}: the converted split has no identities (id is -1 everywhere)')
  if cameras and np.all(emb.cameras < 0):
    raise ValueError(f'{what}: the converted split has no camera ids (camera is -1 everywhere)')


def face_pairs(emb: Embeddings, is_same: np.ndarray, what: str = 'face set'
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(embeddings1, embeddings2, is_same)`` of the pairs whose two images are both present.

  Row ``2i`` and ``2i + 1`` are the sides of pair ``i``; a pair with an undecodable side is left
  out (with a warning).
  """
  is_same = np.asarray(is_same, bool)
  num_rows = 2 * len(is_same)
  if emb.num_rows is not None and emb.num_rows != num_rows:
    raise ValueError(f'{what}: {emb.num_rows} rows but {len(is_same)} pairs (expected '
                     f'{num_rows} rows)')
  if len(emb) and (emb.index.min() < 0 or emb.index.max() >= num_rows):
    raise ValueError(f'{what}: row index outside [0, {num_rows})')
  position = np.full(num_rows, -1, np.int64)
  position[emb.index] = np.arange(len(emb))
  a, b = position[0::2], position[1::2]
  ok = (a >= 0) & (b >= 0)
  if not ok.all():
    logging.warning('%s: %d of %d pairs have an undecodable image and are left out', what,
                    int((~ok).sum()), len(ok))
  return emb.features[a[ok]], emb.features[b[ok]], is_same[ok]


def evaluate_face(emb: Embeddings, is_same: np.ndarray, what: str = 'face set') -> dict:
  """Verification accuracy (10 contiguous folds) of a face set's pairs."""
  e1, e2, same = face_pairs(emb, is_same, what)
  return face.verification_accuracy(e1, e2, same, nfolds=NUM_FOLDS)


def evaluate_reid(query: Embeddings, gallery: Embeddings, what: str = 're-id set') -> dict:
  """CMC / mAP / mINP of query vs gallery (same pid and camera removed), with ``rank1``."""
  _check_ids(query, f'{what} query', cameras=True)
  _check_ids(gallery, f'{what} gallery', cameras=True)
  out = reid.evaluate_rank_from_features(query.features, gallery.features, query.ids,
                                         gallery.ids, query.cameras, gallery.cameras,
                                         max_rank=MAX_RANK)
  out['rank1'] = float(out['cmc'][0])
  return out


def evaluate_vehicleid_set(emb: Embeddings, *, repeats: int, seed: int = 0) -> dict:
  """VehicleID: ``repeats`` seeded one-image-per-identity galleries, mean and spread."""
  _check_ids(emb, 'vehicleid test')
  return vehicleid.evaluate_vehicleid(emb.features, emb.ids, repeats=repeats, seed=seed,
                                      max_rank=MAX_RANK)


def evaluate_retrieval(emb: Embeddings) -> dict:
  """SOP: Recall@1/10/100/1000 of every item querying all the others, ``id`` as the class."""
  _check_ids(emb, 'sop test')
  return retrieval.recall_at_k(emb.features, emb.ids, ks=RECALL_KS)


# --------------------------------------------------------------------------------------------
# Chance levels: expected metrics of a uniformly random ranking, from the data.
# --------------------------------------------------------------------------------------------
def _harmonic(n: np.ndarray) -> np.ndarray:
  """Harmonic numbers H_n (H_0 = 0) of an integer array."""
  n = np.asarray(n, np.int64)
  table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(n.max()), 0) + 1))])
  return table[n]


def expected_ap(positives: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Expected AP of a uniformly random ranking of ``valid`` items holding ``positives``.

  ``E[AP] = (H_V + (P - 1) / (V - 1) * (V - H_V)) / V`` (P positives among V items; 1 when
  V = 1): the mean over ranks k of P(rel_k) * E[precision@k | rel_k] / P.
  """
  p = np.asarray(positives, np.float64)
  v = np.asarray(valid, np.int64)
  h = _harmonic(v)
  vf = v.astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    spread = np.where(v > 1, (p - 1) / np.maximum(vf - 1, 1) * (vf - h), 0.0)
  return (h + spread) / vf


def _counts(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """How often each of ``keys`` occurs in ``table``."""
  values, counts = np.unique(table, return_counts=True)
  pos = np.clip(np.searchsorted(values, keys), 0, len(values) - 1)
  return np.where(values[pos] == keys, counts[pos], 0)


def chance_reid(q_pids, g_pids, q_camids, g_camids) -> dict:
  """Rank-1 and mAP of a random ranking: mean over valid queries of P/V and of E[AP].

  P = gallery items with the query's pid on another camera, V = gallery items left after
  removing those with its pid and camera.
  """
  q_pids, g_pids = np.asarray(q_pids, np.int64), np.asarray(g_pids, np.int64)
  q_cams, g_cams = np.asarray(q_camids, np.int64), np.asarray(g_camids, np.int64)
  low = min(q_cams.min(), g_cams.min())
  span = max(q_cams.max(), g_cams.max()) - low + 1
  same_pid = _counts(g_pids, q_pids)
  junk = _counts(g_pids * span + (g_cams - low), q_pids * span + (q_cams - low))
  positives, valid = same_pid - junk, len(g_pids) - junk
  ok = positives > 0
  if not ok.any():
    raise ValueError('chance level: no query has a positive in the gallery')
  return {'rank1': float(np.mean(positives[ok] / valid[ok])),
          'mAP': float(np.mean(expected_ap(positives[ok], valid[ok]))),
          'num_valid_queries': int(ok.sum())}


def chance_vehicleid(pids) -> dict:
  """VehicleID: one positive among a gallery of one image per identity (G = #identities)."""
  g = len(np.unique(np.asarray(pids)))
  return {'rank1': 1.0 / g, 'mAP': float(expected_ap(np.array([1]), np.array([g]))[0])}


def chance_retrieval(labels) -> dict:
  """Recall@1 of a random ranking: mean over items of (same-class others) / (n - 1)."""
  labels = np.asarray(labels, np.int64)
  n = len(labels)
  if n < 2:
    raise ValueError('chance level: retrieval needs at least 2 items')
  others = _counts(labels, labels) - 1
  return {1: float(np.mean(others / (n - 1)))}


def chance_face(is_same) -> dict:
  """The accuracy of the best constant answer: 50% for the balanced insightface sets."""
  p = float(np.mean(np.asarray(is_same, bool)))
  return {'accuracy': max(p, 1.0 - p)}


# --------------------------------------------------------------------------------------------
# Scalars and figures.
# --------------------------------------------------------------------------------------------
def scalar_metrics(name: str, metrics: Mapping[Any, Any]) -> dict[str, float]:
  """The scalars of one benchmark's metrics (fractions), as named in TensorBoard."""
  protocol = catalog.get(name).protocol
  if protocol == catalog.PROTOCOL_VERIFICATION:
    keys = ('accuracy', 'accuracy_std', 'threshold')
    return {k: float(metrics[k]) for k in keys if k in metrics}
  if protocol == catalog.PROTOCOL_RETRIEVAL:
    return {f'recall@{k}': float(v) for k, v in metrics.items() if isinstance(k, int)}
  out = {}
  cmc = np.asarray(metrics.get('cmc', []))
  for r in (1, 5, 10):
    if len(cmc) >= r:
      out[f'rank{r}'] = float(cmc[r - 1])
  for k in ('mAP', 'mINP', 'rank1_std', 'rank5_std', 'mAP_std', 'mINP_std'):
    if k in metrics:
      out[k] = float(metrics[k])
  return out


def load_thumbnail(split, index: int, size: int = THUMBNAIL) -> np.ndarray:
  """Row ``index`` of a converted split as a uint8 RGB array, longest side at most ``size``."""
  img = augment.decode_image(split.read([int(index)])[0]['image'])
  img.thumbnail((size, size))
  return np.asarray(img)


def write_curves(out_dir: str, results: Mapping[str, Any]) -> list[str]:
  """``cmc.png`` (re-id sets and VehicleID) and ``roc.png`` (face sets) in ``out_dir``."""
  paths = []
  curves = {report.HEADERS[n]: m['cmc'] for n, m in results.items()
            if catalog.get(n).protocol in (catalog.PROTOCOL_REID, catalog.PROTOCOL_VEHICLEID)}
  if curves:
    paths.append(figures.plot_cmc(curves, os.path.join(out_dir, 'cmc.png'), title='CMC'))
  rocs = {report.HEADERS[n]: (m['fpr'], m['tpr']) for n, m in results.items()
          if catalog.get(n).protocol == catalog.PROTOCOL_VERIFICATION}
  if rocs:
    paths.append(figures.plot_roc(rocs, os.path.join(out_dir, 'roc.png'),
                                  title='Face verification ROC'))
  return paths


def write_set_rank_lists(out_dir: str, name: str, query: Embeddings, gallery: Embeddings,
                         data_dir: str, *, num_queries: int = RANK_LIST_QUERIES,
                         topk: int = RANK_LIST_TOPK) -> list[str]:
  """``rank_list_<name>_q<i>.png`` for ``num_queries`` queries of a re-id set."""
  if num_queries < 1:
    return []
  splits = {s: data_lib.open_split(data_dir, name, s) for s in ('query', 'gallery')}
  rows = {'query': query.index, 'gallery': gallery.index}

  def load(split: str, i: int) -> np.ndarray:
    return load_thumbnail(splits[split], int(rows[split][i]))

  return figures.write_rank_lists(
      reid.LazyDistances(query.features, gallery.features), query.ids, gallery.ids,
      query.cameras, gallery.cameras, load, out_dir, num_queries=num_queries, topk=topk,
      prefix=f'rank_list_{name}')


def _append_figures(md_path: str, paths: Sequence[str]) -> None:
  base = os.path.dirname(md_path)
  lines = ['', '## Figures', '']
  lines += [f'![{os.path.basename(p)}]({os.path.relpath(p, base)})' for p in paths]
  with open(md_path, 'a', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------
def _restore(config: Any, path: str, mesh: Mesh | None = None) -> tuple[Any, int]:
  """``ufo_jax.inference.load_model``: (model in eval mode, step); backbone and necks only."""
  return inference.load_model(path, config, mesh=mesh)


def _exported_model(config: Any, directory: str) -> tuple[Any, Any, int | None]:
  """``(config, model, step)`` of an export folder; the config takes the model's input format."""
  model = inference.load_exported(directory)
  info = inference.read_model_json(directory)
  config = copy.deepcopy(config)
  norm = info['normalization']
  with config.unlocked():
    for field, value in (('input.image_size', int(info['image_size'])),
                         ('input.augment.mean', float(norm['mean'])),
                         ('input.augment.std', float(norm['std']))):
      old = config_lib.set_field(config, field, value)
      if old != value:
        logging.warning('evaluation: config.%s=%s replaced by the exported model\'s %s', field,
                        old, value)
  return config, model, model.step


def _data_dir(config: Any, data_dir: str | None) -> str | None:
  data_dir = data_dir if data_dir is not None else config.input.get('data_dir', '')
  return os.fspath(data_dir) if data_dir else None


def evaluate(config: Any, workdir: str | None = None, model: Any = None, step: int | None = None,
             writer: Any = None, *, data_dir: str | None = None, mesh: Mesh | None = None,
             sets: Sequence[str] | None = None) -> dict[str, dict]:
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

  Returns:
    ``{set: metrics}`` as the protocol functions return them (fractions in [0, 1]).
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
    model, ckpt_step = _restore(config, workdir, mesh)
    step = ckpt_step if step is None else step
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
  for name in sets:
    info = catalog.get(name)
    if info.task not in tasks:
      logging.warning('evaluation: skipping %s, the model has no %r head (heads: %s)', name,
                      info.task, tasks)
      continue
    t0 = time.time()
    embs = {s: extract_split(graphdef, states, data_dir, name, s, info.task, config=config,
                             mesh=mesh) for s in benchmark_splits(name)}
    t1 = time.time()
    if info.protocol == catalog.PROTOCOL_VERIFICATION:
      is_same = data_lib.load_pairs_labels(data_dir, name, info.eval_split)
      results[name] = evaluate_face(embs['test'], is_same, name)
      chance[name] = chance_face(is_same)
    elif info.protocol == catalog.PROTOCOL_REID:
      q, g = embs['query'], embs['gallery']
      results[name] = evaluate_reid(q, g, name)
      chance[name] = chance_reid(q.ids, g.ids, q.cameras, g.cameras)
    elif info.protocol == catalog.PROTOCOL_VEHICLEID:
      results[name] = evaluate_vehicleid_set(
          embs['test'], repeats=int(config.eval.vehicleid_repeats),
          seed=int(config.eval.get('vehicleid_seed', 0)))
      chance[name] = chance_vehicleid(embs['test'].ids)
    else:
      results[name] = evaluate_retrieval(embs['test'])
      chance[name] = chance_retrieval(embs['test'].ids)
    ours = report.format_cell(report.headline(name, results[name]))
    logging.info('eval %s: %s (chance %s); extraction %.1fs, protocol %.1fs', name, ours,
                 report.format_cell(report.headline(name, chance[name])), t1 - t0,
                 time.time() - t1)
    if draw and info.protocol == catalog.PROTOCOL_REID:
      figure_paths += write_set_rank_lists(
          fig_dir, name, embs['query'], embs['gallery'], data_dir,
          num_queries=int(config.eval.get('rank_list_queries', RANK_LIST_QUERIES)))
    del embs  # the features of one set at a time
    if writer is not None:
      scalars = scalar_metrics(name, results[name])
      writer.write_scalars(int(step or 0), {f'eval/{name}/{k}': v for k, v in scalars.items()})

  if results:
    logging.info('evaluation%s:\n%s', f' at step {step}' if step is not None else '',
                 report.format_table(results, name=config.get('name', 'ufo-jax'), chance=chance,
                                     published=False))
  if writes:
    name = f'ufo-jax {config.get("name", "")}'.strip()
    report.write_report(results, workdir, step=step, name=name, chance=chance or None)
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
    config, model, step = _exported_model(config, exported)
  else:
    model, step = _restore(config, checkpoint or workdir)
  own_writer = writer is None
  if own_writer:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
  try:
    return evaluate(config, workdir, model, step, writer, data_dir=data_dir, sets=sets)
  finally:
    if own_writer:
      writer.close()
