"""Tests of the NNX ViT backbone against timm's parameter counts and a float64 NumPy reference."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from ufo_jax.models import vit

TINY = vit.ViTConfig(width=32, depth=2, heads=2, mlp_dim=64, patch=8)
SIZE = 16


def _forward_fn(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


# graphdef is static: models of the same structure share one compiled function.
_forward = jax.jit(_forward_fn, static_argnums=0)


def forward(model, x):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, x))


def tiny(seed=0, **kw):
  kw.setdefault('rngs', nnx.Rngs(params=seed, dropout=seed + 1))
  return vit.VisionTransformer(TINY, image_size=SIZE, **kw)


@pytest.fixture(scope='module')
def tiny_params():
  """Random (non-default) weights in loop-layout names, as float64 NumPy."""
  model = vit.VisionTransformer(TINY, image_size=SIZE, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  return {k: rng.normal(0.0, 0.3 if k.endswith(('kernel', 'bias', 'embed', 'token')) else 1.0,
                        np.shape(v)) + (1.0 if k.endswith('scale') else 0.0)
          for k, v in vit.get_vit_params(model).items()}


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(1).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)


def ref_forward(p, x, cfg=TINY, branch_scale=None):
  """float64 NumPy ViT: patchify + matmul, LN, softmax attention, erf GELU, class token.

  branch_scale[i] = (attn, mlp) multipliers of block i's residual branches (drop path).
  """
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  ps, d, g = cfg.patch, cfg.width, h // cfg.patch
  patches = x.reshape(b, g, ps, g, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  tok = patches @ p['patch_embed.proj.kernel'].reshape(-1, d) + p['patch_embed.proj.bias']
  cls = np.broadcast_to(p['cls_token'], (b, 1, d))
  z = np.concatenate([cls, tok], axis=1) + p['pos_embed']

  def ln(y, name):
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + 1e-6) * p[name + '.scale'] + p[name + '.bias']

  hd = d // cfg.heads
  for i in range(cfg.depth):
    s_attn, s_mlp = (1.0, 1.0) if branch_scale is None else branch_scale[i]
    q_ = f'blocks.{i}.'
    y = ln(z, q_ + 'norm1')
    qkv = y @ p[q_ + 'attn.qkv.kernel'] + p[q_ + 'attn.qkv.bias']
    q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(b, -1, cfg.heads, hd) for j in range(3))
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, -1, d)
    z = z + s_attn * (o @ p[q_ + 'attn.proj.kernel'] + p[q_ + 'attn.proj.bias'])
    y = ln(z, q_ + 'norm2') @ p[q_ + 'mlp.fc1.kernel'] + p[q_ + 'mlp.fc1.bias']
    y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))
    z = z + s_mlp * (y @ p[q_ + 'mlp.fc2.kernel'] + p[q_ + 'mlp.fc2.bias'])
  return ln(z, 'norm')[:, 0]


def count_params(model) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def formula_params(cfg: vit.ViTConfig, image_size: int) -> int:
  d, m, p = cfg.width, cfg.mlp_dim, cfg.patch
  tokens = 1 + (image_size // p) ** 2
  block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
  return p * p * 3 * d + d + d + tokens * d + cfg.depth * block + 2 * d


def test_param_counts_match_timm_without_head():
  abstract = lambda v, s, scan: nnx.eval_shape(
    lambda: vit.create_vit(v, image_size=s, rngs=nnx.Rngs(0), scan_layers=scan))
  # timm vit_large_patch16_384: 304,715,752 with the 1000-class head (1024*1000 + 1000).
  assert count_params(abstract('L/16', 384, True)) == 304_715_752 - 1_025_000 == 303_690_752
  # timm vit_base_patch16_224: 86,567,656 with the 769,000-parameter head.
  assert count_params(abstract('B/16', 224, True)) == 86_567_656 - 769_000 == 85_798_656
  for name, want in [('Ti/16', 5_717_416 - 193_000), ('S/16', 22_050_664 - 385_000),
                     ('H/14', 632_045_800 - 1_281_000)]:
    assert count_params(abstract(name, 224, True)) == want, name
  assert count_params(abstract('Ti/16', 224, False)) == 5_717_416 - 193_000  # loop layout
  for name, cfg in vit.VARIANTS.items():
    assert formula_params(cfg, 224) == count_params(abstract(name, 224, True)), name
  shapes = vit.vit_param_shapes(abstract('H/14', 224, True))
  assert shapes['patch_embed.proj.kernel'] == (14, 14, 3, 1280)
  assert shapes['pos_embed'] == (1, 257, 1280) and 'blocks.31.mlp.fc2.bias' in shapes


def test_variant_table_and_feature_shape():
  assert {k: (c.width, c.depth, c.heads, c.mlp_dim, c.patch) for k, c in vit.VARIANTS.items()} == {
    'Ti/16': (192, 12, 3, 768, 16), 'S/16': (384, 12, 6, 1536, 16),
    'B/16': (768, 12, 12, 3072, 16), 'L/16': (1024, 24, 16, 4096, 16),
    'H/14': (1280, 32, 16, 5120, 14), 'H/16': (1280, 32, 16, 5120, 16)}
  model = nnx.eval_shape(lambda: vit.create_vit('Ti/16', image_size=32, rngs=nnx.Rngs(0)))
  assert model.width == 192
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32))
  assert out.shape == (3, 192) and out.dtype == jnp.float32


def test_forward_matches_numpy_reference(tiny_params, images):
  model = tiny()
  vit.set_vit_params(model, tiny_params)
  model.eval()
  got = forward(model, images)
  assert got.dtype == np.float32 and got.shape == (4, TINY.width)
  np.testing.assert_allclose(got, ref_forward(tiny_params, images), rtol=1e-4, atol=1e-4)


def _loss_and_grads(model, x):
  """Loss sum(features^2) and its gradient in loop-layout names (any layout), under jax.jit."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def value_and_grad(params):
    return jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2))(params)

  loss, grads = value_and_grad(params)
  return loss, vit.get_vit_params(nnx.merge(graphdef, grads, rest))


