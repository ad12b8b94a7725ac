"""What the checkpoint checksums cost: the recipe's train state (ViT-L/16, the four heads at the
full class counts, 459 M parameters) checksummed as every save and restore does, beside the
save itself.

    python bench/checkpoint_checksum.py [--config=configs/ufo_l.py] [--repeats=3] [--out=DIR]

Prints one JSON record: the state's size, ``checkpoint.checksums`` time (compile excluded:
the first call; then the median of ``--repeats``), and the time of a synchronous orbax save of
the same state to ``--out`` (a temporary folder by default) with and without the checksums.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ufo_jax import checkpoint, sharding  # noqa: E402
from ufo_jax import config as config_lib  # noqa: E402
from ufo_jax import step as step_lib  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='ufo_l')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  config = config_lib.load_config(args.config)
  config.input.source = 'synthetic'  # class counts from the catalog (the full datasets)
  mesh = sharding.create_mesh(config.mesh)
  classes = {t: config_lib.num_classes(config, t) for t in config_lib.task_names(config)}
  setup = step_lib.build(config, classes, mesh)
  rng = np.random.default_rng(0)

  def fill(s):  # random values of the state's shapes (the cost does not depend on them)
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    if np.issubdtype(s.dtype, np.floating):
      return jax.device_put(rng.standard_normal(s.shape, np.float32).astype(s.dtype), s.sharding)
    return jax.device_put(np.zeros(s.shape, s.dtype), s.sharding)

  state = jax.tree.map(fill, setup.abstract_state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, 'nbytes'))
  t0 = time.perf_counter()
  checkpoint.checksums(state)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    checkpoint.checksums(state)
    times.append(time.perf_counter() - t0)

  out = args.out or tempfile.mkdtemp(prefix='ufo_checksum_bench_')
  manager = checkpoint.create_manager(out, keep_checkpoints=0, async_checkpointing=False)
  t0 = time.perf_counter()
  checkpoint.save(manager, 1, state)  # with checksums, as training saves
  save_s = time.perf_counter() - t0
  manager.close()
  device = jax.devices()[0]
  print(json.dumps({
      'config': args.config, 'arrays': len(jax.tree.leaves(state)),
      'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(state['params']))),
      'state_gib': nbytes / 2 ** 30, 'devices': jax.device_count(),
      'device_kind': device.device_kind, 'cpu_count': os.cpu_count(),
      'load_average': os.getloadavg()[0],
      'checksum_first_call_s': first_s, 'checksum_s': statistics.median(times),
      'checksum_gib_per_s': nbytes / 2 ** 30 / statistics.median(times),
      'save_with_checksums_s': save_s,
      'checksum_share_of_save': statistics.median(times) / save_s, 'out': out}, indent=2))


if __name__ == '__main__':
  main()
