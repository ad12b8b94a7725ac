"""Tests of the re-id protocol: the direct path, the chunked device path and VehicleID."""

import tracemalloc

import numpy as np
import pytest

from ufo_jax.evaluation import ranking, reid, vehicleid

GIB = 2**30


def brute_force(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
  """Independent reference: Python sorting of (distance, index), metrics by their definitions."""
  cmcs, aps, inps = [], [], []
  for i in range(distmat.shape[0]):
    ranked = sorted(range(distmat.shape[1]), key=lambda j: (distmat[i, j], j))
    kept = [j for j in ranked if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
    rel = [1 if g_pids[j] == q_pids[i] else 0 for j in kept]
    if not any(rel):
      continue
    cmcs.append([1.0 if any(rel[:k]) else 0.0 for k in range(1, max_rank + 1)])
    precision_sum = sum(sum(rel[:k]) / k for k in range(1, len(rel) + 1) if rel[k - 1])
    aps.append(precision_sum / sum(rel))
    hardest = max(k for k in range(1, len(rel) + 1) if rel[k - 1])
    inps.append(sum(rel) / hardest)
  return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def tie_heavy_set(rng, nq, ng, num_ids=6, num_cams=3, dim=4):
  """Small integer features: many exact distance ties and duplicate items."""
  q = rng.integers(-1, 2, (nq, dim)).astype(np.float32)
  g = rng.integers(-1, 2, (ng, dim)).astype(np.float32)
  q[~q.any(1), 0] = 1.0
  g[~g.any(1), 0] = 1.0
  g[1] = g[0]  # duplicates
  q[0] = g[2]
  ids = (rng.integers(0, num_ids, nq), rng.integers(0, num_ids, ng),
         rng.integers(0, num_cams, nq), rng.integers(0, num_cams, ng))
  return q, g, ids


def assert_identical(a, b):
  np.testing.assert_array_equal(a['cmc'], b['cmc'])
  assert a['mAP'] == b['mAP']
  assert a['mINP'] == b['mINP']
  assert a['num_valid_queries'] == b['num_valid_queries']


def test_hand_worked_junk_distractors_ties():
  # Gallery: 0 pid1/cam0, 1 pid0/cam1 (distractor), 2 pid1/cam1, 3 pid2/cam0, 4 pid2/cam1,
  # 5 pid1/cam2.
  g_pids = np.array([1, 0, 1, 2, 2, 1])
  g_cams = np.array([0, 1, 1, 0, 1, 2])
  q_pids = np.array([1, 2, 3, 1])
  q_cams = np.array([0, 1, 0, 1])
  distmat = np.array([
      # q0 pid1/cam0: junk 0; order 1, 4, 2 (tie with 3, lower index first), 3, 5 -> ranks 3, 5
      [0.1, 0.2, 0.3, 0.3, 0.25, 0.5],
      # q1 pid2/cam1: junk 4; order 1, 3 (tie with 1, higher index after) -> rank 2
      [0.9, 0.4, 0.8, 0.4, 0.1, 0.7],
      # q2 pid3: no positive -> skipped
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
      # q3 pid1/cam1: junk 2; order 5, 0, 1, 3, 4 -> ranks 1, 2
      [0.3, 0.3, 0.0, 0.3, 0.6, 0.1],
  ])
  res = reid.evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=5)
  assert res['num_valid_queries'] == 3
  np.testing.assert_allclose(res['cmc'], [1 / 3, 2 / 3, 1, 1, 1])
  assert res['mAP'] == pytest.approx(((1 / 3 + 2 / 5) / 2 + 1 / 2 + 1) / 3)
  assert res['mINP'] == pytest.approx((2 / 5 + 1 / 2 + 1) / 3)
  ranks = reid.positive_ranks_from_distances(distmat, q_pids, g_pids, q_cams, g_cams)
  assert ranks.ranks.tolist() == [3, 5, 2, 1, 2]
  assert ranks.offsets.tolist() == [0, 2, 3, 3, 5]


@pytest.mark.parametrize('seed', [0, 1])
def test_direct_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  nq, ng = 9, 40
  distmat = rng.integers(0, 6, (nq, ng)).astype(np.float64)  # many ties
  ids = (rng.integers(0, 5, nq), rng.integers(0, 5, ng), rng.integers(0, 2, nq),
         rng.integers(0, 2, ng))
  res = reid.evaluate_rank(distmat, *ids, max_rank=10)
  cmc, m_ap, m_inp, valid = brute_force(distmat, *ids, max_rank=10)
  np.testing.assert_allclose(res['cmc'], cmc, rtol=0, atol=1e-12)
  assert res['mAP'] == pytest.approx(m_ap, abs=1e-12)
  assert res['mINP'] == pytest.approx(m_inp, abs=1e-12)
  assert res['num_valid_queries'] == valid
  assert isinstance(res['mAP'], float) and isinstance(res['mINP'], float)
  assert res['cmc'].shape == (10,)


def test_cmc_longer_than_gallery():
  distmat = np.array([[0.3, 0.1, 0.2]])
  res = reid.evaluate_rank(distmat, [1], [1, 2, 3], [0], [1, 1, 1], max_rank=6)
  np.testing.assert_allclose(res['cmc'], [0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize('chunk_size,slots', [(8, None), (16, 2), (None, 1)])
def test_chunked_identical_to_direct_with_ties(chunk_size, slots):
  rng = np.random.default_rng(3)
  q, g, ids = tie_heavy_set(rng, 21, 83)
  for method in ranking.methods():
    dist = reid.cosine_distance(q, g, chunk_size, method=method)
    assert len(np.unique(dist)) < dist.size // 4  # the case is full of ties
    want = reid.positive_ranks_from_distances(dist, *ids)
    direct = reid.metrics_from_ranks(want, 20)
    got = ranking.positive_ranks(q, g, *ids, chunk_size=chunk_size, method=method,
                                 positive_slots=slots)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.ranks, want.ranks)
    assert_identical(reid.evaluate_rank_from_features(q, g, *ids, max_rank=20,
                                                      chunk_size=chunk_size, method=method),
                     direct)
    assert_identical(reid.evaluate_rank(dist, *ids, max_rank=20, method=method), direct)
    cmc, m_ap, m_inp, _ = brute_force(dist, *ids, max_rank=20)
    assert direct['mAP'] == pytest.approx(m_ap, abs=1e-12)
    np.testing.assert_allclose(direct['cmc'], cmc, atol=1e-12)


def random_protocol_case(rng, nq, ng, values=6, num_ids=5, num_cams=3):
  """A distance matrix full of ties (and -0.0, inf), distractors (pid 0), junk, and queries
  without positives (pids absent from the gallery)."""
  dist = rng.integers(0, values, (nq, ng)).astype(np.float32) / 4
  dist[rng.random((nq, ng)) < 0.05] = -0.0
  dist[rng.random((nq, ng)) < 0.02] = np.inf
  g_pids = rng.integers(0, num_ids, ng)  # pid 0: distractors
  q_pids = rng.integers(1, num_ids + 2, nq)  # num_ids, num_ids + 1: never in the gallery
  return dist, (q_pids, g_pids, rng.integers(0, num_cams, nq), rng.integers(0, num_cams, ng))


@pytest.mark.parametrize('method', ranking.methods())
def test_every_method_matches_brute_force_from_distances(method):
  rng = np.random.default_rng(11)
  dist, ids = random_protocol_case(rng, 150, 60)  # > 2 host tasks of 64 queries
  assert not np.all(np.isin(ids[0], ids[1]))  # some queries have no positive
  want = reid.positive_ranks_from_distances(dist, *ids)
  got = ranking.ranks_from_distances(dist, *ids, method=method, chunk_size=64)
  np.testing.assert_array_equal(got.offsets, want.offsets)
  np.testing.assert_array_equal(got.ranks, want.ranks)
  res = reid.evaluate_rank(dist, *ids, max_rank=10, method=method)
  cmc, m_ap, m_inp, valid = brute_force(dist, *ids, max_rank=10)
  assert 0 < res['num_valid_queries'] == valid < 150
  np.testing.assert_allclose(res['cmc'], cmc, rtol=0, atol=1e-12)
  assert res['mAP'] == pytest.approx(m_ap, abs=1e-12)
  assert res['mINP'] == pytest.approx(m_inp, abs=1e-12)


def test_host_method_any_dtype_and_first_only():
  rng = np.random.default_rng(12)
  dist, ids = random_protocol_case(rng, 40, 90, values=1000)
  dist64 = dist.astype(np.float64)
  dist64[np.isfinite(dist64)] += rng.integers(0, 3, np.isfinite(dist64).sum()) * 1e-12
  want = reid.positive_ranks_from_distances(dist64, *ids)
  for method in ('auto', 'host'):  # float64 that float32 cannot hold: ranked on the host
    got = ranking.ranks_from_distances(dist64, *ids, method=method)
    np.testing.assert_array_equal(got.ranks, want.ranks)
  with pytest.raises(ValueError, match="use method='host'"):
    ranking.ranks_from_distances(dist64, *ids, method='reduce')
  ints = rng.integers(-3, 4, dist.shape)
  np.testing.assert_array_equal(ranking.ranks_from_distances(ints, *ids).ranks,
                                reid.positive_ranks_from_distances(ints, *ids).ranks)
  # first_only: the rank of each query's nearest positive only, for every method.
  q, g, fids = tie_heavy_set(rng, 30, 70)
  for method in ranking.methods():
    full = ranking.positive_ranks(q, g, *fids, method=method, chunk_size=8)
    first = ranking.positive_ranks(q, g, *fids, method=method, chunk_size=8, first_only=True)
    has = full.num_positives > 0
    np.testing.assert_array_equal(first.num_positives, has.astype(int))
    np.testing.assert_array_equal(first.ranks, full.ranks[full.offsets[:-1][has]])


def test_method_selection():
  assert ranking.default_method('cpu') == 'host'
  assert ranking.default_method('gpu') == ranking.default_method('tpu') == 'reduce'
  assert ranking.resolve_method('auto') == ranking.resolve_method(None) == ranking.default_method()
  assert ranking.resolve_method('reduce') == 'reduce' and ranking.methods() == ('host', 'reduce')
  with pytest.raises(ValueError, match="method must be 'auto' or one of"):
    ranking.resolve_method('sort')
  with pytest.raises(ValueError, match='method must be'):
    reid.evaluate_rank(np.zeros((1, 2)), [1], [1, 1], [0], [1, 1], method='gpu')
  # Balanced chunks: Market's 3,368 queries in 4 chunks of 848, not 1024 + ... + 296.
  assert ranking.default_chunk_size(15_913) == 1024
  assert ranking.default_chunk_size(15_913, 3_368) == 848
  assert ranking.default_chunk_size(15_913, 100) == 104


def test_chunked_random_features_many_positives():
  # Continuous features; few ids so queries have many positives (overflow blocks in use).
  rng = np.random.default_rng(4)
  q = rng.standard_normal((30, 16)).astype(np.float32)
  g = rng.standard_normal((200, 16)).astype(np.float32)
  ids = (rng.integers(0, 3, 30), rng.integers(0, 3, 200), rng.integers(0, 4, 30),
         rng.integers(0, 4, 200))
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  for method in ranking.methods():
    dist = reid.cosine_distance(q, g, 16, method=method)
    direct = reid.evaluate_rank(dist, *ids)
    assert_identical(reid.evaluate_rank_from_features(q, g, *ids, chunk_size=16, method=method),
                     direct)
    # The cosine distance itself: 1 - cos of the raw features.
    np.testing.assert_allclose(dist, 1 - qn @ gn.T, atol=1e-5)


def test_negative_zero_and_duplicate_distances():
  # q0 == g0 == g1 give distance exactly 0 (a tie broken by index); g2 is opposite (2.0).
  q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  g = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], np.float32)
  ids = (np.array([5, 5]), np.array([7, 5, 5, 5]), np.array([0, 1]), np.array([1, 1, 1, 0]))
  for method in ranking.methods():
    dist = reid.cosine_distance(q, g, method=method)
    assert dist[0, 0] == 0 and dist[0, 1] == 0
    direct = reid.evaluate_rank(dist, *ids, method=method)
    assert_identical(reid.evaluate_rank_from_features(q, g, *ids, method=method), direct)
    # q0: order g0 (pid 7), g1 (positive), g3 (positive, distance 1), g2 -> ranks 2, 3.
    assert reid.positive_ranks_from_distances(dist, *ids).ranks[:2].tolist() == [2, 3]


