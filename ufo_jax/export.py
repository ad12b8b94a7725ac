"""Exports a checkpoint as one model that embeds images for every task (see docs/EXPORT.md).

    python -m ufo_jax.export --checkpoint=PATH --out_dir=DIR [--config=configs/ufo_l.py]
        [--formats=orbax,jax_export,onnx] [--dtype=float32|bfloat16] [--step=N]
        [--thresholds_from=REPORT]
    python -m ufo_jax.export --ufo_release=allinone_vitlarge.pdmodel --out_dir=DIR [...]

``--ufo_release``: UFO's released model instead of a checkpoint (read without Paddle,
``ufo_jax.models.ufo_release``; ``--ufo_heads`` picks which release head serves each task,
default UFO's evaluation_script.py); its config.json is ``--config`` or configs/ufo_l.py with the
release's backbone and input, and model.json's ``source`` names the file (name, size, sha256).

``--checkpoint``: a workdir, its ``checkpoints/`` folder or one step folder. Without
``--config`` the config saved with the run (``WORKDIR/config.json``) is used. DIR receives:

- ``model.json``: backbone, variant, image size, embedding size, tasks in output order, input
  normalisation, resize method, compute dtype, source checkpoint and step, package version, the
  ``model_id`` (``inference.model_id``: a short hash of the parameters and the preprocessing),
  the operating thresholds per task (``thresholds``: the cosine at FAR 1e-2 / 1e-3 / 1e-4 of
  the source run's latest evaluation report, or of ``--thresholds_from=REPORT``;
  ``evaluation.report.export_thresholds``), and the checks below;
- ``golden.npz``: a few fixed images and their embeddings per task, computed in process; every
  runtime is checked against them (``python -m ufo_jax.export --check=DIR``, and ``embed`` at
  its start);
- ``config.json``: the run's config (``ufo_jax.config.load_run_config(DIR)`` reads it);
- ``params/`` (``orbax``): an orbax checkpoint of the inference parameters only (backbone and
  necks); ``ufo_jax.inference.load_exported(DIR)`` rebuilds the model from it and model.json;
- ``embed.jax_export`` (``jax_export``): ``jax.export`` serialisation of
  ``images uint8[b, S, S, 3] -> {task: float32[b, D]}`` (symbolic batch, platforms cpu, cuda and
  tpu, parameters inside). With jax and numpy only:
  ``jax.export.deserialize(bytearray(open(f, 'rb').read())).call(images)``;
- ``embed.onnx`` (``onnx``): the same function in ONNX (input ``images`` uint8
  ``[batch, S, S, 3]``, outputs ``face``, ``person``, ``product``, ``vehicle``, dynamic batch),
  converted by jax2onnx (the ``onnx`` extra) and checked with onnxruntime.

Every written format is run on the golden images and compared with their in-process
embeddings; the largest absolute difference of each goes to model.json (``checks``).

    python -m ufo_jax.export --check=DIR [--runtimes=jax_export,onnx,orbax]

runs the golden check on every runtime the folder has (``jax_export``: ``embed.jax_export``;
``onnx``: ``embed.onnx`` in onnxruntime; ``orbax``: ``params/`` rebuilt in process). A mismatch
is one line naming the runtime, the task and the largest difference (tolerances
``GOLDEN_TOLERANCES``: 1e-5 for jax_export and orbax, 1e-4 for ONNX), exit status 1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import logging as py_logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import cli, inference
from ufo_jax.evaluation import report as eval_report
from ufo_jax.models import ufo_release

FORMATS = ('orbax', 'jax_export', 'onnx')
DTYPES = ('float32', 'bfloat16')
JAX_EXPORT_FILE = 'embed.jax_export'
ONNX_FILE = 'embed.onnx'
PLATFORMS = ('cpu', 'cuda', 'tpu')
GOLDEN_FILE = 'golden.npz'
GOLDEN_IMAGES = 4
GOLDEN_TOLERANCES = {'jax_export': 1e-5, 'onnx': 1e-4, 'orbax': 1e-5}  # largest |difference|
RUNTIMES = ('jax_export', 'onnx', 'orbax')  # orbax: params/ rebuilt in process
ONNX_INSTALL = ("pip install -e '.[onnx]' && pip install --no-deps jax2onnx==0.17.1 "
                '(what `make install` does)')


def package_version() -> str:
  try:
    return importlib.metadata.version('ufo-jax')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
  """``'orbax,onnx'`` or a sequence -> the formats in ``FORMATS`` order, or a one-line error."""
  items = formats.split(',') if isinstance(formats, str) else list(formats)
  names = [f.strip() for f in items if f.strip()]
  unknown = [f for f in names if f not in FORMATS]
  if unknown or not names:
    raise ValueError(f'--formats: unknown format(s) {unknown}; expected a comma-separated '
                     f'subset of {",".join(FORMATS)}')
  return tuple(f for f in FORMATS if f in names)


def closed_function(loaded: inference.Loaded, tasks: Sequence[str] | None = None):
  """``images uint8 (b, S, S, 3) -> {task: (b, D)}`` with the parameters inside."""
  fn, state = inference.embedding_function(loaded, tasks)
  return lambda images: fn(state, images)


def export_jax(loaded: inference.Loaded, path: str, *,
               platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """Writes the ``jax.export`` serialisation of the embedding function (symbolic batch)."""
  size = loaded.image_size
  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(closed_function(loaded)),
                               platforms=tuple(platforms))(spec)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return exported


def _quiet_jax2onnx() -> None:
  # jax2onnx imports its example plugins too; those needing equinox / dm-pix log a traceback.
  py_logging.getLogger('jax2onnx').setLevel(py_logging.ERROR)
  py_logging.getLogger('onnx_ir').setLevel(py_logging.ERROR)  # 'value type ... not known'


def export_onnx(loaded: inference.Loaded, path: str) -> None:
  """Writes the embedding function as ONNX (input ``images``, one output per task)."""
  _quiet_jax2onnx()
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'--formats=onnx needs jax2onnx ({e}): {ONNX_INSTALL}') from None
  size = loaded.image_size
  spec = jax.ShapeDtypeStruct(('batch', size, size, 3), jnp.uint8)
  tasks = loaded.tasks
  proto = jax2onnx.to_onnx(closed_function(loaded, tasks), [spec], input_names=['images'],
                           output_names=list(tasks), model_name='ufo_jax_embed')
  import onnx  # pylint: disable=g-import-not-at-top

  onnx.save(proto, path)


def onnx_session(path: str):
  """An onnxruntime CPU session of ``path`` (quiet)."""
  try:
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'running embed.onnx needs onnxruntime ({e}): {ONNX_INSTALL}') from None
  options = ort.SessionOptions()
  options.log_severity_level = 3  # errors only (not the unused-initializer warnings)
  return ort.InferenceSession(path, sess_options=options, providers=['CPUExecutionProvider'])


def _max_diffs(got: Mapping[str, Any], want: Mapping[str, np.ndarray]) -> dict[str, float]:
  return {t: float(np.max(np.abs(np.asarray(got[t], np.float32) - want[t]))) for t in want}


# --------------------------------------------------------------------------------------------
# Runtimes and golden checks.
# --------------------------------------------------------------------------------------------
def _damaged(path: str, info: Mapping[str, Any], error: Exception) -> ValueError:
  """The one-line error for an export file that does not load (truncated or damaged)."""
  text = ' '.join(str(error).split())[:160]
  kind = type(error).__name__
  kind = f'{type(error).__module__}.{kind}' if kind == 'error' else kind  # struct.error
  source = (info.get('source') or {}).get('checkpoint') or 'CHECKPOINT'
  return ValueError(
      f'{path} does not load ({kind}: {text}): the file is damaged or '
      f'truncated; export again (python -m ufo_jax.export --checkpoint={source} '
      f'--out_dir={os.path.dirname(path)} --overwrite) or pick another --runtime')


def open_runtime(directory: str, runtime: str, info: Mapping[str, Any] | None = None
                 ) -> Callable[[np.ndarray], dict[str, Any]]:
  """``images uint8 (b, S, S, 3) -> {task: (b, D)}`` of the export folder run by ``runtime``:
  ``jax_export`` (``embed.jax_export``, jax alone), ``onnx`` (``embed.onnx``, onnxruntime) or
  ``orbax`` (``params/`` rebuilt by ``inference.load_exported``, run in process)."""
  info = inference.read_model_json(directory) if info is None else info
  files = info.get('files', {})
  if runtime not in RUNTIMES:
    raise ValueError(f'--runtime must be one of {RUNTIMES}, got {runtime!r}')
  if runtime not in files:
    raise FileNotFoundError(f'{directory} has no {runtime} export (it has: '
                            f'{", ".join(files) or "nothing"}); export with '
                            f'--formats={runtime} or pick another --runtime')
  path = os.path.join(directory, files[runtime])
  if runtime == 'jax_export':
    with open(path, 'rb') as f:
      data = bytearray(f.read())
    try:
      exported = jax.export.deserialize(data)
    except Exception as e:  # noqa: BLE001 - flatbuffers raise struct.error, IndexError, ...
      raise _damaged(path, info, e) from None
    return jax.jit(exported.call)
  if runtime == 'onnx':
    try:
      session = onnx_session(path)
    except ImportError:
      raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, Fail, ...
      raise _damaged(path, info, e) from None
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(None, {'images': images})))
  loaded = inference.load_exported(directory, info=info)
  return lambda images: inference.embed(loaded, images)


def golden_images(image_size: int) -> np.ndarray:
  """``GOLDEN_IMAGES`` fixed uint8 images: two of noise, a colour ramp and a flat gray."""
  rng = np.random.default_rng(20_240_521)
  noise = rng.integers(0, 256, (2, image_size, image_size, 3), dtype=np.uint8)
  ramp = np.linspace(0, 255, image_size)
  ramp = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1)
  gray = np.full((image_size, image_size, 3), 128)
  return np.concatenate([noise, np.stack([ramp, gray]).astype(np.uint8)])


def write_golden(loaded: inference.Loaded, out_dir: str) -> dict[str, np.ndarray]:
  """Writes ``golden.npz``: the golden images and their in-process embedding of every task."""
  images = golden_images(loaded.image_size)
  want = inference.embed(loaded, images)
  np.savez(os.path.join(out_dir, GOLDEN_FILE), images=images, model_id=np.array(loaded.model_id),
           platform=np.array(jax.default_backend()), **want)
  return want


class GoldenMismatch(ValueError):
  """A runtime whose embeddings of the golden images differ from the export's (one line)."""


