"""The evaluation report: our numbers beside the published ones (docs/EVALUATION.md, "Report").

``results`` maps a benchmark name of ``catalog.BENCHMARKS`` to the dict its protocol returns
(``protocols.of(name).evaluate``). The report shows, in the column order of the UFO paper's
table (Xi et al., "UFO: Unified Feature Optimization", ECCV 2022), each protocol's headline
cell (``Protocol.headline``: face verification accuracy, re-id rank-1 / mAP, SOP Recall@1, in
%); benchmarks not evaluated show ``-``. A second table lists every benchmark's further metrics
(``Protocol.details``: mINP, rank-5, Recall@10..., the fold spread) with an optional chance
level.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ufo_jax import catalog
from ufo_jax.evaluation import protocols, thresholds

HEADERS: dict[str, str] = {
    'calfw': 'CALFW', 'cplfw': 'CPLFW', 'lfw': 'LFW', 'cfp_ff': 'CFP-FF', 'cfp_fp': 'CFP-FP',
    'agedb_30': 'AgeDB-30', 'market1501': 'Market1501', 'dukemtmc': 'DukeMTMC',
    'msmt17': 'MSMT17', 'veri776': 'VeRi-776', 'vehicleid': 'VehicleID', 'veriwild': 'VeRi-Wild',
    'sop': 'SOP',
}

# The UFO paper's table, cell for cell as published: face accuracy (%), re-id rank-1/mAP (%),
# SOP Recall@1 (%).
_PUBLISHED_CELLS: dict[str, tuple[str, ...]] = {
    'best single-task, no re-rank': (
        '96.20', '93.37', '99.85', '99.89', '98.99', '98.35', '96.3/91.5', '92.1/83.7',
        '86.2/69.4', '97.0/87.1', '80.3/86.4', '92.5/77.3', '85.9'),
    'UFO ViT-L, drop path 0.1': (
        '96.18', '94.22', '99.83', '99.90', '99.09', '98.17', '96.17/91.67', '92.01/84.63',
        '86.21/68.94', '97.62/88.66', '85.35/90.09', '93.31/77.98', '87.11'),
    'UFO ViT-L, drop path 0.2': (
        '95.92', '94.30', '99.82', '99.90', '99.11', '98.03', '96.28/92.75', '92.55/86.19',
        '88.10/72.17', '97.74/89.25', '87.62/91.32', '93.62/78.91', '89.23'),
}
PUBLISHED_CELLS: dict[str, dict[str, str]] = {
    row: dict(zip(catalog.BENCHMARKS, cells)) for row, cells in _PUBLISHED_CELLS.items()}
# The same as numbers: {row: {benchmark: (accuracy,) | (rank1, mAP) | (recall@1,)}} in %.
PUBLISHED: dict[str, dict[str, tuple[float, ...]]] = {
    row: {b: tuple(float(v) for v in cell.split('/')) for b, cell in cells.items()}
    for row, cells in PUBLISHED_CELLS.items()}
REFERENCE_ROW = 'UFO ViT-L, drop path 0.2'  # the row of the recipe (configs/ufo_l.py)
MISSING = '-'
_THRESHOLDS_NOTE = (
    'A pair is accepted when its cosine is above the threshold; at most FAR of the impostor '
    'pairs are (face: the verification pairs; re-id: all query-gallery pairs; SOP, VehicleID: '
    'all pairs of distinct items). TAR: genuine pairs accepted (%). *: fewer than 1 / FAR '
    'impostor pairs, the threshold is the largest impostor cosine (a bound).')


def _check_names(results: Mapping[str, Any], what: str) -> None:
  unknown = sorted(set(results) - set(catalog.benchmarks()))
  if unknown:
    raise ValueError(f'{what} names unknown benchmarks {unknown}; known: '
                     f'{", ".join(catalog.benchmarks())}')


def columns(*results: Mapping[str, Any] | None) -> list[str]:
  """The table's columns: the 13 published benchmarks, then each custom set evaluated (in
  ``results``, then in a ``before`` row), in the order evaluated."""
  custom = [b for r in results if r for b in r if b not in catalog.BENCHMARKS]
  return list(catalog.BENCHMARKS) + list(dict.fromkeys(custom))


def header(benchmark: str) -> str:
  """The column header of a benchmark (a custom set's is its name)."""
  return HEADERS.get(benchmark, benchmark)


def read_before(path: str) -> dict[str, tuple[float, ...]]:
  """The headline cells (``ours``) of an earlier ``report.json``, for a "before" row
  (``config.eval.compare_to``)."""
  try:
    with open(path, encoding='utf-8') as f:
      payload = json.load(f)
    ours = payload['ours']
    return {str(b): tuple(float(v) for v in cell) for b, cell in ours.items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'config.eval.compare_to={path}: not a readable report.json with an '
                     f'"ours" entry ({type(e).__name__}: {e})') from None


def _change(now: tuple[float, ...] | None, before: tuple[float, ...] | None) -> str:
  if now is None or before is None or len(now) != len(before):
    return MISSING
  return '/'.join(f'{a - b:+.2f}' for a, b in zip(now, before))


def headline(benchmark: str, metrics: Mapping[Any, Any]) -> tuple[float, ...]:
  """The published metric(s) of one benchmark in %, as its protocol's ``headline``."""
  protocol = protocols.of(benchmark)
  try:
    return protocol.headline(metrics)
  except ValueError as e:
    raise ValueError(f'{benchmark}: {e}') from None


def format_cell(values: tuple[float, ...] | None, decimals: int = 2) -> str:
  if values is None:
    return MISSING
  return '/'.join(f'{v:.{decimals}f}' for v in values)


def _row(results: Mapping[str, Any] | None, cols: list[str]) -> list[str]:
  results = results or {}
  return [format_cell(headline(b, results[b])) if b in results else MISSING for b in cols]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


def format_table(results: Mapping[str, Any], *, name: str = 'ufo-jax',
                 chance: Mapping[str, Any] | None = None, published: bool = True,
                 before: Mapping[str, tuple[float, ...]] | None = None,
                 before_name: str = 'before') -> str:
  """The UFO table as markdown: the published rows (optional), a "before" row and the change
  per benchmark (``before``: headline cells of an earlier report), ours, the chance level.
  Custom sets get a column each, with no published cell."""
  _check_names(results, 'results')
  cols = columns(results, before)
  rows = []
  if published:
    rows += [[row] + [cells.get(b, MISSING) for b in cols]
             for row, cells in PUBLISHED_CELLS.items()]
  if before is not None:
    rows.append([before_name] + [format_cell(before.get(b)) for b in cols])
  rows.append([f'**{name}**'] + _row(results, cols))
  if before is not None:
    rows.append(['change'] + [_change(headline(b, results[b]) if b in results else None,
                                      before.get(b)) for b in cols])
  if chance:
    _check_names(chance, 'chance')
    rows.append(['chance level'] + _row(chance, cols))
  return _markdown(['model'] + [header(b) for b in cols], rows)


def format_details(results: Mapping[str, Any],
                   chance: Mapping[str, Any] | None = None) -> str:
  """One row per evaluated benchmark: ours, the chance level, the reference row, more metrics."""
  names = ['benchmark', 'ours']
  if chance:
    names.append('chance')
  names += [REFERENCE_ROW, 'more (ours)']
  rows = []
  for b in columns(results):
    if b not in results:
      continue
    row = [header(b), format_cell(headline(b, results[b]))]
    if chance:
      row.append(format_cell(headline(b, chance[b])) if b in chance else MISSING)
    row += [PUBLISHED_CELLS[REFERENCE_ROW].get(b, MISSING),
            ', '.join(protocols.of(b).details(results[b])) or MISSING]
    rows.append(row)
  return _markdown(names, rows)


def _points(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  return {b: results[b]['operating_points'] for b in columns(results)
          if b in results and isinstance(results[b].get('operating_points'), Mapping)}


def format_thresholds(results: Mapping[str, Any]) -> str | None:
  """The operating points as markdown: per benchmark, the cosine threshold and TAR (%) at each
  FAR; None when no result has them. ``*``: fewer than 1 / FAR impostor pairs (a bound)."""
  points = _points(results)
  if not points:
    return None
  header = ['benchmark', 'impostor pairs', 'genuine pairs']
  header += [f'FAR {f:.0e}: cosine / TAR' for f in thresholds.FARS]
  rows = []
  for b, p in points.items():
    row = [HEADERS.get(b, b), f'{p["impostor_pairs"]:,}', f'{p["genuine_pairs"]:,}']
    for far in thresholds.FARS:
      q = p.get(thresholds.far_key(far)) or {}
      if q.get('threshold') is None:
        row.append(MISSING)
        continue
      tar = MISSING if q.get('tar') is None else f'{100 * q["tar"]:.2f}'
      bound = '*' if far * p['impostor_pairs'] < 1 else ''
      row.append(f'{q["threshold"]:.4f} / {tar}{bound}')
    rows.append(row)
  return _markdown(header, rows)


def task_thresholds(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Per task, the cosine threshold at each FAR: the largest over the task's benchmarks, so
  the false-accept rate is at most the FAR on each of them (``report.json['thresholds']``,
  copied into an export's model.json)."""
  out: dict[str, dict[str, Any]] = {}
  for b, p in _points(results).items():
    task = out.setdefault(catalog.get(b).task, {'benchmarks': {}})
    task['benchmarks'][b] = {}
    for far in thresholds.FARS:
      key = thresholds.far_key(far)
      t = (p.get(key) or {}).get('threshold')
      if t is None:
        continue
      task['benchmarks'][b][key] = float(t)
      task[key] = max(task.get(key, -np.inf), float(t))
  return out


def latest_report(run_dir: str) -> str | None:
  """The report.json of a run's latest evaluation: ``eval/step_N`` with the largest N, else
  ``run_dir/report.json`` (``--mode=eval``); None when there is none."""
  steps = []
  for path in glob.glob(os.path.join(run_dir, 'eval', 'step_*', 'report.json')):
    match = re.fullmatch(r'step_(\d+)', os.path.basename(os.path.dirname(path)))
    if match:
      steps.append((int(match.group(1)), path))
  if steps:
    return max(steps)[1]
  path = os.path.join(run_dir, 'report.json')
  return path if os.path.exists(path) else None


def read_thresholds(path: str) -> dict[str, dict[str, Any]]:
  """``report.json['thresholds']`` of ``path`` (a report.json or a folder holding one), with
  ``source`` (the file) in each task; a clear error when the file has none."""
  if os.path.isdir(path):
    path = os.path.join(path, 'report.json')
  try:
    with open(path, encoding='utf-8') as f:
      payload = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable evaluation report.json ({e})') from None
  found = payload.get('thresholds') if isinstance(payload, Mapping) else None
  if not isinstance(found, Mapping):
    raise ValueError(f'{path} has no "thresholds" (written by an evaluation before operating '
                     'thresholds existed, or with eval.thresholds=False): evaluate again')
  return {task: {**values, 'source': os.path.abspath(path)} for task, values in found.items()}


def export_thresholds(checkpoint: str, report_path: str | None, tasks: Sequence[str],
                      print_fn: Callable[[str], Any] = print) -> dict[str, dict[str, Any]]:
  """The operating thresholds an export copies into model.json, for ``tasks``.

  From ``report_path`` (``export --thresholds_from``) when given, else from the latest report
  of the run the checkpoint belongs to (``checkpoint``, its parent or grandparent: a workdir,
  its ``checkpoints/`` folder or one step folder). Without any report: ``{}`` and one line
  saying so.
  """
  path = report_path
  if path is None:
    here = os.path.abspath(checkpoint)
    for folder in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
      path = latest_report(folder)
      if path is not None:
        break
  if path is None:
    print_fn(f'export: no evaluation report beside {checkpoint}: model.json has no operating '
             'thresholds (evaluate first, or pass --thresholds_from=REPORT)')
    return {}
  found = read_thresholds(path)
  out = {t: found[t] for t in tasks if t in found}
  missing = [t for t in tasks if t not in found]
  print_fn(f'export: operating thresholds of {", ".join(out) or "no task"} from {path}'
           + (f' (none for {", ".join(missing)})' if missing else ''))
  return out


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def report_dir(workdir: str, step: int | None = None) -> str:
  """``workdir``, or ``workdir/eval/step_N`` for an evaluation at training step N."""
  return workdir if step is None else os.path.join(workdir, 'eval', f'step_{int(step)}')


def write_report(results: Mapping[str, Any], workdir: str, *, step: int | None = None,
                 name: str = 'ufo-jax', chance: Mapping[str, Any] | None = None,
                 compare_to: str | None = None) -> str:
  """Writes ``report.md`` and ``report.json``; returns the markdown.

  Args:
    results: benchmark name -> metrics dict of its protocol.
    workdir: output folder (created); with ``step``, ``workdir/eval/step_N``.
    step: the training step evaluated, if any.
    name: the label of our row.
    chance: optional benchmark -> metrics of a chance-level model (e.g. random features),
      shown as an extra row and column.
    compare_to: an earlier ``report.json`` (``config.eval.compare_to``: e.g. the model a task
      was added to): its row is shown as "before", with the change per benchmark.
  """
  _check_names(results, 'results')
  if chance:
    _check_names(chance, 'chance')
  before = read_before(compare_to) if compare_to else None
  cols = columns(results, before)
  out_dir = report_dir(workdir, step)
  os.makedirs(out_dir, exist_ok=True)
  title = f'# Evaluation report: {name}' + (f', step {int(step)}' if step is not None else '')
  missing = [header(b) for b in catalog.BENCHMARKS if b not in results]
  notes = [n for b in cols if b in results
           for n in [protocols.of(b).note(catalog.get(b))] if n]
  points = format_thresholds(results)
  md = '\n\n'.join([
      title,
      'Face: verification accuracy (%). Re-id: rank-1 / mAP (%). SOP: Recall@1 (%). '
      'Protocols: docs/EVALUATION.md (cosine distance, no flip, no re-ranking).',
      format_table(results, name=name, chance=chance, before=before,
                   before_name=f'before ({compare_to})' if compare_to else 'before'),
      '## Per benchmark',
      format_details(results, chance) if results else 'No benchmark evaluated.',
  ] + ([f'Not evaluated: {", ".join(missing)}.'] if missing else [])
      + (['Notes: ' + ' '.join(f'{n}.' for n in notes)] if notes else [])
      + (['## Operating thresholds', _THRESHOLDS_NOTE, points] if points else [])) + '\n'
  payload = {
      'name': name,
      'step': None if step is None else int(step),
      'columns': cols,
      'headers': [header(b) for b in cols],
      'units': 'percent; face: accuracy, re-id: [rank-1, mAP], sop: Recall@1',
      'published': {row: {b: list(v) for b, v in cells.items()}
                    for row, cells in PUBLISHED.items()},
      'ours': {b: list(headline(b, results[b])) for b in cols if b in results},
      'chance': ({b: list(headline(b, chance[b])) for b in cols if b in chance}
                 if chance else None),
      'before': ({'source': compare_to, 'cells': {b: list(v) for b, v in before.items()},
                  'change': {b: [a - c for a, c in zip(headline(b, results[b]), before[b])]
                             for b in cols if b in results and b in before
                             and len(before[b]) == len(headline(b, results[b]))}}
                 if before is not None else None),
      'notes': notes,
      'thresholds': task_thresholds(results),
      'metrics': _jsonable(results),
  }
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(md)
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(payload, f, indent=1)
  return md