def test_errors_are_clear():
  d = np.zeros((2, 3))
  with pytest.raises(ValueError, match='g_pids has 2 entries, expected 3'):
    reid.evaluate_rank(d, [1, 2], [1, 2], [0, 0], [1, 1, 1])
  with pytest.raises(ValueError, match='no valid query'):
    reid.evaluate_rank(d, [1, 2], [3, 4, 5], [0, 0], [1, 1, 1])
  with pytest.raises(ValueError, match='NaN'):
    reid.evaluate_rank(np.full((1, 1), np.nan), [1], [1], [0], [1])
  with pytest.raises(ValueError, match='2-D'):
    reid.evaluate_rank(np.zeros(3), [1], [1, 1, 1], [0], [1, 1, 1])
  with pytest.raises(ValueError, match='max_rank'):
    reid.evaluate_rank(d, [1, 2], [1, 2, 2], [0, 0], [1, 1, 1], max_rank=0)
  with pytest.raises(ValueError, match='all-zero rows'):
    reid.evaluate_rank_from_features(np.zeros((1, 4)), np.ones((2, 4)), [1], [1, 1], [0], [1, 1])
  with pytest.raises(ValueError, match='dim 4 but gallery features 3'):
    reid.evaluate_rank_from_features(np.ones((1, 4)), np.ones((2, 3)), [1], [1, 1], [0], [1, 1])


