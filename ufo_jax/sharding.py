"""Device mesh, parameter sharding rules and batch placement (docs/TRAINING.md, Sharding).

The mesh has two axes, ``data`` and ``fsdp`` (``config.mesh``; -1 = all remaining devices). Every
array of the train state (parameters, optimizer state, BatchNorm statistics, rng state) gets its
``PartitionSpec`` from ONE rule on its path and shape (``partition_spec``):

1. CosFace class weights (a path ending in ``class_weights``, shape ``(D, C)``): the class
   dimension is split over ALL devices, ``P(None, ('data', 'fsdp'))`` (model-parallel softmax,
   as insightface's Partial FC). Heads pad their class count to a multiple of the device count
   (``ufo_jax.models.heads.padded_num_classes``) and keep the padded classes out of the loss.
2. FSDP: any other array with at least ``FSDP_MIN_SIZE`` elements is split over ``fsdp`` on its
   largest dimension divisible by the ``fsdp`` size (ties: the later dimension).
3. Everything else (biases, norms, BatchNorm statistics, rng keys, counters) is replicated.

The optimizer state mirrors the parameters' paths (e.g. ``.../trace/heads/face/class_weights``),
so the same rule shards it like its parameter. Batches are split over ``('data', 'fsdp')`` on
their leading dimension; ``make_global_batch`` assembles the global batch from each process's
local slice with ``jax.make_array_from_process_local_data`` (one process, one GPU machine or a
multi-host pod alike).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ufo_jax import config as config_lib
from ufo_jax.pytree import path_to_strings

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over all devices
CLASS_AXES = ('data', 'fsdp')  # so is the class dimension of the classifiers
FSDP_MIN_SIZE = 2 ** 18  # elements (1 MiB in float32): smaller arrays stay replicated
CLASS_WEIGHTS_NAME = 'class_weights'


def create_mesh(mesh_config: Any, devices: list[jax.Device] | None = None) -> Mesh:
  """The ``('data', 'fsdp')`` mesh of ``config.mesh`` over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh((shape['data'], shape['fsdp']), MESH_AXES, axis_types=axis_types,
                       devices=devices)


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """The ``PartitionSpec`` of one state array (see the module docstring for the rules)."""
  if path and path[-1] == CLASS_WEIGHTS_NAME and len(shape) == 2:
    shards = math.prod(mesh.shape[a] for a in CLASS_AXES)
    if shape[1] % shards:
      raise ValueError(f'{"/".join(path)}: {shape[1]} classes cannot be split over the '
                       f'{shards} devices of the mesh {dict(mesh.shape)}; the head must be '
                       f'built with class_multiple={shards}')
    return P(None, CLASS_AXES)
  fsdp = mesh.shape['fsdp']
  if fsdp > 1 and shape and math.prod(shape) >= FSDP_MIN_SIZE:
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if candidates:
      dim = max(candidates, key=lambda d: (shape[d], d))
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """``NamedSharding``s for every leaf of ``tree`` (arrays or ShapeDtypeStructs) by the rules."""

  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(path_to_strings(path), tuple(leaf.shape), mesh))

  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all devices."""
  return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's local slice of every field.

  Every process passes its own ``(B_local, ...)`` arrays; the global arrays have leading size
  ``B_local * process_count`` and process ``i``'s rows sit on its own devices.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def abstract_batch(batch_shapes: Mapping[str, jax.ShapeDtypeStruct],
                   mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Global ``ShapeDtypeStruct``s with the batch sharding (for lowering without data)."""
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
          for k, v in batch_shapes.items()}


def describe(tree: Any, shardings: Any) -> list[str]:
  """One line per leaf: path, shape, dtype and PartitionSpec (for dry runs and logs)."""
  lines = []
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, specs):
    name = '/'.join(path_to_strings(path))
    lines.append(f'{name:<60} {str(tuple(leaf.shape)):<22} {str(leaf.dtype):<10} '
                 f'{sharding.spec}')
  return lines