def check_golden(directory: str, runtime: str, fn: Callable[[np.ndarray], Mapping[str, Any]], *,
                 batch_size: int | None = None, info: Mapping[str, Any] | None = None
                 ) -> float | None:
  """Runs ``fn`` (``runtime``) on ``golden.npz``'s images; returns the largest difference.

  Args:
    directory: the export folder.
    runtime: its name, for the tolerance (``GOLDEN_TOLERANCES``) and the message.
    fn: the runtime's ``images -> {task: (b, D)}``.
    batch_size: feed the images in zero-padded batches of this size (the shape ``embed`` then
      uses: no second compilation); default: all at once.
    info: the folder's model.json (default: read it).

  Returns None (and logs a warning) for a folder without ``golden.npz`` (exported before it
  existed). Raises ``GoldenMismatch`` naming the runtime, the task and the largest difference.
  """
  path = os.path.join(directory, GOLDEN_FILE)
  if not os.path.exists(path):
    absl_logging.warning('%s has no %s (an export of an earlier version): the %s runtime is not '
                         'checked; export again to check it', directory, GOLDEN_FILE, runtime)
    return None
  info = inference.read_model_json(directory) if info is None else info
  with np.load(path, allow_pickle=False) as golden:
    images = golden['images']
    want = {t: golden[t] for t in info['tasks'] if t in golden.files}
    golden_id = str(golden['model_id']) if 'model_id' in golden.files else None
  if golden_id != info.get('model_id'):
    raise GoldenMismatch(f'{path} is of model {golden_id}, {directory}/model.json of '
                         f'{info.get("model_id")}: the folder mixes two exports')
  n = len(images)
  size = batch_size or n
  parts: dict[str, list[np.ndarray]] = {t: [] for t in want}
  for start in range(0, n, size):
    batch = np.zeros((size,) + images.shape[1:], np.uint8)
    chunk = images[start:start + size]
    batch[:len(chunk)] = chunk
    out = fn(batch)
    for t in want:
      parts[t].append(np.asarray(out[t], np.float32)[:len(chunk)])
  diffs = _max_diffs({t: np.concatenate(p) for t, p in parts.items()}, want)
  tolerance = GOLDEN_TOLERANCES[runtime]
  task, worst = max(diffs.items(), key=lambda kv: kv[1])
  if not worst <= tolerance:  # NaN fails too
    raise GoldenMismatch(
        f'golden check failed: runtime {runtime}, task {task}: largest |difference| {worst:.2e} '
        f'> {tolerance:.0e} from the embeddings the export computed ({path}); the folder is '
        'damaged or this runtime computes differently')
  return worst


