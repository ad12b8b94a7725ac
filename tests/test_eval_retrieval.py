"""Tests of the product retrieval protocol (Recall@K, every item querying all others)."""

import numpy as np
import pytest

from ufo_jax.evaluation import reid, retrieval


def brute_force_recall(dist, labels, ks):
  """Per query: stable sort of the other items, position of the first same-label item."""
  n = len(labels)
  first = []
  for i in range(n):
    others = [j for j in sorted(range(n), key=lambda j: (dist[i, j], j)) if j != i]
    hits = [r for r, j in enumerate(others, start=1) if labels[j] == labels[i]]
    first.append(hits[0] if hits else None)
  return {k: float(np.mean([f is not None and f <= min(k, n - 1) for f in first])) for k in ks}


@pytest.mark.parametrize('chunk_size', [8, None])
def test_recall_matches_brute_force_with_ties(chunk_size):
  rng = np.random.default_rng(0)
  n = 45
  feats = rng.integers(-1, 2, (n, 3)).astype(np.float32)  # many exact ties
  feats[~feats.any(1), 0] = 1.0
  labels = rng.integers(0, 9, n)
  labels[0] = 100  # a singleton class: always a miss
  dist = reid.cosine_distance(feats, feats, chunk_size)
  ks = (1, 2, 5, 10, 100)
  got = retrieval.recall_at_k(feats, labels, ks=ks, chunk_size=chunk_size)
  assert got == brute_force_recall(dist, labels, ks)
  assert list(got) == list(ks)
  assert got[100] == pytest.approx((n - 1) / n)  # K clipped to n - 1: all but the singleton


def test_recall_continuous_features_and_first_ranks():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(30), 3)
  feats = rng.standard_normal((90, 12)).astype(np.float32) + 1.5 * np.eye(30, 12)[labels % 12]
  dist = reid.cosine_distance(feats, feats)
  got = retrieval.recall_at_k(feats, labels)
  assert got == brute_force_recall(dist, labels, (1, 10, 100, 1000))
  assert got[1000] == 1.0
  first = retrieval.first_positive_ranks(feats, labels)
  d = dist.copy()
  np.fill_diagonal(d, np.inf)
  best = np.asarray([np.min(d[i][labels == labels[i]]) for i in range(90)])
  # rank of the nearest positive = 1 + number of other items strictly closer (no ties here)
  np.testing.assert_array_equal(first, 1 + np.sum(d < best[:, None], axis=1))


def test_recall_errors():
  feats = np.ones((4, 2))
  with pytest.raises(ValueError, match='positive integer'):
    retrieval.recall_at_k(feats, [0, 0, 1, 1], ks=(0,))
  with pytest.raises(ValueError, match='at least one K'):
    retrieval.recall_at_k(feats, [0, 0, 1, 1], ks=())
  with pytest.raises(ValueError, match='labels has 3 entries, expected 4'):
    retrieval.recall_at_k(feats, [0, 0, 1])
