"""A small UFO AllInOne release written the way `paddle.save(model.state_dict(), path)` does.

`paddle.save` (Paddle 2.2, `paddle/framework/io.py` `_legacy_save`) pickles, with protocol 4, a
plain dict from structured parameter name to `tensor.numpy()`, plus `StructuredToParameterName@@`
(structured name -> Paddle's internal name). A 2022 file was written under numpy 1.x, whose
arrays refer to `numpy.core.multiarray._reconstruct`; numpy 2.x writes `numpy._core...`.
`write_release(..., numpy_module='numpy.core.multiarray')` writes the old name under any numpy.

The weights are random but shaped as UFO's modules: Conv2D `[out, in, kh, kw]`, Linear
`[in, out]`, LayerNorm weight/bias, BatchNorm weight/bias/_mean/_variance (bias non-zero, as UFO's
BatchNorm initialises it to 1).
"""

from __future__ import annotations

import io
import pickle

import numpy as np

try:
  from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
  from numpy.core.multiarray import _reconstruct


def release_state(*, width=192, depth=2, mlp=768, patch=16, image=32, tasks=4, seed=0,
                  extra=None):
  """`{name: float32 array}` of a UFO ViT + `tasks` BatchNorm necks (heads.task1..)."""
  rng = np.random.default_rng(seed)

  def normal(*shape, std=0.02, mean=0.0):
    return (mean + std * rng.standard_normal(shape)).astype(np.float32)

  grid = image // patch
  sd = {'backbone.cls_token': normal(1, 1, width, std=0.5),
        'backbone.pos_embed': normal(1, 1 + grid * grid, width, std=0.5),
        'backbone.patch_embed.proj.weight': normal(width, 3, patch, patch, std=0.05),
        'backbone.patch_embed.proj.bias': normal(width, std=0.1),
        'backbone.norm.weight': normal(width, std=0.2, mean=1.0),
        'backbone.norm.bias': normal(width, std=0.2)}
  for i in range(depth):
    b = f'backbone.blocks.{i}.'
    for n in ('norm1', 'norm2'):
      sd[b + n + '.weight'] = normal(width, std=0.2, mean=1.0)
      sd[b + n + '.bias'] = normal(width, std=0.2)
    for n, (fi, fo) in {'attn.qkv': (width, 3 * width), 'attn.proj': (width, width),
                        'mlp.fc1': (width, mlp), 'mlp.fc2': (mlp, width)}.items():
      sd[b + n + '.weight'] = normal(fi, fo, std=0.08)
      sd[b + n + '.bias'] = normal(fo, std=0.1)
  for t in range(1, tasks + 1):
    h = f'heads.task{t}.bottleneck.0.'
    sd[h + 'weight'] = normal(width, std=0.3, mean=1.0)
    sd[h + 'bias'] = normal(width, std=0.3, mean=1.0)
    sd[h + '_mean'] = normal(width, std=0.3)
    sd[h + '_variance'] = np.abs(normal(width, std=0.3, mean=1.0)) + 0.1
  sd.update(extra or {})
  return sd


class _Numpy1Pickler(pickle._Pickler):  # the pure-Python pickler lets us name the global
  def save_global(self, obj, name=None):
    if obj is _reconstruct:
      self.save('numpy.core.multiarray')
      self.save('_reconstruct')
      self.write(pickle.STACK_GLOBAL)
      self.memoize(obj)
      return
    super().save_global(obj, name)


def write_release(path, state, *, numpy_module='numpy._core.multiarray', protocol=4):
  """Writes `state` as paddle.save does (with the array global under `numpy_module`)."""
  saved = dict(state)
  saved['StructuredToParameterName@@'] = {k: f'create_parameter_{i}.w_0'
                                          for i, k in enumerate(state)}
  buf = io.BytesIO()
  if numpy_module == 'numpy.core.multiarray':
    assert protocol == 4
    _Numpy1Pickler(buf, protocol).dump(saved)
  else:
    pickle.Pickler(buf, protocol).dump(saved)
  data = buf.getvalue()
  assert numpy_module.encode() in data, 'the pickle does not name the expected numpy module'
  with open(path, 'wb') as f:
    f.write(data)
  return path


# ---- an independent forward pass, written the way UFO's Paddle code computes it (NCHW) ----
def _layer_norm(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
  from scipy.special import erf
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def reference_embeddings(sd, images_uint8, heads, num_heads):
  """`{task: (B, D)}` neck outputs of uint8 NHWC RGB images already at the model's size.

  `heads`: {task: 'taskN'}. Float64 throughout: UFO's ToArray + Normalize(127.5, 127.5), then
  VisionTransformer.forward (PatchEmbedOverlap conv, cls token, pos_embed, pre-norm blocks,
  final norm, class token) and EmbeddingHead (eval BatchNorm2D with its bias).
  """
  f = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = (np.asarray(images_uint8, np.float64).transpose(0, 3, 1, 2) - 127.5) / 127.5  # NCHW
  w = f['backbone.patch_embed.proj.weight']
  d, _, p, _ = w.shape
  bsz, _, hgt, wid = x.shape
  gy, gx = hgt // p, wid // p
  patches = x.reshape(bsz, 3, gy, p, gx, p)
  conv = np.einsum('bcipjq,ocpq->boij', patches, w) + f['backbone.patch_embed.proj.bias'][
    None, :, None, None]
  t = conv.reshape(bsz, d, gy * gx).transpose(0, 2, 1)  # flatten(2).transpose((0, 2, 1))
  cls = np.broadcast_to(f['backbone.cls_token'], (bsz, 1, d))
  t = np.concatenate([cls, t], axis=1) + f['backbone.pos_embed']
  depth = 1 + max(int(k.split('.')[2]) for k in f if k.startswith('backbone.blocks.'))
  n = t.shape[1]
  hd = d // num_heads
  for i in range(depth):
    b = f'backbone.blocks.{i}.'
    y = _layer_norm(t, f[b + 'norm1.weight'], f[b + 'norm1.bias'])
    qkv = (y @ f[b + 'attn.qkv.weight'] + f[b + 'attn.qkv.bias']).reshape(
      bsz, n, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, d)
    t = t + (y @ f[b + 'attn.proj.weight'] + f[b + 'attn.proj.bias'])
    y = _layer_norm(t, f[b + 'norm2.weight'], f[b + 'norm2.bias'])
    y = _gelu(y @ f[b + 'mlp.fc1.weight'] + f[b + 'mlp.fc1.bias'])
    t = t + (y @ f[b + 'mlp.fc2.weight'] + f[b + 'mlp.fc2.bias'])
  feat = _layer_norm(t, f['backbone.norm.weight'], f['backbone.norm.bias'])[:, 0]
  out = {}
  for task, head in heads.items():
    h = f'heads.{head}.bottleneck.0.'
    out[task] = ((feat - f[h + '_mean']) / np.sqrt(f[h + '_variance'] + 1e-5) * f[h + 'weight']
                 + f[h + 'bias'])
  return out