def check(directory: str, runtimes: Sequence[str] | None = None,
          print_fn: Callable[[str], Any] = print) -> dict[str, float | None]:
  """``--check=DIR``: the golden check of every runtime the folder has (or ``runtimes``)."""
  info = inference.read_model_json(directory)
  names = [r for r in RUNTIMES if r in info.get('files', {})] if runtimes is None else runtimes
  if not os.path.exists(os.path.join(directory, GOLDEN_FILE)):
    raise FileNotFoundError(f'{directory} has no {GOLDEN_FILE} (an export of an earlier '
                            'version); export again to check it')
  results = {}
  for runtime in names:
    t = time.time()
    results[runtime] = check_golden(directory, runtime, open_runtime(directory, runtime, info),
                                    info=info)
    print_fn(f'export --check: {runtime}: golden images match (largest |difference| '
             f'{results[runtime]:.1e} <= {GOLDEN_TOLERANCES[runtime]:.0e}, '
             f'{time.time() - t:.1f}s)')
  print_fn(f'export --check: {directory} (model {info.get("model_id")}) is sound on '
           f'{", ".join(names)}')
  return results


def model_json(loaded: inference.Loaded, config: Any, *, dtype: str,
               formats: Sequence[str]) -> dict[str, Any]:
  """The description of an export folder (see the module docstring)."""
  tasks, size = loaded.tasks, loaded.image_size
  pre = inference.preprocessing(loaded)
  dim = int(loaded.model.feature_dim)
  model_config = inference.inference_config(config, dtype=dtype).model.to_dict()
  files = {'orbax': inference.PARAMS_DIR, 'jax_export': JAX_EXPORT_FILE, 'onnx': ONNX_FILE}
  return {
      'format': inference.EXPORT_FORMAT,
      'format_version': inference.EXPORT_FORMAT_VERSION,
      'model_id': loaded.model_id,
      'backbone': str(config.model.backbone),
      'variant': str(config.model.get('variant', '')),
      'depth': int(config.model.get('depth', 0) or 0) or None,
      'image_size': size,
      'embedding_size': dim,
      'tasks': list(tasks),
      'input': {'name': 'images', 'dtype': 'uint8', 'shape': ['batch', size, size, 3],
                'layout': 'NHWC, RGB'},
      'outputs': {t: {'dtype': 'float32', 'shape': ['batch', dim]}
                  for t in tasks},
      'output_normalization': 'L2 (unit rows): cosine similarity = dot product',
      'normalization': pre['normalization'],
      'resize': dict(pre['resize'],
                     note='no resize when the image is already image_size x image_size'),
      'dtype': dtype,
      'source': {'checkpoint': loaded.source, 'step': loaded.step},
      'package_version': package_version(),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'files': {f: files[f] for f in formats},
      'golden': GOLDEN_FILE,
      'jax_export_platforms': list(PLATFORMS) if 'jax_export' in formats else [],
      'model_config': model_config,
      'config_tasks': list(config_lib.task_names(config)),
      'checks': {},
  }


