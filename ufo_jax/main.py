"""The ufo-jax entry point: ``python -m ufo_jax.main --config=configs/ufo_l.py --workdir=DIR``.

Modes (``--mode``):

- ``train`` (default): trains in ``--workdir``; started again on the same workdir it resumes from
  the latest checkpoint there, with the config saved in ``WORKDIR/config.json`` at the first
  start plus the ``--config.*`` overrides given explicitly (``--config`` itself is then
  optional; overrides that would change the train state are refused). ``--checkpoint=PATH``
  starts a new workdir from another run's checkpoint (a workdir, its ``checkpoints/`` folder or
  one step folder). SIGTERM / SIGINT: finish the step, save, exit 0. ``--profile_steps=N``:
  a profiler trace of N steps after the first logging interval, in ``WORKDIR/profile``.
- ``eval``: evaluates the checkpoint ``--checkpoint`` (default: the workdir's latest) with
  ``ufo_jax.evaluation.run.evaluate_checkpoint``, with the run's saved config (found beside
  the checkpoint) plus the explicit overrides; the report goes to ``--workdir``.
  ``--exported=DIR`` evaluates an export folder (``python -m ufo_jax.export``) instead.
- ``dry_run``: the compile report of ``aot`` for the current devices (``ufo_jax.aot.run``):
  compiles the train step training runs without allocating the state; prints parameter count,
  per-device memory, collectives, FLOPs per step and the sharding of every array (simulate
  devices on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
- ``aot``: compiles the train step and the evaluation embedding step for a TPU pod topology on
  any host (``--topology=v5p-128`` or ``v5p:4x4x4``; default: the pod of a preset config such as
  ``configs/ufo_l.py:v5p-128``) and reports per-chip memory against HBM, collectives and the
  rematerialisation overhead (``ufo_jax.aot``; needs libtpu: ``pip install -e '.[tpu]'``).

Config values are overridden on the command line: ``--config.train.steps=1000``. Multi-host:
``--distributed`` calls ``jax.distributed.initialize()`` first, which detects TPU pods, SLURM and
Open MPI by itself; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or set ``JAX_COORDINATOR_ADDRESS``). A config error (or a resume that would
change the state, a checkpoint that does not fit or is damaged, an unwritable workdir, a workdir
another run holds) prints one ``error: ...`` line naming the field and exits with status 2;
training stopped by non-finite losses or a failed save prints one line and exits with status 1.
"""

from __future__ import annotations

import logging as py_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ufo_jax import aot
from ufo_jax import checkpoint as ckpt_lib
from ufo_jax import cli
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
_PROFILE_STEPS = flags.DEFINE_integer(
    'profile_steps', 0, 'train: capture a profiler trace of this many steps after the first '
    'logging interval, into WORKDIR/profile (TensorBoard profile plugin, Perfetto).')

EXIT_CONFIG_ERROR = 2
EXIT_TRAINING_FAILED = 1
_QUIET_LIBRARIES = ('/orbax/', '/grain/')


