"""Loading pretrained ViT weights (timm `.safetensors` or big_vision/AugReg `.npz`) into NNX.

`load_vit_weights(model, path)` fills a `ufo_jax.models.vit.VisionTransformer` in place, for
both the loop and the scanned block layout. Files are local: download them yourself (see
docs/MODELS.md; `RECOMMENDED_CHECKPOINT` is the one the ufo_l recipe assumes). Checkpoints
trained at another resolution get their position embedding grid resized (class token kept).
Classifier heads are ignored; any other tensor the model has no place for, a missing tensor, a
mis-shaped tensor or an unreadable file is a `ValueError`.

MAE checkpoints (timm `vit_large_patch16_224.mae`, or the MAE repository's encoders converted
to safetensors) load too: they have no classifier, their final LayerNorm may be stored as
`fc_norm` (the global-average-pool layout) instead of `norm`, and full MAE pretraining
checkpoints also carry the decoder (`decoder_*`, `mask_token`), which is ignored.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ufo_jax.config import RECOMMENDED_CHECKPOINT, RECOMMENDED_CHECKPOINT_HOWTO
from ufo_jax.models import vit as vit_lib

__all__ = ['RECOMMENDED_CHECKPOINT', 'RECOMMENDED_CHECKPOINT_HOWTO', 'load_vit_weights',
           'resize_pos_embed']

INTERPOLATIONS = {'bicubic': 'cubic', 'bilinear': 'linear'}

# Tensors a checkpoint may carry that a backbone does not use (classifier / pre-logits heads).
# MAE pretraining checkpoints also hold the decoder and the mask token.
_TIMM_IGNORED = re.compile(r'^((head|head_dist|pre_logits)\.|decoder_|mask_token$)')
_NPZ_IGNORED = re.compile(r'^(head|pre_logits)/')


class _Source:
  """Named arrays of one checkpoint; records what was used and checks shapes on access."""

  def __init__(self, path: pathlib.Path, arrays: Mapping[str, Any], keys: list[str]):
    self.path = path
    self._arrays = arrays
    self.keys = keys
    self.used: set[str] = set()
    self._cache: dict[str, np.ndarray] = {}

  def get(self, key: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """The float32 array `key`, checked against `shape` when given."""
    if key not in self._cache:
      if key not in self._arrays:
        raise ValueError(f'{self.path}: missing tensor {key!r} (the model needs it)')
      try:
        self._cache[key] = np.asarray(self._arrays[key]).astype(np.float32)
      except Exception as e:  # a corrupt member surfaces only when it is read
        if 'allow_pickle' in str(e):  # not numpy's advice to unpickle (that can run code)
          raise ValueError(f'{self.path}: tensor {key!r} holds Python objects (pickled), which '
                           'are never loaded; save the arrays with numpy.savez') from None
        raise ValueError(f'{self.path}: cannot read tensor {key!r}: {e}') from e
      self.used.add(key)
    value = self._cache[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f'{self.path}: tensor {key!r} has shape {tuple(value.shape)}, expected '
                       f'{tuple(shape)}')
    return value

  def close(self) -> None:
    close = getattr(self._arrays, 'close', None)  # np.load keeps the .npz open
    if close is not None:
      close()


def _open(path: pathlib.Path) -> tuple[str, _Source]:
  """Opens a checkpoint; returns its format ('timm' or 'npz') and its arrays."""
  if not path.is_file():
    raise ValueError(f'{path}: no such checkpoint file')
  suffix = path.suffix.lower()
  try:
    if suffix == '.safetensors':
      from safetensors.numpy import load_file
      arrays = load_file(str(path))
      return 'timm', _Source(path, arrays, sorted(arrays))
    if suffix == '.npz':
      arrays = np.load(path, allow_pickle=False)
      return 'npz', _Source(path, arrays, sorted(arrays.files))
  except Exception as e:  # safetensors, zipfile and numpy errors alike
    if 'allow_pickle' in str(e):  # numpy takes a non-zip file for a pickle: never unpickled
      raise ValueError(f'{path}: cannot read {suffix} checkpoint: not an .npz (zip) archive')\
          from None
    raise ValueError(f'{path}: cannot read {suffix} checkpoint: {e}') from e
  raise ValueError(f'{path}: unknown checkpoint format {suffix!r}; expected a timm state dict '
                   "'.safetensors' or a big_vision/AugReg '.npz'")


def resize_pos_embed(posemb: np.ndarray, grid: int, interpolation: str = 'bicubic') -> np.ndarray:
  """Resizes `(1, 1 + g*g, D)` position embeddings to `(1, 1 + grid*grid, D)`.

  The class token's embedding is kept; the `g x g` grid is resampled with half-pixel-centred
  2-D interpolation (`jax.image.resize`, edge-clamped; 'bicubic' is Keys' cubic, a = -0.5).
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'unknown interpolation {interpolation!r}; expected one of '
                     f'{sorted(INTERPOLATIONS)}')
  tokens = posemb.shape[1] - 1 if posemb.ndim == 3 else -1
  old = math.isqrt(max(tokens, 0))
  if posemb.ndim != 3 or posemb.shape[0] != 1 or tokens < 1 or old * old != tokens:
    raise ValueError(f'position embedding of shape {posemb.shape} is not (1, 1 + g*g, D)')
  if old == grid:
    return posemb
  d = posemb.shape[-1]
  old_grid = posemb[0, 1:].reshape(old, old, d)
  new_grid = jax.image.resize(old_grid, (grid, grid, d), INTERPOLATIONS[interpolation],
                              antialias=True)
  new_grid = np.asarray(new_grid, np.float32).reshape(1, grid * grid, d)
  return np.concatenate([posemb[:, :1], new_grid], axis=1)


