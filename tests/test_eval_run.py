"""The evaluation run: extraction, protocols on converted test sets, report, figures, chance levels.

Fixtures: tiny raw datasets written by ``data_prep.generate`` and converted by
``data_prep.build.convert`` (one face set, one re-id set, VehicleID and SOP), a randomly
initialised 1-layer ViT-Ti multi-task model at 32 x 32.
"""

import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from ufo_jax import config as config_lib
from ufo_jax import sharding
from ufo_jax import data as data_lib
from ufo_jax.data import augment, device_ops
from ufo_jax.evaluation import extract, protocols, report, run
from ufo_jax.models import multitask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ('lfw', 'market1501', 'vehicleid', 'sop')
SIZE = 32
CLASSES = {'face': 3, 'person': 3, 'vehicle': 3, 'product': 3}


def make_config(data_dir=''):
  config = config_lib.load_config('ufo_tiny')
  config.input.source = 'tfds'
  config.input.data_dir = data_dir
  config.input.image_size = SIZE
  config.model.depth = 1
  config.eval.batch_size = 6
  config.eval.sets = SETS
  config.eval.vehicleid_repeats = 3
  return config


@pytest.fixture(scope='session')
def converted(tmp_path_factory):
  from data_prep import build, generate  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('eval_run_fixture')
  raw, out = root / 'raw', root / 'out'
  sizes = generate.Sizes(num_ids=4, images_per_id=3, image_size=SIZE, num_pairs=20)
  truth = {}
  for name in SETS:
    truth[name] = generate.write_dataset(name, raw, sizes=sizes)
    build.convert(name, truth[name].path, out, skip_count_check=True)
  return str(out), truth


@pytest.fixture(scope='module')
def model():
  return multitask.create_model(make_config(), CLASSES, rngs=nnx.Rngs(params=0, dropout=1))


def abstract_model(config=None):
  """The model's structure without weights: enough where the extraction is substituted."""
  config = config or make_config()
  classes = {t: CLASSES[t] for t in config.tasks}
  return nnx.eval_shape(lambda: multitask.create_model(config, classes, rngs=nnx.Rngs(0)))


def direct_embed(model, images_uint8, task):
  """The reference: preprocess + model.embed on one device, no jit, no batching."""
  x = device_ops.preprocess(jax.numpy.asarray(images_uint8), None, make_config().input.augment,
                            train=False)
  return np.asarray(model.embed(x, task))


def split_images(data_dir, name, split):
  """All images of a converted split as the eval transform makes them, read independently."""
  s = data_lib.open_split(data_dir, name, split)
  exs = s.read(range(len(s)))
  images = np.stack([augment.eval_transform(augment.decode_image(e['image']), SIZE) for e in exs])
  return images, np.array([e['id'] for e in exs]), np.array([e['camera'] for e in exs])


# --------------------------------------------------------------------------------------------
# Extraction.
# --------------------------------------------------------------------------------------------
def test_extract_split_in_order_equals_direct_embed(converted, model):
  data_dir, truth = converted
  images, ids, cams = split_images(data_dir, 'market1501', 'gallery')
  n = len(ids)
  assert n == len(truth['market1501'].splits['gallery']) == 14
  mesh = sharding.create_mesh(make_config().mesh)
  # Batch 4: 14 rows -> 4 batches, the last one half padding.
  ds = data_lib.create_eval_dataset(data_dir, 'market1501', 'gallery', image_size=SIZE,
                                    batch_size=4)
  assert len(ds) * 4 > n
  graphdef, state = nnx.split(model)
  emb = extract.extract_embeddings(graphdef, state, ds, 'person', mesh=mesh,
                                   augment_config=make_config().input.augment)
  assert emb.features.shape == (n, 192) and emb.features.dtype == np.float32
  np.testing.assert_array_equal(emb.index, np.arange(n))
  np.testing.assert_array_equal(emb.ids, ids)
  np.testing.assert_array_equal(emb.cameras, cams)
  want = {(it.id, it.camera) for it in truth['market1501'].splits['gallery']}
  assert set(zip(emb.ids.tolist(), emb.cameras.tolist())) == want
  np.testing.assert_allclose(emb.features, direct_embed(model, images, 'person'), rtol=2e-5,
                             atol=2e-5)
  # The head matters: the face embedding of the same images differs.
  face = direct_embed(model, images[:2], 'face')
  assert not np.allclose(face, emb.features[:2])


