"""Session-scoped fixtures shared by test files (built once per pytest process), and the CPU.

``converted_data``: tiny raw datasets written by ``data_prep.generate`` and converted by
``data_prep.build.convert`` (the public entry points, so the fixture follows any change of the
on-disk format): every training set of ``ufo_l`` plus the LFW and SOP test sets.

The tests run on the CPU: with libtpu installed (the test install includes the ``tpu`` extra for
tests/test_aot.py), JAX would also try to start a TPU backend in every test process: on a host
without TPUs that costs time, prints libtpu warnings and takes libtpu's lockfile
(/tmp/libtpu_lockfile), which the parallel test workers would contend for. ``JAX_PLATFORMS=cpu``
(unless already set) keeps every test and its subprocesses on the CPU; ``ufo_jax.aot`` compiles
for TPU topologies all the same.
"""

import os
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # data_prep lives beside ufo_jax in the checkout
  sys.path.insert(0, ROOT)

TRAIN_SETS = ('ms1mv3', 'market1501', 'dukemtmc', 'msmt17', 'veri776', 'vehicleid', 'veriwild',
              'sop')


@pytest.fixture(scope='session')
def converted_data(tmp_path_factory):
  """``(data_dir, truth)``: the converted folder and ``{name: data_prep.generate.Generated}``."""
  from data_prep import build, generate  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('converted_data')
  raw, out = root / 'raw', root / 'out'
  sizes = generate.Sizes(num_ids=6, images_per_id=4, image_size=24, num_pairs=10)
  truth = {}
  for name in TRAIN_SETS + ('lfw',):
    truth[name] = generate.write_dataset(name, raw, sizes=sizes)
    build.convert(name, truth[name].path, out, skip_count_check=True)
  return str(out), truth
