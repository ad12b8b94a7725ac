"""Embeds a folder of images with an exported model (see docs/EXPORT.md).

    python -m ufo_jax.embed --model=DIR --images=FOLDER_OR_GLOB --out=FILE.npz
        [--tasks=person,...] [--batch_size=N] [--runtime=jax_export|onnx|orbax]

``--model``: a folder written by ``python -m ufo_jax.export``. ``--images``: a folder (searched
recursively for .jpg/.jpeg/.png/.bmp/.webp/.ppm/.tif/.tiff/.gif files) or a glob pattern
(``'gallery/**/*.jpg'``). Every image is decoded as the evaluation decodes it (RGB) and resized
as the evaluation does (``ufo_jax.data.augment.eval_transform``: bicubic, no resize when it is
already at the model's size), then embedded in batches (``--batch_size``; the last batch is
padded so every batch has one shape).

``--runtime`` (default: ``jax_export`` when the folder has ``embed.jax_export``, else ``orbax``):
``jax_export`` runs ``embed.jax_export`` (jax alone), ``onnx`` runs ``embed.onnx`` with
onnxruntime, ``orbax`` rebuilds the model from ``params/`` (``inference.load_exported``). Before
the first image, the runtime embeds the export's golden images (``golden.npz``) and must match
the embeddings the export computed (``ufo_jax.export.check_golden``), else one ``error:`` line
names the runtime, the task and the largest difference.

The output ``.npz`` holds ``paths`` (the embedded files, in order), one ``(N, D)`` float32
array per task (all tasks of the model unless ``--tasks``), L2-normalised, and what made them:
``model_id`` (the export's fingerprint), ``tasks``, ``image_size`` and ``package_version``.
``ufo_jax.search`` and ``ufo_jax.index`` refuse to compare features of two model_ids. A file
that does not decode is named on the console, skipped and counted; no readable image at all is
an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from ufo_jax import cli, export, inference
from ufo_jax.data import augment

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff', '.gif')
RUNTIMES = export.RUNTIMES
METADATA_KEYS = ('paths', 'model_id', 'tasks', 'image_size', 'package_version')  # not features
DEFAULT_BATCH_SIZE = 64
MAX_NAMED_FAILURES = 10


def _walk(folder: str) -> Iterator[tuple[str, list[str]]]:
  """``(folder, file names)`` of ``folder`` and every folder below it, following symlinked
  folders; a folder reached a second time (a symlink loop, or two links to one folder) is
  not entered again."""
  seen: set[tuple[int, int]] = set()
  for root, dirs, files in os.walk(folder, followlinks=True):
    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen:
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    yield root, files


def list_images(folder_or_glob: str) -> list[str]:
  """The image files of a folder (recursive through symlinked folders, each folder once,
  sorted) or of a glob pattern (sorted)."""
  if os.path.isdir(folder_or_glob):
    paths = [os.path.join(d, f) for d, files in _walk(folder_or_glob) for f in files
             if f.lower().endswith(IMAGE_EXTENSIONS)]
  else:
    paths = [p for p in glob.glob(folder_or_glob, recursive=True) if os.path.isfile(p)]
  return sorted(paths)


def load_image(path: str, image_size: int, *, exif_transpose: bool = True) -> np.ndarray:
  """One file as the evaluation reads it: decode (RGB; 16-bit grey scaled to 8 bits) and
  ``eval_transform`` to (S, S, 3). ``exif_transpose``: first turn a photo upright as its EXIF
  orientation tag says (the evaluation reads its test sets as stored: they carry no such tag)."""
  with open(path, 'rb') as f:
    data = f.read()
  img = augment.decode_image(data, exif_transpose=exif_transpose)
  return np.asarray(augment.eval_transform(img, image_size))


def output_path(out: str) -> str:
  """The exact file written for ``--out``: ``.npz`` appended when missing (as numpy does). A
  folder is refused, and the file must be writable (missing parent folders are created): both
  checked before anything is embedded, as one-line ``ValueError``s."""
  if os.path.isdir(out) or out.endswith(os.sep):
    raise ValueError(f'--out={out} is a folder; give the .npz file to write, e.g. '
                     f'--out={os.path.join(out, "features.npz")}')
  path = out if out.endswith('.npz') else out + '.npz'
  parent = os.path.dirname(os.path.abspath(path))
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'--out={out}: {path} cannot be written ({existing} is a file, not a '
                     'folder); choose a writable path')
  try:
    os.makedirs(parent, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=parent, prefix='.embed-', suffix='.tmp'):
      pass
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise PermissionError(13, 'the file is read-only')
  except OSError as e:
    raise ValueError(f'--out={out}: {path} cannot be written ({e.strerror or e}); choose a '
                     'writable path') from None
  return path


class Embedder:
  """The exported model of ``directory`` behind one call: uint8 images -> {task: (b, D)}."""

  def __init__(self, directory: str, runtime: str | None = None):
    self.directory = directory
    self.info = inference.read_model_json(directory)
    self.image_size = int(self.info['image_size'])
    self.tasks = tuple(self.info['tasks'])
    self.model_id = self.info.get('model_id')
    if runtime is None:
      runtime = 'jax_export' if 'jax_export' in self.info.get('files', {}) else 'orbax'
    self.runtime = runtime
    self._fn = export.open_runtime(directory, runtime, self.info)

  def check(self, batch_size: int | None = None) -> float | None:
    """The golden check of this runtime (``export.check_golden``), in batches of
    ``batch_size`` (the shape the embedding then uses)."""
    return export.check_golden(self.directory, self.runtime, self._fn, batch_size=batch_size,
                               info=self.info)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    out = self._fn(images)
    return {t: np.asarray(out[t], np.float32) for t in self.tasks}


def _progress_bar(done: int, total: int, start: float, width: int = 30) -> None:
  filled = int(width * done / max(total, 1))
  rate = done / max(time.time() - start, 1e-9)
  sys.stderr.write(f'\rembed [{"#" * filled}{"." * (width - filled)}] {done}/{total} images, '
                   f'{rate:.1f} images/s')
  if done >= total:
    sys.stderr.write('\n')
  sys.stderr.flush()


def embed_files(embedder: Embedder, paths: Sequence[str], *, tasks: Sequence[str] | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE,
                progress: Callable[[int, int, float], None] | None = _progress_bar,
                num_threads: int = 4, exif_transpose: bool = True
                ) -> tuple[list[str], dict[str, np.ndarray], list[tuple]]:
  """Embeds ``paths`` in batches: ``(embedded paths, {task: (N, D)}, [(path, error)])``."""
  tasks = embedder.tasks if tasks is None else tuple(tasks)
  unknown = [t for t in tasks if t not in embedder.tasks]
  if unknown:
    raise ValueError(f'--tasks: unknown task(s) {unknown}; the model has {embedder.tasks}')
  if batch_size < 1:
    raise ValueError(f'--batch_size must be positive, got {batch_size}')
  size = embedder.image_size
  done_paths: list[str] = []
  failures: list[tuple[str, str]] = []
  parts: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
  start = time.time()

  def read(path: str) -> np.ndarray | Exception:
    try:
      return load_image(path, size, exif_transpose=exif_transpose)
    except (OSError, ValueError) as e:  # DecodeError is a ValueError
      return e

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for b in range(0, len(paths), batch_size):
      chunk = list(paths[b:b + batch_size])
      images, ok = [], []
      for path, img in zip(chunk, pool.map(read, chunk)):
        if isinstance(img, Exception):
          why = ('not an image PIL can decode' if 'cannot identify image' in str(img)
                 else f'{type(img).__name__}: {img}')
          failures.append((path, why))
          if len(failures) <= MAX_NAMED_FAILURES:
            sys.stderr.write(f'\nembed: skipping unreadable {path} ({why})\n')
          continue
        images.append(img)
        ok.append(path)
      if images:
        n = len(images)
        batch = np.zeros((batch_size, size, size, 3), np.uint8)  # one shape: one compilation
        batch[:n] = np.stack(images)
        out = embedder(batch)
        for t in tasks:
          parts[t].append(out[t][:n])
        done_paths += ok
      if progress is not None:
        progress(min(b + batch_size, len(paths)), len(paths), start)
  if not done_paths:
    raise ValueError(f'no readable image among the {len(paths)} files '
                     f'(first error: {failures[0][0]}: {failures[0][1]})' if failures
                     else 'no image to embed')
  return done_paths, {t: np.concatenate(parts[t]) for t in tasks}, failures


def write_npz(path: str, paths: Sequence[str], features: dict[str, np.ndarray], *,
              model_id: str | None = None, image_size: int | None = None) -> str:
  """``paths``, one array per task and what made them (``model_id``, ``tasks``,
  ``image_size``, ``package_version``) into exactly ``path`` (written beside it, then renamed:
  an interrupted write leaves no partial file); returns ``path``."""
  clash = [t for t in features if t in METADATA_KEYS]
  if clash:
    raise ValueError(f'task name(s) {clash} are .npz metadata names ({", ".join(METADATA_KEYS)})')
  meta = {'tasks': np.asarray(list(features), dtype=str),
          'package_version': np.asarray(export.package_version())}
  if model_id is not None:
    meta['model_id'] = np.asarray(model_id)
  if image_size is not None:
    meta['image_size'] = np.asarray(int(image_size))
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=parent, prefix='.embed-', suffix='.tmp',
                                   delete=False) as f:
    tmp = f.name
    try:
      np.savez(f, paths=np.asarray(list(paths), dtype=str), **meta, **features)
    except BaseException:
      os.unlink(tmp)
      raise
  os.replace(tmp, path)
  return path


@dataclasses.dataclass(frozen=True)
class Features:
  """One task's features of an embed .npz and what made them."""
  path: str
  paths: np.ndarray
  features: np.ndarray
  model_id: str | None


