"""Tests of ufo_jax.losses against independent numpy references (formulas, brute-force loops)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufo_jax import losses

# Jitted entry points: one compile per shape instead of one per primitive in eager mode.
cosface = jax.jit(losses.cosface_loss, static_argnames=('scale', 'margin'))
triplet = jax.jit(losses.triplet_loss, static_argnames=('margin',))


def value_and_grad(fn, argnums=0):
  return jax.jit(jax.value_and_grad(fn, argnums))


def grad(fn):
  return jax.jit(jax.grad(fn))

# ---------------------------------------------------------------------------------------------
# numpy references (float64)


def np_normalize(x, axis):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_cosface(features, class_weights, labels, scale, margin, mask=None):
  """Returns (loss, d loss / d features, d loss / d class_weights) by the analytic formula."""
  f = np.asarray(features, np.float64)
  w = np.asarray(class_weights, np.float64)
  batch, num_classes = f.shape[0], w.shape[1]
  m = np.ones(batch) if mask is None else np.asarray(mask, np.float64)
  fn, wn = np_normalize(f, 1), np_normalize(w, 0)
  onehot = np.zeros((batch, num_classes))
  for i, y in enumerate(labels):
    if m[i] > 0:
      onehot[i, y] = 1.0
  z = scale * (fn @ wn - margin * onehot)
  zmax = z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
  per_example = lse - (onehot * z).sum(axis=1)
  denom = max(m.sum(), 1.0)
  loss = (m * per_example).sum() / denom
  softmax = np.exp(z - lse[:, None])
  dz = (softmax - onehot) * (m / denom)[:, None]
  dcos = scale * dz
  dfn, dwn = dcos @ wn.T, fn.T @ dcos
  # Backward through u = x / ||x||: dx = (du - u (u . du)) / ||x||.
  fnorm = np.linalg.norm(f, axis=1, keepdims=True)
  wnorm = np.linalg.norm(w, axis=0, keepdims=True)
  df = (dfn - fn * (fn * dfn).sum(axis=1, keepdims=True)) / fnorm
  dw = (dwn - wn * (wn * dwn).sum(axis=0, keepdims=True)) / wnorm
  return loss, df, dw


def np_triplet(features, labels, margin, mask=None):
  """Brute-force batch-hard triplet loss with explicit loops."""
  x = np.asarray(features, np.float64)
  n = len(x)
  m = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
  terms = []
  for a in range(n):
    if not m[a]:
      continue
    d_ap, d_an = None, None
    for j in range(n):
      if not m[j]:
        continue
      d = np.sqrt(max(np.sum((x[a] - x[j]) ** 2), 1e-12))
      if labels[j] == labels[a]:
        d_ap = d if d_ap is None else max(d_ap, d)
      else:
        d_an = d if d_an is None else min(d_an, d)
    if d_an is None:
      continue
    if margin > 0:
      terms.append(max(d_ap - d_an + margin, 0.0))
    else:
      terms.append(np.log1p(np.exp(d_ap - d_an)))
  return float(np.mean(terms)) if terms else 0.0


def random_inputs(batch=6, dim=5, num_classes=7, seed=0):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(batch, dim)).astype(np.float32)
  w = rng.normal(size=(dim, num_classes)).astype(np.float32)
  y = rng.integers(0, num_classes, size=batch)
  return f, w, y


# ---------------------------------------------------------------------------------------------
# CosFace


@pytest.mark.parametrize('scale,margin', [(50.0, 0.3), (30.0, 0.2), (20.0, 0.2), (1.0, 0.0)])
def test_cosface_value_and_grad_match_formula(scale, margin):
  f, w, y = random_inputs(seed=1)
  fn = lambda f, w: losses.cosface_loss(f, w, y, scale=scale, margin=margin)
  value, (df, dw) = value_and_grad(fn, argnums=(0, 1))(f, w)
  ref, ref_df, ref_dw = np_cosface(f, w, y, scale, margin)
  assert value.dtype == jnp.float32 and value.shape == ()
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(df, ref_df, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5)


def test_cosface_mask_ignores_rows_and_out_of_range_labels():
  f, w, y = random_inputs(batch=6, num_classes=7, seed=2)
  mask = np.array([True, False, True, True, False, True])
  y_bad = y.copy()
  y_bad[1], y_bad[4] = -1, 1000  # another task's labels: out of range, masked out.
  fn = lambda f, w, m: losses.cosface_loss(f, w, y_bad, scale=30.0, margin=0.2, mask=m)
  value, (df, dw) = value_and_grad(fn, argnums=(0, 1))(f, w, mask)
  ref, ref_df, ref_dw = np_cosface(f, w, y, 30.0, 0.2, mask)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(df, ref_df, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(df)[~mask] == 0)
  # The masked mean equals the plain mean over the selected rows.
  sub = cosface(f[mask], w, y[mask], scale=30.0, margin=0.2)
  np.testing.assert_allclose(value, sub, rtol=1e-5)
  # A float mask behaves like the bool one; an empty mask gives 0 and zero gradients.
  np.testing.assert_allclose(fn(f, w, mask.astype(np.float32)), value, rtol=1e-6)
  empty = np.zeros(6, bool)
  v0, (g0, _) = value_and_grad(fn, argnums=(0, 1))(f, w, empty)
  assert float(v0) == 0.0 and np.all(np.asarray(g0) == 0)


def test_cosface_stable_at_large_scale_and_low_precision():
  f, w, y = random_inputs(batch=4, num_classes=9, seed=3)
  scale = 1000.0  # exp(scale * cos) overflows float32 without the log-sum-exp shift.
  value, (df, dw) = value_and_grad(
      lambda f, w: losses.cosface_loss(f, w, y, scale=scale, margin=0.3), argnums=(0, 1))(f, w)
  ref, ref_df, _ = np_cosface(f, w, y, scale, 0.3)
  np.testing.assert_allclose(value, ref, rtol=1e-4)
  np.testing.assert_allclose(df, ref_df, rtol=1e-3, atol=1e-3)
  assert np.all(np.isfinite(dw))
  # bfloat16 inputs are computed in float32.
  v16 = cosface(f.astype(jnp.bfloat16), w.astype(jnp.bfloat16), y, scale=50.0,
                            margin=0.3)
  assert v16.dtype == jnp.float32
  ref16, _, _ = np_cosface(np.asarray(f.astype(jnp.bfloat16), np.float64),
                           np.asarray(w.astype(jnp.bfloat16), np.float64), y, 50.0, 0.3)
  np.testing.assert_allclose(v16, ref16, rtol=1e-4)
  # A zero feature (e.g. a padded row) keeps value and gradients finite.
  f0 = f.copy()
  f0[0] = 0.0
  v, g = value_and_grad(
      lambda f: losses.cosface_loss(f, w, y, scale=50.0, margin=0.3))(f0)
  assert np.isfinite(float(v)) and np.all(np.isfinite(g))


def test_cosface_padding_classes_are_left_out():
  f, w, y = random_inputs(batch=5, num_classes=6, seed=8)
  w_pad = np.concatenate([w, np.zeros((w.shape[0], 2), np.float32)], axis=1)
  fn = lambda f, w: losses.cosface_loss(f, w, y, scale=30.0, margin=0.2, num_classes=6)
  value, (df, dw) = value_and_grad(fn, argnums=(0, 1))(f, w_pad)
  ref, ref_df, ref_dw = np_cosface(f, w, y, 30.0, 0.2)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(df, ref_df, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw)[:, :6], ref_dw, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(dw)[:, 6:] == 0)
  # Without num_classes the zero columns would count as classes with cos = 0.
  assert abs(float(cosface(f, w_pad, y, scale=30.0, margin=0.2)) - ref) > 1e-3
  logits = losses.cosface_logits(-f, w_pad, num_classes=6)  # real cosines may all be < 0.
  assert np.all(np.argmax(logits, 1) < 6) and np.all(np.asarray(logits)[:, 6:] < -1e29)
  with pytest.raises(ValueError, match='num_classes'):
    losses.cosface_loss(f, w_pad, y, scale=30.0, margin=0.2, num_classes=9)


def test_cosface_logits_and_shape_errors():
  f, w, y = random_inputs(seed=4)
  ref_cos = np_normalize(f.astype(np.float64), 1) @ np_normalize(w.astype(np.float64), 0)
  np.testing.assert_allclose(losses.cosface_logits(f, w, scale=30.0), 30.0 * ref_cos,
                             rtol=1e-5, atol=1e-5)
  with_margin = losses.cosface_logits(f, w, y, scale=30.0, margin=0.2)
  expected = 30.0 * (ref_cos - 0.2 * np.eye(w.shape[1])[y])
  np.testing.assert_allclose(with_margin, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(losses.cosface_logits(f, w), 1),
                                np.argmax(ref_cos, 1))
  with pytest.raises(ValueError, match='dim'):
    losses.cosface_loss(f, w.T, y, scale=30.0, margin=0.2)
  with pytest.raises(ValueError, match='labels'):
    losses.cosface_loss(f, w, y[:3], scale=30.0, margin=0.2)
  with pytest.raises(ValueError, match='mask'):
    losses.cosface_loss(f, w, y, scale=30.0, margin=0.2, mask=np.ones(3, bool))


# ---------------------------------------------------------------------------------------------
# Triplet


def triplet_inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(10, 4)).astype(np.float32)
  y = np.array([0, 0, 1, 1, 2, 2, 2, 3, 4, 4])
  return f, y


@pytest.mark.parametrize('margin', [0.0, 0.3])
def test_triplet_matches_brute_force(margin):
  f, y = triplet_inputs(seed=5)
  value = triplet(f, y, margin=margin)
  assert value.dtype == jnp.float32 and value.shape == ()
  np.testing.assert_allclose(value, np_triplet(f, y, margin), rtol=1e-5)
  # With a mask: only masked anchors, positives and negatives count; rows 4..6 form a class
  # whose only masked member (4) still has negatives, row 7 (label 3) has no positive but itself.
  mask = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0], bool)
  value = triplet(f, y, margin=margin, mask=mask)
  np.testing.assert_allclose(value, np_triplet(f, y, margin, mask), rtol=1e-5)
  np.testing.assert_allclose(value, np_triplet(f[mask], y[mask], margin), rtol=1e-5)


def test_triplet_anchors_without_negatives_are_excluded():
  f, y = triplet_inputs(seed=6)
  # Masked examples all share one label: no anchor has a negative -> loss 0, zero grads.
  mask = y == 2
  v, g = value_and_grad(lambda f: losses.triplet_loss(f, y, mask=mask))(f)
  assert float(v) == 0.0 and np.all(np.asarray(g) == 0)
  # Masked-out rows with labels of the masked class must not act as negatives / positives.
  y2 = y.copy()
  y2[~mask] = -7
  np.testing.assert_allclose(triplet(f, y2, mask=mask), 0.0)
  # One anchor with no negative among masked examples: mean over the others only.
  f3 = f[:3]
  y3 = np.array([0, 0, 1])
  ref = np_triplet(f3, y3, 0.0)
  np.testing.assert_allclose(triplet(f3, y3), ref, rtol=1e-5)
  np.testing.assert_allclose(triplet(f, y, mask=np.zeros(10, bool)), 0.0)


@pytest.mark.parametrize('margin', [0.0, 0.3])
def test_triplet_gradient_finite_difference(margin):
  f, y = triplet_inputs(seed=7)
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1, 1], bool)
  g = np.asarray(grad(lambda f: losses.triplet_loss(f, y, margin=margin, mask=mask))(f))
  assert np.all(g[~mask] == 0)
  eps = 1e-4
  f64 = f.astype(np.float64)
  for i, j in [(0, 0), (2, 1), (4, 3), (6, 2), (9, 0)]:
    plus, minus = f64.copy(), f64.copy()
    plus[i, j] += eps
    minus[i, j] -= eps
    numeric = (np_triplet(plus, y, margin, mask) - np_triplet(minus, y, margin, mask)) / (2 * eps)
    np.testing.assert_allclose(g[i, j], numeric, rtol=2e-3, atol=2e-4)
  with pytest.raises(ValueError, match='margin'):
    losses.triplet_loss(f, y, margin=-0.1)


def test_combine_losses():
  per_task = {'face': {'cosface': jnp.float32(2.0)},
              'person': {'cosface': jnp.float32(1.0), 'triplet': jnp.float32(0.5)}}
  total, metrics = losses.combine_losses(per_task, {'face': 1.0, 'person': 2.0, 'sop': 9.0})
  np.testing.assert_allclose(total, 2.0 + 2.0 * 1.5)
  assert set(metrics) == {'face/cosface', 'face/total', 'person/cosface', 'person/triplet',
                          'person/total', 'total'}
  np.testing.assert_allclose(metrics['person/total'], 1.5)
  np.testing.assert_allclose(metrics['face/total'], 2.0)
  np.testing.assert_allclose(metrics['total'], total)
  with pytest.raises(ValueError, match='person'):
    losses.combine_losses(per_task, {'face': 1.0})


# ---------------------------------------------------------------------------------------------
# Class-sharded CosFace on 8 simulated devices (one subprocess for all multi-device checks).

_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from ufo_jax import losses

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    B, D, C = 8, 6, 24
    f = rng.normal(size=(B, D)).astype(np.float32)
    w = rng.normal(size=(D, C)).astype(np.float32)
    y = rng.integers(0, C, size=B)
    mask = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    y[2], y[5] = -3, 1000
    tl = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    kw = dict(scale=50.0, margin=0.3)

    def plain(f, w, y, m):
      return losses.cosface_loss(f, w, y, mask=m, **kw)

    def both(f, w, y, m):
      return plain(f, w, y, m) + losses.triplet_loss(f, tl, mask=m)

    ref_v, ref_g = jax.jit(jax.value_and_grad(plain, (0, 1)))(f, w, y, mask)
    ref_bv, ref_bg = jax.jit(jax.value_and_grad(both, (0, 1)))(f, w, y, mask)
    out = {}

    def record(name, v, g, rv, rg, w_sharded=None):
      out[name] = dict(
          value_err=abs(float(v) - float(rv)),
          grad_err=max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                       for a, b in zip(g, rg)),
          w_grad_spec=str(g[1].sharding.spec) if w_sharded else None)

    for mode, axes in ((AxisType.Auto, ('data', 'fsdp')), (AxisType.Explicit, 'fsdp')):
      mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(mode, mode))
      ws = jax.device_put(w, NamedSharding(mesh, P(None, axes)))
      batch_axes = ('data', 'fsdp')
      fs = jax.device_put(f, NamedSharding(mesh, P(batch_axes, None)))
      ys = jax.device_put(y, NamedSharding(mesh, P(batch_axes)))
      ms = jax.device_put(mask, NamedSharding(mesh, P(batch_axes)))
      tag = f'{mode.name}/{axes}'
      with jax.set_mesh(mesh):
        v, g = jax.jit(jax.value_and_grad(plain, (0, 1)))(fs, ws, ys, ms)
        record('gspmd/' + tag, v, g, ref_v, ref_g, True)
        sharded = lambda f, w, y, m: losses.cosface_loss_sharded(
            f, w, y, mesh=mesh, class_axes=axes, mask=m, **kw)
        v, g = jax.jit(jax.value_and_grad(sharded, (0, 1)))(fs, ws, ys, ms)
        record('shard_map/' + tag, v, g, ref_v, ref_g, True)
      if mode == AxisType.Auto:
        # Without a mesh context; the class weights replicated at the call: still exact.
        v, g = jax.jit(jax.value_and_grad(sharded, (0, 1)))(f, w, y, mask)
        record('shard_map_unplaced/' + tag, v, g, ref_v, ref_g)
        # 20 real classes padded with zero columns to 24 = 3 per device.
        w20 = np.concatenate([w[:, :20], np.zeros((D, 4), np.float32)], axis=1)
        y20 = np.where(mask, y % 20, y)
        rv, rg = jax.jit(jax.value_and_grad(plain, (0, 1)))(f, w[:, :20], y20, mask)
        padded = lambda f, w, y, m: losses.cosface_loss_sharded(
            f, w, y, mesh=mesh, class_axes=axes, mask=m, num_classes=20, **kw)
        v, g = jax.jit(jax.value_and_grad(padded, (0, 1)))(
            f, jax.device_put(w20, NamedSharding(mesh, P(None, axes))), y20, mask)
        out['padding_grad_max'] = float(np.abs(np.asarray(g[1])[:, 20:]).max())
        record('shard_map_padded/' + tag, v, (g[0], np.asarray(g[1])[:, :20]), rv, rg)
      else:
        v, g = jax.jit(jax.value_and_grad(both, (0, 1)))(fs, ws, ys, ms)
        record('cosface+triplet/' + tag, v, g, ref_bv, ref_bg)
    try:
      losses.cosface_loss_sharded(f, w[:, :20], y, mesh=mesh, class_axes=('data', 'fsdp'),
                                  mask=mask, **kw)
      out['indivisible_error'] = None
    except ValueError as e:
      out['indivisible_error'] = str(e)
    try:
      losses.cosface_loss_sharded(f, w, y, mesh=mesh, class_axes='model', mask=mask, **kw)
      out['axis_error'] = None
    except ValueError as e:
      out['axis_error'] = str(e)
    print('RESULT ' + json.dumps(out))
''')


def test_class_sharded_cosface_equals_unsharded_on_8_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', _MULTI_DEVICE_SCRIPT], env=env, cwd=repo,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')][-1]
  out = json.loads(line[len('RESULT '):])
  checks = {k: v for k, v in out.items() if isinstance(v, dict)}
  assert len(checks) == 7, sorted(checks)
  for name, r in checks.items():
    assert r['value_err'] < 1e-4, (name, r)
    assert r['grad_err'] < 1e-5, (name, r)
    if r['w_grad_spec'] is not None:  # The weight gradient stays class-sharded.
      assert 'fsdp' in r['w_grad_spec'], (name, r)
  assert out['padding_grad_max'] == 0.0
  assert out['indivisible_error'] and '20 classes' in out['indivisible_error']
  assert out['axis_error'] and 'model' in out['axis_error']


# ---------------------------------------------------------------------------------------------
# Numerics independent of the compute dtype


def _dot_generals(jaxpr):
  """Every dot_general equation of a (closed) jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found.extend(_dot_generals(sub))
  return found


