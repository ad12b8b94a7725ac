"""Product retrieval protocol (docs/EVALUATION.md; Stanford Online Products): Recall@K.

Every item queries all the others (itself excluded) under cosine distance; ties are broken by
index (a stable sort). Recall@K is the fraction of queries with an item of their class among
the first K. Computed from the rank of each query's nearest same-class item, in chunks on the
device (``ranking``), so the 60,502 x 60,502 SOP test set never exists as a matrix. Queries
whose class has no other item count as misses (SOP has none). K above n - 1 is clipped.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ufo_jax.evaluation import ranking

DEFAULT_KS = (1, 10, 100, 1000)


def first_positive_ranks(features, labels, *, chunk_size: int | None = None,
                         method: str | None = None) -> np.ndarray:
  """Rank (1-based) of each item's nearest other item of its class; 0 where there is none."""
  features = ranking.check_features(features, 'features')
  labels = ranking.as_ids(labels, 'labels', features.shape[0])
  # Self-exclusion as the re-id junk rule: each item is its own camera, so the only gallery
  # item with the query's label *and* camera is the query itself.
  index = np.arange(features.shape[0])
  ranks = ranking.positive_ranks(features, features, labels, labels, index, index,
                                 chunk_size=chunk_size, method=method, first_only=True)
  counts = ranks.num_positives
  first = np.zeros(len(counts), np.int64)
  first[counts > 0] = ranks.ranks[ranks.offsets[:-1][counts > 0]]
  return first


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
  ks = tuple(ks)
  if not ks:
    raise ValueError('ks must name at least one K')
  for k in ks:
    if isinstance(k, bool) or int(k) != k or k < 1:
      raise ValueError(f'every K must be a positive integer, got {k!r}')
  return tuple(int(k) for k in ks)


def recall_from_ranks(first: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
  """Recall@K from the first-positive ranks (0 = no positive); K clipped to n - 1."""
  first = np.asarray(first)
  n = len(first)
  return {k: float(np.mean((first > 0) & (first <= min(k, max(n - 1, 1))))) for k in _check_ks(ks)}


def recall_at_k(features, labels, ks=DEFAULT_KS, *, chunk_size: int | None = None,
                method: str = 'auto') -> dict:
  """Recall@K of every item querying all the others.

  Args:
    features: ``(n, D)`` features (cosine distance).
    labels: ``(n,)`` integer class labels.
    ks: the K values; K > n - 1 is clipped to n - 1.
    chunk_size: queries per chunk (default: from n).
    method: as ``ranking.positive_ranks`` (``'auto'``: host on CPU, device on GPU / TPU).

  Returns:
    ``{k: recall}`` with recalls as fractions in [0, 1].
  """
  ks = _check_ks(ks)
  features = ranking.check_features(features, 'features')
  if features.shape[0] < 2:
    raise ValueError(f'recall needs at least 2 items, got {features.shape[0]}')
  return recall_from_ranks(first_positive_ranks(features, labels, chunk_size=chunk_size,
                                                method=method), ks)


def recall_at_k_ufo(features, labels, ks=DEFAULT_KS, *, chunk_size: int | None = None,
                    method: str = 'auto') -> dict:
  """Recall@K as UFO's evaluator computes it (``retri_evaluator.recall_at_ks``, self-query).

  UFO searches every item against all items, itself included (faiss ``IndexFlatIP``, top
  ``max(K) + 1``), and drops the first neighbour whatever it is (normally the item itself);
  Recall@K asks for a same-class item among the next K. It differs from ``recall_at_k`` (the
  item itself excluded) only when an item's nearest neighbour is not itself (a duplicate or a
  tie): then the item itself stays in its list and counts as a match. Arguments and result as
  ``recall_at_k``.
  """
  ks = _check_ks(ks)
  features = ranking.check_features(features, 'features')
  n = features.shape[0]
  if n < 2:
    raise ValueError(f'recall needs at least 2 items, got {n}')
  labels = ranking.as_ids(labels, 'labels', n)
  # No junk: the query's camera (-1) is no gallery item's, so the item itself is a positive.
  ranks = ranking.positive_ranks(features, features, labels, labels, np.full(n, -1),
                                 np.arange(n), chunk_size=chunk_size, method=method)
  counts = ranks.num_positives
  starts = ranks.offsets[:-1]
  order = np.lexsort((ranks.ranks, np.repeat(np.arange(n), counts)))
  ordered = ranks.ranks[order]  # each query's positive ranks, ascending (counts >= 1: itself)
  r0 = ordered[starts]
  r1 = np.where(counts > 1, ordered[np.minimum(starts + 1, len(ordered) - 1)], 0)
  # Drop rank 1: a positive there leaves the next positive, one place up; otherwise all move up.
  first = np.where(r0 == 1, np.maximum(r1 - 1, 0), r0 - 1)
  return recall_from_ranks(first, ks)
