"""Vision Transformer backbone (Flax NNX), architecturally identical to timm's `vit_*_patch*`.

The model maps NHWC float images `(B, H, W, 3)` to the class token after the final LayerNorm,
`(B, width)` in float32. Parameter paths read like timm's state dict (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.<i>.norm1`, `blocks.<i>.attn.qkv`, `blocks.<i>.attn.proj`,
`blocks.<i>.norm2`, `blocks.<i>.mlp.fc1`, `blocks.<i>.mlp.fc2`, `norm`) so that loading
pretrained weights (`ufo_jax.models.pretrained`) is a mechanical renaming.

Two layouts of the transformer blocks give the same function for the same weights:

- `scan_layers=False`: `blocks` is an `nnx.List` of `Block`s applied in a Python loop.
- `scan_layers=True`: `blocks` is a single `Block` whose parameters carry a leading layer axis
  (built with `nnx.vmap`), applied with `nnx.scan` (constant compile time in depth).

`get_vit_params` / `set_vit_params` convert between the two through a flat dict keyed by the
loop-layout names (`blocks.3.attn.qkv.kernel`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ufo_jax import pytree

__all__ = [
  'VARIANTS',
  'REMAT_POLICIES',
  'ViTConfig',
  'VisionTransformer',
  'attention_for_dtype',
  'create_vit',
  'drop_path_rates',
  'get_vit_params',
  'set_vit_params',
  'vit_param_shapes',
]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a ViT: token width, number of blocks, attention heads, MLP width, patch size."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int


VARIANTS: dict[str, ViTConfig] = {
  'Ti/16': ViTConfig(width=192, depth=12, heads=3, mlp_dim=768, patch=16),
  'S/16': ViTConfig(width=384, depth=12, heads=6, mlp_dim=1536, patch=16),
  'B/16': ViTConfig(width=768, depth=12, heads=12, mlp_dim=3072, patch=16),
  'L/16': ViTConfig(width=1024, depth=24, heads=16, mlp_dim=4096, patch=16),
  'H/14': ViTConfig(width=1280, depth=32, heads=16, mlp_dim=5120, patch=14),
  'H/16': ViTConfig(width=1280, depth=32, heads=16, mlp_dim=5120, patch=16),  # UFO's 'huge'
}

REMAT_POLICIES: dict[str, Any] = {
  'none': None,
  'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  'everything_saveable': jax.checkpoint_policies.everything_saveable,
}

ATTENTION_IMPLS = ('xla', 'cudnn', None)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN attention computes in
LN_EPS = 1e-6

_linear_init = nnx.initializers.truncated_normal(stddev=0.02)


def drop_path_rates(drop_path_rate: float, depth: int) -> tuple[float, ...]:
  """Per-block stochastic depth rates, linear from 0 to `drop_path_rate` (timm's linspace)."""
  return tuple(float(r) for r in np.linspace(0.0, drop_path_rate, depth))


_CUDNN_FALLBACK_LOGGED: set[str] = set()


def attention_for_dtype(attention_impl: str | None, dtype: Any) -> str | None:
  """``attention_impl`` for a computation in ``dtype``: 'cudnn' becomes 'xla' outside
  bfloat16 / float16 (cuDNN attention takes neither float32 nor anything else), logged once
  per dtype. A float32 evaluation or export of a run trained with 'cudnn' in bfloat16 thus
  computes the same attention with XLA's kernels."""
  if attention_impl != 'cudnn' or jnp.dtype(dtype) in CUDNN_DTYPES:
    return attention_impl
  name = jnp.dtype(dtype).name
  if name not in _CUDNN_FALLBACK_LOGGED:
    _CUDNN_FALLBACK_LOGGED.add(name)
    logging.warning("attention_impl='cudnn' computes in bfloat16 / float16 only: attention in "
                    "%s uses 'xla'", name)
  return 'xla'


class DropPath(nnx.Module):
  """Stochastic depth per sample (timm `DropPath`): drops a whole residual branch per example.

  The rate is a call argument (a Python float or a traced scalar) so that scanned blocks can
  use a different rate per layer. Active only when `deterministic` is False (`model.train()`);
  random bits come from the 'dropout' stream of the `nnx.Rngs` given at construction.
  """

  def __init__(self, *, rngs: nnx.Rngs | None, deterministic: bool = False):
    self.deterministic = deterministic
    self.rngs = rngs['dropout'].fork() if rngs is not None else nnx.data(None)

  def __call__(self, x: jax.Array, rate: float | jax.Array) -> jax.Array:
    if self.deterministic or self.rngs is None:
      return x
    if not isinstance(rate, jax.Array) and float(rate) == 0.0:
      return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, mask_shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))

  def set_view(self, deterministic: bool | None = None):
    """Hook for `nnx.view(model, deterministic=...)`."""
    if deterministic is not None:
      self.deterministic = deterministic


