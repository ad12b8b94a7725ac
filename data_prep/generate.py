"""Writes tiny synthetic datasets in every raw layout of docs/DATA.md.

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


# ------------------------------------------------------------------------ --difficulty=hard
#
# Fine-grained identities under strong nuisances, with per-task image statistics (docs/DATA.md,
# "Hard generated data"). Every identity of a task shares one template (a face, a walking
# figure, a car, an object on white) and differs from the others only in a few discrete details
# drawn from small palettes, so many identities share most of their details. Each image adds a
# viewpoint-like mirror, shift and scale, partial occlusion, background clutter, its camera's
# colour cast and blur, noise and a random JPEG quality.

DIFFICULTIES = ('easy', 'hard')
_CAMERAS = 6  # cameras of the sets whose layout has none (faces, VehicleID, SOP)
CAST = 0.10  # the cameras' colour casts: per-channel gains in [1 - CAST, 1 + CAST]
BG_CAMERA = 0.3  # the camera's share of an image's background colour (the rest: random)

_SKIN = [(224, 172, 140), (198, 140, 105), (160, 110, 80), (236, 196, 170), (120, 84, 62)]
_HAIR = [(30, 25, 20), (90, 60, 30), (160, 120, 60), (110, 110, 110), (60, 30, 20)]
_CLOTH = [(200, 40, 40), (40, 60, 170), (40, 140, 60), (220, 220, 220), (35, 35, 35),
          (200, 170, 40), (120, 60, 140), (150, 110, 80), (60, 150, 170), (180, 80, 40)]
_CAR = [(200, 30, 30), (230, 230, 230), (30, 30, 30), (40, 70, 160), (150, 150, 150),
        (180, 160, 60), (30, 100, 60), (120, 40, 40)]
_GOODS = [(200, 40, 40), (40, 60, 170), (40, 140, 60), (200, 170, 40), (35, 35, 35),
          (150, 110, 80), (120, 60, 140), (180, 180, 180)]


def hard_shape(task: str, size: int) -> tuple[int, int]:
  """(height, width) of a hard image of ``task``: tall persons, wide vehicles, square others."""
  if task == 'person':
    return size, max(8, size // 2)
  if task == 'vehicle':
    return max(8, (size * 5) // 8), size
  return size, size


TINT = 40  # per-identity shift of the two main colours from their palette entries (+-, 0-255)


def _tinted(colour: Sequence[int], tint: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(colour, tint))


def _identity_details(task: str, rng: np.random.Generator) -> dict:
  """The details of one identity: indices into the palettes / choices, and two colour tints.

  ``tint``/``tint2`` shift the identity's two main colours (face: skin, hair; person: top,
  trousers; vehicle: body, glass; product: body, label) a little from their palette entries, so
  identities that share a palette entry still differ slightly.
  """
  pick = lambda n: int(rng.integers(n))  # noqa: E731
  tints = dict(tint=tuple(int(v) for v in rng.integers(-TINT, TINT + 1, 3)),
               tint2=tuple(int(v) for v in rng.integers(-TINT, TINT + 1, 3)))
  return {**tints, **_discrete_details(task, pick)}


def _discrete_details(task: str, pick: Callable[[int], int]) -> dict[str, int]:
  if task == 'face':
    return dict(skin=pick(len(_SKIN)), hair=pick(len(_HAIR)), hair_h=pick(3), eyes=pick(3),
                eye_col=pick(3), brow=pick(2), mouth=pick(3), glasses=pick(3), beard=pick(2))
  if task == 'person':
    return dict(skin=pick(len(_SKIN)), hair=pick(len(_HAIR)), top=pick(len(_CLOTH)),
                legs=pick(len(_CLOTH)), stripe=pick(4), bag=pick(3), bag_col=pick(len(_CLOTH)),
                shoes=pick(3))
  if task == 'vehicle':
    return dict(body=pick(len(_CAR)), roof=pick(3), stripe=pick(4), sticker=pick(4),
                wheel=pick(2), lamp=pick(3))
  return dict(shape=pick(4), col=pick(len(_GOODS)), label=pick(4), label_col=pick(len(_GOODS)),
              dots=pick(4), handle=pick(2))


def _draw_face(d, W: int, H: int, f: dict, t) -> None:
  cx, cy = t(0.5, 0.52)
  rx, ry = 0.30 * W, 0.38 * H
  hair_top = [0.10, 0.06, 0.02][f['hair_h']]
  skin, hair = _tinted(_SKIN[f['skin']], f['tint']), _tinted(_HAIR[f['hair']], f['tint2'])
  d.ellipse(_box(t, 0.18, hair_top, 0.82, 0.55), fill=hair)
  d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
  sep = [0.14, 0.16, 0.18][f['eyes']]
  eye = [(40, 30, 20), (60, 90, 140), (70, 110, 60)][f['eye_col']]
  for sx in (-1, 1):
    ex = 0.5 + sx * sep
    d.ellipse(_box(t, ex - 0.05, 0.40, ex + 0.05, 0.46), fill=(240, 240, 240))
    d.ellipse(_box(t, ex - 0.025, 0.41, ex + 0.025, 0.45), fill=eye)
    d.rectangle(_box(t, ex - 0.07, 0.34, ex + 0.07, 0.34 + [0.02, 0.04][f['brow']]),
                fill=hair)
    if f['glasses']:
      col = (20, 20, 20) if f['glasses'] == 1 else (150, 110, 40)
      d.ellipse(_box(t, ex - 0.08, 0.37, ex + 0.08, 0.49), outline=col, width=max(1, W // 40))
  d.polygon([t(0.5, 0.47), t(0.46, 0.60), t(0.54, 0.60)], fill=tuple(
      int(c * 0.85) for c in skin))
  mw = [0.08, 0.11, 0.14][f['mouth']]
  d.rectangle(_box(t, 0.5 - mw, 0.68, 0.5 + mw, 0.71), fill=(150, 60, 60))
  if f['beard']:
    d.chord(_box(t, 0.26, 0.55, 0.74, 0.92), 20, 160, fill=hair)


def _draw_person(d, W: int, H: int, f: dict, t) -> None:
  top, legs = _tinted(_CLOTH[f['top']], f['tint']), _tinted(_CLOTH[f['legs']], f['tint2'])
  d.rectangle(_box(t, 0.36, 0.52, 0.48, 0.93), fill=legs)
  d.rectangle(_box(t, 0.52, 0.52, 0.64, 0.93), fill=legs)
  shoes = [(20, 20, 20), (230, 230, 230), (140, 70, 30)][f['shoes']]
  d.rectangle(_box(t, 0.34, 0.92, 0.48, 0.97), fill=shoes)
  d.rectangle(_box(t, 0.52, 0.92, 0.66, 0.97), fill=shoes)
  d.rectangle(_box(t, 0.30, 0.20, 0.70, 0.54), fill=top)
  if f['stripe']:
    col = [None, (240, 240, 240), (20, 20, 20), (200, 40, 40)][f['stripe']]
    d.rectangle(_box(t, 0.30, 0.33, 0.70, 0.37), fill=col)
  d.ellipse(_box(t, 0.38, 0.04, 0.62, 0.20), fill=_SKIN[f['skin']])
  d.chord(_box(t, 0.37, 0.03, 0.63, 0.17), 180, 360, fill=_HAIR[f['hair']])
  if f['bag']:
    x0 = 0.18 if f['bag'] == 1 else 0.68
    d.rectangle(_box(t, x0, 0.36, x0 + 0.14, 0.56), fill=_CLOTH[f['bag_col']])


def _draw_vehicle(d, W: int, H: int, f: dict, t) -> None:
  body = _tinted(_CAR[f['body']], f['tint'])
  roof = [(0.28, 0.72), (0.22, 0.62), (0.34, 0.80)][f['roof']]
  d.polygon([t(roof[0], 0.22), t(roof[1], 0.22), t(roof[1] + 0.08, 0.48),
             t(roof[0] - 0.08, 0.48)], fill=body)
  d.polygon([t(roof[0] + 0.03, 0.27), t(roof[1] - 0.03, 0.27), t(roof[1] + 0.03, 0.46),
             t(roof[0] - 0.03, 0.46)], fill=_tinted((70, 90, 110), f['tint2']))
  d.rectangle(_box(t, 0.06, 0.46, 0.94, 0.78), fill=body)
  if f['stripe']:
    col = [None, (240, 240, 240), (20, 20, 20), (220, 180, 30)][f['stripe']]
    d.rectangle(_box(t, 0.06, 0.58, 0.94, 0.62), fill=col)
  if f['sticker']:
    x0 = [0, 0.15, 0.45, 0.72][f['sticker']]
    d.rectangle(_box(t, x0, 0.50, x0 + 0.08, 0.56), fill=(250, 250, 120))
  lamp = [(250, 220, 120), (250, 250, 250), (230, 80, 30)][f['lamp']]
  d.rectangle(_box(t, 0.06, 0.50, 0.11, 0.56), fill=lamp)
  rim = [(40, 40, 40), (190, 190, 190)][f['wheel']]
  for x in (0.24, 0.76):
    d.ellipse(_box(t, x - 0.09, 0.66, x + 0.09, 0.96), fill=(15, 15, 15))
    d.ellipse(_box(t, x - 0.04, 0.74, x + 0.04, 0.88), fill=rim)


def _draw_product(d, W: int, H: int, f: dict, t) -> None:
  col = _tinted(_GOODS[f['col']], f['tint'])
  box = _box(t, 0.22, 0.18, 0.78, 0.84)
  if f['shape'] == 0:
    d.ellipse(box, fill=col)
  elif f['shape'] == 1:
    d.rectangle(box, fill=col)
  elif f['shape'] == 2:
    d.polygon([t(0.5, 0.16), t(0.80, 0.84), t(0.20, 0.84)], fill=col)
  else:
    d.rectangle(_box(t, 0.34, 0.18, 0.66, 0.84), fill=col)
    d.rectangle(_box(t, 0.22, 0.62, 0.78, 0.84), fill=col)
  if f['handle']:
    d.arc(_box(t, 0.70, 0.34, 0.92, 0.62), 270, 90, fill=col, width=max(1, W // 24))
  if f['label']:
    y0 = [0, 0.32, 0.48, 0.64][f['label']]
    d.rectangle(_box(t, 0.36, y0, 0.64, y0 + 0.10),
                fill=_tinted(_GOODS[f['label_col']], f['tint2']))
  for k in range(f['dots']):
    d.ellipse(_box(t, 0.40 + 0.08 * k, 0.24, 0.45 + 0.08 * k, 0.29), fill=(250, 250, 250))


_DRAW = {'face': _draw_face, 'person': _draw_person, 'vehicle': _draw_vehicle,
         'product': _draw_product}


def _clutter(rng: np.random.Generator, background: np.ndarray) -> tuple[int, ...]:
  """A clutter colour: a random colour half-way to the background's."""
  return tuple(int(v) for v in (rng.integers(0, 256, 3) + background) // 2)


def _box(t, x0: float, y0: float, x1: float, y1: float) -> list[float]:
  (a, b), (c, e) = t(x0, y0), t(x1, y1)
  return [min(a, c), min(b, e), max(a, c), max(b, e)]


def render_hard(task: str, details: dict, size: int, camera: int,
                img_rng: np.random.Generator, cam_rng: np.random.Generator,
                quality: int | None = None) -> bytes:
  """A JPEG of one identity (``details``) seen by ``camera`` under strong nuisances."""
  from PIL import ImageDraw, ImageFilter  # pylint: disable=g-import-not-at-top

  H, W = hard_shape(task, size)
  up = 2  # draw at twice the size, then downsample (anti-aliasing)
  HH, WW = H * up, W * up
  cast = cam_rng.uniform(1 - CAST, 1 + CAST, 3)  # the camera's colour cast (per-channel gain)
  blur = float(cam_rng.uniform(0.0, 0.8)) * size / 48
  # The background: mostly the image's own random colour, a little of its camera's (a camera
  # whose background dominated the pixels would make every gallery image of the query's camera
  # look alike, whatever the identity).
  cam_bg = (BG_CAMERA * cam_rng.integers(40, 200, 3)
            + (1 - BG_CAMERA) * img_rng.integers(20, 236, 3)).astype(np.int64)
  if task == 'product':  # products on white, a little shadow
    canvas = Image.new('RGB', (WW, HH), tuple(int(v) for v in img_rng.integers(235, 256, 3)))
  else:
    canvas = Image.new('RGB', (WW, HH), tuple(int(v) for v in cam_bg))
  d = ImageDraw.Draw(canvas)
  if task in ('person', 'vehicle'):  # background clutter
    for _ in range(int(img_rng.integers(1, 4))):
      x0, y0 = img_rng.uniform(-0.2, 1.0) * WW, img_rng.uniform(-0.2, 1.0) * HH
      w, h = img_rng.uniform(0.1, 0.35) * WW, img_rng.uniform(0.1, 0.35) * HH
      d.rectangle([x0, y0, x0 + w, y0 + h], fill=_clutter(img_rng, cam_bg))
  elif task == 'face':
    for _ in range(int(img_rng.integers(1, 4))):
      x0, y0 = img_rng.uniform(-0.2, 1.0) * WW, img_rng.uniform(-0.2, 1.0) * HH
      d.ellipse([x0, y0, x0 + 0.4 * WW, y0 + 0.4 * HH], fill=_clutter(img_rng, cam_bg))
  # Viewpoint-like geometry: mirror, scale, shift (aligned faces move little).
  small = task == 'face'
  scale = img_rng.uniform(0.92, 1.08) if small else img_rng.uniform(0.82, 1.05)
  shift = 0.04 if small else 0.08
  dx, dy = img_rng.uniform(-shift, shift, 2)
  mirror = task != 'face' and img_rng.random() < 0.5
  squash = 1.0 if small else img_rng.uniform(0.9, 1.1)  # aspect change (viewing angle)

  def t(x: float, y: float) -> tuple[float, float]:
    x = 1.0 - x if mirror else x
    return (((x - 0.5) * scale * squash + 0.5 + dx) * WW,
            ((y - 0.5) * scale + 0.5 + dy) * HH)

  _DRAW[task](d, WW, HH, details, t)
  if task == 'product' and img_rng.random() < 0.5:  # a rotated shot
    canvas = canvas.rotate(float(img_rng.uniform(-25, 25)), resample=Image.BILINEAR,
                           fillcolor=(245, 245, 245))
    d = ImageDraw.Draw(canvas)
  if img_rng.random() < (0.1 if small else 0.2):  # partial occlusion
    ow, oh = img_rng.uniform(0.15, 0.35) * WW, img_rng.uniform(0.15, 0.3) * HH
    x0, y0 = img_rng.uniform(0, WW - ow), img_rng.uniform(0, HH - oh)
    d.rectangle([x0, y0, x0 + ow, y0 + oh], fill=tuple(int(v) for v in img_rng.integers(0, 256, 3)))
  canvas = canvas.resize((W, H), Image.BILINEAR)
  if blur > 0.05:
    canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
  img = np.asarray(canvas, np.float32) * cast * img_rng.uniform(0.85, 1.15)
  img += 6.0 * img_rng.standard_normal(img.shape).astype(np.float32)
  buf = io.BytesIO()
  q = int(img_rng.integers(40, 91)) if quality is None else quality
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=q)
  return buf.getvalue()


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

  def __init__(self, dataset: str, sizes: Sizes, seed: int, difficulty: str = 'easy'):
    if difficulty not in DIFFICULTIES:
      raise ValueError(f'difficulty must be one of {DIFFICULTIES}, got {difficulty!r}')
    self.dataset = dataset
    self.task = catalog.get(dataset).task
    self.sizes = sizes
    self.seed = seed
    self.difficulty = difficulty
    self._count = 0
    self._patterns: dict[int, np.ndarray] = {}
    self._details: dict[int, dict] = {}

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

  def image(self, identity: int, quality: int = 90, camera: int | None = None) -> bytes:
    """A new JPEG of ``identity`` (seen by ``camera``, where the layout has cameras).

    Easy: pattern + shift + brightness + noise at JPEG ``quality``. Hard: ``render_hard``
    (the camera's colour cast and blur; a random camera where none is given; random quality).
    """
    size = self.sizes.image_size
    rng = self._rng('img', identity, self._count)
    self._count += 1
    if self.difficulty == 'hard':
      if identity not in self._details:
        self._details[identity] = _identity_details(self.task, self._rng('details', identity))
      cam = int(rng.integers(1, _CAMERAS + 1)) if camera is None else camera
      return render_hard(self.task, self._details[identity], size, cam, rng,
                         self._rng('camera', cam))
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

  def __init__(self, name: str, raw_root: str, sizes: Sizes, seed: int,
               difficulty: str = 'easy', shuffled_labels: bool = False):
    self.shuffled_labels = shuffled_labels
    self.name = name
    self.info = catalog.get(name)
    self.root = os.path.join(raw_root, self.info.raw_folder)
    self.sizes = sizes
    self.paint = _Painter(name, sizes, seed, difficulty)
    self.out = Generated(name=name, path=self.root)

  def shown(self, identity: int, key: str, train: bool) -> int:
    """The identity an image labelled ``identity`` shows: itself, except with shuffled labels.

    ``shuffled_labels`` (a BENCHMARK SABOTAGE, bench/learning.py) makes every training image
    show one of ``num_ids`` identities drawn at random, whatever its label: the labels of the
    training split say nothing about the images (test splits are unchanged).
    """
    if not (train and self.shuffled_labels):
      return identity
    return 10**7 + int(self.paint._rng('shuffled', key).integers(self.sizes.num_ids))

  def image(self, rel: str, identity: int, camera: int | None = None,
            train: bool = False) -> bytes:
    data = self.paint.image(self.shown(identity, rel, train), camera=camera)
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
    w.image(rel, pid, cam, train=split == 'train')
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
    w.image(f'{folder}/{rel}', pid, cam, train=lst in ('train', 'val'))
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
      w.image(rel, vid, cam, train=True)
      items['train'].append(Item(rel, vid, cam))
  for i in range(s.test_ids):
    vid = 2 * i + 1
    cam = 1 + i % 20
    fname = name(vid, cam)
    data = w.image(f'image_query/{fname}', vid, cam)
    _write(w.root, f'image_test/{fname}', data)  # the release repeats queries in image_test
    w.out.images[f'image_test/{fname}'] = data
    items['query'].append(Item(f'image_query/{fname}', vid, cam))
    items['gallery'].append(Item(f'image_test/{fname}', vid, cam))
    for j in range(max(2, s.images_per_id)):
      gcam = 1 + (i + j + 1) % 20
      rel = f'image_test/{name(vid, gcam)}'
      w.image(rel, vid, gcam)
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
      w.image(rel, vid, train=True)
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
    w.image(f'images/{key}.jpg', vid, cam, train=split == 'train')
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
        w.image(rel, cls, train=split == 'train')
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
        w.image(rel, ident, train=True)
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
        data = w.paint.image(w.shown(ident, f'rec{key}', True))
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
                  sizes: Sizes | None = None, difficulty: str = 'easy',
                  shuffled_labels: bool = False, **kwargs) -> Generated:
  """Writes dataset ``name`` under ``raw_root`` in its raw layout; returns the truth.

  Face sets are written to ``raw_root/<name>.bin``. ``kwargs`` go to the
  dataset's writer (``folder_form``/``split_records`` for ms1mv3,
  ``path``/``array_bins`` for face sets).
  """
  sizes = sizes or Sizes()
  w = _Writer(name, str(raw_root), sizes, seed, difficulty, shuffled_labels)
  if name in FACE_SETS:
    return write_face_bin(w, **kwargs)
  if name not in _WRITERS:
    raise ValueError(f'unknown dataset {name!r}; known: {sorted(catalog.DATASETS)}')
  return _WRITERS[name](w, **kwargs)


