"""Ranking without sorting the gallery: the rank of every positive of every query.

Every retrieval protocol of ufo-jax (re-id CMC / mAP / mINP, VehicleID, SOP Recall@K) needs, per
query, only the 1-based ranks of its positives in the gallery ordered by distance:

* CMC rank-k of a query is ``first positive rank <= k``;
* AP is ``sum_j j / r_j / P`` over its positives sorted by rank ``r_1 < ... < r_P``;
* INP is ``P / r_P`` (the rank of the hardest positive).

The rank of a positive ``p`` is ``1 + #{valid gallery items g before p}`` where ``g`` is before
``p`` when ``d_g < d_p``, or ``d_g == d_p`` and ``g < p`` (ties broken by gallery index, the
order of a stable sort). Invalid ("junk") gallery items, those with the query's pid *and*
camera, are never counted.

Distances come in chunks of query rows, ``(B, G)``: from a distance matrix, or computed from
L2-normalised float32 features as ``1 - <q, g>`` (never ``Q x G`` at once). Three methods count
the items before each positive, all exact:

* ``host`` (the default on CPU): numpy on the host, rows spread over threads. Per query only the
  valid items not farther than its hardest positive can precede a positive; they are selected
  (one vectorised compare), sorted, and each positive's value is looked up in them with a binary
  search (``searchsorted`` left and right; a value shared by several items is resolved by
  index). The features path computes the distance chunks with numpy's BLAS (faster than XLA's
  CPU dot here).
* ``reduce`` (the default on GPU / TPU): on the device, the distances turned into int32 keys
  whose integer order is the float order, one fused broadcast-compare-sum per (gallery item,
  positive); distances computed on the device.

Other device counters can be registered in ``DEVICE_COUNTERS`` (``bench/eval_rank.py`` adds the
former CPU kernel, a ``lax.scan`` over gallery rows, to compare against).

For the device methods, queries have different numbers of positives: each chunk is processed
with ``P_cap`` positive slots per query; the positives of a query beyond ``P_cap`` go to
"virtual queries" (the query's column gathered again) processed in small blocks. ``P_cap`` is
chosen from the distribution of positives by a small cost model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

JUNK_KEY = np.iinfo(np.int32).max
# Target number of (query x gallery) elements of one distance chunk: 2**25 float32 = 128 MiB per
# chunk array; a chunk of B queries holds at most ~3 such arrays at once.
_CHUNK_ELEMENTS = 2**25
_MAX_CHUNK = 1024
_MIN_CHUNK = 8
# Virtual queries per overflow block.
_OVERFLOW_BLOCK = 128
# Cost model of a device count (measured with a scan kernel on CPU), in units of one (gallery
# item, positive) comparison: a query column costs _ROW_COST + slots per gallery item,
# gathering a column again for an overflow block _GATHER_COST more.
_ROW_COST = 20
_GATHER_COST = 35
_CHECK_ROWS = 8192
# Query rows per task of the host method (a task's temporaries: a few rows of G items).
_HOST_ROWS = 64
_MAX_THREADS = 16


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


def default_chunk_size(num_gallery: int, num_query: int | None = None) -> int:
  """Queries per chunk so that one ``(chunk, gallery)`` array holds about 2**25 elements.

  Given ``num_query``, the chunks are balanced (``ceil(Q / chunks)`` rounded up to 8) so that the
  last one is not mostly padding.
  """
  chunk = _CHUNK_ELEMENTS // max(int(num_gallery), 1)
  chunk = chunk // _MIN_CHUNK * _MIN_CHUNK
  chunk = int(min(_MAX_CHUNK, max(_MIN_CHUNK, chunk)))
  if num_query:
    num_chunks = -(-int(num_query) // chunk)
    balanced = -(-int(num_query) // num_chunks)
    chunk = min(chunk, -(-balanced // _MIN_CHUNK) * _MIN_CHUNK)
  return chunk


def estimate_peak_bytes(num_query: int, num_gallery: int, dim: int,
                        chunk_size: int | None = None) -> int:
  """Upper estimate of the memory the chunked ranking holds at once, in bytes.

  Features (query and gallery, float32, input copy and normalised copy), one chunk's distances
  and keys (or, on the host, the selected items and masks of the rows in flight), the gathered
  overflow block, and the id arrays.
  """
  chunk = chunk_size or default_chunk_size(num_gallery)
  features = 2 * 4 * (num_query + num_gallery) * dim
  chunk_arrays = 4 * num_gallery * (2 * chunk + _OVERFLOW_BLOCK)
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


def default_method(backend: str | None = None) -> str:
  """``host`` on CPU, ``reduce`` on GPU / TPU (``backend`` defaults to the JAX backend)."""
  backend = jax.default_backend() if backend is None else backend
  return 'host' if backend == 'cpu' else 'reduce'


def methods() -> tuple[str, ...]:
  """The ranking methods: ``'host'`` and the device counters of ``DEVICE_COUNTERS``."""
  return ('host', *DEVICE_COUNTERS)


def resolve_method(method: str | None) -> str:
  """``method``, or the default for the backend when it is ``None`` or ``'auto'``."""
  if method is None or method == 'auto':
    return default_method()
  if method not in methods():
    raise ValueError(f"method must be 'auto' or one of {methods()}, got {method!r}")
  return method


def _num_threads() -> int:
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 1
  return max(1, min(_MAX_THREADS, cores))


# ---------------------------------------------------------------------------------------------
# Device kernels.


@functools.partial(jax.jit, static_argnames=('rows',))
def _normalize(x: jax.Array, *, rows: int) -> jax.Array:
  """L2-normalised rows, padded to ``rows`` with rows of ones (whose results are dropped)."""
  x = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)), constant_values=1.0)
  return x / jnp.linalg.norm(x, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=('chunk',))
def _distance_rows(q: jax.Array, g: jax.Array, start: jax.Array, *, chunk: int) -> jax.Array:
  """``(chunk, G)`` cosine distances ``1 - q[start:start + chunk] @ g.T`` in float32."""
  qc = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=0)
  return 1.0 - jnp.matmul(qc, g.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _keys_t(dist: jax.Array, q_pids: jax.Array, q_cams: jax.Array, g_pids: jax.Array,
            g_cams: jax.Array) -> jax.Array:
  """int32 keys in the order of the float distances ``(B, G)``, transposed: ``(G, B)``.

  Junk (same pid and camera) gets ``INT32_MAX``, which is never below a positive's key.
  """
  dist_t = dist.T
  d = jnp.where(dist_t == 0, jnp.zeros_like(dist_t), dist_t)  # -0.0 -> +0.0
  k = jax.lax.bitcast_convert_type(d, jnp.int32)
  k = jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k)
  junk = (g_pids[:, None] == q_pids[None, :]) & (g_cams[:, None] == q_cams[None, :])
  return jnp.where(junk, jnp.int32(JUNK_KEY), k)


def _thresholds(keys_t: jax.Array, pos_idx: jax.Array) -> jax.Array:
  """``(P, B)`` keys of the positives: ``keys_t[pos_idx[p, b], b]``."""
  return keys_t[pos_idx, jnp.arange(keys_t.shape[1])[None, :]]


def _count_reduce(keys_t: jax.Array, pos_idx: jax.Array) -> jax.Array:
  """Valid gallery items before each positive, ``(P, B)``, as one fused compare-and-sum.

  Item ``g`` is before positive ``p`` when ``key_g < key_p + [g < p]`` (ties by index).
  """
  thr = _thresholds(keys_t, pos_idx)
  index = jnp.arange(keys_t.shape[0], dtype=jnp.int32)[:, None, None]
  bound = thr[None] + (index < pos_idx[None]).astype(jnp.int32)  # (G, P, B)
  return jnp.sum(keys_t[:, None, :] < bound, axis=0, dtype=jnp.int32)


# Device counters by method name: ``(keys_t (G, B), pos_idx (P, B)) -> (P, B)`` int32 counts of
# the valid items before each positive.
DEVICE_COUNTERS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'reduce': _count_reduce}


@functools.partial(jax.jit, static_argnames=('method',))
def _count(keys_t: jax.Array, pos_idx: jax.Array, *, method: str) -> jax.Array:
  return DEVICE_COUNTERS[method](keys_t, pos_idx)


@jax.jit
def _take_columns(keys_t: jax.Array, cols: jax.Array) -> jax.Array:
  # A jit of its own: fused into the counting kernel, XLA would gather at every step.
  return jnp.take(keys_t, cols, axis=1, mode='clip')


# ---------------------------------------------------------------------------------------------
# Positives and junk as CSR arrays.


def _same_pid(q_pids: np.ndarray, g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(candidates, query_of)``: every gallery item with the query's pid, ascending per query."""
  order = np.argsort(g_pids, kind='stable')
  sorted_pids = g_pids[order]
  lo = np.searchsorted(sorted_pids, q_pids, side='left')
  hi = np.searchsorted(sorted_pids, q_pids, side='right')
  lengths = hi - lo
  total = int(lengths.sum())
  query_of = np.repeat(np.arange(len(q_pids)), lengths)
  within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  return order[np.repeat(lo, lengths) + within], query_of