def _timm_params(src: _Source, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Our parameter names from a timm state dict (torch layouts: Linear (out, in), conv OIHW)."""
  out = {}
  # MAE / global-pool layout: the final LayerNorm is `fc_norm` and there is no `norm`.
  final_norm = 'fc_norm' if ('norm.weight' not in src.keys
                             and 'fc_norm.weight' in src.keys) else 'norm'
  for name, shape in shapes.items():
    if name in ('norm.scale', 'norm.bias'):
      out[name] = src.get(f'{final_norm}.{"weight" if name == "norm.scale" else "bias"}', shape)
      continue
    if name in ('cls_token', 'pos_embed'):
      out[name] = src.get(name, shape if name == 'cls_token' else None)
      continue
    module, leaf = name.rsplit('.', 1)
    if leaf == 'kernel' and len(shape) == 4:  # conv HWIO <- OIHW
      w = src.get(f'{module}.weight', (shape[3], shape[2], shape[0], shape[1]))
      out[name] = w.transpose(2, 3, 1, 0)
    elif leaf == 'kernel':  # Linear (in, out) <- (out, in)
      out[name] = src.get(f'{module}.weight', shape[::-1]).T
    elif leaf == 'scale':  # LayerNorm
      out[name] = src.get(f'{module}.weight', shape)
    else:
      out[name] = src.get(name, shape)
  return out


def _npz_params(src: _Source, model: vit_lib.VisionTransformer,
                shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], str]:
  """Our parameter names from a big_vision / AugReg (google-research/vision_transformer) npz."""
  keys = set(src.keys)
  prefix = ''
  for candidate in ('opt/target/', 'params/img/', 'params/'):
    if f'{candidate}embedding/kernel' in keys:
      prefix = candidate
      break
  big_vision = prefix.startswith('params/')
  mha, mlp, ln2 = ('MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_1') if big_vision \
    else ('MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2')
  p = prefix
  cfg = model.cfg
  d, h = cfg.width, cfg.heads
  stacked = f'{p}Transformer/encoderblock/LayerNorm_0/scale' in keys
  out = {
    'patch_embed.proj.kernel': src.get(f'{p}embedding/kernel', shapes['patch_embed.proj.kernel']),
    'patch_embed.proj.bias': src.get(f'{p}embedding/bias', (d,)),
    'cls_token': src.get(f'{p}cls', (1, 1, d)),
    'pos_embed': src.get(f'{p}pos_embedding' if big_vision
                         else f'{p}Transformer/posembed_input/pos_embedding', None),
    'norm.scale': src.get(f'{p}Transformer/encoder_norm/scale', (d,)),
    'norm.bias': src.get(f'{p}Transformer/encoder_norm/bias', (d,)),
  }
  if stacked:
    lead = np.shape(src.get(f'{p}Transformer/encoderblock/LayerNorm_0/scale', None))[0]
    if lead != cfg.depth:
      raise ValueError(f'{src.path}: checkpoint has {lead} stacked encoder blocks, the model '
                       f'has {cfg.depth}')
  for i in range(cfg.depth):
    def get(key: str, shape: tuple[int, ...], i=i) -> np.ndarray:
      if stacked:  # big_vision scan layout: one array per name, leading layer axis
        return src.get(f'{p}Transformer/encoderblock/{key}', (cfg.depth, *shape))[i]
      return src.get(f'{p}Transformer/encoderblock_{i}/{key}', shape)

    b = f'blocks.{i}.'
    out[b + 'norm1.scale'] = get('LayerNorm_0/scale', (d,))
    out[b + 'norm1.bias'] = get('LayerNorm_0/bias', (d,))
    qkv = [get(f'{mha}/{n}/kernel', (d, h, d // h)).reshape(d, d)
           for n in ('query', 'key', 'value')]
    out[b + 'attn.qkv.kernel'] = np.concatenate(qkv, axis=1)
    out[b + 'attn.qkv.bias'] = np.concatenate(
      [get(f'{mha}/{n}/bias', (h, d // h)).reshape(d) for n in ('query', 'key', 'value')])
    out[b + 'attn.proj.kernel'] = get(f'{mha}/out/kernel', (h, d // h, d)).reshape(d, d)
    out[b + 'attn.proj.bias'] = get(f'{mha}/out/bias', (d,))
    out[b + 'norm2.scale'] = get(f'{ln2}/scale', (d,))
    out[b + 'norm2.bias'] = get(f'{ln2}/bias', (d,))
    out[b + 'mlp.fc1.kernel'] = get(f'{mlp}/Dense_0/kernel', (d, cfg.mlp_dim))
    out[b + 'mlp.fc1.bias'] = get(f'{mlp}/Dense_0/bias', (cfg.mlp_dim,))
    out[b + 'mlp.fc2.kernel'] = get(f'{mlp}/Dense_1/kernel', (cfg.mlp_dim, d))
    out[b + 'mlp.fc2.bias'] = get(f'{mlp}/Dense_1/bias', (d,))
  return out, prefix


def load_vit_weights(model: vit_lib.VisionTransformer, path: str | pathlib.Path, *,
                     interpolation: str = 'bicubic') -> dict[str, Any]:
  """Loads a pretrained ViT checkpoint into `model` in place (loop or scanned layout).

  Args:
    model: a `VisionTransformer` of the checkpoint's architecture (any image size).
    path: a timm state dict `.safetensors` (e.g. `vit_large_patch16_384.augreg_in21k_ft_in1k`)
      or a big_vision / AugReg `.npz` (keys `embedding/kernel`, `cls`,
      `Transformer/encoderblock_<i>/...`; also `opt/target/` and big_vision `params/` trees).
    interpolation: 'bicubic' or 'bilinear', for resizing the position embedding grid.

  Returns:
    `{'format', 'loaded', 'ignored', 'pos_embed_resized'}`: the checkpoint keys used and skipped,
    and `(old_grid, new_grid)` when the position embedding was resampled (else None).

  Raises:
    ValueError: unreadable file, unknown format, missing tensor, mis-shaped tensor (naming the
      key, the expected and the found shape) or tensors the model has no place for.
  """
  path = pathlib.Path(path)
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'unknown interpolation {interpolation!r}; expected one of '
                     f'{sorted(INTERPOLATIONS)}')
  fmt, src = _open(path)
  try:
    shapes = vit_lib.vit_param_shapes(model)
    ignore: Callable[[str], bool]
    if fmt == 'timm':
      params = _timm_params(src, shapes)
      pos_key = 'pos_embed'
      ignore = lambda k: bool(_TIMM_IGNORED.match(k))
    else:
      params, prefix = _npz_params(src, model, shapes)
      pos_key = f'{prefix}pos_embedding' if prefix.startswith('params/') \
        else f'{prefix}Transformer/posembed_input/pos_embedding'
      # Keys outside the model tree (optimizer state, other towers) and heads are not ours.
      ignore = lambda k: not k.startswith(prefix) or bool(_NPZ_IGNORED.match(k[len(prefix):]))

    unexpected = [k for k in src.keys if k not in src.used and not ignore(k)]
    if unexpected:
      raise ValueError(f'{path}: tensors with no place in this {model.cfg} ViT: {unexpected[:8]}'
                       f'{" ..." if len(unexpected) > 8 else ""}')

    posemb = params['pos_embed']
    width = model.cfg.width
    if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[2] != width:
      raise ValueError(f'{path}: tensor {pos_key!r} has shape {posemb.shape}, expected '
                       f'(1, 1 + g*g, {width})')
    resized = None
    if posemb.shape != shapes['pos_embed']:
      try:
        params['pos_embed'] = resize_pos_embed(posemb, model.grid, interpolation)
      except ValueError as e:
        raise ValueError(f'{path}: tensor {pos_key!r}: {e}') from e
      resized = (math.isqrt(posemb.shape[1] - 1), model.grid)

    vit_lib.set_vit_params(model, params)
    used = sorted(src.used)
    return {
      'format': fmt,
      'loaded': used,
      'ignored': sorted(k for k in src.keys if k not in src.used),
      'pos_embed_resized': resized,
    }
  finally:
    src.close()
