"""insightface face verification ``.bin`` files, read with a restricted unpickler.

A ``.bin`` (``lfw.bin``, ``cfp_fp.bin``, ...) is a pickle of ``(bins,
issame_list)``: ``bins`` holds 2N encoded images (bytes, or numpy uint8 arrays)
and pair i is ``(bins[2i], bins[2i+1])``. A pickle can run arbitrary code, so
the loader only lets through the few numpy globals that arrays need; any other
global is refused before anything in the file runs.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from ufo_jax.safe_pickle import RestrictedUnpickler, UnsafePickleError

__all__ = ['UnsafePickleError', 'load_bin']


def _as_bytes(img: Any, path: str, i: int) -> bytes:
  if isinstance(img, (bytes, bytearray)):
    return bytes(img)
  if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 1:
    return img.tobytes()
  raise ValueError(f'{path}: image {i} is {type(img).__name__} '
                   f'{getattr(img, "dtype", "")}; expected bytes or a 1-D uint8 array')


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
  """Loads an insightface ``.bin``; returns (encoded images, is_same per pair)."""
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'face verification file not found: {path}')
  with open(path, 'rb') as f:
    try:
      obj = RestrictedUnpickler(
          f, path, expected='a face .bin may only hold lists, tuples, bytes, bools and numpy '
          'arrays').load()
    except UnsafePickleError:
      raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
      raise ValueError(f'{path}: not a readable face .bin pickle ({e})') from e
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise ValueError(f'{path}: expected a pickled (bins, issame_list) pair')
  bins, issame = obj
  if isinstance(bins, np.ndarray) and bins.dtype == object:
    bins = list(bins)
  if not isinstance(bins, (list, tuple)):
    raise ValueError(f'{path}: bins is {type(bins).__name__}, expected a list')
  images = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
  if isinstance(issame, np.ndarray):
    if issame.dtype != np.bool_ or issame.ndim != 1:
      raise ValueError(f'{path}: issame_list array has dtype {issame.dtype}, expected bool')
    same = [bool(x) for x in issame]
  elif isinstance(issame, (list, tuple)) and all(isinstance(x, bool) for x in issame):
    same = list(issame)
  else:
    raise ValueError(f'{path}: issame_list must be a list of bools or a bool array')
  if len(images) != 2 * len(same):
    raise ValueError(f'{path}: {len(images)} images for {len(same)} pairs '
                     f'(expected {2 * len(same)})')
  return images, same


def write_bin(path: str | os.PathLike, images: list[bytes] | list[np.ndarray],
              issame: list[bool] | np.ndarray, protocol: int = 4) -> None:
  """Writes an insightface-style ``.bin`` (used by the fixture generator)."""
  with open(path, 'wb') as f:
    pickle.dump((list(images), issame), f, protocol=protocol)
