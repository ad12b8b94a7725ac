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
  normalisation, resize method, compute dtype, source checkpoint and step, package version,
  the operating thresholds per task (``thresholds``: the cosine at FAR 1e-2 / 1e-3 / 1e-4 of
  the source run's latest evaluation report, or of ``--thresholds_from=REPORT``;
  ``evaluation.report.export_thresholds``), and the checks below;
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

Every written format is run on a few random images and compared with ``inference.embed`` of
the checkpoint; the largest absolute difference of each goes to model.json (``checks``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib.metadata
import json
import logging as py_logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import cli, inference
from ufo_jax.data import augment
from ufo_jax.evaluation import report as eval_report
from ufo_jax.models import ufo_release

FORMATS = ('orbax', 'jax_export', 'onnx')
DTYPES = ('float32', 'bfloat16')
JAX_EXPORT_FILE = 'embed.jax_export'
ONNX_FILE = 'embed.onnx'
PLATFORMS = ('cpu', 'cuda', 'tpu')
CHECK_BATCH = 3
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


def _max_diff(got: dict[str, Any], want: dict[str, np.ndarray]) -> float:
  return max(float(np.max(np.abs(np.asarray(got[t], np.float32) - want[t]))) for t in want)


def model_json(loaded: inference.Loaded, config: Any, *, dtype: str,
               formats: Sequence[str]) -> dict[str, Any]:
  """The description of an export folder (see the module docstring)."""
  tasks, size, (mean, std) = loaded.tasks, loaded.image_size, loaded.normalization
  dim = int(loaded.model.feature_dim)
  model_config = inference.inference_config(config, dtype=dtype).model.to_dict()
  files = {'orbax': inference.PARAMS_DIR, 'jax_export': JAX_EXPORT_FILE, 'onnx': ONNX_FILE}
  return {
      'format': inference.EXPORT_FORMAT,
      'format_version': inference.EXPORT_FORMAT_VERSION,
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
      'normalization': {'mean': mean, 'std': std, 'formula': '(pixel - mean) / std'},
      'resize': {'method': 'bicubic', 'function': 'ufo_jax.data.augment.eval_transform',
                 'backend': augment.DEFAULT_RESIZE_BACKEND,
                 'note': 'no resize when the image is already image_size x image_size'},
      'dtype': dtype,
      'source': {'checkpoint': loaded.source, 'step': loaded.step},
      'package_version': package_version(),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'files': {f: files[f] for f in formats},
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
             JAX_EXPORT_FILE, ONNX_FILE)
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
  info = model_json(loaded, config, dtype=dtype, formats=formats)
  info['thresholds'] = thresholds or {}
  if source is not None:
    info['source'] = source
  config_lib.save_run_config(run_config, out_dir)
  images = np.random.default_rng(0).integers(
      0, 256, (CHECK_BATCH,) + tuple(info['input']['shape'][1:]), dtype=np.uint8)
  want = inference.embed(loaded, images)  # in-process, at the exported compute dtype

  if 'orbax' in formats:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    params_dir = os.path.abspath(os.path.join(out_dir, inference.PARAMS_DIR))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(params_dir, nnx.to_pure_dict(nnx.state(loaded.model)))
    print_fn(f'export: {params_dir} (orbax, backbone + necks)')
  if 'jax_export' in formats:
    t = time.time()
    path = os.path.join(out_dir, JAX_EXPORT_FILE)
    exported = export_jax(loaded, path)
    info['checks']['jax_export_max_abs_diff'] = _max_diff(exported.call(images), want)
    print_fn(f'export: {path} ({os.path.getsize(path) / 2**20:.1f} MiB, platforms '
             f'{",".join(PLATFORMS)}, max |diff| vs in-process '
             f'{info["checks"]["jax_export_max_abs_diff"]:.1e}, {time.time() - t:.1f}s)')
  if 'onnx' in formats:
    t = time.time()
    path = os.path.join(out_dir, ONNX_FILE)
    export_onnx(loaded, path)
    session = onnx_session(path)
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {'images': images})))
    info['checks']['onnx_max_abs_diff'] = _max_diff(outs, want)
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
  flags.DEFINE_string('ufo_release', None, "UFO's released model file "
                      '(allinone_vitlarge.pdmodel) to export instead of a checkpoint.')
  flags.DEFINE_string('ufo_heads', 'evaluation_script', 'With --ufo_release: which release head '
                      "serves each task: 'evaluation_script' (UFO's evaluation: face=task1, "
                      "person=task3, vehicle=task3, product=task4), 'training' (person=task2) "
                      "or 'face=task1,person=task2,...'.")
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export in --out_dir (only once the '
                    'new one is complete; other files there are kept).')


def main(argv: Sequence[str]) -> None:
  cli.check_args(argv, 'ufo_release' if FLAGS.ufo_release else 'checkpoint', 'out_dir')
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)  # orbax and jax2onnx INFO / WARNING chatter
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
