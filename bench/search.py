"""Benchmark: exact cosine top-k of ``ufo_jax.search`` against FAISS ``IndexFlatIP`` (the baseline).

The same L2-normalised float32 features go to both, in the same process: ``--num_gallery``
gallery rows (default 200,000) of dimension ``--dim`` (1024), ``--num_query`` queries (1,000),
top-``--topk`` (10). Features are random with cluster structure (``--clusters`` centres, each
row a centre plus noise), as embeddings of a real gallery are. The two searches alternate
``--repeats`` times (FAISS first); each side's best and median wall time are reported, with

* ``speed_ratio``: FAISS's best time / ours (> 1: ours is faster), and the same for the medians;
* ``identical``: the top-k indices agree everywhere (ties: lower index first on our side; a
  query whose k-th and (k+1)-th scores are equal in float32 could differ, and is counted in
  ``differing_queries``), and ``max_score_diff``;
* the machine: CPU model, cores, load average before and after, the BLAS numpy uses, the
  FAISS version and its OpenMP threads, and the JAX backend (ours is ``method='auto'``: numpy
  BLAS on CPU, the device path on GPU / TPU).

Prints one JSON line.

  python bench/search.py [--num_gallery=200000] [--num_query=1000] [--dim=1024] [--topk=10]
      [--repeats=3] [--method=auto|host|device]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def make_features(num: int, dim: int, clusters: int, rng: np.random.Generator,
                  centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(features, centres)``: L2-normalised rows, each a random centre plus noise."""
  if centres is None:
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
  out = np.empty((num, dim), np.float32)
  for s in range(0, num, 65536):  # in blocks: no second full-size temporary
    n = min(65536, num - s)
    block = centres[rng.integers(0, len(centres), n)]
    block += 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    out[s:s + n] = block
  return out, centres


def machine() -> dict:
  model = platform.processor()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  blas = {}
  try:
    cfg = np.show_config(mode='dicts')
    blas = {k: cfg['Build Dependencies']['blas'].get(k) for k in ('name', 'version')}
  except (TypeError, KeyError):
    pass
  return {'cpu': model, 'cores': cores, 'numpy': np.__version__, 'numpy_blas': blas}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_gallery', type=int, default=200_000)
  parser.add_argument('--num_query', type=int, default=1_000)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--topk', type=int, default=10)
  parser.add_argument('--clusters', type=int, default=2_000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--method', choices=['auto', 'host', 'device'], default='auto')
  args = parser.parse_args()

  import faiss  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  from ufo_jax.evaluation import topk  # pylint: disable=import-outside-toplevel

  load_before = os.getloadavg()
  rng = np.random.default_rng(args.seed)
  gallery, centres = make_features(args.num_gallery, args.dim, args.clusters, rng)
  query, _ = make_features(args.num_query, args.dim, args.clusters, rng, centres)
  t = time.perf_counter()
  index = faiss.IndexFlatIP(args.dim)
  index.add(gallery)
  faiss_add_s = time.perf_counter() - t
  if args.method != 'host':  # compile the device path outside the timing
    topk.cosine_topk(query[:8], gallery[:1000], args.topk, method=args.method)
  times = {'faiss': [], 'ours': []}
  for _ in range(args.repeats):
    t = time.perf_counter()
    f_scores, f_index = index.search(query, args.topk)
    times['faiss'].append(time.perf_counter() - t)
    t = time.perf_counter()
    o_scores, o_index = topk.cosine_topk(query, gallery, args.topk, method=args.method)
    times['ours'].append(time.perf_counter() - t)
  differing = int(np.count_nonzero(np.any(f_index != o_index, axis=1)))
  best = {k: min(v) for k, v in times.items()}
  median = {k: statistics.median(v) for k, v in times.items()}
  print(json.dumps({
      'bench': 'search',
      'shape': {'num_gallery': args.num_gallery, 'num_query': args.num_query, 'dim': args.dim,
                'topk': args.topk, 'clusters': args.clusters},
      'method': args.method, 'jax_backend': jax.default_backend(),
      'faiss_s': best['faiss'], 'ours_s': best['ours'],
      'faiss_median_s': median['faiss'], 'ours_median_s': median['ours'],
      'speed_ratio': best['faiss'] / best['ours'],
      'speed_ratio_median': median['faiss'] / median['ours'],
      'times': times, 'faiss_add_s': faiss_add_s,
      'identical': differing == 0, 'differing_queries': differing,
      'max_score_diff': float(np.max(np.abs(f_scores - o_scores))),
      'faiss': faiss.__version__, 'faiss_threads': faiss.omp_get_max_threads(),
      'load_before': load_before, 'load_after': os.getloadavg(),
      'machine': machine(),
  }))


if __name__ == '__main__':
  main()
