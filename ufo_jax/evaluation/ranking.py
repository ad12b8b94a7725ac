"""Chunked ranking on the device: the rank of every positive of every query.

Every retrieval protocol of ufo-jax (re-id CMC / mAP / mINP, VehicleID, SOP Recall@K) needs, per
query, only the 1-based ranks of its positives in the gallery ordered by distance:

* CMC rank-k of a query is ``first positive rank <= k``;
* AP is ``sum_j j / r_j / P`` over its positives sorted by rank ``r_1 < ... < r_P``;
* INP is ``P / r_P`` (the rank of the hardest positive).

So no row is ever sorted. The rank of a positive ``p`` is ``1 + #{valid gallery items g before p}``
where ``g`` is before ``p`` when ``d_g < d_p``, or ``d_g == d_p`` and ``g < p`` (ties broken by
gallery index, the order of a stable sort). Invalid ("junk") gallery items, those with the
query's pid *and* camera, are never counted.

The distances ``1 - <q, g>`` of L2-normalised float32 features are computed on the device in
chunks of queries (``(G, B)`` at a time, never ``Q x G`` on the host), turned into int32 keys
whose integer order is the float order (``-0.0`` folded into ``+0.0``, junk set to ``INT32_MAX``),
and the positives' ranks are counted with one comparison per (gallery item, positive):

* ``scan`` (CPU): ``lax.scan`` over gallery rows with a ``(P, B)`` accumulator that stays in
  cache, vectorised over queries and positives;
* ``reduce`` (GPU / TPU): one fused broadcast-compare-sum over the gallery axis.

Queries have different numbers of positives. Each chunk is processed with ``P_cap`` positive
slots per query; the positives of a query beyond ``P_cap`` go to "virtual queries" (the query's
column gathered again) processed in small blocks, so padding never costs more than a few slots
per query. ``P_cap`` is chosen from the distribution of positives by a small cost model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

JUNK_KEY = np.iinfo(np.int32).max
# Target number of (gallery x query) elements of one distance chunk: 2**25 float32 = 128 MiB per
# chunk array (distances, keys); a chunk of B queries holds at most ~3 such arrays at once.
_CHUNK_ELEMENTS = 2**25
_MAX_CHUNK = 1024
_MIN_CHUNK = 8
# Gallery rows handled per step of the scan kernel.
_SCAN_ROWS = 8
# Virtual queries per overflow block.
_OVERFLOW_BLOCK = 128
# Cost model of the scan kernel (CPU, measured), in units of one (gallery item, positive)
# comparison: a query column costs _ROW_COST + slots per gallery item, gathering a column again
# for an overflow block _GATHER_COST more.
_ROW_COST = 20
_GATHER_COST = 35
METHODS = ('scan', 'reduce')
_CHECK_ROWS = 8192


@dataclasses.dataclass(frozen=True)
class PositiveRanks:
  """Ranks of the positives of each query, as a CSR array.

  ``ranks[offsets[i]:offsets[i + 1]]`` are the 1-based ranks of query ``i``'s positives in its
  filtered gallery, ascending. Queries without positives have an empty segment.
  """

  ranks: np.ndarray  # (total positives,) int64
  offsets: np.ndarray  # (num_queries + 1,) int64

  @property
  def num_positives(self) -> np.ndarray:
    """Positives per query, ``(num_queries,)``."""
    return np.diff(self.offsets)


def default_chunk_size(num_gallery: int) -> int:
  """Queries per chunk so that one ``(gallery, chunk)`` array holds about 2**25 elements."""
  chunk = _CHUNK_ELEMENTS // max(int(num_gallery), 1)
  chunk = chunk // _MIN_CHUNK * _MIN_CHUNK
  return int(min(_MAX_CHUNK, max(_MIN_CHUNK, chunk)))


def estimate_peak_bytes(num_query: int, num_gallery: int, dim: int,
                        chunk_size: int | None = None) -> int:
  """Upper estimate of the memory the chunked ranking holds at once, in bytes.

  Features (query and gallery, float32, host copy and normalised device copy), one chunk's
  distances, keys and the gathered overflow block, and the id arrays.
  """
  chunk = chunk_size or default_chunk_size(num_gallery)
  features = 2 * 4 * (num_query + num_gallery) * dim
  chunk_arrays = 4 * num_gallery * (2 * chunk + _OVERFLOW_BLOCK + _SCAN_ROWS)
  ids = 8 * 4 * (num_query + num_gallery)
  return features + chunk_arrays + ids


def as_ids(x, name: str, n: int | None = None) -> np.ndarray:
  """A 1-D int64 array of ids, or a clear error."""
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {a.shape}')
  if a.size and not np.issubdtype(a.dtype, np.integer):
    if not np.issubdtype(a.dtype, np.floating) or not np.all(a == np.round(a)):
      raise ValueError(f'{name} must hold integer ids, got dtype {a.dtype}')
  a = a.astype(np.int64)
  if n is not None and a.shape[0] != n:
    raise ValueError(f'{name} has {a.shape[0]} entries, expected {n}')
  return a


def check_features(x, name: str) -> np.ndarray:
  """A finite ``(N, D)`` float32 array with non-zero rows, or a clear error."""
  a = np.asarray(x)
  if a.ndim != 2:
    raise ValueError(f'{name} must be 2-D (items, dim), got shape {a.shape}')
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f'{name} is empty: shape {a.shape}')
  a = a.astype(np.float32, copy=False)
  for s in range(0, a.shape[0], _CHECK_ROWS):  # in blocks: no full-size temporary
    block = a[s:s + _CHECK_ROWS]
    if not np.all(np.isfinite(block)):
      raise ValueError(f'{name} holds NaN or infinite values (first in rows {s}..)')
    zero = ~np.any(block != 0, axis=1)
    if np.any(zero):
      raise ValueError(f'{name} has all-zero rows (first: {s + int(np.argmax(zero))}); '
                       'a cosine distance needs non-zero features')
  return a


@functools.partial(jax.jit, static_argnames=('rows',))
def _normalize(x: jax.Array, *, rows: int) -> jax.Array:
  """L2-normalised rows, padded to ``rows`` with rows of ones (whose results are dropped)."""
  x = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)), constant_values=1.0)
  return x / jnp.linalg.norm(x, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=('chunk',))
def _distance_t(q: jax.Array, g: jax.Array, start: jax.Array, *, chunk: int) -> jax.Array:
  """``(G, chunk)`` cosine distances ``1 - g @ q[start:start + chunk].T`` in float32."""
  qc = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=0)
  return 1.0 - jnp.matmul(g, qc.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _keys(dist_t: jax.Array, q_pids: jax.Array, q_cams: jax.Array, g_pids: jax.Array,
          g_cams: jax.Array) -> jax.Array:
  """int32 keys in the order of the float distances, ``(G_pad, B)``.

  Junk (same pid and camera) and the padding rows up to a multiple of ``_SCAN_ROWS`` get
  ``INT32_MAX``, which is never below a positive's key.
  """
  num_g = dist_t.shape[0]
  padded = -(-num_g // _SCAN_ROWS) * _SCAN_ROWS
  d = jnp.where(dist_t == 0, jnp.zeros_like(dist_t), dist_t)  # -0.0 -> +0.0
  k = jax.lax.bitcast_convert_type(d, jnp.int32)
  k = jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k)
  junk = (g_pids[:, None] == q_pids[None, :]) & (g_cams[:, None] == q_cams[None, :])
  k = jnp.where(junk, jnp.int32(JUNK_KEY), k)
  return jnp.pad(k, ((0, padded - num_g), (0, 0)), constant_values=JUNK_KEY)


def _thresholds(keys_t: jax.Array, pos_idx: jax.Array) -> jax.Array:
  """``(P, B)`` keys of the positives: ``keys_t[pos_idx[p, b], b]``."""
  return keys_t[pos_idx, jnp.arange(keys_t.shape[1])[None, :]]


def _count_scan(keys_t: jax.Array, pos_idx: jax.Array) -> jax.Array:
  """Valid gallery items before each positive, ``(P, B)``: a scan over blocks of gallery rows.

  Item ``g`` is before positive ``p`` when ``key_g < key_p + [g < p]`` (ties by index). The
  ``(P, B)`` accumulator stays in cache; queries are the minor (vectorised) axis.
  """
  num_g, num_b = keys_t.shape
  thr = _thresholds(keys_t, pos_idx)
  blocks = keys_t.reshape(num_g // _SCAN_ROWS, _SCAN_ROWS, num_b)
  offsets = jnp.arange(_SCAN_ROWS, dtype=jnp.int32)[:, None, None]

  def body(acc, xs):
    rows, g0 = xs  # (U, B) keys of gallery items g0 .. g0 + U - 1
    bound = thr[None] + (g0 + offsets < pos_idx[None]).astype(jnp.int32)  # (U, P, B)
    return acc + jnp.sum(rows[:, None, :] < bound, axis=0, dtype=jnp.int32), None

  starts = jnp.arange(0, num_g, _SCAN_ROWS, dtype=jnp.int32)
  acc, _ = jax.lax.scan(body, jnp.zeros(thr.shape, jnp.int32), (blocks, starts))
  return acc


def _count_reduce(keys_t: jax.Array, pos_idx: jax.Array) -> jax.Array:
  """Same counts as ``_count_scan`` as one fused compare-and-sum (for GPU / TPU)."""
  thr = _thresholds(keys_t, pos_idx)
  index = jnp.arange(keys_t.shape[0], dtype=jnp.int32)[:, None, None]
  bound = thr[None] + (index < pos_idx[None]).astype(jnp.int32)  # (G, P, B)
  return jnp.sum(keys_t[:, None, :] < bound, axis=0, dtype=jnp.int32)


_COUNTERS = {'scan': _count_scan, 'reduce': _count_reduce}


@functools.partial(jax.jit, static_argnames=('method',))
def _count(keys_t: jax.Array, pos_idx: jax.Array, *, method: str) -> jax.Array:
  return _COUNTERS[method](keys_t, pos_idx)


@jax.jit
def _take_columns(keys_t: jax.Array, cols: jax.Array) -> jax.Array:
  # A jit of its own: fused into the counting kernel, XLA would gather at every step.
  return jnp.take(keys_t, cols, axis=1, mode='clip')


def default_method() -> str:
  """``scan`` on CPU, ``reduce`` on accelerators."""
  return 'scan' if jax.default_backend() == 'cpu' else 'reduce'


def find_positives(q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray,
                   g_cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gallery items with the query's pid and another camera, as CSR ``(indices, offsets)``.

  Indices ascend within each query.
  """
  order = np.argsort(g_pids, kind='stable')
  sorted_pids = g_pids[order]
  lo = np.searchsorted(sorted_pids, q_pids, side='left')
  hi = np.searchsorted(sorted_pids, q_pids, side='right')
  lengths = hi - lo
  total = int(lengths.sum())
  query_of = np.repeat(np.arange(len(q_pids)), lengths)
  within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  cand = order[np.repeat(lo, lengths) + within]
  keep = g_cams[cand] != q_cams[query_of]
  counts = np.bincount(query_of[keep], minlength=len(q_pids))
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return cand[keep].astype(np.int64), offsets


