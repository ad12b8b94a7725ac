"""The compile report: the train step (and the evaluation embedding step) compiled without running
it, on the local devices (``--mode=dry_run``) or for a TPU pod on any host (``--mode=aot``).

  python -m ufo_jax.main --mode=dry_run --config=configs/ufo_l.py     # the devices of this host
  python -m ufo_jax.main --mode=aot --config=configs/ufo_l.py:v5p-128 [--topology=v5p:4x4x4]

``run`` compiles the program training actually runs (``step.build``'s ``loop_step``: state,
on-device metric accumulator, batch; both donated). For a pod, libtpu (``pip install -e
'.[tpu]'``) describes the topology without any TPU attached
(``jax.experimental.topologies.get_topology_desc``). It prints and returns (``main`` writes it as
JSON):

- chips, hosts, the mesh, the per-chip and per-host batch of every task (P x K for the identity
  sampled tasks), checked by ``config.validate`` with the pod's process count;
- the parameter count and, for ``dry_run``, the sharding of every state array;
- per-chip memory of each step (arguments, temporaries, outputs, their total less the donated
  aliases) against the chip's HBM (``ufo_jax.hardware``; not on a CPU);
- the collectives of the compiled train step (count and bytes per step, ``ufo_jax.hlo``) beside
  the minimum of data parallelism (one all-reduce of the replicated parameters' gradients);
- model FLOPs (``step.model_flops``, the MFU's numerator) and the rematerialisation overhead:
  compiled FLOPs over model FLOPs, the scanned layer body counted once per layer (XLA's cost
  analysis counts a ``while`` body once; see ``remat_overhead``);
- compile times.

Topologies: cloud names (``v5p-128``: 64 chips, the number counts TensorCores on v5p and chips on
v5e/v6e; ``v5e-256``, ``v6e-256``, ``v5litepod-256``) or libtpu topology strings
(``v5p:4x4x4``, ``v5e:16x16``, ``v6e:16x16``, ``v5e:2x2``), parsed by
``hardware.parse_topology``. XLA's ``optimal_seconds`` is not used (it came out negative for these
steps).
"""

from __future__ import annotations

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
from ufo_jax import hardware, hlo, sharding
from ufo_jax import step as step_lib
from ufo_jax.evaluation import extract
from ufo_jax.hardware import GIB, Topology
from ufo_jax.pytree import path_to_strings

INSTALL_HINT = "pip install -e '.[tpu]'"
DEFAULT_K = 4


class AotError(config_lib.ConfigError):
  """A topology or setting --mode=aot cannot use (one line; main prints it as ``error: ...``)."""


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
    info = hardware.GENERATIONS[topology.generation]
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
# What the compiled step communicates and computes.
# --------------------------------------------------------------------------------------------
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
def _embed_lowered(config: Any, setup: step_lib.Setup, mesh: jax.sharding.Mesh,
                   task: str) -> Any:
  """The evaluation embedding step of ``task``, lowered for ``mesh`` (eval mode, FSDP state)."""
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


def local_topology(devices: list[jax.Device]) -> Topology:
  """The local devices as a ``Topology`` (``--mode=dry_run``): HBM as the runtime reports it,
  0 when unknown (a CPU)."""
  return Topology(name=f'{len(devices)} local {devices[0].platform} devices',
                  generation=devices[0].platform, libtpu_name='local', chips=len(devices),
                  hosts=jax.process_count(), hbm_bytes=hardware.hbm_bytes(devices[0]) or 0)


