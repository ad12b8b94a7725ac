"""UFO AllInOne, the recipe of docs/TRAINING.md: ViT-L/16 at 384, four tasks, 100k steps.

  python -m ufo_jax.main --config=configs/ufo_l.py --workdir=DIR \
      --config.input.data_dir=CONVERTED_DIR

Every value of the published recipe lives here; ``ufo_jax.config.validate``
checks the whole dict when it is loaded.

Pod presets: ``--config=configs/ufo_l.py:v5p-128`` (or ``v5e-256``, ``v6e-256``) keeps the recipe
and sets the mesh and ``model.remat_policy`` for that pod (``POD_PRESETS``): the least
rematerialisation that leaves at least 10% of the chip's HBM free, from the ``--mode=aot`` table
in docs/PERFORMANCE.md. ``config.pod`` names the pod (``--mode=aot`` compiles for it).
"""

import ml_collections

from ufo_jax import catalog
from ufo_jax import config as config_lib


def task_config(task: str, **kwargs) -> ml_collections.ConfigDict:
  """One of the recipe's tasks over its catalog training sets (``ufo_jax.config.task_config``)."""
  return config_lib.task_config(datasets=catalog.TRAIN_SETS[task], **kwargs)


# Pod presets (docs/PERFORMANCE.md, "Pods (ahead-of-time compile)"): mesh and remat policy.
POD_PRESETS = {  # per-chip memory of the train step (--mode=aot) / HBM
    'v5p-128': dict(mesh=dict(data=-1, fsdp=1), remat_policy='none'),           # 75.3 / 95 GiB
    'v5e-256': dict(mesh=dict(data=-1, fsdp=1), remat_policy='dots_saveable'),  # 12.1 / 16 GiB
    'v6e-256': dict(mesh=dict(data=-1, fsdp=1), remat_policy='none'),           # 21.4 / 32 GiB
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The recipe; ``arg`` (``configs/ufo_l.py:ARG``) names a pod preset of ``POD_PRESETS``."""
  if arg and arg not in POD_PRESETS:
    raise ValueError(f'configs/ufo_l.py:{arg}: unknown pod preset; known: '
                     f'{", ".join(POD_PRESETS)}')
  config = ml_collections.ConfigDict()
  config.name = 'ufo_l'
  config.seed = 0

  # Tasks, in the UFO release's order (docs/TRAINING.md): CosFace (s, m) per task, triplet
  # where it applies.
  config.tasks = ml_collections.ConfigDict()
  config.tasks.face = task_config('face', batch_size=1024, scale=50.0, margin=0.3, triplet=False)
  config.tasks.person = task_config('person', batch_size=512, scale=30.0, margin=0.2,
                                    triplet=True)
  config.tasks.product = task_config('product', batch_size=512, scale=30.0, margin=0.2,
                                     triplet=True)
  config.tasks.vehicle = task_config('vehicle', batch_size=512, scale=20.0, margin=0.2,
                                     triplet=True)

  # Input.
  config.input = ml_collections.ConfigDict()
  config.input.source = 'tfds'          # 'tfds' (converted data) or 'synthetic'
  config.input.data_dir = ''            # data_prep --out_dir
  config.input.image_size = 384
  config.input.batch_mode = 'heterogeneous'  # or 'homogeneous' (one task per step, ablation)
  config.input.worker_count = 8         # grain worker processes per host
  config.input.worker_buffer_size = 2
  config.input.synthetic_num_classes = 0  # synthetic input: classes per task (0: full size)
  config.input.allow_partial_data = False  # True: use sets whose counts differ from the
                                           # published ones (converted with --skip_count_check)
  config.input.augment = ml_collections.ConfigDict(dict(
      autoaugment_prob=0.5,             # AutoAugment, original (ImageNet) policy
      autoaugment_fill=128,
      pad=10,                           # pad then random crop back to image_size (10 px of
                                        # 384: smaller inputs scale it, configs/ufo_tiny.py)
      flip_prob=0.5,
      mean=127.5,
      std=127.5,
      erasing_prob=0.5,                 # random erasing with per-pixel noise
      erasing_area=(0.02, 1 / 3),
      erasing_aspect=(0.3, 3.3),
  ))

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.backbone = 'vit'         # 'vit' or 'resnet'
  config.model.variant = 'L/16'         # ViT: Ti/16 S/16 B/16 L/16 H/14; ResNet: depth '50'
  config.model.drop_path_rate = 0.2     # 0.1 in the ablation
  config.model.depth = 0                # ViT depth override (0: the variant's; for tests)
  config.model.dtype = 'bfloat16'       # compute dtype; parameters stay float32
  config.model.scan_layers = True
  config.model.remat_policy = 'nothing_saveable'
  config.model.attention_impl = 'xla'   # 'xla' or 'cudnn'
  config.model.sharded_softmax = True   # CosFace as a model-parallel softmax over the devices
  # REQUIRED: the local ViT-L/16 checkpoint (.safetensors / .npz) training starts from; the
  # recipe assumes timm/vit_large_patch16_224.augreg_in21k (docs/MODELS.md). 'none': from
  # scratch, on purpose. Unset or missing is an error when training starts.
  config.model.pretrained = ''

  # Optimizer (docs/TRAINING.md, ufo_jax/optim.py).
  config.optim = ml_collections.ConfigDict(dict(
      name='sgd',
      lr=0.2,
      momentum=0.0,                     # the reference ran plain SGD
      nesterov=False,
      weight_decay=1e-4,                # coupled L2
      grad_clip=5.0,
      clip_mode='per_param',            # or 'global'
      warmup_fraction=0.1,
      final_lr_fraction=0.02,
  ))

  # Training loop.
  config.train = ml_collections.ConfigDict(dict(
      steps=100_000,
      log_every=100,
      checkpoint_every=2_000,
      keep_checkpoints=3,               # the last N
      keep_every=20_000,                # and every Mth step forever
      on_nonfinite='stop',              # non-finite loss/gradient: 'stop' the run, or 'skip'
      max_nonfinite_steps=10,           # 'skip': stop after this many in a row
      stop_sync_every=10,               # multi-process: agree on SIGTERM/SIGINT every N steps
      on_bad_checkpoint='fallback',     # damaged latest step: the newest intact one, or 'stop'
  ))

  # Device mesh: data parallel x FSDP; -1 takes all remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  # Evaluation (docs/EVALUATION.md).
  config.eval = ml_collections.ConfigDict(dict(
      sets=catalog.BENCHMARKS,
      every_steps=10_000,
      batch_size=512,
      vehicleid_repeats=10,
      vehicleid_seed=0,
      ufo_protocols=False,              # True: as UFO's evaluation_script.py (one VehicleID
                                        # draw, SOP drops the nearest neighbour); EVALUATION.md
      figures=True,
      rank_list_queries=3,              # rank-list figures per re-id set
      skip_missing=False,               # True: skip test sets that are not converted
      worker_count=0,                   # grain workers decoding evaluation images
      dtype='float32',                  # embedding compute dtype: float32 or bfloat16
      thresholds=True,                  # cosine thresholds at FAR 1e-2..1e-4 (docs/EVALUATION.md)
      compare_to='',                    # an earlier report.json: adds a "before" row and the
                                        # change per benchmark (docs/CUSTOM_DATA.md)
  ))

  if arg:  # a pod preset: same recipe, the pod's mesh and rematerialisation
    preset = POD_PRESETS[arg]
    config.pod = arg
    config.mesh.update(preset['mesh'])
    config.model.remat_policy = preset['remat_policy']
  return config
