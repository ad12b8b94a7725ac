"""Input pipeline throughput: the full train transform to 384x384 from the real record format.

  python bench/input_pipeline.py [--batches=8] [--workers=1,2] [--image_size=384]

Converts a generated fixture once (data_prep.generate + data_prep.build.convert,
JPEGs of realistic sizes: 128x64 person crops, 112x112 faces, 200x200 vehicles,
300x300 products), then measures images/s of

* a plain sequential loop of the same work (``BatchMaker(step)``: read records,
  decode, AutoAugment, bicubic resize, pad + crop, flip, batch) in this process,
  with PIL's bicubic resize (the baseline every ratio refers to), with the numpy
  one (PIL's weights as matrix products, the default) and with OpenCV's (a = -0.75,
  the former default), and the default loop writing into fresh shared memory as
  grain workers do (``BatchMaker.with_shared_memory``);
* ``create_train_dataset`` with grain's ``mp_prefetch`` and 1, 2, ... worker
  processes (default resize), in steady state (after the first batch), per
  worker process;
* per-image costs of each stage (record read, decode, AutoAugment, resize with
  each backend, pad + crop + flip copy) and of the whole transform for each
  source size, and the cost of first writes to a fresh batch buffer;
* what host-side normalisation + random erasing would add per image in numpy
  (the train step does both on the device instead).

Prints one JSON line. The machine's load average before and after is part of it:
on a shared host compare only rates measured in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain.python as grain_python  # noqa: E402

from ufo_jax.data import augment, pipeline, sources  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('work_dir', '', 'Fixture folder (default: a new temp folder).')
flags.DEFINE_integer('batches', 16, 'Batches timed per measurement (after the first).')
flags.DEFINE_list('workers', ['1', '2'], 'grain worker counts to measure.')
flags.DEFINE_integer('image_size', 384, 'Output side.')
flags.DEFINE_integer('ids', 16, 'Identities per generated train set.')
flags.DEFINE_integer('images_per_id', 8, 'Images per identity.')

# dataset -> (task, generated square size, (height, width) of the stored JPEG)
SETS = {'ms1mv3': ('face', 112, (112, 112)), 'market1501': ('person', 128, (128, 64)),
        'veri776': ('vehicle', 200, (200, 200)), 'sop': ('product', 300, (300, 300))}
# resize backends measured: PIL (the baseline), numpy (PIL's weights as matrix products, the
# default) and OpenCV where installed
PIL, NUMPY, CV2 = augment.BACKEND_PIL, augment.BACKEND_NUMPY, augment.BACKEND_CV2
BACKENDS = (PIL, NUMPY, CV2) if augment.cv2 is not None else (PIL, NUMPY)
BATCH = {'face': 32, 'person': 16, 'product': 16, 'vehicle': 16}  # the 2:1:1:1 mix of ufo_l


def make_fixture(root: str) -> str:
  """Raw datasets at realistic sizes, converted to ArrayRecord; returns the data_dir."""
  from data_prep import build, generate  # pylint: disable=g-import-not-at-top
  out = os.path.join(root, 'out')
  for name, (_, size, (h, w)) in SETS.items():
    if os.path.isdir(os.path.join(out, name)):
      continue
    sizes = generate.Sizes(num_ids=FLAGS.ids, images_per_id=FLAGS.images_per_id, image_size=size)
    gen = generate.write_dataset(name, os.path.join(root, 'raw'), sizes=sizes)
    if (h, w) != (size, size):  # person crops are 128 x 64: re-encode the generated JPEGs
      for path in glob.glob(os.path.join(gen.path, '**', '*.jpg'), recursive=True):
        img = Image.open(path).convert('RGB').resize((w, h), Image.Resampling.BICUBIC)
        img.save(path, 'JPEG', quality=90)
    build.convert(name, gen.path, out, skip_count_check=True)
  return out


def make_config(data_dir: str, worker_count: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import ufo_l  # pylint: disable=g-import-not-at-top
  config = ufo_l.get_config()
  config.tasks = ml_collections.ConfigDict({
      task: dict(config.tasks[task].to_dict(), datasets=(name,), batch_size=BATCH[task])
      for name, (task, _, _) in SETS.items()})
  config.input.data_dir = data_dir
  config.input.image_size = FLAGS.image_size
  config.input.worker_count = worker_count
  config.input.worker_buffer_size = 2
  config.input.allow_partial_data = True  # the generated fixture is small
  return config


def children_cpu_s() -> float:
  """CPU seconds (user + system) used so far by this process's live child processes."""
  ticks = 0
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      ticks += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
      continue
  return ticks / os.sysconf('SC_CLK_TCK')


def _cpu_us(fn, items, repeats: int) -> tuple[float, float]:
  """(mean, best) CPU microseconds per item of ``fn(item, repeat)`` over ``repeats`` loops."""
  per_loop = []
  for r in range(repeats):
    t = time.process_time()
    for item in items:
      fn(item, r)
    per_loop.append((time.process_time() - t) / len(items) * 1e6)
  return float(np.mean(per_loop)), float(min(per_loop))


