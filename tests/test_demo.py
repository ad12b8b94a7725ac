"""A smaller `make demo`: generated raw data -> data_prep -> training -> 13 benchmarks."""

import json
import os
import subprocess
import sys

from ufo_jax import catalog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_end_to_end_beats_chance(tmp_path):
  workdir = tmp_path / 'demo'
  proc = subprocess.run(
      [sys.executable, '-m', 'ufo_jax.demo', f'--workdir={workdir}', '--size=test'],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout
  assert 'SYNTHETIC' in out and 'GENERATED' in out
  for header in ('CALFW', 'LFW', 'Market1501', 'VehicleID', 'VeRi-Wild', 'SOP'):
    assert header in out
  assert 'UFO ViT-L, drop path 0.2' in out  # the published rows are printed beside ours

  reports = sorted(workdir.glob('run/**/report.json'))
  assert reports, 'no report.json written'
  report = json.loads(reports[-1].read_text())
  ours, chance = report['ours'], report['chance']
  assert set(ours) == set(catalog.BENCHMARKS)
  # Every benchmark's headline metric is computed, a percentage, and above its chance level.
  for name in catalog.BENCHMARKS:
    assert all(0.0 <= v <= 100.0 for v in ours[name]), (name, ours[name])
    assert ours[name][0] > chance[name][0], (name, ours[name], chance[name])
  # Far above chance where the task is easy to learn from the generated identities.
  face = [ours[n][0] for n in ('calfw', 'cplfw', 'lfw', 'cfp_ff', 'cfp_fp', 'agedb_30')]
  assert sum(face) / len(face) > 62.0, ours   # chance: 50
  reid = [ours[n][0] for n in ('market1501', 'dukemtmc', 'msmt17', 'veri776', 'veriwild')]
  assert sum(reid) / len(reid) > 50.0, ours   # chance: under 10
  # A checkpoint and TensorBoard events are written, figures too.
  assert list(workdir.glob('run/checkpoints/*'))
  assert list(workdir.glob('run/events.out.tfevents*')) or list(workdir.glob('run/**/events*'))
  assert list(workdir.glob('run/**/*.png'))
  # The converted data was inspected: one grid per split of the 14 sets, and the demo says where.
  assert f'{workdir}/inspect/<set>_<split>.png' in out
  assert len(list(workdir.glob('inspect/*.png'))) == sum(len(d.splits)
                                                         for d in catalog.DATASETS.values())
  assert 'market1501: ' in (workdir / 'inspect' / 'summary.txt').read_text()
  # It ends with the exported model searching the generated Market-1501 gallery.
  assert (workdir / 'export' / 'model.json').exists()
  assert (workdir / 'export' / 'embed.jax_export').exists()
  assert f'Rank list:   {workdir / "search" / "rank_list.png"}' in out
  assert 'Your own data and tasks: docs/CUSTOM_DATA.md' in out
  assert (workdir / 'search' / 'rank_list.png').exists()
  results = json.loads((workdir / 'search' / 'results.json').read_text())
  assert results['task'] == 'person' and results['results'][0]['matches']
