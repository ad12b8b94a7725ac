"""A user's own dataset in one of two generic layouts (docs/CUSTOM_DATA.md).

  python -m data_prep.build --dataset=NAME --layout=csv|folders --task=TASK --raw_dir=DIR \\
      --out_dir=OUT [--protocol=reid|retrieval] [--strict]

- ``csv``: ``DIR/images.csv`` with the header ``path,identity,split[,camera]``; ``path`` is
  relative to DIR, ``split`` one of ``train``, ``query``, ``gallery``, ``test``.
- ``folders``: ``DIR/<split>/<identity>/<image files>`` for the same split names.

Identities (and cameras) are any strings; they are numbered in sorted order. The protocol
follows from the splits: ``query`` + ``gallery`` is re-identification (CMC, mAP, mINP; with
cameras, gallery images of the query's identity and camera are removed, without cameras only
the query image itself), ``test`` alone is retrieval (every image queries the others,
Recall@K); ``--protocol`` chooses when both are present. A set with only ``train`` trains but
is no benchmark.

Bad input: a query identity without any gallery image is counted and reported (those queries
do not count in the metrics); a missing or unreadable image is named, skipped and counted (an
error with ``--strict``); an unknown split, a missing column, an empty value or an empty split
is one ``InputError`` naming the file, the line and the value found.

The converted set records ``metadata['custom']`` (``ufo_jax.catalog.CUSTOM_KEY``): its task,
protocol, splits, listed counts, cameras, layout and the queries without a gallery identity.
``ufo_jax.catalog.learn`` reads it back; no published counts are checked.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from data_prep import builders, layouts
from ufo_jax import catalog

LAYOUTS = ('csv', 'folders')
SPLITS = ('train', 'query', 'gallery', 'test')
PROTOCOLS = (catalog.PROTOCOL_REID, catalog.PROTOCOL_RETRIEVAL)
CSV_FILE = 'images.csv'
COLUMNS = ('path', 'identity', 'split')
OPTIONAL_COLUMNS = ('camera',)


class InputError(ValueError):
  """A custom set's raw data or options that cannot be converted (one line)."""


def check_name(name: str, task: str) -> None:
  """Refuses a catalog dataset's name and names or tasks that are not lower-case identifiers."""
  if name in catalog.DATASETS:
    raise InputError(f'--dataset={name}: {name!r} is a catalog dataset; a custom set needs a '
                     'name of its own (convert the catalog set without --layout)')
  for flag, value in (('dataset', name), ('task', task)):
    if not value or not catalog.TASK_NAME_RE.match(value):
      raise InputError(f'--{flag}={value}: expected a lower-case name of letters, digits and '
                       "'_' that starts with a letter")


Rows = dict[str, list[tuple[str, str, str | None]]]  # {split: [(path, identity, camera)]}


def _numbering(values: set[str]) -> dict[str, int]:
  return {v: i for i, v in enumerate(sorted(values))}


def list_csv(raw_dir: str) -> tuple[Rows, bool]:
  """``({split: [(path, identity, camera)]}, has_camera)`` of ``raw_dir/images.csv``."""
  path = layouts.require_file(os.path.join(raw_dir, CSV_FILE), 'csv layout')
  with open(path, newline='', encoding='utf-8-sig') as f:
    rows = list(csv.reader(f))
  if not rows:
    raise InputError(f'{path}: line 1: the file is empty; expected the header '
                     f'{",".join(COLUMNS + OPTIONAL_COLUMNS)}')
  header = [c.strip() for c in rows[0]]
  missing = [c for c in COLUMNS if c not in header]
  unknown = [c for c in header if c not in COLUMNS + OPTIONAL_COLUMNS]
  if missing or unknown:
    what = (f'missing column(s) {", ".join(missing)}' if missing else
            f'unknown column(s) {", ".join(unknown)}')
    raise InputError(f'{path}: line 1: {what} in the header {",".join(header)!r}; expected '
                     f'path,identity,split[,camera]')
  col = {c: header.index(c) for c in header}
  has_camera = 'camera' in col
  splits: Rows = {}
  first_line: dict[str, int] = {}
  for line, row in enumerate(rows[1:], 2):
    if not any(v.strip() for v in row):
      continue
    if len(row) != len(header):
      raise InputError(f'{path}: line {line}: {len(row)} fields, the header has {len(header)}: '
                       f'{",".join(row)!r}')
    value = {c: row[i].strip() for c, i in col.items()}
    for c in col:
      if not value[c]:
        raise InputError(f'{path}: line {line}: empty {c} in {",".join(row)!r}')
    if value['split'] not in SPLITS:
      raise InputError(f'{path}: line {line}: split {value["split"]!r} is not one of '
                       f'{", ".join(SPLITS)}')
    rel = value['path']
    if os.path.isabs(rel) or os.path.normpath(rel).startswith('..'):
      raise InputError(f'{path}: line {line}: path {rel!r} is not relative to {raw_dir}')
    if rel in first_line:
      raise InputError(f'{path}: line {line}: path {rel!r} is listed again (first on line '
                       f'{first_line[rel]})')
    first_line[rel] = line
    splits.setdefault(value['split'], []).append(
        (rel, value['identity'], value['camera'] if has_camera else None))
  return splits, has_camera


