"""Tests of the face verification protocol against the insightface procedure written out."""

import numpy as np
import pytest

from ufo_jax.evaluation import face


def insightface_reference(e1, e2, same, nfolds=10):
  """insightface verification.calculate_roc, loop for loop (without scikit-learn)."""
  e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
  e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
  dist = np.sum(np.square(e1 - e2), 1)
  thresholds = np.arange(0, 4, 0.01)
  folds = np.array_split(np.arange(len(dist)), nfolds)  # = KFold(shuffle=False)

  def calculate_accuracy(threshold, d, actual):
    predict = np.less(d, threshold)
    tp = np.sum(np.logical_and(predict, actual))
    fp = np.sum(np.logical_and(predict, np.logical_not(actual)))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual)))
    fn = np.sum(np.logical_and(np.logical_not(predict), actual))
    tpr = 0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / d.size

  accuracy, best, tprs, fprs = [], [], [], []
  for test in folds:
    train = np.setdiff1d(np.arange(len(dist)), test)
    acc_train = [calculate_accuracy(t, dist[train], same[train])[2] for t in thresholds]
    b = int(np.argmax(acc_train))
    roc = [calculate_accuracy(t, dist[test], same[test]) for t in thresholds]
    tprs.append([r[0] for r in roc])
    fprs.append([r[1] for r in roc])
    accuracy.append(calculate_accuracy(thresholds[b], dist[test], same[test])[2])
    best.append(thresholds[b])
  return (np.array(accuracy), np.array(best), np.mean(tprs, 0), np.mean(fprs, 0))


def pairs_at(dist_same, dist_diff, same, dim=8):
  """Unit pairs with the given squared distances: e2 = cos(t) e1 + sin(t) u, 2 - 2 cos(t) = d."""
  n = len(same)
  e1 = np.zeros((n, dim))
  e1[:, 0] = 1.0
  d = np.where(same, dist_same, dist_diff)
  cos = 1 - d / 2
  e2 = np.zeros((n, dim))
  e2[:, 0] = cos
  e2[:, 1] = np.sqrt(1 - cos**2)
  return e1, e2


def test_kfold_slices_are_sklearn_kfold():
  for n, k in [(6000, 10), (7000, 10), (23, 10), (10, 10), (11, 3)]:
    want = [(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(n), k)]
    assert [(s.start, s.stop) for s in face.kfold_slices(n, k)] == want
  with pytest.raises(ValueError, match='cannot be split'):
    face.kfold_slices(5, 10)


def test_known_threshold_on_separable_pairs():
  same = np.arange(200) % 2 == 0
  e1, e2 = pairs_at(0.333, 1.5, same)
  res = face.verification_accuracy(e1, e2, same)
  assert res['accuracy'] == 1.0 and res['accuracy_std'] == 0.0
  # The first threshold above 0.333 (0.34) already separates: the first maximum is chosen.
  assert res['threshold'] == pytest.approx(0.34)
  np.testing.assert_allclose(res['fold_threshold'], 0.34)
  # The scale of the embeddings does not matter (they are L2-normalised).
  res2 = face.verification_accuracy(3 * e1, 0.5 * e2, same.astype(int))
  assert res2['accuracy'] == 1.0 and res2['threshold'] == res['threshold']


def test_known_threshold_with_errors():
  # Same pairs at 0.505, different at 1.2, except 10 different pairs (one per fold) at 0.2: no
  # threshold fixes them; the best is the first above 0.505 and every fold loses one pair in 20.
  n = 200
  same = np.arange(n) % 2 == 0
  d_diff = np.full(n, 1.2)
  d_diff[1::20] = 0.2
  e1, e2 = pairs_at(0.505, d_diff, same)
  res = face.verification_accuracy(e1, e2, same)
  assert res['accuracy'] == pytest.approx(0.95)
  assert res['threshold'] == pytest.approx(0.51)


@pytest.mark.parametrize('n,seed', [(600, 0), (317, 1)])
def test_matches_insightface_procedure(n, seed):
  rng = np.random.default_rng(seed)
  same = rng.random(n) < 0.5
  e1 = rng.standard_normal((n, 16))
  e2 = np.where(same[:, None], e1 + 0.9 * rng.standard_normal((n, 16)),
                rng.standard_normal((n, 16)))
  res = face.verification_accuracy(e1, e2, same)
  accuracy, best, tpr, fpr = insightface_reference(e1, e2, same)
  assert 0.6 < res['accuracy'] < 1.0  # an informative, imperfect case
  np.testing.assert_allclose(res['fold_accuracy'], accuracy, rtol=0, atol=1e-12)
  assert res['accuracy'] == pytest.approx(np.mean(accuracy), abs=1e-12)
  assert res['accuracy_std'] == pytest.approx(np.std(accuracy), abs=1e-12)
  np.testing.assert_array_equal(res['fold_threshold'], best)
  assert res['threshold'] == pytest.approx(np.mean(best))
  np.testing.assert_allclose(res['tpr'], tpr, atol=1e-12)
  np.testing.assert_allclose(res['fpr'], fpr, atol=1e-12)
  assert res['tpr'].shape == res['fpr'].shape == (400,)


def test_errors_are_clear():
  e = np.ones((20, 4))
  with pytest.raises(ValueError, match='is_same has shape'):
    face.verification_accuracy(e, e, np.ones(19, bool))
  with pytest.raises(ValueError, match='equal shapes'):
    face.verification_accuracy(e, np.ones((20, 5)), np.ones(20, bool))
  with pytest.raises(ValueError, match='all-zero rows'):
    face.verification_accuracy(np.zeros((20, 4)), e, np.ones(20, bool))
  with pytest.raises(ValueError, match='booleans'):
    face.verification_accuracy(e, e, np.full(20, 2))
