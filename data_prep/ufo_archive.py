"""UFO's released test archive (`test_datasets.tar`), read as it unpacks.

UFO (PaddlePaddle/VIMER, `UFO/AllInOne/README.md`, "Dataset") publishes its 12 test sets as one
18 GB archive, the `FASTREID_DATASETS` root of `UFO/AllInOne/evaluation_script.py`. Its layout is
the one UFO's dataset classes (`UFO/AllInOne/fastreid/data/datasets/`) read, which differs from
the original downloads (docs/DATA.md):

| set | under the archive root | differs from the original download |
|---|---|---|
| face (6) | `faces_emore_val/<name>.filelist`, `<name>_label.npy`, image files | not `<name>.bin` |
| market1501 | `Market-1501-v15.09.15/` | - |
| msmt17 | `MSMT17_V2/{mask_train_v2,mask_test_v2}`, `list_*.txt` | V2 folder names |
| veri776 | `veri/` | lower case |
| vehicleid | `vehicleid/` (`LargeVehicleID` = `test_list_2400.txt`) | lower case |
| veriwild | `VERI-Wild/train_test_split/test_10000_id{_query,}.txt` (`LargeVeRiWild`) | names |
| sop | `Stanford_Online_Products/{train,test}.txt` (`path,label`) | not `Ebay_*.txt` |

A face `.filelist` names one image per line (first field, relative to `faces_emore_val`); pair i
is lines 2i and 2i+1 and `<name>_label.npy` holds its is_same (`FaceEvaluatorSingleTask`:
embeddings `[0::2]` and `[1::2]`). Every set converts to the same converted set as its original
download (same splits, ids, cameras, counts checked against ufo_jax/catalog.py, same protocol);
a train split whose images the archive does not hold (a test archive) is left out and recorded
(`absent_splits` in the metadata): such a set evaluates but does not train.

`listing(name, raw_dir)` is the hook of `data_prep.builders`: the archive's listing of a set,
or None when `raw_dir` is not in the archive layout (then the original layout is read).
"""

from __future__ import annotations

import os

import numpy as np

from data_prep import layouts

ROOT_MARKER = 'faces_emore_val'  # a folder only UFO's archive has at its root
FACE_FOLDER = 'faces_emore_val'
FACE_SETS = ('lfw', 'cplfw', 'calfw', 'agedb_30', 'cfp_ff', 'cfp_fp')

# Where each set lives under the archive root (UFO's dataset_dir of each class).
FOLDERS: dict[str, str] = {
  'market1501': 'Market-1501-v15.09.15', 'msmt17': 'MSMT17_V2', 'veri776': 'veri',
  'vehicleid': 'vehicleid', 'veriwild': 'VERI-Wild', 'sop': 'Stanford_Online_Products',
  **{name: '' for name in FACE_SETS},  # face sets: the root (their files are in faces_emore_val)
}
MSMT17_V2_FOLDERS = ('mask_train_v2', 'mask_test_v2')
VERIWILD_LISTS = ('test_10000_id_query.txt', 'test_10000_id.txt')


def is_archive_root(path: str) -> bool:
  """`path` is an unpacked test_datasets.tar (it holds faces_emore_val/)."""
  return os.path.isdir(os.path.join(path, ROOT_MARKER))


def raw_dir_of(name: str, raw_root: str) -> str | None:
  """The folder of `name` under an archive root, or None when the archive has no such set."""
  if name not in FOLDERS:
    return None
  return os.path.join(raw_root, FOLDERS[name]) if FOLDERS[name] else raw_root


def _in_archive(name: str, raw_dir: str) -> bool:
  raw_dir = os.path.abspath(raw_dir)
  if name == 'msmt17':
    return os.path.isdir(os.path.join(raw_dir, MSMT17_V2_FOLDERS[1]))
  if name == 'veriwild':
    return os.path.isfile(os.path.join(raw_dir, 'train_test_split', VERIWILD_LISTS[0]))
  if name == 'sop':
    return (os.path.isfile(os.path.join(raw_dir, 'test.txt'))
            and not os.path.isfile(os.path.join(raw_dir, 'Ebay_test.txt')))
  # market1501, veri776, vehicleid: the original layout, inside an archive root.
  return name in FOLDERS and is_archive_root(os.path.dirname(raw_dir))


