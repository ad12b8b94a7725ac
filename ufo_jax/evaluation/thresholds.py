"""Operating thresholds: the cosine above which a match is accepted, at a chosen false-accept rate.

    points = pair_operating_points(q, g, q_ids, g_ids, q_cams, g_cams)   # re-id, retrieval
    points = operating_points(impostor_scores, len(impostor_scores), genuine_scores)  # pairs
    points['far1e-3'] == {'far': 1e-3, 'threshold': t, 'tar': ..., 'far_measured': ...,
                          'accepted_impostors': n}

A pair is **accepted** when its cosine similarity is strictly above the threshold. Impostor
pairs show different identities (classes); genuine pairs the same identity. Which pairs count
is the protocol's (docs/EVALUATION.md, "Operating thresholds"): the verification pairs of a face
set; every query-gallery pair of a re-id set (same identity and camera: neither, as the re-id
protocol removes them); every ordered pair of distinct items of SOP and VehicleID (each item
querying all the others).

For N impostor pairs and a target FAR f, the threshold is the (m + 1)-th largest impostor
cosine, m = floor(f N): at most m impostors (a fraction <= f) lie strictly above it, and no
lower threshold has that property (the (m + 1)-th itself would be accepted). ``far_measured``
is the fraction actually above it (below f where scores tie); ``tar`` the fraction of genuine
pairs above it. With fewer than 1 / f impostor pairs (m = 0) the threshold is the largest
impostor score: FAR 0 on this set, a bound rather than a measurement.

All Q x G cosines are computed in query chunks (numpy BLAS on CPU, the device's matmul on GPU /
TPU) and never held at once: only the impostor scores that can still be among the top
floor(f_max N) + 1 are kept (a bound that rises as chunks come), and the genuine scores.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ufo_jax.evaluation import ranking

FARS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
# Query rows per chunk aim at this many scores (2**25 float32: 128 MiB).
_CHUNK_ELEMENTS = 2**25
# Kept impostor scores may exceed twice the needed number by this much before a compaction.
_SLACK = 1 << 20


def far_key(far: float) -> str:
  """``'far1e-3'`` for 1e-3: the key of a FAR in reports, model.json and ``search --threshold``."""
  mantissa, exponent = f'{far:.0e}'.split('e')
  return f'far{mantissa}e-{int(exponent[1:])}' if exponent.startswith('-') else f'far{far:g}'


def _accepted_limit(far: float, num_impostors: int) -> int:
  """m = floor(far * N), robust to the rounding of far * N (1e-3 * 3000 is 3, not 2.999...)."""
  return int(math.floor(far * num_impostors * (1 + 1e-12)))


class _TopScores:
  """Keeps every value that can still be among the ``keep`` largest of a stream."""

  def __init__(self, keep: int):
    self.keep = int(keep)
    self.bound = -np.inf  # values below it can no longer be among the largest `keep`
    self._parts: list[np.ndarray] = []
    self._size = 0

  def add(self, values: np.ndarray) -> None:
    values = values[values >= self.bound] if np.isfinite(self.bound) else values
    if values.size:
      self._parts.append(np.asarray(values, np.float32))
      self._size += values.size
    if self._size > 2 * self.keep + _SLACK:
      self._compact()

  def _compact(self) -> None:
    values = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
    if values.size > self.keep:
      kth = np.partition(values, values.size - self.keep)[values.size - self.keep]
      values = values[values >= kth]  # ties with the k-th are kept: exact counts later
      self.bound = max(self.bound, float(kth))
    self._parts, self._size = [values], values.size

  def values(self) -> np.ndarray:
    self._compact()
    return self._parts[0]


def operating_points(impostors: np.ndarray, num_impostors: int, genuine: np.ndarray,
                     fars: Sequence[float] = FARS) -> dict[str, Any]:
  """Thresholds, TAR and measured FAR at each target FAR.

  Args:
    impostors: impostor cosines: all of them, or at least every one that can be among the
      floor(max(fars) * num_impostors) + 1 largest (ties included).
    num_impostors: the number of impostor pairs N.
    genuine: every genuine cosine.
    fars: the target false-accept rates.

  Returns:
    ``{'impostor_pairs': N, 'genuine_pairs': P, far_key(f): {'far', 'threshold', 'tar',
    'far_measured', 'accepted_impostors'}}``; without impostor (or genuine) pairs the values
    that need them are None.
  """
  top = np.sort(np.asarray(impostors, np.float32))[::-1]
  genuine = np.sort(np.asarray(genuine, np.float32))
  out: dict[str, Any] = {'impostor_pairs': int(num_impostors), 'genuine_pairs': int(genuine.size)}
  for far in fars:
    point: dict[str, Any] = {'far': float(far), 'threshold': None, 'tar': None,
                             'far_measured': None, 'accepted_impostors': None}
    if num_impostors > 0:
      m = _accepted_limit(far, num_impostors)
      if m >= top.size:
        raise ValueError(f'operating_points: {top.size} impostor scores kept, the FAR {far} '
                         f'threshold needs the {m + 1} largest of {num_impostors}')
      t = top[m]
      accepted = int(np.searchsorted(-top, -t, side='left'))  # impostors strictly above t
      point.update(threshold=float(t), accepted_impostors=accepted,
                   far_measured=accepted / num_impostors)
      if genuine.size:
        above = genuine.size - int(np.searchsorted(genuine, t, side='right'))
        point['tar'] = above / genuine.size
    out[far_key(far)] = point
  return out


def _normalized(x, what: str) -> np.ndarray:
  x = ranking.check_features(x, what)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def pair_cosines(embeddings1, embeddings2) -> np.ndarray:
  """float32 cosines of row pairs (L2-normalised first)."""
  a = _normalized(embeddings1, 'embeddings1')
  b = _normalized(embeddings2, 'embeddings2')
  if a.shape != b.shape:
    raise ValueError(f'embeddings1 {a.shape} and embeddings2 {b.shape} must have equal shapes')
  return np.einsum('ij,ij->i', a, b)


def verification_operating_points(embeddings1, embeddings2, is_same,
                                  fars: Sequence[float] = FARS) -> dict[str, Any]:
  """Operating points over verification pairs: ``is_same`` False are the impostors."""
  cos = pair_cosines(embeddings1, embeddings2)
  same = np.asarray(is_same, bool)
  if same.shape != cos.shape:
    raise ValueError(f'is_same has shape {same.shape}, expected ({len(cos)},)')
  return operating_points(cos[~same], int((~same).sum()), cos[same], fars)


@jax.jit
def _device_scores(q: jax.Array, g: jax.Array) -> jax.Array:
  return jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST)


def pair_operating_points(q_feats, g_feats, q_ids, g_ids, q_cams, g_cams, *,
                          fars: Sequence[float] = FARS, chunk_size: int | None = None,
                          method: str | None = None) -> dict[str, Any]:
  """Operating points over every query-gallery pair.

  A pair with different ids is an impostor; the same id and another camera, genuine; the same
  id and camera, neither (the re-id junk; pass ``q_cams = g_cams = arange(n)`` with the same
  items as query and gallery to leave out only each item against itself).

  Args:
    q_feats, g_feats: ``(Q, D)`` and ``(G, D)`` features (L2-normalised here).
    q_ids, g_ids, q_cams, g_cams: integer ids and cameras.
    fars: target false-accept rates.
    chunk_size: queries per chunk (default: about 2**25 scores per chunk).
    method: ``'host'`` (numpy BLAS), a device method (the JAX default device), or
      ``None`` / ``'auto'``: ``ranking.default_method()``.
  """
  q = _normalized(q_feats, 'query features')
  g = _normalized(g_feats, 'gallery features')
  if q.shape[1] != g.shape[1]:
    raise ValueError(f'query features have dim {q.shape[1]} but gallery features {g.shape[1]}')
  num_q, num_g = q.shape[0], g.shape[0]
  q_ids, g_ids = ranking.as_ids(q_ids, 'q_ids', num_q), ranking.as_ids(g_ids, 'g_ids', num_g)
  q_cams = ranking.as_ids(q_cams, 'q_cams', num_q)
  g_cams = ranking.as_ids(g_cams, 'g_cams', num_g)
  pos, offsets = ranking.find_positives(q_ids, g_ids, q_cams, g_cams)
  values, counts = np.unique(g_ids, return_counts=True)
  at = np.clip(np.searchsorted(values, q_ids), 0, len(values) - 1)
  same_id = np.where(values[at] == q_ids, counts[at], 0)
  num_impostors = int(np.sum(num_g - same_id))
  top = _TopScores(_accepted_limit(max(fars), num_impostors) + 1)
  genuine = np.empty(len(pos), np.float32)
  chunk = int(chunk_size or max(1, min(num_q, _CHUNK_ELEMENTS // max(num_g, 1))))
  host = ranking.resolve_method(method) == 'host'
  g_dev = None if host else jnp.asarray(g)
  for s in range(0, num_q, chunk):
    e = min(s + chunk, num_q)
    scores = q[s:e] @ g.T if host else np.asarray(_device_scores(jnp.asarray(q[s:e]), g_dev))
    lo, hi = offsets[s], offsets[e]
    rows = np.repeat(np.arange(e - s), np.diff(offsets[s:e + 1]))
    genuine[lo:hi] = scores[rows, pos[lo:hi]]
    if np.isfinite(top.bound):  # only scores that can still count, then their ids
      flat = np.flatnonzero(scores >= top.bound)
      r, c = np.divmod(flat, num_g)
      top.add(scores.ravel()[flat[q_ids[s + r] != g_ids[c]]])
    else:
      top.add(scores[q_ids[s:e, None] != g_ids[None, :]])
  return operating_points(top.values(), num_impostors, genuine, fars)


def scalars(points: Mapping[str, Any] | None) -> dict[str, float]:
  """``{'tar@far1e-3': ..., 'threshold@far1e-3': ...}`` of the points that have values."""
  out = {}
  for key, point in (points or {}).items():
    if isinstance(point, Mapping):
      for name in ('tar', 'threshold'):
        if point.get(name) is not None:
          out[f'{name}@{key}'] = float(point[name])
  return out


def parse_far(text: str) -> float | None:
  """The FAR of ``'far1e-3'``, or None when ``text`` is not of that form."""
  if not text.startswith('far'):
    return None
  try:
    return float(text[3:])
  except ValueError:
    return None


def resolve(spec: str, task: str, model_thresholds: Mapping[str, Any] | None,
            source: str = 'model.json') -> tuple[float, str]:
  """``(threshold, where from)`` of a ``--threshold`` value: a cosine, or ``far1e-3`` looked up
  in ``model_thresholds[task]`` (model.json ``thresholds``); a clear error otherwise."""
  far = parse_far(spec)
  if far is None:
    try:
      value = float(spec)
    except ValueError:
      raise ValueError(f'--threshold={spec}: expected a cosine (e.g. 0.45) or one of '
                       f'{", ".join(far_key(f) for f in FARS)}') from None
    if not -1.0 <= value <= 1.0:
      raise ValueError(f'--threshold={spec}: a cosine threshold must be in [-1, 1]')
    return value, 'given'
  task_points = (model_thresholds or {}).get(task) or {}
  key = far_key(far)
  if task_points.get(key) is None:
    have = sorted(k for k in task_points if parse_far(k) is not None)
    raise ValueError(f'--threshold={spec}: {source} has no {key} threshold for task {task!r} '
                     f'({"it has " + ", ".join(have) if have else "export after an evaluation"}'
                     ', or give a cosine)')
  return float(task_points[key]), f'{source} {task} {key} ({task_points.get("source", "")})'
