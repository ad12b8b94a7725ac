"""One training run per workdir: ``WORKDIR/run.lock``, held while a run trains.

Design (docs/TRAINING.md, "One run per workdir"):

- The lock is a file created with ``O_CREAT | O_EXCL``: atomic on local filesystems and on NFS
  v3+ (and on the FUSE mounts of pod filesystems that pass it through), so of two runs started
  together exactly one creates it. It names its holder: host, pid, start time and a run id.
  Only process 0 of a multi-process run takes it; the others learn the outcome by a broadcast.
- While the run lives, a daemon thread refreshes the file's mtime every ``HEARTBEAT_S`` seconds.
  Advisory locks (``flock``/``fcntl``) are not used: many shared filesystems ignore them or drop
  them silently, and a lock that outlives its process must be recognisable.
- A second run is refused in one line naming the holder. A lock is stale, and taken over with a
  warning that names the old holder, when its holder is on this host and its pid is gone, or,
  from another host (which cannot see the pid), when its heartbeat is older than ``STALE_S``.
  The takeover renames the stale file (atomic; of two takers only one rename succeeds) and then
  creates a fresh lock with ``O_EXCL``.
- The lock is removed when the run ends (also after an error or a signal); ``kill -9`` leaves it,
  and the next run takes it over as above.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging

from ufo_jax import config as config_lib

LOCK_FILE = 'run.lock'
HEARTBEAT_S = 30.0
STALE_S = 300.0


class LockedError(config_lib.ConfigError):
  """Another run holds the workdir (one line naming it)."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # being written, or garbage: judged by its age alone


def _describe(holder: dict[str, Any]) -> str:
  started = holder.get('started')
  when = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started)) if started else '?'
  return f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, started {when}'


def _stale(path: str, holder: dict[str, Any], now: float) -> str | None:
  """Why the lock at ``path`` is stale, or None if its holder may be alive."""
  if holder.get('host') == socket.gethostname() and isinstance(holder.get('pid'), int):
    return None if _alive(holder['pid']) else 'its process is gone'
  try:
    age = now - os.stat(path).st_mtime
  except FileNotFoundError:
    return 'it was just removed'
  return f'its heartbeat is {age:.0f} s old (> {STALE_S:.0f} s)' if age > STALE_S else None


class RunLock:
  """The lock of one workdir; ``acquire`` or ``LockedError``, ``release`` at the end."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
                   'id': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(self.holder, f)
    return True

  def acquire(self) -> None:
    """Takes the lock, or a stale one over (with a warning), or raises ``LockedError``."""
    for _ in range(3):
      if self._create():
        break
      holder = _read(self.path)
      if holder is None:
        continue  # released in between: try again
      why = _stale(self.path, holder, time.time())
      if why is None:
        raise LockedError(
            f'{os.path.dirname(self.path)} is in use by another training run ({_describe(holder)};'
            f' {self.path}); wait for it to finish, stop it, or use another --workdir')
      aside = f'{self.path}.stale-{int(time.time())}-{os.getpid()}'
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        continue  # another run took it over first
      os.remove(aside)
      logging.warning('took over the lock %s of a run that is no longer alive (%s: %s)',
                      self.path, _describe(holder), why)
    else:
      raise LockedError(f'{self.path}: could not take the lock (it keeps changing)')
    self._thread = threading.Thread(target=self._beat, name='run.lock heartbeat', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
      holder = _read(self.path)
      if holder and holder.get('id') == self.holder['id']:
        os.remove(self.path)


def acquire(workdir: str) -> RunLock | None:
  """Process 0 takes the lock of ``workdir``; every process raises the same ``LockedError`` if it
  is held. Returns the lock to release (None on the other processes)."""
  import jax

  lock, error = None, ''
  if jax.process_index() == 0:
    lock = RunLock(workdir)
    try:
      lock.acquire()
    except LockedError as e:
      lock, error = None, str(e)
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    code = np.frombuffer(error.encode()[:2048].ljust(2048, b'\0'), np.uint8)
    code = multihost_utils.broadcast_one_to_all(code)
    error = bytes(np.asarray(code)).rstrip(b'\0').decode(errors='replace')
  if error:
    raise LockedError(error)
  return lock
