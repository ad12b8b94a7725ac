"""Re-identification protocol (docs/EVALUATION.md): CMC, mAP and mINP of queries vs a gallery.

For each query the gallery is ordered by distance (ties by gallery index, as a stable sort),
gallery items with the query's pid *and* camera are removed ("junk"), and queries without a
positive left are skipped. Over the valid queries:

* CMC rank-k: fraction whose first positive is within the top k (clipped cumulative match);
* mAP: mean of ``AP = sum_k precision@k * rel_k / #rel`` (no interpolation);
* mINP: mean of ``#rel / rank of the hardest positive``.

``evaluate_rank`` takes a distance matrix; ``evaluate_rank_from_features`` computes the
distances from features in chunks, without the query x gallery matrix on the host. Both rank
with ``ranking`` (no row is sorted), exactly as a stable argsort per query
(``positive_ranks_from_distances``, the reference); given the distances of ``cosine_distance``
the two are identical, bit for bit. ``method`` picks how the ranks are counted: ``'auto'``
(numpy on the host on CPU, the device on GPU / TPU), ``'host'``, ``'scan'`` or ``'reduce'``.
"""

from __future__ import annotations

import numpy as np

from ufo_jax.evaluation import ranking


def _check_max_rank(max_rank: int) -> int:
  if int(max_rank) != max_rank or max_rank < 1:
    raise ValueError(f'max_rank must be a positive integer, got {max_rank!r}')
  return int(max_rank)


def metrics_from_ranks(ranks: ranking.PositiveRanks, max_rank: int = 50) -> dict:
  """CMC, mAP and mINP from the sorted ranks of each query's positives.

  Shared by both paths, so equal ranks give equal numbers.
  """
  max_rank = _check_max_rank(max_rank)
  counts = ranks.num_positives
  valid = counts > 0
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError(f'no valid query: none of the {len(counts)} queries has a positive (same '
                     'pid, another camera) in the gallery; check the pids and camera ids')
  starts = ranks.offsets[:-1][valid]
  first = ranks.ranks[starts]
  last = ranks.ranks[ranks.offsets[1:][valid] - 1]
  hits = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
  cmc = np.cumsum(hits) / num_valid
  query_of = np.repeat(np.arange(len(counts)), counts)
  position = np.arange(len(ranks.ranks)) - ranks.offsets[query_of] + 1
  precision = position / ranks.ranks
  ap = np.add.reduceat(precision, starts) / counts[valid]
  inp = counts[valid] / last
  return {
      'cmc': cmc.astype(np.float64),
      'mAP': float(np.mean(ap)),
      'mINP': float(np.mean(inp)),
      'num_valid_queries': num_valid,
  }


def _check_ids(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int):
  return (ranking.as_ids(q_pids, 'q_pids', num_q), ranking.as_ids(g_pids, 'g_pids', num_g),
          ranking.as_ids(q_camids, 'q_camids', num_q),
          ranking.as_ids(g_camids, 'g_camids', num_g))


def _check_distmat(distmat) -> np.ndarray:
  distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(f'distmat must be 2-D (queries, gallery), got shape {distmat.shape}')
  if distmat.shape[0] == 0 or distmat.shape[1] == 0:
    raise ValueError(f'distmat is empty: shape {distmat.shape}')
  if not (np.issubdtype(distmat.dtype, np.floating) or np.issubdtype(distmat.dtype, np.integer)):
    raise ValueError(f'distmat must hold real numbers, got dtype {distmat.dtype}')
  if np.issubdtype(distmat.dtype, np.floating):
    for s in range(0, distmat.shape[0], 1024):  # in blocks: no full-size temporary
      if np.isnan(distmat[s:s + 1024]).any():
        raise ValueError('distmat holds NaN distances: their rank is undefined')
  return distmat


