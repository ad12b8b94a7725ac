"""The chips training runs on: one table of peak FLOP/s, HBM and TPU slice shapes.

``CHIPS`` is the one table. ``peak_flops_per_device`` reads it for the MFU of the training log,
``parse_topology`` for ``--mode=aot`` (cloud names such as ``v5p-128`` or libtpu topology
strings such as ``v5p:4x4x4``). ``param_count`` counts the parameters of any pytree of arrays or
``ShapeDtypeStruct``s. This module takes plain values and pytrees: it imports nothing of ufo_jax
but the config error type.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax

from ufo_jax import config as config_lib

GIB = 2.0 ** 30


class TopologyError(config_lib.ConfigError):
  """A TPU topology name that cannot be parsed (one line; main prints it as ``error: ...``)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind, matched against ``device.device_kind``.

  ``peak_bf16``: dense bfloat16 FLOP/s per chip. For TPU generations that ``--mode=aot`` can
  compile for: ``generation`` (libtpu's name), HBM per chip, chips per host, TensorCores per chip
  counted in cloud names (v5p-128 counts cores, v5e-256 chips) and the torus dimensions.
  """
  kind: str
  peak_bf16: float
  generation: str = ''
  hbm_gib: float = 0.0
  chips_per_host: int = 0
  cores_per_chip_in_name: int = 1
  dims: int = 0


# Matched in this order (the first whose kind is in device_kind wins: 'H100 PCIe' before 'H100').
CHIPS: tuple[Chip, ...] = (
    Chip('H100 PCIe', 756e12), Chip('H100', 989e12), Chip('H200', 989e12),
    Chip('GH200', 989e12), Chip('B200', 2250e12), Chip('A100', 312e12),
    Chip('TPU v6', 918e12, 'v6e', hbm_gib=32, chips_per_host=4, dims=2),
    Chip('TPU v5p', 459e12, 'v5p', hbm_gib=95, chips_per_host=4, cores_per_chip_in_name=2,
         dims=3),
    Chip('TPU v5 lite', 197e12, 'v5e', hbm_gib=16, chips_per_host=4, dims=2),
    Chip('TPU v5e', 197e12), Chip('TPU v5', 459e12), Chip('TPU v4', 275e12),
)
GENERATIONS: dict[str, Chip] = {c.generation: c for c in CHIPS if c.generation}
_ALIASES = {'v5litepod': 'v5e'}
_CLOUD_RE = re.compile(r'^(v5p|v5e|v6e|v5litepod)-(\d+)$')
_TOPOLOGY_RE = re.compile(r'^(v5p|v5e|v6e):(\d+(?:x\d+){1,2})$')


def chip(device: jax.Device | None = None) -> Chip | None:
  """The ``CHIPS`` entry of ``device`` (default: the first device), None if unknown (CPU)."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return None
  kind = device.device_kind.lower()
  return next((c for c in CHIPS if c.kind.lower() in kind), None)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of ``device`` (default: the first), None if unknown (e.g. CPU)."""
  found = chip(device)
  return found.peak_bf16 if found else None


def hbm_bytes(device: jax.Device | None = None) -> int | None:
  """Memory of ``device``: what the runtime reports (``bytes_limit``), else the table's HBM,
  else None (a CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 -- compile-only TPU devices and CPUs report nothing
    stats = {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  found = chip(device) if device.platform != 'cpu' else None
  return int(found.hbm_gib * GIB) if found and found.hbm_gib else None


def param_count(tree: Any) -> int:
  """Number of elements of a pytree of arrays or ``ShapeDtypeStruct``s (the parameters of a
  train state's ``params``: padded classifier columns included)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed TPU slice: ``libtpu_name`` is what ``get_topology_desc`` takes."""
  name: str            # as given
  generation: str
  libtpu_name: str     # e.g. 'v5p:4x4x4'
  chips: int
  hosts: int
  hbm_bytes: int

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts


def _shape_for(chips: int, dims: int) -> list[int]:
  """The conventional slice shape of ``chips`` (a power of two): 4 -> 2x2x1, 64 -> 4x4x4,
  256 -> 16x16."""
  shape = [1] * dims
  while math.prod(shape) < chips:
    shape[shape.index(min(shape))] *= 2
  return sorted(d for d in shape if d > 1) + [d for d in shape if d == 1]


def parse_topology(name: str) -> Topology:
  """``v5p-128`` / ``v5e-256`` / ``v6e-256`` / ``v5p:4x4x4`` / ``v5e:2x2`` -> ``Topology``."""
  text = str(name).strip().lower()
  known = ("cloud names such as v5p-128, v5e-256, v6e-256 or topologies such as v5p:4x4x4, "
           "v5e:16x16")
  if m := _CLOUD_RE.match(text):
    gen = _ALIASES.get(m.group(1), m.group(1))
    info = GENERATIONS[gen]
    count = int(m.group(2))
    if count % info.cores_per_chip_in_name:
      raise TopologyError(f'--topology={name}: {gen} cloud names count TensorCores '
                          f'({info.cores_per_chip_in_name} per chip); {count} is not a multiple')
    chips = count // info.cores_per_chip_in_name
    if chips < 1 or chips & (chips - 1):
      raise TopologyError(f'--topology={name}: {chips} chips is not a power of two; pass the '
                          f'topology string instead (e.g. {gen}:4x4x4)')
    shape = _shape_for(chips, info.dims)
  elif m := _TOPOLOGY_RE.match(text):
    gen = m.group(1)
    info = GENERATIONS[gen]
    shape = [int(s) for s in m.group(2).split('x')]
    if len(shape) != info.dims or min(shape) < 1:
      raise TopologyError(f'--topology={name}: {gen} topologies have {info.dims} dimensions '
                          f'(e.g. {gen}:{"x".join(["4"] * info.dims)})')
    chips = math.prod(shape)
  else:
    raise TopologyError(f'--topology={name!r}: unknown TPU topology; expected {known}')
  hosts = max(1, chips // info.chips_per_host)
  return Topology(name=str(name), generation=gen, libtpu_name=f'{gen}:{"x".join(map(str, shape))}',
                  chips=chips, hosts=hosts, hbm_bytes=int(info.hbm_gib * GIB))
