"""Tests of the torchvision-style NNX ResNet: parameter counts, block maths, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufo_jax.models import resnet


def count_params(model) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_param_counts_match_torchvision_without_fc():
  # torchvision totals minus fc (512*1000 + 1000 = 513,000; 2048*1000 + 1000 = 2,049,000).
  want = {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}
  for depth, n in want.items():
    model = nnx.eval_shape(lambda d=depth: resnet.create_resnet(d, rngs=nnx.Rngs(0)))
    assert count_params(model) == n, depth
    assert model.width == (512 if depth < 50 else 2048)
  assert want[50] == 23_508_032
  assert resnet.DEPTHS == {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
                           50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3)),
                           152: ('bottleneck', (3, 8, 36, 3))}
  model = nnx.eval_shape(lambda: resnet.create_resnet(50, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 2048) and out.dtype == jnp.float32
  bn = model.layer3[0].bn2
  assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)


def _apply_fn(graphdef, state, x):
  model = nnx.merge(graphdef, state)
  return model(x), nnx.state(model)


# The graphdef carries the mode (BatchNorm.use_running_average): static, split per mode.
_apply = jax.jit(_apply_fn, static_argnums=0)


def apply(model, x, state=None):
  """(features, updated state) of `model` in its current mode, optionally with `state`."""
  graphdef, own = nnx.split(model)
  return _apply(graphdef, own if state is None else state, x)


@pytest.fixture(scope='module')
def tiny():
  """One bottleneck block per stage: every code path of ResNet-50, few ops to compile."""
  return resnet.ResNet('bottleneck', (1, 1, 1, 1), rngs=nnx.Rngs(0))


def _conv(x, w, stride, pad):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


def test_bottleneck_matches_reference_with_stride_on_3x3(tiny):
  block = tiny.layer2[0]  # 256 -> 512 channels, stride 2, projection shortcut
  rng = np.random.default_rng(0)
  for bn in (block.bn1, block.bn2, block.bn3, block.downsample.bn):
    n = bn.scale[...].shape[0]
    bn.mean[...] = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, n), jnp.float32)
  block.eval()
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 256)), jnp.float32)

  def bn_ref(y, bn):
    return (y - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5) * bn.scale[...] + bn.bias[...]

  assert block.conv1.kernel[...].shape == (1, 1, 256, 128)
  y = jax.nn.relu(bn_ref(_conv(x, block.conv1.kernel[...], 1, 0), block.bn1))
  y = jax.nn.relu(bn_ref(_conv(y, block.conv2.kernel[...], 2, 1), block.bn2))  # v1.5
  y = bn_ref(_conv(y, block.conv3.kernel[...], 1, 0), block.bn3)
  short = bn_ref(_conv(x, block.downsample.conv.kernel[...], 2, 0), block.downsample.bn)
  want = jax.nn.relu(y + short)
  got = nnx.jit(lambda blk, y: blk(y))(block, x)
  assert got.shape == (2, 4, 4, 512)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  block.train()


def test_batchnorm_train_and_eval_modes(tiny):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  x2 = x.copy()
  x2[1:] = rng.normal(size=(3, 32, 32, 3))  # same first example, other batch-mates

  tiny.train()
  out_train, new_state = apply(tiny, x)
  out_train2, _ = apply(tiny, x2)
  assert out_train.shape == (4, 2048) and out_train.dtype == jnp.float32
  # Train mode normalises with batch statistics: example 0 depends on the others.
  assert np.abs(np.asarray(out_train[0] - out_train2[0])).max() > 1e-3
  # Running averages: new = 0.9 * old + 0.1 * batch statistic (old mean 0, var 1).
  stem = np.asarray(tiny.conv1(jnp.asarray(x)), np.float64)
  bn1 = new_state['bn1']
  np.testing.assert_allclose(bn1['mean'][...], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn1['var'][...], 0.9 + 0.1 * stem.var((0, 1, 2)), rtol=1e-4)

  tiny.eval()
  nnx.update(tiny, new_state)
  out_eval, after = apply(tiny, x)
  out_eval2, _ = apply(tiny, x2)
  # Eval mode uses the running averages: per-example, and the statistics stay put.
  np.testing.assert_allclose(np.asarray(out_eval[0]), np.asarray(out_eval2[0]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(after['bn1']['mean'][...]),
                                np.asarray(new_state['bn1']['mean'][...]))
  assert np.abs(np.asarray(out_eval - out_train)).max() > 1e-3
  tiny.train()


def test_bfloat16_compute(tiny):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
  half = resnet.ResNet('bottleneck', (1, 1, 1, 1), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  nnx.update(half, nnx.state(tiny))
  for m in (tiny, half):
    m.eval()
  want, _ = apply(tiny, x)
  got, _ = apply(half, x)
  assert got.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(half, nnx.Param)))
  assert np.abs(np.asarray(got - want)).max() < 0.05 * np.abs(np.asarray(want)).max()
  tiny.train()


def test_errors(tiny):
  with pytest.raises(ValueError, match='unsupported ResNet depth 42'):
    resnet.create_resnet(42, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='block'):
    resnet.ResNet('wide', (1, 1, 1, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='four positive'):
    resnet.ResNet('basic', (1, 1, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'NHWC images \(B, H, W, 3\)'):
    tiny(jnp.zeros((1, 3, 32, 32)))
