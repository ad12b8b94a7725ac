"""Writes tiny synthetic datasets in every raw layout of SPEC §2.

Used by the tests (fixtures in the real published layouts) and by the
end-to-end demo (learnable data). Every identity gets a fixed random layout of
coloured blocks (the grid shape depends on the task), keyed by (dataset,
identity), so the same identity looks the same in train/query/gallery and on
every camera; each image adds a random shift, a brightness change and noise.
Test identities are new identities drawn from the same family, so an embedding
learnt on the train identities generalises to them. Everything is
deterministic given ``seed``.

  python -m data_prep.generate --raw_root=/tmp/raw --num_ids=8 --images_per_id=4

``write_all(raw_root)`` returns {dataset: raw path} (what
``data_prep.build.convert(dataset, raw_dir, out_dir)`` takes);
``write_dataset(name, raw_root)`` also returns the known truth
(``Generated``): the examples each split must hold, in order.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zlib
from typing import Callable, Sequence

import numpy as np
from absl import app, flags
from PIL import Image

from data_prep import face_bin, recordio
from ufo_jax import catalog

FLAGS = flags.FLAGS

# Block grid (rows, cols) of the identity pattern per task.
_GRID = {'face': (4, 4), 'person': (4, 2), 'vehicle': (3, 3), 'product': (2, 3)}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Sizes of the generated datasets."""

  num_ids: int = 4  # identities of each train split
  num_test_ids: int | None = None  # identities of each test split (default: num_ids)
  images_per_id: int = 3  # images per identity and split (gallery: at least 2)
  image_size: int = 32  # square images of image_size x image_size pixels
  num_pairs: int = 20  # pairs per face verification set (a multiple of 10 suits 10 folds)

  @property
  def test_ids(self) -> int:
    return self.num_ids if self.num_test_ids is None else self.num_test_ids


@dataclasses.dataclass(frozen=True)
class Item:
  """One expected example: path relative to the raw folder, identity, camera."""

  path: str
  id: int
  camera: int = -1


@dataclasses.dataclass
class Generated:
  """What ``write_dataset`` wrote: the raw folder (or .bin) and the known truth."""

  name: str
  path: str
  splits: dict[str, list[Item]] = dataclasses.field(default_factory=dict)
  pairs: list[bool] = dataclasses.field(default_factory=list)  # face sets: is_same
  images: dict[str, bytes] = dataclasses.field(default_factory=dict)  # path -> bytes