def portable_config(config: Any, print_fn=print) -> Any:
  """``config`` with ``model.attention_impl='xla'`` where it says 'cudnn' (one line says so).

  cuDNN attention exists on NVIDIA GPUs only, and in bfloat16 / float16 only; the exported
  function runs on cpu, cuda and tpu, in float32 by default. XLA's attention computes the same
  function.
  """
  if config.model.get('attention_impl') != 'cudnn':
    return config
  print_fn("export: model.attention_impl='cudnn' exported as 'xla' (the export runs on "
           f"{', '.join(PLATFORMS)})")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.attention_impl = 'xla'
  return config


# --------------------------------------------------------------------------------------------
# The output folder: never into a run's checkpoints, never over files export did not write, and
# an earlier export replaced only by a complete new one.
# --------------------------------------------------------------------------------------------
# What an export folder holds that export wrote (besides the files its model.json lists).
OWN_FILES = (inference.MODEL_JSON, config_lib.RUN_CONFIG_FILE, inference.PARAMS_DIR,
             JAX_EXPORT_FILE, ONNX_FILE, GOLDEN_FILE)
# Config fields that change what the exported model computes (besides the task names).
INFERENCE_FIELDS = ('model.backbone', 'model.variant', 'model.depth', 'model.scan_layers',
                    'input.image_size', 'input.augment.mean', 'input.augment.std')


