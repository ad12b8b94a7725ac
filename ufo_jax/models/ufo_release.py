"""UFO's released AllInOne model (`allinone_vitlarge.pdmodel`) read without Paddle.

The file is what `paddle.save(model.state_dict(), path)` writes (Paddle 2.x): a pickle of a dict
from parameter name to numpy array, plus the dict `StructuredToParameterName@@` (structured name
-> Paddle's internal name). A pickle can run code, so `read_state_dict` unpickles with an
allow-list: numpy array reconstruction (`numpy.core.multiarray._reconstruct` as numpy 1.x writes
it, `numpy._core.multiarray._reconstruct` as numpy 2.x does), `numpy.dtype`, `numpy.ndarray`,
numpy scalars, `collections.OrderedDict` and protocol 2's latin-1 byte strings. Any other global
is refused in one line naming the file, before anything in the file runs.

The model is UFO's (PaddlePaddle/VIMER `UFO/AllInOne/evaluation_script.py`,
`modeling/backbones/vision_transformer.py`, `modeling/heads/embedding_head.py`):

- backbone `build_vit_backbone_lazy(depth='large', input_size=[384, 384], stride_size=16)`: a
  ViT-L/16 with qkv bias, LayerNorm eps 1e-6, exact GELU, attention scale head_dim^-0.5, a class
  token and a learned position embedding; the feature is the class token after the final norm.
  Keys `backbone.patch_embed.proj.{weight,bias}` (Conv2D `[out, in, kh, kw]`), `backbone.cls_token`,
  `backbone.pos_embed` (`[1, 577, 1024]`), `backbone.blocks.N.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}.{weight,bias}` (Paddle `Linear` weights are `[in, out]`, as ours), and
  `backbone.norm.{weight,bias}`. Our `ufo_jax.models.vit.VisionTransformer` is the same function.
- heads `heads.task1` .. `heads.task4`, each an `EmbeddingHead` whose test-time output is a
  BatchNorm neck `heads.taskN.bottleneck.0.{weight,bias,_mean,_variance}` (eps 1e-5) applied to
  the feature in eval mode: `(x - _mean) / sqrt(_variance + eps) * weight + bias`. The stored bias
  is applied as it is (UFO's `BatchNorm` initialises weight 0 and bias 1 and trains both), so our
  neck carries it as a frozen bias (`ufo_jax.models.heads.MaskedBatchNorm.bias`).

Which head serves which task: UFO trained task1..task4 = face, person, vehicle, product (their
CosFace scales 50 / 30 / 20 / 30), but its released `evaluation_script.py` evaluates the person
sets (Market1501, MSMT17) with `task3`, the vehicle head, as it does the vehicle sets; `task2` is
never used there. `EVALUATION_HEADS` (the default of the import) follows the script, which is
what reproduces the published row; `TRAINING_HEADS` is the training order (the default when
fine-tuning, `--config.model.pretrained=...pdmodel`). `parse_heads` reads either name or an
explicit `face=task1,person=task2,...`.

Other UFO sizes are read from their shapes: the width, depth, MLP width and patch come from the
arrays, the number of heads from UFO's table for that width (768: 12, 1024: 16, 1280: 16), the
input size from the position embedding (square grid x patch; UFO's overlapping-stride patch
embedding cannot be told from the shapes, so the stride is taken equal to the patch, as in the
release). UFO's 'small' ViT (no qkv bias, attention scale 768^-0.5), non-square inputs and a
camera embedding (`sie_embed`, unused by the evaluation: camera=0) are refused or ignored and
said so.
"""

from __future__ import annotations

import _codecs
import collections
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ufo_jax import safe_pickle
from ufo_jax.models import pretrained
from ufo_jax.models import vit as vit_lib
from ufo_jax.safe_pickle import UnsafePickleError

__all__ = [
  'EVALUATION_HEADS', 'TRAINING_HEADS', 'ReleaseArchitecture', 'UnsafePickleError', 'architecture',
  'backbone_params', 'file_info', 'load_into', 'neck_arrays', 'parse_heads', 'read_state_dict',
  'vit_config',
]

