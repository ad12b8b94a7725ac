"""The seed's batch-composition ablation (docs/TRAINING.md): ResNet-50 on person + product.

  python -m ufo_jax.main --config=configs/ablation_batch_r50.py --workdir=DIR \
      --config.input.data_dir=CONVERTED_DIR --config.input.batch_mode=homogeneous
  ... --config.input.batch_mode=heterogeneous      (the other arm, the default)

Two tasks: person (Market1501 only) and product (SOP), evaluated on Market1501 (rank-1 / mAP)
and SOP (Recall@1); everything else is the ufo_l recipe (384 px, AutoAugment, CosFace +
triplet, SGD 0.2, 100k steps, 512 + 512 images per step). In the homogeneous arm each step
holds 1024 images of one task, drawn in proportion to the batch sizes (so half the steps each).

The seed published (ResNet-50):
  | batch         | Market1501 rank-1 / mAP | SOP Recall@1 |
  | homogeneous   | 73.13 / 50.58           | 79.54        |
  | heterogeneous | 94.27 / 85.77           | 85.76        |

Deviation: the ResNet-50 starts from scratch (model.pretrained='none'): the loader reads ViT
checkpoints only, and the seed does not say how its ResNet-50 was initialised.
"""

import importlib.util
import os

import ml_collections

# Load ufo_l.py beside this file (works whether or not configs/ is on sys.path).
_spec = importlib.util.spec_from_file_location(
    'ufo_jax_configs_ufo_l', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ufo_l.py'))
ufo_l = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ufo_l)

# The seed's table: {batch_mode: {benchmark: headline metric(s) in %}}.
SEED_RESULTS = {
    'homogeneous': {'market1501': (73.13, 50.58), 'sop': (79.54,)},
    'heterogeneous': {'market1501': (94.27, 85.77), 'sop': (85.76,)},
}


def get_config():
  config = ufo_l.get_config()
  config.name = 'ablation_batch_r50'
  recipe = config.tasks
  config.tasks = ml_collections.ConfigDict()
  for task, dataset in (('person', 'market1501'), ('product', 'sop')):
    config.tasks[task] = recipe[task]
    config.tasks[task].datasets = (dataset,)
  config.input.batch_mode = 'heterogeneous'  # --config.input.batch_mode=homogeneous: the arm
  config.model.backbone = 'resnet'
  config.model.variant = '50'
  config.model.pretrained = 'none'  # from scratch (see the module docstring)
  config.eval.sets = ('market1501', 'sop')
  return config
