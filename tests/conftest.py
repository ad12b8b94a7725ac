"""Suite-wide setup: the tests run on the CPU.

With libtpu installed (the test install includes the ``tpu`` extra for tests/test_aot.py), JAX
would also try to start a TPU backend in every test process: on a host without TPUs that costs
time, prints libtpu warnings and takes libtpu's lockfile (/tmp/libtpu_lockfile), which the
parallel test workers would contend for. ``JAX_PLATFORMS=cpu`` (unless already set) keeps every
test and its subprocesses on the CPU; ``ufo_jax.aot`` compiles for TPU topologies all the same.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
