"""Tests of ufo_jax.optim: schedule values, per-parameter clipping, the SGD update, lr scales."""

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from ufo_jax import optim, pytree


def optim_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      name='sgd', lr=0.2, momentum=0.0, nesterov=False, weight_decay=1e-4, grad_clip=5.0,
      clip_mode='per_param', warmup_fraction=0.1, final_lr_fraction=0.02))
  cfg.update(overrides)
  return cfg


def np_schedule(step, base, total, warmup, final):
  if step < warmup:
    return base * step / warmup
  t = min(step, total) - warmup
  end = final * base
  return end + (base - end) * 0.5 * (1 + math.cos(math.pi * t / (total - warmup)))


def test_schedule_key_values():
  sched = optim.create_learning_rate_schedule(base_lr=0.2, total_steps=1000)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(50), 0.1, rtol=1e-6)
  np.testing.assert_allclose(sched(100), 0.2, rtol=1e-6)
  np.testing.assert_allclose(sched(1000), 0.02 * 0.2, rtol=1e-5)
  np.testing.assert_allclose(sched(5000), 0.02 * 0.2, rtol=1e-5)
  for step in (1, 99, 101, 550, 999):
    np.testing.assert_allclose(sched(step), np_schedule(step, 0.2, 1000, 100, 0.02), rtol=1e-5)
  assert float(sched(999)) > 0.02 * 0.2
  # Other fractions, and no warmup at all.
  sched = optim.create_learning_rate_schedule(base_lr=1.0, total_steps=10, warmup_fraction=0.0,
                                              final_lr_fraction=0.5)
  np.testing.assert_allclose(sched(0), 1.0)
  np.testing.assert_allclose(sched(5), np_schedule(5, 1.0, 10, 0, 0.5), rtol=1e-6)
  np.testing.assert_allclose(sched(10), 0.5)
  with pytest.raises(ValueError, match='total_steps'):
    optim.create_learning_rate_schedule(base_lr=0.2, total_steps=0)
  with pytest.raises(ValueError, match='warmup_fraction'):
    optim.create_learning_rate_schedule(base_lr=0.2, total_steps=10, warmup_fraction=1.0)


def test_clip_by_norm_per_param_matches_numpy():
  rng = np.random.default_rng(0)
  grads = {'big': rng.normal(size=(4, 3)).astype(np.float32) * 10,
           'small': rng.normal(size=(5,)).astype(np.float32) * 0.01,
           'half': jnp.asarray(rng.normal(size=(3, 3)) * 10, jnp.bfloat16)}
  tx = optim.clip_by_norm_per_param(5.0)
  out, _ = tx.update(grads, tx.init(grads))
  for name, g in grads.items():
    g64 = np.asarray(g, np.float64)
    norm = np.linalg.norm(g64)
    expected = g64 * min(1.0, 5.0 / (norm + 1e-6))
    assert out[name].dtype == g.dtype
    tol = 1e-2 if g.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(out[name], np.float64), expected, rtol=tol, atol=tol)
  assert np.linalg.norm(out['big']) == pytest.approx(5.0, rel=1e-5)
  np.testing.assert_array_equal(out['small'], grads['small'])
  with pytest.raises(ValueError, match='grad_clip'):
    optim.clip_by_norm_per_param(-1.0)


def params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  params = {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  grads = {'w': jnp.asarray(rng.normal(size=(3, 4)) * 10, jnp.float32),  # norm > 5: clipped
           'b': jnp.asarray(rng.normal(size=(4,)) * 0.1, jnp.float32)}
  return params, grads


def clip_np(g, max_norm):
  return g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6))


def run_steps(tx, params, grads, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_momentum_0_step_is_manual_formula():
  params, grads = params_and_grads()
  tx, sched = optim.create_optimizer(optim_config(), total_steps=20)
  out = run_steps(tx, params, grads, 3)
  ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for step in range(3):
    lr = np_schedule(step, 0.2, 20, 2, 0.02)
    np.testing.assert_allclose(sched(step), lr, rtol=1e-6)
    for k in ref:
      ref[k] = ref[k] - lr * (clip_np(np.asarray(grads[k], np.float64), 5.0) + 1e-4 * ref[k])
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)


