"""Validation of a loaded config and the values derived from it.

Every check names the field it is about (``config.tasks.person.batch_size``)
so that a full-scale mistake shows when the config is loaded, not deep inside
a compiled step on a pod.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

from ufo_jax import catalog

BACKBONES = ('vit', 'resnet')
VIT_VARIANTS = {'Ti/16': 16, 'S/16': 16, 'B/16': 16, 'L/16': 16, 'H/14': 14, 'H/16': 16}
RESNET_DEPTHS = ('18', '34', '50', '101')
SAMPLERS = ('uniform', 'identity')
SOURCES = ('tfds', 'synthetic')
BATCH_MODES = ('heterogeneous', 'homogeneous')
DTYPES = ('float32', 'bfloat16')
REMAT_POLICIES = ('none', 'nothing_saveable', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable', 'everything_saveable')
ATTENTION_IMPLS = ('xla', 'cudnn')
EVAL_DTYPES = ('float32', 'bfloat16')  # compute dtype of the evaluation embeddings
PRETRAINED_SUFFIXES = ('.safetensors', '.npz', '.pdmodel', '.pdparams')  # .pd*: a UFO release
NO_PRETRAINED = 'none'  # config.model.pretrained: train from scratch, on purpose

# The public ViT-L/16 checkpoint the ufo_l recipe assumes (docs/MODELS.md says why): timm's
# AugReg ViT-L/16 pretrained supervised on ImageNet-21k (Apache-2.0), at 224 px (the position
# embedding is resized to the training resolution on load).
RECOMMENDED_CHECKPOINT = 'timm/vit_large_patch16_224.augreg_in21k'
RECOMMENDED_CHECKPOINT_HOWTO = (
    'huggingface-cli download timm/vit_large_patch16_224.augreg_in21k model.safetensors '
    '--local-dir DIR, then --config.model.pretrained=DIR/model.safetensors')
NONFINITE_POLICIES = ('stop', 'skip')


# configs/ beside the package (a source checkout or an editable install).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


class ConfigError(ValueError):
  """A config value that cannot work, with the field it is about."""


def load_config(path_or_name: str):
  """``get_config()`` of a config file: a path, or a name in configs/ (``'ufo_tiny'``).

  The command line does the same through ``ml_collections.config_flags``; this is for notebooks,
  scripts and tests.
  """
  path = str(path_or_name)
  if not path.endswith('.py') and os.sep not in path:
    path = os.path.join(CONFIG_DIR, path + '.py')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path} not found (expected a .py file with get_config(), '
                      f'e.g. {os.path.join(CONFIG_DIR, "ufo_tiny.py")})')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'ufo_jax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path} defines no get_config()')
  return module.get_config()


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f'config.{field}: {message}')


def task_config(*, datasets: Sequence[str], batch_size: int, scale: float, margin: float,
                triplet: bool, num_classes: int = 0, num_instances: int = 4,
                triplet_margin: float = 0.0, loss_weight: float = 1.0,
                lr_scale: float = 1.0, sampler: str | None = None) -> Any:
  """One task of ``config.tasks``: its datasets, its slice of every batch and its head's losses.

  The fields and defaults of the recipe (configs/ufo_l.py uses it for its four tasks; a config
  of your own adds tasks with it, docs/CUSTOM_DATA.md):

  Args:
    datasets: catalog sets or custom sets converted into ``input.data_dir``, one label space.
    batch_size: examples of this task in every global batch (the sampling ratio).
    scale, margin: CosFace ``s`` and ``m``.
    triplet: the batch-hard triplet loss on the pre-neck feature (needs the identity sampler).
    num_classes: 0: from the converted data (or the catalog for synthetic input).
    num_instances: K of the identity sampler (P identities x K images).
    triplet_margin: 0: soft margin ``log(1 + exp(d_ap - d_an))``.
    loss_weight: weight of this task's losses in the total.
    lr_scale: learning-rate multiplier of this task's head.
    sampler: 'identity' or 'uniform'; default: 'identity' with the triplet loss, else 'uniform'.
  """
  import ml_collections

  return ml_collections.ConfigDict(dict(
      datasets=tuple(datasets),
      batch_size=int(batch_size),
      num_classes=int(num_classes),
      sampler=sampler or ('identity' if triplet else 'uniform'),
      num_instances=int(num_instances),
      cosface_scale=float(scale),
      cosface_margin=float(margin),
      triplet=bool(triplet),
      triplet_margin=float(triplet_margin),
      loss_weight=float(loss_weight),
      lr_scale=float(lr_scale),
  ))


def task_names(config) -> tuple[str, ...]:
  """The configured tasks in config order (the order of the batch and the heads)."""
  return tuple(config.tasks.keys())


def global_batch_size(config) -> int:
  """Examples per training step over all tasks and all processes."""
  return sum(int(config.tasks[t].batch_size) for t in task_names(config))


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves the ``data`` and ``fsdp`` axis sizes (one of them may be -1)."""
  sizes = {'data': int(mesh_config.data), 'fsdp': int(mesh_config.fsdp)}
  free = [k for k, v in sizes.items() if v == -1]
  _require(len(free) <= 1, 'mesh', f'at most one axis may be -1, got {sizes}')
  for k, v in sizes.items():
    _require(v == -1 or v >= 1, f'mesh.{k}', f'must be a positive size or -1, got {v}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    _require(num_devices % fixed == 0, f'mesh.{"fsdp" if free[0] == "data" else "data"}',
             f'{fixed} does not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  _require(math.prod(sizes.values()) == num_devices, 'mesh',
           f'data x fsdp = {sizes["data"]} x {sizes["fsdp"]} must equal the '
           f'{num_devices} devices available')
  return sizes