SUFFIXES = ('.pdmodel', '.pdparams')  # what paddle.save files are called
NAME_TABLE = 'StructuredToParameterName@@'  # paddle.save's structured -> internal names
UNPACK_INFO = 'UnpackBigParamInfor@@'  # arrays > 4 GiB split by protocols 2 and 3
LN_EPS = 1e-6  # UFO's norm_layer = partial(nn.LayerNorm, epsilon=1e-6)
BN_EPS = 1e-5  # UFO's BatchNorm(feat_dim, eps=1e-05)
NORMALIZATION = (127.5, 127.5)  # evaluation_script.py: mean = std = 0.5 * 255 per channel
UFO_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}  # build_vit_backbone_lazy's num_heads
UFO_TASKS = ('task1', 'task2', 'task3', 'task4')

# Which release head gives each task's embedding (see the module docstring).
EVALUATION_HEADS = {'face': 'task1', 'person': 'task3', 'vehicle': 'task3', 'product': 'task4'}
TRAINING_HEADS = {'face': 'task1', 'person': 'task2', 'vehicle': 'task3', 'product': 'task4'}
HEAD_PRESETS = {'evaluation_script': EVALUATION_HEADS, 'training': TRAINING_HEADS}


def _latin1_encode(text: Any, encoding: str = 'latin1') -> bytes:
  """`_codecs.encode` as protocol 2 pickles use it for bytes; nothing else."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'_codecs.encode({type(text).__name__}, {encoding!r}) refused')
  return _codecs.encode(text, 'latin1')


_ALLOWED = {
  **safe_pickle.NUMPY_GLOBALS,
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('_codecs', 'encode'): _latin1_encode,
}
_EXPECTED = 'a paddle.save state dict may only hold numpy arrays, dicts, lists, numbers and strings'


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{name: array}` of a `paddle.save(state_dict)` file, without Paddle.

  Raises:
    FileNotFoundError: no such file.
    UnsafePickleError: a global outside the allow-list (nothing in the file has run).
    ValueError: not a pickle, not a dict of arrays.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file (the released UFO model, e.g. '
                            'allinone_vitlarge.pdmodel)')
  with open(path, 'rb') as f:
    try:
      obj = safe_pickle.RestrictedUnpickler(  # as paddle.load reads Python 2 era pickles
          f, path, allowed=_ALLOWED, expected=_EXPECTED, encoding='latin1').load()
    except UnsafePickleError:
      raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
      raise ValueError(f'{path}: not a readable paddle.save pickle ({type(e).__name__}: '
                       f'{str(e)[:200]})') from None
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: holds a {type(obj).__name__}, expected the dict of '
                     'paddle.save(model.state_dict())')
  obj = dict(obj)
  obj.pop(NAME_TABLE, None)
  info = obj.pop(UNPACK_INFO, None)
  if info is not None:  # protocol 2/3 files split big arrays into `key@@.i` slices
    try:
      for key, value in info.items():
        parts = [obj.pop(p) for p in value['slices']]
        obj[key] = np.concatenate([np.ravel(p) for p in parts]).reshape(value['OriginShape'])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ValueError(f'{path}: damaged {UNPACK_INFO} table ({e})') from None
  out = {}
  for key, value in obj.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, expected a numpy '
                       'array (a paddle.save state dict)')
    if value.dtype.kind not in 'fiub':
      raise ValueError(f'{path}: entry {key!r} has dtype {value.dtype}, expected numbers')
    out[key] = value
  return out


def file_info(path: str | os.PathLike) -> dict[str, Any]:
  """`{'name', 'size', 'sha256'}` of the release file (for model.json)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      h.update(block)
  return {'name': os.path.basename(os.fspath(path)), 'size': os.path.getsize(path),
          'sha256': h.hexdigest()}