def _list_sop(raw_dir: str) -> layouts.Listing:
  """UFO's `SOP` (`retri.Cars196`): `{train,test}.txt`, lines `path,label`, no header."""
  splits = {}
  for split in ('train', 'test'):
    path = os.path.join(raw_dir, f'{split}.txt')
    entries = []
    for n, line in layouts._read_lines(path, 'sop'):  # pylint: disable=protected-access
      rel, sep, label = line.rpartition(',')
      if not sep or not rel or not label.strip().lstrip('-').isdigit():
        raise ValueError(f'{path}:{n}: expected "<path>,<class id>", got {line!r}')
      entries.append(layouts.Entry(rel.strip(), int(label)))
    splits[split] = entries
  return layouts.Listing(splits)


def _drop_absent_train(raw_dir: str, listing: layouts.Listing) -> layouts.Listing:
  """Leaves out a train split none of whose listed images is in the folder (a test archive)."""
  train = listing.splits.get('train')
  absent = []
  if train is not None and not any(os.path.isfile(os.path.join(raw_dir, e.path))
                                   for e in train):
    del listing.splits['train']
    absent.append('train')
  listing.extra.update({'layout': 'ufo_test_archive', 'absent_splits': absent,
                        'absent_listed': {'train': len(train)} if absent else {}})
  return listing


def listing(name: str, raw_dir: str) -> layouts.Listing | None:
  """The archive's listing of image set `name` in `raw_dir`, or None (not the archive layout)."""
  if name not in FOLDERS or name in FACE_SETS or not _in_archive(name, raw_dir):
    return None
  if name == 'msmt17':
    out = layouts.list_msmt17(raw_dir, folders=MSMT17_V2_FOLDERS)
  elif name == 'veriwild':
    out = layouts.list_veriwild(raw_dir, query_list=VERIWILD_LISTS[0],
                                gallery_list=VERIWILD_LISTS[1])
  elif name == 'sop':
    out = _list_sop(raw_dir)
  else:
    out = layouts.LISTERS[name](raw_dir)
  return _drop_absent_train(raw_dir, out)


def face_filelist(name: str, raw_dir: str) -> str | None:
  """`<name>.filelist` of a face set: raw_dir itself, raw_dir/<name>.filelist, or
  raw_dir/faces_emore_val/<name>.filelist; None when there is none."""
  if os.path.isfile(raw_dir) and raw_dir.endswith('.filelist'):
    return raw_dir
  for folder in (os.path.join(raw_dir, FACE_FOLDER), raw_dir):
    path = os.path.join(folder, f'{name}.filelist')
    if os.path.isfile(path):
      return path
  return None


def face_pairs(name: str, filelist: str) -> tuple[list[tuple[str, str]], list[bool]]:
  """`([(image_a, image_b) paths relative to the filelist's folder], is_same)` of a face set."""
  folder = os.path.dirname(filelist)
  label_path = os.path.join(folder, f'{name}_label.npy')
  images = [line.split(' ')[0] for _, line in layouts._read_lines(filelist, name)]  # pylint: disable=protected-access
  try:
    same = np.load(layouts.require_file(label_path, name), allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'{label_path}: not a readable .npy of is_same labels ({e})') from None
  if (same.ndim != 1 or not (same.dtype == np.bool_ or np.issubdtype(same.dtype, np.integer))
      or not np.isin(same, (0, 1)).all()):
    raise ValueError(f'{label_path}: expected a 1-D array of is_same booleans (or 0/1), got '
                     f'{same.dtype} {same.shape}')
  if len(images) != 2 * len(same):
    raise ValueError(f'{filelist}: {len(images)} images for the {len(same)} pairs of '
                     f'{label_path} (expected {2 * len(same)})')
  pairs = [(images[2 * i], images[2 * i + 1]) for i in range(len(same))]
  return pairs, [bool(x) for x in same]