def validate(config, *, num_devices: int | None = None, num_processes: int = 1) -> Any:
  """Checks a loaded config; raises ConfigError naming the field. Returns config."""
  tasks = task_names(config)
  _require(len(tasks) > 0, 'tasks', 'no task is configured')
  if 'input' in config:
    catalog.learn(config.input.get('data_dir'))  # custom sets converted there
  for task in tasks:
    t = config.tasks[task]
    _require(bool(catalog.TASK_NAME_RE.match(task)), f'tasks.{task}',
             "a task name is lower-case letters, digits and '_', starting with a letter")
    _require(len(t.datasets) > 0, f'tasks.{task}.datasets',
             f'task {task!r} has no datasets')
    for name in t.datasets:
      try:
        info = catalog.get(name)
      except ValueError as e:
        raise ConfigError(f'config.tasks.{task}.datasets: {e}') from None
      _require(info.train_split is not None, f'tasks.{task}.datasets',
               f'{name!r} is a test-only set and cannot be trained on')
      hint = (f' (it was converted with --task={info.task}; convert it again with '
              f'--task={task})' if info.custom else '')
      _require(info.task == task, f'tasks.{task}.datasets',
               f'{name!r} belongs to task {info.task!r}, not {task!r}{hint}')
    _require(int(t.batch_size) > 0, f'tasks.{task}.batch_size', 'must be positive')
    _require(int(t.batch_size) % num_processes == 0, f'tasks.{task}.batch_size',
             f'{t.batch_size} is not divisible by the {num_processes} processes '
             '(each process reads its own equal slice of every task)')
    _require(t.sampler in SAMPLERS, f'tasks.{task}.sampler', f'expected one of {SAMPLERS}')
    if t.sampler == 'identity':
      _require(int(t.num_instances) >= 2, f'tasks.{task}.num_instances',
               'the identity sampler needs K >= 2 images per identity')
      local = int(t.batch_size) // num_processes
      _require(local % int(t.num_instances) == 0, f'tasks.{task}.batch_size',
               f'the per-process batch {local} is not a multiple of num_instances='
               f'{t.num_instances} (P identities x K images)')
    if t.triplet:
      _require(t.sampler == 'identity', f'tasks.{task}.sampler',
               'a task with the triplet loss needs the identity (P x K) sampler')
    _require(int(t.num_classes) >= 0, f'tasks.{task}.num_classes', 'must be >= 0 (0: derive)')
    _require(float(t.cosface_scale) > 0, f'tasks.{task}.cosface_scale', 'must be positive')
    _require(0 <= float(t.cosface_margin) < 1, f'tasks.{task}.cosface_margin',
             'must be in [0, 1)')
    _require(float(t.triplet_margin) >= 0, f'tasks.{task}.triplet_margin', 'must be >= 0')
    _require(float(t.loss_weight) >= 0, f'tasks.{task}.loss_weight', 'must be >= 0')
    _require(float(t.lr_scale) >= 0, f'tasks.{task}.lr_scale', 'must be >= 0')

  inp = config.input
  _require(inp.source in SOURCES, 'input.source', f'expected one of {SOURCES}, got {inp.source!r}')
  _require(inp.batch_mode in BATCH_MODES, 'input.batch_mode',
           f'expected one of {BATCH_MODES}, got {inp.batch_mode!r}')
  if inp.source == 'tfds':
    _require(bool(inp.data_dir), 'input.data_dir',
             'input.source=tfds needs the data_prep output folder (--config.input.data_dir=DIR)')
  _require(int(inp.image_size) > 0, 'input.image_size', 'must be positive')
  _require(isinstance(inp.get('allow_partial_data', False), bool), 'input.allow_partial_data',
           'must be True or False')

  m = config.model
  _require(m.backbone in BACKBONES, 'model.backbone', f'expected one of {BACKBONES}')
  if m.backbone == 'vit':
    _require(m.variant in VIT_VARIANTS, 'model.variant',
             f'unknown ViT variant {m.variant!r}; expected one of {tuple(VIT_VARIANTS)}')
    patch = VIT_VARIANTS[m.variant]
    _require(int(inp.image_size) % patch == 0, 'input.image_size',
             f'{inp.image_size} is not divisible by the patch size {patch} of ViT-{m.variant}')
  else:
    _require(str(m.variant) in RESNET_DEPTHS, 'model.variant',
             f'ResNet depth {m.variant!r}; expected one of {RESNET_DEPTHS}')
  _require(0 <= float(m.drop_path_rate) < 1, 'model.drop_path_rate', 'must be in [0, 1)')
  _require(m.dtype in DTYPES, 'model.dtype', f'expected one of {DTYPES}')
  _require(m.remat_policy in REMAT_POLICIES, 'model.remat_policy',
           f'expected one of {REMAT_POLICIES}')
  _require(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl',
           f'expected one of {ATTENTION_IMPLS}')
  pretrained = str(m.get('pretrained', ''))
  if pretrained and pretrained != NO_PRETRAINED:
    _require(pretrained.lower().endswith(PRETRAINED_SUFFIXES), 'model.pretrained',
             f'{pretrained!r} is not a checkpoint file ({" or ".join(PRETRAINED_SUFFIXES)}); '
             f"or '{NO_PRETRAINED}' to train from scratch")
    _require(m.backbone == 'vit', 'model.pretrained',
             f"pretrained weights load into the ViT backbone only; use '{NO_PRETRAINED}' for "
             f'backbone={m.backbone!r}')

  o = config.optim
  _require(o.name == 'sgd', 'optim.name', f"only 'sgd' is implemented, got {o.name!r}")
  _require(float(o.lr) > 0, 'optim.lr', 'must be positive')
  _require(0 <= float(o.warmup_fraction) < 1, 'optim.warmup_fraction', 'must be in [0, 1)')

  tr = config.train
  _require(int(tr.steps) > 0, 'train.steps', 'must be positive')
  _require(tr.get('on_nonfinite', 'stop') in NONFINITE_POLICIES, 'train.on_nonfinite',
           f'expected one of {NONFINITE_POLICIES}, got {tr.get("on_nonfinite")!r}')
  _require(int(tr.get('max_nonfinite_steps', 1)) >= 1, 'train.max_nonfinite_steps',
           'must be >= 1')
  _require(int(tr.get('stop_sync_every', 1)) >= 1, 'train.stop_sync_every', 'must be >= 1')
  _require(tr.get('on_bad_checkpoint', 'fallback') in ('fallback', 'stop'),
           'train.on_bad_checkpoint', f"expected 'fallback' or 'stop', got "
           f"{tr.get('on_bad_checkpoint')!r}")
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints', 'keep_every'):
    _require(int(tr[key]) >= 0, f'train.{key}', 'must be >= 0')
  _require(tr.get('sabotage_margin_sign', 1) in (1, -1), 'train.sabotage_margin_sign',
           'expected 1 (the recipe) or -1 (the benchmark sabotage of bench/learning.py), got '
           f"{tr.get('sabotage_margin_sign')!r}")

  for name in eval_sets(config):
    _require(name in catalog.benchmarks(), 'eval.sets',
             f'unknown benchmark {name!r}; expected names from {catalog.benchmarks()} (a '
             'custom set is known once converted into input.data_dir)')
  _require(int(config.eval.batch_size) > 0, 'eval.batch_size', 'must be positive')
  compare_to = config.eval.get('compare_to') or ''
  _require(not compare_to or os.path.isfile(compare_to), 'eval.compare_to',
           f'{compare_to} is not a file (expected the report.json of an earlier evaluation)')
  _require(config.eval.get('dtype', 'float32') in EVAL_DTYPES, 'eval.dtype',
           f'expected one of {EVAL_DTYPES}, got {config.eval.get("dtype")!r}')

  if num_devices is not None:
    shape = mesh_shape(config.mesh, num_devices)
    gb = global_batch_size(config)
    _require(gb % num_devices == 0, 'tasks.*.batch_size',
             f'the global batch {gb} (sum over tasks) is not divisible by the '
             f'{num_devices} devices of the mesh {shape}')
    if inp.batch_mode == 'homogeneous':
      for task in tasks:
        _require(int(config.tasks[task].batch_size) % num_devices == 0,
                 f'tasks.{task}.batch_size', 'homogeneous batches need each task batch '
                 f'divisible by the {num_devices} devices')
  return config