def test_scan_equals_loop_with_and_without_remat(tiny_params, images):
  variants = [(False, 'none'), (True, 'nothing_saveable')]
  results = []
  for scan, policy in variants:
    model = tiny(scan_layers=scan, remat_policy=policy)
    vit.set_vit_params(model, tiny_params)
    model.eval()
    results.append(_loss_and_grads(model, images))
  scanned = tiny(scan_layers=True)
  state = nnx.state(scanned, nnx.Param)
  assert state['blocks']['attn']['qkv']['kernel'].shape == (TINY.depth, 32, 96)
  loss0, grads0 = results[0]
  assert set(grads0) == set(tiny_params)
  for (scan, policy), (loss, grads) in zip(variants[1:], results[1:]):
    np.testing.assert_allclose(loss, loss0, rtol=1e-5, err_msg=f'{scan} {policy}')
    for k in grads0:
      np.testing.assert_allclose(grads[k], grads0[k], rtol=1e-4, atol=1e-5,
                                 err_msg=f'{scan} {policy} {k}')
  # Layout conversion through the flat dict is exact.
  loop = tiny(seed=5)
  vit.set_vit_params(scanned, tiny_params)
  vit.set_vit_params(loop, vit.get_vit_params(scanned))
  for k, v in vit.get_vit_params(loop).items():
    np.testing.assert_array_equal(v, np.asarray(tiny_params[k], np.float32))


