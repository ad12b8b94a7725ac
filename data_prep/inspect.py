"""A look at converted data before training: counts per split and a PNG grid of its images.

  python -m data_prep.inspect --data_dir=DIR [--dataset=NAME] [--out=DIR]

For every converted set under ``--data_dir`` (or the ``--dataset`` names, comma-separated) and
every split it prints: images, identities, images per identity (min/median/max), cameras, and
image sizes (min/median/max height and width, from the headers of up to ``--size_sample``
evenly spaced images); face verification sets also pairs and positive pairs. Above each set, one
line says how it was built (raw folder, count check; from its provenance metadata).

It writes one PNG per split to ``--out`` (default ``DIR/inspect``): ``<set>_<split>.png``, a
grid of a few identities (rows) x a few of their images, each labelled with its id, training
label and camera; for face sets a few pairs, framed green (same) or red (different). The
images are decoded by TFDS (``builder.as_data_source(split)``), so a wrong crop, channel order
or label mapping shows before a training run. The text goes to ``--out/summary.txt`` too.
``as_dataframe(path, split, n)`` gives the first examples as ``tfds.as_dataframe`` shows them.

The counts read the ``id`` and ``camera`` of every record (no image is decoded): seconds for
the re-id sets, a few minutes for MS1M-V3's 5.2M records.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image, ImageDraw

from data_prep import build
from ufo_jax import catalog

FLAGS = flags.FLAGS
CELL = 96  # side of one grid cell, pixels
CAPTION = 14  # caption strip under each cell
_CHUNK = 8192


@dataclasses.dataclass
class SplitStats:
  """What one converted split holds."""

  dataset: str
  split: str
  images: int
  ids: int | None = None  # distinct identities (None for face pair sets)
  per_id: tuple[int, int, int] | None = None  # images per identity: min, median, max
  cameras: int | None = None  # distinct cameras (None where the set has none)
  heights: tuple[int, int, int] = (0, 0, 0)  # min, median, max over the sampled images
  widths: tuple[int, int, int] = (0, 0, 0)
  sampled: int = 0  # images whose size was read
  pairs: int | None = None  # face sets
  positive_pairs: int | None = None
  grid: str = ''  # the PNG written

  def format(self) -> str:
    size = (f'{self.heights[0]}x{self.widths[0]} / {self.heights[1]}x{self.widths[1]} / '
            f'{self.heights[2]}x{self.widths[2]}')
    if self.pairs is not None:
      return (f'  {self.split:10s} {self.images:9,d} images, {self.pairs:,} pairs '
              f'({self.positive_pairs:,} positive); HxW min/median/max {size}')
    per_id = '/'.join(str(v) for v in self.per_id) if self.per_id else '-'
    cams = '-' if self.cameras is None else str(self.cameras)
    return (f'  {self.split:10s} {self.images:9,d} {self.ids:8,d} {per_id:>18s} {cams:>7s}   '
            f'{size}')


def header() -> str:
  return (f'  {"split":10s} {"images":>9s} {"ids":>8s} {"img/id min/med/max":>18s} '
          f'{"cameras":>7s}   HxW min / median / max')


def _triple(values: np.ndarray) -> tuple[int, int, int]:
  if not len(values):
    return (0, 0, 0)
  return int(values.min()), int(np.median(values)), int(values.max())


def image_keys(info) -> list[str]:
  return [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]


def _encoded(builder, split: str):
  """The split's data source with the images left as their stored bytes."""
  return builder.as_data_source(
      split, decoders={k: tfds.decode.SkipDecoding() for k in image_keys(builder.info)})


def _columns(source, keys: Sequence[str]) -> dict[str, np.ndarray]:
  n = len(source)
  out = {k: np.empty(n, np.int64) for k in keys}
  for start in range(0, n, _CHUNK):
    stop = min(n, start + _CHUNK)
    for j, ex in enumerate(source.__getitems__(list(range(start, stop)))):
      for k in keys:
        out[k][start + j] = int(ex[k])
  return out


