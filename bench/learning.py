"""Learning-quality benchmark: does the training recipe still learn as well as it did?

    python bench/learning.py --workdir=/tmp/learning                       # the correct recipe
    python bench/learning.py --workdir=/tmp/learning --recipe=shuffled_labels
    python bench/learning.py --workdir=/tmp/learning --recipe=neck_batch_stats
    python bench/learning.py --workdir=/tmp/learning --recipe=wrong_margin_sign
    python bench/learning.py --workdir=/tmp/learning --reduced            # what the tests run

Trains ``configs/ufo_tiny.py`` from scratch with a fixed seed and budget (the demo's: 600 steps
at 32 px, ``ufo_jax.demo``'s hard size preset) on the HARD generated data of
``data_prep.generate --difficulty=hard`` (fine-grained identities under strong nuisances, in every
raw layout, converted with ``data_prep.build``), evaluates the 13 benchmarks and prints ONE JSON
line: ``numbers`` (benchmark -> headline metric in %: verification accuracy, rank-1, Recall@1),
``chance`` (the same for random features), ``recipe``, ``seed``, ``steps``, ``seconds``.

Recipes (the two sabotages are recipe bugs the benchmark must catch; docs/PERFORMANCE.md has
the measured numbers):
  correct           the recipe as configured.
  shuffled_labels   training images show random identities whatever their labels (the labels
                    are shuffled within each task: ``data_prep.generate --shuffled_labels``); the
                    test splits are unchanged. Should fall to about chance.
  neck_batch_stats  each task's BatchNorm neck takes its training statistics over the whole
                    mixed batch instead of its own task's rows
                    (``config.model.sabotage_neck_statistics='batch'``).
  wrong_margin_sign every task's CosFace margin with the wrong sign: the target logit gets
                    ``+m`` instead of ``-m`` (``config.train.sabotage_margin_sign=-1``).

``--reduced`` is the version of tests/test_learning_reduced.py: two tasks (person on Market-1501,
product on SOP), a depth-2 ViT-Ti, fewer identities and steps, evaluated on those two sets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ufo_jax import demo  # noqa: E402

RECIPES = ('correct', 'shuffled_labels', 'neck_batch_stats', 'wrong_margin_sign')
REDUCED_SETS = ('market1501', 'sop')
# The reduced version (tests/test_learning_reduced.py): fewer identities, a depth-2 ViT, 2 tasks.
REDUCED_SIZE = demo.DemoSize(num_ids=48, num_test_ids=100, images_per_id=4, raw_image_size=32,
                             num_pairs=20, steps=400, image_size=32)
REDUCED_DEPTH = 2


def generate_and_convert(workdir: str, size: demo.DemoSize, *, shuffled: bool, seed: int,
                         datasets: tuple[str, ...] | None = None,
                         difficulty: str = 'hard') -> str:
  """Generated data (with shuffled training labels if ``shuffled``), converted; its dir."""
  tag = difficulty + ('_shuffled' if shuffled else '')
  raw, data = os.path.join(workdir, f'raw_{tag}'), os.path.join(workdir, f'data_{tag}')
  gen = ['-m', 'data_prep.generate', f'--raw_root={raw}', f'--seed={seed}',
         f'--num_ids={size.num_ids}', f'--num_test_ids={size.num_test_ids}',
         f'--images_per_id={size.images_per_id}', f'--image_size={size.raw_image_size}',
         f'--num_pairs={size.num_pairs}', f'--difficulty={difficulty}',
         f'--shuffled_labels={str(shuffled).lower()}']
  names = 'all' if datasets is None else ','.join(datasets)
  if datasets is not None:
    gen.append(f'--datasets={names}')
  if not os.path.exists(os.path.join(data, '.complete')):
    shutil.rmtree(raw, ignore_errors=True)
    demo._run(gen)  # pylint: disable=protected-access
    demo._run(['-m', 'data_prep.build', f'--dataset={names}', f'--raw_root={raw}',  # noqa
               f'--out_dir={data}', '--skip_count_check'])
    open(os.path.join(data, '.complete'), 'w').close()
  return data


def learning_config(data_dir: str, size: demo.DemoSize, *, recipe: str, steps: int, seed: int,
                    reduced: bool):
  """configs/ufo_tiny.py as the demo trains it, with ``recipe``'s sabotage (if any)."""
  config = demo.demo_config(data_dir, size, steps=steps, seed=seed)
  if reduced:
    config = demo.person_and_product(config)
    config.model.depth = REDUCED_DEPTH
    config.eval.sets = REDUCED_SETS
  config.eval.figures = False
  config.train.keep_checkpoints = 1
  if recipe == 'neck_batch_stats':
    config.model.sabotage_neck_statistics = 'batch'  # BENCHMARK SABOTAGE
  if recipe == 'wrong_margin_sign':
    config.train.sabotage_margin_sign = -1  # BENCHMARK SABOTAGE: CosFace margins -m, not +m
  return config