def read_export_info(folder: str) -> dict[str, Any] | None:
  """The model.json of the export folder ``folder``, or None when it is not one."""
  try:
    with open(os.path.join(folder, inference.MODEL_JSON), encoding='utf-8') as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and info.get('format') == inference.EXPORT_FORMAT \
      else None


def _inside_checkpoints(path: str) -> str | None:
  """The run's ``checkpoints/`` folder that ``path`` is (or lies inside), or None."""
  folder = os.path.realpath(path)
  while True:
    if os.path.basename(folder) == 'checkpoints' and (
        os.path.exists(os.path.join(os.path.dirname(folder), config_lib.RUN_CONFIG_FILE))
        or (os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder)))):
      return folder
    parent = os.path.dirname(folder)
    if parent == folder:
      return None
    folder = parent


def check_out_dir(out_dir: str, *, overwrite: bool = False) -> None:
  """A one-line ``ValueError`` when ``out_dir`` must not receive an export: a folder inside a
  run's ``checkpoints/``, a file, a non-empty folder that is not an export, or (without
  ``overwrite``) an earlier export."""
  inside = _inside_checkpoints(out_dir)
  if inside:
    raise ValueError(f'--out_dir={out_dir} is inside the checkpoints folder {inside} of a run; '
                     'export to a folder of its own (e.g. beside the workdir)')
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise ValueError(f'--out_dir={out_dir} is a file, not a folder')
  entries = sorted(os.listdir(out_dir))
  if not entries:
    return
  info = read_export_info(out_dir)
  if info is None:
    listed = ', '.join(entries[:3]) + (f' and {len(entries) - 3} more' if len(entries) > 3 else '')
    raise ValueError(f'--out_dir={out_dir} is not empty ({listed}) and holds no export '
                     f'({inference.MODEL_JSON}); export never writes over files it did not make: '
                     'choose an empty or new folder')
  if not overwrite:
    source = info.get('source') or {}
    raise ValueError(f'--out_dir={out_dir} holds an earlier export (step {source.get("step")} of '
                     f'{source.get("checkpoint")}); pass --overwrite to replace it (it is '
                     'replaced only once the new export is complete) or choose another folder')