def test_chunk_sizes_fit_the_large_sets_in_24_gib():
  for num_q, num_g in [(11_659, 82_161), (10_000, 128_517), (60_502, 60_502)]:
    chunk = ranking.default_chunk_size(num_g)
    assert 8 <= chunk <= 1024 and chunk % 8 == 0
    assert chunk * num_g <= 2**25
    assert ranking.estimate_peak_bytes(num_q, num_g, 1024) < 4 * GIB
    assert num_q * num_g * 4 > 3 * GIB  # what the full float32 matrix alone would take
  assert ranking.default_chunk_size(100) == 1024


def test_no_query_by_gallery_matrix_on_the_host():
  rng = np.random.default_rng(5)
  nq, ng, chunk, method = 800, 12_000, 16, 'host'
  q = rng.standard_normal((nq, 8)).astype(np.float32)
  g = rng.standard_normal((ng, 8)).astype(np.float32)
  ids = (np.arange(nq), np.arange(ng) % 3000, np.zeros(nq), np.ones(ng))
  tracemalloc.start()
  res = reid.evaluate_rank_from_features(q, g, *ids, chunk_size=chunk, method=method)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert res['num_valid_queries'] == nq
  assert peak < 0.1 * nq * ng * 4
  assert peak < 3 * chunk * ng * 4 + 2 * (nq + ng) * 8 * 4  # a few chunks and the features