def split_stats(builder, dataset: str, split: str, size_sample: int = 1000) -> SplitStats:
  """Counts, identities, cameras and sampled image sizes of one split (no decoding)."""
  source = _encoded(builder, split)
  n = len(source)
  keys = image_keys(builder.info)
  pairs = 'is_same' in builder.info.features
  if pairs:
    same = _columns(source, ['is_same'])['is_same']
    stats = SplitStats(dataset, split, images=2 * n, pairs=n, positive_pairs=int(same.sum()))
  else:
    cols = _columns(source, ['id', 'camera'])
    _, counts = np.unique(cols['id'], return_counts=True)
    cams = np.unique(cols['camera'][cols['camera'] >= 0])
    stats = SplitStats(dataset, split, images=n, ids=len(counts), per_id=_triple(counts),
                       cameras=len(cams) if len(cams) else None)
  picks = np.unique(np.linspace(0, n - 1, min(n, size_sample)).astype(int)) if n else []
  hw = []
  for ex in source.__getitems__([int(i) for i in picks]):
    for k in keys:
      with Image.open(io.BytesIO(ex[k])) as img:  # reads the header only
        hw.append((img.height, img.width))
  hw = np.asarray(hw, np.int64).reshape(-1, 2)
  stats.heights, stats.widths, stats.sampled = _triple(hw[:, 0]), _triple(hw[:, 1]), len(hw)
  return stats