def check_config_against_run(config: Any, checkpoint: str) -> None:
  """A one-line ``ConfigError`` when ``--config`` differs from the config the run at
  ``checkpoint`` saved in a field that changes what the exported model computes (its
  normalisation, image size, model or tasks). Without a saved config there is nothing to check."""
  saved_path = config_lib.find_run_config(checkpoint)
  if saved_path is None:
    return
  with open(saved_path, encoding='utf-8') as f:
    saved = config_lib.config_from_json(f.read(), what=saved_path)
  old, new = config_lib.flatten(saved), config_lib.flatten(config)
  differences = [(f, old.get(f), new.get(f)) for f in INFERENCE_FIELDS if old.get(f) != new.get(f)]
  if config_lib.task_names(saved) != config_lib.task_names(config):
    differences.append(('tasks', config_lib.task_names(saved), config_lib.task_names(config)))
  if differences:
    field, was, given = differences[0]
    more = f' (and {", ".join(f for f, _, _ in differences[1:])})' if differences[1:] else ''
    raise config_lib.ConfigError(
        f'--config: {field} is {given!r}, but the run was trained with {was!r} ({saved_path})'
        f'{more}; that changes what the exported model computes: drop --config to export with '
        "the run's config")


@contextlib.contextmanager
def _staging(out_dir: str) -> Iterator[str]:
  """A temporary folder beside ``out_dir`` (same filesystem), removed on exit."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  work = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out_dir))}.export-',
                          dir=parent)
  try:
    yield work
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _publish(work: str, out_dir: str) -> None:
  """Moves the finished export in ``work`` into ``out_dir``. Of an earlier export there, the
  files it wrote (``OWN_FILES`` and what its model.json lists) are replaced; any other file
  stays. model.json goes out first and comes in last, and SIGINT/SIGTERM wait, so the folder
  never holds a model.json with another export's files."""
  os.makedirs(out_dir, exist_ok=True)
  new = sorted(os.listdir(work), key=lambda n: n == inference.MODEL_JSON)  # model.json last
  old_info = read_export_info(out_dir)
  old = set(OWN_FILES) | set((old_info or {}).get('files', {}).values()) if old_info else set()
  replaced = sorted((old | set(new)) & set(os.listdir(out_dir)),
                    key=lambda n: n != inference.MODEL_JSON)  # model.json first
  trash = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out_dir))}.replaced-',
                           dir=os.path.dirname(os.path.abspath(out_dir)))
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
  try:
    for name in replaced:
      os.rename(os.path.join(out_dir, name), os.path.join(trash, name))
    for name in new:
      os.rename(os.path.join(work, name), os.path.join(out_dir, name))
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
  shutil.rmtree(trash, ignore_errors=True)


def export(checkpoint: str, out_dir: str, config: Any = None, *,
           formats: Sequence[str] = FORMATS, dtype: str = 'float32', step: int | None = None,
           overwrite: bool = False, thresholds_from: str | None = None,
           print_fn=print) -> dict[str, Any]:
  """Exports ``checkpoint`` into ``out_dir``; returns the model.json dict.

  model.json ``thresholds``: the operating thresholds of ``thresholds_from`` (a report.json),
  else of the run's latest evaluation report (``evaluation.report.export_thresholds``).

  The export is written into a temporary folder beside ``out_dir`` and moved there once it is
  complete and checked (``check_out_dir`` says which folders are refused; ``overwrite``
  replaces an earlier export). A ``config`` is checked against the run's saved config
  (``check_config_against_run``). The paths printed are the final ones.
  """
  formats = parse_formats(formats)
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  check_out_dir(out_dir, overwrite=overwrite)
  if config is not None:
    check_config_against_run(config, checkpoint)
  with _staging(out_dir) as work:
    final = os.path.abspath(out_dir)
    info = _write_export(checkpoint, work, config, formats=formats, dtype=dtype, step=step,
                         thresholds_from=thresholds_from,
                         print_fn=lambda line: print_fn(line.replace(work, final)))
    _publish(work, out_dir)
  return info