def test_extract_drops_masked_rows_and_sorts_by_index(model):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  # Two local batches of 3 (the second short: padded inside), rows out of order, one row
  # masked (an undecodable image) and one padding row.
  batches = [
      {'image': images[[4, 0, 5]], 'mask': np.array([True, False, False]),
       'index': np.array([4, 0, -1]), 'id': np.array([40, 0, -1]),
       'camera': np.array([1, 1, -1])},
      {'image': images[[1, 2]], 'mask': np.array([True, True]), 'index': np.array([1, 2]),
       'id': np.array([10, 20]), 'camera': np.array([2, 3])},
  ]
  mesh = sharding.create_mesh(make_config().mesh)
  graphdef, state = nnx.split(model)
  emb = extract.extract_embeddings(graphdef, state, batches, 'vehicle', mesh=mesh,
                                   augment_config=make_config().input.augment, progress=False)
  np.testing.assert_array_equal(emb.index, [1, 2, 4])
  np.testing.assert_array_equal(emb.ids, [10, 20, 40])
  np.testing.assert_array_equal(emb.cameras, [2, 3, 1])
  np.testing.assert_allclose(emb.features, direct_embed(model, images[[1, 2, 4]], 'vehicle'),
                             rtol=2e-5, atol=2e-5)


_MULTIPROCESS = textwrap.dedent('''
    import importlib.util, io, os, sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                               process_id=pid)
    import numpy as np
    from flax import nnx
    from PIL import Image
    from ufo_jax import sharding
    from ufo_jax.data import augment, device_ops
    from ufo_jax.data.eval_input import EvalDataset
    from ufo_jax.data.sources import MemorySplit
    from ufo_jax.evaluation import extract
    from ufo_jax.models import multitask
    from ufo_jax import config as config_lib
    config = config_lib.load_config('ufo_tiny')
    config.input.image_size = 32; config.model.depth = 1
    config.mesh.data, config.mesh.fsdp = 2, 2
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = sharding.create_mesh(config.mesh)
    # 13 images (PNG bytes); global batch 6 = 3 rows per process, padded to the 2 local devices.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    def png(a):
      buf = io.BytesIO(); Image.fromarray(a).save(buf, format='PNG'); return buf.getvalue()
    split = MemorySplit('toy', 'gallery', [{'image': png(a), 'id': 100 + i, 'camera': i % 3}
                                           for i, a in enumerate(pixels)])
    ds = EvalDataset(split, image_size=32, batch_size=6, process_index=pid, process_count=2)
    sharding.FSDP_MIN_SIZE = 1  # shard every weight with a dimension fsdp divides
    classes = {'face': 3, 'person': 3, 'vehicle': 3, 'product': 3}
    make = lambda: multitask.create_model(config, classes, rngs=nnx.Rngs(params=0, dropout=1),
                                          class_multiple=4)
    model = make()  # the same weights on both processes (same seed); also the reference
    graphdef, state = nnx.split(model)
    shardings = sharding.tree_shardings(state, mesh)
    assert any('fsdp' in str(s.spec) for s in jax.tree.leaves(shardings))
    def put(x, s):  # a global array of the FSDP layout from the local value
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), s),
                                        impl=jax.random.key_impl(x))
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    placed = jax.tree.map(put, state, shardings)
    emb = extract.extract_embeddings(graphdef, placed, ds, 'person', mesh=mesh,
                                     augment_config=config.input.augment)
    x = device_ops.preprocess(jax.numpy.asarray(pixels), None, config.input.augment, train=False)
    want = np.asarray(model.embed(x, 'person'))
    np.testing.assert_array_equal(emb.index, np.arange(13))
    np.testing.assert_array_equal(emb.ids, 100 + np.arange(13))
    np.testing.assert_array_equal(emb.cameras, np.arange(13) % 3)
    np.testing.assert_allclose(emb.features, want, rtol=2e-5, atol=2e-5)
    np.save(out + f'.{pid}.npy', emb.features)
    print('OK', pid, len(emb), flush=True)
''')


