"""Pod presets x remat policies x FSDP through ``--mode=aot``: one JSON per setting, then a table.

  python bench/aot_sweep.py --out=aot_runs              # compile every setting not yet done
  python bench/aot_sweep.py --out=aot_runs --table      # the markdown table of what finished

Each setting is what ``python -m ufo_jax.main --mode=aot --config=configs/ufo_l.py:PRESET
--config.model.remat_policy=POLICY --config.mesh.fsdp=F --workdir=OUT/NAME`` does (``aot.run``;
the evaluation step only for the preset's own setting), each in its own process (a ViT-L compile
for a pod takes minutes and several GiB of host memory), one after another; a finished setting
(``OUT/NAME/aot.json``) is skipped, so the sweep resumes. Needs libtpu
(``pip install -e '.[tpu]'``). The table feeds docs/PERFORMANCE.md ("Pods (ahead-of-time
compile)").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ('v5p-128', 'v5e-256', 'v6e-256')
POLICIES = ('none', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable')
FSDP = (1, 4)
GIB = 2.0 ** 30


def settings(presets, policies, fsdps):
  """Every (preset, policy, fsdp): each pod's likely pick first, then the rest."""
  first = [('v5p-128', 'none', 1), ('v5e-256', 'dots_saveable', 1), ('v6e-256', 'none', 1),
           ('v5e-256', 'none', 1), ('v5e-256', 'nothing_saveable', 1),
           ('v5p-128', 'nothing_saveable', 1), ('v5e-256', 'dots_with_no_batch_dims_saveable', 1),
           ('v6e-256', 'nothing_saveable', 1)]
  every = [(p, r, f) for f in fsdps for r in policies for p in presets]
  return [s for s in first if s in every] + [s for s in every if s not in first]


def compile_one(out: str, preset: str, policy: str, fsdp: int) -> None:
  """In this process: ``aot.run`` of ufo_l:PRESET with the policy and FSDP size -> JSON.

  The evaluation embedding step is compiled only for the preset's own setting.
  """
  import importlib.util

  sys.path.insert(0, ROOT)
  from ufo_jax import aot

  spec = importlib.util.spec_from_file_location('ufo_l', os.path.join(ROOT, 'configs',
                                                                      'ufo_l.py'))
  ufo_l = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ufo_l)
  config = ufo_l.get_config(preset)
  own = ufo_l.POD_PRESETS[preset]
  is_preset = policy == own['remat_policy'] and fsdp == own['mesh']['fsdp']
  config.model.remat_policy = policy
  config.mesh.fsdp = fsdp
  result = aot.run(config, preset, compile_eval=is_preset)
  aot.write_json(result, os.path.join(out, f'{preset}_{policy}_fsdp{fsdp}', 'aot.json'))


def run_one(out: str, preset: str, policy: str, fsdp: int, timeout_s: float) -> str:
  name = f'{preset}_{policy}_fsdp{fsdp}'
  workdir = os.path.join(out, name)
  path = os.path.join(workdir, 'aot.json')
  if os.path.exists(path):
    return f'{name}: done before'
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, os.path.abspath(__file__), f'--out={out}',
         f'--one={preset}:{policy}:{fsdp}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  t0 = time.time()
  with open(os.path.join(workdir, 'log.txt'), 'w') as log:
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout_s)
      status = f'exit {proc.returncode}'
    except subprocess.TimeoutExpired:
      status = f'timed out after {timeout_s:.0f}s'
  return f'{name}: {status} in {time.time() - t0:.0f}s'


def _gib(x):
  return f'{x / GIB:.1f}'


def table(out: str) -> list[str]:
  """Markdown rows of every finished setting (and the settings that did not finish)."""
  rows = ['| pod | remat | mesh (data x fsdp) | per-chip memory: args + temp + out - alias = '
          'total (GiB) | HBM used | remat overhead | collectives per step (compiled) | '
          'data-parallel minimum | per host: images (face, person, product, vehicle; P x K) | '
          'compile |',
          '|---|---|---|---|---|---|---|---|---|---|']
  for preset, policy, fsdp in settings(PRESETS, POLICIES, FSDP):
    name = f'{preset}_{policy}_fsdp{fsdp}'
    path = os.path.join(out, name, 'aot.json')
    if not os.path.exists(path):
      if os.path.isdir(os.path.join(out, name)):
        rows.append(f'| {preset} | {policy} | fsdp {fsdp} | did not finish (see log) | | | | | '
                    '| |')
      continue
    r = json.load(open(path))
    ts = r['train_step']
    b = r['batch']
    host = (f'{b["per_host"]} (' + ', '.join(
        str(v['per_host']) + (f' = {v["P"]}x{v["K"]}' if 'P' in v else '')
        for v in b['tasks'].values()) + ')')
    mesh = f'{r["mesh"]["data"]} x {r["mesh"]["fsdp"]}'
    if 'memory_per_chip' not in ts:
      used = f' (needs {ts["used_gib"]:.1f} GiB)' if ts.get('used_gib') else ''
      rows.append(f'| {preset} | {policy} | {mesh} | does not compile: exceeds HBM{used} | '
                  f'> 100% | | | | {host} | {ts["compile_s"]:.0f} s |')
      continue
    m = ts['memory_per_chip']
    mem = (f'{_gib(m.get("argument_size_in_bytes", 0))} + {_gib(m.get("temp_size_in_bytes", 0))}'
           f' + {_gib(m.get("output_size_in_bytes", 0))} - {_gib(m.get("alias_size_in_bytes", 0))}'
           f' = **{m["total_gib"]:.1f}**')
    coll = ', '.join(f'{k} {v["count"]}x {v["bytes"] / GIB:.2f} GiB'
                     for k, v in ts['collectives'].items() if v['count'])
    dp = ts['data_parallel_minimum']['all-reduce']['bytes']
    remat = f'{ts["remat"]["overhead"]:.2f}' if ts.get('remat') else ''
    rows.append(f'| {preset} | {policy} | {mesh} | {mem} | {100 * m["hbm_fraction"]:.0f}% of '
                f'{m["hbm_gib"]:.0f} | {remat} | {coll} | all-reduce {dp / GIB:.2f} GiB | '
                f'{host} | {ts["lower_s"] + ts["compile_s"]:.0f} s |')
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='aot_runs', help='one folder per setting goes here')
  parser.add_argument('--presets', default=','.join(PRESETS))
  parser.add_argument('--policies', default=','.join(POLICIES))
  parser.add_argument('--fsdp', default=','.join(map(str, FSDP)))
  parser.add_argument('--timeout_s', type=float, default=3600)
  parser.add_argument('--table', action='store_true', help='print the table and exit')
  parser.add_argument('--one', default='', help='PRESET:POLICY:FSDP: compile one setting here')
  args = parser.parse_args()
  if args.one:
    preset, policy, fsdp = args.one.split(':')
    compile_one(args.out, preset, policy, int(fsdp))
    return
  if args.table:
    print('\n'.join(table(args.out)))
    return
  for preset, policy, fsdp in settings(args.presets.split(','), args.policies.split(','),
                                       [int(f) for f in args.fsdp.split(',')]):
    print(run_one(args.out, preset, policy, fsdp, args.timeout_s), flush=True)


if __name__ == '__main__':
  main()
