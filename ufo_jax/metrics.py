"""What training reports: on-device metric sums, interval averages, the console line and the
TensorBoard writers.

The train step adds each step's scalars to an accumulator on the device
(``metric_accumulator`` / ``make_accumulate``, traced inside the step); the loop fetches it once
per boundary (one host sync), and ``Logger.log`` turns it into the interval's averages
(``interval_averages``), TensorBoard scalars (``train/*``, ``perf/images_per_sec``,
``perf/step_time_s``, ``perf/mfu``) and one console line (``console_line``). ``Logger`` owns the
writers: clu's ``SummaryWriter`` on process 0, nothing on the others.

The metric names come from the config alone (``metric_names``), so this module needs nothing of
the step (``ufo_jax.step`` imports it, never the other way).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from ufo_jax import config as config_lib


def metric_names(config: Any) -> tuple[str, ...]:
  """The scalars of one train step: ``total``, ``grad_norm``, ``lr`` and per task
  ``<task>/cosface``, ``<task>/triplet`` (where ``tasks.<task>.triplet``), ``<task>/total``,
  ``<task>/accuracy``, ``<task>/examples``."""
  names = ['total', 'grad_norm', 'lr']
  for task in config_lib.task_names(config):
    names += [f'{task}/cosface'] + ([f'{task}/triplet'] if config.tasks[task].triplet else [])
    names += [f'{task}/total', f'{task}/accuracy', f'{task}/examples']
  return tuple(names)


def loss_terms(config: Any) -> tuple[str, ...]:
  """The loss terms whose finiteness is reported (``<task>/cosface``, ``<task>/triplet``)."""
  return tuple(n for n in metric_names(config) if n.endswith(('/cosface', '/triplet')))


def metric_accumulator(config: Any) -> dict[str, Any]:
  """Zeros of the loop's on-device metrics: interval ``sums`` of every ``metric_names`` scalar,
  ``counts`` of the steps that entered them (``steps``; per task, the steps with examples of
  it), ``nonfinite`` (non-finite steps in the interval), ``consecutive`` (non-finite steps in a
  row), ``halted``, ``bad_step`` / ``bad_terms``: the step that halted the run and which loss
  terms (and ``grad_norm``) were non-finite in it, and ``limit``: the non-finite steps in a row
  that halt the run (1 for ``train.on_nonfinite='stop'``, ``train.max_nonfinite_steps`` for
  ``'skip'``; a value, not a constant of the compiled step)."""
  f32, i32 = jnp.float32, jnp.int32
  names = metric_names(config)
  limit = (1 if config.train.get('on_nonfinite', 'stop') == 'stop'
           else int(config.train.get('max_nonfinite_steps', 10)))
  return {
      'sums': {n: jnp.zeros((), f32) for n in names},
      'counts': {'steps': jnp.zeros((), i32),
                 **{t: jnp.zeros((), i32) for t in config_lib.task_names(config)}},
      'nonfinite': jnp.zeros((), i32), 'consecutive': jnp.zeros((), i32),
      'halted': jnp.zeros((), jnp.bool_), 'bad_step': jnp.full((), -1, i32),
      'bad_terms': {n: jnp.zeros((), jnp.bool_) for n in loss_terms(config) + ('grad_norm',)},
      'limit': jnp.full((), limit, i32),
  }


def make_accumulate(config: Any) -> Callable:
  """``(acc, metrics, finite, step) -> acc``: adds one step to ``metric_accumulator``'s sums and
  applies ``train.on_nonfinite`` / ``train.max_nonfinite_steps`` (traced inside the step)."""
  names = metric_names(config)
  tasks = config_lib.task_names(config)
  def accumulate(acc, metrics, finite, step):
    halted = acc['halted']
    counted = finite & jnp.logical_not(halted)
    has = {t: counted & (metrics[f'{t}/examples'] > 0) for t in tasks}
    sums = {}
    for name in names:
      task = name.split('/')[0] if '/' in name and not name.endswith('/examples') else None
      weight = has[task] if task else counted
      value = jnp.asarray(metrics[name], jnp.float32)
      sums[name] = acc['sums'][name] + jnp.where(weight, value, 0.0)
    counts = {'steps': acc['counts']['steps'] + counted.astype(jnp.int32),
              **{t: acc['counts'][t] + has[t].astype(jnp.int32) for t in tasks}}
    bad = jnp.logical_not(finite) & jnp.logical_not(halted)
    consecutive = jnp.where(halted, acc['consecutive'],
                            jnp.where(finite, 0, acc['consecutive'] + 1))
    stop = bad & (consecutive >= acc['limit'])
    bad_terms = {n: jnp.where(bad, jnp.logical_not(jnp.isfinite(metrics[n])), v)
                 for n, v in acc['bad_terms'].items()}
    return {'sums': sums, 'counts': counts,
            'nonfinite': acc['nonfinite'] + bad.astype(jnp.int32), 'consecutive': consecutive,
            'halted': halted | stop, 'bad_step': jnp.where(bad, step, acc['bad_step']),
            'bad_terms': bad_terms, 'limit': acc['limit']}

  return accumulate


def interval_averages(acc: Mapping[str, Any]) -> dict[str, float]:
  """The averages over the logging interval of a fetched ``metric_accumulator``: each task's
  scalars over the steps that had examples of the task, the rest over all counted steps."""
  counts = acc['counts']
  out = {}
  for name, total in acc['sums'].items():
    task = name.split('/')[0] if '/' in name and not name.endswith('/examples') else None
    n = int(counts[task] if task else counts['steps'])
    if n:
      out[name] = float(total) / n
  return out


def reset_metrics(acc: dict[str, Any]) -> dict[str, Any]:
  """Zeroes the interval sums and counts; keeps the non-finite streak and the halt."""
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return dict(acc, sums=zeros(acc['sums']), counts=zeros(acc['counts']),
              nonfinite=jnp.zeros_like(acc['nonfinite']))


def nonfinite_message(acc: Mapping[str, Any], config: Any, last_checkpoint: int | None) -> str:
  terms = [n for n, bad in acc['bad_terms'].items() if bool(bad) and n != 'grad_norm']
  what = ('non-finite loss ' + ', '.join(terms)) if terms else 'non-finite gradient norm'
  if terms and bool(acc['bad_terms']['grad_norm']):
    what += ' and gradient norm'
  policy = config.train.get('on_nonfinite', 'stop')
  if policy == 'skip':
    what = (f'{int(acc["consecutive"])} non-finite steps in a row '
            f'(train.max_nonfinite_steps), the last with {what}')
  kept = (f'checkpoint step {last_checkpoint} is the last, and good'
          if last_checkpoint is not None else 'no checkpoint was written')
  return (f'step {int(acc["bad_step"])}: {what} (train.on_nonfinite={policy}); the state was '
          f'not updated by it and {kept}; lower optim.lr, or set '
          '--config.train.on_nonfinite=skip')


def _format_eta(seconds: float) -> str:
  seconds = int(max(0.0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def console_line(step: int, total_steps: int, eta_s: float, averages: Mapping[str, float],
                 tasks: tuple[str, ...], images_per_sec: float, skipped: int = 0) -> str:
  """The one console line of a log step: step/total, ETA, total loss, each task's loss, img/s."""
  parts = [f'step {step}/{total_steps}', f'ETA {_format_eta(eta_s)}',
           f'loss {averages.get("total", float("nan")):.4g}']
  parts.append(' '.join(f'{t} {averages[f"{t}/total"]:.4g}' for t in tasks
                        if f'{t}/total' in averages))
  parts.append(f'{images_per_sec:.1f} img/s')
  if skipped:
    parts.append(f'{skipped} non-finite steps skipped')
  return ' | '.join(p for p in parts if p)


