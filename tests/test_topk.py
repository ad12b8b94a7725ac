"""Exact cosine top-k in chunks (search): against a brute-force numpy ranking, ties included."""

import numpy as np
import pytest

from ufo_jax.evaluation import topk


def brute_topk(q, g, k):
  """float64 cosine, stable order: score descending, then gallery index ascending."""
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  s = qn.astype(np.float64) @ gn.astype(np.float64).T
  order = np.stack([np.lexsort((np.arange(len(g)), -row)) for row in s])[:, :k]
  return np.take_along_axis(s, order, 1), order


def tie_features(rng, n, dim=6):
  """Rows drawn from few directions (one-hot and pair sums), scaled: many exactly equal scores."""
  eye = np.eye(dim)
  basis = np.array([eye[i] for i in range(dim)]
                   + [eye[i] + eye[j] for i in range(dim) for j in range(i + 1, dim)], np.float32)
  scale = rng.choice([1.0, 2.0, 4.0], (n, 1)).astype(np.float32)
  return basis[rng.integers(0, len(basis), n)] * scale


@pytest.mark.parametrize('query_chunk, gallery_chunk', [(None, None), (8, 7), (16, 1)])
def test_ties_in_gallery_order_across_chunks(query_chunk, gallery_chunk):
  rng = np.random.default_rng(0)
  g = tie_features(rng, 60)
  q = tie_features(rng, 21)
  for k in (1, 6, 60):
    scores, index = topk.cosine_topk(q, g, k, query_chunk=query_chunk,
                                     gallery_chunk=gallery_chunk)
    want_s, want_i = brute_topk(q, g, k)
    assert scores.shape == index.shape == (21, k)
    assert index.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(index, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)
  # Ties really happen: equal scores within a row of the top-6.
  s6, _ = topk.cosine_topk(q, g, 6)
  assert np.any(s6[:, 1:] == s6[:, :-1])


def test_random_features_and_progress_with_small_chunks():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(333, 24)).astype(np.float32) * rng.uniform(0.5, 3, (333, 1))
  q = rng.normal(size=(40, 24)).astype(np.float32)
  calls = []
  scores, index = topk.cosine_topk(q, g, 10, query_chunk=16, gallery_chunk=50,
                                   progress=lambda done, total: calls.append((done, total)))
  want_s, want_i = brute_topk(q, g, 10)
  np.testing.assert_array_equal(index, want_i)
  np.testing.assert_allclose(scores, want_s, atol=1e-5)
  assert calls == [(min(s + 50, 333), 333) for s in range(0, 333, 50)]


def test_memory_of_a_million_item_gallery_stays_small():
  # 1M x 1024 float32 gallery (4 GiB, the caller's array), 10k queries, top-100: the search
  # itself needs well under 2 GiB on top, so it fits a 24 GiB machine with the inputs.
  q_chunk, g_chunk = topk.default_chunks(10_000, 1_000_000)
  assert q_chunk * g_chunk <= topk.BLOCK_ELEMENTS
  peak = topk.estimate_peak_bytes(10_000, 1_000_000, 1024, 100)
  assert peak < 2 * 2**30, peak / 2**30
  # The estimate grows with the chunks, not with the gallery.
  assert topk.estimate_peak_bytes(10_000, 10_000_000, 1024, 100) == peak


def test_bad_input_is_a_clear_error():
  g = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match=r'k=6 must be in \[1, 5\]'):
    topk.cosine_topk(g, g, 6)
  with pytest.raises(ValueError, match='dimension 3 but gallery features 4'):
    topk.cosine_topk(np.ones((2, 3), np.float32), g, 1)
  bad = g.copy()
  bad[3] = 0
  with pytest.raises(ValueError, match='all-zero rows'):
    topk.cosine_topk(g, bad, 2)
