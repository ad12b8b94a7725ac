"""Tests of loading timm `.safetensors` and big_vision / AugReg `.npz` ViT weights."""

import jax
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx
from safetensors.numpy import save_file

from ufo_jax.models import pretrained, vit

TINY = vit.ViTConfig(width=32, depth=2, heads=2, mlp_dim=64, patch=8)
D, H, M = TINY.width, TINY.heads, TINY.mlp_dim


def _forward_fn(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


_forward = jax.jit(_forward_fn, static_argnums=0)


def forward(model, x):
  model.eval()
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, x))


def tiny(seed, image_size=16, scan=False):
  return vit.VisionTransformer(TINY, image_size=image_size, rngs=nnx.Rngs(seed),
                               scan_layers=scan)


@pytest.fixture(scope='module')
def source():
  """A model with random weights (LayerNorm scales too) and its params as NumPy."""
  model = tiny(0)
  rng = np.random.default_rng(0)
  params = {k: rng.normal(0.0, 0.3, np.shape(v)).astype(np.float32)
            for k, v in vit.get_vit_params(model).items()}
  vit.set_vit_params(model, params)
  return model, params


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)


def to_timm(p):
  """Written independently of the loader: torch layouts (Linear (out, in), conv OIHW)."""
  sd = {'cls_token': p['cls_token'], 'pos_embed': p['pos_embed'],
        'patch_embed.proj.weight': p['patch_embed.proj.kernel'].transpose(3, 2, 0, 1),
        'patch_embed.proj.bias': p['patch_embed.proj.bias'],
        'norm.weight': p['norm.scale'], 'norm.bias': p['norm.bias'],
        'head.weight': np.ones((10, D), np.float32), 'head.bias': np.zeros(10, np.float32)}
  for i in range(TINY.depth):
    b = f'blocks.{i}.'
    for n in ('norm1', 'norm2'):
      sd[b + n + '.weight'] = p[b + n + '.scale']
      sd[b + n + '.bias'] = p[b + n + '.bias']
    for n in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
      sd[b + n + '.weight'] = p[b + n + '.kernel'].T
      sd[b + n + '.bias'] = p[b + n + '.bias']
  # safetensors.numpy.save_file writes the raw buffer: transposed views must be made contiguous.
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def to_npz(p, *, big_vision=False, stacked=False, prefix=''):
  """AugReg (vision_transformer) or big_vision key names and flax layouts."""
  mha, mlp, ln2 = (('MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_1') if big_vision
                   else ('MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2'))
  out = {'embedding/kernel': p['patch_embed.proj.kernel'],
         'embedding/bias': p['patch_embed.proj.bias'], 'cls': p['cls_token'],
         ('pos_embedding' if big_vision else 'Transformer/posembed_input/pos_embedding'):
           p['pos_embed'],
         'Transformer/encoder_norm/scale': p['norm.scale'],
         'Transformer/encoder_norm/bias': p['norm.bias'],
         'head/kernel': np.ones((D, 7), np.float32), 'head/bias': np.zeros(7, np.float32)}
  blocks = []
  for i in range(TINY.depth):
    b = f'blocks.{i}.'
    qkv_k, qkv_b = p[b + 'attn.qkv.kernel'], p[b + 'attn.qkv.bias']
    blk = {'LayerNorm_0/scale': p[b + 'norm1.scale'], 'LayerNorm_0/bias': p[b + 'norm1.bias'],
           f'{ln2}/scale': p[b + 'norm2.scale'], f'{ln2}/bias': p[b + 'norm2.bias'],
           f'{mha}/out/kernel': p[b + 'attn.proj.kernel'].reshape(H, D // H, D),
           f'{mha}/out/bias': p[b + 'attn.proj.bias'],
           f'{mlp}/Dense_0/kernel': p[b + 'mlp.fc1.kernel'],
           f'{mlp}/Dense_0/bias': p[b + 'mlp.fc1.bias'],
           f'{mlp}/Dense_1/kernel': p[b + 'mlp.fc2.kernel'],
           f'{mlp}/Dense_1/bias': p[b + 'mlp.fc2.bias']}
    for j, n in enumerate(('query', 'key', 'value')):
      blk[f'{mha}/{n}/kernel'] = qkv_k[:, j * D:(j + 1) * D].reshape(D, H, D // H)
      blk[f'{mha}/{n}/bias'] = qkv_b[j * D:(j + 1) * D].reshape(H, D // H)
    blocks.append(blk)
  if stacked:
    out.update({f'Transformer/encoderblock/{k}': np.stack([blk[k] for blk in blocks])
                for k in blocks[0]})
  else:
    out.update({f'Transformer/encoderblock_{i}/{k}': v
                for i, blk in enumerate(blocks) for k, v in blk.items()})
  return {prefix + k: v for k, v in out.items()}


def assert_params_equal(model, params):
  got = vit.get_vit_params(model)
  assert set(got) == set(params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(got[k]), params[k], err_msg=k)


def test_timm_safetensors_round_trip(tmp_path, source, images):
  model, params = source
  path = tmp_path / 'vit.safetensors'
  save_file(to_timm(params), str(path))
  fresh = tiny(7, scan=True)  # the other block layout
  summary = pretrained.load_vit_weights(fresh, path)
  assert summary['format'] == 'timm' and summary['pos_embed_resized'] is None
  assert summary['ignored'] == ['head.bias', 'head.weight']
  assert len(summary['loaded']) == 4 + 2 + 12 * TINY.depth  # embeddings, final norm, blocks
  assert_params_equal(fresh, params)
  np.testing.assert_allclose(forward(fresh, images), forward(model, images), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('layout', ['timm_mae', 'mae_global_pool', 'mae_pretrain_full'])
def test_mae_safetensors_layouts(tmp_path, source, images, layout):
  """MAE weights: no classifier; the final norm possibly as fc_norm; possibly the decoder."""
  model, params = source
  sd = to_timm(params)
  del sd['head.weight'], sd['head.bias']  # MAE encoders have no trained classifier
  if layout == 'mae_global_pool':  # the MAE fine-tuning layout: fc_norm instead of norm
    sd['fc_norm.weight'], sd['fc_norm.bias'] = sd.pop('norm.weight'), sd.pop('norm.bias')
  if layout == 'mae_pretrain_full':  # the whole autoencoder: decoder and mask token too
    sd.update({'mask_token': np.zeros((1, 1, 16), np.float32),
               'decoder_embed.weight': np.ones((16, D), np.float32),
               'decoder_pos_embed': np.zeros((1, 5, 16), np.float32),
               'decoder_blocks.0.attn.qkv.weight': np.ones((48, 16), np.float32),
               'decoder_norm.weight': np.ones(16, np.float32),
               'decoder_pred.weight': np.ones((8 * 8 * 3, 16), np.float32)})
  path = tmp_path / f'{layout}.safetensors'
  save_file(sd, str(path))
  fresh = tiny(5, scan=True)
  summary = pretrained.load_vit_weights(fresh, path)
  assert summary['format'] == 'timm'
  assert len(summary['loaded']) == 4 + 2 + 12 * TINY.depth
  assert all(k.startswith(('decoder_', 'mask_token')) for k in summary['ignored'])
  if layout == 'mae_global_pool':
    assert {'fc_norm.weight', 'fc_norm.bias'} <= set(summary['loaded'])
  assert_params_equal(fresh, params)
  np.testing.assert_allclose(forward(fresh, images), forward(model, images), rtol=1e-5,
                             atol=1e-5)
  # Neither norm nor fc_norm: the error names the tensor the model needs.
  sd.pop('fc_norm.weight', None)
  sd.pop('norm.weight', None)
  save_file(sd, str(tmp_path / 'nonorm.safetensors'))
  with pytest.raises(ValueError, match=r"missing tensor 'norm\.(weight|bias)'"):
    pretrained.load_vit_weights(fresh, tmp_path / 'nonorm.safetensors')


@pytest.mark.parametrize('kind', ['augreg', 'opt_target', 'big_vision_stacked'])
def test_npz_round_trip(tmp_path, source, images, kind):
  model, params = source
  arrays = {'augreg': lambda: to_npz(params),
            'opt_target': lambda: {**to_npz(params, prefix='opt/target/'),
                                   'opt/state/step': np.zeros(())},
            'big_vision_stacked': lambda: to_npz(params, big_vision=True, stacked=True,
                                                 prefix='params/')}[kind]()
  path = tmp_path / f'{kind}.npz'
  np.savez(path, **arrays)
  fresh = tiny(3, scan=(kind == 'augreg'))
  summary = pretrained.load_vit_weights(fresh, path)
  assert summary['format'] == 'npz'
  assert all('head/' in k or k.startswith('opt/state') for k in summary['ignored'])
  assert_params_equal(fresh, params)
  if kind == 'augreg':
    np.testing.assert_allclose(forward(fresh, images), forward(model, images), rtol=1e-5,
                               atol=1e-5)


def test_pos_embed_resized_bilinear_16_to_32(tmp_path, source):
  _, params = source
  path = tmp_path / 'vit16.safetensors'
  save_file(to_timm(params), str(path))
  big = tiny(1, image_size=32)  # grid 2x2 -> 4x4
  summary = pretrained.load_vit_weights(big, path, interpolation='bilinear')
  assert summary['pos_embed_resized'] == (2, 4)
  got = np.asarray(vit.get_vit_params(big)['pos_embed'])
  assert got.shape == (1, 17, D)
  np.testing.assert_array_equal(got[0, 0], params['pos_embed'][0, 0])  # class token kept
  old_grid = params['pos_embed'][0, 1:].reshape(2, 2, D)
  # Half-pixel-centred bilinear with edge clamping (torch align_corners=False) == scipy zoom.
  want = scipy.ndimage.zoom(old_grid, (2, 2, 1), order=1, grid_mode=True, mode='nearest')
  np.testing.assert_allclose(got[0, 1:].reshape(4, 4, D), want, rtol=1e-5, atol=1e-6)
  feats = forward(big, np.ones((1, 32, 32, 3), np.float32))
  assert feats.shape == (1, D) and np.all(np.isfinite(feats))


def test_resize_pos_embed_bicubic():
  rng = np.random.default_rng(0)
  cls = rng.normal(size=(1, 1, 3))
  const = np.concatenate([cls, np.full((1, 16, 3), 0.7)], axis=1)
  out = pretrained.resize_pos_embed(const, 8)
  assert out.shape == (1, 65, 3)
  np.testing.assert_allclose(out[0, 0], cls[0, 0])
  np.testing.assert_allclose(out[0, 1:], 0.7, rtol=1e-6)
  # Cubic convolution reproduces a linear ramp wherever all four taps are inside the grid.
  r, c = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing='ij')
  ramp = np.concatenate([cls, (2 * r + 3 * c).reshape(1, 16, 1).repeat(3, -1)], axis=1)
  grid = pretrained.resize_pos_embed(ramp, 8)[0, 1:, 0].reshape(8, 8)
  src = (np.arange(8) + 0.5) / 2 - 0.5  # half-pixel centres in the old grid
  want = 2 * src[:, None] + 3 * src[None, :]
  np.testing.assert_allclose(grid[3:5, 3:5], want[3:5, 3:5], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='1 \\+ g\\*g'):
    pretrained.resize_pos_embed(np.zeros((1, 11, 3)), 4)


def test_loading_errors_are_clear(tmp_path, source):
  _, params = source
  model = tiny(2)

  sd = to_timm(params)
  del sd['blocks.1.mlp.fc2.bias']
  save_file(sd, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(ValueError, match="missing tensor 'blocks.1.mlp.fc2.bias'"):
    pretrained.load_vit_weights(model, tmp_path / 'missing.safetensors')

  sd = to_timm(params)
  sd['blocks.0.attn.qkv.weight'] = np.zeros((96, 16), np.float32)
  save_file(sd, str(tmp_path / 'shape.safetensors'))
  with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight' has shape \(96, 16\), "
                                       r'expected \(96, 32\)'):
    pretrained.load_vit_weights(model, tmp_path / 'shape.safetensors')

  sd = to_timm(params)
  sd['blocks.0.ls1.gamma'] = np.ones(D, np.float32)  # a LayerScale ViT: not this architecture
  save_file(sd, str(tmp_path / 'extra.safetensors'))
  with pytest.raises(ValueError, match='no place.*blocks.0.ls1.gamma'):
    pretrained.load_vit_weights(model, tmp_path / 'extra.safetensors')

  arrays = to_npz(params)
  arrays['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'] = np.zeros((D, 5), np.float32)
  np.savez(tmp_path / 'shape.npz', **arrays)
  with pytest.raises(ValueError, match=r'Dense_0/kernel.*\(32, 5\).*\(32, 64\)'):
    pretrained.load_vit_weights(model, tmp_path / 'shape.npz')

  arrays = to_npz(params)
  del arrays['cls']
  np.savez(tmp_path / 'nocls.npz', **arrays)
  with pytest.raises(ValueError, match="missing tensor 'cls'"):
    pretrained.load_vit_weights(model, tmp_path / 'nocls.npz')

  for name in ('corrupt.safetensors', 'corrupt.npz'):
    (tmp_path / name).write_bytes(b'\x00not a checkpoint' * 10)
    with pytest.raises(ValueError, match='cannot read') as e:
      pretrained.load_vit_weights(model, tmp_path / name)
    assert 'allow_pickle' not in str(e.value)  # numpy's advice to unpickle does not reach users
  arrays = to_npz(params)
  arrays['cls'] = np.array([object()], dtype=object)
  np.savez(tmp_path / 'objects.npz', **arrays)
  with pytest.raises(ValueError, match="tensor 'cls' holds Python objects") as e:
    pretrained.load_vit_weights(model, tmp_path / 'objects.npz')
  assert 'allow_pickle' not in str(e.value)
  good = tmp_path / 'good.npz'
  np.savez(good, **to_npz(params))
  (tmp_path / 'truncated.npz').write_bytes(good.read_bytes()[:2000])
  with pytest.raises(ValueError, match='cannot read'):
    pretrained.load_vit_weights(model, tmp_path / 'truncated.npz')
  with pytest.raises(ValueError, match='no such checkpoint'):
    pretrained.load_vit_weights(model, tmp_path / 'absent.npz')
  (tmp_path / 'vit.pth').write_bytes(b'x')
  with pytest.raises(ValueError, match='unknown checkpoint format'):
    pretrained.load_vit_weights(model, tmp_path / 'vit.pth')
  # Nothing above half-loaded the model: a failed load leaves its weights untouched.
  before = vit.get_vit_params(tiny(2))
  for k, v in vit.get_vit_params(model).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(before[k]))
