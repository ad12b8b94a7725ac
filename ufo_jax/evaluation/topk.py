"""Exact cosine top-k of queries against a gallery, in bounded memory: numpy BLAS on CPU, the
device on GPU / TPU.

    scores, index = cosine_topk(query, gallery, k=10)   # (Q, k) float32 and int64

The score is the cosine: the dot product of the L2-normalised float32 features. The gallery is
read in chunks of ``gallery_chunk`` rows (a memory-mapped array is never read whole) and the
queries in chunks of ``query_chunk`` rows; each (gallery chunk, query chunk) pair scores one
block and merges its best items into the running top-k of those queries. Nothing of size
``Q x G`` ever exists. ``method``:

* ``'host'`` (the default when JAX runs on the CPU): the block is one BLAS product
  ``g @ q.T`` (numpy's sgemm, as the evaluation's host ranking computes its distances), each
  gallery row divided by its norm unless it is already unit-norm (as ``embed`` writes it). The
  merge keeps, per query, only the block's scores strictly above its running k-th (the block's
  rows come later in gallery order, so an equal score loses), bounded by the k-th of the
  block's first rows when there are many, and orders the few candidates with the running top-k
  by (score descending, index). As fast as FAISS ``IndexFlatIP`` on the same features, with the
  same results (``bench/search.py``, docs/PERFORMANCE.md).
* ``'device'`` (the default on GPU / TPU): the gallery chunk is sent to the device once, each
  block is a ``jnp.dot`` at ``Precision.HIGHEST``, its ``lax.top_k`` is merged into the running
  top-k kept on the device. ``lax.top_k`` returns equal values lowest position first, and the
  running top-k (lower gallery indices) is placed before the new chunk's candidates.

Order: by score, descending; equal scores by gallery index, ascending (the order of a stable
sort of the negated scores), for both methods.

Memory (``estimate_peak_bytes``): the normalised queries, one gallery chunk (host copy, device
copy and the next one in flight for the device method), the score block, and the running top-k.
A 1M x 1024 float32 gallery is read chunk by chunk from the caller's array (4 GiB, e.g. a
memory-mapped ``.npy``): with the default chunks the search itself holds well under 1 GiB
beyond the caller's arrays.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ufo_jax.evaluation.ranking import check_features

# One score block holds at most this many float32 elements (2**25: 128 MiB).
BLOCK_ELEMENTS = 2**25
DEFAULT_GALLERY_CHUNK = 65536
HOST_GALLERY_CHUNK = 16384
MAX_QUERY_CHUNK = 1024
MIN_QUERY_CHUNK = 8
# Host merge: a row with more candidates than this is cut to its block's top-k first.
_DENSE = 256
_UNIT_TOLERANCE = 4 * np.finfo(np.float32).eps  # a norm this close to 1: the row is normalised
_SAMPLE = 512  # columns whose k-th score bounds a dense row's candidates


def default_chunks(num_query: int, num_gallery: int, method: str = 'device') -> tuple[int, int]:
  """``(query_chunk, gallery_chunk)``: score blocks of about ``BLOCK_ELEMENTS`` elements.

  ``method='host'``: gallery chunks of ``HOST_GALLERY_CHUNK`` rows and up to 2048 queries per
  block (no padding rows); ``'device'``: chunks of ``DEFAULT_GALLERY_CHUNK`` and query chunks a
  multiple of 8 (one compiled shape).
  """
  if method == 'host':
    gallery_chunk = int(min(max(num_gallery, 1), HOST_GALLERY_CHUNK))
    return int(min(max(num_query, 1), BLOCK_ELEMENTS // gallery_chunk)), gallery_chunk
  gallery_chunk = int(min(max(num_gallery, 1), DEFAULT_GALLERY_CHUNK))
  query_chunk = BLOCK_ELEMENTS // gallery_chunk
  query_chunk = max(MIN_QUERY_CHUNK, min(MAX_QUERY_CHUNK, query_chunk))
  query_chunk = int(min(query_chunk, -(-max(num_query, 1) // MIN_QUERY_CHUNK) * MIN_QUERY_CHUNK))
  return query_chunk, gallery_chunk


def estimate_peak_bytes(num_query: int, num_gallery: int, dim: int, k: int, *,
                        query_chunk: int | None = None, gallery_chunk: int | None = None,
                        method: str = 'device') -> int:
  """Upper estimate of the memory ``cosine_topk`` holds beyond its inputs, in bytes.

  ``'device'``: query features (normalised, host and device copies), one gallery chunk
  (normalised host copy, device copy, and the next one in flight), the score block (and its
  masked copy) and its top-k, and the running top-k of all queries (scores and indices, device
  and host). ``'host'``: the normalised queries, one gallery chunk (read from a memory-mapped
  array), the score block and its candidate mask, and the running top-k.
  """
  qc, gc = default_chunks(num_query, num_gallery, method)
  qc, gc = query_chunk or qc, gallery_chunk or gc
  if method == 'host':
    return 4 * num_query * dim + 4 * gc * dim + 5 * qc * gc + 2 * 12 * num_query * k
  q_rows = -(-num_query // qc) * qc
  queries = 2 * 4 * q_rows * dim
  gallery = 3 * 4 * gc * dim
  block = 2 * 4 * qc * gc + 2 * 8 * qc * (k + min(k, gc))
  running = 2 * 2 * 8 * q_rows * k
  return queries + gallery + block + running


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """float32 rows divided by their L2 norm (a new array)."""
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32)


@functools.partial(jax.jit, static_argnames=('k',))
def _merge(run_scores: jax.Array, run_index: jax.Array, q: jax.Array, g: jax.Array,
           offset: jax.Array, valid: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
  """The running top-k of a query chunk merged with its top-k in one gallery chunk."""
  s = jnp.dot(q, g.T, precision=jax.lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  cols = jnp.arange(g.shape[0], dtype=jnp.int32)
  s = jnp.where(cols[None, :] < valid, s, -jnp.inf)
  kc = min(k, g.shape[0])
  top_s, top_i = jax.lax.top_k(s, kc)
  scores = jnp.concatenate([run_scores, top_s], axis=1)
  index = jnp.concatenate([run_index, top_i + offset], axis=1)
  best_s, pos = jax.lax.top_k(scores, k)
  return best_s, jnp.take_along_axis(index, pos, axis=1)


def _merge_host(run_s: np.ndarray, run_i: np.ndarray, s: np.ndarray, offset: int,
                k: int) -> None:
  """Merges the ``(C, B)`` score block of gallery rows ``offset ..`` into the running top-k.

  ``s[c, b]`` is the score of gallery row ``offset + c`` for query ``b``. In place on
  ``run_s`` / ``run_i`` (``(B, k)``, descending, ties by index). The block's rows come after
  every row merged before, so an item tied with the running k-th loses: only scores strictly
  above it are candidates. A query with more than ``_DENSE`` candidates (the first block, or a
  gallery in increasing order) keeps only those not below a lower bound of its block's k-th
  score (the k-th of the block's first ``_SAMPLE`` rows), ties included. The candidates and the
  running top-k are then ordered by (query, score descending, index) and the first k of each
  query kept.
  """
  cols, num_b = s.shape
  mask = s > run_s[:, k - 1]
  cap = max(_DENSE, 2 * k)
  if np.count_nonzero(mask) > num_b * cap:  # some queries have many candidates
    dense = np.flatnonzero(np.count_nonzero(mask, axis=0) > cap)
    sample = s[:max(_SAMPLE, k), dense]  # at least k rows: k <= the rows merged so far
    kc = min(k, sample.shape[0])
    kth = np.partition(sample, sample.shape[0] - kc, axis=0)[sample.shape[0] - kc]
    mask[:, dense] &= s[:, dense] >= kth
  flat = np.flatnonzero(mask)
  if flat.size == 0:
    return
  cand, query = np.divmod(flat, num_b)
  touched, rows = np.unique(query, return_inverse=True)  # the queries with candidates
  n = len(touched)
  all_rows = np.concatenate([np.repeat(np.arange(n), k), rows])
  all_s = np.concatenate([run_s[touched].ravel(), s.ravel()[flat]])
  all_i = np.concatenate([run_i[touched].ravel(), cand + offset])
  order = np.lexsort((all_i, -all_s, all_rows))
  starts = np.concatenate([[0], np.cumsum(np.bincount(all_rows, minlength=n))[:-1]])
  take = order[(starts[:, None] + np.arange(k)[None, :]).ravel()]
  run_s[touched] = all_s[take].reshape(n, k)
  run_i[touched] = all_i[take].reshape(n, k)


def inverse_norms(rows: np.ndarray, what: str) -> np.ndarray:
  """``1 / ||row||`` of float32 rows, float32; a bad row (zero, NaN, inf) is a clear error."""
  rows = np.asarray(rows, np.float32)
  if rows.ndim != 2 or rows.shape[0] == 0:
    check_features(rows, what)  # the error for a bad shape
  norms = np.sqrt(np.einsum('ij,ij->i', rows, rows))
  bad = ~np.isfinite(norms) | (norms == 0)
  if bad.any():
    check_features(rows, what)  # names a zero or non-finite row; else the squares overflowed
    norms[bad] = np.linalg.norm(rows[bad].astype(np.float64), axis=1)
  inv = (1.0 / norms).astype(np.float32)
  inv[np.abs(norms - 1) <= _UNIT_TOLERANCE] = 1.0  # normalised already: used as stored
  return inv


def _host_topk(q: np.ndarray, gallery, k: int, qc: int, gc: int, num_g: int,
               progress) -> tuple[np.ndarray, np.ndarray]:
  """``cosine_topk`` on the host: numpy BLAS score blocks, running top-k merged in numpy.

  The score of a gallery row is ``(q_n . g) / ||g||``: the normalised query's dot product with
  the row as stored, scaled per column (not at all for rows whose norm is 1 within a few
  float32 ulps, as ``embed`` writes them), so the gallery is read once per chunk and never
  copied.
  """
  num_q = q.shape[0]
  run_s = np.full((num_q, k), -np.inf, np.float32)
  run_i = np.full((num_q, k), num_g, np.int64)
  for start in range(0, num_g, gc):
    g = np.asarray(gallery[start:start + gc], np.float32)
    inv = inverse_norms(g, f'gallery features rows {start}..')
    for qs in range(0, num_q, qc):
      block = g @ q[qs:qs + qc].T  # BLAS sgemm, (gallery chunk, queries) float32
      if not np.all(inv == 1):
        block *= inv[:, None]
      _merge_host(run_s[qs:qs + qc], run_i[qs:qs + qc], block, start, k)
    if progress is not None:
      progress(start + g.shape[0], num_g)
  return run_s, run_i


def cosine_topk(query, gallery, k: int, *, query_chunk: int | None = None,
                gallery_chunk: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                method: str = 'auto') -> tuple[np.ndarray, np.ndarray]:
  """The ``k`` most similar gallery items (cosine) of every query.

  Args:
    query: ``(Q, D)`` features (any scale; rows are L2-normalised here).
    gallery: ``(G, D)`` features, e.g. a memory-mapped array: read one chunk at a time.
    k: results per query (at most ``G``).
    query_chunk, gallery_chunk: rows per chunk (default ``default_chunks``).
    progress: called as ``progress(gallery_rows_done, G)`` after every gallery chunk.
    method: ``'host'`` (numpy BLAS scores, the top-k merged in numpy), ``'device'`` (JAX:
      scores and ``lax.top_k`` on the default device), or ``'auto'``: host when JAX's backend
      is the CPU, else device.

  Returns:
    ``(scores, index)``: ``(Q, k)`` float32 cosine similarities, descending, and ``(Q, k)``
    int64 gallery rows (ties: lower row first).
  """
  if method == 'auto':
    method = 'host' if jax.default_backend() == 'cpu' else 'device'
  if method not in ('host', 'device'):
    raise ValueError(f"method must be 'auto', 'host' or 'device', got {method!r}")
  q = normalize_rows(check_features(query, 'query features'))
  num_g = int(np.shape(gallery)[0]) if np.ndim(gallery) == 2 else 0
  if np.ndim(gallery) != 2 or num_g == 0:
    check_features(gallery, 'gallery features')  # the error for a bad gallery
  if np.shape(gallery)[1] != q.shape[1]:
    raise ValueError(f'query features have dimension {q.shape[1]} but gallery features '
                     f'{np.shape(gallery)[1]}')
  k = int(k)
  if not 1 <= k <= num_g:
    raise ValueError(f'k={k} must be in [1, {num_g}] (the gallery size)')
  qc, gc = default_chunks(q.shape[0], num_g, method)
  qc, gc = int(query_chunk or qc), int(min(gallery_chunk or gc, num_g))
  if qc < 1 or gc < 1:
    raise ValueError(f'chunk sizes must be positive, got query_chunk={qc}, gallery_chunk={gc}')
  if method == 'host':
    return _host_topk(q, gallery, k, qc, gc, num_g, progress)
  num_q = q.shape[0]
  q_rows = -(-num_q // qc) * qc
  q = np.concatenate([q, np.ones((q_rows - num_q, q.shape[1]), np.float32)])  # padding rows
  q_dev = [jnp.asarray(q[s:s + qc]) for s in range(0, q_rows, qc)]
  run_s = [jnp.full((qc, k), -jnp.inf, jnp.float32) for _ in q_dev]
  run_i = [jnp.full((qc, k), num_g, jnp.int32) for _ in q_dev]
  for start in range(0, num_g, gc):
    rows = check_features(gallery[start:start + gc], f'gallery features rows {start}..')
    g = normalize_rows(rows)
    valid = g.shape[0]
    if valid < gc:
      g = np.concatenate([g, np.ones((gc - valid, g.shape[1]), np.float32)])
    g_dev = jnp.asarray(g)
    for j, qd in enumerate(q_dev):
      run_s[j], run_i[j] = _merge(run_s[j], run_i[j], qd, g_dev, jnp.int32(start),
                                  jnp.int32(valid), k=k)
    if progress is not None:
      progress(start + valid, num_g)
  scores = np.concatenate([np.asarray(s) for s in run_s])[:num_q]
  index = np.concatenate([np.asarray(i) for i in run_i])[:num_q].astype(np.int64)
  return scores, index
