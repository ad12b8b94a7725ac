"""Ahead-of-time compilation for a TPU pod on any host: ``--mode=aot`` (pod readiness).

  python -m ufo_jax.main --mode=aot --config=configs/ufo_l.py:v5p-128 [--topology=v5p:4x4x4]

With libtpu installed (``pip install -e '.[tpu]'``), JAX describes a TPU topology without any TPU
attached (``jax.experimental.topologies.get_topology_desc(topology_name=..., platform='tpu')``);
the train step (``train.build`` + ``setup.train_step.lower(...).compile()``, as ``train.dry_run``)
and the evaluation embedding step (``ufo_jax.evaluation.extract``'s jitted ``model.embed``) are
compiled for its devices. ``run`` prints and returns (and ``main`` writes as JSON):

- chips, hosts, the mesh, the per-chip and per-host batch of every task (P x K for the identity
  sampled tasks), checked by ``config.validate`` with the pod's process count;
- per-chip memory of each step (arguments, temporaries, outputs, their total less the donated
  aliases) against the chip's HBM;
- the collectives of the compiled train step (all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute: count and bytes per step, parsed from the compiled HLO, loops counted once
  per iteration) beside the minimum of data parallelism (one all-reduce of the replicated
  parameters' float32 gradients);
- the rematerialisation overhead: compiled FLOPs over model FLOPs (``train.model_flops_per_
  example``), the scanned layer body counted once per layer (XLA's cost analysis counts a
  ``while`` body once; see ``remat_overhead``);
- compile times.

Topologies: cloud names (``v5p-128``: 64 chips, the number counts TensorCores on v5p and chips on
v5e/v6e; ``v5e-256``, ``v6e-256``, ``v5litepod-256``) or libtpu topology strings
(``v5p:4x4x4``, ``v5e:16x16``, ``v6e:16x16``, ``v5e:2x2``). XLA's ``optimal_seconds`` is not used
(it came out negative for these steps).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import sharding, train
from ufo_jax.pytree import path_to_strings

GIB = 2.0 ** 30
INSTALL_HINT = "pip install -e '.[tpu]'"
DEFAULT_K = 4


class AotError(config_lib.ConfigError):
  """A topology or setting --mode=aot cannot use (one line; main prints it as ``error: ...``)."""


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: HBM per chip, chips per host, TensorCores per chip in cloud names."""
  hbm_gib: float
  chips_per_host: int
  cores_per_chip_in_name: int  # v5p cloud names count TensorCores (2 per chip)
  dims: int                    # 3: torus (v5p); 2: v5e, v6e


