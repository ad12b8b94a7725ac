"""Benchmark: speed, size and recall@10 of every ``ufo_jax.index`` kind on this machine.

A gallery of ``--n`` random unit vectors of ``--dim`` dimensions with cluster structure
(``--clusters`` Gaussian centres, each vector its centre plus noise of the same scale, so two
vectors of one cluster have a cosine of about 0.5 and of two clusters about 0), and
``--queries`` further vectors of the same clusters as queries. For each kind, in ONE run:

* build: train (ivf cells, product quantiser) + add every vector, seconds;
* search: the queries' top-10, queries/s (one batch, all FAISS threads);
* recall@10 against the exact top-10 (the ``flat`` index's answer, computed first);
* size of the index file (``faiss.write_index``) and the save time;
* add 10,000 more vectors and remove 10,000, seconds;
* with ``--sweep``: recall@10 and queries/s at more ``nprobe`` (ivf, ivf_pq) or ``ef_search``
  (hnsw) values, on the same index.

Prints one JSON line per kind (and the machine). The library's own code is measured
(``ufo_jax.index.create`` / ``Index.add`` / ``Index.search`` / ``Index.remove``).

  python bench/index.py [--n=1000000] [--dim=1024] [--queries=1000] [--kinds=flat,ivf,ivf_pq,hnsw]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from ufo_jax import index as index_lib

CHUNK = 50_000
UPDATE = 10_000
SWEEP = {'nprobe': (4, 16, 64, 256), 'ef_search': (16, 64, 256, 1024)}


def recall(rows: np.ndarray, truth: np.ndarray) -> float:
  """Mean fraction of each query's exact top-10 (``truth``) found in its ``rows``."""
  return round(float(np.mean([len(np.intersect1d(r, w)) / 10 for r, w in zip(rows, truth)])), 4)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
  """``n`` unit rows: a random one of ``clusters`` centres (seed 0) plus noise, float32."""
  centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
  rng = np.random.default_rng(seed)
  out = np.empty((n, dim), np.float32)
  for s in range(0, n, CHUNK):
    e = min(n, s + CHUNK)
    x = centres[rng.integers(0, clusters, e - s)]
    x += rng.standard_normal((e - s, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out[s:e] = x
  return out


def bench_kind(kind: str, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray | None,
               work_dir: str, args) -> tuple[dict, np.ndarray]:
  n, dim = gallery.shape
  result: dict = {'kind': kind, 'n': n, 'dim': dim, 'queries': len(queries)}
  t0 = time.perf_counter()
  faiss_index, params = index_lib.create(kind, dim, gallery, nlist=args.nlist,
                                         m=args.hnsw_m if kind == 'hnsw' else args.pq_m)
  result['train_s'] = round(time.perf_counter() - t0, 1)
  index = index_lib.Index(faiss_index, np.zeros(0, str), np.zeros(0, bool),
                          {'kind': kind, 'dim': dim, 'task': 'bench', **params})
  paths = np.char.add('/g/', np.arange(n).astype(str))
  index.add(paths, gallery, normalize=False)
  result['build_s'] = round(time.perf_counter() - t0, 1)
  result.update({k: v for k, v in params.items() if k != 'trained_on'})
  index.search(queries[:10], 10)  # warm-up
  t = time.perf_counter()
  scores, rows = index.search(queries, 10)
  seconds = time.perf_counter() - t
  result['search_s'] = round(seconds, 3)
  result['queries_per_s'] = round(len(queries) / seconds, 1)
  if truth is not None:
    result['recall_at_10'] = recall(rows, truth)
    knob = {'ivf': 'nprobe', 'ivf_pq': 'nprobe', 'hnsw': 'ef_search'}.get(kind)
    if args.sweep and knob:
      default, result['sweep'] = index.meta[knob], []
      for value in SWEEP[knob]:
        index.meta[knob] = value
        t = time.perf_counter()
        _, swept = index.search(queries, 10)
        result['sweep'].append({knob: value, 'recall_at_10': recall(swept, truth),
                                'queries_per_s': round(len(queries) / (time.perf_counter() - t),
                                                       1)})
      index.meta[knob] = default
  path = os.path.join(work_dir, f'{kind}.faiss')
  t = time.perf_counter()
  import faiss  # pylint: disable=g-import-not-at-top

  faiss.write_index(index.faiss_index, path)
  result['save_s'] = round(time.perf_counter() - t, 1)
  result['file_mib'] = round(os.path.getsize(path) / 2**20, 1)
  os.remove(path)
  more = clustered(UPDATE, dim, args.clusters, seed=7)
  t = time.perf_counter()
  index.add(np.char.add('/more/', np.arange(UPDATE).astype(str)), more, normalize=False)
  result['add_10k_s'] = round(time.perf_counter() - t, 2)
  t = time.perf_counter()
  index.remove(paths[:UPDATE])
  result['remove_10k_s'] = round(time.perf_counter() - t, 2)
  return result, rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=1_000_000)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--queries', type=int, default=1000)
  parser.add_argument('--clusters', type=int, default=10_000)
  parser.add_argument('--kinds', default=','.join(index_lib.KINDS))
  parser.add_argument('--nlist', type=int, default=None)
  parser.add_argument('--pq_m', type=int, default=None)
  parser.add_argument('--hnsw_m', type=int, default=None)
  parser.add_argument('--sweep', action='store_true', help='also other nprobe / ef_search')
  args = parser.parse_args()
  import faiss  # pylint: disable=g-import-not-at-top

  machine = {'machine': f'{platform.machine()} {os.cpu_count()} CPUs',
             'faiss': faiss.__version__, 'faiss_threads': faiss.omp_get_max_threads(),
             'load_average_start': round(os.getloadavg()[0], 1)}
  t = time.perf_counter()
  gallery = clustered(args.n, args.dim, args.clusters, seed=1)
  queries = clustered(args.queries, args.dim, args.clusters, seed=2)
  machine['generate_s'] = round(time.perf_counter() - t, 1)
  print(json.dumps(machine), flush=True)
  kinds = [k.strip() for k in args.kinds.split(',')]
  truth = None
  with tempfile.TemporaryDirectory() as work_dir:
    for kind in (['flat'] if 'flat' not in kinds else []) + kinds:
      result, rows = bench_kind(kind, gallery, queries, truth, work_dir, args)
      if kind == 'flat':
        truth = rows  # the exact answer
        result['recall_at_10'] = 1.0
      result['load_average'] = round(os.getloadavg()[0], 1)
      if kind in kinds:
        print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