def test_drop_path_module_is_per_sample_with_keep_rate():
  dp = vit.DropPath(rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((20000, 3, 4))
  traced = nnx.jit(lambda m, y, r: m(y, r))
  for out in (dp(x, 0.3), traced(dp, x, jnp.float32(0.3))):  # static and traced rate
    flat = np.asarray(out).reshape(len(out), -1)
    assert np.all(flat == flat[:, :1])  # one decision per example
    kept = flat[:, 0] > 0
    np.testing.assert_allclose(flat[kept, 0], 1 / 0.7, rtol=1e-6)  # kept: scaled by 1/keep
    assert abs(kept.mean() - 0.7) < 0.02  # binomial std 0.0032
    assert abs(flat.mean() - 1.0) < 0.03  # unbiased: E[mask / keep] = 1
  first = np.asarray(dp(x, 0.3))
  assert not np.array_equal(first, np.asarray(dp(x, 0.3)))  # the stream advances
  np.testing.assert_array_equal(np.asarray(dp(x, 0.0)), np.asarray(x))
  dp.eval()
  np.testing.assert_array_equal(np.asarray(dp(x, 0.5)), np.asarray(x))


@pytest.mark.parametrize('scan,policy', [(False, 'dots_saveable'), (True, 'nothing_saveable')])
def test_drop_path_in_model_under_jit_split_merge(tiny_params, images, scan, policy):
  """Per-example drop path in train mode, under jit with split/merge, remat and scan."""
  model = tiny(scan_layers=scan, drop_path_rate=0.5, remat_policy=policy)
  assert model.drop_path_rates == (0.0, 0.5)  # linspace(0, rate, depth)
  vit.set_vit_params(model, tiny_params)
  batch = np.repeat(images[:1], 64, axis=0)
  # Block 0 has rate 0; block 1 drops each branch per example with p=0.5, scale 2 when kept.
  combos = list(itertools.product((0.0, 2.0), repeat=2))
  refs = np.stack([ref_forward(tiny_params, batch[:1], branch_scale=[(1, 1), c])[0]
                   for c in combos])

  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    m = nnx.merge(graphdef, state)
    return m(x), nnx.state(m)  # rng counts advanced inside jit

  patterns = []
  for _ in range(2):
    out, state = step(state, batch)
    err = np.abs(np.asarray(out)[:, None, :] - refs[None]).max(-1)  # (64, 4)
    assert np.all(err.min(1) < 1e-3)  # every example is one of the four drop patterns
    which = err.argmin(1)
    assert len(set(which)) >= 3
    patterns.append(which)
  assert not np.array_equal(patterns[0], patterns[1])

  model.eval()
  np.testing.assert_allclose(forward(model, batch[:2]), ref_forward(tiny_params, batch[:2]),
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_is_close_and_params_stay_float32(tiny_params, images):
  model = tiny(dtype=jnp.bfloat16)
  vit.set_vit_params(model, tiny_params)
  model.eval()
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  got = forward(model, images)
  assert got.dtype == np.float32
  want = ref_forward(tiny_params, images)
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_invalid_options_raise_clear_errors():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match='unknown ViT variant'):
    vit.create_vit('M/16', image_size=224, rngs=rngs)
  with pytest.raises(ValueError, match='multiple of the patch size 16'):
    vit.create_vit('Ti/16', image_size=40, rngs=rngs)
  with pytest.raises(ValueError, match='unknown remat_policy'):
    vit.create_vit('Ti/16', image_size=32, rngs=rngs, remat_policy='dots')
  with pytest.raises(ValueError, match='unknown attention_impl'):
    vit.create_vit('Ti/16', image_size=32, rngs=rngs, attention_impl='flash')
  with pytest.raises(ValueError, match='cudnn'):
    vit.create_vit('Ti/16', image_size=32, rngs=rngs, attention_impl='cudnn')
  with pytest.raises(ValueError, match='dropout'):
    vit.create_vit('Ti/16', image_size=32, rngs=nnx.Rngs(params=0), drop_path_rate=0.1)
  with pytest.raises(ValueError, match='drop_path_rate'):
    vit.create_vit('Ti/16', image_size=32, rngs=rngs, drop_path_rate=1.5)
  with pytest.raises(ValueError, match='divisible by heads'):
    vit.VisionTransformer(dataclasses.replace(TINY, heads=3), image_size=SIZE, rngs=rngs)


def test_bad_inputs_and_params_raise(tiny_params):
  model = tiny()
  with pytest.raises(ValueError, match=r'\(B, 16, 16, 3\)'):
    model(jnp.zeros((1, 32, 32, 3)))
  bad = dict(tiny_params)
  bad['blocks.1.attn.qkv.kernel'] = np.zeros((32, 32))
  with pytest.raises(ValueError, match=r"blocks.1.attn.qkv.kernel.*\(32, 96\).*\(32, 32\)"):
    vit.set_vit_params(model, bad)
  del bad['blocks.1.attn.qkv.kernel']
  with pytest.raises(ValueError, match='missing'):
    vit.set_vit_params(model, bad)
