"""Small helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def host_copy(tree):
  """Host numpy copies of every leaf (typed rng keys as their raw key data)."""

  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.array(jax.device_get(x), copy=True)  # never a view of a buffer donated later

  return jax.tree.map(one, tree)


class FlatBackbone(nnx.Module):
  """A stand-in backbone: flatten and project (for head tests that need no ViT)."""

  def __init__(self, in_features, width, *, rngs):
    self.width = width
    self.proj = nnx.Linear(in_features, width, rngs=rngs)

  def __call__(self, images):
    return self.proj(images.reshape(images.shape[0], -1))


def assert_trees_equal(got, want):
  """The same tree structure and every leaf bit for bit (host copies; rng keys as key data)."""
  got, want = host_copy(got), host_copy(want)
  assert jax.tree.structure(got) == jax.tree.structure(want), (
      f'tree structures differ:\n{jax.tree.structure(got)}\n{jax.tree.structure(want)}')
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, w), g in zip(paths, jax.tree.leaves(got)):
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))
