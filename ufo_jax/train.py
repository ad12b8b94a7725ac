"""The training loop: ``train_and_evaluate(config, workdir)``, read top to bottom in one screen.

``start`` sets a run up (``Run``): config validated against the run's saved ``config.json``,
the device mesh, the state restored from the workdir's latest checkpoint (or ``--checkpoint``, or
initialised directly in its sharded layout), the input iterator, the compiled step. Then each
step: the next local batch -> a global array (``sharding.make_global_batch``) -> the compiled
step, which sums the metrics on the device and never applies a non-finite update. When
``itstime``: the interval's averages to TensorBoard and one console line (``metrics.Logger``), a
checkpoint (``checkpoint.maybe_save``), an evaluation (``evaluate``). SIGTERM / SIGINT (and a
preemption): finish the step, save, exit; a stop requested before or during an evaluation saves
first.

Where the other parts live (docs/TRAINING.md): the jitted step, the state and the losses in
``ufo_jax.step``; metric sums, the console line and the writers in ``ufo_jax.metrics``; peak
FLOP/s in ``ufo_jax.hardware``; the checkpoint policy in ``ufo_jax.checkpoint``; the compile
report (``--mode=dry_run`` / ``aot``) in ``ufo_jax.aot``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from ufo_jax import checkpoint as ckpt_lib
from ufo_jax import config as config_lib
from ufo_jax import hardware, hlo, metrics, optim, runlock, sharding
from ufo_jax import step as step_lib
from ufo_jax import warm_start
from ufo_jax.evaluation import run as evaluation_run
from ufo_jax.models import multitask


def itstime(step: int, every: int, total_steps: int, *, last: bool = True) -> bool:
  """Whether a periodic action is due after ``step``: every ``every`` steps (0: never) and, with
  ``last``, after the last step (big_vision's ``utils.itstime``)."""
  return bool(every) and step % every == 0 or (last and step == total_steps)


def _export_as_pretrained(config: Any, workdir: str, checkpoint_path: str | None
                          ) -> str | None:
  """``--checkpoint=EXPORT_DIR`` on a new workdir: an export folder holds no train state, so the
  run starts fresh from its backbone and the necks of the tasks both have
  (``config.model.pretrained``, ``models.multitask.load_export_folder``); class weights and the
  other tasks' heads start fresh. Returns the checkpoint path left to open (None then)."""
  own = epath.Path(workdir) / 'checkpoints'
  if (not checkpoint_path or not multitask.is_export_folder(checkpoint_path)
      or (own.exists() and any(p.name.isdigit() for p in own.iterdir()))):
    return checkpoint_path
  info = epath.Path(checkpoint_path, multitask.EXPORT_MODEL_JSON).read_text()
  before = tuple(json.loads(info).get('tasks', ()))
  now = config_lib.task_names(config)
  logging.info('--checkpoint=%s is an export folder: backbone and necks %s from there, heads %s '
               'new, every class weight fresh; training starts at step 0', checkpoint_path,
               ', '.join(t for t in now if t in before) or '-',
               ', '.join(t for t in now if t not in before) or '-')
  config.model.pretrained = os.fspath(checkpoint_path)
  return None


def train_and_evaluate(config: Any, workdir: str, *, checkpoint_path: str | None = None,
                       profile_steps: int = 0,
                       compiler_options: Mapping[str, Any] | None = None) -> step_lib.TrainState:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Args:
    config: the experiment config (validated here). Rerunning a workdir, it must agree with
      the run's saved ``WORKDIR/config.json`` on every field of ``config.LOCKED_FIELDS``; other
      differences (steps, intervals, data_dir, evaluation, workers) apply and are logged.
    workdir: ``config.json``, TensorBoard events and ``checkpoints/`` go here.
    checkpoint_path: when the workdir has no checkpoint yet, start from this checkpoint
      (state and data iterator) instead of a fresh initialisation.
    profile_steps: capture a profiler trace of this many steps after the first logging
      interval, into ``workdir/profile``.
    compiler_options: XLA options for the compiled programs (as ``step.build``'s).

  Returns:
    The final train state (the state of the stop step after SIGTERM / SIGINT).

  Raises:
    config.ConfigError: the config, the workdir or a resume that changes a locked field.
    checkpoint.MismatchError: a checkpoint that does not fit the config.
    checkpoint.NonFiniteError: training stopped on non-finite values (``train.on_nonfinite``).
  """
  run = start(config, workdir, checkpoint_path, compiler_options)
  tr, state, total, batch = config.train, run.state, int(config.train.steps), None
  try:
    if run.first_step >= total:
      logging.info('nothing to train: the run is at step %d of %d', run.first_step, total)
      return state
    acc = run.setup.init_metrics()
    compiled, logger = run.compile(state, acc)
    profiler = Profiler(workdir, run.first_step + max(int(tr.log_every), 1), profile_steps)
    run.closers.append(profiler.stop)
    for step in range(run.first_step + 1, total + 1):
      profiler.before(step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.make_global_batch(next(run.data_iter), run.setup.mesh)
        state, acc = compiled(state, acc, batch)
      profiler.after(step, state)
      ckpt_lib.check_saves(run.manager)  # no training past a failed save
      log = itstime(step, int(tr.log_every), total, last=bool(int(tr.log_every)))
      save = itstime(step, int(tr.checkpoint_every), total)
      evaluate_now = itstime(step, int(config.eval.every_steps), total)
      # At an evaluation the processes agree at once: a stop requested before it saves first.
      stopping = run.stop.agreed(step, now=evaluate_now) or run.manager.reached_preemption(step)
      if log or save or evaluate_now or stopping:  # the one host sync of a boundary
        values = jax.device_get(acc)
        if bool(values['halted']):
          raise ckpt_lib.NonFiniteError(metrics.nonfinite_message(values, config, run.last_saved))
        if log:
          logger.log(step, values)
          acc = run.setup.reset_metrics(acc)
      if save or stopping:
        run.save(step, state, stopping=stopping)
      if evaluate_now and not stopping:
        evaluate(config, workdir, run.setup, state, step, logger.writer,
                 should_stop=lambda s=step: run.stop.agreed(s, now=True))
        if stopping := run.stop.agreed(step, now=True):  # a stop during the evaluation
          run.save(step, state, stopping=True)
      if stopping:
        run.say_stopped(step)
        break
  finally:
    batch = None  # noqa: F841 -- its grain shared memory is unlinked when collected (close)
    run.close()
  return state


@dataclasses.dataclass
class Run:
  """A started run (``start``): what the loop steps, saves and closes."""
  config: Any
  workdir: str
  setup: step_lib.Setup
  state: step_lib.TrainState
  manager: Any
  data_iter: Any
  stop: StopSignals
  meta: dict[str, Any]
  first_step: int
  last_saved: int | None
  closers: list[Callable[[], None]] = dataclasses.field(default_factory=list)

  def compile(self, state: step_lib.TrainState, acc: Any) -> tuple[Any, metrics.Logger]:
    """The loop's step compiled once (ahead of time), its cost logged; the run's logger."""
    t0 = time.time()
    compiled = self.setup.loop_step.lower(state, acc, self.setup.batch_shapes).compile()
    cost = hlo.compiled_cost(compiled)
    logging.info('train step compiled in %.1fs; XLA cost per device %s; memory %s',
                 time.time() - t0, cost, hlo.compiled_memory(compiled))
    # MFU numerator: analytic model FLOPs (ViT), else XLA's count of the compiled step (ResNet).
    flops = self.setup.model_flops_per_example
    flops_per_step = (flops * config_lib.global_batch_size(self.config) if flops
                      else cost.get('flops', 0.0) * jax.device_count())
    logger = metrics.Logger(self.config, self.workdir, first_step=self.first_step,
                            flops_per_step=flops_per_step,
                            peak_flops=hardware.peak_flops_per_device())
    self.closers.append(logger.close)
    return compiled, logger

  def save(self, step: int, state: step_lib.TrainState, *, stopping: bool) -> None:
    self.last_saved = ckpt_lib.maybe_save(
        self.manager, step, state, state_finite=self.setup.state_finite,
        last_saved=self.last_saved, data_iterator=self.data_iter, meta=self.meta,
        stopping=stopping)

  def say_stopped(self, step: int) -> None:
    logging.warning('%s: stopped after step %d; checkpoint %s committed; run the same command '
                    'again to resume', self.stop.requested or 'preemption', step,
                    os.path.join(os.fspath(self.manager.directory), str(step)))

  def close(self) -> None:
    """Lets the last checkpoint commit, stops the input workers, flushes the logs."""
    for close in reversed(self.closers):
      close()
    self.closers = []


def start(config: Any, workdir: str, checkpoint_path: str | None = None,
          compiler_options: Mapping[str, Any] | None = None) -> Run:
  """Validates ``config`` against the workdir, builds the step and restores (or initialises) the
  state and the data iterator; the returned ``Run`` owns the managers, the iterator and the
  signal handlers (``Run.close``)."""
  config_lib.normalize(config)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  check_workdir(workdir)
  checkpoint_path = _export_as_pretrained(config, workdir, checkpoint_path)
  added = warm_start.added_tasks(config, workdir, checkpoint_path)  # a task added to a run
  saved = _saved_config(config, workdir, None if added else checkpoint_path)
  mesh = sharding.create_mesh(config.mesh)
  logging.info('devices: %d (%d processes) %s; mesh %s', jax.device_count(),
               jax.process_count(), jax.devices()[0].device_kind, dict(mesh.shape))
  stop = StopSignals(int(config.train.get('stop_sync_every', 10)))
  stop.install()
  closers: list[Callable[[], None]] = [stop.restore, ckpt_lib.quiet_save_threads()]
  try:
    lock = runlock.acquire(workdir)  # one run per workdir
    if lock is not None:
      closers.append(lock.release)
    manager = ckpt_lib.create_manager(
        os.path.join(workdir, 'checkpoints'), keep_checkpoints=int(config.train.keep_checkpoints),
        keep_every=int(config.train.keep_every))
    closers.append(lambda: ckpt_lib.finish(manager))
    source, source_step = ckpt_lib.open_source(manager, checkpoint_path)
    if source is not manager:
      closers.append(source.close)
    num_classes, training_data = open_input(config)
    warm = added is not None and source is not manager  # a task added to another run
    # A fresh start checks the pretrained file (or 'none') before any data is read.
    pretrained = config_lib.pretrained_path(config) if source_step is None else None
    data_iter = iter(create_dataset(config, num_classes, training_data))
    closers.append(lambda: _close_input(data_iter))
    if warm:  # its backbone and shared heads; the new heads fresh
      padded = warm_start.padded_classes(source, source_step, added, num_classes, mesh.size)
      setup = step_lib.build(config, num_classes, mesh, padded_classes=padded,
                             compiler_options=compiler_options)
      state = warm_start.restore_shared(source, source_step, setup.init(), added)
    elif source_step is not None:
      setup, state = _resume(config, source, source_step, num_classes, mesh, data_iter,
                             compiler_options, own=source is manager)
    else:
      setup = step_lib.build(config, num_classes, mesh, compiler_options=compiler_options)
      state = setup.init()
      if pretrained is None:
        logging.info('config.model.pretrained=none: training from scratch')
      else:
        state = step_lib.load_pretrained(config, setup, state)
    first_step = int(jax.device_get(state['step']))
    if saved is not None:
      _say_schedule_change(saved, config, first_step)
    if jax.process_index() == 0:
      config_lib.save_run_config(config, workdir)
    logging.info('parameters: %d; starting at step %d of %d; config %s',
                 hardware.param_count(state['params']), first_step, int(config.train.steps),
                 os.path.join(workdir, config_lib.RUN_CONFIG_FILE))
  except BaseException:
    for close in reversed(closers):
      close()
    raise
  return Run(config=config, workdir=workdir, setup=setup, state=state, manager=manager,
             data_iter=data_iter, stop=stop, first_step=first_step,
             meta={'num_classes': setup.num_classes, 'padded_classes': setup.padded_classes,
                   'devices': jax.device_count(), 'processes': jax.process_count()},
             last_saved=manager.latest_step(), closers=closers)


def _resume(config: Any, source: Any, step: int, num_classes: Mapping[str, int],
            mesh: jax.sharding.Mesh, data_iter: Any, compiler_options: Any, *, own: bool
            ) -> tuple[step_lib.Setup, step_lib.TrainState]:
  """The step and state restored from checkpoint ``step`` of ``source``, onto ``mesh``.

  A damaged step (``checkpoint.DamagedError``) under ``train.on_bad_checkpoint='fallback'`` is
  set aside (renamed ``<step>.damaged``; another run's ``--checkpoint`` is only skipped) with one
  line, and the next older step is tried. Saved with another number of processes, the state is
  restored onto the new mesh and the input continues from the step with the new per-host
  slicing (one line says the sample order differs).
  """
  policy = config.train.get('on_bad_checkpoint', 'fallback')
  while True:
    try:
      meta = ckpt_lib.check_meta(source, step, num_classes)
      setup = step_lib.build(config, num_classes, mesh, padded_classes=meta['padded_classes'],
                             compiler_options=compiler_options)
      same_hosts = int(meta.get('processes', jax.process_count())) == jax.process_count()
      logging.info('restoring step %d from %s', step, source.directory)
      state = ckpt_lib.restore_checked(source, step, setup.abstract_state,
                                       data_iterator=data_iter if same_hosts else None)
      break
    except ckpt_lib.DamagedError as e:
      older = sorted(s for s in source.all_steps() if s < step)
      if policy != 'fallback' or not older:
        why = ('train.on_bad_checkpoint=stop' if policy != 'fallback'
               else 'no older step to fall back to')
        raise ckpt_lib.DamagedError(f'{e} ({why})') from None
      kept = f'kept as {ckpt_lib.set_aside(source, step)}' if own else 'skipped'
      logging.warning('%s; resuming from step %d instead (train.on_bad_checkpoint=fallback); '
                      'the damaged step is %s', e, older[-1], kept)
      source.reload()
      step = older[-1]
  saved = (int(meta.get('devices', jax.device_count())),
           int(meta.get('processes', jax.process_count())))
  if not same_hosts:
    _continue_input(data_iter, step)
    logging.warning('step %d was saved by %d processes on %d devices, this run has %d on %d: the '
                    'state is restored onto the new mesh and the input continues from step %d '
                    'with the new per-host slicing, so the sample order from here on differs '
                    'from an uninterrupted run', step, saved[1], saved[0],
                    jax.process_count(), jax.device_count(), step)
  elif saved[0] != jax.device_count():
    logging.info('step %d was saved on %d devices, restored onto %d (the sample order is '
                 'unchanged)', step, saved[0], jax.device_count())
  return setup, state


def _continue_input(data_iter: Any, step: int) -> None:
  """Sets the input iterator to training step ``step`` (its state is the step number)."""
  state = dict(data_iter.get_state())
  state['step' if 'step' in state else 'next_index'] = int(step)
  data_iter.set_state(state)


def _saved_config(config: Any, workdir: str, checkpoint_path: str | None) -> Any:
  """The run's saved config (``WORKDIR/config.json``, else the one beside ``--checkpoint``), with
  ``config`` checked against it (``ConfigError`` on a locked field, the rest logged); None for a
  new run."""
  saved_path = epath.Path(workdir) / config_lib.RUN_CONFIG_FILE
  origin = os.fspath(saved_path) if saved_path.exists() else (
      config_lib.find_run_config(checkpoint_path) if checkpoint_path else None)
  if not origin:
    return None
  saved = config_lib.config_from_json(epath.Path(origin).read_text(), what=origin)
  for field, old, new in config_lib.check_resume(saved, config, origin):
    if field != 'train.steps':  # said with its effect on the schedule (_say_schedule_change)
      logging.info('config.%s: %r in %s, now %r', field, old, origin, new)
  return saved


def _say_schedule_change(saved: Any, config: Any, step: int) -> None:
  """One line when ``train.steps`` changed on resume: the lr schedule is re-stretched over the
  new number of steps, so the lr at the resume step jumps."""
  old, new = int(saved.train.steps), int(config.train.steps)
  if old == new:
    return
  _, old_schedule = optim.create_optimizer(config.optim, total_steps=old)
  _, new_schedule = optim.create_optimizer(config.optim, total_steps=new)
  logging.warning('config.train.steps: %d in the saved run, now %d: the lr schedule is '
                  're-stretched over %d steps; the lr at the resume step %d goes from %.6g to '
                  '%.6g', old, new, new, step, float(old_schedule(step)),
                  float(new_schedule(step)))


def _close_input(data_iter: Any) -> None:
  """Stops the input workers; batches from grain workers live in shared memory, unlinked when
  their arrays are collected: collect the last ones now, not at interpreter exit (if ever)."""
  if hasattr(data_iter, 'close'):
    data_iter.close()
    gc.collect()


class Profiler:
  """A profiler trace of ``steps`` steps after ``after`` (``--profile_steps``), into
  ``workdir/profile``."""

  def __init__(self, workdir: str, after: int, steps: int):
    self.directory = os.path.join(workdir, 'profile')
    self.first, self.last = (after + 1, after + steps) if steps else (-1, -1)
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)
      self.stop()
      logging.info('profiler trace of steps %d-%d written to %s', self.first, step,
                   self.directory)

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def evaluate(config: Any, workdir: str, setup: step_lib.Setup, state: step_lib.TrainState,
             step: int, writer: Any, *, should_stop: Callable[[], bool]) -> None:
  """Evaluates the model of ``state`` on ``config.eval.sets`` (``evaluation.run.evaluate``),
  which stops between benchmarks once ``should_stop()`` (agreed by every process) says so."""
  evaluation_run.evaluate(config, workdir, step_lib.merge_model(setup, state), step, writer,
                          should_stop=should_stop)


class StopSignals:
  """SIGTERM / SIGINT -> finish the step, save, exit 0; a second SIGINT exits at once.

  ``requested`` is the name of the first signal received. With several processes,
  ``agreed(step)`` all-gathers the flags every ``every`` steps, so that all processes stop (and
  save) at the same step whichever of them got the signal.
  """

  def __init__(self, every: int = 10):
    self.every = max(1, int(every))
    self.requested: str | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set in the main thread
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested is not None:
      if signum == signal.SIGINT:
        sys.stderr.write('second SIGINT: exiting at once, without a checkpoint\n')
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)
      return
    self.requested = name
    sys.stderr.write(f'{name}: finishing the current step, then saving a checkpoint and '
                     'exiting (SIGINT again: exit at once)\n')
    sys.stderr.flush()

  def agreed(self, step: int, *, now: bool = False) -> bool:
    """Whether every process stops after ``step`` (a collective every ``every`` steps, or at once
    with ``now``, when there are several processes; a local flag otherwise). Every process
    must call it at the same steps with the same ``now``."""
    if jax.process_count() == 1:
      return self.requested is not None
    if step % self.every and not now:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
    if np.any(flags) and self.requested is None:
      self.requested = 'signal in another process'
    return bool(np.any(flags))


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and writes a probe file there; a ``ConfigError`` (one line) if that
  fails, so an unwritable workdir stops the run before anything is built or compiled."""
  from etils import epath

  probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}_{os.getpid()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError, GCS errors, ...)
    raise config_lib.ConfigError(f'--workdir={workdir}: cannot write there '
                                 f'({type(e).__name__}: {e})') from None


def open_input(config: Any) -> tuple[dict[str, int], Any]:
  """``(classes per task, the opened training data)``: config values, else the converted data
  (``data.open_training_data``: its provenance checked once per start), else synthetic/catalog
  sizes (the data is then None)."""
  data = None
  if config.input.source == 'tfds':
    from ufo_jax import data as data_lib

    data = data_lib.open_training_data(config, config.input.data_dir)
  counts = None if data is None else data.num_classes
  return ({t: config_lib.num_classes(config, t, counts) for t in config_lib.task_names(config)},
          data)


def create_dataset(config: Any, num_classes: Mapping[str, int], data: Any = None) -> Any:
  """The grain dataset of this process's local batches (synthetic, or over ``data``, the
  converted data ``open_input`` opened)."""
  if config.input.source == 'synthetic':
    from ufo_jax.data import synthetic

    return synthetic.create_synthetic_dataset(config, num_classes)
  from ufo_jax import data as data_lib

  return data_lib.build_train_dataset(config, data.sources, process_index=jax.process_index(),
                                      process_count=jax.process_count())
