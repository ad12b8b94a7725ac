"""VehicleID protocol (docs/EVALUATION.md): random one-image-per-identity galleries, repeated.

For repeat ``r`` a generator ``np.random.default_rng(seed + r)`` draws one image of every
identity (uniformly) into the gallery; all other images are queries. There is no camera
removal (every query gets a camera different from every gallery item). The re-id metrics
(``reid``) of each draw are averaged over the repeats, with their standard deviation. The
reference code drew one unseeded split; the seeded repeats make the number reproducible.
"""

from __future__ import annotations

import numpy as np

from ufo_jax.evaluation import ranking, reid

_QUERY_CAMERA, _GALLERY_CAMERA = 0, 1


def draw_gallery(pids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """``(query_indices, gallery_indices)``, ascending: one random image per identity in gallery."""
  order = rng.permutation(len(pids))
  _, first = np.unique(pids[order], return_index=True)
  gallery = np.sort(order[first])
  is_gallery = np.zeros(len(pids), bool)
  is_gallery[gallery] = True
  return np.flatnonzero(~is_gallery), gallery


def evaluate_vehicleid(features, pids, *, repeats: int = 10, seed: int = 0,
                       max_rank: int = 50, method: str = 'auto') -> dict:
  """Mean and spread of rank-1, rank-5, mAP and mINP over ``repeats`` seeded gallery draws.

  Args:
    features: ``(n, D)`` features of the test list (cosine distance).
    pids: ``(n,)`` vehicle ids.
    repeats: number of gallery draws.
    seed: repeat ``r`` uses ``np.random.default_rng(seed + r)``.
    max_rank: length of the CMC curve (at least 5).
    method: as ``reid.evaluate_rank_from_features``.

  Returns:
    ``rank1``, ``rank5``, ``mAP``, ``mINP`` (means over repeats, fractions), the same with a
    ``_std`` suffix, ``cmc`` (mean curve), ``per_repeat`` (list of dicts), ``num_queries`` and
    ``num_gallery`` (of one draw).
  """
  if int(repeats) != repeats or repeats < 1:
    raise ValueError(f'repeats must be a positive integer, got {repeats!r}')
  if int(max_rank) != max_rank or max_rank < 5:
    raise ValueError(f'max_rank must be an integer >= 5 (rank-5 is reported), got {max_rank!r}')
  features = ranking.check_features(features, 'features')
  pids = ranking.as_ids(pids, 'pids', features.shape[0])
  if len(np.unique(pids)) == len(pids):
    raise ValueError('every identity has a single image: no query is left after the gallery '
                     'draw (VehicleID needs identities with several images)')
  per_repeat, curves = [], []
  for r in range(int(repeats)):
    query, gallery = draw_gallery(pids, np.random.default_rng(seed + r))
    res = reid.evaluate_rank_from_features(
        features[query], features[gallery], pids[query], pids[gallery],
        np.full(len(query), _QUERY_CAMERA), np.full(len(gallery), _GALLERY_CAMERA),
        max_rank=max_rank, method=method)
    curves.append(res['cmc'])
    per_repeat.append({'rank1': float(res['cmc'][0]), 'rank5': float(res['cmc'][4]),
                       'mAP': res['mAP'], 'mINP': res['mINP']})
  out: dict = {}
  for key in ('rank1', 'rank5', 'mAP', 'mINP'):
    values = np.asarray([p[key] for p in per_repeat])
    out[key] = float(values.mean())
    out[f'{key}_std'] = float(values.std())
  out['cmc'] = np.mean(curves, axis=0)
  out['per_repeat'] = per_repeat
  out['num_queries'] = int(len(query))
  out['num_gallery'] = int(len(gallery))
  return out
