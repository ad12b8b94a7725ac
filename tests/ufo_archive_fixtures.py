"""UFO's test archive layout (`test_datasets.tar`), written from sets in their original layout.

`write_archive(original_root, archive_root, ...)` takes the sets `data_prep.generate` wrote in
their original download layout and lays the same images out as UFO's archive does (the dataset
classes of PaddlePaddle/VIMER `UFO/AllInOne/fastreid/data/datasets/`), so a test can convert
both and compare. `with_train=False` leaves the train images out, as a test archive does (the
list files stay: UFO's classes read them).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from data_prep import face_bin
from ufo_jax import catalog

FACE_SETS = ('lfw', 'cplfw', 'calfw', 'agedb_30', 'cfp_ff', 'cfp_fp')


def _lines(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(f'{line}\n' for line in lines)


def _remove(root, rels):
  for rel in rels:
    path = os.path.join(root, rel)
    if os.path.isfile(path):
      os.remove(path)


def write_archive(original_root, archive_root, *, with_train=False, datasets=None):
  """Writes the archive layout under `archive_root`; returns {name: its folder or filelist}."""
  orig = lambda name: os.path.join(original_root, catalog.get(name).raw_folder)  # noqa: E731
  names = datasets or ('market1501', 'msmt17', 'veri776', 'vehicleid', 'veriwild', 'sop',
                       *FACE_SETS)
  out = {}
  for name in names:
    if name in FACE_SETS:
      folder = os.path.join(archive_root, 'faces_emore_val')
      images, same = face_bin.load_bin(orig(name))
      rels = []
      for i, data in enumerate(images):
        rel = f'{name}/{i}.jpg'
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        with open(os.path.join(folder, rel), 'wb') as f:
          f.write(data)
        rels.append(f'{rel} {i // 2}')  # a second field, as the filelist may have
      _write_lines(os.path.join(folder, f'{name}.filelist'), rels)
      np.save(os.path.join(folder, f'{name}_label.npy'), np.array(same, bool))
      out[name] = os.path.join(folder, f'{name}.filelist')
      continue
    target = {'market1501': 'Market-1501-v15.09.15', 'msmt17': 'MSMT17_V2', 'veri776': 'veri',
              'vehicleid': 'vehicleid', 'veriwild': 'VERI-Wild',
              'sop': 'Stanford_Online_Products'}[name]
    dst = os.path.join(archive_root, target)
    shutil.copytree(orig(name), dst)
    if name == 'market1501' and not with_train:
      _remove(dst, [f'bounding_box_train/{f}' for f in os.listdir(f'{dst}/bounding_box_train')])
    elif name == 'msmt17':
      os.rename(f'{dst}/train', f'{dst}/mask_train_v2')
      os.rename(f'{dst}/test', f'{dst}/mask_test_v2')
      if not with_train:
        _remove(f'{dst}/mask_train_v2', [ln.split()[0] for ln in _lines(f'{dst}/list_train.txt')])
    elif name == 'veri776' and not with_train:
      _remove(dst, [f'image_train/{f}' for f in os.listdir(f'{dst}/image_train')])
    elif name == 'vehicleid' and not with_train:
      _remove(dst, [f'image/{ln.split()[0]}.jpg'
                    for ln in _lines(f'{dst}/train_test_split/train_list.txt')])
    elif name == 'veriwild':
      split = f'{dst}/train_test_split'
      os.rename(f'{split}/test_10000_query.txt', f'{split}/test_10000_id_query.txt')
      # UFO's list: file names with .jpg; its vehicle_info.txt has no header line.
      _write_lines(f'{split}/test_10000_id.txt', [f'{k}.jpg' for k in _lines(
        f'{split}/test_10000.txt')])
      os.remove(f'{split}/test_10000.txt')
      _write_lines(f'{split}/vehicle_info.txt', _lines(f'{split}/vehicle_info.txt')[1:])
      if not with_train:
        _remove(dst, [f'images/{k}.jpg' for k in _lines(f'{split}/train_list.txt')])
    elif name == 'sop':
      for s in ('train', 'test'):
        rows = [ln.split() for ln in _lines(f'{dst}/Ebay_{s}.txt')[1:]]
        _write_lines(f'{dst}/{s}.txt', [f'{r[3]},{r[1]}' for r in rows])
        os.remove(f'{dst}/Ebay_{s}.txt')
        if s == 'train' and not with_train:
          _remove(dst, [r[3] for r in rows])
    out[name] = dst
  return out
