"""The datasets of ufo-jax: names, tasks, raw folders and expected counts.

Shared by ``data_prep`` (conversion checks its output against these counts) and
``ufo_jax.data`` / ``ufo_jax.evaluation`` (which datasets a task reads, which
protocol a test set uses). The counts are those of each dataset's published release, as
docs/DATA.md lists them.

Custom sets (docs/CUSTOM_DATA.md): a user's own set converted with ``data_prep.build
--layout=csv|folders`` records its task, protocol, splits and counts in its TFDS metadata
(``metadata['custom']``). ``learn(data_dir)`` reads those records, so ``get``, ``benchmarks``
and everything downstream know the set without any code listing it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

# The tasks of the UFO recipe (configs/ufo_l.py). A config may define others (TASK_NAME_RE).
TASKS: tuple[str, ...] = ('face', 'person', 'vehicle', 'product')
TASK_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')  # task and custom dataset names
CUSTOM_KEY = 'custom'  # the metadata record of a custom set (data_prep.custom)
VERSION = '1.0.0'  # the folder of a converted set: <data_dir>/<name>/1.0.0

# Evaluation protocols (docs/EVALUATION.md).
PROTOCOL_VERIFICATION = 'verification'  # face pairs, 10-fold accuracy
PROTOCOL_REID = 'reid'  # query/gallery, same pid + same camera removed
PROTOCOL_VEHICLEID = 'vehicleid'  # one random gallery image per id, 10 repeats
PROTOCOL_RETRIEVAL = 'retrieval'  # every item queries all others, Recall@K


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """Expected size of one split of a converted dataset (full download)."""

  images: int  # examples (for verification sets: images = 2 x pairs)
  ids: int | None = None  # identities; None where the split has none (pairs)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """One public dataset as ufo-jax knows it."""

  name: str  # the tfds builder name and the key used in configs
  task: str  # one of TASKS
  raw_folder: str  # folder name under a raw root, as the dataset unpacks
  splits: Mapping[str, SplitInfo]
  train_split: str | None = None  # None for test-only sets
  eval_split: str | None = None  # the split the benchmark is computed on
  protocol: str | None = None  # one of the PROTOCOL_* values, None if not a benchmark
  has_camera: bool = False
  description: str = ''
  withdrawn: str = ''  # why and what to do, for a set its authors no longer distribute
  custom: bool = False  # a user's set, learned from its converted metadata (no published counts)

  @property
  def num_train_ids(self) -> int:
    if self.train_split is None:
      raise ValueError(f'dataset {self.name!r} has no train split')
    ids = self.splits[self.train_split].ids
    assert ids is not None
    return ids


def _face_pairs(name: str, folder: str, pairs: int, desc: str) -> DatasetInfo:
  return DatasetInfo(
      name=name, task='face', raw_folder=folder,
      splits={'test': SplitInfo(images=2 * pairs)},
      eval_split='test', protocol=PROTOCOL_VERIFICATION, description=desc)


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo(
        name='ms1mv3', task='face', raw_folder='ms1m-retinaface-t1',
        splits={'train': SplitInfo(images=5_179_510, ids=93_431)},
        train_split='train',
        description='MS1M-V3 (insightface ms1m-retinaface-t1): train.rec + train.idx'),
    DatasetInfo(
        name='market1501', task='person', raw_folder='Market-1501-v15.09.15',
        splits={'train': SplitInfo(12_936, 751), 'query': SplitInfo(3_368, 750),
                'gallery': SplitInfo(15_913, 751)},
        train_split='train', eval_split='query', protocol=PROTOCOL_REID,
        has_camera=True, description='Market-1501 (gallery ids count pid 0, the distractors)'),
    DatasetInfo(
        name='dukemtmc', task='person', raw_folder='DukeMTMC-reID',
        splits={'train': SplitInfo(16_522, 702), 'query': SplitInfo(2_228, 702),
                'gallery': SplitInfo(17_661, 1_110)},
        train_split='train', eval_split='query', protocol=PROTOCOL_REID,
        has_camera=True, description='DukeMTMC-reID',
        withdrawn=('DukeMTMC-reID was withdrawn by its authors; without a copy, train with '
                   "--config.tasks.person.datasets=\"('market1501','msmt17')\": evaluation "
                   'skips it when it is not converted')),
    DatasetInfo(
        name='msmt17', task='person', raw_folder='MSMT17_V1',
        splits={'train': SplitInfo(30_248, 1_041), 'query': SplitInfo(11_659, 3_060),
                'gallery': SplitInfo(82_161, 3_060)},
        train_split='train', eval_split='query', protocol=PROTOCOL_REID,
        has_camera=True,
        description='MSMT17 V1 (train = list_train.txt; list_val.txt is not used)'),
    DatasetInfo(
        name='veri776', task='vehicle', raw_folder='VeRi',
        splits={'train': SplitInfo(37_778, 576), 'query': SplitInfo(1_678, 200),
                'gallery': SplitInfo(11_579, 200)},
        train_split='train', eval_split='query', protocol=PROTOCOL_REID,
        has_camera=True, description='VeRi-776'),
    DatasetInfo(
        name='vehicleid', task='vehicle', raw_folder='VehicleID_V1.0',
        splits={'train': SplitInfo(113_346, 13_164), 'test': SplitInfo(19_777, 2_400),
                'test_800': SplitInfo(6_493, 800), 'test_1600': SplitInfo(13_377, 1_600)},
        train_split='train', eval_split='test', protocol=PROTOCOL_VEHICLEID,
        description='PKU VehicleID (test = test_list_2400)'),
    DatasetInfo(
        name='veriwild', task='vehicle', raw_folder='VERI-Wild',
        splits={'train': SplitInfo(277_797, 30_671), 'query': SplitInfo(10_000, 10_000),
                'gallery': SplitInfo(128_517, 10_000)},
        train_split='train', eval_split='query', protocol=PROTOCOL_REID,
        has_camera=True, description='VeRi-Wild (large test split: 10,000 ids)'),
    DatasetInfo(
        name='sop', task='product', raw_folder='Stanford_Online_Products',
        splits={'train': SplitInfo(59_551, 11_318), 'test': SplitInfo(60_502, 11_316)},
        train_split='train', eval_split='test', protocol=PROTOCOL_RETRIEVAL,
        description='Stanford Online Products'),
    _face_pairs('lfw', 'lfw.bin', 6_000, 'LFW, insightface lfw.bin'),
    _face_pairs('cplfw', 'cplfw.bin', 6_000, 'CPLFW, insightface cplfw.bin'),
    _face_pairs('calfw', 'calfw.bin', 6_000, 'CALFW, insightface calfw.bin'),
    _face_pairs('agedb_30', 'agedb_30.bin', 6_000, 'AgeDB-30, insightface agedb_30.bin'),
    _face_pairs('cfp_ff', 'cfp_ff.bin', 7_000, 'CFP-FF, insightface cfp_ff.bin'),
    _face_pairs('cfp_fp', 'cfp_fp.bin', 7_000, 'CFP-FP, insightface cfp_fp.bin'),
]}

# The training sets of each task (docs/DATA.md) and the 13 benchmarks (docs/EVALUATION.md), in
# the column order of the published table.
TRAIN_SETS: dict[str, tuple[str, ...]] = {
    'face': ('ms1mv3',),
    'person': ('market1501', 'dukemtmc', 'msmt17'),
    'vehicle': ('veri776', 'vehicleid', 'veriwild'),
    'product': ('sop',),
}
BENCHMARKS: tuple[str, ...] = (
    'calfw', 'cplfw', 'lfw', 'cfp_ff', 'cfp_fp', 'agedb_30',
    'market1501', 'dukemtmc', 'msmt17', 'veri776', 'vehicleid', 'veriwild', 'sop')


CUSTOM: dict[str, DatasetInfo] = {}  # custom sets learned by `learn`, in the order learned


def custom_info(name: str, record: Mapping[str, Any]) -> DatasetInfo:
  """The ``DatasetInfo`` of a custom set from its ``metadata['custom']`` record."""
  splits = {s: SplitInfo(int(c['images']), None if c.get('ids') is None else int(c['ids']))
            for s, c in record['splits'].items()}
  return DatasetInfo(
      name=name, task=str(record['task']), raw_folder='', splits=splits,
      train_split='train' if 'train' in splits else None,
      eval_split=record.get('eval_split'), protocol=record.get('protocol'),
      has_camera=bool(record.get('has_camera', False)),
      description=f'custom set ({record.get("layout", "?")} layout)', custom=True)


def read_custom(data_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
  """The ``metadata['custom']`` record of the converted set ``data_dir/name``, or None."""
  path = os.path.join(os.fspath(data_dir), name, VERSION, 'metadata.json')
  try:
    with open(path, encoding='utf-8') as f:
      metadata = json.load(f)
  except (OSError, ValueError):
    return None
  record = metadata.get(CUSTOM_KEY) if isinstance(metadata, dict) else None
  return dict(record) if isinstance(record, dict) else None


def learn(data_dir: str | os.PathLike | None) -> list[str]:
  """Registers the custom sets converted into ``data_dir`` (see the module doc); returns their
  names. Catalog names are never replaced; a folder that is no custom set is ignored."""
  if not data_dir or not os.path.isdir(data_dir):
    return []
  names = []
  for name in sorted(os.listdir(data_dir)):
    if name in DATASETS or not TASK_NAME_RE.match(name):
      continue
    record = read_custom(data_dir, name)
    if record is not None:
      CUSTOM[name] = custom_info(name, record)
      names.append(name)
  return names


def benchmarks() -> tuple[str, ...]:
  """The 13 public benchmarks, then the learned custom sets that have a protocol."""
  return BENCHMARKS + tuple(n for n, d in CUSTOM.items() if d.protocol is not None)


def get(name: str) -> DatasetInfo:
  """Returns the dataset called ``name`` (a catalog set or a learned custom set) or raises a
  clear error."""
  if name in DATASETS:
    return DATASETS[name]
  if name in CUSTOM:
    return CUSTOM[name]
  custom = f'; custom sets learned: {", ".join(CUSTOM)}' if CUSTOM else ''
  raise ValueError(
      f'unknown dataset {name!r}; known datasets: {", ".join(sorted(DATASETS))}{custom} (a '
      'custom set is known once converted into input.data_dir: docs/CUSTOM_DATA.md)')


def task_num_classes(task: str, datasets: tuple[str, ...] | None = None) -> int:
  """Classes of one task's label space at full size: the sum of train ids."""
  datasets = TRAIN_SETS[task] if datasets is None else datasets
  return sum(get(d).num_train_ids for d in datasets)
