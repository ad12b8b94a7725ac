"""Searches a gallery with query images: cosine top-k (see docs/EXPORT.md).

    python -m ufo_jax.search --gallery=G.npz --query=Q.npz --task=person [--topk=10] [--out=DIR]
    python -m ufo_jax.search --index=DIR --query=Q.npz [--topk=10] [--out=DIR]

``G.npz`` and ``Q.npz`` are outputs of ``python -m ufo_jax.embed`` (``paths``, one feature
array per task and the ``model_id`` of the model that made them). With ``--gallery`` the
similarity is the cosine of the ``--task`` features, computed exactly in chunks
(``ufo_jax.evaluation.topk.cosine_topk``: numpy BLAS on CPU, at FAISS ``IndexFlatIP`` speed,
the device on GPU / TPU; never a query x gallery matrix, so a 1M x 1024 gallery fits a 24 GiB
machine). With ``--index`` the gallery is a FAISS index of
``python -m ufo_jax.index`` (its task; exact for ``flat``, approximate for the other kinds).
Features of two models are not comparable: a query file whose ``model_id`` differs from the
gallery's (or the index's) is refused in one line naming both, unless
``--allow_mixed_models``; a file without a ``model_id`` is a warning. ``--out`` (default:
``search_results`` beside the query file) receives:

- ``results.json``: ``{task, topk, gallery, query, search, model_id, results: [{query,
  matches: [{path, score}]}]}`` with each query's gallery paths ranked by decreasing cosine
  similarity (ties: gallery order);
- ``rank_list.png``: the first ``--rank_list_queries`` queries, one row each: the query image
  and its top-k gallery images with their scores.

``--threshold=far1e-3`` (or ``far1e-2``, ``far1e-4``: the export's operating thresholds, from
``model.json`` of ``--model=EXPORT_DIR``, measured on the task's test sets; see
docs/EVALUATION.md) or ``--threshold=0.42`` (a cosine) marks each match ``above_threshold``
(score strictly above it) or not, and each query without a match above it ``in_gallery:
false`` ("not in gallery"), in results.json and on the rank list (green / red frames; "not in
gallery" under the query).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from ufo_jax import cli, inference
from ufo_jax import embed as embed_lib
from ufo_jax import index as index_lib
from ufo_jax.evaluation import figures as figures_lib
from ufo_jax.evaluation import thresholds as thresholds_lib
from ufo_jax.evaluation import topk as topk_lib

RANK_LIST_QUERIES = 4
RANK_LIST_FILE = 'rank_list.png'
RESULTS_FILE = 'results.json'
THUMBNAIL = 128
BLUE = (40, 90, 200)
GRAY = (128, 128, 128)


def check_items(paths: np.ndarray, path: str, what: str) -> int:
  """A one-line ``ValueError`` for an .npz without items; a warning on stderr for paths listed
  more than once (each copy is ranked on its own). Returns the number of repeated paths."""
  if len(paths) == 0:
    raise ValueError(f'--{what}={path} holds no items (0 embedded images); embed a folder with '
                     'images into it (python -m ufo_jax.embed)')
  unique, counts = np.unique(paths, return_counts=True)
  repeated = int(np.sum(counts - 1))
  if repeated:
    example = str(unique[np.argmax(counts)])
    print(f'search: warning: --{what}={path} lists {repeated} path(s) more than once (e.g. '
          f'{example} {int(counts.max())} times); each copy is ranked on its own',
          file=sys.stderr)
  return repeated


def _thumbnail(path: str, size: int = THUMBNAIL) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as img:
      img = img.convert('RGB')
      img.thumbnail((size, size))
      return np.asarray(img)
  except (OSError, ValueError):
    return np.full((size // 2, size // 2, 3), 200, np.uint8)  # a file no longer readable


def write_rank_list(path: str, query_paths: Sequence[str], gallery_paths: np.ndarray,
                    index: np.ndarray, scores: np.ndarray, num_queries: int,
                    threshold: float | None = None) -> str:
  """One row per query: the query (gray frame), its top-k with their scores.

  Without ``threshold`` the matches are framed blue; with one, green above it and red not
  above, and a query with no match above it is captioned "not in gallery".
  """
  rows = []
  for r in range(min(num_queries, len(query_paths))):
    above = [threshold is not None and float(v) > threshold for v in scores[r]]
    lost = threshold is not None and not any(above)
    row = [figures_lib.Panel(_thumbnail(query_paths[r]), GRAY,
                             'not in gallery' if lost else 'query', 'red' if lost else 'black')]
    for g, v, a in zip(index[r], scores[r], above):
      frame = BLUE if threshold is None else (figures_lib.GREEN if a else figures_lib.RED)
      row.append(figures_lib.Panel(_thumbnail(gallery_paths[g]), frame, f'{v:.3f}'))
    rows.append(row)
  return figures_lib.plot_rank_rows(rows, path, fontsize=8)


def apply_threshold(results: dict[str, Any], threshold: float, spec: str, source: str) -> int:
  """Marks every match ``above_threshold`` and every query ``in_gallery`` in ``results``
  (in place; a match is above when its score is strictly greater); returns how many queries
  are not in the gallery."""
  lost = 0
  for row in results['results']:
    for match in row['matches']:
      match['above_threshold'] = match['score'] > threshold
    row['in_gallery'] = any(m['above_threshold'] for m in row['matches'])
    lost += not row['in_gallery']
  results['threshold'] = {'value': threshold, 'spec': spec, 'source': source,
                          'rule': 'a match is accepted when its score is above the value',
                          'not_in_gallery': lost}
  return lost


def resolve_threshold(spec: str, task: str, model_dir: str | None) -> tuple[float, str]:
  """``(cosine, where from)`` of ``--threshold``: a number, or ``farX`` from the model.json of
  ``--model``."""
  if thresholds_lib.parse_far(spec) is not None and model_dir is None:
    raise ValueError(f'--threshold={spec} is an operating point of the model: pass '
                     '--model=EXPORT_DIR (whose model.json has its thresholds), or give a cosine '
                     '(--threshold=0.42)')
  info = inference.read_model_json(model_dir) if model_dir is not None else {}
  source = os.path.join(model_dir, inference.MODEL_JSON) if model_dir is not None else ''
  return thresholds_lib.resolve(spec, task, info.get('thresholds'), source)


def search(gallery: str | None, query: str, task: str | None, *, topk: int = 10,
           out_dir: str | None = None, rank_list_queries: int = RANK_LIST_QUERIES,
           index_dir: str | None = None, allow_mixed_models: bool = False,
           threshold: str | None = None, model_dir: str | None = None,
           print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
  """The command: ranks the gallery (``gallery`` .npz, or the index ``index_dir``) for every
  query; returns the results dict.

  ``threshold``: ``'far1e-3'`` (from ``model_dir``'s model.json) or a cosine, see the module
  docstring.
  """
  if (gallery is None) == (index_dir is None):
    raise ValueError('give --gallery=G.npz (exact search) or --index=DIR (an index of python -m '
                     'ufo_jax.index), one of them')
  if index_dir is not None:
    gallery_index = index_lib.open_index(index_dir)
    if task is not None and task != gallery_index.task:
      raise ValueError(f'--task={task}: the index {index_dir} holds {gallery_index.task} '
                       'features')
    task, gallery_name, gallery_id = gallery_index.task, index_dir, gallery_index.model_id
    g_paths, g_count = gallery_index.paths, gallery_index.count
    g_dim = int(gallery_index.meta['dim'])
  else:
    if task is None:
      raise ValueError('--task is required with --gallery')
    g = embed_lib.load_features(gallery, task, 'gallery')
    gallery_name, gallery_id = gallery, g.model_id
    g_paths, g_dim, g_count = g.paths, g.features.shape[1], len(g.paths)
  cut = resolve_threshold(threshold, task, model_dir) if threshold is not None else None
  q = embed_lib.load_features(query, task, 'query')
  q_paths, q_feats = q.paths, q.features
  if index_dir is None:
    check_items(g_paths, gallery, 'gallery')
  check_items(q_paths, query, 'query')
  model_id = embed_lib.check_same_model([(gallery_name, gallery_id), (query, q.model_id)],
                                        allow_mixed=allow_mixed_models)
  if cut is not None and model_dir is not None and model_id is not None:
    # The thresholds are the model's: --model must be the model the features came from.
    embed_lib.check_same_model(
        [(os.path.join(model_dir, inference.MODEL_JSON),
          inference.read_model_json(model_dir).get('model_id') or model_id), (query, model_id)],
        allow_mixed=allow_mixed_models)
  if g_dim != q_feats.shape[1]:
    raise ValueError(f'{task} features: the gallery has dimension {g_dim}, the '
                     f'query {q_feats.shape[1]} (embedded by different models?)')
  k = min(int(topk), g_count)
  if int(topk) < 1 or k < 1:
    raise ValueError(f'--topk must be positive, got {topk}' if int(topk) < 1 else
                     f'the gallery {gallery_name} is empty')
  t0 = time.time()
  if index_dir is not None:
    scores, index = gallery_index.search(q_feats, k)
    method = f'{gallery_index.kind} index'
  else:
    scores, index = topk_lib.cosine_topk(q_feats, g.features, k)
    method = 'exact'
  seconds = time.time() - t0
  out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(query)), 'search_results')
  os.makedirs(out_dir, exist_ok=True)
  results = {
      'task': task, 'topk': k, 'gallery': os.path.abspath(gallery_name),
      'query': os.path.abspath(query), 'search': method, 'model_id': model_id,
      'results': [{'query': str(q_paths[i]),
                   'matches': [{'path': str(g_paths[g]), 'score': float(s)}
                               for g, s in zip(index[i], scores[i])]}
                  for i in range(len(q_paths))]}
  if cut is not None:
    lost = apply_threshold(results, cut[0], threshold, cut[1])
    print_fn(f'search: threshold {cut[0]:.4f} ({cut[1]}): {lost} of {len(q_paths)} queries '
             'have no match above it (not in gallery)')
  results_path = os.path.join(out_dir, RESULTS_FILE)
  with open(results_path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  print_fn(f'search: {len(q_paths)} queries x {g_count} gallery items ({task}, top-{k}, '
           f'{method}) in {seconds:.2f}s -> {results_path}')
  if rank_list_queries > 0:
    png = write_rank_list(os.path.join(out_dir, RANK_LIST_FILE), q_paths, g_paths, index,
                          scores, rank_list_queries, None if cut is None else cut[0])
    print_fn(f'search: rank list of the first {min(rank_list_queries, len(q_paths))} queries: '
             f'{png}')
  return results


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('gallery', None, 'Gallery .npz (python -m ufo_jax.embed): exact search.')
  flags.DEFINE_string('index', None, 'Instead of --gallery: an index folder (python -m '
                      'ufo_jax.index build).')
  flags.DEFINE_bool('allow_mixed_models', False, 'Search features of two different model_ids '
                    '(a warning instead of an error).')
  flags.DEFINE_string('query', None, 'Query .npz (python -m ufo_jax.embed).')
  flags.DEFINE_string('task', None, 'Which features to compare: a task of the model (face, '
                      'person, product, vehicle, or a task of your own; docs/CUSTOM_DATA.md; '
                      'default with --index: its task).')
  flags.DEFINE_integer('topk', 10, 'Results per query.')
  flags.DEFINE_string('out', None, 'Output folder (default: search_results beside --query).')
  flags.DEFINE_integer('rank_list_queries', RANK_LIST_QUERIES,
                       'Queries drawn in rank_list.png (0: none).')
  flags.DEFINE_string('threshold', None, 'far1e-2|far1e-3|far1e-4 (the operating threshold in '
                      "--model's model.json) or a cosine: marks matches above / below it and "
                      'queries with none above it "not in gallery".')
  flags.DEFINE_string('model', None, 'The export folder the features came from (its model.json '
                      'thresholds, for --threshold=farX).')


def main(argv: Sequence[str]) -> None:
  cli.check_args(argv, 'query')
  with cli.one_line_errors(FileNotFoundError, ValueError, ImportError):
    search(FLAGS.gallery, FLAGS.query, FLAGS.task, topk=FLAGS.topk, out_dir=FLAGS.out,
           rank_list_queries=FLAGS.rank_list_queries, index_dir=FLAGS.index,
           allow_mixed_models=FLAGS.allow_mixed_models, threshold=FLAGS.threshold,
           model_dir=FLAGS.model)


if __name__ == '__main__':
  define_flags()
  app.run(main)