def _write_export(checkpoint: str, out_dir: str, config: Any = None, *,
                  formats: Sequence[str] = FORMATS, dtype: str = 'float32',
                  step: int | None = None, thresholds_from: str | None = None,
                  print_fn=print) -> dict[str, Any]:
  """Writes the export of ``checkpoint`` into the (new, empty) folder ``out_dir``."""
  if config is None:
    config = config_lib.load_run_config(checkpoint)
  run_config = config
  config = portable_config(config, print_fn)
  t0 = time.time()
  loaded = inference.load_model(checkpoint, config, step=step, dtype=dtype)
  print_fn(f'export: step {loaded.step} of {checkpoint} ({config.model.backbone} '
           f'{config.model.get("variant", "")}, {loaded.image_size}px, '
           f'tasks {",".join(loaded.tasks)}), {time.time() - t0:.1f}s')
  thresholds = eval_report.export_thresholds(checkpoint, thresholds_from, loaded.tasks,
                                             print_fn)
  return _write(loaded, config, run_config, out_dir, formats=formats, dtype=dtype,
                print_fn=print_fn, t0=t0, thresholds=thresholds)


def export_ufo_release(path: str, out_dir: str, config: Any = None, *, heads: Any = None,
                       formats: Sequence[str] = FORMATS, dtype: str = 'float32',
                       overwrite: bool = False, print_fn=print) -> dict[str, Any]:
  """Exports UFO's released model file ``path`` into ``out_dir``; returns the model.json dict.

  Written into a temporary folder and moved into ``out_dir`` once complete, as ``export``."""
  formats = parse_formats(formats)
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  check_out_dir(out_dir, overwrite=overwrite)
  with _staging(out_dir) as work:
    final = os.path.abspath(out_dir)
    info = _write_ufo_release(path, work, config, heads=heads, formats=formats, dtype=dtype,
                              print_fn=lambda line: print_fn(line.replace(work, final)))
    _publish(work, out_dir)
  return info


def _write_ufo_release(path: str, out_dir: str, config: Any = None, *, heads: Any,
                       formats: Sequence[str], dtype: str, print_fn=print) -> dict[str, Any]:
  """Writes the export of UFO's released model ``path`` into the new folder ``out_dir``."""
  t0 = time.time()
  config, state = inference.ufo_release_config(path, config)
  config = portable_config(config, print_fn)
  mapping = ufo_release.parse_heads(heads)
  loaded = inference.load_ufo_release(path, config, heads=mapping, dtype=dtype, state=state)
  del state
  print_fn(f'export: UFO release {path} (ViT-{config.model.variant}, {loaded.image_size}px, '
           f'heads {", ".join(f"{t}={h}" for t, h in mapping.items() if t in loaded.tasks)}), '
           f'{time.time() - t0:.1f}s')
  source = {'checkpoint': loaded.source, 'step': None,
            'ufo_release': ufo_release.file_info(path),
            'heads': {t: h for t, h in mapping.items() if t in loaded.tasks}}
  return _write(loaded, config, config, out_dir, formats=formats, dtype=dtype,
                print_fn=print_fn, t0=t0, source=source)