def _cell(image: np.ndarray, caption: str, frame: tuple[int, int, int] | None = None
          ) -> Image.Image:
  """One grid cell: the image fitted into CELL x CELL on grey, a caption below."""
  cell = Image.new('RGB', (CELL, CELL + CAPTION), (64, 64, 64))
  img = Image.fromarray(np.asarray(image, np.uint8))
  scale = (CELL - 6) / max(img.width, img.height)  # fit the cell, small images enlarged
  img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                   Image.Resampling.BILINEAR)
  cell.paste(img, ((CELL - img.width) // 2, (CELL - img.height) // 2))
  draw = ImageDraw.Draw(cell)
  if frame is not None:
    draw.rectangle([0, 0, CELL - 1, CELL - 1], outline=frame, width=3)
  draw.text((3, CELL + 1), caption, fill=(255, 255, 255))
  return cell


def _sheet(rows: list[list[Image.Image]], title: str, path: str) -> str:
  cols = max(len(r) for r in rows) if rows else 1
  width = max(cols * CELL, 6 * len(title) + 8)
  sheet = Image.new('RGB', (width, 16 + len(rows) * (CELL + CAPTION)), (32, 32, 32))
  ImageDraw.Draw(sheet).text((3, 2), title, fill=(255, 255, 255))
  for r, row in enumerate(rows):
    for c, cell in enumerate(row):
      sheet.paste(cell, (c * CELL, 16 + r * (CELL + CAPTION)))
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  sheet.save(path)
  return path


def write_grid(builder, dataset: str, split: str, path: str, *, num_ids: int = 4,
               per_id: int = 4, num_pairs: int = 6) -> str:
  """``path``: a PNG of the split's images as TFDS decodes them (see the module doc)."""
  decoded = builder.as_data_source(split)  # TFDS decodes the images: uint8 HxWx3
  n = len(decoded)
  if 'is_same' in builder.info.features:
    same = _columns(_encoded(builder, split), ['is_same'])['is_same'].astype(bool)
    half = max(1, num_pairs // 2)
    chosen = list(np.flatnonzero(same)[:half]) + list(np.flatnonzero(~same)[:half])
    rows = []
    for i in sorted(int(i) for i in chosen):
      ex = decoded[i]
      colour = (0, 200, 0) if ex['is_same'] else (220, 0, 0)
      word = 'same' if ex['is_same'] else 'different'
      rows.append([_cell(ex['image_a'], f'pair {ex["index"]} a', colour),
                   _cell(ex['image_b'], f'b: {word}', colour)])
    title = f'{dataset}/{split}: {len(rows)} of {n} pairs (green same, red different)'
    return _sheet(rows, title, path)
  ids = _columns(_encoded(builder, split), ['id'])['id']
  _, first = np.unique(ids, return_index=True)
  rows = []
  for start in sorted(first)[:num_ids]:
    records = np.flatnonzero(ids == ids[start])[:per_id]
    row = []
    for ex in decoded.__getitems__([int(r) for r in records]):
      cam = f' c{ex["camera"]}' if ex['camera'] >= 0 else ''
      row.append(_cell(ex['image'], f'id {ex["id"]} l{ex["label"]}{cam}'))
    rows.append(row)
  title = f'{dataset}/{split}: {len(rows)} identities x up to {per_id} images (id, label, camera)'
  return _sheet(rows, title, path)


def as_dataframe(path: str, split: str, num: int = 10):
  """``tfds.as_dataframe`` of the first ``num`` examples of a converted split.

  tfds has no tf.data reader for ArrayRecord (``builder.as_dataset`` is not implemented for
  it), so the TFDS data source is wrapped in a ``tf.data.Dataset`` with the
  features' tensor spec; images are decoded by TFDS (shown as thumbnails in a notebook).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  builder = tfds.builder_from_directory(path)
  source = builder.as_data_source(split)
  n = min(num, len(source))
  ds = tf.data.Dataset.from_generator(lambda: (source[i] for i in range(n)),
                                      output_signature=builder.info.features.get_tensor_spec())
  return tfds.as_dataframe(ds, builder.info)


def built_line(info) -> str:
  """How the set was built, from its provenance metadata."""
  record = dict((info.metadata or {}).get('provenance') or {})
  if not record:
    return 'no provenance record (converted by an earlier data_prep: convert it again)'
  check = record.get('count_check') or {}
  if check.get('passed'):
    status = 'counts match the published release' + ('' if check.get('ran') else
                                                     ' (count check skipped)')
  else:
    status = 'PARTIAL: counts differ from the published release (--skip_count_check)'
  skipped = sum(int(c.get('skipped', 0)) for c in (record.get('counts') or {}).values())
  return (f'data_prep {record.get("data_prep_version")} from {record.get("raw_dir")} '
          f'({record.get("built_at")}); {status}; {skipped} corrupt file(s) skipped')


def _open(path: str, name: str, data_dir: str):
  """The tfds builder of the set ``name`` at ``path``; a one-line ``ValueError`` for an
  unreadable dataset_info.json or a folder holding another dataset."""
  again = (f'convert it again: python -m data_prep.build --dataset={name} --raw_dir=RAW '
           f'--out_dir={data_dir} --overwrite')
  try:
    builder = tfds.builder_from_directory(path)
  except Exception as e:  # noqa: BLE001 - tfds raises many types for a damaged JSON file
    text = ' '.join(str(e).split())[:120]
    raise ValueError(f'{name}: {path}/dataset_info.json cannot be read ({type(e).__name__}: '
                     f'{text}); {again}') from None
  if builder.info.name != name:
    raise ValueError(f'{name}: {path} holds the dataset {builder.info.name!r} (its '
                     f'dataset_info.json), not {name!r}; {again}')
  record = dict((builder.info.metadata or {}).get('provenance') or {})
  # A truncated shard can read as examples of None values: the sizes are checked first.
  found = build.shard_differences(path, list(builder.info.splits), record, checksums=False)
  if found and 'records no shard' not in found[0]:
    raise ValueError(f'{name}: the converted set is {found[0].removeprefix("it is ")}; '
                     + again.replace('=RAW', f'={record.get("raw_dir") or "RAW"}'))
  return builder


def damaged_set_error(info, path: str, name: str, split: str, data_dir: str,
                      error: BaseException) -> ValueError:
  """The one-line error for a split whose records do not read: the shard file that differs from
  its size or SHA-256 recorded at build time (else the split's shards), and the command that
  converts the set again."""
  record = dict((info.metadata or {}).get('provenance') or {})
  found = (build.shard_differences(path, [split], record, checksums=False)
           or build.shard_differences(path, [split], record))
  if found and 'records no shard' not in found[0]:
    what = 'the converted set is ' + found[0].removeprefix('it is ')
  else:
    files = ', '.join(os.path.join(path, f) for f in info.splits[split].filenames)
    what = f'a shard file does not read ({files})'
  text = ' '.join(str(error).split())[:80]
  raw = record.get('raw_dir') or 'RAW'
  return ValueError(f'{name}/{split}: {what}; reading it: {type(error).__name__}: {text}; '
                    f'convert it again: python -m data_prep.build --dataset={name} '
                    f'--raw_dir={raw} --out_dir={data_dir} --overwrite')


def converted_sets(data_dir: str) -> list[str]:
  """The catalog datasets converted under ``data_dir`` (catalog order)."""
  return [n for n in catalog.DATASETS
          if os.path.isfile(os.path.join(data_dir, n, '1.0.0', 'dataset_info.json'))]


def inspect(data_dir: str, datasets: Sequence[str] | None = None, out: str | None = None, *,
            size_sample: int = 1000, grids: bool = True, echo=print) -> dict[str, Any]:
  """Prints the statistics of each set and split, writes the grids; returns {set: [SplitStats]}.

  Raises FileNotFoundError naming the folder when a set (or any set at all) is not converted.
  """
  data_dir = os.fspath(data_dir)
  out = os.fspath(out) if out else os.path.join(data_dir, 'inspect')
  names = list(datasets) if datasets else converted_sets(data_dir)
  if not names:
    raise FileNotFoundError(f'no converted dataset under {data_dir} (expected <name>/1.0.0/ '
                            'folders written by python -m data_prep.build)')
  lines, results = [], {}

  def say(text: str) -> None:
    lines.append(text)
    echo(text)

  for name in names:
    catalog.get(name)
    path = os.path.join(data_dir, name, '1.0.0')
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
      raise FileNotFoundError(f'{name}: not converted: {path}/dataset_info.json does not exist')
    builder = _open(path, name, data_dir)
    if not image_keys(builder.info):
      raise ValueError(f'{name}: {path} was converted by an earlier data_prep (images stored as '
                       'raw bytes); convert it again with data_prep.build --overwrite')
    say(f'{name}: {path}')
    say(f'  {built_line(builder.info)}')
    if 'is_same' not in builder.info.features:
      say(header())
    order = [s for s in catalog.get(name).splits if s in builder.info.splits]
    results[name] = []
    for split in order + [s for s in builder.info.splits if s not in order]:
      try:
        stats = split_stats(builder, name, split, size_sample)
        if grids:
          stats.grid = write_grid(builder, name, split,
                                  os.path.join(out, f'{name}_{split}.png'))
      except (RuntimeError, OSError) as e:  # array_record: 'Corrupted Riegeli/records file'
        raise damaged_set_error(builder.info, path, name, split, data_dir, e) from None
      say(stats.format())
      results[name].append(stats)
  if grids:
    say(f'grids: {len([s for v in results.values() for s in v])} PNGs in {out} '
        '(<set>_<split>.png)')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'summary.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return results


def define_flags() -> None:
  flags.DEFINE_string('data_dir', None, 'The data_prep output folder (build --out_dir).')
  flags.DEFINE_string('dataset', None, 'A converted set, comma-separated sets, or all converted '
                      'sets under --data_dir (default).')
  flags.DEFINE_string('out', None, 'Where the PNG grids and summary.txt go (default: '
                      'DATA_DIR/inspect).')
  flags.DEFINE_integer('size_sample', 1000, 'Images per split whose size is read.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.data_dir:
    raise app.UsageError('--data_dir is required')
  names = [n.strip() for n in FLAGS.dataset.split(',') if n.strip()] if FLAGS.dataset else None
  try:
    inspect(FLAGS.data_dir, names, FLAGS.out, size_sample=FLAGS.size_sample)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
