"""One run per workdir (ufo_jax.runlock): a held lock refuses in one line naming its holder, a
dead holder's lock is taken over with a note, a release removes only one's own lock. Two
training processes started together on one workdir are in tests/test_main.py."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ufo_jax import runlock


def _write(path, **holder):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(holder, f)


def test_held_lock_refuses_and_release_removes_it(tmp_path):
  first = runlock.RunLock(str(tmp_path))
  first.acquire()
  with pytest.raises(runlock.LockedError) as e:
    runlock.RunLock(str(tmp_path)).acquire()
  message = str(e.value)
  assert '\n' not in message
  assert f'host {socket.gethostname()}, pid {os.getpid()}, started ' in message
  assert 'in use by another training run' in message and 'run.lock' in message
  first.release()
  assert not (tmp_path / 'run.lock').exists()
  second = runlock.RunLock(str(tmp_path))
  second.acquire()  # free again
  second.release()


def test_stale_locks_are_taken_over_with_a_note(tmp_path, caplog):
  lock = tmp_path / 'run.lock'
  # This host, a process that is gone.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _write(lock, host=socket.gethostname(), pid=dead.pid, started=time.time() - 60, id='old')
  with caplog.at_level('WARNING'):
    taker = runlock.RunLock(str(tmp_path))
    taker.acquire()
  assert any('took over the lock' in r.getMessage() and f'pid {dead.pid}' in r.getMessage()
             and 'its process is gone' in r.getMessage() for r in caplog.records)
  assert json.loads(lock.read_text())['id'] == taker.holder['id']
  taker.release()
  # Another host: judged by the heartbeat (the file's mtime).
  _write(lock, host='other-host', pid=1, started=time.time(), id='other')
  with pytest.raises(runlock.LockedError, match='host other-host, pid 1'):
    runlock.RunLock(str(tmp_path)).acquire()
  old = time.time() - runlock.STALE_S - 60
  os.utime(lock, (old, old))
  taker = runlock.RunLock(str(tmp_path))
  taker.acquire()
  assert json.loads(lock.read_text())['id'] == taker.holder['id']
  # A release never removes a lock that another run took over in between.
  _write(lock, host='other-host', pid=1, started=time.time(), id='someone else')
  taker.release()
  assert lock.exists()