def _dataset_costs(split, backends: tuple[str, ...], repeats: int) -> dict[str, float]:
  """The per-image stage costs of ``per_image_costs`` for one dataset."""
  size = FLAGS.image_size
  out = np.zeros((size, size, 3), np.uint8)
  indices = list(range(min(64, len(split))))
  blobs = [ex['image'] for ex in split.read(indices)]
  imgs = [augment.decode_image(b) for b in blobs]
  rngs = [np.random.default_rng(r) for r in range(repeats)]

  def autoaugment(img, r):  # the p = 0.5 gate, then the policy
    if rngs[r].random() < 0.5:
      augment.auto_augment(img, rngs[r])

  resized = augment.resize(imgs[0], size)

  def crop_flip(_, r):
    dy, dx = (int(d) for d in rngs[r].integers(-10, 11, size=2))
    augment.shift_into(out, resized, dy, dx, flip=bool(rngs[r].random() < 0.5))

  stages = {'read': _cpu_us(lambda _, r: split.read(indices), [None], repeats),
            'decode': _cpu_us(lambda b, r: augment.decode_image(b), blobs, repeats),
            'autoaugment': _cpu_us(autoaugment, imgs, repeats)}
  for backend in backends:
    stages[f'resize_{backend}'] = _cpu_us(lambda im, r, b=backend: augment.resize(im, size, b),
                                          imgs, repeats)
  stages['crop_flip'] = _cpu_us(crop_flip, range(64), repeats)
  for backend in backends:
    params = augment.AugmentParams(image_size=size, resize_backend=backend)
    stages[f'transform_{backend}'] = _cpu_us(
        lambda im, r, p=params: augment.train_transform_into(out, im, rngs[r], p), imgs, repeats)
  row = {'jpeg_bytes': int(np.mean([len(b) for b in blobs])), 'size_hw': list(imgs[0].size[::-1])}
  for stage, (mean, best) in stages.items():
    if stage == 'read':  # one call reads all the records
      mean, best = mean / len(indices), best / len(indices)
    row[f'{stage}_us'] = round(mean)
    row[f'{stage}_best_us'] = round(best)
  return row


def per_image_costs(data_dir: str, repeats: int = 5) -> dict[str, dict[str, float]]:
  """CPU microseconds per image of each stage and of the whole transform, per source size.

  ``*_us``: mean over ``repeats`` loops of 64 images; ``*_best_us``: the fastest loop (the
  least disturbed by other jobs on a shared machine: closest to an idle core). Stages:
  ``read`` (ArrayRecord read + TFDS data-source deserialisation, the image left encoded, as
  ``BatchMaker`` reads a task's batch),
  ``decode``, ``autoaugment`` (including the p = 0.5 gate: the average per image), the
  resize with each backend, ``crop_flip`` (pad + crop + flip of a resized image into the
  batch row); ``transform_<backend>``: ``train_transform_into`` (everything but read and
  decode).
  """
  return {name: _dataset_costs(sources.open_split(data_dir, name, 'train'), BACKENDS, repeats)
          for name in SETS}


def mix_rate(costs: dict[str, dict[str, float]], backend: str, suffix: str) -> float:
  """Images per CPU second of the batch mix (read + decode + transform) from per-image costs."""
  us = sum(BATCH[SETS[name][0]] * (c[f'read{suffix}'] + c[f'decode{suffix}']
                                   + c[f'transform_{backend}{suffix}'])
           for name, c in costs.items())
  return 1e6 * sum(BATCH.values()) / us


def batch_buffer_us(repeats: int = 6) -> dict[str, float]:
  """CPU microseconds per image to allocate a batch buffer and write it once.

  ``fresh_shared_memory``: a new ``SharedMemoryArray`` per batch, as grain workers hand
  batches to the main process (every page is new to the kernel and allocated on first
  write); ``numpy_zeros``: ``np.zeros`` per batch as the sequential loop does (the
  allocator reuses the freed memory).
  """
  s = FLAGS.image_size
  shape = (sum(BATCH.values()), s, s, 3)

  def shm():
    a = grain_python.SharedMemoryArray(shape, np.uint8)
    a[:] = 1
    a.unlink_on_del()
    del a

  def zeros():
    a = np.zeros(shape, np.uint8)
    a[:] = 1
    del a

  out = {}
  for name, fn in (('fresh_shared_memory', shm), ('numpy_zeros', zeros)):
    fn()
    t = time.process_time()
    for _ in range(repeats):
      fn()
    out[name] = round((time.process_time() - t) / repeats / shape[0] * 1e6, 1)
  return out


def host_normalize_erase_us(n: int = 64) -> float:
  """Numpy cost per image of (x - 127.5) / 127.5 and random erasing with per-pixel noise."""
  s = FLAGS.image_size
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, size=(8, s, s, 3), dtype=np.uint8)
  t = time.process_time()
  for i in range(n):
    x = (batch[i % 8].astype(np.float32) - 127.5) / 127.5
    if rng.random() < 0.5:
      for _ in range(10):
        area = s * s * rng.uniform(0.02, 1 / 3)
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if h < s and w < s:
          y0, x0 = rng.integers(0, s - h), rng.integers(0, s - w)
          x[y0:y0 + h, x0:x0 + w] = rng.standard_normal((h, w, 3), dtype=np.float32)
          break
  return (time.process_time() - t) / n * 1e6