def run(config: Any, topology: str | None = None, *, devices: list[jax.Device] | None = None,
        compile_eval: bool = True, describe_state: bool = False,
        print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the train (and evaluation embedding) step of ``config`` for ``topology``.

  Args:
    config: the experiment config (``input.source=tfds`` without data: catalog class counts).
    topology: a cloud name (``v5p-128``) or a libtpu topology string (``v5p:4x4x4``); None:
      the local devices (``--mode=dry_run``).
    devices: the devices to compile for (default: libtpu's compile-only devices of the
      topology, or all local devices; tests may pass others).
    compile_eval: also compile the evaluation embedding step.
    describe_state: also print the sharding of every state array.
    print_fn: where the summary lines go.

  Returns:
    The result dict (what ``main`` writes as JSON).
  """
  if topology is None:
    devices = devices or jax.devices()
    topo = local_topology(devices)
  else:
    topo = hardware.parse_topology(topology)
    if devices is None:
      devices = topology_devices(topo)
      # libtpu knows the hosts of the slice (process_index of each chip).
      topo = dataclasses.replace(topo, hosts=len({d.process_index for d in devices}))
  if config.input.source == 'tfds' and not config.input.data_dir:
    config = copy.deepcopy(config)
    config.input.source = 'synthetic'  # class counts from the catalog (full datasets)
    print_fn('input.data_dir is not set: class counts from the catalog (full datasets)')
  batches = per_host_batches(config, topo.hosts, topo.chips)
  mesh = sharding.create_mesh(config.mesh, devices=devices)
  num_classes = {t: config_lib.num_classes(config, t) for t in config_lib.task_names(config)}
  setup = step_lib.build(config, num_classes, mesh)

  t0 = time.time()
  lowered = setup.loop_step.lower(setup.abstract_state, setup.abstract_metrics(),
                                  setup.batch_shapes)
  lower_s = time.time() - t0
  result: dict[str, Any] = {
      'topology': topo.libtpu_name, 'name': topo.name, 'device_kind': devices[0].device_kind,
      'chips': topo.chips, 'hosts': topo.hosts, 'hbm_gib_per_chip': topo.hbm_bytes / GIB,
      'mesh': dict(mesh.shape), 'remat_policy': config.model.remat_policy,
      'scan_layers': bool(config.model.get('scan_layers', False)),
      'config': config.get('name', ''), 'params': hardware.param_count(
          setup.abstract_state['params']),
      'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes,
      'global_batch': config_lib.global_batch_size(config),
      'image_size': int(config.input.image_size), 'batch': batches,
      'model_flops_per_step': (setup.model_flops_per_example or 0.0)
                              * config_lib.global_batch_size(config)}
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- XLA reports "does not fit" as a compile error
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'memory' not in message.lower():
      raise
    result['train_step'] = {'fits': False, 'error': hlo.first_line(message),
                            'used_gib': hlo.used_hbm_gib(message), 'lower_s': lower_s,
                            'compile_s': time.time() - t0 - lower_s}
    for line in summary_lines(result):
      print_fn(line)
    return result
  compile_s = time.time() - t0 - lower_s
  cost = hlo.compiled_cost(compiled)
  memory = hlo.memory_summary(hlo.compiled_memory(compiled), topo.hbm_bytes)
  collectives = hlo.collectives_from_hlo(compiled.as_text())
  minimum = data_parallel_minimum(setup.abstract_state['params'], config.model.dtype)
  examples_per_chip = config_lib.global_batch_size(config) / topo.chips
  remat = remat_overhead(cost.get('flops', 0.0), setup.model_flops, examples_per_chip,
                         bool(config.model.get('scan_layers', False)))
  result['train_step'] = {
      'fits': memory.get('fits'), 'memory_per_chip': memory, 'cost_per_chip': cost,
      'remat': remat, 'collectives': collectives,
      'collective_bytes': sum(v['bytes'] for v in collectives.values()),
      'data_parallel_minimum': minimum, 'lower_s': lower_s, 'compile_s': compile_s}
  if compile_eval:
    task = config_lib.task_names(config)[0]
    t0 = time.time()
    eval_lowered, eval_batch = _embed_lowered(config, setup, mesh, task)
    eval_compiled = eval_lowered.compile()
    result['eval_step'] = {
        'task': task, 'global_batch': eval_batch, 'per_chip': eval_batch // topo.chips,
        'memory_per_chip': hlo.memory_summary(hlo.compiled_memory(eval_compiled),
                                              topo.hbm_bytes),
        'compile_s': time.time() - t0}
  for line in summary_lines(result):
    print_fn(line)
  if describe_state:
    print_fn('state shardings:')
    for line in sharding.describe(setup.abstract_state, setup.state_shardings):
      print_fn('  ' + line)
  return result


def summary_lines(result: dict[str, Any]) -> list[str]:
  """The console summary of a ``run`` result."""
  ts = result['train_step']
  b = result['batch']
  tasks = ', '.join(f'{t} {v["per_chip"]:g}' for t, v in b['tasks'].items())
  host = ', '.join(f'{t} {v["per_host"]}' + (f' ({v["P"]}x{v["K"]})' if 'P' in v else '')
                   for t, v in b['tasks'].items())
  where = (result['name'] if result['topology'] == 'local'
           else f'topology {result["topology"]}')
  lines = [
      f'{where} ({result["device_kind"]}): {result["chips"]} chips, '
      f'{result["hosts"]} hosts, mesh {result["mesh"]}, remat {result["remat_policy"]}',
      f'parameters: {result["params"]:,} (classes {result["num_classes"]}, padded to '
      f'{result["padded_classes"]})',
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
      f'{mem.get("alias_size_in_bytes", 0) / GIB:.2f} = {mem["total_gib"]:.2f} GiB'
      + (f' of {mem["hbm_gib"]:.0f} GiB HBM ({100 * mem["hbm_fraction"]:.0f}%'
         f'{"" if mem["fits"] else ", DOES NOT FIT"})' if 'hbm_gib' in mem else ''),
  ]
  coll = ', '.join(f'{k} {v["count"]} x / {v["bytes"] / GIB:.3f} GiB'
                   for k, v in ts['collectives'].items() if v['count'])
  dp = ts['data_parallel_minimum']['all-reduce']['bytes']
  lines.append(f'collectives per step: {coll or "none"}; data-parallel minimum: one all-reduce '
               f'of {dp / GIB:.3f} GiB')
  lines.append(f'model FLOPs per step: {result["model_flops_per_step"]:.4g} (analytic, 3 x '
               f'forward; XLA per chip {ts["cost_per_chip"].get("flops", 0.0):.4g}, a scanned '
               'layer stack counted once)')
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