def parse_sets(sets: Any) -> tuple[str, ...]:
  """A ``config.eval.sets`` value as a tuple of names: a tuple, a list, ``'lfw,sop'``, or the tuple
  ``('lfw,sop',)`` that ``--config.eval.sets=lfw,sop`` gives on the command line."""
  items = [sets] if isinstance(sets, str) else list(sets)
  return tuple(n.strip() for item in items for n in str(item).split(',') if n.strip())


def eval_sets(config) -> tuple[str, ...]:
  """``config.eval.sets`` as a tuple of names (``parse_sets``)."""
  return parse_sets(config.eval.sets)


def set_field(config, field: str, value: Any, *, create: bool = False) -> Any:
  """Sets the dotted ``field`` (``'input.augment.mean'``) of ``config`` to ``value``, whatever its
  old type; returns the old value (None where there was none). ``create``: missing parents
  become empty ConfigDicts (else a missing parent raises KeyError)."""
  import ml_collections

  *parents, name = field.split('.')
  node = config
  for parent in parents:
    if create and parent not in node:
      node[parent] = ml_collections.ConfigDict()
    node = node[parent]
  old = node.get(name)
  with node.ignore_type():
    node[name] = value
  return old


def normalize(config) -> Any:
  """Puts command-line forms into their canonical form in place (``eval.sets`` as a tuple of
  names); returns ``config``."""
  if 'eval' in config and 'sets' in config.eval:
    with config.ignore_type():
      config.eval.sets = eval_sets(config)
  return config