def list_folders(raw_dir: str) -> tuple[Rows, dict[str, list[str]]]:
  """``({split: [(path, identity, None)]}, ignored)`` of ``raw_dir/<split>/<identity>/*``;
  ``ignored``: per split, the files that are not images (or not in an identity folder)."""
  layouts.require_dir(raw_dir, 'folders layout')
  splits: Rows = {}
  ignored: dict[str, list[str]] = {}
  for entry in sorted(os.listdir(raw_dir)):
    full = os.path.join(raw_dir, entry)
    if entry.startswith('.') or not os.path.isdir(full):
      continue
    if entry not in SPLITS:
      raise InputError(f'{full}: split folder {entry!r} is not one of {", ".join(SPLITS)}')
    items, skipped = [], []
    for identity in sorted(os.listdir(full)):
      folder = os.path.join(full, identity)
      if identity.startswith('.'):
        continue
      if not os.path.isdir(folder):
        skipped.append(f'{entry}/{identity}')
        continue
      for name in sorted(os.listdir(folder)):
        rel = f'{entry}/{identity}/{name}'
        if name.startswith('.') or not name.lower().endswith(layouts.IMAGE_EXTS):
          skipped.append(rel)
          continue
        items.append((rel, identity, None))
    if not items:
      raise InputError(f'{full}: split {entry!r} holds no images in identity folders '
                       f'({entry}/<identity>/<image files>)')
    splits[entry] = items
    if skipped:
      ignored[entry] = skipped
  return splits, ignored


def protocol_of(splits: dict[str, list[Any]], where: str, protocol: str | None) -> str | None:
  """The evaluation protocol the splits imply (``protocol``, if given, chooses); None for a set
  with only a train split. Raises InputError for an empty or unpaired split."""
  present = [s for s in SPLITS if splits.get(s)]
  if not present:
    raise InputError(f'{where}: no images in any split; expected splits '
                     f'{", ".join(SPLITS)}')
  reid = 'query' in present or 'gallery' in present
  for a, b in (('query', 'gallery'), ('gallery', 'query')):
    if a in present and b not in present:
      raise InputError(f'{where}: split {b!r} is empty, found {a!r} with '
                       f'{len(splits[a])} images: re-identification needs both query and '
                       'gallery')
  retrieval = 'test' in present
  if protocol is not None:
    if protocol not in PROTOCOLS:
      raise InputError(f'--protocol={protocol}: expected one of {", ".join(PROTOCOLS)}')
    needs = {catalog.PROTOCOL_REID: reid, catalog.PROTOCOL_RETRIEVAL: retrieval}[protocol]
    if not needs:
      want = 'query and gallery' if protocol == catalog.PROTOCOL_REID else 'test'
      raise InputError(f'{where}: --protocol={protocol} needs the split(s) {want}; found '
                       f'{", ".join(present)}')
    return protocol
  if reid and retrieval:
    raise InputError(f'{where}: both query/gallery and test splits are present; choose the '
                     'benchmark with --protocol=reid or --protocol=retrieval')
  if reid:
    return catalog.PROTOCOL_REID
  return catalog.PROTOCOL_RETRIEVAL if retrieval else None