def test_extract_two_processes_sharded_state(tmp_path):
  """2 processes x 2 CPU devices, FSDP-sharded state: every process gets all rows, identical."""
  script = tmp_path / 'mp_extract.py'
  script.write_text(_MULTIPROCESS)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = str(tmp_path / 'features')
  procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), out], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert 'OK 0 13' in logs[0] and 'OK 1 13' in logs[1]
  np.testing.assert_array_equal(np.load(out + '.0.npy'), np.load(out + '.1.npy'))


# --------------------------------------------------------------------------------------------
# The run: report, figures, scalars.
# --------------------------------------------------------------------------------------------
class RecordingWriter:
  """A clu MetricWriter stand-in that keeps what it is given."""

  def __init__(self):
    self.scalars = {}
    self.flushed = 0

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      assert (step, k) not in self.scalars, f'{k} written twice at step {step}'
      self.scalars[(step, k)] = v

  def flush(self):
    self.flushed += 1


def test_evaluate_writes_report_figures_and_scalars(converted, model, tmp_path):
  data_dir, truth = converted
  config = make_config(data_dir)
  writer = RecordingWriter()
  results = run.evaluate(config, str(tmp_path), model, 7, writer)
  assert list(results) == list(SETS)
  for name, m in results.items():
    for k, v in protocols.of(name).scalars(m).items():
      if not k.endswith('_std') and not k.startswith('threshold'):
        assert 0.0 <= v <= 1.0, (name, k, v)
      assert writer.scalars[(7, f'eval/{name}/{k}')] == v
  assert len(results['market1501']['cmc']) == protocols.MAX_RANK
  assert results['market1501']['num_valid_queries'] == 4
  assert len(results['vehicleid']['per_repeat']) == 3
  assert set(results['sop']) == {1, 10, 100, 1000, 'operating_points'}
  # Operating thresholds of every set: in the metrics, the scalars, report.md and report.json.
  for name, m in results.items():
    points = m['operating_points']
    assert points['impostor_pairs'] > 0 and points['genuine_pairs'] > 0
    assert -1 <= points['far1e-3']['threshold'] <= 1
    assert writer.scalars[(7, f'eval/{name}/tar@far1e-3')] == points['far1e-3']['tar']
  assert results['lfw']['operating_points']['impostor_pairs'] == 10  # 20 pairs, half impostors
  assert writer.flushed >= 1

  out = tmp_path / 'eval' / 'step_7'
  md = (out / 'report.md').read_text()
  for row in report.PUBLISHED_CELLS:
    assert row in md
  assert '**ufo-jax ufo_tiny**' in md and 'chance level' in md
  ours = next(line for line in md.splitlines() if line.startswith('| **ufo-jax'))
  cells = [c.strip() for c in ours.strip('|').split('|')]
  lfw_col = 1 + list(report.HEADERS).index('lfw')
  assert cells[lfw_col] == f'{100 * results["lfw"]["accuracy"]:.2f}'
  payload = json.loads((out / 'report.json').read_text())
  assert set(payload['ours']) == set(SETS)
  assert set(payload['thresholds']) == {'face', 'person', 'vehicle', 'product'}
  assert payload['thresholds']['person']['far1e-2'] == pytest.approx(
      results['market1501']['operating_points']['far1e-2']['threshold'])
  assert report.read_thresholds(str(out))['face']['source'] == str(out / 'report.json')
  assert report.latest_report(str(tmp_path)) == str(out / 'report.json')
  assert '## Operating thresholds' in md and '| LFW | 10 | 10 |' in md
  assert payload['chance']['lfw'] == [50.0]
  # Market: each query has 3 gallery images of its pid, one on its own camera (junk), so
  # 2 positives among 14 - 1 valid items.
  assert payload['chance']['market1501'][0] == pytest.approx(100 * 2 / 13)
  assert payload['chance']['vehicleid'][0] == pytest.approx(100 / 4)
  assert payload['chance']['sop'] == [pytest.approx(100 * 2 / 11)]
  pngs = sorted(p.name for p in out.glob('*.png'))
  ranks = [p for p in pngs if p.startswith('rank_list_market1501_q')]
  assert 'cmc.png' in pngs and 'roc.png' in pngs and len(ranks) == 3
  for p in pngs:
    assert (out / p).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert f'({p})' in md


