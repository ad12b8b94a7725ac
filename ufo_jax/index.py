"""FAISS indexes of a gallery's features: build, grow, prune, search (see docs/EXPORT.md).

    python -m ufo_jax.index build --features=G.npz --task=person --kind=ivf --out=DIR
        [--nlist=N] [--m=M] [--nprobe=P] [--ef_search=E]
    python -m ufo_jax.index add --index=DIR --features=MORE.npz
    python -m ufo_jax.index remove --index=DIR --paths=LIST      # a text file or an embed .npz
    python -m ufo_jax.index info --index=DIR
    python -m ufo_jax.search --index=DIR --query=Q.npz           # top-k through the index

The features are the ``--task`` arrays of ``python -m ufo_jax.embed`` files. Similarity is the
cosine (inner product of L2-normalised rows). ``--kind``:

- ``flat``: exact (``IndexFlatIP``), every search reads every vector;
- ``ivf``: ``IndexIVFFlat``, ``--nlist`` k-means cells (default ``sqrt(N)``), a search reads the
  ``--nprobe`` nearest cells (default 16);
- ``ivf_pq``: ``IndexIVFPQ``, the same cells with vectors compressed to ``--m`` bytes (8-bit
  product quantisation; default ``D / 16``; needs 256 vectors or more to train);
- ``hnsw``: ``IndexHNSWFlat``, a graph of ``--m`` links per node (default 32), ``--ef_search``
  candidates per search (default 64).

The cells (ivf, ivf_pq) are trained at ``build`` on a sample of its features and kept as they
are by ``add``. Each entry's id is its row in the index's list of paths. ``remove`` deletes
entries from flat, ivf and ivf_pq indexes; HNSW cannot delete, so its removed entries stay in
the graph and are excluded from every search (a FAISS ``IDSelector``). A removed path is never
returned. Adding a path the index already holds REPLACES its entry (the old one is removed), so
re-embedding changed files and adding them again updates the index; a features file that lists
one path twice is an error.

For the approximate kinds, ``build`` measures recall@10 against exact search on a sample of
its own vectors as queries (each query's own entry left out), prints it and stores it in
``index.json``. The index keeps the ``model_id`` of its features; ``add`` and ``search`` refuse
features of another model (``--allow_mixed_models`` overrides).

Layout of DIR: ``CURRENT`` names the complete version folder (``v000001/``: ``index.faiss``,
``entries.npz`` with the paths and the removed mask, ``index.json``). A write goes to a new
version folder, then replaces ``CURRENT`` atomically (``os.replace``), so a write interrupted at
any point leaves the previous version as it was; the previous version is kept until the next
write.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from ufo_jax import cli
from ufo_jax import embed as embed_lib

KINDS = ('flat', 'ivf', 'ivf_pq', 'hnsw')
APPROXIMATE = ('ivf', 'ivf_pq', 'hnsw')
COMMANDS = ('build', 'add', 'remove', 'info')
CURRENT = 'CURRENT'
INDEX_FILE = 'index.faiss'
ENTRIES_FILE = 'entries.npz'
META_FILE = 'index.json'
FORMAT = 'ufo-jax-index'
RECALL_K = 10
RECALL_QUERIES = 1000
RECALL_SEED = 0
DEFAULT_NPROBE = 16
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 64
HNSW_EF_CONSTRUCTION = 40  # FAISS's default
PQ_BITS = 8
TRAIN_PER_CELL = 64  # ivf k-means trains on at most this many vectors per cell
FAISS_INSTALL = "pip install -e '.[faiss]' (faiss-cpu; faiss-gpu-cu12 on NVIDIA GPUs)"


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'ufo_jax.index needs FAISS ({e}): {FAISS_INSTALL}') from None
  return faiss


def normalized(features: Any) -> np.ndarray:
  """float32 rows of unit L2 norm (zero rows stay zero)."""
  x = np.array(features, np.float32, copy=True, order='C')
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  np.divide(x, np.maximum(norms, 1e-12), out=x)
  return x


def default_nlist(n: int) -> int:
  """``sqrt(n)`` cells, at least 1 and at most ``n // 39`` (FAISS wants 39 vectors per cell)."""
  return int(max(1, min(round(math.sqrt(n)), n // 39)))


def default_pq_m(dim: int) -> int:
  """The largest divisor of ``dim`` not above ``dim / 16`` (16 dimensions per byte), >= 1."""
  target = max(1, dim // 16)
  return next(m for m in range(target, 0, -1) if dim % m == 0)


@dataclasses.dataclass
class Index:
  """An index in memory: the FAISS index, every path ever added (row = id) and which are removed.

  ``meta`` holds kind, task, model_id, dim, the kind's parameters and the measured recall.
  """
  faiss_index: Any
  paths: np.ndarray
  removed: np.ndarray
  meta: dict[str, Any]

  @property
  def kind(self) -> str:
    return self.meta['kind']

  @property
  def task(self) -> str:
    return self.meta['task']

  @property
  def model_id(self) -> str | None:
    return self.meta.get('model_id')

  @property
  def count(self) -> int:
    """Entries a search can return (added, not removed)."""
    return int(len(self.paths) - np.count_nonzero(self.removed))

  def _search_params(self, exhaustive: bool = False):
    faiss = _faiss()
    selector = None
    if self.kind == 'hnsw' and self.removed.any():  # tombstones: HNSW cannot delete
      batch = faiss.IDSelectorBatch(np.flatnonzero(self.removed).astype(np.int64))
      selector = faiss.IDSelectorNot(batch)  # faiss's wrappers keep `batch` alive
    if self.kind in ('ivf', 'ivf_pq'):
      nlist = int(self.meta['nlist'])
      return faiss.SearchParametersIVF(nprobe=nlist if exhaustive else
                                       min(int(self.meta['nprobe']), nlist))
    if self.kind == 'hnsw':
      ef = int(self.meta['ef_search'])
      params = faiss.SearchParametersHNSW(efSearch=max(ef, len(self.paths)) if exhaustive
                                          else ef)
      if selector is not None:
        params.sel = selector
      return params
    return None

  def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the top ``k`` entries per query, by decreasing cosine.

    Every query gets ``min(k, count)`` results: a query the approximate search leaves short
    (few vectors in its probed cells) is searched again exhaustively. Rows index ``paths``.
    """
    q = normalized(queries)
    k = min(int(k), self.count)
    if k < 1:
      return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    scores, rows = self.faiss_index.search(q, k, params=self._search_params())
    short = np.flatnonzero((rows < 0).any(axis=1))
    if len(short) and self.kind in APPROXIMATE:
      scores[short], rows[short] = self.faiss_index.search(
          q[short], k, params=self._search_params(exhaustive=True))
    if (rows >= 0).any() and self.removed[rows[rows >= 0]].any():  # never, by construction
      raise RuntimeError(f'the {self.kind} index returned removed entries')
    return scores, rows

  def add(self, paths: Sequence[str], features: np.ndarray, *,
          normalize: bool = True) -> tuple[int, int]:
    """Adds ``features`` (rows for ``paths``); a path already held replaces its entry.

    ``normalize=False``: the rows are already float32 of unit norm (saves a copy). Returns
    ``(added, replaced)``.
    """
    paths = np.asarray(paths).astype(str)
    unique, counts = np.unique(paths, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f'{int((counts > 1).sum())} path(s) are listed twice in the features '
                       f'(first: {unique[counts > 1][0]}); one entry per path')
    if features.shape[1] != int(self.meta['dim']):
      raise ValueError(f'the features have dimension {features.shape[1]}, the index '
                       f'{self.meta["dim"]} (embedded by another model?)')
    replaced = self.remove(paths, missing_ok=True)
    start = len(self.paths)
    ids = np.arange(start, start + len(paths), dtype=np.int64)
    self.faiss_index.add_with_ids(normalized(features) if normalize else features, ids)
    self.paths = np.concatenate([self.paths.astype(str), paths])
    self.removed = np.concatenate([self.removed, np.zeros(len(paths), bool)])
    return len(paths), replaced

  def remove(self, paths: Sequence[str], *, missing_ok: bool = True) -> int:
    """Removes the entries of ``paths`` it holds; returns how many."""
    live = np.flatnonzero(~self.removed)
    rows = live[np.isin(self.paths[live], np.asarray(paths).astype(str))]
    if not len(rows):
      return 0
    if self.kind != 'hnsw':
      faiss = _faiss()
      self.faiss_index.remove_ids(faiss.IDSelectorBatch(rows.astype(np.int64)))
    self.removed[rows] = True
    return int(len(rows))


# --------------------------------------------------------------------------------------------
# Building and measuring.
# --------------------------------------------------------------------------------------------
def create(kind: str, dim: int, train: np.ndarray, *, nlist: int | None = None,
           m: int | None = None, seed: int = 0) -> tuple[Any, dict[str, Any]]:
  """An empty (trained) FAISS index of ``kind`` for ``dim``-d unit vectors; and its params.

  ``train``: normalised vectors to train the ivf cells and the product quantiser on.
  """
  faiss = _faiss()
  n = len(train)
  params: dict[str, Any] = {}
  if kind == 'flat':
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
  elif kind == 'hnsw':
    m = DEFAULT_HNSW_M if m is None else int(m)
    if m < 2:
      raise ValueError(f'--m: HNSW needs at least 2 links per node, got {m}')
    graph = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index = faiss.IndexIDMap2(graph)
    params = {'m': m, 'ef_construction': HNSW_EF_CONSTRUCTION, 'ef_search': DEFAULT_EF_SEARCH}
  elif kind in ('ivf', 'ivf_pq'):
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
      raise ValueError(f'--nlist={nlist}: an ivf index needs 1 <= nlist <= the number of '
                       f'features ({n})')
    quantizer = faiss.IndexFlatIP(dim)
    if kind == 'ivf':
      index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
      m = default_pq_m(dim) if m is None else int(m)
      if m < 1 or dim % m:
        raise ValueError(f'--m={m}: ivf_pq needs a number of sub-quantisers that divides the '
                         f'dimension {dim}')
      if n < 2 ** PQ_BITS:
        raise ValueError(f'ivf_pq trains {2 ** PQ_BITS} codes per sub-quantiser and needs at '
                         f'least {2 ** PQ_BITS} features, the gallery has {n}; use flat or ivf')
      index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
      params['m'] = m
    index.cp.seed = seed
    sample = train
    if n > TRAIN_PER_CELL * nlist:
      rows = np.random.default_rng(seed).choice(n, TRAIN_PER_CELL * nlist, replace=False)
      sample = train[np.sort(rows)]
    index.train(sample)
    params.update(nlist=nlist, nprobe=min(DEFAULT_NPROBE, nlist), trained_on=len(sample))
  else:
    raise ValueError(f'--kind must be one of {", ".join(KINDS)}, got {kind!r}')
  return index, params


def recall_sample(n: int, queries: int = RECALL_QUERIES, seed: int = RECALL_SEED) -> np.ndarray:
  """The rows ``build`` measures recall with: ``min(queries, n)`` distinct rows, sorted."""
  return np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))


def _drop_self(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
  """Each row of ``rows`` without its query's own id (or its last column), ``k`` columns."""
  out = np.empty((len(rows), k), rows.dtype)
  for i, (r, o) in enumerate(zip(rows, own)):
    keep = r[r != o]
    out[i] = keep[:k]
  return out


def measure_recall(index: Index, vectors: np.ndarray, rows: np.ndarray,
                   k: int = RECALL_K) -> float:
  """Mean fraction of the exact top-``k`` that ``index`` returns, for the queries
  ``vectors[rows]`` (normalised; their own entries left out of both lists). ``vectors`` are
  the index's entries in row order."""
  faiss = _faiss()
  k = min(k, len(vectors) - 1)
  if k < 1:
    return 1.0
  queries = vectors[rows]
  _, truth = faiss.knn(queries, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)  # no copy
  _, found = index.search(queries, k + 1)
  truth, found = _drop_self(truth, rows, k), _drop_self(found, rows, k)
  hits = [len(np.intersect1d(t, f)) for t, f in zip(truth, found)]
  return float(np.mean(hits) / k)


def build(features: str, task: str, kind: str, out: str, *, nlist: int | None = None,
          m: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
          recall_queries: int = RECALL_QUERIES, print_fn: Callable[[str], Any] = print
          ) -> Index:
  """``build``: a new index of ``kind`` from ``features``'s ``task`` array, written to ``out``."""
  if kind not in KINDS:
    raise ValueError(f'--kind must be one of {", ".join(KINDS)}, got {kind!r}')
  if os.path.exists(os.path.join(out, CURRENT)):
    raise FileExistsError(f'--out={out} already holds an index; grow it with `add`, prune it '
                          'with `remove`, or build into a new folder')
  feats = embed_lib.load_features(features, task, 'features')
  model_id = embed_lib.check_same_model([(features, feats.model_id)])
  paths = feats.paths.astype(str)
  t0 = time.time()
  vectors = normalized(feats.features)
  faiss_index, params = create(kind, vectors.shape[1], vectors, nlist=nlist, m=m)
  if nprobe is not None and kind in ('ivf', 'ivf_pq'):
    params['nprobe'] = int(nprobe)
  if ef_search is not None and kind == 'hnsw':
    params['ef_search'] = int(ef_search)
  now = _now()
  meta = {'format': FORMAT, 'kind': kind, 'task': task, 'model_id': model_id,
          'dim': int(vectors.shape[1]), 'metric': 'cosine (inner product of unit rows)',
          **params, 'created': now, 'faiss_version': _faiss().__version__,
          'sources': [os.path.abspath(features)]}
  index = Index(faiss_index, np.zeros(0, str), np.zeros(0, bool), meta)
  index.add(paths, vectors, normalize=False)
  seconds = time.time() - t0
  meta['build_seconds'] = round(seconds, 2)
  line = (f'index build: {index.count} {task} features ({vectors.shape[1]}-d, model '
          f'{model_id}) -> {kind} {_params_text(meta)} in {seconds:.1f}s')
  if kind in APPROXIMATE:
    t = time.time()
    rows = recall_sample(len(vectors), recall_queries)
    meta['recall_at_10'] = round(measure_recall(index, vectors, rows), 4)
    meta['recall'] = {'k': RECALL_K, 'queries': int(len(rows)), 'seed': RECALL_SEED,
                      'entries': index.count,
                      'queries_are': "the index's own vectors, each leaving itself out",
                      'seconds': round(time.time() - t, 2)}
    line += f'; recall@10 {meta["recall_at_10"]:.3f} vs exact ({len(rows)} queries)'
  save(index, out)
  print_fn(f'{line} -> {out}')
  return index


def _params_text(meta: dict[str, Any]) -> str:
  keys = {'ivf': ('nlist', 'nprobe'), 'ivf_pq': ('nlist', 'm', 'nprobe'),
          'hnsw': ('m', 'ef_search')}.get(meta['kind'], ())
  return '(' + ', '.join(f'{k} {meta[k]}' for k in keys) + ')' if keys else '(exact)'


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# --------------------------------------------------------------------------------------------
# Files: versioned folders behind an atomically replaced CURRENT.
# --------------------------------------------------------------------------------------------
def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _current(directory: str) -> str | None:
  path = os.path.join(directory, CURRENT)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return f.read().strip()


def save(index: Index, directory: str) -> str:
  """Writes ``index`` as a new version of ``directory``; returns the version folder."""
  faiss = _faiss()
  os.makedirs(directory, exist_ok=True)
  current = _current(directory)
  number = int(current[1:]) + 1 if current else 1
  version = f'v{number:06d}'
  tmp = os.path.join(directory, f'.tmp-{version}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  index.meta['updated'] = _now()
  index.meta['entries'] = index.count
  index.meta['removed'] = int(np.count_nonzero(index.removed))
  faiss.write_index(index.faiss_index, os.path.join(tmp, INDEX_FILE))
  with open(os.path.join(tmp, ENTRIES_FILE), 'wb') as f:
    np.savez(f, paths=index.paths.astype(str), removed=index.removed)
  with open(os.path.join(tmp, META_FILE), 'w', encoding='utf-8') as f:
    json.dump(index.meta, f, indent=1)
  for name in (INDEX_FILE, ENTRIES_FILE, META_FILE):
    _fsync_path(os.path.join(tmp, name))
  final = os.path.join(directory, version)
  shutil.rmtree(final, ignore_errors=True)  # a leftover of an interrupted write
  os.rename(tmp, final)
  pointer = os.path.join(directory, CURRENT + '.tmp')
  with open(pointer, 'w', encoding='utf-8') as f:
    f.write(version + '\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(pointer, os.path.join(directory, CURRENT))  # the commit point
  _fsync_path(directory)
  for name in os.listdir(directory):  # keep this version and the previous one
    if name not in (version, current) and (name.startswith('.tmp-v') or
                                           (name.startswith('v') and name[1:].isdigit())):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return final


def open_index(directory: str) -> Index:
  """The index of ``directory`` (its CURRENT version), or a one-line error."""
  version = _current(directory)
  if version is None:
    raise FileNotFoundError(f'--index={directory} is not an index folder (no {CURRENT}); '
                            'build one with python -m ufo_jax.index build')
  folder = os.path.join(directory, version)
  faiss = _faiss()
  try:
    with open(os.path.join(folder, META_FILE), encoding='utf-8') as f:
      meta = json.load(f)
    with np.load(os.path.join(folder, ENTRIES_FILE), allow_pickle=False) as entries:
      paths, removed = entries['paths'], entries['removed']
    faiss_index = faiss.read_index(os.path.join(folder, INDEX_FILE))
  except (OSError, ValueError, RuntimeError) as e:
    raise ValueError(f'--index={directory}: version {version} is damaged '
                     f'({type(e).__name__}: {str(e)[:200]})') from None
  if meta.get('format') != FORMAT or len(paths) != len(removed):
    raise ValueError(f'--index={directory}: {folder} is not a ufo-jax index')
  if faiss_index.ntotal != (len(paths) if meta['kind'] == 'hnsw' else
                            len(paths) - np.count_nonzero(removed)):
    raise ValueError(f'--index={directory}: {folder} holds {faiss_index.ntotal} vectors for '
                     f'{len(paths)} paths ({np.count_nonzero(removed)} removed)')
  return Index(faiss_index, paths, removed.astype(bool), meta)


# --------------------------------------------------------------------------------------------
# The commands.
# --------------------------------------------------------------------------------------------
def add(directory: str, features: str, *, allow_mixed_models: bool = False,
        print_fn: Callable[[str], Any] = print) -> Index:
  """``add``: the ``features`` file's entries join the index (a path it holds is replaced)."""
  index = open_index(directory)
  feats = embed_lib.load_features(features, index.task, 'features')
  embed_lib.check_same_model([(directory, index.model_id), (features, feats.model_id)],
                             allow_mixed=allow_mixed_models)
  t0 = time.time()
  added, replaced = index.add(feats.paths, np.asarray(feats.features))
  index.meta.setdefault('sources', []).append(os.path.abspath(features))
  save(index, directory)
  again = f' ({replaced} of them replaced entries of the same path)' if replaced else ''
  print_fn(f'index add: {added} entries{again} in {time.time() - t0:.1f}s; {index.count} '
           f'entries now -> {directory}')
  return index


def read_path_list(path: str) -> list[str]:
  """The paths of ``--paths``: an embed .npz (its ``paths``) or a text file, one per line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'--paths={path} does not exist (a text file with one path per '
                            'line, or an embed .npz)')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      if 'paths' not in data.files:
        raise ValueError(f'--paths={path}: no "paths" array')
      return [str(p) for p in data['paths']]
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f if line.strip()]


def remove(directory: str, paths_file: str, *, print_fn: Callable[[str], Any] = print) -> Index:
  """``remove``: the entries of the listed paths leave the index."""
  index = open_index(directory)
  paths = read_path_list(paths_file)
  removed = index.remove(paths)
  if removed:
    save(index, directory)
  missing = len(set(paths)) - removed
  note = f'; {missing} listed path(s) were not in the index' if missing else ''
  print_fn(f'index remove: {removed} entries removed{note}; {index.count} entries now '
           f'-> {directory}')
  return index


def info(directory: str, print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
  """``info``: counts, kind, model and task of the index."""
  index = open_index(directory)
  meta = dict(index.meta)
  size = sum(os.path.getsize(os.path.join(directory, _current(directory), f))
             for f in (INDEX_FILE, ENTRIES_FILE, META_FILE))
  recall = (f', recall@10 {meta["recall_at_10"]:.3f} (measured at build on '
            f'{meta["recall"]["entries"]} entries)' if 'recall_at_10' in meta else '')
  print_fn(f'index {directory}: {index.count} entries ({meta["removed"]} retired: removed or '
           f'replaced), {meta["kind"]} {_params_text(meta)}, task {meta["task"]}, model '
           f'{meta["model_id"]}, {meta["dim"]}-d{recall}, {size / 2**20:.1f} MiB, '
           f'version {_current(directory)}')
  return meta


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('features', None, 'build / add: an embed .npz (python -m ufo_jax.embed).')
  flags.DEFINE_string('task', None, 'build: which features to index (face, person, ...).')
  flags.DEFINE_enum('kind', 'flat', list(KINDS), 'build: the index kind.')
  flags.DEFINE_string('out', None, 'build: the index folder to create.')
  flags.DEFINE_string('index', None, 'add / remove / info: the index folder.')
  flags.DEFINE_string('paths', None, 'remove: a text file (one path per line) or an embed .npz.')
  flags.DEFINE_integer('nlist', None, 'build, ivf / ivf_pq: k-means cells (default sqrt(N)).')
  flags.DEFINE_integer('m', None, 'build: ivf_pq bytes per vector (default D/16); hnsw links '
                       'per node (default 32).')
  flags.DEFINE_integer('nprobe', None, f'build, ivf / ivf_pq: cells a search reads (default '
                       f'{DEFAULT_NPROBE}).')
  flags.DEFINE_integer('ef_search', None, f'build, hnsw: candidates per search (default '
                       f'{DEFAULT_EF_SEARCH}).')
  flags.DEFINE_integer('recall_queries', RECALL_QUERIES, 'build: queries measuring recall@10.')
  flags.DEFINE_bool('allow_mixed_models', False, 'add: accept features of another model_id.')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    cli.fail(f'expected one command of {", ".join(COMMANDS)}: python -m ufo_jax.index '
             f'{"|".join(COMMANDS)} --flags (got {" ".join(argv[1:]) or "none"})')
  command = argv[1]
  required = {'build': ('features', 'task', 'out'), 'add': ('index', 'features'),
              'remove': ('index', 'paths'), 'info': ('index',)}[command]
  cli.check_args(argv[:1], *required)
  with cli.one_line_errors(FileNotFoundError, FileExistsError, ValueError, ImportError):
    if command == 'build':
      build(FLAGS.features, FLAGS.task, FLAGS.kind, FLAGS.out, nlist=FLAGS.nlist, m=FLAGS.m,
            nprobe=FLAGS.nprobe, ef_search=FLAGS.ef_search, recall_queries=FLAGS.recall_queries)
    elif command == 'add':
      add(FLAGS.index, FLAGS.features, allow_mixed_models=FLAGS.allow_mixed_models)
    elif command == 'remove':
      remove(FLAGS.index, FLAGS.paths)
    else:
      info(FLAGS.index)
  sys.stdout.flush()


if __name__ == '__main__':
  define_flags()
  app.run(main)