def _write(loaded: inference.Loaded, config: Any, run_config: Any, out_dir: str, *,
           formats: Sequence[str], dtype: str, print_fn, t0: float,
           source: dict[str, Any] | None = None,
           thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the export folder of ``loaded`` (see the module docstring)."""
  os.makedirs(out_dir, exist_ok=True)
  loaded = dataclasses.replace(loaded, model_id=inference.model_id(loaded))
  info = model_json(loaded, config, dtype=dtype, formats=formats)
  info['thresholds'] = thresholds or {}
  if source is not None:
    info['source'] = source
  config_lib.save_run_config(run_config, out_dir)
  write_golden(loaded, out_dir)  # in-process, at the exported compute dtype

  if 'orbax' in formats:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    params_dir = os.path.abspath(os.path.join(out_dir, inference.PARAMS_DIR))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(params_dir, nnx.to_pure_dict(nnx.state(loaded.model)))
    info['checks']['orbax_max_abs_diff'] = check_golden(
        out_dir, 'orbax', open_runtime(out_dir, 'orbax', info), info=info)
    print_fn(f'export: {params_dir} (orbax, backbone + necks, max |diff| of the rebuilt model '
             f'{info["checks"]["orbax_max_abs_diff"]:.1e})')
  if 'jax_export' in formats:
    t = time.time()
    path = os.path.join(out_dir, JAX_EXPORT_FILE)
    exported = export_jax(loaded, path)
    info['checks']['jax_export_max_abs_diff'] = check_golden(out_dir, 'jax_export', exported.call,
                                                             info=info)
    print_fn(f'export: {path} ({os.path.getsize(path) / 2**20:.1f} MiB, platforms '
             f'{",".join(PLATFORMS)}, max |diff| vs in-process '
             f'{info["checks"]["jax_export_max_abs_diff"]:.1e}, {time.time() - t:.1f}s)')
  if 'onnx' in formats:
    t = time.time()
    path = os.path.join(out_dir, ONNX_FILE)
    export_onnx(loaded, path)
    info['checks']['onnx_max_abs_diff'] = check_golden(
        out_dir, 'onnx', open_runtime(out_dir, 'onnx', info), info=info)
    print_fn(f'export: {path} ({os.path.getsize(path) / 2**20:.1f} MiB, onnxruntime max |diff| '
             f'vs in-process {info["checks"]["onnx_max_abs_diff"]:.1e}, {time.time() - t:.1f}s)')
  path = os.path.join(out_dir, inference.MODEL_JSON)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=2)
  print_fn(f'export: {path}; done in {time.time() - t0:.1f}s')
  return info


FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('checkpoint', None, 'A workdir, its checkpoints/ folder or one step folder.')
  flags.DEFINE_string('out_dir', None, 'Where the exported model goes.')
  config_flags.DEFINE_config_file('config', None, 'The config the checkpoint was trained with '
                                  '(default: the config.json saved with the run).')
  flags.DEFINE_string('formats', ','.join(FORMATS), f'Comma-separated subset of {FORMATS}.')
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Compute dtype of the exported model.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('thresholds_from', None, 'The evaluation report.json whose operating '
                      "thresholds go into model.json (default: the source run's latest).")
  flags.DEFINE_string('check', None, 'Check this export folder instead: run the golden images '
                      'on its runtimes and compare with golden.npz.')
  flags.DEFINE_list('runtimes', None, f'With --check: the runtimes to check (default: all the '
                    f'folder has; of {",".join(RUNTIMES)}).')
  flags.DEFINE_string('ufo_release', None, "UFO's released model file "
                      '(allinone_vitlarge.pdmodel) to export instead of a checkpoint.')
  flags.DEFINE_string('ufo_heads', 'evaluation_script', 'With --ufo_release: which release head '
                      "serves each task: 'evaluation_script' (UFO's evaluation: face=task1, "
                      "person=task3, vehicle=task3, product=task4), 'training' (person=task2) "
                      "or 'face=task1,person=task2,...'.")
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export in --out_dir (only once the '
                    'new one is complete; other files there are kept).')


def main(argv: Sequence[str]) -> None:
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax and jax2onnx INFO / WARNING chatter
  if FLAGS.check:
    cli.check_args(argv)
    with cli.one_line_errors(FileNotFoundError, ValueError, ImportError):
      check(FLAGS.check, FLAGS.runtimes)
    return
  cli.check_args(argv, 'ufo_release' if FLAGS.ufo_release else 'checkpoint', 'out_dir')
  with cli.one_line_errors(FileNotFoundError, ValueError, ImportError, config_lib.ConfigError):
    try:
      if FLAGS.ufo_release:
        if FLAGS.checkpoint:
          raise ValueError('--ufo_release and --checkpoint: give one of them')
        export_ufo_release(FLAGS.ufo_release, FLAGS.out_dir, FLAGS.config, heads=FLAGS.ufo_heads,
                           formats=FLAGS.formats, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)
        return
      export(FLAGS.checkpoint, FLAGS.out_dir, FLAGS.config, formats=FLAGS.formats,
             dtype=FLAGS.dtype, step=FLAGS.step, overwrite=FLAGS.overwrite,
             thresholds_from=FLAGS.thresholds_from)
    except KeyboardInterrupt:
      cli.fail(f'interrupted; the unfinished export was removed and --out_dir={FLAGS.out_dir} '
               'is as it was', 130)


if __name__ == '__main__':
  define_flags()
  app.run(main)