def num_classes(config, task: str, data_counts: Mapping[str, int] | None = None) -> int:
  """Classes of a task's head: config value, else from the data, else the catalog."""
  n = int(config.tasks[task].num_classes)
  if data_counts is not None and task in data_counts:
    found = int(data_counts[task])
    if n and n < found:
      raise ConfigError(f'config.tasks.{task}.num_classes: {n} is smaller than the {found} '
                        'identities found in the converted data')
    return n or found
  if n:
    return n
  if config.input.source == 'synthetic' and int(config.input.synthetic_num_classes):
    return int(config.input.synthetic_num_classes)
  return catalog.task_num_classes(task, tuple(config.tasks[task].datasets))


# --------------------------------------------------------------------------------------------
# The run's config, saved beside its checkpoints (WORKDIR/config.json).
# --------------------------------------------------------------------------------------------
RUN_CONFIG_FILE = 'config.json'


def _tuples(node: Any) -> Any:
  """JSON lists back to the tuples the config files use; dicts stay dicts."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node


def config_to_json(config) -> str:
  """The config as JSON (tuples become lists; ``config_from_json`` turns them back)."""
  return config.to_json_best_effort(indent=2, sort_keys=False)


def config_from_json(text: str, what: str = 'config JSON'):
  """A ``ConfigDict`` from ``config_to_json``'s output."""
  import json

  import ml_collections

  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{what}: not valid JSON ({e})') from None
  if not isinstance(data, dict):
    raise ConfigError(f'{what}: expected a JSON object, got {type(data).__name__}')
  check_saved_keys(data, what)
  return ml_collections.ConfigDict(_tuples(data))


