"""What every grain worker process of ufo_jax runs first (``worker_init_fn``)."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_index: int = 0, worker_count: int = 0) -> None:
  """Makes a grain worker process ignore SIGINT and SIGTERM.

  A terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the group, the workers
  too; the main process handles them (it finishes the step, saves and closes the pipeline, which
  stops the workers). A worker that died of the signal would instead make the next batch raise
  "Worker process was terminated unexpectedly" before the checkpoint is written.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