# --------------------------------------------------------------------------------------------
# The oracle: identity one-hot features make every protocol perfect.
# --------------------------------------------------------------------------------------------
def _truth_identities(gen, name):
  """{eval-transformed pixels: identity} from the generator's own record of what it wrote."""
  if name == 'lfw':  # image 2i + side of the .bin; the b side shows a's identity when same
    items = {gen.images[str(2 * i + side)]: 2 * i + (side and not same)
             for i, same in enumerate(gen.pairs) for side in (0, 1)}
  else:
    items = {gen.images[it.path]: it.id for its in gen.splits.values() for it in its}
  out = {}
  for data, ident in items.items():
    key = augment.eval_transform(augment.decode_image(data), SIZE).tobytes()
    assert key not in out
    out[key] = ident
  return out


def _oracle_extract(truth, shift_face=False):
  def fake(graphdef, states, data_dir, name, split, task, *, config, mesh):
    del graphdef, states, task, mesh
    table = _truth_identities(truth[name], name)
    dim = max(table.values()) + 2
    ds = data_lib.create_eval_dataset(data_dir, name, split,
                                      image_size=int(config.input.image_size), batch_size=4)
    feats, ids, cams, index = [], [], [], []
    for b in ds:
      for i in np.flatnonzero(b['mask']):
        ident = table[b['image'][i].tobytes()]
        if shift_face and name == 'lfw' and b['index'][i] % 2 == 1:
          ident += 1  # the b side now shows the next identity: pairs are broken
        feats.append(np.eye(dim, dtype=np.float32)[ident])
        ids.append(b['id'][i])
        cams.append(b['camera'][i])
        index.append(b['index'][i])
    return extract.Embeddings(np.stack(feats), np.array(ids), np.array(cams), np.array(index),
                              ds.num_examples)
  return fake


def test_oracle_features_give_perfect_scores(converted, monkeypatch):
  data_dir, truth = converted
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth))
  tiny = abstract_model()
  results = run.evaluate(make_config(data_dir), None, tiny, sets=SETS)
  assert results['lfw']['accuracy'] == 1.0
  assert results['market1501']['cmc'][0] == 1.0 and results['market1501']['mAP'] == 1.0
  assert results['market1501']['mINP'] == 1.0
  assert results['vehicleid']['rank1'] == 1.0 and results['vehicleid']['mAP'] == 1.0
  assert results['sop'][1] == 1.0
  for m in results.values():  # impostors at cosine 0, genuine pairs at 1: all accepted
    assert m['operating_points']['far1e-2']['threshold'] == 0.0
    assert m['operating_points']['far1e-4']['tar'] == 1.0
  # The check can fail: misaligned face pairs are not perfect.
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth, shift_face=True))
  broken = run.evaluate(make_config(data_dir), None, tiny, sets=('lfw',))
  assert broken['lfw']['accuracy'] <= 0.75


