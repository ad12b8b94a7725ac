"""--mode=aot (ufo_jax.aot): topology names, pod presets, the per-host batch contract at pod scale,
the HLO collective count, and a real compile of ufo_tiny for a TPU v5e:2x2 (libtpu, no TPU)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ufo_jax import aot, hardware, hlo
from ufo_jax import config as config_lib
from ufo_jax.data import pipeline
from ufo_jax.data.sources import MemorySplit, TaskSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
PRESETS = ('v5p-128', 'v5e-256', 'v6e-256')


def _main(args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'ufo_jax.main', *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Topology names.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, libtpu, chips, hosts, hbm', [
    ('v5p-128', 'v5p:4x4x4', 64, 16, 95),   # v5p cloud names count TensorCores, 2 per chip
    ('v5e-256', 'v5e:16x16', 256, 64, 16),
    ('v5litepod-256', 'v5e:16x16', 256, 64, 16),
    ('v6e-256', 'v6e:16x16', 256, 64, 32),
    ('v5p-8', 'v5p:2x2x1', 4, 1, 95),
    ('v5p-32', 'v5p:2x2x4', 16, 4, 95),
    ('v6e-128', 'v6e:8x16', 128, 32, 32),
    ('v5p:4x4x4', 'v5p:4x4x4', 64, 16, 95),
    ('V5E:2x2', 'v5e:2x2', 4, 1, 16),
    ('v6e:16x16', 'v6e:16x16', 256, 64, 32),
])
def test_parse_topology(name, libtpu, chips, hosts, hbm):
  t = hardware.parse_topology(name)
  assert (t.libtpu_name, t.chips, t.hosts, t.hbm_bytes) == (libtpu, chips, hosts, hbm * GIB)


@pytest.mark.parametrize('name, words', [
    ('v5p-127', 'multiple'),        # odd TensorCore count
    ('v5e-96', 'power of two'),
    ('v5p:4x4', '3 dimensions'),
    ('v5e:4x4x4', '2 dimensions'),
    ('tpu-128', 'unknown TPU topology'),
    ('v7x-64', 'unknown TPU topology'),
])
def test_parse_topology_errors(name, words):
  with pytest.raises(hardware.TopologyError, match=words) as e:
    hardware.parse_topology(name)
  assert '\n' not in str(e.value)


def test_without_libtpu_the_error_says_how_to_install(monkeypatch):
  from jax.experimental import topologies

  def missing(**kwargs):
    raise RuntimeError('JAX TPU support not installed; cannot generate TPU topology.')

  monkeypatch.setattr(topologies, 'get_topology_desc', missing)
  with pytest.raises(aot.AotError, match=r"pip install -e '\.\[tpu\]'"):
    aot.topology_devices(hardware.parse_topology('v5e:2x2'))


# --------------------------------------------------------------------------------------------
# Pod presets of configs/ufo_l.py.
# --------------------------------------------------------------------------------------------
def _ufo_l_module():
  import importlib.util

  spec = importlib.util.spec_from_file_location('ufo_l_test', os.path.join(ROOT, 'configs',
                                                                            'ufo_l.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_presets_set_mesh_and_remat_and_keep_the_recipe():
  ufo_l = _ufo_l_module()
  base = ufo_l.get_config()
  assert 'pod' not in base and base.mesh.to_dict() == {'data': -1, 'fsdp': 1}
  assert base.model.remat_policy == 'nothing_saveable'  # no argument: unchanged
  assert set(ufo_l.POD_PRESETS) == set(PRESETS)
  for name in PRESETS:
    config = ufo_l.get_config(name)
    preset = ufo_l.POD_PRESETS[name]
    assert config.pod == name
    assert config.model.remat_policy == preset['remat_policy']
    assert config.model.remat_policy in config_lib.REMAT_POLICIES
    assert config.mesh.to_dict() == preset['mesh']
    # Everything else is the recipe.
    rest = config.to_dict()
    rest.pop('pod')
    rest['mesh'] = base.mesh.to_dict()
    rest['model']['remat_policy'] = base.model.remat_policy
    assert rest == base.to_dict()
  tiny = config_lib.load_config('ufo_tiny')  # loads ufo_l.get_config() with no argument
  assert tiny.name == 'ufo_tiny' and 'pod' not in tiny


def test_unknown_preset_is_a_one_line_error():
  with pytest.raises(ValueError, match='known: v5p-128, v5e-256, v6e-256'):
    _ufo_l_module().get_config('v5p-64')
  proc = _main(['--mode=aot', '--config=configs/ufo_l.py:v5p-64'], timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')][0]
  assert 'unknown pod preset' in line and 'v5p-128, v5e-256, v6e-256' in line
  assert 'Traceback' not in proc.stderr


# --------------------------------------------------------------------------------------------
# The per-host batch contract at pod scale (docs/INPUT.md: each host reads its slice of a task).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize('preset, hosts, per_host', [
    ('v5p-128', 16, {'face': 64, 'person': 32, 'product': 32, 'vehicle': 32}),
    ('v5e-256', 64, {'face': 16, 'person': 8, 'product': 8, 'vehicle': 8}),
    ('v6e-256', 64, {'face': 16, 'person': 8, 'product': 8, 'vehicle': 8}),
])
def test_per_host_batches_of_every_preset(preset, hosts, per_host):
  config = _ufo_l_module().get_config(preset)
  config.input.source = 'synthetic'
  topo = hardware.parse_topology(preset)
  assert topo.hosts == hosts
  b = aot.per_host_batches(config, topo.hosts, topo.chips)
  assert {t: v['per_host'] for t, v in b['tasks'].items()} == per_host
  assert b['per_host'] == sum(per_host.values()) and b['per_host'] * hosts == 2560
  for task in ('person', 'product', 'vehicle'):  # P x K with K = 4
    v = b['tasks'][task]
    assert v['K'] == 4 and v['P'] * v['K'] == v['per_host']
  assert 'P' not in b['tasks']['face']
  assert b['per_chip'] == 2560 / topo.chips


def test_per_host_batch_that_breaks_p_x_k_is_refused():
  config = _ufo_l_module().get_config('v5e-256')
  config.input.source = 'synthetic'
  config.tasks.person.batch_size = 384  # 6 per host: not a multiple of K = 4
  with pytest.raises(config_lib.ConfigError, match='tasks.person.batch_size'):
    aot.per_host_batches(config, 64, 256)


def _png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value % 256, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def _pod_sources(config, ids_per_task: int, records_per_id: int, face_records: int):
  """Small in-memory datasets with enough identities for every host (P of them each)."""
  sources = {}
  for task in config_lib.task_names(config):
    splits = []
    datasets = config.tasks[task].datasets
    ids_per_dataset = -(-ids_per_task // len(datasets))
    for name in datasets:
      if task == 'face':
        labels = np.arange(face_records) % 97
        n_ids = 97
      else:
        labels = np.repeat(np.arange(ids_per_dataset), records_per_id)
        n_ids = ids_per_dataset
      examples = [{'image': _png(int(lab)), 'label': int(lab), 'id': int(lab), 'camera': 0,
                   'path': b''} for lab in labels]
      splits.append(MemorySplit(name, 'train', examples, num_ids=n_ids))
    sources[task] = TaskSource(task, splits)
  return sources


@pytest.mark.parametrize('preset', ['v5e-256', 'v5p-128'])
def test_input_pipeline_gives_every_host_its_slice(preset):
  config = _ufo_l_module().get_config(preset)
  config.input.source = 'synthetic'
  config.input.image_size = 16
  config.input.worker_count = 0
  config.input.augment.autoaugment_prob = 0.0
  config.input.augment.erasing_prob = 0.0
  topo = hardware.parse_topology(preset)
  hosts = topo.hosts
  config_lib.validate(config, num_devices=topo.chips, num_processes=hosts)
  # P identities per host: 2 on 64 hosts, 8 on 16 hosts -> 128 identities per task
  sources = _pod_sources(config, ids_per_task=128, records_per_id=4, face_records=64 * hosts)
  tasks = config_lib.task_names(config)
  local = [int(config.tasks[t].batch_size) // hosts for t in tasks]
  seen = {t: [] for t in tasks}
  for process_index in (0, 1, hosts - 1):
    ds = pipeline.build_train_dataset(config, sources, process_index=process_index,
                                      process_count=hosts)
    it = iter(ds)
    try:
      batch = next(it)
    finally:
      it.close()
    assert batch['image'].shape == (sum(local), 16, 16, 3)
    np.testing.assert_array_equal(batch['task'], np.repeat(np.arange(len(tasks)), local))
    for i, task in enumerate(tasks):
      labels = batch['label'][batch['task'] == i]
      assert len(labels) == local[i]
      if config.tasks[task].sampler == 'identity':
        groups = labels.reshape(-1, 4)  # P identities x K = 4 images, each identity once
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == len(groups)
        # this host's identities only (class c goes to host c % hosts)
        assert set((groups[:, 0] % hosts).tolist()) == {process_index}
      seen[task].append(set(labels.tolist()))
  for task in ('person', 'product', 'vehicle'):  # hosts read disjoint identities
    a, b, c = seen[task]
    assert not (a & b) and not (a & c) and not (b & c)


# --------------------------------------------------------------------------------------------
# Collectives from HLO text, remat overhead arithmetic.
# --------------------------------------------------------------------------------------------
HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0:T(8,128)}) parameter(0)
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %ag = bf16[32,128]{1,0:T(8,128)(2,1)} all-gather(%x), replica_groups=[1,4]<=[4], dimensions={0}
  %ar = (f32[8,128]{1,0:T(8,128)}, f32[128]{0}) all-reduce(%x, %y), replica_groups={{0,1,2,3}}
  ROOT %t = (s32[], f32[8,128]) tuple(%i, %x)
}

%cond (p.1: (s32[], f32[8,128])) -> pred[] {
  %c = s32[]{:T(128)} constant(24)
  %p.1 = (s32[], f32[8,128]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %c), direction=LT
}

%fused (param_0: f32[64,16]) -> f32[16,16] {
  %param_0 = f32[64,16]{1,0} parameter(0)
  ROOT %rs = f32[16,16]{1,0} reduce-scatter(%param_0), replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (x: f32[8,128]) -> f32[] {
  %x = f32[8,128]{1,0} parameter(0)
  %w = (s32[], f32[8,128]) while(%init), condition=%cond, body=%body
  %f = f32[16,16]{1,0} fusion(%z), kind=kCustom, calls=%fused
  %ars = f32[256]{0} all-reduce-start(%v), replica_groups={{0,1}}, to_apply=%add
  %ard = f32[256]{0} all-reduce-done(%ars)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%q), channel_id=3
  %cpd = f32[4]{0} collective-permute-done(%cps)
  %ags = (bf16[2,64]{1,0}, bf16[8,64]{1,0}) all-gather-start(%u), replica_groups=[1,4]<=[4]
  %agd = bf16[8,64]{1,0} all-gather-done(%ags)
  %ars2 = (f32[3]{0}, bf16[5]{0}) all-reduce-start(%v1, %v2), replica_groups={{0,1}}
  %ard2 = (f32[3]{0}, bf16[5]{0}) all-reduce-done(%ars2)
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_from_hlo_counts_loops_async_and_fusions():
  out = hlo.collectives_from_hlo(HLO)
  # in the while body: 24 iterations (bound of the condition); one async all-gather of 8x64 bf16
  assert out['all-gather'] == {'count': 25, 'bytes': 24 * 32 * 128 * 2 + 8 * 64 * 2}
  # 24 tuple all-reduces of (8x128 + 128) f32, async all-reduces of 256 f32 and (3 f32, 5 bf16)
  assert out['all-reduce'] == {'count': 26,
                               'bytes': 24 * (8 * 128 + 128) * 4 + 256 * 4 + 3 * 4 + 5 * 2}
  # inside a fusion: the full (pre-scatter) buffer, result x group size
  assert out['reduce-scatter'] == {'count': 1, 'bytes': 64 * 16 * 4}
  # async start returning (operand, result, contexts): the done's result
  assert out['collective-permute'] == {'count': 1, 'bytes': 4 * 4}
  assert out['all-to-all'] == {'count': 0, 'bytes': 0}


@pytest.mark.parametrize('message, gib', [
    ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
     'temporaries (20.51G) exceeds available HBM (15.75G).', 20.51),
    ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space '
     'hbm. Used 20.5G of 15.75G hbm. Exceeded hbm capacity by 4.7G.', 20.5),
    ('RESOURCE_EXHAUSTED: something else', None),
])
def test_what_a_step_that_does_not_fit_needed(message, gib):
  assert hlo.used_hbm_gib(message) == (pytest.approx(gib) if gib else None)


def test_remat_overhead_counts_the_scanned_body_once_per_layer():
  split = {'layer': 10.0, 'rest': 4.0, 'depth': 24, 'total': 244.0}
  # no recomputation: XLA's figure counts one layer -> the step is the model's FLOPs
  r = aot.remat_overhead(2 * (4.0 + 10.0), split, examples=2, scanned=True)
  assert r['overhead'] == pytest.approx(1.0)
  # full recomputation of the forward pass (4/3 of the layer FLOPs)
  r = aot.remat_overhead(2 * (4.0 + 10.0 * 4 / 3), split, examples=2, scanned=True)
  assert r['overhead'] == pytest.approx((4 + 24 * 40 / 3) / 244)
  r = aot.remat_overhead(488.0, split, examples=2, scanned=False)
  assert r['overhead'] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# A real compile for a TPU topology (libtpu on this CPU host).
# --------------------------------------------------------------------------------------------
def test_aot_compiles_ufo_tiny_for_v5e_2x2(tmp_path):
  import importlib.util

  assert importlib.util.find_spec('libtpu') is not None, (
      "libtpu is part of the test install: make install (pip install -e '.[tpu]')")
  # ufo_tiny, 2 layers at 32 x 32 (the TPU compile's CPU time grows with the program)
  proc = _main(['--mode=aot', '--config=configs/ufo_tiny.py', '--topology=v5e:2x2',
                '--config.model.depth=2', '--config.input.image_size=32',
                f'--workdir={tmp_path}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  r = json.loads((tmp_path / 'aot.json').read_text())
  assert r['topology'] == 'v5e:2x2' and r['chips'] == 4 and r['hosts'] == 1
  assert 'v5 lite' in r['device_kind'].lower()
  assert r['mesh'] == {'data': 4, 'fsdp': 1}
  assert r['batch']['per_chip'] == 80 / 4
  ts = r['train_step']
  mem = ts['memory_per_chip']
  assert ts['fits'] and 0 < mem['total_bytes'] < 1 * GIB and mem['hbm_gib'] == 16
  assert mem['total_bytes'] == (mem['argument_size_in_bytes'] + mem['temp_size_in_bytes']
                                + mem['output_size_in_bytes'] - mem['alias_size_in_bytes'])
  # the state (parameters + SGD has no momentum) is donated: outputs alias the arguments
  assert mem['alias_size_in_bytes'] > 0
  # data parallel: the replicated parameters' (float32) gradients are all-reduced once per step
  # (plus the sharded softmax's and BatchNorm necks' statistics: 12% of this tiny model's)
  dp = ts['data_parallel_minimum']['all-reduce']['bytes']
  assert dp == pytest.approx(4 * (r['params'] - sum(
      192 * c for c in r['padded_classes'].values())), rel=1e-6)
  assert dp <= ts['collectives']['all-reduce']['bytes'] <= 1.25 * dp
  # ufo_tiny rematerialises nothing: compiled FLOPs within a few % of the model's
  assert 1.0 <= ts['remat']['overhead'] < 1.15
  ev = r['eval_step']
  assert ev['per_chip'] == 64 // 4 and 0 < ev['memory_per_chip']['total_bytes'] < mem[
      'total_bytes']
  assert 'wrote' in proc.stdout and 'rematerialisation overhead' in proc.stdout


def test_aot_main_compiles_for_the_preset_pod_and_writes_json(tmp_path, monkeypatch):
  calls = []

  def fake_run(config, topology, **kwargs):
    calls.append(topology)
    return {'topology': hardware.parse_topology(topology).libtpu_name}

  monkeypatch.setattr(aot, 'run', fake_run)
  aot.main(_ufo_l_module().get_config('v5e-256'), None, str(tmp_path), print_fn=lambda s: None)
  assert calls == ['v5e-256']
  assert json.loads((tmp_path / 'aot.json').read_text()) == {'topology': 'v5e:16x16'}
  aot.main(_ufo_l_module().get_config('v5e-256'), 'v5p:4x4x4', str(tmp_path),
           print_fn=lambda s: None)  # --topology wins over the preset
  assert calls[-1] == 'v5p:4x4x4'
  with pytest.raises(aot.AotError, match='needs --topology'):
    aot.main(_ufo_l_module().get_config(), None, str(tmp_path), print_fn=lambda s: None)