GENERATIONS: dict[str, Generation] = {
    'v5p': Generation(hbm_gib=95, chips_per_host=4, cores_per_chip_in_name=2, dims=3),
    'v5e': Generation(hbm_gib=16, chips_per_host=4, cores_per_chip_in_name=1, dims=2),
    'v6e': Generation(hbm_gib=32, chips_per_host=4, cores_per_chip_in_name=1, dims=2),
}
_ALIASES = {'v5litepod': 'v5e'}
_CLOUD_RE = re.compile(r'^(v5p|v5e|v6e|v5litepod)-(\d+)$')
_TOPOLOGY_RE = re.compile(r'^(v5p|v5e|v6e):(\d+(?:x\d+){1,2})$')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


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
      raise AotError(f'--topology={name}: {gen} cloud names count TensorCores '
                     f'({info.cores_per_chip_in_name} per chip); {count} is not a multiple')
    chips = count // info.cores_per_chip_in_name
    if chips < 1 or chips & (chips - 1):
      raise AotError(f'--topology={name}: {chips} chips is not a power of two; pass the '
                     f'topology string instead (e.g. {gen}:4x4x4)')
    shape = _shape_for(chips, info.dims)
  elif m := _TOPOLOGY_RE.match(text):
    gen = m.group(1)
    info = GENERATIONS[gen]
    shape = [int(s) for s in m.group(2).split('x')]
    if len(shape) != info.dims or min(shape) < 1:
      raise AotError(f'--topology={name}: {gen} topologies have {info.dims} dimensions '
                     f'(e.g. {gen}:{"x".join(["4"] * info.dims)})')
    chips = math.prod(shape)
  else:
    raise AotError(f'--topology={name!r}: unknown TPU topology; expected {known}')
  hosts = max(1, chips // info.chips_per_host)
  return Topology(name=str(name), generation=gen, libtpu_name=f'{gen}:{"x".join(map(str, shape))}',
                  chips=chips, hosts=hosts, hbm_bytes=int(info.hbm_gib * GIB))


def _attached_tpu_chips() -> int:
  """TPU chips on this host's PCI bus (0 on a laptop, a CPU VM or a GPU machine)."""
  try:
    from jax._src import hardware_utils

    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # noqa: BLE001 -- a private helper; assume chips (change nothing) if it moved
    return -1


def topology_devices(topology: Topology) -> list[jax.Device]:
  """The compile-only devices of ``topology`` (needs libtpu; AotError with the fix if missing)."""
  from jax.experimental import topologies

  # On a host without TPU chips: libtpu's lockfile (/tmp/libtpu_lockfile) would let only one
  # process at a time describe a topology, and libtpu prints warnings about the TPU VM it does not
  # run on; neither concerns a compile-only topology.
  quiet = {}
  if _attached_tpu_chips() == 0:
    info = GENERATIONS[topology.generation]
    prefix = 'v5litepod' if topology.generation == 'v5e' else topology.generation
    quiet = {'ALLOW_MULTIPLE_LIBTPU_LOAD': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
             'TPU_ACCELERATOR_TYPE': f'{prefix}-{topology.chips * info.cores_per_chip_in_name}'}
  saved = {k: os.environ.get(k) for k in quiet}
  for k, v in quiet.items():
    os.environ.setdefault(k, v)
  try:
    desc = topologies.get_topology_desc(topology_name=topology.libtpu_name, platform='tpu')
  except RuntimeError as e:
    if 'not installed' in str(e) or 'TPU' in str(e) and 'support' in str(e):
      raise AotError(f'--mode=aot needs libtpu to compile for TPU topologies: {INSTALL_HINT} '
                     '(no TPU is needed)') from None
    raise AotError(f'libtpu cannot describe the topology {topology.libtpu_name}: '
                   f'{str(e).splitlines()[0]}') from None
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
  devices = list(desc.devices)
  if len(devices) != topology.chips:
    raise AotError(f'topology {topology.libtpu_name}: libtpu gave {len(devices)} devices, '
                   f'expected {topology.chips} chips')
  return devices


# --------------------------------------------------------------------------------------------
# Batch contract per host and chip.
# --------------------------------------------------------------------------------------------
def per_host_batches(config: Any, hosts: int, chips: int) -> dict[str, Any]:
  """Per-host and per-chip images of every task; raises ConfigError if a slice cannot work.

  Runs ``config.validate`` with the pod's process (host) and device counts: every task batch
  must split evenly over the hosts, and an identity-sampled task's per-host slice must be P x K.
  """
  config_lib.validate(config, num_devices=chips, num_processes=hosts)
  out: dict[str, Any] = {'hosts': hosts, 'chips_per_host': chips // hosts, 'tasks': {}}
  for task in config_lib.task_names(config):
    t = config.tasks[task]
    local = int(t.batch_size) // hosts
    entry = {'global': int(t.batch_size), 'per_host': local,
             'per_chip': int(t.batch_size) / chips}
    if t.sampler == 'identity':
      entry['P'], entry['K'] = local // int(t.num_instances), int(t.num_instances)
    out['tasks'][task] = entry
  gb = config_lib.global_batch_size(config)
  out['per_host'] = gb // hosts
  out['per_chip'] = gb / chips
  return out


# --------------------------------------------------------------------------------------------
# Collectives from the compiled HLO text.
# --------------------------------------------------------------------------------------------
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
                's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
                's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY_RE = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_COMP_RE = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')
_CALLEE_RE = re.compile(r'\b(body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES_RE = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION_RE = re.compile(r'condition=%?([\w.\-]+)')
_INT_CONSTANT_RE = re.compile(r'=\s*[su](?:8|16|32|64)\[\]\S*\s+constant\((\d+)\)')


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
  """Iterations of a ``while``: XLA's known_trip_count, else the bound ``i < N`` of its condition
  (a scan counts from 0), else 1."""
  if t := _TRIP_RE.search(line):
    return int(t.group(1))
  if c := _CONDITION_RE.search(line):
    cond = comps.get(c.group(1), [])
    bounds = [int(m.group(1)) for ln in cond if (m := _INT_CONSTANT_RE.search(ln))]
    if len(bounds) == 1 and any('direction=LT' in ln for ln in cond):
      return bounds[0]
  return 1


def _array_bytes(shape_text: str) -> int:
  """Bytes of every array in an HLO shape (a tuple counts all its elements)."""
  total = 0.0
  for dtype, dims in _ARRAY_RE.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def _group_size(line: str) -> int:
  """Participants per replica group of a collective (1 when not stated)."""
  if m := re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line):
    return int(m.group(2))
  if m := re.search(r'replica_groups=\{\{([0-9,]*)\}', line):
    return len([x for x in m.group(1).split(',') if x])
  return 1


def collectives_from_hlo(hlo_text: str) -> dict[str, dict[str, float]]:
  """Count and bytes per step of each collective kind in a compiled HLO module's text.

  Bytes are the full buffer of each collective: the result of an all-reduce, all-gather,
  all-to-all or collective-permute, the operand (result x group size) of a reduce-scatter. Async
  pairs count once (at ``*-start``, with the bytes of the matching ``*-done``'s result). A
  collective inside a ``while`` body counts once per iteration (XLA's ``known_trip_count``, else
  the bound of the loop condition ``i < N``: scanned layers count once per layer); in a
  computation called from several places, once per call.
  """
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_RE.match(line)
      if m and '=' not in line.split('{')[0].split('(')[0]:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    comps[current].append(line)
  if entry is None:
    return {}

  # Calls between computations: how many times each runs per step.
  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for comp, lines in comps.items():
    for line in lines:
      trip = _trip_count(line, comps) if ' while(' in line else 1
      for kind, callee in _CALLEE_RE.findall(line):
        if kind == 'to_apply':  # reduction lambdas
          continue
        calls[comp].append((callee, trip if kind == 'body' else 1))
      if b := _BRANCHES_RE.search(line):
        for callee in b.group(1).split(','):
          calls[comp].append((callee.strip().lstrip('%'), 1))
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(comp: str, times: int, depth: int = 0) -> None:
    if depth > 64:
      return
    runs[comp] += times
    for callee, factor in calls.get(comp, ()):
      if callee in comps:
        visit(callee, times * factor, depth + 1)

  visit(entry, 1)

  # Result shapes of the *-done ops by the name of their *-start operand.
  done_shapes: dict[str, str] = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTR_RE.match(line)
      if m and m.group(2).endswith('-done'):
        operand = m.group(3).split(')')[0].split(',')[0].strip().split(' ')[-1].lstrip('%')
        done_shapes[operand] = m.group(1)

  out = {k: {'count': 0, 'bytes': 0} for k in COLLECTIVES}
  for comp, lines in comps.items():
    times = runs.get(comp, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTR_RE.match(line)
      if not m:
        continue
      shape, opcode = m.group(1), m.group(2)
      base = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
      if base not in out or opcode.endswith('-done'):
        continue
      name = line.split('=')[0].strip().split(' ')[-1].lstrip('%')
      if opcode.endswith('-start') and name in done_shapes:
        shape = done_shapes[name]  # a start may return (operands, results, contexts)
      nbytes = _array_bytes(shape)
      if base == 'reduce-scatter':
        nbytes *= _group_size(line)
      out[base]['count'] += times
      out[base]['bytes'] += nbytes * times
  return out


def data_parallel_minimum(abstract_params: Any, compute_dtype: Any = jnp.float32
                          ) -> dict[str, Any]:
  """What pure data parallelism must communicate per step: one all-reduce of the gradients of
  the replicated parameters (the class-sharded CosFace weights need none), in the compute dtype
  (a bfloat16 model's weight gradients come out of bfloat16 matmuls; XLA all-reduces them before
  the conversion to the float32 parameters). ``float32_bytes``: the same gradients in float32."""
  count = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    names = path_to_strings(path)
    if names and names[-1] == sharding.CLASS_WEIGHTS_NAME:
      continue
    count += math.prod(leaf.shape)
  nbytes = count * jnp.dtype(compute_dtype).itemsize
  return {'all-reduce': {'count': 1, 'bytes': int(nbytes)}, 'float32_bytes': int(4 * count),
          'dtype': jnp.dtype(compute_dtype).name}


# --------------------------------------------------------------------------------------------
# FLOPs: rematerialisation overhead.
# --------------------------------------------------------------------------------------------
def vit_flops_split(config: Any, num_classes: dict[str, int]) -> dict[str, float] | None:
  """Analytic training FLOPs per example (3 x forward), split into one layer and the rest.

  The same formula as ``train.model_flops_per_example``: per layer ``2 T (4 D^2 + 2 D M) +
  4 T^2 D``; the rest the patch embedding ``2 N 3 p^2 D`` and the heads ``2 D C`` per task.
  """
  from ufo_jax.models import vit

  if config.model.backbone != 'vit':
    return None
  cfg = vit.VARIANTS[config.model.variant]
  depth = int(config.model.depth) or cfg.depth
  patches = (int(config.input.image_size) // cfg.patch) ** 2
  tokens = patches + 1
  d, m = cfg.width, cfg.mlp_dim
  layer = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens ** 2 * d
  rest = 2 * patches * 3 * cfg.patch ** 2 * d + sum(2 * d * c for c in num_classes.values())
  return {'layer': 3.0 * layer, 'rest': 3.0 * rest, 'depth': depth,
          'total': 3.0 * (depth * layer + rest)}


def remat_overhead(compiled_flops: float, split: dict[str, float] | None, examples: float,
                   scanned: bool) -> dict[str, float] | None:
  """Compiled FLOPs over model FLOPs per chip, the scanned layer body counted once per layer.

  XLA counts a ``while`` body once. With ``scan_layers`` the compiled figure is ``rest_c +
  layer_c``; taking the non-layer part as compiled without recomputation (``rest_c = rest``,
  nothing outside the blocks is rematerialised), one layer costs ``layer_c = compiled - rest``
  and the step ``rest + depth x layer_c``. Without scan the compiled figure is the step's.
  """
  if not split or not compiled_flops or not examples:
    return None
  model = split['total'] * examples
  if scanned:
    rest = split['rest'] * examples
    layer_c = compiled_flops - rest
    step = rest + split['depth'] * layer_c
  else:
    step = compiled_flops
  return {'compiled_flops_per_chip': step, 'model_flops_per_chip': model,
          'xla_flops_per_chip_body_once': compiled_flops, 'overhead': step / model}


# --------------------------------------------------------------------------------------------
# Compile.
# --------------------------------------------------------------------------------------------
def memory_summary(memory: dict[str, int], hbm_bytes: int) -> dict[str, float]:
  """Per-chip bytes: arguments + temporaries + outputs - aliases, and the share of HBM."""
  total = (memory.get('argument_size_in_bytes', 0) + memory.get('temp_size_in_bytes', 0)
           + memory.get('output_size_in_bytes', 0) - memory.get('alias_size_in_bytes', 0))
  return {**memory, 'total_bytes': int(total), 'total_gib': total / GIB,
          'hbm_gib': hbm_bytes / GIB, 'hbm_fraction': total / hbm_bytes,
          'fits': total <= hbm_bytes, 'free_fraction': 1.0 - total / hbm_bytes}


def _embed_lowered(config: Any, setup: train.Setup, mesh: jax.sharding.Mesh, task: str) -> Any:
  """The evaluation embedding step of ``task``, lowered for ``mesh`` (eval mode, FSDP state)."""
  from ufo_jax.evaluation import extract

  params = setup.abstract_state['params']
  model_state = setup.abstract_state['model_state']
  model = nnx.merge(setup.graphdef, params, model_state)
  model.eval()
  graphdef, eval_params, eval_rest = nnx.split(model, nnx.Param, ...)
  augment = config.input.augment
  fn = extract._embed_fn(graphdef, task, mesh, float(augment.mean), float(augment.std))
  chips = mesh.size
  batch = math.ceil(int(config.eval.batch_size) / chips) * chips
  size = int(config.input.image_size)
  shapes = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)}
  for key in extract.SIDE_KEYS:
    shapes[key] = jax.ShapeDtypeStruct((batch,), bool if key == 'mask' else jnp.int32)
  batch_shapes = sharding.abstract_batch(shapes, mesh)
  states = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s.sharding),
                        (params, model_state), (eval_params, eval_rest))
  return fn.lower(states, batch_shapes), batch


