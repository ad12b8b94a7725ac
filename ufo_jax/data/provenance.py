"""Provenance of the converted sets: logged before training and evaluation; partial sets refused.

data_prep records in every converted set's TFDS metadata
(``builder.info.metadata['provenance']``) how it was built: the data_prep version, the raw
folder, the options, whether the count check ran and passed, the images and identities listed
per split, the examples written and the corrupt files skipped.

``check_sets(data_dir, names, allow_partial=...)`` logs one line per set and compares its
listed counts with the published ones of ``ufo_jax.catalog``. A set that differs (a partial or
modified download converted with ``--skip_count_check``) is refused with a one-line
``PartialDataError`` naming the set and its counts against the expected ones, unless
``allow_partial`` (``config.input.allow_partial_data``) is True: then it is used with a warning.
Training calls it once per start through ``ufo_jax.data.pipeline.open_training_data`` (on its
training sets and its converted test sets, ``check_config``), evaluation through
``ufo_jax.evaluation.run.check_sets``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from absl import logging

from ufo_jax import catalog
from ufo_jax import config as config_lib
from ufo_jax.data import sources

_LOGGED: set[tuple[str, str]] = set()  # (path, built_at) already logged by this process
_WARNED: set[tuple[str, str]] = set()  # ... already warned about as partial


class PartialDataError(config_lib.ConfigError):
  """A converted set whose counts differ from the published ones, without allow_partial_data."""


def read(path: str | os.PathLike, dataset: str) -> dict[str, Any]:
  """The provenance record of the converted set at ``path`` (``OldFormatError`` if it has none)."""

  path = os.fspath(path)
  info = sources.open_builder(path, dataset).info  # one line for a damaged dataset_info.json
  sources.check_format(info, path, dataset)
  record = dict(info.metadata or {}).get('provenance')
  if not record:
    raise sources.OldFormatError(
        f'{dataset}: {path} has no provenance record (converted by an earlier data_prep); '
        f'convert it again with `python -m data_prep.build --dataset={dataset} --raw_dir=RAW '
        f'--out_dir={os.path.dirname(os.path.dirname(path))} --overwrite`')
  return dict(record)


def _pair(images: Any, ids: Any) -> str:
  images = f'{images:,}' if isinstance(images, int) else str(images)
  return f'{images} images' if ids is None else f'{images} images / {ids:,} ids'


def differences(dataset: str, record: Mapping[str, Any], *,
                evaluation: bool = False) -> list[str]:
  """How the listed counts of ``record`` differ from the published ones (empty: complete).

  ``evaluation``: a split the build left out on purpose (``absent_splits``: the train split of
  UFO's test archive, data_prep.ufo_archive) is not a difference.
  """
  info = catalog.get(dataset)
  if info.custom:
    return []  # a custom set has no published counts (docs/CUSTOM_DATA.md)
  counts = record.get('counts') or {}
  absent = set(record.get('absent_splits') or ()) if evaluation else set()
  out = []
  for split, expected in info.splits.items():
    found = counts.get(split)
    if found is None and split in absent:
      continue
    if found is None:
      out.append(f'{split} missing (expected {_pair(expected.images, expected.ids)})')
      continue
    ids = found.get('ids')
    if found.get('images') != expected.images or (expected.ids is not None
                                                  and ids != expected.ids):
      out.append(f'{split} {_pair(found.get("images"), ids if expected.ids is not None else None)}'
                 f' (expected {_pair(expected.images, expected.ids)})')
  return out


def describe(dataset: str, path: str, record: Mapping[str, Any]) -> str:
  """One line: where the set came from, how it was checked, what it holds."""
  check = record.get('count_check') or {}
  if check.get('ran'):
    checked = 'count check passed'
  elif check.get('passed'):
    checked = 'count check skipped, counts match the published ones'
  else:
    checked = 'count check SKIPPED, counts differ from the published ones'
  splits = ', '.join(
      f'{s} {c.get("examples", 0):,} {"pairs" if c.get("ids") is None else "images"}'
      + ('' if c.get('ids') is None else f' / {c["ids"]:,} ids')
      for s, c in (record.get('counts') or {}).items())
  skipped = sum(int(c.get('skipped', 0)) for c in (record.get('counts') or {}).values())
  return (f'{dataset}: {path}; data_prep {record.get("data_prep_version", "?")} from '
          f'{record.get("raw_dir", "?")} at {record.get("built_at", "?")}; {checked}; {splits}; '
          f'{skipped} corrupt file(s) skipped')


def check_sets(data_dir: str | os.PathLike, names: Sequence[str], *, allow_partial: bool,
               purpose: str = 'training') -> dict[str, dict[str, Any]]:
  """Logs the provenance of each set (once per process) and refuses partial ones.

  Args:
    data_dir: the data_prep output folder.
    names: the converted sets to be used.
    allow_partial: accept sets whose counts differ from the published ones (with a warning).
    purpose: 'training' or 'evaluation', for the log lines.

  Returns:
    {name: provenance record}.

  Raises:
    PartialDataError: a set differs and ``allow_partial`` is False (one line naming every
      such set with its counts and the expected ones).
  """
  records, refused, accepted = {}, [], []
  for name in dict.fromkeys(names):
    path = sources.builder_dir(data_dir, name)
    record = read(path, name)
    records[name] = record
    key = (path, str(record.get('built_at')))
    if key not in _LOGGED:
      _LOGGED.add(key)
      logging.info('%s data: %s', purpose, describe(name, path, record))
    diffs = differences(name, record, evaluation=purpose == 'evaluation')
    if not diffs:
      continue
    if allow_partial:
      if key not in _WARNED:
        _WARNED.add(key)
        accepted.append(name)
    else:
      refused.append(f'{name} has {", ".join(diffs)}')
  if accepted:
    logging.warning('%s: using PARTIAL data (counts differ from the published ones; '
                    'input.allow_partial_data=True): %s', purpose, ', '.join(accepted))
  if refused:
    raise PartialDataError(
        f'partial converted data for {purpose} (built with --skip_count_check): '
        + '; '.join(refused) + '. Convert the full download, or pass '
        '--config.input.allow_partial_data=True to use it anyway')
  return records


def check_config(config: Any, data_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """``check_sets`` on the training sets of ``config`` with ``config.input.allow_partial_data``,
  then on the converted test sets of ``config.eval.sets``, so that a partial test set stops the
  run at its start rather than at its first evaluation (test sets that are not converted are left
  to the evaluation's own rules: ``ufo_jax.evaluation.run.check_sets``)."""
  names = [n for t in config_lib.task_names(config) for n in config.tasks[t].datasets]
  records = check_sets(data_dir, names, allow_partial=allow_partial(config), purpose='training')
  sets = config_lib.eval_sets(config) if 'eval' in config else ()
  converted = []
  for name in sets:
    if name in records or name not in catalog.DATASETS:
      continue
    try:
      sources.builder_dir(data_dir, name)
    except (FileNotFoundError, ValueError):
      continue
    converted.append(name)
  records.update(check_sets(data_dir, converted, allow_partial=allow_partial(config),
                            purpose='evaluation'))
  return records


def allow_partial(config: Any) -> bool:
  """``config.input.allow_partial_data`` (False when the field is absent)."""
  return bool(config.input.get('allow_partial_data', False))
