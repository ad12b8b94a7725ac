"""Benchmark: re-id evaluation (``reid.evaluate_rank*``) vs a per-query numpy argsort loop.

Market-1501-sized random features (3,368 queries, 15,913 gallery items, 1024-d) with realistic
structure: 750 identities seen by 2-6 of 6 cameras, ~2,800 distractors (pid 0), features =
identity centre + camera bias + noise. Two processes, each with its own peak RSS:

* ``ours``: ``reid.evaluate_rank_from_features`` (features in, no Q x G matrix on the host),
  timed whole (second call) and split into the distance chunks and the ranking from them;
* ``loop``: the distance matrix ``reid.cosine_distance`` (the same float32 distances, so the
  numbers can be compared exactly), then on it: ``reid.evaluate_rank(distmat)`` (ours, from a
  matrix), the baseline ``loop_evaluate`` (per query ``np.argsort(kind='stable')``, junk removal,
  CMC / AP / INP, written here), the same loop with numpy's unstable default sort, and, with
  ``--peer_dir=DIR``, ``evaluate_cy`` of a ``rank_cy`` extension built in DIR (fast-reid's
  compiled evaluator, which this repository does not ship).

``--method`` (default ``auto``: ``host`` on CPU, ``reduce`` on GPU / TPU) is passed to ours;
``--method=scan`` is the former CPU kernel (a ``lax.scan`` over blocks of gallery rows with a
``(P, B)`` accumulator), kept here only to compare: ``register_scan`` adds it to
``ranking.DEVICE_COUNTERS``.
Prints one JSON line: times (wall and process CPU), ratios, peak memory, whether all numbers are
identical.

The presets ``msmt17``, ``veriwild`` and ``sop`` run ours alone at the size of those test sets
(SOP: ``retrieval.recall_at_k``, every item querying all others): one call, compilation
included, time and peak memory.

  python bench/eval_rank.py [--preset=market|msmt17|veriwild|sop] [--method=auto] [--dim=1024]
      [--peer_dir=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

PRESETS = {
    'market': {'num_query': 3368, 'num_gallery': 15913, 'ids': 750, 'distractors': 2798,
               'cameras': 6},
    'msmt17': {'num_query': 11659, 'num_gallery': 82161, 'ids': 3060, 'distractors': 0,
               'cameras': 15},
    'veriwild': {'num_query': 10000, 'num_gallery': 128517, 'ids': 10000, 'distractors': 0,
                 'cameras': 174},
    # SOP: one set of 60,502 items (11,316 classes) querying itself.
    'sop': {'num_query': 0, 'num_gallery': 60502, 'ids': 11316, 'distractors': 0, 'cameras': 1},
}


def make_data(num_query: int, num_gallery: int, dim: int, ids: int, distractors: int,
              cameras: int, seed: int = 0, noise: float = 3.0):
  """Features and ids with the structure of a re-id test set."""
  rng = np.random.default_rng(seed)
  distractors = min(distractors, num_gallery - ids)
  cam_sets = [rng.choice(cameras, size=rng.integers(2, cameras + 1), replace=False)
              for _ in range(ids)]
  weights = rng.gamma(2.0, size=ids)
  per_id = 2 + rng.multinomial(num_gallery - distractors - 2 * ids, weights / weights.sum())
  g_pids = np.concatenate([np.repeat(np.arange(1, ids + 1), per_id),
                           np.zeros(distractors, np.int64)])
  # Every identity is seen by at least two cameras in the gallery.
  g_cams = np.concatenate([np.concatenate([cams[:2], rng.choice(cams, size=n - 2)])
                           for cams, n in zip(cam_sets, per_id)] +
                          [rng.integers(0, cameras, distractors)])
  q_pids = np.concatenate([np.arange(1, ids + 1),
                           rng.integers(1, ids + 1, num_query - ids)])
  q_cams = np.asarray([rng.choice(cam_sets[p - 1]) for p in q_pids])
  centres = rng.standard_normal((ids + 1, dim), dtype=np.float32)
  cam_bias = 0.5 * rng.standard_normal((cameras, dim), dtype=np.float32)

  def feats(pids, cams):
    f = centres[pids] + cam_bias[cams]
    f += noise * rng.standard_normal(f.shape, dtype=np.float32)
    return f

  g_feats = feats(g_pids, g_cams)
  g_feats[g_pids == 0] = noise * rng.standard_normal((distractors, dim), dtype=np.float32)
  return feats(q_pids, q_cams), g_feats, q_pids, g_pids, q_cams, g_cams


def loop_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, kind='stable'):
  """The straightforward protocol: per query an argsort, junk removed, CMC / AP / INP.

  ``kind='stable'`` breaks ties by gallery index as the protocol says; numpy's default
  (introsort) is faster but orders ties arbitrarily.
  """
  all_cmc, all_ap, all_inp = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind=kind)
    remove = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
    raw_cmc = (g_pids[order] == q_pids[i])[~remove]
    if not raw_cmc.any():
      continue
    hits = np.flatnonzero(raw_cmc)
    cmc = np.zeros(max_rank)
    cmc[min(hits[0], max_rank):] = 1.0
    all_cmc.append(cmc)
    all_ap.append(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / len(hits))
    all_inp.append(len(hits) / (hits[-1] + 1))
  return {'cmc': np.sum(all_cmc, axis=0) / len(all_cmc), 'mAP': float(np.mean(all_ap)),
          'mINP': float(np.mean(all_inp)), 'num_valid_queries': len(all_cmc)}


SCAN_ROWS = 8  # gallery rows per step of the scan kernel


def register_scan() -> None:
  """Adds ``'scan'`` to ``ranking.DEVICE_COUNTERS``: the same counts as ``'reduce'``."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ufo_jax.evaluation import ranking  # pylint: disable=import-outside-toplevel

  def count_scan(keys_t, pos_idx):
    """Valid gallery items before each positive, ``(P, B)``: a scan over blocks of rows.

    Item ``g`` is before positive ``p`` when ``key_g < key_p + [g < p]`` (ties by index). The
    ``(P, B)`` accumulator stays in cache; queries are the minor (vectorised) axis.
    """
    thr = ranking._thresholds(keys_t, pos_idx)  # pylint: disable=protected-access
    num_g, num_b = keys_t.shape
    padded = -(-num_g // SCAN_ROWS) * SCAN_ROWS
    keys_t = jnp.pad(keys_t, ((0, padded - num_g), (0, 0)), constant_values=ranking.JUNK_KEY)
    blocks = keys_t.reshape(padded // SCAN_ROWS, SCAN_ROWS, num_b)
    offsets = jnp.arange(SCAN_ROWS, dtype=jnp.int32)[:, None, None]

    def body(acc, xs):
      rows, g0 = xs  # (U, B) keys of gallery items g0 .. g0 + U - 1
      bound = thr[None] + (g0 + offsets < pos_idx[None]).astype(jnp.int32)  # (U, P, B)
      return acc + jnp.sum(rows[:, None, :] < bound, axis=0, dtype=jnp.int32), None

    starts = jnp.arange(0, padded, SCAN_ROWS, dtype=jnp.int32)
    acc, _ = jax.lax.scan(body, jnp.zeros(thr.shape, jnp.int32), (blocks, starts))
    return acc

  ranking.DEVICE_COUNTERS['scan'] = count_scan


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _timed(fn):
  """``(result, wall seconds, process CPU seconds)`` of ``fn()``."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return result, time.perf_counter() - wall, time.process_time() - cpu


def _metrics(res) -> dict:
  return {'cmc': [float(x) for x in res['cmc']], 'mAP': float(res['mAP']),
          'mINP': float(res['mINP']), 'num_valid_queries': int(res['num_valid_queries'])}


def run_part(part: str, args) -> dict:
  """Runs one part (``ours`` or ``loop``) in this process; returns times, memory and metrics."""
  import jax  # JAX starts here

  from ufo_jax.evaluation import ranking, reid, retrieval

  register_scan()
  preset = PRESETS[args.preset]
  method = ranking.resolve_method(args.method)
  out = {'part': part, 'backend': jax.default_backend(), 'method': method}
  if args.preset == 'sop':
    rng = np.random.default_rng(args.seed)
    n = args.num_gallery
    ids = min(preset['ids'], n // 2)  # every class has at least two images
    labels = np.sort(np.concatenate([np.arange(ids), np.arange(ids),
                                     rng.integers(0, ids, n - 2 * ids)]))
    feats = rng.standard_normal((n, args.dim), dtype=np.float32)
    feats += 0.3 * rng.standard_normal((ids, args.dim), dtype=np.float32)[labels]
    rss0 = _current_rss_mib()
    res, out['total_s'], out['total_cpu_s'] = _timed(
        lambda: retrieval.recall_at_k(feats, labels, method=method))
    out['peak_rss_mib'] = _rss_mib()
    out['peak_rss_over_inputs_mib'] = out['peak_rss_mib'] - rss0
    out['chunk_size'] = ranking.default_chunk_size(n, n)
    out['metrics'] = {str(k): v for k, v in res.items()}
    return out
  # Smaller sizes than the preset's (--num_query / --num_gallery): fewer identities to fit.
  ids = min(preset['ids'], args.num_query, args.num_gallery // 4)
  distractors = min(preset['distractors'], args.num_gallery - 2 * ids)
  data = make_data(args.num_query, args.num_gallery, args.dim, ids, distractors,
                   preset['cameras'], seed=args.seed)
  q, g, qp, gp, qc, gc = data
  ids = (qp, gp, qc, gc)
  rss0 = _current_rss_mib()
  tracemalloc.start()
  if part == 'ours' and args.preset != 'market':  # one timed call, compilation included
    res, out['total_s'], out['total_cpu_s'] = _timed(
        lambda: reid.evaluate_rank_from_features(q, g, *ids, method=method))
    out['chunk_size'] = ranking.default_chunk_size(len(g), len(q))
  elif part == 'ours':
    run = lambda: reid.evaluate_rank_from_features(q, g, *ids, method=method)
    res, out['cold_s'], _ = _timed(run)  # compiles (device methods)
    res, out['total_s'], out['total_cpu_s'] = _timed(run)
    out['tracemalloc_peak_mib'] = tracemalloc.get_traced_memory()[1] / 2**20
    out['peak_rss_mib'] = _rss_mib()
    # The two parts alone: the distance chunks (kept), then the ranking from them.
    ranker = ranking._Ranker(q, g, None, method)
    chunks, out['distance_s'], out['distance_cpu_s'] = _timed(lambda: [
        jax.block_until_ready(ranker.distances(c)) for c in range(ranker.num_chunks)])
    part_res, out['ranking_s'], out['ranking_cpu_s'] = _timed(lambda: reid.metrics_from_ranks(
        ranking.ranks_from_distance_chunks(chunks.__getitem__, ranker.chunk, *ids,
                                           method=method)))
    assert part_res['mAP'] == res['mAP']
    out['chunk_size'] = ranker.chunk
  else:
    if method != 'host':  # compile, not timed
      reid.cosine_distance(q, g, method=method)
    dist, out['distance_s'], out['distance_cpu_s'] = _timed(
        lambda: reid.cosine_distance(q, g, method=method))
    if method != 'host':  # compile, not timed
      reid.evaluate_rank(dist, *ids, method=method)
    ours, out['ours_distmat_s'], out['ours_distmat_cpu_s'] = _timed(
        lambda: reid.evaluate_rank(dist, *ids, method=method))
    out['ours_distmat_metrics'] = _metrics(ours)
    res, out['ranking_s'], out['ranking_cpu_s'] = _timed(lambda: loop_evaluate(dist, *ids))
    out['total_s'] = out['distance_s'] + out['ranking_s']
    out['total_cpu_s'] = out['distance_cpu_s'] + out['ranking_cpu_s']
    # For reference: the same loop with numpy's default (unstable) argsort.
    fast, out['ranking_quicksort_s'], out['ranking_quicksort_cpu_s'] = _timed(
        lambda: loop_evaluate(dist, *ids, kind='quicksort'))
    out['quicksort_same_numbers'] = bool(fast['mAP'] == res['mAP'] and
                                         np.array_equal(fast['cmc'], res['cmc']))
    if args.peer_dir:
      out['peer'] = _run_peer(args.peer_dir, dist, ids, res)
  out.setdefault('tracemalloc_peak_mib', tracemalloc.get_traced_memory()[1] / 2**20)
  tracemalloc.stop()
  out.setdefault('peak_rss_mib', _rss_mib())
  out['peak_rss_over_inputs_mib'] = out['peak_rss_mib'] - rss0
  out['metrics'] = _metrics(res)
  return out


def _run_peer(peer_dir: str, dist, ids, loop_res) -> dict:
  """``evaluate_cy`` of a compiled ``rank_cy`` module found in ``peer_dir``: best of two."""
  sys.path.insert(0, os.path.abspath(peer_dir))
  import rank_cy  # pylint: disable=import-outside-toplevel

  times = []
  for _ in range(2):
    (cmc, all_ap, all_inp), wall, cpu = _timed(lambda: rank_cy.evaluate_cy(dist, *ids, 50))
    times.append((wall, cpu))
  valid = np.asarray(all_ap) > 0
  return {'evaluate_cy_s': min(t[0] for t in times), 'evaluate_cy_cpu_s': min(t[1] for t in times),
          'rank1': float(cmc[0]), 'mAP': float(np.mean(np.asarray(all_ap)[valid])),
          'loop_rank1': float(loop_res['cmc'][0]), 'loop_mAP': loop_res['mAP']}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', choices=sorted(PRESETS), default='market')
  parser.add_argument('--num_query', type=int, default=None, help='default: the preset')
  parser.add_argument('--num_gallery', type=int, default=None, help='default: the preset')
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--method', choices=['auto', 'host', 'scan', 'reduce'], default='auto',
                      help='ranking method of ours (auto: host on CPU, reduce on GPU / TPU)')
  parser.add_argument('--peer_dir', default=None,
                      help='a directory with a built rank_cy module (fast-reid), to time too')
  parser.add_argument('--part', choices=['ours', 'loop'], default=None,
                      help='run one part in this process (used by the subprocesses)')
  args = parser.parse_args()
  preset = PRESETS[args.preset]
  args.num_query = preset['num_query'] if args.num_query is None else args.num_query
  args.num_gallery = preset['num_gallery'] if args.num_gallery is None else args.num_gallery
  if args.part:
    print(json.dumps(run_part(args.part, args)))
    return
  results = {}
  parts = ('ours', 'loop') if args.preset == 'market' else ('ours',)
  for part in parts:
    cmd = [sys.executable, os.path.abspath(__file__), f'--part={part}',
           f'--preset={args.preset}', f'--num_query={args.num_query}',
           f'--num_gallery={args.num_gallery}', f'--dim={args.dim}', f'--seed={args.seed}',
           f'--method={args.method}'] + ([f'--peer_dir={args.peer_dir}'] if args.peer_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
      raise SystemExit(f'error: {part} failed:\n{proc.stderr}')
    results[part] = json.loads(proc.stdout.strip().splitlines()[-1])
  shape = {'preset': args.preset, 'num_query': args.num_query,
           'num_gallery': args.num_gallery, 'dim': args.dim}
  if args.preset != 'market':
    ours = results['ours']
    metrics = ours.pop('metrics')
    if 'cmc' in metrics:
      metrics['rank1'] = metrics.pop('cmc')[0]
    print(json.dumps({'bench': 'eval_rank', 'shape': shape, 'ours': ours, **metrics}))
    return
  ours, loop = results['ours'], results['loop']
  m_ours, m_loop = ours.pop('metrics'), loop.pop('metrics')
  m_distmat = loop.pop('ours_distmat_metrics')
  extra = {}
  if 'peer' in loop:
    peer = loop['peer']
    extra = {'speedup_distmat_vs_evaluate_cy': peer['evaluate_cy_s'] / loop['ours_distmat_s'],
             'speedup_distmat_vs_evaluate_cy_cpu':
                 peer['evaluate_cy_cpu_s'] / loop['ours_distmat_cpu_s'],
             'speedup_ranking_vs_evaluate_cy': peer['evaluate_cy_s'] / ours['ranking_s']}
  print(json.dumps({
      'bench': 'eval_rank',
      'shape': shape,
      'ours': ours,
      'loop': loop,
      'speedup_distmat': loop['ranking_s'] / loop['ours_distmat_s'],
      'speedup_distmat_cpu': loop['ranking_cpu_s'] / loop['ours_distmat_cpu_s'],
      **extra,
      'speedup_total': loop['total_s'] / ours['total_s'],
      'speedup_ranking': loop['ranking_s'] / ours['ranking_s'],
      'speedup_total_cpu': loop['total_cpu_s'] / ours['total_cpu_s'],
      'speedup_ranking_cpu': loop['ranking_cpu_s'] / ours['ranking_cpu_s'],
      'speedup_ranking_vs_quicksort_loop': loop['ranking_quicksort_s'] / ours['ranking_s'],
      'identical': m_ours == m_loop == m_distmat,
      'rank1': m_ours['cmc'][0], 'mAP': m_ours['mAP'], 'mINP': m_ours['mINP'],
      'num_valid_queries': m_ours['num_valid_queries'],
  }))


if __name__ == '__main__':
  main()
