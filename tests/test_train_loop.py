"""The training loop's hygiene, in process: non-finite steps, on-device interval metrics,
accuracy, the unwritable workdir, resume refusals, and the paths users run (TFDS input with
worker processes and evaluation during training, bfloat16 and ResNet train steps).

Tiny models (ViT-Ti with 2 scanned blocks and drop path, as users train, or ResNet-18, at 32 x 32)
compiled at XLA optimisation level 0.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufo_jax import checkpoint, metrics, pytree, sharding, train
from ufo_jax import config as config_lib
from ufo_jax import step as step_lib
from ufo_jax.data import synthetic
from ufo_jax.models import multitask
from ufo_test_utils import FlatBackbone, assert_trees_equal, host_copy

FAST_COMPILE = {'xla_backend_optimization_level': 0}
CLASSES = {'face': 8, 'person': 8}


def small_config(**overrides):
  """ufo_tiny at 32 x 32, two scanned ViT blocks with drop path (the recipe's layout), two tasks
  (CosFace; CosFace + triplet: every loss path, and faster to compile than four)."""
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 32
  config.model.depth = 2
  config.model.scan_layers = True
  assert config.model.drop_path_rate > 0
  config.optim.warmup_fraction = 0.0
  config.train.steps = 20
  del config.tasks['product']
  del config.tasks['vehicle']
  for task in config.tasks:
    config.tasks[task].batch_size = 8
  for key, value in overrides.items():
    config_lib.set_field(config, key, value)
  return config


@pytest.fixture(scope='module')
def setup():
  config = small_config()
  mesh = sharding.create_mesh(config.mesh)
  s = step_lib.build(config, CLASSES, mesh, compiler_options=FAST_COMPILE)
  data = iter(synthetic.create_synthetic_dataset(config, s.num_classes))
  batches = [sharding.make_global_batch(next(data), mesh) for _ in range(4)]
  return config, s, batches


def _counters(tree):
  """The state split into its step counters (optax's schedule ``count``, the nnx ``RngCount``s of
  drop path) and the rest, as host copies keyed by path."""
  counters, rest = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_copy(tree))[0]:
    names = pytree.path_to_strings(path)
    (counters if names[-1:] == ('count',) else rest)['/'.join(names)] = leaf
  return counters, rest


def _poison(state):
  """The state with the face classifier's weights NaN: face/cosface is NaN, nothing else."""
  state = jax.tree.map(lambda x: x, state)
  w = state['params']['heads']['face']['class_weights']
  w[...] = jnp.full_like(w[...], jnp.nan)
  return state


def test_interval_sums_on_device_equal_the_steps_metrics(setup):
  config, s, batches = setup
  # Each step alone (the sums of a one-step interval), then the same three steps summed.
  state, acc = s.init(), s.init_metrics()
  per_step = []
  for batch in batches[:3]:
    state, acc = s.loop_step(state, acc, batch)
    per_step.append(metrics.interval_averages(jax.device_get(acc)))
    acc = s.reset_metrics(acc)
  state, acc = s.init(), s.init_metrics()
  for batch in batches[:3]:
    state, acc = s.loop_step(state, acc, batch)
  values = jax.device_get(acc)
  assert int(values['counts']['steps']) == 3 and not bool(values['halted'])
  averages = metrics.interval_averages(values)
  assert set(averages) == set(metrics.metric_names(config))
  for name in averages:  # every task has examples in every heterogeneous batch
    want = np.mean([m[name] for m in per_step])
    np.testing.assert_allclose(averages[name], want, rtol=1e-5, err_msg=name)
  assert 0.0 <= averages['face/accuracy'] <= 1.0
  assert averages['person/examples'] == 8.0
  assert metrics.loss_terms(config) == ('face/cosface', 'person/cosface', 'person/triplet')
  assert per_step[0]['total'] != per_step[1]['total']  # three different steps
  # The reset keeps the streak and the halt, zeroes the sums.
  reset = jax.device_get(s.reset_metrics(acc))
  assert int(reset['counts']['steps']) == 0 and float(reset['sums']['total']) == 0.0
  assert int(reset['limit']) == 1


def test_batch_accuracy_equals_an_independent_argmax():
  config = small_config()
  settings = step_lib.task_losses(config)
  rngs = nnx.Rngs(0)
  classes = {'face': 6, 'person': 5}
  model = multitask.MultiTaskModel(FlatBackbone(48, 8, rngs=rngs), classes, rngs=rngs,
                                   class_multiple=4)
  model.train()
  rng = np.random.default_rng(1)
  task = np.repeat(np.arange(2), 12)
  labels = np.concatenate([rng.integers(0, classes[t], 12) for t in classes])
  images = jnp.asarray(rng.normal(size=(24, 4, 4, 3)), jnp.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    outputs = model(images, jnp.asarray(task))
    weights = {n: model.heads[n].class_weights[...] for n in classes}
    return outputs, weights, step_lib.batch_accuracy(model, outputs, jnp.asarray(labels), settings)

  outputs, weights, got = run(state)
  for index, name in enumerate(classes):
    rows = task == index
    emb = np.asarray(outputs[name]['embedding'])[rows]
    w = np.asarray(weights[name])[:, :classes[name]]
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    want = np.mean(np.argmax(cos, axis=1) == labels[rows])
    np.testing.assert_allclose(float(got[f'{name}/accuracy']), want, err_msg=name)
    assert 0.0 < want < 1.0 or name == 'face', (name, want)  # not trivially 0 or 1


def test_nonfinite_step_never_updates_the_state_and_stop_halts(setup):
  _, s, batches = setup
  state, acc = s.loop_step(s.init(), s.init_metrics(), batches[0])
  poisoned = _poison(state)
  before = host_copy(poisoned)
  state, acc = s.loop_step(poisoned, acc, batches[1])
  values = jax.device_get(acc)
  assert bool(values['halted']) and int(values['bad_step']) == 2
  bad = {k for k, v in values['bad_terms'].items() if bool(v)}
  assert bad == {'face/cosface', 'grad_norm'}, bad
  # Parameters, momentum and BatchNorm statistics as before; the counters moved on: the step,
  # the schedule's count (the lr applied next is the lr logged) and drop path's rng counts.
  (old_counts, old_rest), (new_counts, new_rest) = _counters(before), _counters(state)
  assert new_rest.pop('step') == 2 and old_rest.pop('step') == 1
  assert_trees_equal(new_rest, old_rest)
  assert any('rngs' in k for k in new_counts) and any('opt_state' in k for k in new_counts)
  for key, count in new_counts.items():
    assert np.all(count > old_counts[key]), key
  opt_counts = [v for k, v in new_counts.items() if k.startswith('opt_state')]
  assert all(int(v) == 2 for v in opt_counts), opt_counts  # schedule(count) == schedule(step)
  # Halted: a finite step no longer updates the state either, and is not averaged.
  state['params']['heads']['face']['class_weights'][...] = jnp.zeros((192, 8))
  frozen = host_copy(state)
  state, acc = s.loop_step(state, acc, batches[2])
  assert_trees_equal(_counters(state)[1] | {'step': np.int32(0)},
                     _counters(frozen)[1] | {'step': np.int32(0)})
  assert int(jax.device_get(acc['counts']['steps'])) == 1
  message = metrics.nonfinite_message(jax.device_get(acc), small_config(), 1)
  assert message.startswith('step 2: non-finite loss face/cosface and gradient norm'), message


def test_skip_policy_drops_updates_and_stops_after_n_in_a_row(setup):
  _, s, batches = setup
  acc = s.init_metrics()
  # train.on_nonfinite='skip', max_nonfinite_steps=2 (placed like the rest: no recompilation)
  acc['limit'] = jax.device_put(jnp.full((), 2, jnp.int32), sharding.replicated(s.mesh))
  state, acc = s.loop_step(_poison(s.init()), acc, batches[0])
  values = jax.device_get(acc)
  assert not bool(values['halted']) and int(values['consecutive']) == 1
  assert int(values['nonfinite']) == 1 and int(values['counts']['steps']) == 0
  # A finite step resets the streak and updates the state.
  state['params']['heads']['face']['class_weights'][...] = jnp.ones((192, 8)) * 1e-3
  before = host_copy(state)
  state, acc = s.loop_step(state, acc, batches[1])
  assert int(jax.device_get(acc['consecutive'])) == 0
  assert not np.array_equal(host_copy(state)['params']['backbone']['norm']['scale'],
                            before['params']['backbone']['norm']['scale'])
  for batch in batches[2:4]:
    state, acc = s.loop_step(_poison(state), acc, batch)
  values = jax.device_get(acc)
  assert bool(values['halted']) and int(values['bad_step']) == 4
  assert int(values['nonfinite']) == 3


def test_nan_run_stops_with_the_step_and_keeps_the_good_checkpoints(tmp_path):
  # lr 1e30: step 1 is finite, its update makes every later loss non-finite.
  config = small_config(**{'optim.lr': 1e30, 'train.steps': 5, 'train.checkpoint_every': 1,
                           'train.log_every': 0, 'train.keep_checkpoints': 1})
  with pytest.raises(checkpoint.NonFiniteError, match=r'^step 2: non-finite loss face/cosface'):
    train.train_and_evaluate(config, str(tmp_path), compiler_options=FAST_COMPILE)
  manager = checkpoint.create_manager(str(tmp_path / 'checkpoints'), read_only=True)
  assert list(manager.all_steps()) == [1]
  setup = step_lib.build(config, checkpoint.restore_meta(manager, 1)['num_classes'],
                      sharding.create_mesh(config.mesh))
  state = host_copy(checkpoint.restore(manager, setup.abstract_state, step=1))
  manager.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


def test_unwritable_workdir_is_one_line_before_anything_is_built(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  with pytest.raises(config_lib.ConfigError, match='cannot write there') as e:
    train.train_and_evaluate(small_config(), str(blocker / 'run'))
  assert '\n' not in str(e.value) and str(blocker / 'run') in str(e.value)


def test_resume_refuses_state_changing_overrides_and_applies_harmless_ones():
  saved = small_config()
  config = small_config(**{'train.steps': 99, 'eval.sets': ('lfw',), 'input.worker_count': 3})
  harmless = config_lib.check_resume(saved, config, 'W/config.json')
  assert {f for f, _, _ in harmless} == {'train.steps', 'eval.sets', 'input.worker_count'}
  for field, value in (('model.variant', 'S/16'), ('input.image_size', 64),
                       ('tasks.person.batch_size', 16), ('tasks.face.num_classes', 10),
                       ('tasks.person.datasets', ('msmt17',)), ('model.backbone', 'resnet')):
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.check_resume(saved, small_config(**{field: value}), 'W/config.json')
    message = str(e.value)
    assert message.startswith(f'config.{field}: the run in W/config.json was trained with ')
    assert repr(value) in message and '\n' not in message
  one_task = small_config()
  del one_task.tasks['person']
  with pytest.raises(config_lib.ConfigError, match="config.tasks: .*'person'"):
    config_lib.check_resume(saved, one_task, 'W/config.json')
  # Explicit overrides on top of a saved config; fields new since it was saved are added.
  merged = config_lib.apply_overrides(config_lib.config_from_json(
      config_lib.config_to_json(saved)), {'train.steps': 7, 'eval.sets': ('lfw,sop',)})
  assert merged.train.steps == 7 and saved.train.steps == 20
  assert config_lib.eval_sets(merged) == ('lfw', 'sop')
  del merged.train['on_nonfinite']
  assert config_lib.fill_missing(merged, small_config()) == ['train.on_nonfinite']


def test_tfds_workers_and_evaluation_during_training_leave_no_shared_memory(
    converted_data, tmp_path):
  data_dir, _ = converted_data
  config = small_config(**{'input.source': 'tfds', 'input.data_dir': data_dir,
                           'input.worker_count': 2, 'train.steps': 4, 'train.log_every': 2,
                           'train.checkpoint_every': 0, 'eval.every_steps': 2,
                           'eval.sets': ('lfw',), 'eval.batch_size': 16, 'eval.figures': False})
  for task in config.tasks:
    config.tasks[task].batch_size = 4
  state = train.train_and_evaluate(config, str(tmp_path), compiler_options=FAST_COMPILE)
  assert int(state['step']) == 4
  for step in (2, 4):  # evaluated during training and at the end
    assert (tmp_path / 'eval' / f'step_{step}' / 'report.json').exists(), step
  if os.path.isdir('/dev/shm'):
    left = [n for n in os.listdir('/dev/shm') if n.startswith(f'ufo{os.getpid()}_')]
    assert not left, left


@pytest.mark.parametrize('overrides', [{'model.dtype': 'bfloat16'},
                                       {'model.backbone': 'resnet', 'model.variant': '18'}],
                         ids=['vit_bfloat16', 'resnet18'])
def test_other_backbones_and_dtypes_train(overrides):
  config = small_config(**overrides)
  config.optim.lr = 0.05
  config.model.drop_path_rate = 0.0
  config.input.augment.erasing_prob = 0.0
  mesh = sharding.create_mesh(config.mesh)
  s = step_lib.build(config, CLASSES, mesh, compiler_options=FAST_COMPILE)
  data = iter(synthetic.create_synthetic_dataset(config, s.num_classes))
  batch = sharding.make_global_batch(next(data), mesh)
  state = s.init()
  totals = []
  for _ in range(4):  # the same batch: its loss must go down
    state, metrics = s.train_step(state, batch)
    totals.append(float(metrics['total']))
  assert np.all(np.isfinite(totals)) and min(totals[1:]) < 0.9 * totals[0], totals
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state['params']))