class PatchEmbed(nnx.Module):
  """Non-overlapping patches -> tokens: a conv with kernel = stride = patch (timm PatchEmbed)."""

  def __init__(self, patch: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.proj = nnx.Conv(
      3, width, (patch, patch), strides=(patch, patch), padding='VALID', use_bias=True,
      dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.lecun_normal(),
      rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)  # (B, gh, gw, D)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)  # row-major, as timm's flatten(2).transpose(1, 2)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout q|k|v, head-major)."""

  def __init__(self, width: int, heads: int, *, attention_impl: str | None, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.heads = heads
    self.attention_impl = attention_impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_linear_init, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, use_bias=True, **kw)
    self.proj = nnx.Linear(width, width, use_bias=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim) each
    # A model built for 'cudnn' in bfloat16 may compute in float32 later (the evaluation's
    # ``with_compute_dtype``): then XLA's attention.
    impl = attention_for_dtype(self.attention_impl, q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2."""

  def __init__(self, width: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_linear_init, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_dim, **kw)
    self.fc2 = nnx.Linear(mlp_dim, width, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block: x + dp(attn(norm1(x))); x + dp(mlp(norm2(x)))."""

  def __init__(self, cfg: ViTConfig, *, use_drop_path: bool, attention_impl: str | None,
               dtype, param_dtype, rngs: nnx.Rngs):
    ln = dict(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(cfg.width, **ln)
    self.attn = Attention(cfg.width, cfg.heads, attention_impl=attention_impl, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.width, **ln)
    self.mlp = Mlp(cfg.width, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.drop_path = DropPath(rngs=rngs if use_drop_path else None)

  def __call__(self, x: jax.Array, rate: float | jax.Array) -> jax.Array:
    x = x + self.drop_path(self.attn(self.norm1(x)), rate)
    return x + self.drop_path(self.mlp(self.norm2(x)), rate)


class VisionTransformer(nnx.Module):
  """timm-style ViT returning the final-LayerNorm class token `(B, width)` in float32.

  Args:
    cfg: the shape (see `VARIANTS`); `create_vit` picks it by name.
    image_size: square input side in pixels, a multiple of `cfg.patch`.
    drop_path_rate: stochastic depth rate of the last block (linear from 0 at block 0).
    rngs: `nnx.Rngs` with a 'params' stream and, when `drop_path_rate > 0`, a 'dropout' stream.
    dtype: compute dtype (e.g. bfloat16); `param_dtype`: storage dtype of the parameters.
    scan_layers: stack the blocks (leading layer axis) and apply them with `nnx.scan`.
    remat_policy: one of `REMAT_POLICIES`; anything but 'none' rematerialises each block.
    attention_impl: `implementation` of `jax.nn.dot_product_attention` ('xla', 'cudnn', None).
  """

  def __init__(self, cfg: ViTConfig, *, image_size: int, drop_path_rate: float = 0.0,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = False, remat_policy: str = 'none',
               attention_impl: str | None = 'xla'):
    _validate(cfg, image_size, drop_path_rate, rngs, dtype, remat_policy, attention_impl)
    self.cfg = cfg
    self.width = cfg.width
    self.image_size = image_size
    self.grid = image_size // cfg.patch
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy
    self.drop_path_rates = drop_path_rates(drop_path_rate, cfg.depth)
    use_dp = drop_path_rate > 0.0

    self.patch_embed = PatchEmbed(cfg.patch, cfg.width, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.cls_token = nnx.Param(
      nnx.initializers.normal(1e-6)(rngs.params(), (1, 1, cfg.width), param_dtype))
    self.pos_embed = nnx.Param(
      _linear_init(rngs.params(), (1, 1 + self.grid ** 2, cfg.width), param_dtype))

    def make_block(r: nnx.Rngs) -> Block:
      return Block(cfg, use_drop_path=use_dp, attention_impl=attention_impl, dtype=dtype,
                   param_dtype=param_dtype, rngs=r)

    if scan_layers:
      make_stacked = nnx.split_rngs(splits=cfg.depth)(nnx.vmap(make_block, in_axes=0, out_axes=0))
      self.blocks = make_stacked(rngs)
      pytree.mark_layer_stack(self.blocks)  # per-layer clipping and decay mask (optim.py)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(cfg.depth)])
    self.norm = nnx.LayerNorm(cfg.width, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    want = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f'VisionTransformer expects NHWC images of shape (B, {want[0]}, '
                       f'{want[1]}, 3), got {tuple(images.shape)}')
    x = self.patch_embed(images.astype(self.dtype))
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    x = self._blocks(x)
    return self.norm(x[:, 0]).astype(jnp.float32)  # LayerNorm is per token: only cls needed

  def _blocks(self, x: jax.Array) -> jax.Array:
    policy = REMAT_POLICIES[self.remat_policy]
    if self.scan_layers:
      def body(y, block, rate):
        return block(y, rate)
      if self.remat_policy != 'none':
        body = nnx.remat(body, policy=policy, prevent_cse=False)
      rates = jnp.asarray(self.drop_path_rates, jnp.float32)
      return nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)(x, self.blocks, rates)
    for block, rate in zip(self.blocks, self.drop_path_rates):
      if self.remat_policy != 'none':
        x = nnx.remat(lambda blk, y, r=rate: blk(y, r), policy=policy)(block, x)
      else:
        x = block(x, rate)
    return x


def _validate(cfg, image_size, drop_path_rate, rngs, dtype, remat_policy, attention_impl):
  if cfg.width % cfg.heads:
    raise ValueError(f'ViT width {cfg.width} is not divisible by heads {cfg.heads}')
  if not isinstance(image_size, int) or image_size <= 0 or image_size % cfg.patch:
    raise ValueError(f'image_size={image_size!r} must be a positive multiple of the patch size '
                     f'{cfg.patch}')
  if not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f'drop_path_rate={drop_path_rate} must be in [0, 1)')
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'unknown remat_policy {remat_policy!r}; expected one of '
                     f'{sorted(REMAT_POLICIES)}')
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f'unknown attention_impl {attention_impl!r}; expected one of '
                     f'{ATTENTION_IMPLS}')
  if attention_impl == 'cudnn' and jnp.dtype(dtype) not in CUDNN_DTYPES:
    raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16 or float16, got "
                     f'{jnp.dtype(dtype).name}')
  if drop_path_rate > 0.0 and 'dropout' not in rngs and 'default' not in rngs:
    raise ValueError("drop_path_rate > 0 needs a 'dropout' rng stream: pass "
                     'rngs=nnx.Rngs(params=..., dropout=...)')