@pytest.mark.parametrize('name', ['cosface', 'triplet'])
def test_loss_matmuls_are_float32_at_highest_precision(name):
  f, w, y = random_inputs(batch=8, dim=16, num_classes=5)
  f16, w16 = jnp.asarray(f, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  if name == 'cosface':
    fn = lambda f, w: losses.cosface_loss(f, w, y, scale=30.0, margin=0.2)  # noqa: E731
  else:
    fn = lambda f, w: losses.triplet_loss(f, y)  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(f16, w16).jaxpr
  dots = _dot_generals(jaxpr)
  assert dots, 'no matrix product found'
  for eqn in dots:
    precision = eqn.params['precision']
    precision = precision if isinstance(precision, tuple) else (precision, precision)
    assert precision == (jax.lax.Precision.HIGHEST,) * 2, eqn
    assert all(v.aval.dtype == jnp.float32 for v in eqn.invars), eqn


class _Bf16Backbone(nnx.Module):
  """A bfloat16 stand-in backbone (flatten, project): its features are bfloat16 arrays."""

  def __init__(self, in_features, width, *, rngs):
    self.width = width
    self.proj = nnx.Linear(in_features, width, dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, images):
    return self.proj(images.reshape(images.shape[0], -1).astype(jnp.bfloat16))


def test_bfloat16_model_losses_equal_float32_losses_of_its_features():
  """A bfloat16 model's training losses are the float32 losses of the features it produced."""
  from ufo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ufo_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from ufo_jax.models import multitask  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('ufo_tiny')
  settings = step_lib.task_losses(config)
  classes = {'face': 6, 'person': 5, 'product': 4, 'vehicle': 3}
  rngs = nnx.Rngs(0)
  model = multitask.MultiTaskModel(_Bf16Backbone(48, 32, rngs=rngs), classes, rngs=rngs)
  model.train()
  rng = np.random.default_rng(0)
  task = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0])
  labels = np.array([0, 5, 2, 1, 1, 4, 4, 3, 3, 0, 0, 2, 2, 1, 1, 5])
  images = jnp.asarray(rng.normal(size=(16, 4, 4, 3)) * 8.0, jnp.float32)  # norms ~30
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    outputs = model(images, jnp.asarray(task))
    _, metrics = step_lib.compute_losses(model, outputs, jnp.asarray(labels), settings)
    weights = {name: model.heads[name].class_weights_for_loss() for name in model.tasks}
    return outputs, weights, metrics

  assert model.backbone(images).dtype == jnp.bfloat16  # the model computes in bf16
  outputs, weights, metrics = run(state)
  for index, name in enumerate(model.tasks):
    rows = task == index
    cfg = config.tasks[name]
    emb = np.asarray(outputs[name]['embedding'], np.float32)[rows]
    want, _, _ = np_cosface(emb, np.asarray(weights[name]), labels[rows], cfg.cosface_scale,
                            cfg.cosface_margin)
    np.testing.assert_allclose(metrics[f'{name}/cosface'], want, rtol=1e-5, atol=1e-5)
    if cfg.triplet:
      feat = np.asarray(outputs[name]['feature'], np.float32)[rows]
      want = np_triplet(feat, labels[rows], cfg.triplet_margin)
      np.testing.assert_allclose(metrics[f'{name}/triplet'], want, rtol=1e-5, atol=1e-5)