def test_should_stop_after_the_first_benchmark_returns_early_without_report(
    converted, monkeypatch, tmp_path, caplog):
  data_dir, truth = converted
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth))
  config = make_config(data_dir)
  config.eval.figures = False
  asked = []

  def should_stop():  # the stop request arrives while the first benchmark is evaluated
    asked.append(len(asked))
    return len(asked) > 1

  writer = RecordingWriter()
  with caplog.at_level('WARNING'):
    results = run.evaluate(config, str(tmp_path), abstract_model(), 3, writer,
                           should_stop=should_stop)
  assert list(results) == ['lfw'] and results['lfw']['accuracy'] == 1.0
  assert len(asked) == 2  # asked before lfw and before market1501, then stopped
  assert writer.scalars[(3, 'eval/lfw/accuracy')] == 1.0
  assert not any(k.startswith('eval/market1501') for _, k in writer.scalars)
  assert not (tmp_path / 'eval' / 'step_3' / 'report.md').exists()
  assert not (tmp_path / 'eval' / 'step_3' / 'report.json').exists()
  assert 'evaluation stopped (stop requested) after 1 of 4 benchmarks' in caplog.text
  assert 'no report' in caplog.text


def test_missing_set_is_a_clear_error_or_skipped(converted, monkeypatch, tmp_path):
  data_dir, truth = converted
  config = make_config(data_dir)
  tiny = abstract_model()
  with pytest.raises(FileNotFoundError) as e:
    run.evaluate(config, None, tiny, sets=('market1501', 'cplfw'))
  msg = str(e.value)
  assert os.path.join(data_dir, 'cplfw') in msg and 'data_prep.build --dataset=cplfw' in msg
  assert 'skip_missing' in msg and 'market1501:' not in msg
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth))
  config.eval.skip_missing = True
  config.eval.figures = False
  results = run.evaluate(config, str(tmp_path), tiny, sets=('market1501', 'cplfw'))
  assert list(results) == ['market1501']
  assert 'Not evaluated: CALFW, CPLFW' in (tmp_path / 'report.md').read_text()


def test_sets_of_a_task_without_head_are_skipped(converted, monkeypatch):
  data_dir, truth = converted
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth))
  config = make_config(data_dir)
  del config.tasks['face']
  results = run.evaluate(config, None, abstract_model(config), sets=('lfw', 'sop'))
  assert list(results) == ['sop']


def test_no_test_data_with_synthetic_input_skips_evaluation(model):
  config = make_config('')
  config.input.source = 'synthetic'
  assert run.evaluate(config, None, model) == {}
  config.input.source = 'tfds'
  with pytest.raises(ValueError, match='input.data_dir'):
    run.evaluate(config, None, model)


# --------------------------------------------------------------------------------------------
# Chance levels against brute force.
# --------------------------------------------------------------------------------------------
def _ap(relevant):
  hits = np.flatnonzero(relevant) + 1
  return np.mean(np.arange(1, len(hits) + 1) / hits)


@pytest.mark.parametrize('positives,valid', [(1, 1), (1, 5), (2, 5), (3, 6), (6, 6)])
def test_expected_ap_equals_mean_over_all_rankings(positives, valid):
  aps = [_ap(np.isin(np.array(perm), np.arange(positives)))
         for perm in itertools.permutations(range(valid))]
  assert protocols.expected_ap(np.array([positives]), np.array([valid]))[0] == pytest.approx(
      np.mean(aps))


def test_chance_reid_and_retrieval_against_brute_force():
  rng = np.random.default_rng(3)
  q_pids, q_cams = rng.integers(0, 5, 12), rng.integers(0, 3, 12)
  g_pids, g_cams = rng.integers(0, 5, 30), rng.integers(0, 3, 30)
  r1, aps = [], []
  for p, c in zip(q_pids, q_cams):
    keep = ~((g_pids == p) & (g_cams == c))
    rel = g_pids[keep] == p
    if rel.any():
      r1.append(rel.mean())
      aps.append(protocols.expected_ap(np.array([rel.sum()]), np.array([keep.sum()]))[0])
  got = protocols.chance_reid(q_pids, g_pids, q_cams, g_cams)
  assert got['rank1'] == pytest.approx(np.mean(r1)) and got['mAP'] == pytest.approx(np.mean(aps))
  assert got['num_valid_queries'] == len(r1)
  labels = rng.integers(0, 4, 9)
  want = np.mean([(np.sum(labels == lab) - 1) / 8 for lab in labels])
  assert protocols.chance_retrieval(labels)[1] == pytest.approx(want)
  assert protocols.chance_vehicleid(np.array([5, 5, 7, 9, 9]))['rank1'] == pytest.approx(1 / 3)
  assert protocols.chance_face(np.array([True, False, True, True]))['accuracy'] == 0.75