class _LibraryInfoFilter(py_logging.Filter):
  """Drops the INFO chatter of orbax and grain from the console (warnings still show)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno > py_logging.INFO or logging.get_verbosity() > logging.INFO:
      return True
    return not any(lib in record.pathname for lib in _QUIET_LIBRARIES)


def _fail(message: str) -> None:
  """A config error: one ``error:`` line, exit status 2."""
  cli.fail(message, EXIT_CONFIG_ERROR)


def resolve_config(mode: str, workdir: str | None, checkpoint: str | None):
  """The config to run: the run's saved ``config.json`` with the explicit ``--config.*``
  overrides on top when there is one (train: ``WORKDIR/config.json``; eval: the one of
  ``--checkpoint`` or ``--workdir``), else ``--config`` (train with ``--checkpoint`` and no
  ``--config``: the other run's saved config)."""
  given = _CONFIG.value
  overrides = dict(config_flags.get_override_values(flags.FLAGS['config'])) if given else {}
  saved_path = None
  if mode == 'train' and workdir:
    path = os.path.join(workdir, config_lib.RUN_CONFIG_FILE)
    saved_path = path if os.path.exists(path) else None
    if saved_path is None and given is None and checkpoint:
      saved_path = config_lib.find_run_config(checkpoint)
  elif mode == 'eval' and (checkpoint or workdir):
    saved_path = config_lib.find_run_config(checkpoint or workdir)
  if saved_path is None:
    if given is None:
      where = {'train': ' (no config.json in --workdir to resume from)',
               'eval': ' (no config.json found with the checkpoint)'}.get(mode, '')
      _fail(f'--config is required{where}, e.g. --config=configs/ufo_tiny.py')
    return config_lib.normalize(given)
  with open(saved_path) as f:
    saved = config_lib.config_from_json(f.read(), what=saved_path)
  added = config_lib.fill_missing(saved, given) if given is not None else []
  config = config_lib.normalize(config_lib.apply_overrides(saved, overrides))
  logging.info('config: %s%s%s', saved_path,
               f' with the overrides {sorted(overrides)}' if overrides else '',
               f'; fields new since it was saved: {added}' if added else '')
  if given is not None:
    locked, harmless = config_lib.run_config_changes(config, config_lib.normalize(given))
    ignored = [f for f, _, _ in locked + harmless if f not in overrides]
    if ignored:
      logging.info('%d fields of --config differ from %s and are ignored (only explicit '
                   '--config.* overrides apply): %s', len(ignored), saved_path,
                   ', '.join(ignored[:8]) + (' ...' if len(ignored) > 8 else ''))
  return config


def _evaluate(config, workdir: str | None, checkpoint: str | None,
              exported: str | None = None) -> None:
  """--mode=eval: ufo_jax.evaluation.run.evaluate_checkpoint on the checkpoint."""
  if not workdir:
    _fail('--mode=eval needs --workdir (the report goes there; checkpoints are read from it '
          'unless --checkpoint names another)')
  from ufo_jax.evaluation import run as evaluation_run

  evaluation_run.evaluate_checkpoint(config, workdir, checkpoint=checkpoint, exported=exported)


def _flag_values(args: list[str]) -> dict[str, str]:
  """``--name=value`` and ``--name value`` pairs of the command line (before absl parses it)."""
  values = {}
  for i, arg in enumerate(args):
    if not arg.startswith('--'):
      continue
    name, eq, value = arg[2:].partition('=')
    if not eq and i + 1 < len(args) and not args[i + 1].startswith('--'):
      value = args[i + 1]
    values[name] = value
  return values


def with_saved_config(argv: list[str]) -> list[str]:
  """``--config.*`` overrides without ``--config``: load them onto the run's saved config.

  ml_collections defines the override flags only for a loaded config, so the saved
  ``config.json`` of the run (train: ``--workdir``, else ``--checkpoint``; eval: ``--exported``,
  ``--checkpoint`` or ``--workdir``) is passed as ``--config`` through ``run_config_file.py``.
  """
  args = argv[1:]
  if any(a == '--config' or a.startswith('--config=') for a in args):
    return argv
  if not any(a.startswith('--config.') for a in args):
    return argv
  values = _flag_values(args)
  if values.get('mode', 'train') == 'train':
    workdir = values.get('workdir')
    found = None
    if workdir and os.path.exists(os.path.join(workdir, config_lib.RUN_CONFIG_FILE)):
      found = os.path.join(workdir, config_lib.RUN_CONFIG_FILE)
    elif values.get('checkpoint'):
      found = config_lib.find_run_config(values['checkpoint'])
  else:
    where = values.get('exported') or values.get('checkpoint') or values.get('workdir')
    found = config_lib.find_run_config(where) if where else None
  if found is None:
    return argv
  with open(found, encoding='utf-8') as f:  # a broken file: one line naming it, not the flags
    config_lib.config_from_json(f.read(), what=found)
  loader = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_config_file.py')
  return argv[:1] + [f'--config={loader}:{os.path.abspath(found)}'] + args


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for unknown or ill-typed config overrides."""
  try:
    return flags.FLAGS(with_saved_config(argv))
  except config_lib.ConfigError as e:  # the run's saved config.json
    _fail(str(e))
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
  try:
    if _MODE.value == 'train' and not _WORKDIR.value:
      _fail('--mode=train needs --workdir')
    # eval --exported=DIR: the config saved in the export folder.
    config = resolve_config(_MODE.value, _WORKDIR.value, _EXPORTED.value or _CHECKPOINT.value)
    if _MODE.value == 'train':
      train.train_and_evaluate(config, _WORKDIR.value, checkpoint_path=_CHECKPOINT.value,
                               profile_steps=_PROFILE_STEPS.value)
    elif _MODE.value == 'dry_run':
      aot.run(config, describe_state=True)
    elif _MODE.value == 'aot':
      aot.main(config, _TOPOLOGY.value, _WORKDIR.value)
    else:
      _evaluate(config, _WORKDIR.value, _CHECKPOINT.value, _EXPORTED.value)
  except (config_lib.ConfigError, ckpt_lib.MismatchError, ckpt_lib.DamagedError,
          FileNotFoundError) as e:
    _fail(str(e))
  except (ckpt_lib.NonFiniteError, ckpt_lib.SaveError) as e:
    cli.fail(str(e), EXIT_TRAINING_FAILED)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
