"""Exports a checkpoint as one model that embeds images for every task (see docs/EXPORT.md).

    python -m ufo_jax.export --checkpoint=PATH --out_dir=DIR [--config=configs/ufo_l.py]
        [--formats=orbax,jax_export,onnx] [--dtype=float32|bfloat16] [--step=N]
        [--thresholds_from=REPORT]

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

import copy
import datetime
import importlib.metadata
import json
import logging as py_logging
import os
import shutil
import time
from collections.abc import Sequence
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


def export(checkpoint: str, out_dir: str, config: Any = None, *,
           formats: Sequence[str] = FORMATS, dtype: str = 'float32', step: int | None = None,
           thresholds_from: str | None = None, print_fn=print) -> dict[str, Any]:
  """Exports ``checkpoint`` into ``out_dir``; returns the model.json dict."""
  formats = parse_formats(formats)
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  if config is None:
    config = config_lib.load_run_config(checkpoint)
  run_config = config
  config = portable_config(config, print_fn)
  t0 = time.time()
  loaded = inference.load_model(checkpoint, config, step=step, dtype=dtype)
  print_fn(f'export: step {loaded.step} of {checkpoint} ({config.model.backbone} '
           f'{config.model.get("variant", "")}, {loaded.image_size}px, '
           f'tasks {",".join(loaded.tasks)}), {time.time() - t0:.1f}s')
  os.makedirs(out_dir, exist_ok=True)
  info = model_json(loaded, config, dtype=dtype, formats=formats)
  info['thresholds'] = eval_report.export_thresholds(checkpoint, thresholds_from, loaded.tasks,
                                                     print_fn)
  config_lib.save_run_config(run_config, out_dir)
  images = np.random.default_rng(0).integers(
      0, 256, (CHECK_BATCH,) + tuple(info['input']['shape'][1:]), dtype=np.uint8)
  want = inference.embed(loaded, images)  # in-process, at the exported compute dtype

  if 'orbax' in formats:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    params_dir = os.path.abspath(os.path.join(out_dir, inference.PARAMS_DIR))
    if os.path.exists(params_dir):
      shutil.rmtree(params_dir)
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


def main(argv: Sequence[str]) -> None:
  cli.check_args(argv, 'checkpoint', 'out_dir')
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)  # orbax and jax2onnx INFO / WARNING chatter
  with cli.one_line_errors(FileNotFoundError, ValueError, ImportError, config_lib.ConfigError):
    export(FLAGS.checkpoint, FLAGS.out_dir, FLAGS.config, formats=FLAGS.formats,
           dtype=FLAGS.dtype, step=FLAGS.step, thresholds_from=FLAGS.thresholds_from)


if __name__ == '__main__':
  define_flags()
  app.run(main)