def check_saved_keys(data: Mapping[str, Any], what: str) -> None:
  """A key of a saved config (``data``, read from ``what``) that is not a config field but
  close to a field the file lacks (``train.stpes`` for ``train.steps``): a ``ConfigError``
  naming the file, the key and the closest known key (the fields of configs/ufo_l.py; task
  names are free, their fields are compared with a task's). Other extra keys are kept."""
  import difflib

  if not os.path.isfile(os.path.join(CONFIG_DIR, 'ufo_l.py')):
    return  # an install without configs/: nothing to compare with
  reference = load_config('ufo_l').to_dict()
  task_fields: dict[str, Any] = {}
  for task in reference.get('tasks', {}).values():
    task_fields.update(task)

  def visit(node: Mapping[str, Any], ref: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if prefix == 'tasks.':
        if isinstance(value, dict):
          visit(value, task_fields, f'tasks.{key}.')
        continue
      if key in ref:
        if isinstance(value, dict) and isinstance(ref[key], dict):
          visit(value, ref[key], f'{prefix}{key}.')
        continue
      close = difflib.get_close_matches(str(key), [k for k in ref if k not in node], n=1,
                                        cutoff=0.7)
      if close:
        raise ConfigError(f'{what}: unknown key {prefix}{key!s}; the closest known key is '
                          f'{prefix}{close[0]}, which the file lacks (correct the key in the file)')

  visit(data, reference, '')


def save_run_config(config, workdir: str) -> str:
  """Writes ``config`` to ``workdir/config.json`` (atomically); returns the path."""
  from etils import epath

  path = epath.Path(workdir) / RUN_CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (RUN_CONFIG_FILE + '.tmp')
  tmp.write_text(config_to_json(config))
  tmp.replace(path)  # atomic, and over an existing file (rename refuses one)
  return os.fspath(path)


def find_run_config(path: str) -> str | None:
  """The ``config.json`` of the run that ``path`` belongs to, or None.

  ``path`` is a workdir, its ``checkpoints/`` folder, one step folder
  (``checkpoints/2000``) or an export folder that kept the run's config.
  """
  from etils import epath

  p = epath.Path(path)
  for folder in (p, p.parent, p.parent.parent):
    candidate = folder / RUN_CONFIG_FILE
    if candidate.exists():
      return os.fspath(candidate)
  return None


def load_run_config(path: str):
  """The config saved with the run at ``path`` (see ``find_run_config``).

  Raises:
    FileNotFoundError: with one line saying where it looked and what to pass instead.
  """
  from etils import epath

  found = find_run_config(path)
  if found is None:
    raise FileNotFoundError(
        f'no {RUN_CONFIG_FILE} for the run at {path} (looked in it and the two folders above); '
        'pass the config the run was trained with (--config=configs/...)')
  return config_from_json(epath.Path(found).read_text(), what=found)


def pretrained_path(config) -> str | None:
  """The checkpoint ``config.model.pretrained`` names, or None for 'none' (from scratch).

  Checked at the start of training (a fresh start; resuming reads the run's checkpoint):
  an unset value or a missing file is a ConfigError naming the recommended checkpoint and
  how to get it.
  """
  value = str(config.model.get('pretrained', '')).strip()
  if value == NO_PRETRAINED:
    return None
  get = (f'the recipe starts from {RECOMMENDED_CHECKPOINT} (get it: '
         f'{RECOMMENDED_CHECKPOINT_HOWTO}); --config.model.pretrained={NO_PRETRAINED} trains '
         'from scratch')
  if not value:
    raise ConfigError(f'config.model.pretrained is not set: {get}')
  if not os.path.isfile(value) and not os.path.isfile(os.path.join(value, 'model.json')):
    raise ConfigError(f'config.model.pretrained={value}: no such file (nor an export folder); '
                      f'{get}')
  return value


# --------------------------------------------------------------------------------------------
# Resuming a run: the saved config, explicit overrides on top, and which changes are refused.
# --------------------------------------------------------------------------------------------
# Fields whose change alters the shapes or the meaning of the train state or of the saved data
# iterator: a resumed run (or an evaluation of its checkpoints) refuses to change them.
LOCKED_FIELDS = (
    'seed', 'model.backbone', 'model.variant', 'model.depth', 'model.scan_layers',
    'input.image_size', 'input.source', 'input.batch_mode', 'input.synthetic_num_classes',
    'tasks', 'tasks.*.datasets', 'tasks.*.batch_size', 'tasks.*.num_classes',
    'tasks.*.sampler', 'tasks.*.num_instances', 'optim.name', 'optim.momentum',
    'optim.nesterov')
_MISSING = '<not set>'


def flatten(config) -> dict[str, Any]:
  """The config as ``{dotted.field: value}`` (sequences are values, as lists become tuples)."""
  flat: dict[str, Any] = {}

  def visit(prefix: str, node: Any) -> None:
    if hasattr(node, 'items'):
      for key, value in node.items():
        visit(f'{prefix}{key}.', value)
    else:
      flat[prefix[:-1]] = tuple(node) if isinstance(node, list) else node

  visit('', config)
  return flat


def is_locked(field: str) -> bool:
  """Whether changing ``field`` (dotted) on resume would change the train state."""
  import fnmatch

  return any(fnmatch.fnmatchcase(field, pattern) for pattern in LOCKED_FIELDS)


def run_config_changes(saved, config) -> tuple[list[tuple[str, Any, Any]],
                                                 list[tuple[str, Any, Any]]]:
  """``(locked, harmless)`` differences ``(field, saved value, new value)`` between a run's
  saved config and the config a rerun asks for."""
  locked, harmless = [], []
  old_tasks, new_tasks = task_names(saved), task_names(config)
  if old_tasks != new_tasks:
    locked.append(('tasks', old_tasks, new_tasks))
  old, new = flatten(saved), flatten(config)
  for field in list(old) + [f for f in new if f not in old]:
    a, b = old.get(field, _MISSING), new.get(field, _MISSING)
    if a == b or (field.startswith('tasks.') and field.split('.')[1] not in
                  set(old_tasks) & set(new_tasks)):
      continue
    (locked if is_locked(field) and a is not _MISSING else harmless).append((field, a, b))
  return locked, harmless


def check_resume(saved, config, where: str) -> list[tuple[str, Any, Any]]:
  """Raises ``ConfigError`` (one line) if ``config`` changes a locked field of the run saved at
  ``where``; returns the harmless changes ``(field, old, new)``."""
  locked, harmless = run_config_changes(saved, config)
  if locked:
    field, a, b = locked[0]
    more = f' (and {len(locked) - 1} more: {", ".join(f for f, _, _ in locked[1:])})' \
        if len(locked) > 1 else ''
    raise ConfigError(
        f'config.{field}: the run in {where} was trained with {a!r}, this run asks for {b!r}'
        f'{more}; that changes the train state, so it cannot resume: drop the override or '
        'start a new --workdir')
  return harmless


def apply_overrides(base, overrides: Mapping[str, Any]):
  """A copy of ``base`` with ``{dotted.field: value}`` set (missing fields are created)."""
  import copy

  config = copy.deepcopy(base)
  for field, value in overrides.items():
    set_field(config, field, value, create=True)
  return config


def fill_missing(config, defaults):
  """Adds to ``config`` (in place) the fields of ``defaults`` it lacks: a run saved by an
  older version gets the newer fields' defaults. Returns the dotted names added."""
  added = []

  def visit(node: Any, ref: Any, prefix: str) -> None:
    for key, value in ref.items():
      if key not in node:
        if prefix == 'tasks.':
          continue  # the task set is the run's, never the defaults'
        node[key] = value
        added.append(prefix + key)
      elif hasattr(value, 'items') and hasattr(node[key], 'items'):
        visit(node[key], value, f'{prefix}{key}.')

  visit(config, defaults, '')
  return added
