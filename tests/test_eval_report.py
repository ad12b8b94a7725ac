"""Tests of the evaluation report (the UFO paper's table layout) and the PNG figures."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ufo_jax import catalog
from ufo_jax.evaluation import figures, report


def some_results():
  cmc = np.linspace(0.9, 1.0, 50)
  return {
      'lfw': {'accuracy': 0.9983, 'accuracy_std': 0.002, 'threshold': 1.42},
      'cfp_fp': {'accuracy': 0.5, 'accuracy_std': 0.01, 'threshold': 1.0},
      'market1501': {'cmc': cmc, 'mAP': 0.8512, 'mINP': 0.5, 'num_valid_queries': 3368},
      'vehicleid': {'rank1': 0.8012, 'rank5': 0.93, 'mAP': 0.8523, 'mINP': 0.8,
                    'rank1_std': 0.004, 'mAP_std': 0.003, 'cmc': cmc},
      'sop': {1: 0.8711, 10: 0.95, 100: 0.98, 1000: 0.999},
  }


def test_published_rows_as_data():
  assert list(report.PUBLISHED) == ['best single-task, no re-rank', 'UFO ViT-L, drop path 0.1',
                                    'UFO ViT-L, drop path 0.2']
  dp02 = report.PUBLISHED['UFO ViT-L, drop path 0.2']
  assert list(dp02) == list(catalog.BENCHMARKS)
  assert dp02['calfw'] == (95.92,) and dp02['msmt17'] == (88.10, 72.17)
  assert dp02['sop'] == (89.23,)
  assert report.PUBLISHED['best single-task, no re-rank']['market1501'] == (96.3, 91.5)
  assert report.PUBLISHED['UFO ViT-L, drop path 0.1']['vehicleid'] == (85.35, 90.09)


def test_write_report_markdown_and_json(tmp_path):
  results = some_results()
  chance = {'lfw': {'accuracy': 0.5}, 'market1501': {'cmc': [0.002], 'mAP': 0.003}}
  md = report.write_report(results, str(tmp_path), step=1200, name='ufo-tiny', chance=chance)
  out = tmp_path / 'eval' / 'step_1200'
  assert (out / 'report.md').read_text() == md
  lines = md.splitlines()
  header = next(line for line in lines if line.startswith('| model'))
  assert header.split(' | ')[1:] == [
      'CALFW', 'CPLFW', 'LFW', 'CFP-FF', 'CFP-FP', 'AgeDB-30', 'Market1501', 'DukeMTMC',
      'MSMT17', 'VeRi-776', 'VehicleID', 'VeRi-Wild', 'SOP |']
  ours = next(line for line in lines if line.startswith('| **ufo-tiny**'))
  cells = [c.strip() for c in ours.strip('|').split('|')][1:]
  assert cells == ['-', '-', '99.83', '-', '50.00', '-', '90.00/85.12', '-', '-', '-',
                   '80.12/85.23', '-', '87.11']
  dp01 = next(line for line in lines if line.startswith('| UFO ViT-L, drop path 0.1'))
  assert '96.17/91.67' in dp01 and '87.11' in dp01
  best = next(line for line in lines if line.startswith('| best single-task'))
  assert '| 96.3/91.5 |' in best and '| 96.20 |' in best
  chance_row = next(line for line in lines if line.startswith('| chance level'))
  assert '| 50.00 |' in chance_row and '| 0.20/0.30 |' in chance_row
  assert 'mINP 50.00' in md and 'R@10 95.00' in md and 'threshold 1.42' in md
  assert 'Not evaluated: CALFW' in md
  data = json.loads((out / 'report.json').read_text())
  assert data['step'] == 1200 and data['name'] == 'ufo-tiny'
  assert data['columns'] == list(catalog.BENCHMARKS)
  assert data['ours']['market1501'] == pytest.approx([90.0, 85.12])
  assert data['ours']['sop'] == pytest.approx([87.11])
  assert 'calfw' not in data['ours']
  assert data['published']['UFO ViT-L, drop path 0.2']['veri776'] == [97.74, 89.25]
  assert data['chance']['lfw'] == [50.0]
  assert data['metrics']['sop']['1'] == 0.8711
  assert len(data['metrics']['market1501']['cmc']) == 50


def test_report_without_step_and_json_keys(tmp_path):
  results = {'sop': {'1': 0.5, '10': 0.7}}  # as read back from JSON
  md = report.write_report(results, str(tmp_path))
  assert os.path.exists(tmp_path / 'report.md') and os.path.exists(tmp_path / 'report.json')
  assert '| 50.00 |' in md


def test_format_table_and_errors():
  table = report.format_table(some_results(), published=False)
  assert table.count('\n') == 2  # header, rule, our row
  with pytest.raises(ValueError, match='unknown benchmarks'):
    report.format_table({'market': {}})
  with pytest.raises(ValueError, match='"mAP"'):
    report.format_table({'msmt17': {'cmc': [0.5]}})
  with pytest.raises(ValueError, match='Recall@1'):
    report.format_table({'sop': {10: 0.5}})


def _read_png(path):
  with Image.open(path) as im:
    assert im.format == 'PNG'
    return np.asarray(im.convert('RGB'))


def test_cmc_and_roc_figures(tmp_path):
  cmc_path = figures.plot_cmc({'market1501': np.linspace(0.5, 1, 50), 'msmt17': [0.2, 0.4]},
                              str(tmp_path / 'cmc.png'))
  roc_path = figures.plot_roc({'lfw': (np.linspace(0, 1, 400), np.linspace(0, 1, 400) ** 0.2)},
                              str(tmp_path / 'figs' / 'roc.png'))
  for path in (cmc_path, roc_path):
    img = _read_png(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
  with pytest.raises(ValueError, match='at least one'):
    figures.plot_cmc({}, str(tmp_path / 'x.png'))


def test_framed_and_rank_list(tmp_path):
  img = np.full((20, 10, 3), 200, np.uint8)
  f = figures.framed(img, figures.GREEN, width=2)
  assert f.shape == (24, 14, 3)
  assert tuple(f[0, 0]) == figures.GREEN and tuple(f[-1, 7]) == figures.GREEN
  assert tuple(f[10, 5]) == (200, 200, 200)
  gallery = [np.full((32, 16, 3), 40 * i, np.uint8) for i in range(4)]
  path = figures.plot_rank_list(img, gallery, [True, False, False, True],
                                str(tmp_path / 'rank.png'), title='query 3')
  pixels = _read_png(path).reshape(-1, 3).astype(int)
  def has(color):
    return bool(np.any(np.all(np.abs(pixels - np.asarray(color)) < 8, axis=1)))
  assert has(figures.GREEN) and has(figures.RED)
  with pytest.raises(ValueError, match='uint8 HxWx3'):
    figures.plot_rank_list(img, [np.zeros((4, 4, 4), np.uint8)], [True], str(tmp_path / 'e.png'))


def test_write_rank_lists(tmp_path):
  rng = np.random.default_rng(0)
  q_pids, g_pids = np.array([1, 2, 3]), np.array([1, 1, 2, 2, 3, 4, 1])
  q_cams, g_cams = np.array([0, 0, 0]), np.array([0, 1, 1, 0, 0, 1, 1])
  dist = rng.random((3, 7))
  loaded = []

  def load(split, index):
    loaded.append((split, index))
    return np.full((16, 8, 3), index, np.uint8)

  paths = figures.write_rank_lists(dist, q_pids, g_pids, q_cams, g_cams, load,
                                   str(tmp_path / 'ranks'), num_queries=5, topk=3)
  # Query 2 (pid 3, only a same-camera image) has no positive: not drawn.
  assert [os.path.basename(p) for p in paths] == ['rank_list_q0.png', 'rank_list_q1.png']
  for p in paths:
    assert _read_png(p).size > 0
  top, matches = figures.ranked_gallery(dist[0], 1, 0, g_pids, g_cams, topk=3)
  want = [j for j in np.argsort(dist[0], kind='stable') if not (g_pids[j] == 1 and g_cams[j] == 0)]
  assert top.tolist() == want[:3]
  assert matches.tolist() == [g_pids[j] == 1 for j in want[:3]]
  assert ('query', 0) in loaded and all(s in ('query', 'gallery') for s, _ in loaded)


def test_thresholds_in_the_report_and_for_export(tmp_path):
  def points(t):
    return {'impostor_pairs': 5000, 'genuine_pairs': 40,
            'far1e-2': {'threshold': t, 'tar': 0.9}, 'far1e-3': {'threshold': t + 0.1, 'tar': 0.5},
            'far1e-4': {'threshold': t + 0.2, 'tar': 0.25}}
  results = some_results()
  results['market1501']['operating_points'] = points(0.3)
  results['lfw']['operating_points'] = points(0.2)
  for step in (90, 100):  # the latest step's report is the one exported
    results['lfw']['operating_points']['far1e-2']['threshold'] = 0.2 + step / 1000
    md = report.write_report(results, str(tmp_path / 'run'), step=step)
  assert '| Market1501 | 5,000 | 40 | 0.3000 / 90.00 | 0.4000 / 50.00 | 0.5000 / 25.00* |' in md
  data = json.loads((tmp_path / 'run' / 'eval' / 'step_100' / 'report.json').read_text())
  assert data['thresholds']['person'] == {'far1e-2': 0.3, 'far1e-3': 0.4, 'far1e-4': 0.5,
                                          'benchmarks': {'market1501': {
                                              'far1e-2': 0.3, 'far1e-3': 0.4, 'far1e-4': 0.5}}}
  lines = []
  got = report.export_thresholds(str(tmp_path / 'run' / 'checkpoints' / '100'), None,
                                 ['face', 'person', 'vehicle'], print_fn=lines.append)
  assert set(got) == {'face', 'person'} and got['face']['far1e-2'] == pytest.approx(0.3)
  assert got['face']['source'].endswith(os.path.join('step_100', 'report.json'))
  assert 'none for vehicle' in lines[-1]
  assert report.export_thresholds(str(tmp_path / 'other'), None, ['face'],
                                  print_fn=lines.append) == {}
  assert 'no evaluation report' in lines[-1]
  with pytest.raises(ValueError, match='has no "thresholds"'):
    (tmp_path / 'old.json').write_text('{"ours": {}}')
    report.read_thresholds(str(tmp_path / 'old.json'))