def run(workdir: str, recipe: str = 'correct', *, steps: int = 0, seed: int = 0,
        reduced: bool = False, difficulty: str = 'hard') -> dict[str, Any]:
  """Trains and evaluates ``recipe``; returns the JSON dict that ``main`` prints."""
  from ufo_jax import train

  if recipe not in RECIPES:
    raise ValueError(f'recipe must be one of {RECIPES}, got {recipe!r}')
  size = REDUCED_SIZE if reduced else demo.resolve_size('demo', 'hard')
  steps = steps or size.steps
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  data = generate_and_convert(workdir, size, shuffled=recipe == 'shuffled_labels', seed=0,
                              datasets=REDUCED_SETS if reduced else None,
                              difficulty=difficulty)
  config = learning_config(data, size, recipe=recipe, steps=steps, seed=seed, reduced=reduced)
  run_dir = os.path.join(workdir, f'run_{difficulty}_{recipe}_seed{seed}')
  if not demo._finished(run_dir, steps):  # noqa: SLF001  (a finished run is only evaluated)
    shutil.rmtree(run_dir, ignore_errors=True)
  train.train_and_evaluate(config, run_dir)
  with open(demo._latest_report(run_dir)['json'], encoding='utf-8') as f:  # noqa: SLF001
    report = json.load(f)
  first = lambda d: {k: round(float(v[0]), 2) for k, v in d.items()}  # noqa: E731
  return {'recipe': recipe, 'seed': seed, 'steps': steps, 'reduced': reduced,
          'difficulty': difficulty,
          'numbers': first(report['ours']), 'chance': first(report.get('chance', {})),
          'seconds': round(time.time() - t0, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/ufo_learning')
  parser.add_argument('--recipe', default='correct',
                      help=f'one of {RECIPES}, or several, comma-separated (one JSON line each)')
  parser.add_argument('--steps', type=int, default=0, help='0: the budget of the size')
  parser.add_argument('--seed', type=int, default=0, help='training seed (the data: seed 0)')
  parser.add_argument('--reduced', action='store_true', help='the tests\' reduced version')
  parser.add_argument('--difficulty', default='hard', choices=('hard', 'easy'),
                      help='the generated data (data_prep.generate --difficulty)')
  args = parser.parse_args()
  recipes = args.recipe.split(',')
  bad = [r for r in recipes if r not in RECIPES]
  if bad:
    parser.error(f'--recipe: unknown {bad}; expected names from {RECIPES}')
  # The recipes compile the same programs (only data and a mask differ): compile them once.
  demo._enable_compilation_cache(os.path.join(os.path.abspath(args.workdir), 'xla_cache'))  # noqa
  for recipe in recipes:
    out = run(args.workdir, recipe, steps=args.steps, seed=args.seed, reduced=args.reduced,
              difficulty=args.difficulty)
    print(json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