def run(config: Any, topology: str, *, devices: list[jax.Device] | None = None,
        compile_eval: bool = True, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the train (and evaluation embedding) step of ``config`` for ``topology``.

  Args:
    config: the experiment config (``input.source=tfds`` without data: catalog class counts).
    topology: a cloud name (``v5p-128``) or a libtpu topology string (``v5p:4x4x4``).
    devices: the devices to compile for (default: libtpu's compile-only devices of the
      topology; tests may pass others).
    compile_eval: also compile the evaluation embedding step.
    print_fn: where the summary lines go.

  Returns:
    The result dict (what ``main`` writes as JSON).
  """
  topo = parse_topology(topology)
  if devices is None:
    devices = topology_devices(topo)
    # libtpu knows the hosts of the slice (process_index of each chip).
    topo = dataclasses.replace(topo, hosts=len({d.process_index for d in devices}))
  if config.input.source == 'tfds' and not config.input.data_dir:
    config = copy.deepcopy(config)
    config.input.source = 'synthetic'  # class counts from the catalog (full datasets)
  batches = per_host_batches(config, topo.hosts, topo.chips)
  mesh = sharding.create_mesh(config.mesh, devices=devices)
  num_classes = {t: config_lib.num_classes(config, t) for t in config_lib.task_names(config)}
  setup = train.build(config, num_classes, mesh)

  t0 = time.time()
  lowered = setup.train_step.lower(setup.abstract_state, setup.batch_shapes)
  lower_s = time.time() - t0
  params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state['params'])))
  result: dict[str, Any] = {
      'topology': topo.libtpu_name, 'name': topo.name, 'device_kind': devices[0].device_kind,
      'chips': topo.chips, 'hosts': topo.hosts, 'hbm_gib_per_chip': topo.hbm_bytes / GIB,
      'mesh': dict(mesh.shape), 'remat_policy': config.model.remat_policy,
      'scan_layers': bool(config.model.get('scan_layers', False)),
      'config': config.get('name', ''), 'params': params,
      'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes,
      'global_batch': config_lib.global_batch_size(config),
      'image_size': int(config.input.image_size), 'batch': batches}
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- XLA reports "does not fit" as a compile error
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'memory' not in message.lower():
      raise
    result['train_step'] = {'fits': False, 'error': _first_line(message),
                            'used_gib': _used_hbm_gib(message), 'lower_s': lower_s,
                            'compile_s': time.time() - t0 - lower_s}
    for line in summary_lines(result):
      print_fn(line)
    return result
  compile_s = time.time() - t0 - lower_s
  cost = train.compiled_cost(compiled)
  memory = memory_summary(train.compiled_memory(compiled), topo.hbm_bytes)
  collectives = collectives_from_hlo(compiled.as_text())
  minimum = data_parallel_minimum(setup.abstract_state['params'], config.model.dtype)
  split = vit_flops_split(config, setup.num_classes)
  examples_per_chip = config_lib.global_batch_size(config) / topo.chips
  remat = remat_overhead(cost.get('flops', 0.0), split, examples_per_chip,
                         bool(config.model.get('scan_layers', False)))
  result['train_step'] = {
      'fits': memory['fits'], 'memory_per_chip': memory, 'cost_per_chip': cost, 'remat': remat,
      'collectives': collectives,
      'collective_bytes': sum(v['bytes'] for v in collectives.values()),
      'data_parallel_minimum': minimum, 'lower_s': lower_s, 'compile_s': compile_s}
  if compile_eval:
    task = config_lib.task_names(config)[0]
    t0 = time.time()
    eval_lowered, eval_batch = _embed_lowered(config, setup, mesh, task)
    eval_compiled = eval_lowered.compile()
    result['eval_step'] = {
        'task': task, 'global_batch': eval_batch, 'per_chip': eval_batch // topo.chips,
        'memory_per_chip': memory_summary(train.compiled_memory(eval_compiled), topo.hbm_bytes),
        'compile_s': time.time() - t0}
  for line in summary_lines(result):
    print_fn(line)
  return result


def _first_line(message: str) -> str:
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
  return lines[0][:500] if lines else ''


def _used_hbm_gib(message: str) -> float | None:
  """The HBM a failed compile wanted, from XLA's "Used 20.5G of 15.75G hbm" or "memory required
  for HLO temporaries (20.51G) exceeds available HBM (15.75G)" (None if neither)."""
  m = (re.search(r'Used\s+([0-9.]+)([KMGT])\s+of\s+[0-9.]+[KMGT]\s+hbm', message)
       or re.search(r'required for [^(]*\(([0-9.]+)([KMGT])\) exceeds', message))
  if not m:
    return None
  scale = {'K': 2.0 ** -20, 'M': 2.0 ** -10, 'G': 1.0, 'T': 1024.0}
  return float(m.group(1)) * scale[m.group(2)]


def summary_lines(result: dict[str, Any]) -> list[str]:
  """The console summary of a ``run`` result."""
  ts = result['train_step']
  b = result['batch']
  tasks = ', '.join(f'{t} {v["per_chip"]:g}' for t, v in b['tasks'].items())
  host = ', '.join(f'{t} {v["per_host"]}' + (f' ({v["P"]}x{v["K"]})' if 'P' in v else '')
                   for t, v in b['tasks'].items())
  lines = [
      f'topology {result["topology"]} ({result["device_kind"]}): {result["chips"]} chips, '
      f'{result["hosts"]} hosts, mesh {result["mesh"]}, remat {result["remat_policy"]}',
      f'batch per chip {b["per_chip"]:g} ({tasks}); per host {b["per_host"]} ({host})']
  if 'memory_per_chip' not in ts:
    used = f' (needs {ts["used_gib"]:.1f} GiB)' if ts.get('used_gib') else ''
    lines.append(f'train step DOES NOT FIT in the {result["hbm_gib_per_chip"]:.0f} GiB HBM of a '
                 f'chip{used}: {ts["error"]}')
    return lines
  mem = ts['memory_per_chip']
  lines += [
      f'train step memory per chip: arguments {mem.get("argument_size_in_bytes", 0) / GIB:.2f} '
      f'+ temporaries {mem.get("temp_size_in_bytes", 0) / GIB:.2f} + outputs '
      f'{mem.get("output_size_in_bytes", 0) / GIB:.2f} - aliased '
      f'{mem.get("alias_size_in_bytes", 0) / GIB:.2f} = {mem["total_gib"]:.2f} GiB of '
      f'{mem["hbm_gib"]:.0f} GiB HBM ({100 * mem["hbm_fraction"]:.0f}%'
      f'{"" if mem["fits"] else ", DOES NOT FIT"})',
  ]
  coll = ', '.join(f'{k} {v["count"]} x / {v["bytes"] / GIB:.3f} GiB'
                   for k, v in ts['collectives'].items() if v['count'])
  dp = ts['data_parallel_minimum']['all-reduce']['bytes']
  lines.append(f'collectives per step: {coll or "none"}; data-parallel minimum: one all-reduce '
               f'of {dp / GIB:.3f} GiB')
  if ts['remat']:
    lines.append(f'rematerialisation overhead: {ts["remat"]["overhead"]:.3f} x model FLOPs '
                 f'({ts["remat"]["compiled_flops_per_chip"]:.4g} compiled / '
                 f'{ts["remat"]["model_flops_per_chip"]:.4g} model FLOPs per chip and step)')
  lines.append(f'compile time: train step {ts["lower_s"] + ts["compile_s"]:.1f}s')
  if 'eval_step' in result:
    ev = result['eval_step']
    em = ev['memory_per_chip']
    lines[-1] += (f'; eval embedding step ({ev["task"]}, {ev["per_chip"]} images/chip) '
                  f'{ev["compile_s"]:.1f}s, {em["total_gib"]:.2f} GiB per chip')
  return lines


def write_json(result: dict[str, Any], path: str) -> str:
  """Writes ``result`` as indented JSON to ``path``; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2, sort_keys=True)
    f.write('\n')
  return path


def main(config: Any, topology: str | None, workdir: str | None, *,
         print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """``--mode=aot``: the topology from ``--topology`` or the config's preset (``config.pod``);
  the JSON goes to ``WORKDIR/aot.json`` (default: ``./aot_<topology>.json``)."""
  topology = topology or config.get('pod', None)
  if not topology:
    raise AotError('--mode=aot needs --topology (e.g. v5p-128 or v5p:4x4x4) or a pod preset '
                   'config (e.g. --config=configs/ufo_l.py:v5p-128)')
  result = run(config, topology, print_fn=print_fn)
  tag = re.sub(r'[^\w.-]', '_', result['topology'])
  path = os.path.join(workdir, 'aot.json') if workdir else f'aot_{tag}.json'
  write_json(result, path)
  print_fn(f'wrote {path}')
  return result
