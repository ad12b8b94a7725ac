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
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


class FlatBackbone(nnx.Module):
  """A stand-in backbone: flatten and project (for head tests that need no ViT)."""

  def __init__(self, in_features, width, *, rngs):
    self.width = width
    self.proj = nnx.Linear(in_features, width, rngs=rngs)

  def __call__(self, images):
    return self.proj(images.reshape(images.shape[0], -1))
