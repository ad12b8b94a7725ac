"""Embedding extraction: a test split -> the task's neck output of every image (docs/EVALUATION.md).

    emb = extract_embeddings(graphdef, state, batches, 'person', mesh=mesh,
                             augment_config=config.input.augment)
    emb.features   # (N, D) float32, rows in dataset order (sorted by ``index``)
    emb.ids, emb.cameras, emb.index   # (N,) int64 side arrays of the same rows

``batches`` are this process's local batches of ``ufo_jax.data.create_eval_dataset`` (``image``
uint8, ``mask``, ``index``, ``id``, ``camera``). Each global batch is assembled from the local
parts of all processes (``jax.make_array_from_process_local_data``, through
``ufo_jax.sharding.make_global_batch``) and split over every device of the mesh on its batch
axis; ONE jitted function merges the model (``nnx.merge``), normalises the uint8 images on the
device (``device_ops.preprocess``, no augmentation) and calls ``model.embed`` (eval mode). The
model state keeps the shardings it has (the train state's FSDP layout). The outputs come back
replicated, so every process ends with the same embeddings of ALL rows; rows with ``mask``
False (padding, undecodable images) are dropped and the rest sorted by ``index``.

All processes must iterate the same number of batches (``EvalDataset`` guarantees it); a local
batch whose size the local devices do not divide is padded with masked rows.

The embeddings are computed in float32 by default (``config.eval.dtype``), whatever dtype the
model trained in: ``with_compute_dtype`` gives the model's graph the compute dtype ``dtype``
(every module's ``dtype`` attribute; the parameters are float32 and stay as they are).
'bfloat16' is the faster option, the reference evaluates in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import types
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ufo_jax import sharding
from ufo_jax.data import device_ops

LOG_EVERY_S = 30.0  # seconds between progress lines
SIDE_KEYS = ('mask', 'id', 'camera', 'index')
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # config.eval.dtype
DEFAULT_DTYPE = 'float32'


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """Embeddings of the valid rows of one split, in dataset order.

  Attributes:
    features: ``(N, D)`` float32 neck outputs.
    ids: ``(N,)`` int64 identity of each row (-1 where the split has none).
    cameras: ``(N,)`` int64 camera of each row (-1 where none).
    index: ``(N,)`` int64 row of the split (ascending; for face sets row ``2i``/``2i + 1`` are
      the two sides of pair ``i``). Rows whose image did not decode are absent.
    num_rows: rows the split has (``index`` values are in ``[0, num_rows)``), when known.
  """

  features: np.ndarray
  ids: np.ndarray
  cameras: np.ndarray
  index: np.ndarray
  num_rows: int | None = None

  def __len__(self) -> int:
    return int(self.features.shape[0])

  def take(self, rows: np.ndarray) -> Embeddings:
    """The subset of rows ``rows`` (positions in this object)."""
    return Embeddings(self.features[rows], self.ids[rows], self.cameras[rows], self.index[rows],
                      self.num_rows)


def split_model(model: Any) -> tuple[nnx.GraphDef, tuple[Any, ...]]:
  """``(graphdef, states)`` of an NNX module, or of a ``(graphdef, state...)`` tuple as it is."""
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return graphdef, (state,)
  if isinstance(model, (tuple, list)) and model and isinstance(model[0], nnx.GraphDef):
    graphdef, *states = model
    flat: list[Any] = []
    for s in states:
      flat.extend(s if isinstance(s, (tuple, list)) else [s])
    if not flat:
      raise ValueError('a (graphdef, state) model needs at least one state')
    return graphdef, tuple(flat)
  raise ValueError(f'expected an nnx.Module or a (graphdef, state) tuple, got {type(model)}')


def model_tasks(graphdef: nnx.GraphDef, states: tuple[Any, ...]) -> tuple[str, ...]:
  """The task names (heads) of a split multi-task model."""
  return tuple(nnx.merge(graphdef, *states).tasks)


def state_mesh(states: Any) -> Mesh | None:
  """The mesh of the first state array with a ``NamedSharding``, or None."""
  for leaf in jax.tree.leaves(states):
    s = getattr(leaf, 'sharding', None)
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def place_state(states: Any, mesh: Mesh) -> Any:
  """Arrays already on ``mesh`` keep their sharding; any other array is replicated on it.

  A model built outside the mesh (tests, tools) becomes usable by the sharded extraction; the
  train state, already laid out on the mesh, is not moved. With several processes, every
  process must hold the same values of such local arrays.
  """
  replicated = sharding.replicated(mesh)

  def place(x):
    s = getattr(x, 'sharding', None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, replicated)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      raise ValueError('the model state is laid out on another mesh than the evaluation mesh; '
                       'pass the mesh the state was created on')
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # rng streams: place the key data
      data = place(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, replicated, lambda idx: host[idx])

  return jax.tree.map(place, states)


def with_compute_dtype(graphdef: nnx.GraphDef, states: tuple[Any, ...],
                       dtype: str | None) -> nnx.GraphDef:
  """The graph of the same model computing in ``dtype`` ('float32' or 'bfloat16').

  Sets the ``dtype`` attribute (the compute dtype of nnx.Linear, Conv, LayerNorm, BatchNorm
  and of the backbones' own input casts) of every module; the parameters and their
  shardings are untouched, so the result merges with the same ``states``. None: unchanged.
  """
  if dtype is None:
    return graphdef
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f'config.eval.dtype: expected one of {tuple(COMPUTE_DTYPES)}, got {dtype!r}')
  model = nnx.merge(graphdef, *states)
  for _, module in nnx.iter_modules(model):
    if 'dtype' in vars(module):
      module.dtype = COMPUTE_DTYPES[dtype]
  return nnx.split(model)[0]


@functools.lru_cache(maxsize=16)
def _embed_fn(graphdef: nnx.GraphDef, task: str, mesh: Mesh, mean: float, std: float):
  """The jitted ``(states, batch) -> (embeddings, side arrays)``, all outputs replicated."""
  normalize_only = types.SimpleNamespace(mean=mean, std=std, erasing_prob=0.0)

  def embed(states, batch):
    model = nnx.merge(graphdef, *states)
    images = device_ops.preprocess(batch['image'], None, normalize_only, train=False)
    features = model.embed(images, task)
    return features, {k: batch[k] for k in SIDE_KEYS}

  return jax.jit(embed, out_shardings=sharding.replicated(mesh))


def _pad_rows(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every field of a local batch to ``size`` rows (mask False, index -1)."""
  missing = [k for k in ('image',) + SIDE_KEYS if k not in batch]
  if missing:
    raise ValueError(f'an eval batch lacks {missing}; expected the fields of '
                     'ufo_jax.data.create_eval_dataset: image, mask, id, camera, index')
  n = len(batch['mask'])
  if n > size:
    raise ValueError(f'a local eval batch has {n} rows, more than the first batch\'s {size}; '
                     'all batches of a split must have the same size')
  out = {}
  for key in ('image',) + SIDE_KEYS:
    v = np.asarray(batch[key])
    if n < size:
      fill = False if key == 'mask' else (0 if key == 'image' else -1)
      v = np.concatenate([v, np.full((size - n,) + v.shape[1:], fill, v.dtype)])
    out[key] = v
  out['mask'] = out['mask'].astype(bool)
  for key in ('id', 'camera', 'index'):
    out[key] = out[key].astype(np.int32)
  return out


def extract_embeddings(graphdef: nnx.GraphDef, state: Any, batches: Iterable[Mapping[str, Any]],
                       task: str, *, mesh: Mesh, augment_config: Any, progress: bool = True,
                       name: str | None = None, num_rows: int | None = None,
                       log_every_s: float = LOG_EVERY_S,
                       dtype: str | None = DEFAULT_DTYPE) -> Embeddings:
  """The task's embedding of every valid row of ``batches``, gathered on every process.

  Args:
    graphdef: the model's graph definition (``nnx.split``).
    state: its state: one ``nnx.State`` or a tuple of them (e.g. ``(params, model_state)``).
      Arrays keep their shardings; those not on ``mesh`` are replicated on it.
    batches: this process's local eval batches (``image`` (b, S, S, 3) uint8, ``mask``,
      ``index``, ``id``, ``camera``); every process must yield the same number.
    task: the head whose neck output is the embedding ('face', 'person', ...).
    mesh: the device mesh; the batch axis is split over ``('data', 'fsdp')``.
    augment_config: ``config.input.augment`` (its ``mean`` and ``std`` normalise the images).
    progress: log a progress line (images/s) every ``log_every_s`` seconds and at the end.
    name: what to call the split in the log (e.g. ``'market1501/query'``).
    num_rows: rows of the split, for the log and ``Embeddings.num_rows`` (default:
      ``batches.num_examples`` when present).
    dtype: the compute dtype of the embedding ('float32', the default, or 'bfloat16'; see
      ``with_compute_dtype``); None: the dtype the model was built with.

  Returns:
    ``Embeddings`` of the rows with ``mask`` True, sorted by ``index``.
  """
  _, states = split_model((graphdef, state))
  states = place_state(states, mesh)
  graphdef = with_compute_dtype(graphdef, states, dtype)
  fn = _embed_fn(graphdef, task, mesh, float(augment_config.mean), float(augment_config.std))
  local_devices = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
  num_rows = num_rows if num_rows is not None else getattr(batches, 'num_examples', None)
  total_batches = len(batches) if hasattr(batches, '__len__') else None
  label = name or task

  parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
  pending = None
  size = None
  start = last_log = time.time()
  images_done = 0
  num_batches = 0
  for batch in batches:
    if size is None:
      size = math.ceil(len(batch['mask']) / local_devices) * local_devices
    batch = _pad_rows(batch, size)
    global_batch = sharding.make_global_batch(batch, mesh)
    out = fn(states, global_batch)  # dispatched; fetched after the next batch is dispatched
    if pending is not None:
      parts.append(jax.device_get(pending))
    pending = out
    num_batches += 1
    images_done += int(batch['mask'].sum()) * jax.process_count()
    now = time.time()
    if progress and now - last_log >= log_every_s:
      logging.info('extract %s [%s]: batch %d/%s, ~%d images, %.1f images/s', label, task,
                   num_batches, total_batches if total_batches is not None else '?',
                   images_done, images_done / max(now - start, 1e-9))
      last_log = now
  if pending is not None:
    parts.append(jax.device_get(pending))
  if not parts:
    raise ValueError(f'extract {label}: no batch to embed (empty split?)')

  features = np.concatenate([np.asarray(p[0]) for p in parts]).astype(np.float32, copy=False)
  side = {k: np.concatenate([np.asarray(p[1][k]) for p in parts]) for k in SIDE_KEYS}
  keep = side['mask'].astype(bool)
  order = np.argsort(side['index'][keep], kind='stable')
  index = side['index'][keep][order].astype(np.int64)
  if len(index) and index[0] < 0:
    raise ValueError(f'extract {label}: a row with mask True has index {index[0]}; valid rows '
                     'need their row number in the split')
  if len(index) > 1 and np.any(np.diff(index) == 0):
    raise ValueError(f'extract {label}: some rows came twice (duplicate index values); the '
                     'processes did not read disjoint parts of the split')
  emb = Embeddings(features=features[keep][order], ids=side['id'][keep][order].astype(np.int64),
                   cameras=side['camera'][keep][order].astype(np.int64), index=index,
                   num_rows=None if num_rows is None else int(num_rows))
  if progress:
    elapsed = time.time() - start
    logging.info('extract %s [%s]: %d rows of %s in %d batches, %.1fs, %.1f images/s', label,
                 task, len(emb), num_rows if num_rows is not None else '?', num_batches, elapsed,
                 len(emb) / max(elapsed, 1e-9))
  return emb