class _Painter:
  """Renders and encodes identity images deterministically."""

  def __init__(self, dataset: str, sizes: Sizes, seed: int):
    self.dataset = dataset
    self.task = catalog.get(dataset).task
    self.sizes = sizes
    self.seed = seed
    self._count = 0
    self._patterns: dict[int, np.ndarray] = {}

  def _rng(self, *keys: object) -> np.random.Generator:
    text = '/'.join(str(k) for k in (self.dataset, *keys))
    return np.random.default_rng([self.seed, zlib.crc32(text.encode())])

  def pattern(self, identity: int) -> np.ndarray:
    """The identity's (rows, cols, 3) block colours."""
    if identity not in self._patterns:
      rows, cols = _GRID[self.task]
      self._patterns[identity] = self._rng('id', identity).integers(
          0, 256, (rows, cols, 3)).astype(np.float32)
    return self._patterns[identity]

  def image(self, identity: int, quality: int = 90) -> bytes:
    """A new JPEG of ``identity``: pattern + shift + brightness + noise."""
    size = self.sizes.image_size
    rng = self._rng('img', identity, self._count)
    self._count += 1
    colours = self.pattern(identity)
    rows, cols = colours.shape[:2]
    ys = np.minimum(np.arange(size) * rows // size, rows - 1)
    xs = np.minimum(np.arange(size) * cols // size, cols - 1)
    img = colours[ys][:, xs]
    max_shift = max(1, size // 16)
    dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
    img = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
    img = img * rng.uniform(0.8, 1.2) + 6.0 * rng.standard_normal(img.shape, np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=quality)
    return buf.getvalue()


def _write(root: str, rel: str, data: bytes) -> None:
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _write_lines(root: str, rel: str, lines: Sequence[str]) -> None:
  _write(root, rel, ''.join(f'{line}\n' for line in lines).encode())


class _Writer:
  """Shared state of one dataset's generation."""

  def __init__(self, name: str, raw_root: str, sizes: Sizes, seed: int):
    self.name = name
    self.info = catalog.get(name)
    self.root = os.path.join(raw_root, self.info.raw_folder)
    self.sizes = sizes
    self.paint = _Painter(name, sizes, seed)
    self.out = Generated(name=name, path=self.root)

  def image(self, rel: str, identity: int) -> bytes:
    data = self.paint.image(identity)
    _write(self.root, rel, data)
    self.out.images[rel] = data
    return data

  def expect(self, split: str, items: list[Item], sort: bool = False) -> None:
    self.out.splits[split] = sorted(items, key=lambda it: it.path) if sort else items


def _market_like(w: _Writer, num_cams: int, name_fn: Callable[[int, int, int], str],
                 junk: bool, distractor_ids: Sequence[int]) -> Generated:
  """Market-1501 / DukeMTMC-reID: folders of `<pid>_c<cam>...jpg`."""
  s = w.sizes
  frame = iter(range(1, 10**7))
  items: dict[str, list[Item]] = {'train': [], 'query': [], 'gallery': []}

  def add(split: str, folder: str, pid: int, cam: int, keep: bool = True) -> None:
    rel = f'{folder}/{name_fn(pid, cam, next(frame))}'
    w.image(rel, pid)
    if keep:
      items[split].append(Item(rel, pid, cam))

  for i in range(s.num_ids):
    pid = 2 * i + 2
    for j in range(s.images_per_id):
      add('train', 'bounding_box_train', pid, 1 + (i + j) % num_cams)
  for i in range(s.test_ids):
    pid = 2 * i + 1
    qcam = 1 + i % num_cams
    add('query', 'query', pid, qcam)
    for j in range(max(2, s.images_per_id)):  # first gallery image: same camera as the query
      add('gallery', 'bounding_box_test', pid, 1 + (i + j) % num_cams)
  for pid in distractor_ids:
    for j in range(2):
      add('gallery', 'bounding_box_test', pid, 1 + j % num_cams)
  if junk:  # pid -1: junk, dropped by the converter
    for j in range(2):
      add('gallery', 'bounding_box_test', -1, 1 + j, keep=False)
  for folder in ('bounding_box_train', 'bounding_box_test', 'query'):
    _write(w.root, f'{folder}/Thumbs.db', b'\x00stray')
  _write(w.root, 'readme.txt', b'synthetic\n')
  for split, its in items.items():
    w.expect(split, its, sort=True)
  return w.out


def write_market1501(w: _Writer) -> Generated:
  """Market-1501-v15.09.15: `0002_c1s1_000451_03.jpg`, pid 0 distractors, pid -1 junk."""
  def name(pid: int, cam: int, frame: int) -> str:
    return f'{pid:04d}_c{cam}s1_{frame:06d}_01.jpg' if pid >= 0 else \
        f'{pid}_c{cam}s1_{frame:06d}_01.jpg'
  return _market_like(w, 6, name, junk=True, distractor_ids=[0])


def write_dukemtmc(w: _Writer) -> Generated:
  """DukeMTMC-reID: `0001_c2_f0046182.jpg`, 8 cameras, gallery-only distractor ids."""
  return _market_like(w, 8, lambda pid, cam, fr: f'{pid:04d}_c{cam}_f{fr:07d}.jpg',
                      junk=False, distractor_ids=[9000 + w.sizes.test_ids])


def write_msmt17(w: _Writer) -> Generated:
  """MSMT17_V1: train/ and test/ folders + list_{train,val,query,gallery}.txt."""
  s = w.sizes
  frame = iter(range(1, 10**6))
  lists: dict[str, list[str]] = {'train': [], 'val': [], 'query': [], 'gallery': []}
  items: dict[str, list[Item]] = {'train': [], 'query': [], 'gallery': []}

  def add(lst: str, folder: str, pid: int, cam: int, n: int) -> None:
    fname = f'{pid:04d}_{n:03d}_{cam:02d}_0303morning_{next(frame):04d}_0.jpg'
    rel = f'{pid:04d}/{fname}'
    w.image(f'{folder}/{rel}', pid)
    lists[lst].append(f'{rel} {pid}')
    if lst in items:
      items[lst].append(Item(f'{folder}/{rel}', pid, cam))

  for pid in range(s.num_ids):
    for j in range(s.images_per_id):
      add('train', 'train', pid, 1 + (pid + j) % 15, j)
    add('val', 'train', pid, 15, s.images_per_id)  # list_val.txt: not converted
  for pid in range(s.test_ids):
    add('query', 'test', pid, 1 + pid % 15, 0)
    for j in range(max(2, s.images_per_id)):
      add('gallery', 'test', pid, 1 + (pid + j) % 15, j + 1)
  for lst, lines in lists.items():
    _write_lines(w.root, f'list_{lst}.txt', lines)
  for split, its in items.items():
    w.expect(split, its)
  return w.out


def write_veri776(w: _Writer) -> Generated:
  """VeRi: image_{train,query,test}/`0002_c002_00030600_0.jpg`; queries also in image_test."""
  s = w.sizes
  frame = iter(range(1, 10**7))
  items: dict[str, list[Item]] = {'train': [], 'query': [], 'gallery': []}

  def name(vid: int, cam: int) -> str:
    return f'{vid:04d}_c{cam:03d}_{next(frame):08d}_0.jpg'

  for i in range(s.num_ids):
    vid = 2 * i + 2
    for j in range(s.images_per_id):
      cam = 1 + (i + j) % 20
      rel = f'image_train/{name(vid, cam)}'
      w.image(rel, vid)
      items['train'].append(Item(rel, vid, cam))
  for i in range(s.test_ids):
    vid = 2 * i + 1
    cam = 1 + i % 20
    fname = name(vid, cam)
    data = w.image(f'image_query/{fname}', vid)
    _write(w.root, f'image_test/{fname}', data)  # the release repeats queries in image_test
    w.out.images[f'image_test/{fname}'] = data
    items['query'].append(Item(f'image_query/{fname}', vid, cam))
    items['gallery'].append(Item(f'image_test/{fname}', vid, cam))
    for j in range(max(2, s.images_per_id)):
      gcam = 1 + (i + j + 1) % 20
      rel = f'image_test/{name(vid, gcam)}'
      w.image(rel, vid)
      items['gallery'].append(Item(rel, vid, gcam))
  for split, its in items.items():
    w.expect(split, its, sort=True)
  return w.out


def write_vehicleid(w: _Writer) -> Generated:
  """VehicleID_V1.0: image/<imgid>.jpg + train_test_split/{train_list,test_list_*}.txt."""
  s = w.sizes
  imgid = iter(range(1, 10**7))
  train: list[Item] = []
  for i in range(s.num_ids):
    vid = 10 + 2 * i
    for _ in range(s.images_per_id):
      rel = f'image/{next(imgid):07d}.jpg'
      w.image(rel, vid)
      train.append(Item(rel, vid))
  test: list[Item] = []
  for i in range(s.test_ids):
    vid = 11 + 2 * i
    for _ in range(max(2, s.images_per_id)):
      rel = f'image/{next(imgid):07d}.jpg'
      w.image(rel, vid)
      test.append(Item(rel, vid))
  test_vids = sorted({it.id for it in test})
  n800 = max(1, len(test_vids) // 3)
  n1600 = max(1, 2 * len(test_vids) // 3)
  sub = {
      'test_800': [it for it in test if it.id in set(test_vids[:n800])],
      'test_1600': [it for it in test if it.id in set(test_vids[:n1600])],
      'test': test,
  }

  def line(it: Item) -> str:
    return f'{os.path.basename(it.path)[:-4]} {it.id}'

  _write_lines(w.root, 'train_test_split/train_list.txt', [line(it) for it in train])
  for split, fname in (('test_800', '800'), ('test_1600', '1600'), ('test', '2400')):
    _write_lines(w.root, f'train_test_split/test_list_{fname}.txt', [line(it) for it in sub[split]])
  w.expect('train', train)
  for split, its in sub.items():
    w.expect(split, its)
  return w.out


def write_veriwild(w: _Writer) -> Generated:
  """VERI-Wild: images/<vid>/<imgid>.jpg, train_test_split lists and vehicle_info.txt."""
  s = w.sizes
  imgid = iter(range(1, 10**7))
  info = ['id/image;Camera ID;Time;Model;Type;Color']
  items: dict[str, list[Item]] = {'train': [], 'query': [], 'gallery': []}

  def add(split: str, vid: int, cam: int) -> str:
    key = f'{vid:05d}/{next(imgid):06d}'
    w.image(f'images/{key}.jpg', vid)
    info.append(f'{key};{cam:03d};2018-03-11 10:02:36;Audi-A4L;Sedan;White')
    items[split].append(Item(f'images/{key}.jpg', vid, cam))
    return key

  train = [add('train', 2 * i + 2, 1 + (i + j) % 174)
           for i in range(s.num_ids) for j in range(s.images_per_id)]
  query, gallery = [], []
  for i in range(s.test_ids):
    vid = 2 * i + 1
    query.append(add('query', vid, 1 + i % 174))
    gallery += [add('gallery', vid, 1 + (i + j + 1) % 174) for j in range(max(2, s.images_per_id))]
  # test_10000.txt repeats the query lines (interleaved); the converter drops them from gallery.
  per = max(2, s.images_per_id)
  full = [k for i in range(s.test_ids) for k in [query[i], *gallery[i * per:(i + 1) * per]]]
  _write_lines(w.root, 'train_test_split/train_list.txt', train)
  for n in (3000, 5000, 10000):
    _write_lines(w.root, f'train_test_split/test_{n}_query.txt', query)
    _write_lines(w.root, f'train_test_split/test_{n}.txt', full)
  _write_lines(w.root, 'train_test_split/vehicle_info.txt', info)
  for split, its in items.items():
    w.expect(split, its)
  return w.out


def write_sop(w: _Writer) -> Generated:
  """Stanford_Online_Products: <super>_final/<name>.JPG + Ebay_{train,test}.txt."""
  s = w.sizes
  supers = ['bicycle', 'cabinet', 'chair', 'coffee_maker']
  image_id = iter(range(1, 10**7))
  for split, first, n in (('train', 1, s.num_ids), ('test', s.num_ids + 1, s.test_ids)):
    lines = ['image_id class_id super_class_id path']
    items = []
    for cls in range(first, first + n):
      sup = cls % len(supers)
      for j in range(s.images_per_id if split == 'train' else max(2, s.images_per_id)):
        rel = f'{supers[sup]}_final/{100000 + cls}_{j}.JPG'
        w.image(rel, cls)
        lines.append(f'{next(image_id)} {cls} {sup + 1} {rel}')
        items.append(Item(rel, cls))
    _write_lines(w.root, f'Ebay_{split}.txt', lines)
    w.expect(split, items)
  return w.out


def write_ms1mv3(w: _Writer, folder_form: bool = False, split_records: bool = True) -> Generated:
  """ms1m-retinaface-t1: train.rec + train.idx (or `<id>/*.jpg` with ``folder_form``).

  The RecordIO has the header record (key 0, labels (a, b)), image records
  ``[1, a)`` with float labels (some with a label array, flag 2) and identity
  records ``[a, b)`` with labels (start, end). With ``split_records`` two
  images carry the magic number in their data, so their records are split.
  """
  s = w.sizes
  items: list[Item] = []
  if folder_form:
    for ident in range(s.num_ids):
      for j in range(s.images_per_id):
        rel = f'{ident}/{j}.jpg'
        w.image(rel, ident)
        items.append(Item(rel, ident))
    items.sort(key=lambda it: (it.id, it.path))
    w.expect('train', items)
    return w.out
  os.makedirs(w.root, exist_ok=True)
  n_img = s.num_ids * s.images_per_id
  a, b = n_img + 1, n_img + 1 + s.num_ids
  with recordio.IndexedWriter(os.path.join(w.root, 'train.rec'),
                              os.path.join(w.root, 'train.idx')) as rec:
    rec.write_idx(0, recordio.pack([float(a), float(b)], b''))
    key = 1
    for ident in range(s.num_ids):
      for _ in range(s.images_per_id):
        data = w.paint.image(ident)
        if split_records and key in (1, n_img):
          data = recordio.split_payload_example(data)
        label: float | list[float] = float(ident) if key % 2 else [float(ident), 0.0]
        rec.write_idx(key, recordio.pack(label, data, id_=key))
        rel = f'train.rec#{key}'
        w.out.images[rel] = data
        items.append(Item(rel, ident))
        key += 1
    for ident in range(s.num_ids):
      start = 1 + ident * s.images_per_id
      rec.write_idx(a + ident, recordio.pack([float(start), float(start + s.images_per_id)], b''))
  _write_lines(w.root, 'property', [f'{s.num_ids},{s.image_size},{s.image_size}'])
  w.expect('train', items)
  return w.out


def write_face_bin(w: _Writer, path: str | None = None, array_bins: bool = False) -> Generated:
  """An insightface ``<name>.bin``: pickle of (bins, issame_list), pairs balanced.

  Pair i is same-identity when i is even. ``array_bins`` stores the images as
  numpy uint8 arrays and issame as a numpy bool array (both occur in the wild).
  """
  s = w.sizes
  path = path or os.path.join(os.path.dirname(w.root), w.info.raw_folder)
  images: list[bytes] = []
  same: list[bool] = []
  next_id = iter(range(10**7))
  for i in range(s.num_pairs):
    is_same = i % 2 == 0
    ia = next(next_id)
    ib = ia if is_same else next(next_id)
    images += [w.paint.image(ia), w.paint.image(ib)]
    same.append(is_same)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if array_bins:
    face_bin.write_bin(path, [np.frombuffer(x, np.uint8) for x in images], np.array(same))
  else:
    face_bin.write_bin(path, images, same)
  w.out.path = path
  w.out.pairs = same
  w.out.images = {f'{i}': x for i, x in enumerate(images)}
  return w.out


_WRITERS: dict[str, Callable[..., Generated]] = {
    'ms1mv3': write_ms1mv3, 'market1501': write_market1501, 'dukemtmc': write_dukemtmc,
    'msmt17': write_msmt17, 'veri776': write_veri776, 'vehicleid': write_vehicleid,
    'veriwild': write_veriwild, 'sop': write_sop,
}
FACE_SETS = tuple(n for n, d in catalog.DATASETS.items() if d.task == 'face' and n != 'ms1mv3')


def write_dataset(name: str, raw_root: str | os.PathLike, *, seed: int = 0,
                  sizes: Sizes | None = None, **kwargs) -> Generated:
  """Writes dataset ``name`` under ``raw_root`` in its raw layout; returns the truth.

  Face sets are written to ``raw_root/<name>.bin``. ``kwargs`` go to the
  dataset's writer (``folder_form``/``split_records`` for ms1mv3,
  ``path``/``array_bins`` for face sets).
  """
  sizes = sizes or Sizes()
  w = _Writer(name, str(raw_root), sizes, seed)
  if name in FACE_SETS:
    return write_face_bin(w, **kwargs)
  if name not in _WRITERS:
    raise ValueError(f'unknown dataset {name!r}; known: {sorted(catalog.DATASETS)}')
  return _WRITERS[name](w, **kwargs)


def write_all(raw_root: str | os.PathLike, *, seed: int = 0, datasets: Sequence[str] | None = None,
              **sizes) -> dict[str, str]:
  """Writes every dataset (or ``datasets``) under ``raw_root``; returns {name: raw path}.

  ``sizes``: fields of ``Sizes`` (num_ids, num_test_ids, images_per_id,
  image_size, num_pairs). The face .bin files go to ``raw_root/<name>.bin``.
  """
  sz = Sizes(**sizes)
  names = list(datasets) if datasets is not None else list(catalog.DATASETS)
  return {n: write_dataset(n, raw_root, seed=seed, sizes=sz).path for n in names}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('raw_root', None, 'Folder to write the raw datasets into.')
  flags.DEFINE_list('datasets', None, 'Datasets to write (default: all).')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  flags.DEFINE_integer('num_ids', Sizes.num_ids, 'Identities per train split.')
  flags.DEFINE_integer('num_test_ids', None, 'Identities per test split.')
  flags.DEFINE_integer('images_per_id', Sizes.images_per_id, 'Images per id.')
  flags.DEFINE_integer('image_size', Sizes.image_size, 'Image side in pixels.')
  flags.DEFINE_integer('num_pairs', Sizes.num_pairs, 'Pairs per face test set.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.raw_root:
    raise app.UsageError('--raw_root is required')
  paths = write_all(
      FLAGS.raw_root, seed=FLAGS.seed, datasets=FLAGS.datasets, num_ids=FLAGS.num_ids,
      num_test_ids=FLAGS.num_test_ids, images_per_id=FLAGS.images_per_id,
      image_size=FLAGS.image_size, num_pairs=FLAGS.num_pairs)
  for name, path in paths.items():
    print(f'{name:12s} {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
