"""Face verification protocol (docs/EVALUATION.md; the insightface ``verification.py`` protocol).

Embeddings are L2-normalised; the distance of a pair is the squared L2 distance (in [0, 4]).
The pairs are split into ``nfolds`` contiguous folds (scikit-learn ``KFold(shuffle=False)``: the
first ``n % nfolds`` folds hold one pair more). For each fold, the threshold of
``np.arange(0, 4, 0.01)`` with the best accuracy on the other folds (the first maximum) predicts
``dist < threshold`` on the fold. The result is the mean (and std) of the fold accuracies, the
mean of the chosen thresholds, and the ROC (TPR / FPR per threshold, averaged over the test
folds) for figures.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.arange(0, 4, 0.01)


def kfold_slices(n: int, nfolds: int) -> list[slice]:
  """Contiguous folds as scikit-learn ``KFold(n_splits=nfolds, shuffle=False)`` makes them."""
  if nfolds < 2:
    raise ValueError(f'nfolds must be at least 2, got {nfolds}')
  if n < nfolds:
    raise ValueError(f'{n} pairs cannot be split into {nfolds} folds')
  sizes = np.full(nfolds, n // nfolds)
  sizes[:n % nfolds] += 1
  ends = np.cumsum(sizes)
  return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def _normalize(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'{name} must be 2-D (pairs, dim), got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} holds NaN or infinite values')
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError(f'{name} has all-zero rows (first: {int(np.argmax(norm[:, 0] == 0))})')
  return x / norm


def squared_distances(embeddings1, embeddings2) -> np.ndarray:
  """Squared L2 distances of the L2-normalised pairs, ``(n,)`` float64."""
  e1 = _normalize(embeddings1, 'embeddings1')
  e2 = _normalize(embeddings2, 'embeddings2')
  if e1.shape != e2.shape:
    raise ValueError(f'embeddings1 {e1.shape} and embeddings2 {e2.shape} must have equal shapes')
  return np.sum(np.square(e1 - e2), axis=1)


def verification_accuracy(embeddings1, embeddings2, is_same, nfolds: int = 10) -> dict:
  """10-fold verification accuracy of embedding pairs.

  Args:
    embeddings1, embeddings2: ``(n, D)`` embeddings of the two images of each pair (for an
      insightface ``.bin`` set: rows ``[0::2]`` and ``[1::2]``).
    is_same: ``(n,)`` booleans, True where the pair shows one person.
    nfolds: number of contiguous folds.

  Returns:
    ``accuracy`` (mean over folds, fraction), ``accuracy_std``, ``threshold`` (mean chosen
    threshold), ``fold_accuracy`` and ``fold_threshold`` (per fold), ``thresholds``, and the ROC
    ``tpr`` / ``fpr`` (per threshold, mean over the test folds).
  """
  dist = squared_distances(embeddings1, embeddings2)
  same = np.asarray(is_same)
  if same.shape != dist.shape:
    raise ValueError(f'is_same has shape {same.shape}, expected ({len(dist)},)')
  if same.dtype != np.bool_:
    if not np.all(np.isin(same, (0, 1))):
      raise ValueError('is_same must hold booleans (or 0/1)')
    same = same.astype(bool)
  folds = kfold_slices(len(dist), nfolds)
  # predict[t, i] = dist_i < threshold_t; per fold counts of TP and TN for every threshold.
  predict = dist[None, :] < THRESHOLDS[:, None]
  tp = np.stack([np.sum(predict[:, f] & same[f], axis=1) for f in folds])  # (folds, T)
  tn = np.stack([np.sum(~predict[:, f] & ~same[f], axis=1) for f in folds])
  pos = np.asarray([np.sum(same[f]) for f in folds])
  size = np.asarray([f.stop - f.start for f in folds])
  neg = size - pos
  accuracy = np.zeros(nfolds)
  best = np.zeros(nfolds, np.int64)
  for k in range(nfolds):
    train_correct = (tp.sum(0) - tp[k]) + (tn.sum(0) - tn[k])
    best[k] = np.argmax(train_correct / (size.sum() - size[k]))  # first maximum
    accuracy[k] = (tp[k, best[k]] + tn[k, best[k]]) / size[k]
  with np.errstate(invalid='ignore', divide='ignore'):
    tpr = np.where(pos[:, None] > 0, tp / pos[:, None], 0.0)
    fpr = np.where(neg[:, None] > 0, (neg[:, None] - tn) / neg[:, None], 0.0)
  return {
      'accuracy': float(np.mean(accuracy)),
      'accuracy_std': float(np.std(accuracy)),
      'threshold': float(np.mean(THRESHOLDS[best])),
      'fold_accuracy': accuracy,
      'fold_threshold': THRESHOLDS[best],
      'thresholds': THRESHOLDS.copy(),
      'tpr': tpr.mean(axis=0),
      'fpr': fpr.mean(axis=0),
  }
