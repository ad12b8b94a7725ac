"""Benchmark of the multi-task train step: images/s, step time, compile time and MFU.

    python bench/train_step.py --variant=Ti/16 --image_size=64 --batch_size=32 --steps=10
    python bench/train_step.py --variant=L/16 --image_size=384 --batch_size=48 \
        --dtype=bfloat16 --remat_policy=nothing_saveable --steps=20          # one H100

Runs the real train step of ``ufo_jax.step`` (one jit: on-device normalisation and random
erasing, ViT forward/backward, four task heads with CosFace (+ triplet), SGD) on a synthetic
batch made here, over all local devices (batch split over a ``data`` x ``fsdp`` mesh). The
batch mixes the four tasks like the recipe (face 2/5, person, product and vehicle 1/5 each);
every head has ``--num_classes`` classes. After ``--warmup`` steps, ``--steps`` steps are
timed. Prints ONE JSON line: ``images_per_sec``, ``step_time_s``, ``compile_time_s``, ``mfu``
(analytic model FLOPs, 3 x forward, over the dense bf16 peak of the device; null where the peak
is unknown, e.g. on CPU), and details.

Needs only jax, flax, optax and numpy (no ml_collections, grain or clu).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ufo_jax import hardware, hlo, sharding  # noqa: E402
from ufo_jax import step as step_lib  # noqa: E402

TASKS = ('face', 'person', 'product', 'vehicle')


class AttrDict(dict):
  """A dict with attribute access: the subset of ml_collections.ConfigDict the step reads."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def make_config(args: argparse.Namespace) -> AttrDict:
  """The recipe's config (configs/ufo_l.py) with the benchmark's model, batch and classes."""
  other = args.batch_size // 5
  sizes = {'face': args.batch_size - 3 * other, 'person': other, 'product': other,
           'vehicle': other}
  scales = {'face': (50.0, 0.3), 'person': (30.0, 0.2), 'product': (30.0, 0.2),
            'vehicle': (20.0, 0.2)}
  tasks = AttrDict({t: AttrDict(
      batch_size=sizes[t], num_classes=args.num_classes, cosface_scale=scales[t][0],
      cosface_margin=scales[t][1], triplet=t != 'face', triplet_margin=0.0, loss_weight=1.0,
      lr_scale=1.0) for t in TASKS})
  return AttrDict(
      seed=0, tasks=tasks,
      input=AttrDict(image_size=args.image_size, augment=AttrDict(
          mean=127.5, std=127.5, erasing_prob=0.5, erasing_area=(0.02, 1 / 3),
          erasing_aspect=(0.3, 3.3))),
      model=AttrDict(backbone='vit', variant=args.variant, drop_path_rate=0.2,
                     dtype=args.dtype, scan_layers=args.scan_layers,
                     remat_policy=args.remat_policy, attention_impl=args.attention_impl,
                     pretrained=''),
      optim=AttrDict(name='sgd', lr=0.2, momentum=0.0, weight_decay=1e-4, grad_clip=5.0,
                     clip_mode='per_param', warmup_fraction=0.1, final_lr_fraction=0.02),
      train=AttrDict(steps=100_000),
      mesh=AttrDict(data=-1, fsdp=args.fsdp))


def make_batch(config: AttrDict, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random global batch of the configured shapes (uint8 images, per-task layout)."""
  rng = np.random.default_rng(seed)
  size = config.input.image_size
  task = np.concatenate([np.full((config.tasks[t].batch_size,), i, np.int32)
                         for i, t in enumerate(TASKS)])
  return {'image': rng.integers(0, 256, (task.shape[0], size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, task.shape[0], dtype=np.int32),
          'task': task}


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds, compiles and times the step; returns the JSON record."""
  config = make_config(args)
  mesh = sharding.create_mesh(config.mesh)
  setup = step_lib.build(config, {t: args.num_classes for t in TASKS}, mesh)
  state = setup.init()
  batch = sharding.make_global_batch(make_batch(config, args.num_classes), mesh)

  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps

  devices = jax.devices()
  model_flops = setup.model_flops_per_example * args.batch_size
  peak = hardware.peak_flops_per_device(devices[0])
  xla_flops = hlo.compiled_cost(compiled).get('flops')
  memory = devices[0].memory_stats() if devices[0].platform != 'cpu' else None
  return {
      'variant': args.variant, 'image_size': args.image_size, 'batch_size': args.batch_size,
      'num_classes': args.num_classes, 'dtype': args.dtype, 'remat_policy': args.remat_policy,
      'attention_impl': args.attention_impl, 'scan_layers': args.scan_layers,
      'devices': len(devices), 'device_kind': devices[0].device_kind,
      'images_per_sec': args.batch_size / step_s, 'step_time_s': step_s,
      'compile_time_s': compile_s,
      'mfu': model_flops / step_s / (peak * len(devices)) if peak else None,
      'model_tflops_per_step': model_flops / 1e12,
      'xla_tflops_per_step': xla_flops * len(devices) / 1e12 if xla_flops else None,
      'peak_memory_gib': (memory or {}).get('peak_bytes_in_use', 0) / 2 ** 30 or None,
      'loss': float(metrics['total']),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='Ti/16', help='ViT variant: Ti/16 S/16 B/16 L/16 H/14')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=32, help='global batch (all tasks)')
  parser.add_argument('--num_classes', type=int, default=1000, help='classes of every head')
  parser.add_argument('--steps', type=int, default=10, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat_policy', default='none',
                      choices=('none', 'nothing_saveable', 'dots_saveable',
                               'dots_with_no_batch_dims_saveable', 'everything_saveable'))
  parser.add_argument('--attention_impl', default='xla', choices=('xla', 'cudnn'))
  parser.add_argument('--scan_layers', type=int, default=1, help='1: nnx.scan over blocks')
  parser.add_argument('--fsdp', type=int, default=1, help='size of the fsdp mesh axis')
  args = parser.parse_args(argv)
  if args.batch_size < 5 or args.steps < 1:
    parser.error('--batch_size must be >= 5 (four tasks) and --steps >= 1')
  args.scan_layers = bool(args.scan_layers)
  print(json.dumps(run(args)))


if __name__ == '__main__':
  main()
