"""What the command-line tools after training (export, embed, search) share: required flags and
one-line ``error:`` messages instead of tracebacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags


def fail(message: str, status: int = 1) -> None:
  """Prints ``error: message`` to stderr and exits with ``status``."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def check_args(argv: Sequence[str], *required: str) -> None:
  """No positional arguments, and every flag of ``required`` given."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  missing = [f'--{name}' for name in required if not flags.FLAGS[name].value]
  if missing:
    fail(f'{", ".join(missing)} required')


@contextlib.contextmanager
def one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
  """Turns the expected ``errors`` of a tool's work into one ``error:`` line."""
  try:
    yield
  except errors as e:
    fail(str(e))