_EMBED_NPZ = ('the .npz that python -m ufo_jax.embed writes (paths and one feature array per '
              'task)')


def _open_npz(path: str, what: str) -> Any:
  """``np.load`` of an .npz, or a one-line ``ValueError`` saying what the file is instead."""
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(6)
    kind = ('a single .npy array' if head == b'\x93NUMPY' else 'not an .npz (zip) archive')
    raise ValueError(f'--{what}={path} is {kind}; give {_EMBED_NPZ}')
  try:
    return np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'--{what}={path}: not an .npz file of python -m ufo_jax.embed ({e})'
                     ) from None


def _array(data: Any, key: str, path: str, what: str) -> np.ndarray:
  """``data[key]``; an array of Python objects (pickled) is refused in one line."""
  try:
    return np.asarray(data[key])
  except ValueError as e:
    if 'allow_pickle' not in str(e):
      raise
    raise ValueError(f'--{what}={path}: its {key!r} array holds Python objects (pickled), '
                     'which are never loaded (unpickling can run code); write the file again '
                     'with python -m ufo_jax.embed') from None


def load_features(path: str, task: str, what: str) -> Features:
  """``task``'s features of an embed .npz (``what``: the flag naming it), or a one-line error."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'--{what}={path} does not exist (write it with python -m '
                            'ufo_jax.embed)')
  data = _open_npz(path, what)
  if 'paths' not in data.files:
    raise ValueError(f'--{what}={path}: no "paths" array (not written by ufo_jax.embed?)')
  if task not in data.files or task in METADATA_KEYS:
    have = [f for f in data.files if f not in METADATA_KEYS]
    raise ValueError(f'--{what}={path} has no {task!r} features (it has: {", ".join(have)}); '
                     'embed with that task or pick another --task')
  paths, features = _array(data, 'paths', path, what), _array(data, task, path, what)
  if features.ndim != 2 or features.shape[0] != len(paths):
    raise ValueError(f'--{what}={path}: {task} features of shape {features.shape} do not match '
                     f'its {len(paths)} paths')
  model_id = str(_array(data, 'model_id', path, what)) if 'model_id' in data.files else None
  return Features(path, paths, features, model_id)


def check_same_model(sources: Sequence[tuple[str, str | None]], *, allow_mixed: bool = False,
                     warn: Callable[[str], Any] | None = None) -> str | None:
  """The one ``model_id`` of ``sources`` (``(file, model_id or None)``), or a ValueError naming
  two files and their ids. ``allow_mixed`` turns the error into a warning; a file without an id
  (embedded before ids existed) is a warning. Returns the id (None when no file has one)."""
  warn = warn or (lambda line: print(line, file=sys.stderr))
  for name, model_id in sources:
    if model_id is None:
      warn(f'warning: {name} has no model_id (embedded by an earlier version): cannot check '
           'that it comes from the same model; embed it again to be sure')
  ids = [(name, model_id) for name, model_id in sources if model_id is not None]
  for name, model_id in ids[1:]:
    if model_id != ids[0][1]:
      line = (f'{ids[0][0]} is of model {ids[0][1]}, {name} of model {model_id}: features of '
              'two models are not comparable (embed both with one model, or pass '
              '--allow_mixed_models)')
      if not allow_mixed:
        raise ValueError(line)
      warn(f'warning: {line.split(": features")[0]}: mixing them (--allow_mixed_models)')
  return ids[0][1] if ids else None


def run(model_dir: str, images: str, out: str, *, tasks: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE, runtime: str | None = None,
        exif_transpose: bool = True, print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
  """The command: embeds the images of ``images`` into ``out`` (``output_path``: the exact
  file, checked writable first); returns a summary."""
  paths = list_images(images)
  if not paths:
    raise FileNotFoundError(f'--images={images}: no image file found (a folder is searched for '
                            f'{", ".join(IMAGE_EXTENSIONS)}; else give a glob pattern)')
  out = output_path(out)
  embedder = Embedder(model_dir, runtime)
  if batch_size < 1:
    raise ValueError(f'--batch_size must be positive, got {batch_size}')
  golden = embedder.check(batch_size)
  t0 = time.time()
  done, features, failures = embed_files(embedder, paths, tasks=tasks, batch_size=batch_size,
                                         exif_transpose=exif_transpose)
  seconds = time.time() - t0
  write_npz(out, done, features, model_id=embedder.model_id, image_size=embedder.image_size)
  summary = {'images': len(done), 'unreadable': len(failures), 'tasks': list(features),
             'runtime': embedder.runtime, 'seconds': seconds, 'out': out,
             'model_id': embedder.model_id, 'golden_max_abs_diff': golden}
  skipped = f', {len(failures)} unreadable file(s) skipped' if failures else ''
  checked = 'golden check passed' if golden is not None else 'no golden check'
  print_fn(f'embed: {len(done)} images{skipped}, tasks {",".join(features)} '
           f'({embedder.runtime}, {checked}, {len(done) / max(seconds, 1e-9):.1f} images/s, '
           f'model {embedder.model_id}) -> {out}')
  return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('model', None, 'The export folder (python -m ufo_jax.export).')
  flags.DEFINE_string('images', None, 'A folder of images (recursive) or a glob pattern.')
  flags.DEFINE_string('out', None, 'The output .npz file (.npz is appended when missing).')
  flags.DEFINE_bool('exif_transpose', True, 'Turn photos upright as their EXIF orientation '
                    'tag says (--noexif_transpose: use the pixels as stored).')
  flags.DEFINE_list('tasks', None, 'Tasks to write (default: all the model has).')
  flags.DEFINE_integer('batch_size', DEFAULT_BATCH_SIZE, 'Images per batch.')
  flags.DEFINE_enum('runtime', None, list(RUNTIMES), 'What runs the model (default: jax_export '
                    'if exported, else orbax).')


def main(argv: Sequence[str]) -> None:
  cli.check_args(argv, 'model', 'images', 'out')
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  with cli.one_line_errors(FileNotFoundError, ValueError, ImportError):
    run(FLAGS.model, FLAGS.images, FLAGS.out, tasks=FLAGS.tasks, batch_size=FLAGS.batch_size,
        runtime=FLAGS.runtime, exif_transpose=FLAGS.exif_transpose)


if __name__ == '__main__':
  define_flags()
  app.run(main)