def _slot_candidates(top: int) -> list[int]:
  """1, 2, 4, then multiples of 8 growing by about 1.5x, up to ``top`` rounded up."""
  limit = top if top <= 4 else -(-top // 8) * 8
  cands = [1, 2, 4, 8]
  while cands[-1] < limit:
    cands.append(max(cands[-1] + 8, (cands[-1] * 3 // 2) // 8 * 8))
  return [c for c in cands if c < limit] + [limit]


def choose_positive_slots(num_positives: np.ndarray, num_queries_padded: int) -> int:
  """Positive slots per query (``P_cap``) minimising main + overflow comparisons."""
  counts = num_positives[num_positives > 0]
  if counts.size == 0:
    return 1
  best, best_cost = 1, math.inf
  for cap in _slot_candidates(int(counts.max())):
    extra = int(np.maximum(0, -(-counts // cap) - 1).sum())
    extra = -(-extra // _OVERFLOW_BLOCK) * _OVERFLOW_BLOCK  # whole blocks
    cost = (num_queries_padded * (_ROW_COST + cap)
            + extra * (_ROW_COST + _GATHER_COST + cap))
    if cost < best_cost:
      best, best_cost = cap, cost
  return best


class _Ranker:
  """Holds the normalised features on the device; ranks positives chunk by chunk."""

  def __init__(self, q_feats, g_feats, chunk_size: int | None):
    q = check_features(q_feats, 'query features')
    g = check_features(g_feats, 'gallery features')
    if q.shape[1] != g.shape[1]:
      raise ValueError(f'query features have dim {q.shape[1]} but gallery features {g.shape[1]}')
    self.num_q, self.num_g = q.shape[0], g.shape[0]
    chunk = default_chunk_size(self.num_g) if chunk_size is None else int(chunk_size)
    if chunk < 1:
      raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    self.chunk = chunk
    self.num_chunks = -(-self.num_q // chunk)
    self.q = _normalize(jnp.asarray(q), rows=self.num_chunks * chunk)
    self.g = _normalize(jnp.asarray(g), rows=self.num_g)

  def distances_t(self, c: int) -> jax.Array:
    """``(G, chunk)`` float32 distances of chunk ``c`` (on the device)."""
    return _distance_t(self.q, self.g, jnp.int32(c * self.chunk), chunk=self.chunk)


@jax.jit
def _transpose(x: jax.Array) -> jax.Array:
  # A jit of its own, so that the distances are those of `_distance_t`, bit for bit.
  return x.T


def distance_matrix(q_feats, g_feats, chunk_size: int | None = None) -> np.ndarray:
  """The ``(Q, G)`` float32 cosine distances, bit-identical to those the chunked ranking uses.

  Materialises the full matrix on the host: for tests, small sets and figures.
  """
  ranker = _Ranker(q_feats, g_feats, chunk_size)
  out = np.empty((ranker.num_q, ranker.num_g), np.float32)
  for c in range(ranker.num_chunks):
    s = c * ranker.chunk
    e = min(s + ranker.chunk, ranker.num_q)
    out[s:e] = np.asarray(_transpose(ranker.distances_t(c)))[:e - s]
  return out


def _pad_ids(ids: np.ndarray, length: int) -> np.ndarray:
  """Pads dense id codes (>= 0) with -1, an id no gallery item has."""
  out = np.full(length, -1, np.int32)
  out[:len(ids)] = ids
  return out


def _shared_codes(query_ids: np.ndarray, gallery_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense int32 codes of the ids (only equality matters), shared by query and gallery."""
  _, inverse = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)
  inverse = inverse.astype(np.int32)
  return inverse[:len(query_ids)], inverse[len(query_ids):]


def _count_entries(keys_t: jax.Array, targets: np.ndarray, col: np.ndarray, j: np.ndarray,
                   cap: int, method: str) -> np.ndarray:
  """Valid items before each positive of one chunk (CSR entries, in order).

  Entry ``i`` is the ``j[i]``-th positive (gallery index ``targets[i]``) of chunk column
  ``col[i]``. Positives ``j < cap`` go to the main pass; the others to virtual queries, one per
  (column, ``j // cap``), in blocks of ``_OVERFLOW_BLOCK`` gathered columns.
  """
  chunk = keys_t.shape[1]
  group, slot = j // cap, j % cap
  out = np.zeros(len(targets), np.int64)
  main = group == 0
  pos_idx = np.zeros((cap, chunk), np.int32)
  pos_idx[slot[main], col[main]] = targets[main]
  got = np.asarray(_count(keys_t, jnp.asarray(pos_idx), method=method))
  out[main] = got[slot[main], col[main]]
  if main.all():
    return out
  extra = np.flatnonzero(~main)
  groups = int(group.max()) + 1
  virt_ids, virt = np.unique(col[extra] * groups + group[extra], return_inverse=True)
  virt_cols = (virt_ids // groups).astype(np.int32)
  block = min(_OVERFLOW_BLOCK, chunk)
  for b0 in range(0, len(virt_ids), block):
    sel = extra[(virt >= b0) & (virt < b0 + block)]
    rows = virt[(virt >= b0) & (virt < b0 + block)] - b0
    cols = np.zeros(block, np.int32)
    cols[:min(block, len(virt_ids) - b0)] = virt_cols[b0:b0 + block]
    v_idx = np.zeros((cap, block), np.int32)
    v_idx[slot[sel], rows] = targets[sel]
    got = np.asarray(_count(_take_columns(keys_t, jnp.asarray(cols)), jnp.asarray(v_idx),
                            method=method))
    out[sel] = got[slot[sel], rows]
  return out


def positive_ranks(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, *,
                   chunk_size: int | None = None, method: str | None = None,
                   positive_slots: int | None = None) -> PositiveRanks:
  """Ranks of every query's positives under cosine distance, computed in chunks on the device.

  Args:
    q_feats, g_feats: ``(Q, D)`` and ``(G, D)`` features (L2-normalised here).
    q_pids, g_pids, q_camids, g_camids: integer ids. A gallery item is junk for a query when it
      has the same pid and the same camera; a positive has the same pid and another camera.
    chunk_size: queries per chunk (default: from the gallery size, ``default_chunk_size``).
    method: ``'scan'`` or ``'reduce'`` (default: ``default_method()``).
    positive_slots: positive slots per query in the main pass (default: by a cost model); the
      rest go to overflow blocks. Changes the speed, never the result.

  Returns:
    ``PositiveRanks`` with ranks identical to a stable argsort of each query's distance row.
  """
  ranker = _Ranker(q_feats, g_feats, chunk_size)
  return ranks_from_distance_chunks(ranker.distances_t, ranker.chunk, q_pids, g_pids, q_camids,
                                    g_camids, method=method, positive_slots=positive_slots)


def ranks_from_distance_chunks(distances_t: Callable[[int], jax.Array], chunk: int, q_pids,
                               g_pids, q_camids, g_camids, *, method: str | None = None,
                               positive_slots: int | None = None) -> PositiveRanks:
  """Ranks of every query's positives, given the distances chunk by chunk.

  ``distances_t(c)`` returns the ``(G, chunk)`` float32 distances of queries
  ``c * chunk .. (c + 1) * chunk - 1`` (the last chunk padded with any values). Other arguments
  as ``positive_ranks``.
  """
  method = default_method() if method is None else method
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  num_q, num_g = len(q_pids), len(g_pids)
  q_pids, g_pids = _shared_codes(as_ids(q_pids, 'q_pids'), as_ids(g_pids, 'g_pids'))
  q_cams, g_cams = _shared_codes(as_ids(q_camids, 'q_camids', num_q),
                                  as_ids(g_camids, 'g_camids', num_g))
  pos, offsets = find_positives(q_pids, g_pids, q_cams, g_cams)
  counts = np.diff(offsets)
  num_chunks = -(-num_q // chunk)
  if positive_slots is None:
    cap = choose_positive_slots(counts, num_chunks * chunk)
  elif int(positive_slots) != positive_slots or positive_slots < 1:
    raise ValueError(f'positive_slots must be a positive integer, got {positive_slots!r}')
  else:
    cap = int(positive_slots)
  g_pids_d, g_cams_d = jnp.asarray(g_pids), jnp.asarray(g_cams)
  before = np.zeros(len(pos), np.int64)  # per CSR entry: valid items ranked before it
  for c in range(num_chunks):
    s, e = c * chunk, min((c + 1) * chunk, num_q)
    lo, hi = offsets[s], offsets[e]
    if lo == hi:
      continue  # no positives in this chunk
    dist_t = distances_t(c)
    if dist_t.shape != (num_g, chunk):
      raise ValueError(f'distance chunk {c} has shape {dist_t.shape}, expected ({num_g}, {chunk})')
    keys_t = _keys(dist_t, jnp.asarray(_pad_ids(q_pids[s:e], chunk)),
                   jnp.asarray(_pad_ids(q_cams[s:e], chunk)), g_pids_d, g_cams_d)
    col = np.repeat(np.arange(e - s), counts[s:e])  # chunk column of each entry
    j = np.arange(hi - lo) - (offsets[s:e] - lo)[col]  # position within its query
    before[lo:hi] = _count_entries(keys_t, pos[lo:hi], col, j, cap, method)
  query_of = np.repeat(np.arange(num_q), counts)
  ranks = before + 1
  order = np.lexsort((ranks, query_of))
  return PositiveRanks(ranks=ranks[order], offsets=offsets)