def test_momentum_global_clip_and_no_clip():
  params, grads = params_and_grads(seed=1)
  cfg = optim_config(momentum=0.9, clip_mode='global', grad_clip=2.0, weight_decay=0.01)
  tx, _ = optim.create_optimizer(cfg, total_steps=10)
  out = run_steps(tx, params, grads, 3)
  ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in ref.items()}
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  gnorm = math.sqrt(sum(np.sum(v ** 2) for v in g.values()))
  g = {k: v * min(1.0, 2.0 / gnorm) for k, v in g.items()}
  for step in range(3):  # torch.optim.SGD: buf = mu * buf + (g + wd * p); p -= lr * buf.
    lr = np_schedule(step, 0.2, 10, 1, 0.02)
    for k in ref:
      buf[k] = 0.9 * buf[k] + g[k] + 0.01 * ref[k]
      ref[k] = ref[k] - lr * buf[k]
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)
  # grad_clip 0 and None disable clipping; weight_decay 0 disables the decay.
  for clip in (0.0, None):
    tx, _ = optim.create_optimizer(optim_config(grad_clip=clip, weight_decay=0.0),
                                   total_steps=10)
    out = run_steps(tx, params, grads, 2)
    lr = np_schedule(1, 0.2, 10, 1, 0.02)
    for k in params:
      np.testing.assert_allclose(out[k], params[k] - lr * grads[k], rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_skip_1d():
  params, grads = params_and_grads(seed=2)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
  tx, _ = optim.create_optimizer(optim_config(weight_decay=0.5, weight_decay_mask='skip_1d'),
                                 total_steps=10)
  out = run_steps(tx, params, zeros, 2)
  lr = np_schedule(1, 0.2, 10, 1, 0.02)
  np.testing.assert_allclose(out['b'], params['b'])
  np.testing.assert_allclose(out['w'], params['w'] * (1 - lr * 0.5), rtol=1e-6)


class Head(nnx.Module):
  """A tiny task head: neck scale and classifier kernel."""

  def __init__(self, rngs):
    self.neck = nnx.BatchNorm(3, rngs=rngs)
    self.classifier = nnx.Linear(3, 5, use_bias=False, rngs=rngs)


class Model(nnx.Module):
  """Backbone layer plus a dict of heads, laid out as the multi-task model."""

  def __init__(self, rngs):
    self.backbone = nnx.Linear(2, 3, rngs=rngs)
    self.heads = nnx.Dict(face=Head(rngs), person=Head(rngs))


def test_lr_scale_fn_per_path_on_nnx_state_and_dicts():
  model = Model(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  seen = []

  def lr_scale(path):
    seen.append(path)
    if path[:2] == ('heads', 'face'):
      return 10.0
    if path[:2] == ('heads', 'person'):
      return 0
    return 1.0

  cfg = optim_config(grad_clip=0.0, weight_decay=0.0, warmup_fraction=0.0)
  tx, sched = optim.create_optimizer(cfg, total_steps=10, lr_scale_fn=lr_scale)
  state = tx.init(params)
  assert ('heads', 'face', 'classifier', 'kernel') in seen
  assert ('backbone', 'kernel') in seen
  assert all(isinstance(p, tuple) and all(isinstance(s, str) for s in p) for p in seen)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  lr = float(sched(0))
  flat = {pytree.path_to_strings(p): np.asarray(u)
          for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert len(flat) == 8  # backbone kernel + bias; per head: neck scale + bias, kernel.
  for path, u in flat.items():
    expected = -lr * {'face': 10.0, 'person': 0.0}.get(path[1], 1.0) if path[0] == 'heads' \
        else -lr
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=str(path))
  nnx.update(model, optax.apply_updates(params, updates))  # Updates keep the nnx.State layout.
  # Plain nested dicts and lists.
  tree = {'heads': {'face': {'kernel': jnp.ones(2)}}, 'blocks': [jnp.ones(2)]}
  paths = []
  tx = optim.scale_by_path(lambda p: paths.append(p) or 2.0)
  out, _ = tx.update(tree, tx.init(tree))
  assert ('heads', 'face', 'kernel') in paths and ('blocks', '0') in paths
  np.testing.assert_allclose(out['blocks'][0], 2.0)
  with pytest.raises(ValueError, match='-1.0 for parameter .heads/face/kernel.'):
    optim.scale_by_path(lambda p: -1.0 if p[0] == 'heads' else 1.0).init(tree)


@pytest.mark.parametrize('overrides,match', [
    (dict(name='adam'), 'config.optim.name'),
    (dict(clip_mode='layer'), 'config.optim.clip_mode'),
    (dict(weight_decay=-1e-4), 'config.optim.weight_decay'),
    (dict(grad_clip=-5.0), 'config.optim.grad_clip'),
    (dict(lr=0.0), 'config.optim.lr'),
    (dict(momentum=1.0), 'config.optim.momentum'),
    (dict(nesterov=True), 'config.optim.nesterov'),
    (dict(warmup_fraction=-0.1), 'config.optim.warmup_fraction'),
    (dict(final_lr_fraction=2.0), 'config.optim.final_lr_fraction'),
    (dict(weight_decay_mask='bias'), 'config.optim.weight_decay_mask'),
    (dict(learning_rate=0.1), 'unknown field'),
])
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    optim.create_optimizer(optim_config(**overrides), total_steps=10)


def test_config_forms_and_defaults():
  # A partial dict and an attribute object take the recipe's defaults for missing fields.
  for cfg in ({'lr': 0.1}, types.SimpleNamespace(lr=0.1)):
    parsed = optim.parse_optim_config(cfg)
    assert parsed.lr == 0.1 and parsed.grad_clip == 5.0 and parsed.weight_decay == 1e-4
    assert parsed.clip_mode == 'per_param' and parsed.momentum == 0.0
  _, sched = optim.create_optimizer({}, total_steps=100)
  np.testing.assert_allclose(sched(10), 0.2, rtol=1e-6)
  np.testing.assert_allclose(sched(100), 0.004, rtol=1e-5)


def _vit(scan):
  from ufo_jax.models import vit
  cfg = vit.ViTConfig(width=32, depth=3, heads=2, mlp_dim=64, patch=16)
  # Built in one jitted program: eager initialisation compiles every op on its own.
  return nnx.jit(lambda: vit.VisionTransformer(
      cfg, image_size=32, drop_path_rate=0.1, scan_layers=scan,
      rngs=nnx.Rngs(params=0, dropout=1)))()


def test_scanned_vit_clips_and_decays_layer_by_layer_like_the_loop():
  """Same weights and gradients: scan_layers=True updates every layer's tensor exactly as the
  loop layout does (per-layer clip norm, skip_1d mask on stacked biases and norms, lr scale)."""
  from ufo_jax import pytree
  from ufo_jax.models import vit
  loop, scan = _vit(False), _vit(True)
  weights = vit.get_vit_params(loop)
  rng = np.random.default_rng(0)
  # Layer 0 gets large gradients (clipped), layer 2 small ones (not): one layer's gradient
  # must not shrink another's.
  grads = {n: rng.normal(size=w.shape).astype(np.float32) * (
      30.0 if n.startswith('blocks.0.') else 0.01 if n.startswith('blocks.2.') else 1.0)
      for n, w in weights.items()}

  def state_of(model, values):  # a copy of the model's nnx.State holding `values`
    vit.set_vit_params(model, values)
    return jax.tree_util.tree_map(jnp.array, nnx.state(model, nnx.Param))

  trees = {m: (state_of(m, weights), state_of(m, grads)) for m in (loop, scan)}

  def step(model, **overrides):
    cfg = optim_config(grad_clip=1.0, momentum=0.9, weight_decay=0.5, warmup_fraction=0.0,
                       **overrides)
    tx, _ = optim.create_optimizer(cfg, total_steps=10,
                                   lr_scale_fn=lambda p: 0.5 if p[:1] == ('blocks',) else 1.0)
    params, g = trees[model]
    nnx.update(model, run_steps(tx, params, g, 2))
    return vit.get_vit_params(model)

  assert pytree.layer_axis(trees[scan][0]['blocks']['attn']['qkv']['kernel']) == 0
  want, got = step(loop, weight_decay_mask='skip_1d'), step(scan, weight_decay_mask='skip_1d')
  assert set(want) == set(got)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # The clipping is active and per layer: layer 0's qkv gradient is cut to norm 1, layer 2's
  # small one is untouched.
  clipped, _ = optim.clip_by_norm_per_param(1.0).update(trees[scan][1], None)
  qkv = np.asarray(clipped['blocks']['attn']['qkv']['kernel'].get_value())
  np.testing.assert_allclose(np.linalg.norm(qkv[0]), 1.0, rtol=1e-4)
  np.testing.assert_allclose(qkv[2], grads['blocks.2.attn.qkv.kernel'], rtol=1e-6)
  mask = optim.decay_mask_skip_1d(trees[scan][0])
  assert not mask['blocks']['mlp']['fc1']['bias'].get_value()
  assert mask['blocks']['mlp']['fc1']['kernel'].get_value()
  # Gradients taken by nnx keep the marks (the train step clips nnx.value_and_grad's output).
  grad = nnx.grad(lambda m: jnp.sum(m.blocks.mlp.fc1.bias[...] ** 2))(scan)
  assert pytree.layer_axis(grad['blocks']['mlp']['fc1']['bias']) == 0
