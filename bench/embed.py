"""Benchmark: images/s of the three ways to run an exported model, float32, on this machine.

For each model (ViT-Ti/16 at 64 x 64 and ViT-B/16 at 224 x 224, 12 layers, random weights, the
four task necks), in ONE run:

* ``jit``: ``ufo_jax.inference.embed`` in process (the baseline);
* ``jax_export``: the ``embed.jax_export`` file (``ufo_jax.export.export_jax``), deserialised
  and called as a user with jax alone would (``jax.jit(exported.call)``);
* ``onnx``: ``embed.onnx`` (``ufo_jax.export.export_onnx``, jax2onnx) in onnxruntime (CPU).

Each runtime embeds ``--batches`` batches of random uint8 images after one warm-up batch
(compilation); the batch size is the model's ``:N`` suffix (else ``--batch_size``). Prints one
JSON line per model with images/s, the ratio to ``jit``, the largest difference of the outputs to
``jit`` and the export times.

  python bench/embed.py [--models=Ti/16@64:32,B/16@224:8] [--batch_size=32] [--batches=3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

from ufo_jax import config as config_lib
from ufo_jax import export as export_lib
from ufo_jax import inference


def make_model(variant: str, image_size: int):
  config = config_lib.load_config('ufo_tiny')
  config.model.variant = variant
  config.model.dtype = 'float32'
  config.input.image_size = image_size
  return inference.create_model(config)


def rate(fn, images: np.ndarray, batches: int) -> tuple[float, dict]:
  """images/s of ``fn`` over ``batches`` calls after one warm-up call; and its last output."""
  out = fn(images)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(batches):
    out = fn(images)
    jax.block_until_ready(out)
  return batches * len(images) / (time.perf_counter() - t0), out


def bench_model(spec: str, batch_size: int, batches: int, work_dir: str) -> dict:
  variant, size = spec.split('@')
  model = make_model(variant, int(size))
  images = np.random.default_rng(0).integers(0, 256, (batch_size, int(size), int(size), 3),
                                             dtype=np.uint8)
  result: dict = {'model': f'ViT-{variant}@{size}', 'batch_size': batch_size,
                  'batches': batches, 'dtype': 'float32'}
  ips, ref = rate(lambda x: inference.embed(model, x), images, batches)
  result['jit_images_per_s'] = round(ips, 2)

  t0 = time.perf_counter()
  path = os.path.join(work_dir, 'embed.jax_export')
  export_lib.export_jax(model, path)
  result['jax_export_export_s'] = round(time.perf_counter() - t0, 1)
  result['jax_export_mib'] = round(os.path.getsize(path) / 2**20, 1)
  with open(path, 'rb') as f:
    call = jax.jit(jax.export.deserialize(bytearray(f.read())).call)
  ips, out = rate(call, images, batches)
  result['jax_export_images_per_s'] = round(ips, 2)
  result['jax_export_vs_jit'] = round(ips / result['jit_images_per_s'], 3)
  result['jax_export_max_abs_diff'] = max(float(np.abs(np.asarray(out[t]) - ref[t]).max())
                                          for t in ref)

  t0 = time.perf_counter()
  path = os.path.join(work_dir, 'embed.onnx')
  export_lib.export_onnx(model, path)
  result['onnx_export_s'] = round(time.perf_counter() - t0, 1)
  session = export_lib.onnx_session(path)
  names = [o.name for o in session.get_outputs()]
  ips, out = rate(lambda x: dict(zip(names, session.run(None, {'images': x}))), images, batches)
  result['onnx_images_per_s'] = round(ips, 2)
  result['onnx_vs_jit'] = round(ips / result['jit_images_per_s'], 3)
  result['onnx_max_abs_diff'] = max(float(np.abs(out[t] - ref[t]).max()) for t in ref)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='Ti/16@64:32,B/16@224:8')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=3)
  args = parser.parse_args()
  machine = f'{platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}'
  with tempfile.TemporaryDirectory() as work_dir:
    for spec in args.models.split(','):
      spec, _, batch = spec.strip().partition(':')
      result = bench_model(spec, int(batch or args.batch_size), args.batches, work_dir)
      result['machine'] = machine
      result['backend'] = jax.default_backend()
      print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
