"""Operating thresholds (FAR 1e-2 / 1e-3 / 1e-4) against a brute-force count of impostor pairs."""

import math

import numpy as np
import pytest

from ufo_jax.evaluation import thresholds


def check_against_brute_force(points, impostors, genuine, tol=0.0):
  """Each threshold accepts at most floor(FAR N) impostors, and no lower one would.

  ``tol``: how far the brute force's cosines may be from the ones the code computed. A matmul of
  a 7-query chunk and one of all queries may round the last bit differently (which depends on
  the CPU's BLAS kernels), so a pair within ``tol`` of the threshold may count on either side.
  Exactly representable cosines (``exact``) are checked with no tolerance.
  """
  n = len(impostors)
  assert points['impostor_pairs'] == n and points['genuine_pairs'] == len(genuine)
  for far in thresholds.FARS:
    p = points[thresholds.far_key(far)]
    t, m = p['threshold'], math.floor(far * n * (1 + 1e-12))
    above_hi, above_lo = int(np.sum(impostors > t + tol)), int(np.sum(impostors > t - tol))
    assert above_hi <= m < int(np.sum(impostors >= t - tol)), (far, t, above_hi, m)
    assert above_hi <= p['accepted_impostors'] <= above_lo
    assert p['far_measured'] == p['accepted_impostors'] / n
    assert np.mean(genuine > t + tol) <= p['tar'] <= np.mean(genuine > t - tol)
    if tol == 0:
      assert p['accepted_impostors'] == above_hi and p['tar'] == np.mean(genuine > t)


def reid_like(rng, nq, ng, dim, exact=False):
  ids = (rng.integers(0, 12, nq), rng.integers(0, 12, ng), rng.integers(0, 3, nq),
         rng.integers(0, 3, ng))
  if exact:  # four entries of +-1 per row: cosines are exact multiples of 1/4, full of ties
    def rows(n):
      x = np.zeros((n, dim), np.float32)
      for r in range(n):
        x[r, rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
      return x
    return rows(nq), rows(ng), ids
  return (rng.normal(size=(nq, dim)).astype(np.float32),
          rng.normal(size=(ng, dim)).astype(np.float32), ids)


@pytest.mark.parametrize('exact', [False, True])
def test_pair_thresholds_equal_a_brute_force_count(exact, monkeypatch):
  rng = np.random.default_rng(0)
  q, g, (qi, gi, qc, gc) = reid_like(rng, 30, 200, 16, exact)
  # Brute force: every pair's float32 cosine, classified by the re-id rules.
  s = thresholds._normalized(q, 'q') @ thresholds._normalized(g, 'g').T
  same = qi[:, None] == gi[None, :]
  junk = same & (qc[:, None] == gc[None, :])
  impostors, genuine = s[~same], s[same & ~junk]
  assert len(impostors) * 1e-4 < 1 < len(impostors) * 1e-2  # 1e-4: the largest impostor
  tol = 0.0 if exact else 1e-6  # float32 cosines of |x| ~ 1: a few ulps
  whole = thresholds.pair_operating_points(q, g, qi, gi, qc, gc, method='host')
  check_against_brute_force(whole, impostors, genuine, tol)
  assert whole['far1e-4']['threshold'] == impostors.max()
  # In chunks of 7 queries, keeping only what can still count (no slack: compacted often).
  monkeypatch.setattr(thresholds, '_SLACK', 0)
  chunked = thresholds.pair_operating_points(q, g, qi, gi, qc, gc, chunk_size=7, method='host')
  if exact:
    assert chunked == whole
  check_against_brute_force(chunked, impostors, genuine, tol)
  if exact:  # the device path (GPU / TPU default) computes the same exact cosines
    assert thresholds.pair_operating_points(q, g, qi, gi, qc, gc, chunk_size=7,
                                            method='reduce') == whole
  if exact:  # ties at the threshold: strictly fewer accepted than FAR allows
    assert any(p['far_measured'] < p['far'] for k, p in whole.items() if k.startswith('far'))


def test_all_pairs_of_one_set_and_verification_pairs():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(90, 8)).astype(np.float32)
  labels = rng.integers(0, 9, 90)
  own = np.arange(90)
  points = thresholds.pair_operating_points(x, x, labels, labels, own, own, method='host')
  s = thresholds._normalized(x, 'x') @ thresholds._normalized(x, 'x').T
  same = labels[:, None] == labels[None, :]
  off = ~np.eye(90, dtype=bool)
  check_against_brute_force(points, s[~same], s[same & off])  # self pairs left out
  e1, e2 = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
  is_same = rng.random(400) < 0.5
  e2[is_same] = e1[is_same] + 0.3 * e2[is_same]
  pts = thresholds.verification_operating_points(e1, e2, is_same)
  cos = thresholds.pair_cosines(e1, e2)
  check_against_brute_force(pts, cos[~is_same], cos[is_same])
  assert pts['far1e-2']['tar'] > 0.5  # similar genuine pairs are accepted


def test_keys_scalars_and_errors():
  assert [thresholds.far_key(f) for f in thresholds.FARS] == ['far1e-2', 'far1e-3', 'far1e-4']
  assert thresholds.parse_far('far1e-3') == 1e-3 and thresholds.parse_far('0.4') is None
  pts = thresholds.operating_points(np.array([0.1, 0.5, 0.3]), 3, np.array([0.6, 0.2]))
  assert pts['far1e-2']['threshold'] == np.float32(0.5) and pts['far1e-2']['tar'] == 0.5
  assert thresholds.scalars(pts)['tar@far1e-3'] == 0.5
  assert thresholds.scalars(pts)['threshold@far1e-3'] == pytest.approx(0.5)
  with pytest.raises(ValueError, match='impostor scores kept'):
    thresholds.operating_points(np.array([0.1]), 1000, np.array([0.5]))