def create_vit(variant: str, *, image_size: int, drop_path_rate: float = 0.0, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = False,
               remat_policy: str = 'none',
               attention_impl: str | None = 'xla') -> VisionTransformer:
  """Builds a ViT by name (a key of `VARIANTS`: 'Ti/16' ... 'H/16'); see `VisionTransformer`."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown ViT variant {variant!r}; expected one of {list(VARIANTS)}')
  return VisionTransformer(
    VARIANTS[variant], image_size=image_size, drop_path_rate=drop_path_rate, rngs=rngs,
    dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy,
    attention_impl=attention_impl)


def _param_variables(model: VisionTransformer) -> dict[str, nnx.Param]:
  """The model's `nnx.Param` objects keyed by their dotted graph path."""
  return {'.'.join(str(p) for p in path): node
          for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def get_vit_params(model: VisionTransformer) -> dict[str, jax.Array]:
  """Flat `{name: array}` of all parameters, in loop-layout names (`blocks.<i>.<...>`).

  For a scanned model the stacked block parameters are split along their layer axis, so the
  result is the same for both layouts with the same weights.
  """
  out = {}
  for name, var in _param_variables(model).items():
    value = var[...]
    if model.scan_layers and name.startswith('blocks.'):
      rest = name[len('blocks.'):]
      for i in range(model.cfg.depth):
        out[f'blocks.{i}.{rest}'] = value[i]
    else:
      out[name] = value
  return out


def set_vit_params(model: VisionTransformer, params: Mapping[str, Any]) -> None:
  """Assigns a flat loop-layout `{name: array}` (as from `get_vit_params`) to `model` in place.

  Every parameter of the model must be given with its exact shape; values are cast to the
  parameter's dtype and placed with its current sharding (so an FSDP-sharded model stays
  sharded; every host passes the full arrays). Works for both layouts (stacks per-block arrays
  for a scanned model).

  Raises:
    ValueError: naming the first missing/unknown name or mis-shaped array.
  """
  expected = vit_param_shapes(model)
  missing = sorted(set(expected) - set(params))
  unknown = sorted(set(params) - set(expected))
  if missing or unknown:
    raise ValueError(f'ViT parameter names do not match: missing {missing[:5]}, unknown '
                     f'{unknown[:5]}')
  for name, shape in expected.items():
    found = tuple(np.shape(params[name]))
    if found != shape:
      raise ValueError(f'ViT parameter {name!r}: expected shape {shape}, found {found}')
  for name, var in _param_variables(model).items():
    stacked = model.scan_layers and name.startswith('blocks.')
    if stacked:
      rest = name[len('blocks.'):]
      values = [params[f'blocks.{i}.{rest}'] for i in range(model.cfg.depth)]
    else:
      values = [params[name]]
    var.set_value(_place_like(values, var.get_value(), stack=stacked))


def _place_like(values: list[Any], old: jax.Array, *, stack: bool) -> jax.Array:
  """`values` (stacked if `stack`) as a jax.Array with the dtype and sharding of `old`.

  Host (NumPy) values are placed shard by shard (works across hosts); jax values, including
  tracers inside `jax.jit`, stay in jax.
  """
  if any(isinstance(v, jax.Array) for v in values):
    value = (jnp.stack(values) if stack else jnp.asarray(values[0])).astype(old.dtype)
    if isinstance(value, jax.core.Tracer) or isinstance(old, jax.core.Tracer):
      return value
    return jax.device_put(value, old.sharding)
  value = (np.stack(values) if stack else np.asarray(values[0])).astype(old.dtype)
  return jax.make_array_from_callback(value.shape, old.sharding, lambda index: value[index])


def vit_param_shapes(model: VisionTransformer) -> dict[str, tuple[int, ...]]:
  """Loop-layout parameter names and shapes of `model` (also for an abstract model)."""
  out = {}
  for name, var in _param_variables(model).items():
    shape = tuple(var.get_value().shape)
    if model.scan_layers and name.startswith('blocks.'):
      rest = name[len('blocks.'):]
      for i in range(model.cfg.depth):
        out[f'blocks.{i}.{rest}'] = shape[1:]
    else:
      out[name] = shape
  return out