def sequential(data_dir: str, backend: str, shared_memory: bool = False) -> tuple[float, float]:
  """(images/s, images per CPU second) of a plain loop building the batches in this process.

  ``shared_memory``: each batch goes to a fresh shared-memory block (and is freed), as in
  a grain worker process.
  """
  ds = pipeline.create_train_dataset(make_config(data_dir, 0), data_dir, process_index=0,
                                     process_count=1)
  maker = ds.make_batch
  maker.params = dataclasses.replace(maker.params, resize_backend=backend)
  if shared_memory:
    maker = maker.with_shared_memory()

  def batch(step):
    b = maker(step)
    if shared_memory:
      b['image'].unlink_on_del()
    return len(b['label'])

  batch(0)
  t, c = time.perf_counter(), time.process_time()
  n = sum(batch(step) for step in range(1, FLAGS.batches + 1))
  return n / (time.perf_counter() - t), n / (time.process_time() - c)


def with_workers(data_dir: str, workers: int) -> dict[str, float]:
  """Steady-state rates with grain worker processes (after every worker's first batch)."""
  ds = pipeline.create_train_dataset(make_config(data_dir, workers), data_dir, process_index=0,
                                     process_count=1)
  it = iter(ds)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  for _ in range(workers):  # let every worker finish its first batch
    next(it)
  t, c, cw = time.perf_counter(), time.process_time(), children_cpu_s()
  n = sum(len(next(it)['label']) for _ in range(FLAGS.batches))
  wall, main_cpu, worker_cpu = (time.perf_counter() - t, time.process_time() - c,
                                children_cpu_s() - cw)
  it.close()
  return {'images_per_s': n / wall, 'first_batch_s': first,
          'images_per_worker_cpu_s': n / max(worker_cpu, 1e-9),
          'main_process_cpu_us_per_image': main_cpu / n * 1e6}


def main(argv):
  del argv
  root = FLAGS.work_dir or tempfile.mkdtemp(prefix='ufo_input_bench_')
  with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress: keep stdout to the JSON
    data_dir = make_fixture(root)
  load_before = os.getloadavg()
  result = {'bench': 'input_pipeline', 'image_size': FLAGS.image_size,
            'batch': sum(BATCH.values()), 'batch_mix': BATCH, 'cpus': os.cpu_count(),
            'default_resize_backend': augment.DEFAULT_RESIZE_BACKEND,
            'opencv': augment.cv2.__version__ if augment.cv2 else None}
  result['per_image'] = per_image_costs(data_dir)
  result['mix_images_per_cpu_s'] = {
      b: {'mean': round(mix_rate(result['per_image'], b, '_us'), 1),
          'best': round(mix_rate(result['per_image'], b, '_best_us'), 1)} for b in BACKENDS}
  result['batch_buffer_us_per_image'] = batch_buffer_us()
  seq = {}
  for backend in BACKENDS:
    rate, cpu_rate = sequential(data_dir, backend)
    seq[backend] = rate
    result[f'sequential_{backend}'] = {'images_per_s': round(rate, 1),
                                       'images_per_cpu_s': round(cpu_rate, 1),
                                       'ratio_to_sequential_pil': round(rate / seq[PIL], 2)}
  default = augment.DEFAULT_RESIZE_BACKEND
  rate, cpu_rate = sequential(data_dir, default, shared_memory=True)
  result[f'sequential_{default}_shared_memory'] = {
      'images_per_s': round(rate, 1), 'images_per_cpu_s': round(cpu_rate, 1),
      'ratio_to_sequential_pil': round(rate / seq[PIL], 2)}
  rates = {}
  for w in (int(x) for x in FLAGS.workers):
    r = with_workers(data_dir, w)
    rates[w] = r['images_per_s']
    result[f'workers_{w}'] = {
        'images_per_s': round(r['images_per_s'], 1),
        'images_per_s_per_worker': round(r['images_per_s'] / w, 1),
        'images_per_worker_cpu_s': round(r['images_per_worker_cpu_s'], 1),
        'ratio_to_sequential_pil': round(r['images_per_s'] / seq[PIL], 2),
        f'ratio_to_sequential_{default}': round(r['images_per_s'] / seq[default], 2),
        'main_process_cpu_us_per_image': round(r['main_process_cpu_us_per_image'], 1),
        'first_batch_s': round(r['first_batch_s'], 2)}
  ws = sorted(rates)
  if len(ws) > 1:
    result[f'scaling_{ws[0]}_to_{ws[-1]}_workers'] = round(rates[ws[-1]] / rates[ws[0]], 2)
  result['host_normalize_erase_us_per_image'] = round(host_normalize_erase_us(), 1)
  result['loadavg_before_after'] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
