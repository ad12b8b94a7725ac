"""Pytree paths and layer stacks, shared by the optimizer, sharding, checkpoints and the models.

- ``path_to_strings`` / ``path_name``: a jax key path as strings (``('heads', 'face',
  'classifier', 'kernel')``, ``'heads/face/classifier/kernel'``).
- ``LAYER_AXIS``: the nnx ``Variable`` metadata key that marks a parameter stacked over layers
  (the ViT's scanned blocks, ``docs/MODELS.md``). Its value is the index of the layer axis (0).
  Per-parameter rules that the reference applies to each layer's own tensor (torch's
  ``clip_grad_norm_`` per parameter, no decay of 1-D parameters) read it with ``layer_axis`` and
  apply the rule to each slice along that axis, so a scanned model trains like the loop.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

LAYER_AXIS = 'layer_axis'


def path_to_strings(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Turns a pytree key path into a tuple of strings: ('heads', 'face', 'classifier', 'kernel').

  Dict keys, attribute names and sequence indices become strings; the trailing ``value`` (or
  ``raw_value``) of an nnx Variable (how ``nnx.State`` leaves and their orbax metadata appear in
  key paths) is dropped.
  """
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  while names and names[-1] in ('value', 'raw_value'):
    names.pop()
  return tuple(names)


def path_name(path: tuple[Any, ...]) -> str:
  """``'/'.join(path_to_strings(path))``: a key path as one string."""
  return '/'.join(path_to_strings(path))


def layer_axis(leaf: Any) -> int | None:
  """The layer axis of an nnx Variable stacked over layers (``LAYER_AXIS`` metadata), else None."""
  get = getattr(leaf, 'get_metadata', None)
  if get is None:
    return None
  axis = get().get(LAYER_AXIS)
  return None if axis is None else int(axis)


def mark_layer_stack(tree: Any, axis: int = 0) -> None:
  """Marks every nnx Variable of ``tree`` (a Module or State) as stacked over layers on ``axis``."""
  for _, node in nnx.iter_graph(tree):
    if isinstance(node, nnx.Variable):
      node.set_metadata(LAYER_AXIS, axis)
