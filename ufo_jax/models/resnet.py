"""torchvision-style ResNet backbone (Flax NNX) returning the global-average-pooled feature.

Architecture as torchvision's `resnet{18,34,50,101,152}` (v1.5: in a bottleneck the stride sits
on the 3x3 conv), without the final `fc`: stem conv 7x7/2 (pad 3) -> BN -> ReLU -> max pool
3x3/2 (pad 1) -> four stages -> global average pool. Convolutions have no bias; BatchNorm uses
momentum 0.9 in Flax convention (torch momentum 0.1) and eps 1e-5. Parameter names follow
torchvision (`conv1`, `bn1`, `layer1.0.conv2`, `layer2.0.downsample.conv`, ...).

`model.train()` normalises with the batch statistics and updates the running averages
(`nnx.BatchStat`); `model.eval()` uses the running averages. Under `jax.jit` with a batch
sharded over devices the batch statistics are reduced over the global batch by the compiler,
so no explicit cross-device mean is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ['DEPTHS', 'ResNet', 'create_resnet']

# depth -> (block kind, blocks per stage), as torchvision.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}
_EXPANSION = {'basic': 1, 'bottleneck': 4}
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'), as torchvision.
_conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(cin: int, cout: int, k: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  pad = (k - 1) // 2
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  use_bias=False, dtype=dtype, kernel_init=_conv_init, rngs=rngs)


def _bn(ch: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(ch, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, rngs=rngs)


class Downsample(nnx.Module):
  """Projection shortcut: 1x1 conv (with the block's stride) -> BN."""

  def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
    self.bn = _bn(cout, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convs (stride on the first), residual, ReLU (ResNet-18/34)."""

  def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(planes, dtype=dtype, rngs=rngs)
    self.downsample = (Downsample(cin, planes, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or cin != planes else nnx.data(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride here, torchvision v1.5) -> 1x1 (x4 channels), residual, ReLU."""

  def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    cout = planes * _EXPANSION['bottleneck']
    self.conv1 = _conv(cin, planes, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(planes, cout, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = _bn(cout, dtype=dtype, rngs=rngs)
    self.downsample = (Downsample(cin, cout, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or cin != cout else nnx.data(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  """ResNet trunk: NHWC images `(B, H, W, 3)` -> pooled feature `(B, width)` in float32.

  Args:
    block: 'basic' or 'bottleneck'.
    layers: number of blocks in each of the four stages.
    rngs: `nnx.Rngs` with a 'params' stream.
    dtype: compute dtype; parameters and BN statistics stay float32.
  """

  def __init__(self, block: str, layers: Sequence[int], *, rngs: nnx.Rngs, dtype=jnp.float32):
    if block not in _EXPANSION:
      raise ValueError(f"unknown ResNet block {block!r}; expected 'basic' or 'bottleneck'")
    if len(layers) != 4 or any(int(n) < 1 for n in layers):
      raise ValueError(f'ResNet layers must be four positive block counts, got {layers!r}')
    cls = Bottleneck if block == 'bottleneck' else BasicBlock
    self.dtype = dtype
    self.width = 512 * _EXPANSION[block]
    self.conv1 = _conv(3, 64, 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(64, dtype=dtype, rngs=rngs)
    cin = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
      blocks = []
      for i in range(n):
        stride = 2 if (i == 0 and stage > 0) else 1
        blocks.append(cls(cin, planes, stride, dtype=dtype, rngs=rngs))
        cin = planes * _EXPANSION[block]
      setattr(self, f'layer{stage + 1}', nnx.List(blocks))

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'ResNet expects NHWC images (B, H, W, 3), got {tuple(images.shape)}')
    x = jax.nn.relu(self.bn1(self.conv1(images.astype(self.dtype))))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for blk in stage:
        x = blk(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def create_resnet(depth: int = 50, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ResNet:
  """torchvision ResNet-`depth` (18, 34, 50, 101, 152) without `fc`; `width` 512 or 2048."""
  if depth not in DEPTHS:
    raise ValueError(f'unsupported ResNet depth {depth!r}; expected one of {sorted(DEPTHS)}')
  block, layers = DEPTHS[depth]
  return ResNet(block, layers, rngs=rngs, dtype=dtype)