def test_set_names_from_the_command_line():
  assert run.set_names(('lfw', 'sop')) == ['lfw', 'sop']
  assert run.set_names(('lfw,market1501, sop',)) == ['lfw', 'market1501', 'sop']
  assert run.set_names('lfw') == ['lfw']
  with pytest.raises(ValueError, match=r"config.eval.sets: unknown benchmark\(s\) \['ms1mv3'\]"):
    run.set_names(('lfw', 'ms1mv3'))


def test_eval_batch_size_rounds_up_to_devices():
  assert run.eval_batch_size(512, 8) == 512
  assert run.eval_batch_size(500, 8) == 504
  assert run.eval_batch_size(3, 8) == 8
  with pytest.raises(ValueError):
    run.eval_batch_size(0, 8)


def test_evaluate_checkpoint_restores_through_the_training_core(converted, tmp_path):
  from ufo_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from ufo_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  data_dir, _ = converted
  config = make_config(data_dir)
  config.eval.sets = ('lfw',)
  mesh = sharding.create_mesh(config.mesh)
  setup = step_lib.build(config, CLASSES, mesh)
  state = setup.init()
  manager = ckpt_lib.create_manager(str(tmp_path / 'checkpoints'))
  ckpt_lib.save(manager, 5, state, meta={'num_classes': setup.num_classes,
                                         'padded_classes': setup.padded_classes}, force=True)
  manager.wait_until_finished()
  manager.close()
  writer = RecordingWriter()
  results = run.evaluate_checkpoint(config, str(tmp_path), writer=writer)
  # The train state as it is, (graphdef, params, model_state), in train mode.
  want = run.evaluate(config, None, (setup.graphdef, state['params'], state['model_state']))
  assert results['lfw']['accuracy'] == want['lfw']['accuracy']
  np.testing.assert_allclose(results['lfw']['tpr'], want['lfw']['tpr'])
  assert json.loads((tmp_path / 'eval' / 'step_5' / 'report.json').read_text())['step'] == 5
  assert writer.scalars[(5, 'eval/lfw/accuracy')] == results['lfw']['accuracy']


def test_withdrawn_dukemtmc_skipped_cleanly_when_not_converted(converted, monkeypatch, tmp_path,
                                                               caplog):
  data_dir, truth = converted  # dukemtmc is not converted in this fixture
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth))
  config = make_config(data_dir)
  config.eval.figures = False
  assert not config.eval.skip_missing
  with caplog.at_level('WARNING'):
    results = run.evaluate(config, str(tmp_path), abstract_model(), sets=('dukemtmc', 'sop'))
  assert list(results) == ['sop'] and results['sop'][1] == 1.0
  assert 'skipping dukemtmc, not converted' in caplog.text and 'withdrawn' in caplog.text
  assert 'DukeMTMC' in (tmp_path / 'report.md').read_text().split('Not evaluated:')[1]
  with pytest.raises(FileNotFoundError, match='cplfw'):  # other sets still must be converted
    run.check_sets(data_dir, ('dukemtmc', 'cplfw', 'sop'))


def test_partial_test_sets_refused_unless_allowed(converted, monkeypatch):
  data_dir, truth = converted
  monkeypatch.setattr(run, 'extract_split', _oracle_extract(truth))
  config = make_config(data_dir)
  config.input.allow_partial_data = False
  with pytest.raises(data_lib.PartialDataError) as e:
    run.evaluate(config, None, abstract_model(), sets=('lfw', 'sop'))
  msg = str(e.value)
  assert msg.startswith('partial converted data for evaluation') and '\n' not in msg
  assert 'lfw has test 40 images (expected 12,000 images)' in msg
  assert 'sop has train 12 images / 4 ids' in msg
  assert run.check_sets(data_dir, ('lfw', 'sop'), allow_partial=True) == ['lfw', 'sop']
