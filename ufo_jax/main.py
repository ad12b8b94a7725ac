"""The ufo-jax entry point: ``python -m ufo_jax.main --config=configs/ufo_l.py --workdir=DIR``.

Modes (``--mode``):

- ``train`` (default): trains in ``--workdir``; started again on the same workdir it resumes from
  the latest checkpoint there. ``--checkpoint=PATH`` starts a new workdir from another run's
  checkpoint (a workdir, its ``checkpoints/`` folder or one step folder).
- ``eval``: evaluates the checkpoint ``--checkpoint`` (default: the workdir's latest) with
  ``ufo_jax.evaluation.run.evaluate_checkpoint``; the report goes to ``--workdir``.
  ``--exported=DIR`` evaluates an export folder (``python -m ufo_jax.export``) instead.
- ``dry_run``: lowers and compiles the configured train step for the current devices without
  allocating the state; prints parameter count, FLOPs per step, per-device memory and the
  sharding of every array (simulate devices on a CPU with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
- ``aot``: compiles the train step and the evaluation embedding step for a TPU pod topology on
  any host (``--topology=v5p-128`` or ``v5p:4x4x4``; default: the pod of a preset config such as
  ``configs/ufo_l.py:v5p-128``) and reports per-chip memory against HBM, collectives and the
  rematerialisation overhead (``ufo_jax.aot``; needs libtpu: ``pip install -e '.[tpu]'``).

Config values are overridden on the command line: ``--config.train.steps=1000``. Multi-host:
``--distributed`` calls ``jax.distributed.initialize()`` first, which detects TPU pods, SLURM and
Open MPI by itself; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or set ``JAX_COORDINATOR_ADDRESS``). A config error prints one line naming
the field and exits with status 2.
"""

from __future__ import annotations

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ufo_jax import config as config_lib
from ufo_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. '
                                          'configs/ufo_l.py; override fields with '
                                          '--config.a.b=value.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and TensorBoard events go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'dry_run', 'aot'], 'What to do.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'aot: the TPU pod to compile for, a cloud name (v5p-128, v5e-256, '
    'v6e-256) or a topology (v5p:4x4x4); default: the preset of the config.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'train: initialise a new workdir from this checkpoint; eval: the '
    'checkpoint to evaluate (default: the latest in --workdir).')
_EXPORTED = flags.DEFINE_string(
    'exported', None, 'eval: evaluate this export folder (python -m ufo_jax.export) instead of '
    'a checkpoint.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host training).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 (with --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (with --distributed).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Index of this process (with --distributed).')

EXIT_CONFIG_ERROR = 2
_QUIET_LIBRARIES = ('/orbax/', '/grain/')


class _LibraryInfoFilter(py_logging.Filter):
  """Drops the INFO chatter of orbax and grain from the console (warnings still show)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno > py_logging.INFO or logging.get_verbosity() > logging.INFO:
      return True
    return not any(lib in record.pathname for lib in _QUIET_LIBRARIES)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_CONFIG_ERROR)


def _evaluate(config, workdir: str | None, checkpoint: str | None,
              exported: str | None = None) -> None:
  """--mode=eval: ufo_jax.evaluation.run.evaluate_checkpoint on the checkpoint."""
  if not train.evaluation_available():
    _fail('evaluation not available: the module ufo_jax.evaluation.run is not installed')
  if not workdir:
    _fail('--mode=eval needs --workdir (the report goes there; checkpoints are read from it '
          'unless --checkpoint names another)')
  from ufo_jax.evaluation import run as evaluation_run

  evaluation_run.evaluate_checkpoint(config, workdir, checkpoint=checkpoint, exported=exported)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for unknown or ill-typed config overrides."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'Traceback' in message:  # get_config(ARG) of the config file raised: its last line
      message = f'{message.splitlines()[0]} {message.strip().splitlines()[-1]}'
    _fail(f'{message}\nPass --helpfull to see the flags.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(f'bad --config override: {e} (a --config.a.b=value override must name an existing '
          'config field with a value of its type)')
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  config = _CONFIG.value
  if config is None:
    _fail('--config is required (e.g. --config=configs/ufo_tiny.py)')
  try:
    if _MODE.value == 'train':
      if not _WORKDIR.value:
        _fail('--mode=train needs --workdir')
      train.train_and_evaluate(config, _WORKDIR.value, checkpoint_path=_CHECKPOINT.value)
    elif _MODE.value == 'dry_run':
      train.dry_run(config)
    elif _MODE.value == 'aot':
      from ufo_jax import aot

      aot.main(config, _TOPOLOGY.value, _WORKDIR.value)
    else:
      _evaluate(config, _WORKDIR.value, _CHECKPOINT.value, _EXPORTED.value)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except FileNotFoundError as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
