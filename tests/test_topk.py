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


@pytest.mark.parametrize('method', ['host', 'device'])
@pytest.mark.parametrize('query_chunk, gallery_chunk', [(None, None), (8, 7), (16, 1)])
def test_ties_in_gallery_order_across_chunks(query_chunk, gallery_chunk, method):
  rng = np.random.default_rng(0)
  g = tie_features(rng, 60)
  q = tie_features(rng, 21)
  for k in (1, 6, 60):
    scores, index = topk.cosine_topk(q, g, k, query_chunk=query_chunk,
                                     gallery_chunk=gallery_chunk, method=method)
    want_s, want_i = brute_topk(q, g, k)
    assert scores.shape == index.shape == (21, k)
    assert index.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(index, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)
  # Ties really happen: equal scores within a row of the top-6.
  s6, _ = topk.cosine_topk(q, g, 6, method=method)
  assert np.any(s6[:, 1:] == s6[:, :-1])


def test_host_search_equals_numpy_brute_force_in_any_gallery_order():
  """The CPU path (BLAS blocks, candidates above the running k-th) against a float32 brute force.

  Three orders of the same gallery: random, by increasing similarity to the queries (every
  block beats the running top-k: blocks of 300 rows take the dense path) and decreasing;
  stored rows normalised (used as stored) and scaled (divided by their norm).
  """
  rng = np.random.default_rng(5)
  g = rng.normal(size=(700, 32)).astype(np.float32)
  g[350:360] = g[10]  # duplicates: equal scores in different blocks
  q = rng.normal(size=(13, 32)).astype(np.float32)
  gn, qn = topk.normalize_rows(g), topk.normalize_rows(q)
  mean_score = (qn @ gn.T).mean(axis=0)
  for order in (np.arange(700), np.argsort(mean_score), np.argsort(-mean_score)):
    for gallery, chunk in ((gn[order], 300),
                           (gn[order] * rng.uniform(0.5, 4, (700, 1)).astype(np.float32), 64)):
      scores, index = topk.cosine_topk(q, gallery, 25, gallery_chunk=chunk, method='host')
      brute = qn @ topk.normalize_rows(gallery).T  # float32, numpy
      want = np.stack([np.lexsort((np.arange(700), -row)) for row in brute])[:, :25]
      np.testing.assert_array_equal(index, want)
      np.testing.assert_allclose(scores, np.take_along_axis(brute, want, 1), atol=1e-6)
  assert topk.default_chunks(1000, 200_000, 'host') == (1000, topk.HOST_GALLERY_CHUNK)


def test_random_features_and_progress_with_small_chunks():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(333, 24)).astype(np.float32) * rng.uniform(0.5, 3, (333, 1))
  q = rng.normal(size=(40, 24)).astype(np.float32)
  calls = []
  scores, index = topk.cosine_topk(q, g, 10, query_chunk=16, gallery_chunk=50,
                                   progress=lambda done, total: calls.append((done, total)),
                                   method='device')
  want_s, want_i = brute_topk(q, g, 10)
  np.testing.assert_array_equal(index, want_i)
  np.testing.assert_allclose(scores, want_s, atol=1e-5)
  assert calls == [(min(s + 50, 333), 333) for s in range(0, 333, 50)]
  calls.clear()
  host_s, host_i = topk.cosine_topk(q, g, 10, gallery_chunk=50, method='host',
                                    progress=lambda done, total: calls.append((done, total)))
  np.testing.assert_array_equal(host_i, want_i)
  np.testing.assert_allclose(host_s, scores, atol=1e-6)
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
  host = topk.estimate_peak_bytes(10_000, 1_000_000, 1024, 100, method='host')
  assert host < 2**30 and host == topk.estimate_peak_bytes(10_000, 10**7, 1024, 100,
                                                           method='host')


def test_bad_input_is_a_clear_error():
  g = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match=r'k=6 must be in \[1, 5\]'):
    topk.cosine_topk(g, g, 6)
  with pytest.raises(ValueError, match='dimension 3 but gallery features 4'):
    topk.cosine_topk(np.ones((2, 3), np.float32), g, 1)
  bad = g.copy()
  bad[3] = 0
  for method in ('host', 'device'):
    with pytest.raises(ValueError, match='all-zero rows'):
      topk.cosine_topk(g, bad, 2, method=method)
  with pytest.raises(ValueError, match="method must be 'auto', 'host' or 'device'"):
    topk.cosine_topk(g, g, 2, method='gpu')
