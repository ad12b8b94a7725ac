"""Pickles of numpy arrays read with an allow-list of globals, so nothing in the file runs.

A pickle can name any Python callable and have it called while it loads. The files ufo-jax
reads as pickles (insightface face ``.bin`` files in data_prep, UFO's released
``paddle.save`` state dicts in ``ufo_jax.models.ufo_release``) need only numpy's array
reconstruction, dtypes and plain containers: ``RestrictedUnpickler`` resolves exactly the
globals it is given and refuses every other one, and every persistent id, before it runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

try:  # numpy >= 2
  from numpy._core import multiarray as _multiarray
  from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
  from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
  from numpy.core import numeric as _numeric  # type: ignore[no-redef]

# The globals a pickled numpy array needs, under the numpy 1.x (``numpy.core``) and 2.x
# (``numpy._core``) module names: ``_reconstruct`` (protocols 0-4), ``_frombuffer`` (protocol 5),
# ``scalar`` (numpy scalars), ``ndarray`` and ``dtype``.
NUMPY_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}
for _module in ('numpy.core', 'numpy._core'):
  NUMPY_GLOBALS[(f'{_module}.multiarray', '_reconstruct')] = _multiarray._reconstruct
  NUMPY_GLOBALS[(f'{_module}.multiarray', 'scalar')] = _multiarray.scalar
  NUMPY_GLOBALS[(f'{_module}.numeric', '_frombuffer')] = _numeric._frombuffer


class UnsafePickleError(ValueError):
  """A pickle asked for a global outside the allow-list (nothing in it has run)."""


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only ``allowed`` globals.

  Args:
    file: the open binary file.
    name: the file's name, for the error line.
    allowed: ``{(module, name): object}``; default ``NUMPY_GLOBALS``.
    expected: what the file may hold, ending the refusal line ("a face .bin may only hold ...").
    encoding: as ``pickle.Unpickler`` (``'bytes'`` or ``'latin1'`` for Python 2 era pickles).
  """

  def __init__(self, file: BinaryIO, name: str, *,
               allowed: Mapping[tuple[str, str], Any] = NUMPY_GLOBALS,
               expected: str = 'the file may only hold numpy arrays and plain containers',
               encoding: str = 'bytes'):
    super().__init__(file, encoding=encoding)
    self._name, self._allowed, self._expected = name, allowed, expected

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(f'{self._name}: refused to load global {module}.{name}; '
                              f'{self._expected}') from None

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError(f'{self._name}: refused a persistent id; {self._expected}')