@dataclasses.dataclass(frozen=True)
class ReleaseArchitecture:
  """What the arrays of a release say about its model."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  image_size: int
  tasks: tuple[str, ...]  # head names (`task1`, ...) that have a BatchNorm neck

  @property
  def vit(self) -> vit_lib.ViTConfig:
    return vit_lib.ViTConfig(width=self.width, depth=self.depth, heads=self.heads,
                             mlp_dim=self.mlp_dim, patch=self.patch)


def _shape(state: Mapping[str, np.ndarray], key: str, path: str) -> tuple[int, ...]:
  if key not in state:
    raise ValueError(f'{path}: missing tensor {key!r}; not a UFO AllInOne state dict')
  return tuple(state[key].shape)


_BLOCK = re.compile(r'^backbone\.blocks\.(\d+)\.')
_NECK = re.compile(r'^heads\.([^.]+)\.bottleneck\.0\.weight$')


def architecture(state: Mapping[str, np.ndarray], path: str = 'UFO release',
                 image_size: int | None = None, num_heads: int | None = None
                 ) -> ReleaseArchitecture:
  """The backbone and heads of a release, from its shapes (see the module docstring).

  `image_size`, when given, must agree with the position embedding (grid x patch). The number of
  attention heads is UFO's for its widths (768: 12, 1024: 16, 1280: 16), else `num_heads`, else
  width / 64 (our Ti/S/B/L variants' head size).
  """
  cls = _shape(state, 'backbone.cls_token', path)
  w = _shape(state, 'backbone.patch_embed.proj.weight', path)
  if len(cls) != 3 or len(w) != 4 or w[1] != 3 or w[2] != w[3] or w[0] != cls[2]:
    raise ValueError(f'{path}: backbone.patch_embed.proj.weight {w} / backbone.cls_token {cls}: '
                     'expected a square RGB Conv2D [width, 3, p, p] and [1, 1, width]')
  width, patch = cls[2], w[2]
  depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
  if depth == 0:
    raise ValueError(f'{path}: no backbone.blocks.N tensors; not a UFO ViT state dict')
  if 'backbone.blocks.0.attn.qkv.bias' not in state:
    raise ValueError(f"{path}: attention without qkv bias: UFO's 'small' ViT (qkv_bias=False, "
                     'scale 768^-0.5) has no equivalent here; base, large and huge import')
  if 'backbone.norm.weight' not in state:
    raise ValueError(f'{path}: no backbone.norm (share_last=False): the feature is not the '
                     'final-norm class token; not supported')
  if num_heads is None:
    num_heads = UFO_HEADS_BY_WIDTH.get(width, width // 64 if width % 64 == 0 else 0)
  if num_heads <= 0 or width % num_heads:
    raise ValueError(f'{path}: width {width} is none of UFO\'s ViT sizes '
                     f'{sorted(UFO_HEADS_BY_WIDTH)} and the head count is not in the file')
  mlp = _shape(state, 'backbone.blocks.0.mlp.fc1.weight', path)
  pos = _shape(state, 'backbone.pos_embed', path)
  tokens = pos[1] - 1 if len(pos) == 3 else -1
  grid = math.isqrt(max(tokens, 0))
  if len(pos) != 3 or pos[0] != 1 or pos[2] != width or grid * grid != tokens or grid == 0:
    raise ValueError(f'{path}: backbone.pos_embed has shape {pos}, expected [1, 1 + g*g, {width}] '
                     '(a square input; UFO\'s non-square re-id inputs such as 256x128 are not '
                     'supported)')
  size = grid * patch
  if image_size is not None and int(image_size) != size:
    raise ValueError(f'{path}: backbone.pos_embed {pos} is a {grid}x{grid} grid of {patch}-pixel '
                     f'patches ({size} px), not {image_size} px (an overlapping patch stride is '
                     'not supported)')
  tasks = tuple(sorted(m.group(1) for k in state if (m := _NECK.match(k))))
  if not tasks:
    raise ValueError(f'{path}: no heads.taskN.bottleneck.0 BatchNorm necks')
  return ReleaseArchitecture(width=width, depth=depth, heads=int(num_heads),
                             mlp_dim=mlp[1] if len(mlp) == 2 else -1, patch=patch,
                             image_size=size, tasks=tasks)


def vit_config(arch: ReleaseArchitecture) -> tuple[str, int]:
  """`(variant, depth)` for `config.model` (depth 0 = the variant's own)."""
  for name, cfg in vit_lib.VARIANTS.items():
    if (cfg.width, cfg.heads, cfg.mlp_dim, cfg.patch) == (arch.width, arch.heads, arch.mlp_dim,
                                                          arch.patch):
      return name, 0 if cfg.depth == arch.depth else arch.depth
  raise ValueError(f'no ViT variant of width {arch.width}, {arch.heads} heads, MLP '
                   f'{arch.mlp_dim}, patch {arch.patch} (variants: {list(vit_lib.VARIANTS)})')


def parse_heads(spec: str | Mapping[str, str] | None, available: tuple[str, ...] = UFO_TASKS
                ) -> dict[str, str]:
  """`'evaluation_script'`, `'training'` or `'face=task1,person=task2,...'` -> `{task: head}`."""
  if spec is None:
    return dict(EVALUATION_HEADS)
  if isinstance(spec, Mapping):
    heads = {str(k): str(v) for k, v in spec.items()}
  elif spec in HEAD_PRESETS:
    heads = dict(HEAD_PRESETS[spec])
  else:
    heads = {}
    for item in filter(None, (s.strip() for s in str(spec).split(','))):
      task, sep, head = item.partition('=')
      if not sep or not task.strip() or not head.strip():
        raise ValueError(f'ufo heads {spec!r}: expected {" or ".join(HEAD_PRESETS)} or '
                         "'task=taskN,...' (e.g. face=task1,person=task2)")
      heads[task.strip()] = head.strip()
    if not heads:
      raise ValueError(f'ufo heads {spec!r}: no task=head pair')
  bad = sorted({h for h in heads.values() if h not in available})
  if bad:
    raise ValueError(f'ufo heads: head(s) {bad} are not in the release (its heads: '
                     f'{list(available)})')
  return heads


def backbone_params(state: Mapping[str, np.ndarray], arch: ReleaseArchitecture,
                    path: str = 'UFO release') -> dict[str, np.ndarray]:
  """The backbone in our loop-layout names (`ufo_jax.models.vit.set_vit_params`), float32."""
  d, m, p = arch.width, arch.mlp_dim, arch.patch

  def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
    key = 'backbone.' + key
    got = _shape(state, key, path)
    if got != shape:
      raise ValueError(f'{path}: tensor {key!r} has shape {list(got)}, expected {list(shape)}')
    return np.asarray(state[key], np.float32)

  out = {
    'patch_embed.proj.kernel': get('patch_embed.proj.weight', (d, 3, p, p)).transpose(2, 3, 1, 0),
    'patch_embed.proj.bias': get('patch_embed.proj.bias', (d,)),
    'cls_token': get('cls_token', (1, 1, d)),
    'pos_embed': get('pos_embed', (1, 1 + (arch.image_size // p) ** 2, d)),
    'norm.scale': get('norm.weight', (d,)),
    'norm.bias': get('norm.bias', (d,)),
  }
  linear = {'attn.qkv': (d, 3 * d), 'attn.proj': (d, d), 'mlp.fc1': (d, m), 'mlp.fc2': (m, d)}
  for i in range(arch.depth):
    b = f'blocks.{i}.'
    for norm in ('norm1', 'norm2'):
      out[f'{b}{norm}.scale'] = get(f'{b}{norm}.weight', (d,))
      out[f'{b}{norm}.bias'] = get(f'{b}{norm}.bias', (d,))
    for name, shape in linear.items():  # Paddle Linear: weight [in, out], as our kernels
      out[f'{b}{name}.kernel'] = get(f'{b}{name}.weight', shape)
      out[f'{b}{name}.bias'] = get(f'{b}{name}.bias', shape[1:])
  return out


def neck_arrays(state: Mapping[str, np.ndarray], head: str, width: int,
                path: str = 'UFO release') -> dict[str, np.ndarray]:
  """`{'scale', 'bias', 'mean', 'var'}` of `heads.<head>.bottleneck.0`, float32 `(width,)`."""
  out = {}
  for ours, theirs in (('scale', 'weight'), ('bias', 'bias'), ('mean', '_mean'),
                       ('var', '_variance')):
    key = f'heads.{head}.bottleneck.0.{theirs}'
    got = _shape(state, key, path)
    if got != (width,):
      raise ValueError(f'{path}: tensor {key!r} has shape {list(got)}, expected [{width}]')
    out[ours] = np.asarray(state[key], np.float32)
  return out


def ignored_keys(state: Mapping[str, np.ndarray], heads: set[str]) -> list[str]:
  """Keys an import of the necks `heads` does not use (camera embedding, other heads, buffers)."""
  used = {f'heads.{t}.bottleneck.0.{n}' for t in heads
          for n in ('weight', 'bias', '_mean', '_variance')}
  return sorted(k for k in state if not k.startswith('backbone.') and k not in used
                or k == 'backbone.sie_embed')


def check_backbone_keys(state: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                        path: str) -> None:
  """Every `backbone.*` tensor but the camera embedding must have been mapped."""
  mapped = {'backbone.' + re.sub(r'\.(kernel|scale)$', '.weight', k) for k in params}
  extra = sorted(k for k in state if k.startswith('backbone.') and k not in mapped
                 and k != 'backbone.sie_embed')
  if extra:
    raise ValueError(f'{path}: backbone tensor(s) with no place in a UFO ViT: {extra[:5]}')


def load_into(model: Any, path: str | os.PathLike, *, heads: str | Mapping[str, str] | None = None,
              state: Mapping[str, np.ndarray] | None = None,
              interpolation: str = 'bicubic') -> dict[str, Any]:
  """Loads a release into a `MultiTaskModel` with a ViT backbone, in place.

  The backbone and, for every task of the model that `heads` maps, its neck (scale, bias,
  running mean and variance). Tasks `heads` does not name (a fifth task) keep their own neck;
  class weights are never touched. The model's image size may differ from the release's: the
  position embedding grid is resized (`ufo_jax.models.pretrained.resize_pos_embed`).

  Returns:
    `{'format': 'ufo_release', 'architecture', 'heads', 'loaded', 'ignored',
    'pos_embed_resized'}`.
  """
  path = os.fspath(path)
  state = read_state_dict(path) if state is None else state
  arch = architecture(state, path)
  backbone = model.backbone
  if not isinstance(backbone, vit_lib.VisionTransformer):
    raise ValueError(f'{path}: a UFO release loads into the ViT backbone only')
  params = backbone_params(state, arch, path)
  check_backbone_keys(state, params, path)
  want = vit_lib.vit_param_shapes(backbone)
  extra = sorted(set(params) - set(want), key=lambda k: (len(k), k))
  if extra:
    raise ValueError(f'{path}: the release has {arch.depth} blocks, the model '
                     f'{backbone.cfg.depth} (first extra tensor backbone.{extra[0]})')
  for key, shape in want.items():
    got = tuple(params[key].shape) if key in params else None
    if key != 'pos_embed' and got != tuple(shape):
      theirs = 'backbone.' + re.sub(r'\.(kernel|scale)$', '.weight', key)
      found = list(state[theirs].shape) if theirs in state else 'missing'
      raise ValueError(f'{path}: tensor {theirs!r} has shape {found}, the model needs '
                       f'{list(shape)} (ViT {backbone.cfg}); import the release with its own '
                       'architecture (ufo_jax.inference.load_ufo_release)')
  resized = None
  if tuple(params['pos_embed'].shape) != tuple(want['pos_embed']):
    params['pos_embed'] = pretrained.resize_pos_embed(params['pos_embed'], backbone.grid,
                                                      interpolation)
    resized = (arch.image_size // arch.patch, backbone.grid)
  vit_lib.set_vit_params(backbone, params)

  mapping = parse_heads(heads, arch.tasks)
  loaded = {}
  for task in model.tasks:
    head = mapping.get(task)
    if head is None:
      continue
    neck = model.heads[task].neck
    if neck.epsilon != BN_EPS:
      raise ValueError(f'the {task} neck has epsilon {neck.epsilon}, UFO\'s BatchNorm {BN_EPS}')
    for name, value in neck_arrays(state, head, arch.width, path).items():
      var = getattr(neck, name)
      old = var[...]
      if tuple(old.shape) != value.shape:
        raise ValueError(f'{path}: heads.{head}.bottleneck.0 has width {value.shape[0]}, the '
                         f'{task} neck {old.shape[0]}')
      sharding = getattr(old, 'sharding', None)
      new = jnp.asarray(value, old.dtype)
      var[...] = jax.device_put(new, sharding) if sharding is not None else new
    loaded[task] = head
  return {'format': 'ufo_release', 'architecture': dataclasses.asdict(arch), 'heads': loaded,
          'loaded': sorted(params), 'ignored': ignored_keys(state, set(loaded.values())),
          'pos_embed_resized': resized}


def release_config(arch: ReleaseArchitecture, tasks: tuple[str, ...] = tuple(EVALUATION_HEADS),
                   *, dtype: str = 'float32') -> Any:
  """The config of the inference model of a release (what `config_from_model_json` rebuilds).

  The tasks are ours (default face, person, vehicle, product); the input is RGB at the
  release's size, normalised `(x - 127.5) / 127.5`, bicubic resize (our evaluation's).
  """
  import ml_collections

  variant, depth = vit_config(arch)
  return ml_collections.ConfigDict({
    'model': {'backbone': 'vit', 'variant': variant, 'depth': depth, 'drop_path_rate': 0.0,
              'dtype': dtype, 'scan_layers': True, 'remat_policy': 'none',
              'attention_impl': 'xla', 'pretrained': ''},
    'input': {'image_size': arch.image_size,
              'augment': {'mean': NORMALIZATION[0], 'std': NORMALIZATION[1]}},
    'tasks': {t: {} for t in tasks},
    'mesh': {'data': -1, 'fsdp': 1},
  })