def write_all(raw_root: str | os.PathLike, *, seed: int = 0, datasets: Sequence[str] | None = None,
              difficulty: str = 'easy', shuffled_labels: bool = False,
              **sizes) -> dict[str, str]:
  """Writes every dataset (or ``datasets``) under ``raw_root``; returns {name: raw path}.

  ``sizes``: fields of ``Sizes`` (num_ids, num_test_ids, images_per_id,
  image_size, num_pairs). The face .bin files go to ``raw_root/<name>.bin``.
  """
  sz = Sizes(**sizes)
  names = list(datasets) if datasets is not None else list(catalog.DATASETS)
  return {n: write_dataset(n, raw_root, seed=seed, sizes=sz, difficulty=difficulty,
                          shuffled_labels=shuffled_labels).path for n in names}


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
  flags.DEFINE_enum('difficulty', 'easy', DIFFICULTIES, "'easy': coloured block patterns (the "
                    "tests and `make demo`); 'hard': fine-grained identities under strong "
                    'nuisances, per-task image shapes and statistics (docs/DATA.md).')
  flags.DEFINE_bool('shuffled_labels', False, 'BENCHMARK SABOTAGE (bench/learning.py): training '
                    'images show random identities, whatever their labels.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.raw_root:
    raise app.UsageError('--raw_root is required')
  paths = write_all(
      FLAGS.raw_root, seed=FLAGS.seed, datasets=FLAGS.datasets, num_ids=FLAGS.num_ids,
      num_test_ids=FLAGS.num_test_ids, images_per_id=FLAGS.images_per_id,
      image_size=FLAGS.image_size, num_pairs=FLAGS.num_pairs, difficulty=FLAGS.difficulty,
      shuffled_labels=FLAGS.shuffled_labels)
  for name, path in paths.items():
    print(f'{name:12s} {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