def listing(raw_dir: str, *, layout: str, task: str, protocol: str | None) -> layouts.Listing:
  """The ``layouts.Listing`` of a custom set, its ``extra`` holding ``metadata['custom']``."""
  if layout not in LAYOUTS:
    raise InputError(f'--layout={layout}: expected one of {", ".join(LAYOUTS)}')
  ignored: dict[str, list[str]] = {}
  if layout == 'csv':
    raw, has_camera = list_csv(raw_dir)
    where = os.path.join(raw_dir, CSV_FILE)
  else:
    raw, ignored = list_folders(raw_dir)
    has_camera, where = False, raw_dir
  protocol = protocol_of(raw, where, protocol)
  ids = _numbering({i for items in raw.values() for _, i, _ in items})
  cams = _numbering({c for items in raw.values() for _, _, c in items if c is not None})
  splits = {s: [layouts.Entry(p, ids[i], -1 if c is None else cams[c]) for p, i, c in raw[s]]
            for s in SPLITS if raw.get(s)}
  counts = {s: {'images': len(e), 'ids': len({x.id for x in e})} for s, e in splits.items()}
  no_gallery = []
  if 'query' in splits:
    gallery_ids = {e.id for e in splits['gallery']}
    no_gallery = [e for e in splits['query'] if e.id not in gallery_ids]
  eval_split = {catalog.PROTOCOL_REID: 'query', catalog.PROTOCOL_RETRIEVAL: 'test',
                None: None}[protocol]
  record = {
      'task': task, 'protocol': protocol, 'layout': layout, 'eval_split': eval_split,
      'splits': counts, 'has_camera': has_camera, 'num_cameras': len(cams),
      'queries_without_gallery': len(no_gallery),
      'query_ids_without_gallery': len({e.id for e in no_gallery}),
      'ignored_files': {s: v[:builders.MAX_SKIPPED_NAMES] for s, v in ignored.items()},
  }
  return layouts.Listing(splits, {catalog.CUSTOM_KEY: record})


def make_builder(name: str, *, layout: str, task: str,
                 protocol: str | None = None) -> type[builders.ListedImageBuilder]:
  """A tfds builder class for the custom set ``name`` (``builders.BUILDERS``' interface)."""
  check_name(name, task)

  class _Custom(builders.ListedImageBuilder, skip_registration=True):
    """A custom set (docs/CUSTOM_DATA.md)."""

    _custom_info: catalog.DatasetInfo | None = None  # set by _listing

    def __init__(self, **kwargs):
      kwargs['check_counts'] = False  # no published counts to check against
      super().__init__(**kwargs)

    def _listing(self, raw_dir: str) -> layouts.Listing:
      result = listing(raw_dir, layout=layout, task=task, protocol=protocol)
      self._custom_info = catalog.custom_info(name, result.extra[catalog.CUSTOM_KEY])
      return result

    def dataset_info(self) -> catalog.DatasetInfo:
      if self._custom_info is None:  # before the listing: what the tfds info needs
        return catalog.DatasetInfo(name=name, task=task, raw_folder='', splits={},
                                   description=f'custom set ({layout} layout)', custom=True)
      return self._custom_info

    def count_problems(self, found, absent=()) -> list[str]:
      del found, absent
      return []

  _Custom.name = name
  _Custom.__name__ = _Custom.__qualname__ = ''.join(p.title() for p in name.split('_'))
  return _Custom


def summary_lines(record: dict[str, Any]) -> list[str]:
  """What the conversion summary says about a custom set (task, protocol, unpaired queries)."""
  protocol = record.get('protocol') or 'none (train only)'
  lines = [f'custom set: task {record.get("task")}, protocol {protocol}, '
           f'{"cameras" if record.get("has_camera") else "no cameras"}, '
           f'{record.get("layout")} layout (no published counts to check)']
  if record.get('queries_without_gallery'):
    lines.append(f'{record["queries_without_gallery"]} query image(s) of '
                 f'{record["query_ids_without_gallery"]} identities have no gallery image of '
                 'their identity: they are left out of the re-id metrics')
  if record.get('protocol') == catalog.PROTOCOL_REID and not record.get('has_camera'):
    lines.append('no cameras: only the query image itself is left out of its gallery')
  ignored = sum(len(v) for v in (record.get('ignored_files') or {}).values())
  if ignored:
    lines.append(f'{ignored} file(s) that are not images in identity folders ignored '
                 '(metadata.json: custom.ignored_files)')
  return lines