def positive_ranks_from_distances(distmat, q_pids, g_pids, q_camids,
                                  g_camids) -> ranking.PositiveRanks:
  """Ranks of each query's positives by a stable argsort of its distance row (the reference).

  One ``np.argsort(kind='stable')`` per query: slow, kept as the definition the fast paths are
  tested against.
  """
  distmat = _check_distmat(distmat)
  num_q, num_g = distmat.shape
  q_pids, g_pids, q_camids, g_camids = _check_ids(q_pids, g_pids, q_camids, g_camids,
                                                  num_q, num_g)
  all_ranks, offsets = [], [0]
  for i in range(num_q):
    order = np.argsort(distmat[i], kind='stable')
    same_pid = g_pids[order] == q_pids[i]
    keep = ~(same_pid & (g_camids[order] == q_camids[i]))
    r = np.flatnonzero(same_pid[keep]) + 1
    all_ranks.append(r)
    offsets.append(offsets[-1] + len(r))
  return ranking.PositiveRanks(ranks=np.concatenate(all_ranks).astype(np.int64),
                               offsets=np.asarray(offsets, np.int64))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                  method: str = 'auto') -> dict:
  """Re-id metrics from a ``(Q, G)`` distance matrix (any real dtype, no NaN).

  ``method``: ``'auto'`` (``host`` on CPU and for matrices that are not float32, else the
  device method of the backend), ``'host'``, ``'scan'`` or ``'reduce'``; the numbers do not
  depend on it.

  Returns:
    ``{'cmc': (max_rank,) fractions, 'mAP': float, 'mINP': float, 'num_valid_queries': int}``.
  """
  max_rank = _check_max_rank(max_rank)
  distmat = _check_distmat(distmat)
  ranks = ranking.ranks_from_distances(distmat, q_pids, g_pids, q_camids, g_camids,
                                       method=method)
  return metrics_from_ranks(ranks, max_rank)


def evaluate_rank_from_features(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids,
                                max_rank: int = 50, chunk_size: int | None = None, *,
                                method: str = 'auto') -> dict:
  """Re-id metrics under cosine distance, computed in query chunks.

  The distance is ``1 - cos`` of L2-normalised float32 features. Never holds the query x
  gallery matrix on the host: MSMT17, VeRi-Wild (large) and SOP fit in a few GiB.
  ``chunk_size`` (queries per chunk) defaults to ``ranking.default_chunk_size(G, Q)``.
  ``method`` as ``evaluate_rank`` (``'auto'``: distances and counts on the host with numpy on
  CPU, on the device on GPU / TPU). Same return value as ``evaluate_rank``; identical to
  ``evaluate_rank(cosine_distance(q_feats, g_feats, chunk_size, method=method), ...)``.
  """
  max_rank = _check_max_rank(max_rank)
  ranks = ranking.positive_ranks(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids,
                                 chunk_size=chunk_size, method=method)
  return metrics_from_ranks(ranks, max_rank)


def cosine_distance(q_feats, g_feats, chunk_size: int | None = None, *,
                    method: str = 'auto') -> np.ndarray:
  """``(Q, G)`` float32 cosine distances, exactly as ``evaluate_rank_from_features`` computes them.

  Same ``chunk_size`` and ``method`` as that call. Materialises the full matrix on the host:
  for small sets, tests and figures.
  """
  return ranking.distance_matrix(q_feats, g_feats, chunk_size, method)


class LazyDistances:
  """Rows of the cosine distance matrix computed on demand (numpy, float32).

  ``dist[i]`` is query ``i``'s distance row; for drawing rank lists of a few queries of a set
  too large for the full matrix. Rows may differ from ``cosine_distance`` in the last bit.
  """

  def __init__(self, q_feats, g_feats):
    q = ranking.check_features(q_feats, 'query features')
    g = ranking.check_features(g_feats, 'gallery features')
    if q.shape[1] != g.shape[1]:
      raise ValueError(f'query features have dim {q.shape[1]} but gallery features {g.shape[1]}')
    self._q = q / np.linalg.norm(q, axis=1, keepdims=True)
    self._g = g / np.linalg.norm(g, axis=1, keepdims=True)
    self.shape = (q.shape[0], g.shape[0])

  def __getitem__(self, i) -> np.ndarray:
    return (1.0 - self._g @ self._q[i].T).T.astype(np.float32)