def flat_hparams(config: Any) -> dict[str, Any]:
  """The config as a flat {dotted.name: scalar} dict for TensorBoard's hparams."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if hasattr(node, 'items'):
      for key, value in node.items():
        visit(f'{prefix}{key}.', value)
    else:
      value = node if isinstance(node, (bool, int, float, str)) else str(node)
      flat[prefix[:-1]] = value

  visit('', config)
  return flat


class Logger:
  """The run's writers and its log: TensorBoard scalars and hparams (clu, process 0 only), one
  console line per log step, images/s and MFU.

  Args:
    config: the experiment config (task names, global batch, hparams).
    workdir: where the TensorBoard events go.
    first_step: the step training starts from (hparams are written once, at step 0).
    flops_per_step: model FLOPs of one train step (all devices; 0: no MFU).
    peak_flops: peak FLOP/s of one device (None: no MFU, e.g. a CPU).
  """

  def __init__(self, config: Any, workdir: str, *, first_step: int, flops_per_step: float,
               peak_flops: float | None):
    from clu import metric_writers

    if jax.process_index() == 0:  # TensorBoard only: the console gets one line per log step
      self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    else:
      self.writer = metric_writers.MultiWriter([])
    if first_step == 0:
      self.writer.write_hparams(flat_hparams(config))
    self.total_steps = int(config.train.steps)
    self.tasks = config_lib.task_names(config)
    self.global_batch = config_lib.global_batch_size(config)
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._last_time, self._last_step = time.time(), first_step

  def log(self, step: int, values: Mapping[str, Any]) -> dict[str, float]:
    """Writes the interval ending at ``step`` (a fetched ``metric_accumulator``) to TensorBoard
    and one console line; returns the scalars written."""
    now = time.time()
    elapsed, steps = max(now - self._last_time, 1e-9), max(step - self._last_step, 1)
    averages = interval_averages(values)
    scalars = {f'train/{k}': v for k, v in averages.items()}
    scalars['train/nonfinite_steps'] = int(values['nonfinite'])
    scalars['perf/images_per_sec'] = steps * self.global_batch / elapsed
    scalars['perf/step_time_s'] = elapsed / steps
    if self.peak_flops and self.flops_per_step:
      scalars['perf/mfu'] = (self.flops_per_step * steps / elapsed
                             / (self.peak_flops * jax.device_count()))
    self.writer.write_scalars(step, scalars)
    logging.info('%s', console_line(
        step, self.total_steps, (self.total_steps - step) * elapsed / steps, averages,
        self.tasks, scalars['perf/images_per_sec'], int(values['nonfinite'])))
    self._last_time, self._last_step = time.time(), step
    return scalars

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