def test_vehicleid_draws_and_determinism():
  rng = np.random.default_rng(6)
  pids = np.repeat(np.arange(12), rng.integers(2, 6, 12))
  feats = rng.standard_normal((len(pids), 8)).astype(np.float32) + 2 * np.eye(12, 8)[pids % 8]
  a = vehicleid.evaluate_vehicleid(feats, pids, repeats=3, seed=1)
  b = vehicleid.evaluate_vehicleid(feats, pids, repeats=3, seed=1)
  assert a['per_repeat'] == b['per_repeat']
  np.testing.assert_array_equal(a['cmc'], b['cmc'])
  assert a['num_gallery'] == 12 and a['num_queries'] == len(pids) - 12
  for r in range(3):
    query, gallery = vehicleid.draw_gallery(pids, np.random.default_rng(1 + r))
    assert sorted(pids[gallery].tolist()) == list(range(12))
    assert sorted(np.concatenate([query, gallery]).tolist()) == list(range(len(pids)))
    dist = reid.cosine_distance(feats[query], feats[gallery])
    want = reid.evaluate_rank(dist, pids[query], pids[gallery], np.zeros(len(query)),
                              np.ones(len(gallery)))
    assert a['per_repeat'][r] == {'rank1': want['cmc'][0], 'rank5': want['cmc'][4],
                                  'mAP': want['mAP'], 'mINP': want['mINP']}
  rank1 = [p['rank1'] for p in a['per_repeat']]
  assert a['rank1'] == pytest.approx(np.mean(rank1))
  assert a['rank1_std'] == pytest.approx(np.std(rank1))
  draws = {tuple(vehicleid.draw_gallery(pids, np.random.default_rng(s))[1]) for s in range(5)}
  assert len(draws) > 1  # different seeds draw different galleries
  with pytest.raises(ValueError, match='single image'):
    vehicleid.evaluate_vehicleid(feats[:5], np.arange(5))