def _csr(cand: np.ndarray, query_of: np.ndarray, keep: np.ndarray,
         num_q: int) -> tuple[np.ndarray, np.ndarray]:
  counts = np.bincount(query_of[keep], minlength=num_q)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return cand[keep].astype(np.int64), offsets


def find_positives(q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray,
                   g_cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gallery items with the query's pid and another camera, as CSR ``(indices, offsets)``.

  Indices ascend within each query.
  """
  cand, query_of = _same_pid(q_pids, g_pids)
  return _csr(cand, query_of, g_cams[cand] != q_cams[query_of], len(q_pids))


def find_junk(q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray,
              g_cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gallery items with the query's pid and camera (removed), as CSR ``(indices, offsets)``."""
  cand, query_of = _same_pid(q_pids, g_pids)
  return _csr(cand, query_of, g_cams[cand] == q_cams[query_of], len(q_pids))


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


# ---------------------------------------------------------------------------------------------
# Distances from features.


class _Ranker:
  """Normalised features and their distances chunk by chunk: on the host or on the device."""

  def __init__(self, q_feats, g_feats, chunk_size: int | None, method: str | None = None):
    q = check_features(q_feats, 'query features')
    g = check_features(g_feats, 'gallery features')
    if q.shape[1] != g.shape[1]:
      raise ValueError(f'query features have dim {q.shape[1]} but gallery features {g.shape[1]}')
    self.num_q, self.num_g = q.shape[0], g.shape[0]
    chunk = (default_chunk_size(self.num_g, self.num_q) if chunk_size is None
             else int(chunk_size))
    if chunk < 1:
      raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    self.chunk = chunk
    self.num_chunks = -(-self.num_q // chunk)
    self.method = resolve_method(method)
    if self.method == 'host':
      self.q = q / np.linalg.norm(q, axis=1, keepdims=True)
      self.g = g / np.linalg.norm(g, axis=1, keepdims=True)
    else:
      self.q = _normalize(jnp.asarray(q), rows=self.num_chunks * chunk)
      self.g = _normalize(jnp.asarray(g), rows=self.num_g)

  def distances(self, c: int):
    """``(rows, G)`` float32 distances of chunk ``c``.

    Host: a numpy array of the chunk's real rows. Device: a ``(chunk, G)`` device array (the
    last chunk padded).
    """
    if self.method == 'host':
      d = self.q[c * self.chunk:(c + 1) * self.chunk] @ self.g.T
      return np.subtract(np.float32(1), d, out=d)
    return _distance_rows(self.q, self.g, jnp.int32(c * self.chunk), chunk=self.chunk)


def distance_matrix(q_feats, g_feats, chunk_size: int | None = None,
                    method: str | None = None) -> np.ndarray:
  """The ``(Q, G)`` float32 cosine distances, bit-identical to those the chunked ranking uses.

  Same ``chunk_size`` and ``method`` as the ranking call (the host and device methods compute
  the distances with different matmuls). Materialises the full matrix on the host: for tests,
  small sets and figures.
  """
  ranker = _Ranker(q_feats, g_feats, chunk_size, method)
  out = np.empty((ranker.num_q, ranker.num_g), np.float32)
  for c in range(ranker.num_chunks):
    s = c * ranker.chunk
    e = min(s + ranker.chunk, ranker.num_q)
    out[s:e] = np.asarray(ranker.distances(c))[:e - s]
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


# ---------------------------------------------------------------------------------------------
# Counting on the device.


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


# ---------------------------------------------------------------------------------------------
# Counting on the host.


def _host_rows(block: np.ndarray, first: int, q0: int, q1: int, pos: np.ndarray,
               offsets: np.ndarray, junk: np.ndarray, junk_offsets: np.ndarray,
               first_only: bool, out: np.ndarray) -> None:
  """Valid items before each positive of queries ``q0 .. q1 - 1`` (row ``q - first`` of block).

  Writes ``out[offsets[q]:offsets[q + 1]]``; with ``first_only`` only the entry of the nearest
  positive (the others stay -1).
  """
  for qi in range(q0, q1):
    lo, hi = offsets[qi], offsets[qi + 1]
    if lo == hi:
      continue
    row = block[qi - first]
    p = pos[lo:hi]
    v = row[p]
    if first_only:  # the nearest positive, the lowest index among equal distances
      k = int(np.argmin(v))
      p, v, lo = p[k:k + 1], v[k:k + 1], lo + k
    # Only valid items not farther than the hardest positive can be before a positive.
    valid = row <= v.max()
    valid[junk[junk_offsets[qi]:junk_offsets[qi + 1]]] = False
    kept = row.take(np.flatnonzero(valid))  # faster than row[valid] here
    kept.sort()
    before = kept.searchsorted(v, side='left')  # strictly closer
    tied = kept.searchsorted(v, side='right') - before > 1  # another item at the same distance
    for t in np.flatnonzero(tied):
      before[t] += np.count_nonzero((row[:p[t]] == v[t]) & valid[:p[t]])  # ties of lower index
    out[lo:lo + len(p)] = before


def _host_count(block: np.ndarray, first: int, q0: int, q1: int, pos: np.ndarray,
                offsets: np.ndarray, junk: np.ndarray, junk_offsets: np.ndarray,
                first_only: bool, out: np.ndarray) -> None:
  """``_host_rows`` over queries ``q0 .. q1 - 1``, in tasks of ``_HOST_ROWS`` on threads."""
  tasks = [(s, min(s + _HOST_ROWS, q1)) for s in range(q0, q1, _HOST_ROWS)]
  threads = min(_num_threads(), len(tasks))
  run = lambda t: _host_rows(block, first, t[0], t[1], pos, offsets, junk, junk_offsets,
                             first_only, out)
  if threads <= 1:
    for t in tasks:
      run(t)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(run, tasks))  # numpy releases the GIL in the compares and sorts


# ---------------------------------------------------------------------------------------------
# Public entry points.


@dataclasses.dataclass
class _Ids:
  q_pids: np.ndarray
  g_pids: np.ndarray
  q_cams: np.ndarray
  g_cams: np.ndarray
  pos: np.ndarray
  offsets: np.ndarray

  @property
  def counts(self) -> np.ndarray:
    return np.diff(self.offsets)


def _prepare_ids(q_pids, g_pids, q_camids, g_camids, num_q: int | None = None,
                 num_g: int | None = None) -> _Ids:
  q_pids = as_ids(q_pids, 'q_pids', num_q)
  g_pids = as_ids(g_pids, 'g_pids', num_g)
  num_q, num_g = len(q_pids), len(g_pids)
  q_pids, g_pids = _shared_codes(q_pids, g_pids)
  q_cams, g_cams = _shared_codes(as_ids(q_camids, 'q_camids', num_q),
                                  as_ids(g_camids, 'g_camids', num_g))
  pos, offsets = find_positives(q_pids, g_pids, q_cams, g_cams)
  return _Ids(q_pids, g_pids, q_cams, g_cams, pos, offsets)


def _finish(before: np.ndarray, ids: _Ids, first_only: bool) -> PositiveRanks:
  """Sorted ranks per query from the per-entry counts (-1: not ranked)."""
  num_q = len(ids.q_pids)
  query_of = np.repeat(np.arange(num_q), ids.counts)
  if first_only:
    best = np.full(num_q, np.iinfo(np.int64).max)
    ranked = before >= 0
    np.minimum.at(best, query_of[ranked], before[ranked])
    keep = ranked & (before == best[query_of])
    query_of, before = query_of[keep], before[keep]
  ranks = before + 1
  order = np.lexsort((ranks, query_of))
  counts = np.bincount(query_of, minlength=num_q)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return PositiveRanks(ranks=ranks[order].astype(np.int64), offsets=offsets)


def _positive_slots(positive_slots, counts: np.ndarray, padded_queries: int) -> int:
  if positive_slots is None:
    return choose_positive_slots(counts, padded_queries)
  if int(positive_slots) != positive_slots or positive_slots < 1:
    raise ValueError(f'positive_slots must be a positive integer, got {positive_slots!r}')
  return int(positive_slots)


def positive_ranks(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, *,
                   chunk_size: int | None = None, method: str | None = None,
                   positive_slots: int | None = None, first_only: bool = False) -> PositiveRanks:
  """Ranks of every query's positives under cosine distance, computed in chunks.

  Args:
    q_feats, g_feats: ``(Q, D)`` and ``(G, D)`` features (L2-normalised here).
    q_pids, g_pids, q_camids, g_camids: integer ids. A gallery item is junk for a query when it
      has the same pid and the same camera; a positive has the same pid and another camera.
    chunk_size: queries per chunk (default: ``default_chunk_size(G, Q)``).
    method: ``'host'``, ``'reduce'`` (or another of ``methods()``), or ``None`` / ``'auto'``
      (``default_method()``: host on CPU, reduce on GPU / TPU).
    positive_slots: positive slots per query in the main pass of the device methods (default:
      by a cost model); the rest go to overflow blocks. Changes the speed, never the result.
    first_only: rank only each query's nearest positive (all Recall@K needs).

  Returns:
    ``PositiveRanks`` with ranks identical to a stable argsort of each query's distance row.
  """
  ranker = _Ranker(q_feats, g_feats, chunk_size, method)
  return ranks_from_distance_chunks(ranker.distances, ranker.chunk, q_pids, g_pids, q_camids,
                                    g_camids, method=ranker.method,
                                    positive_slots=positive_slots, first_only=first_only)


def ranks_from_distance_chunks(distances: Callable[[int], object], chunk: int, q_pids, g_pids,
                               q_camids, g_camids, *, method: str | None = None,
                               positive_slots: int | None = None,
                               first_only: bool = False) -> PositiveRanks:
  """Ranks of every query's positives, given the distances chunk by chunk.

  ``distances(c)`` returns the ``(rows, G)`` distances of queries ``c * chunk ..`` (numpy or
  device array; ``rows`` is ``chunk``, or fewer for the last chunk, or ``chunk`` with padding
  rows of any value). Other arguments as ``positive_ranks``; the device methods need float32.
  """
  method = resolve_method(method)
  ids = _prepare_ids(q_pids, g_pids, q_camids, g_camids)
  num_q, num_g = len(ids.q_pids), len(ids.g_pids)
  counts, offsets, pos = ids.counts, ids.offsets, ids.pos
  num_chunks = -(-num_q // chunk)
  before = np.full(len(pos), -1, np.int64)  # per CSR entry: valid items ranked before it
  if method == 'host':
    junk, junk_offsets = find_junk(ids.q_pids, ids.g_pids, ids.q_cams, ids.g_cams)
  else:
    cap = _positive_slots(positive_slots, counts, num_chunks * chunk)
    g_pids_d, g_cams_d = jnp.asarray(ids.g_pids), jnp.asarray(ids.g_cams)
  for c in range(num_chunks):
    s, e = c * chunk, min((c + 1) * chunk, num_q)
    lo, hi = offsets[s], offsets[e]
    if lo == hi:
      continue  # no positives in this chunk
    dist = distances(c)
    if dist.ndim != 2 or dist.shape[1] != num_g or not e - s <= dist.shape[0] <= chunk:
      raise ValueError(f'distance chunk {c} has shape {dist.shape}, expected ({e - s}..{chunk}, '
                       f'{num_g})')
    if method == 'host':
      _host_count(np.asarray(dist), s, s, e, pos, offsets, junk, junk_offsets, first_only,
                  before)
      continue
    if dist.dtype != jnp.float32:
      raise ValueError(f'method {method!r} needs float32 distances, got {dist.dtype}')
    if dist.shape[0] < chunk:
      dist = jnp.pad(jnp.asarray(dist), ((0, chunk - dist.shape[0]), (0, 0)))
    keys_t = _keys_t(jnp.asarray(dist), jnp.asarray(_pad_ids(ids.q_pids[s:e], chunk)),
                     jnp.asarray(_pad_ids(ids.q_cams[s:e], chunk)), g_pids_d, g_cams_d)
    col = np.repeat(np.arange(e - s), counts[s:e])  # chunk column of each entry
    j = np.arange(hi - lo) - (offsets[s:e] - lo)[col]  # position within its query
    before[lo:hi] = _count_entries(keys_t, pos[lo:hi], col, j, cap, method)
  return _finish(before, ids, first_only)


def ranks_from_distances(distmat, q_pids, g_pids, q_camids, g_camids, *,
                         method: str | None = None, chunk_size: int | None = None,
                         positive_slots: int | None = None) -> PositiveRanks:
  """Ranks of every query's positives from a ``(Q, G)`` distance matrix (no NaN).

  ``method``: as ``positive_ranks``; ``'auto'`` takes ``host`` on CPU and for matrices that are
  not float32 (any real dtype is ranked exactly there), else the device method of the backend,
  which gets the matrix in chunks of ``chunk_size`` rows. The device methods need float32 (or
  values float32 represents exactly).
  """
  distmat = np.asarray(distmat)
  num_q, num_g = distmat.shape
  auto = method is None or method == 'auto'
  method = resolve_method(method)
  if auto and distmat.dtype != np.float32:
    method = 'host'
  if method == 'host':
    ids = _prepare_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    junk, junk_offsets = find_junk(ids.q_pids, ids.g_pids, ids.q_cams, ids.g_cams)
    before = np.full(len(ids.pos), -1, np.int64)
    _host_count(distmat, 0, 0, num_q, ids.pos, ids.offsets, junk, junk_offsets, False, before)
    return _finish(before, ids, False)
  _prepare_ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g)  # checks the lengths
  chunk = default_chunk_size(num_g, num_q) if chunk_size is None else int(chunk_size)

  def rows(c: int) -> np.ndarray:
    block = distmat[c * chunk:(c + 1) * chunk]
    if block.dtype != np.float32:
      exact = block.astype(np.float32)
      if not np.array_equal(exact, block):
        raise ValueError(f'method {method!r} ranks float32 distances; distmat ({distmat.dtype}) '
                         "holds values float32 cannot represent: use method='host'")
      block = exact
    return block

  return ranks_from_distance_chunks(rows, chunk, q_pids, g_pids, q_camids, g_camids,
                                    method=method, positive_slots=positive_slots)
