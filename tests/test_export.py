"""Inference, export and serving: load_model, embed, the three export formats, embed / search.

One tiny checkpoint (1-layer ViT-Ti at 32 x 32, random weights and random BatchNorm statistics,
saved as training saves it) and one export of it in all formats are shared by the whole file.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ufo_jax import checkpoint as ckpt_lib
from ufo_jax import config as config_lib
from ufo_jax import embed as embed_lib
from ufo_jax import export as export_lib
from ufo_jax import inference, sharding
from ufo_jax import step as step_lib
from ufo_jax import search as search_lib
from ufo_jax.data import augment, device_ops
from ufo_jax.evaluation import run as eval_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
CLASSES = {'face': 5, 'person': 4, 'vehicle': 3, 'product': 6}
STEP = 7
EVAL_SETS = ('lfw', 'market1501')


def make_config(data_dir=''):
  config = config_lib.load_config('ufo_tiny')
  config.input.source = 'tfds'
  config.input.data_dir = data_dir
  config.input.image_size = SIZE
  config.model.depth = 2  # the recipe's layout: scanned blocks (ufo_tiny: scan_layers=True)
  config.eval.batch_size = 8
  config.eval.sets = EVAL_SETS
  config.eval.figures = False
  return config


def train_state(config):
  """A train state as training checkpoints it, with non-trivial BatchNorm statistics."""
  setup = step_lib.build(config, CLASSES, sharding.create_mesh(config.mesh),
                      compiler_options={'xla_backend_optimization_level': 0})
  state = setup.init()
  rng = np.random.default_rng(3)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if x.dtype == np.float32 and ("'mean'" in name or "'var'" in name or "'scale'" in name):
      noise = rng.uniform(0.5, 1.5, x.shape) if "'var'" in name or "'scale'" in name else \
          rng.normal(0, 0.3, x.shape)
      return jax.device_put(np.asarray(noise, np.float32), x.sharding)
    return x

  state['params'] = jax.tree_util.tree_map_with_path(perturb, state['params'])
  state['model_state'] = jax.tree_util.tree_map_with_path(perturb, state['model_state'])
  return setup, state


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """``(workdir, config, setup, state)``: one checkpoint at step 7 and the run's config.json."""
  workdir = tmp_path_factory.mktemp('run')
  config = make_config()
  setup, state = train_state(config)
  manager = ckpt_lib.create_manager(str(workdir / 'checkpoints'))
  ckpt_lib.save(manager, STEP, state, meta={'num_classes': setup.num_classes,
                                            'padded_classes': setup.padded_classes}, force=True)
  manager.wait_until_finished()
  manager.close()
  config_lib.save_run_config(config, str(workdir))
  return str(workdir), config, setup, state


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
  """``(export dir, model.json, reference Loaded, lines)``: all three formats, the run's config."""
  workdir = trained[0]
  out = str(tmp_path_factory.mktemp('export'))
  lines = []
  info = export_lib.export(workdir, out, print_fn=lines.append)
  return out, info, inference.load_model(workdir), lines


def images(n, seed=0, size=SIZE):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def reference_embed(setup, state, imgs):
  """The training model's eval-mode neck output, L2-normalised, task by task (no inference.py)."""

  @jax.jit
  def neck_outputs(params, model_state, x):
    model = nnx.merge(setup.graphdef, params, model_state)
    x = device_ops.normalize(x, 127.5, 127.5)
    return {task: model.embed(x, task) for task in CLASSES}

  out = neck_outputs(state['params'], state['model_state'], imgs)
  return {t: np.asarray(e, np.float64) / np.linalg.norm(np.asarray(e, np.float64), axis=1,
                                                         keepdims=True) for t, e in out.items()}


# --------------------------------------------------------------------------------------------
# inference.load_model / embed.
# --------------------------------------------------------------------------------------------
def test_load_model_restores_backbone_and_necks_only(trained):
  workdir, config, setup, state = trained
  loaded = inference.load_model(workdir)  # config from WORKDIR/config.json
  model = loaded.model
  assert loaded.step == STEP and loaded.image_size == SIZE
  assert loaded.tasks == ('face', 'person', 'product', 'vehicle')
  assert loaded.normalization == (127.5, 127.5)
  assert loaded.source == os.path.join(workdir, 'checkpoints', str(STEP))
  with pytest.raises(dataclasses.FrozenInstanceError):
    loaded.step = 3
  pure = nnx.to_pure_dict(nnx.state(model))
  assert set(pure) == {'backbone', 'heads'}
  for task in CLASSES:
    assert set(pure['heads'][task]) == {'neck'}  # no class weights
    assert not hasattr(model.heads[task], 'class_weights')
    want = state['model_state']['heads'][task]['neck']
    np.testing.assert_array_equal(pure['heads'][task]['neck']['mean'], want['mean'][...])
    np.testing.assert_array_equal(pure['heads'][task]['neck']['var'], want['var'][...])
  train_params = nnx.to_pure_dict(state['params'])['backbone']
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(pure['backbone'])[0],
                               jax.tree.leaves(train_params)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
  # A step folder and the checkpoints/ folder name the same checkpoint; the config may be given.
  m2 = inference.load_model(os.path.join(workdir, 'checkpoints', str(STEP)), config)
  assert m2.step == STEP
  np.testing.assert_array_equal(m2.model.backbone.pos_embed[...], model.backbone.pos_embed[...])
  with pytest.raises(FileNotFoundError, match='no checkpoint for step 3'):
    inference.load_model(workdir, step=3)


def test_checkpoint_written_before_the_neck_bias_loads_with_zero_bias(trained, exported,
                                                                     tmp_path):
  """A checkpoint of an earlier version has no neck bias (its necks had none): it loads with
  zeros and embeds as before, instead of leaving the arrays abstract."""
  workdir, config, setup, state = trained

  def without_neck_bias(node, path=()):
    if isinstance(node, nnx.State):
      return nnx.State({k: without_neck_bias(v, path + (k,)) for k, v in node.items()
                        if not (k == 'bias' and path[-1:] == ('neck',))})
    return node

  old = dict(state, model_state=without_neck_bias(state['model_state']))
  manager = ckpt_lib.create_manager(str(tmp_path / 'checkpoints'))
  ckpt_lib.save(manager, STEP, old, meta={'num_classes': setup.num_classes,
                                          'padded_classes': setup.padded_classes}, force=True)
  manager.wait_until_finished()
  manager.close()
  loaded = inference.load_model(str(tmp_path), config)
  for task in CLASSES:
    np.testing.assert_array_equal(loaded.model.heads[task].neck.bias[...], 0.0)
  imgs = images(2, seed=4)
  got, want = inference.embed(loaded, imgs), inference.embed(exported[2], imgs)
  for task in CLASSES:
    np.testing.assert_array_equal(got[task], want[task])


def test_load_model_without_a_saved_config_says_what_to_pass(trained, tmp_path):
  os.symlink(os.path.join(trained[0], 'checkpoints'), tmp_path / 'checkpoints')
  with pytest.raises(FileNotFoundError, match=r'no config.json .* pass the config'):
    inference.load_model(str(tmp_path))


def test_embed_equals_the_training_model_neck_normalised(trained, exported):
  _, _, setup, state = trained
  model = exported[2]
  imgs = images(5)
  out = inference.embed(model, imgs)
  want = reference_embed(setup, state, imgs)
  assert list(out) == ['face', 'person', 'product', 'vehicle']
  for task, feats in out.items():
    assert feats.shape == (5, 192) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(feats, want[task], atol=2e-6)
  assert not np.allclose(out['face'], out['person'])  # each task its own neck
  only = inference.embed(model, imgs[:2], tasks=['vehicle'])
  assert list(only) == ['vehicle']
  np.testing.assert_allclose(only['vehicle'], out['vehicle'][:2], atol=1e-6)
  with pytest.raises(ValueError, match=r'shape \(batch, 32, 32, 3\)'):
    inference.embed(model, images(2, size=48))
  with pytest.raises(ValueError, match='uint8'):
    inference.embed(model, imgs.astype(np.float32))


def test_bfloat16_cudnn_run_evaluates_loads_and_exports_in_float32(trained, exported, tmp_path,
                                                                   caplog, monkeypatch):
  """A run trained in bfloat16 with cuDNN attention: its float32 evaluation, ``load_model`` and
  float32 export compute with XLA attention (cuDNN has no float32, and no CPU), logged once;
  ``load_model`` computes in float32 and equals the float32 evaluation's features."""
  from ufo_jax.evaluation import extract  # pylint: disable=g-import-not-at-top
  from ufo_jax.models import vit  # pylint: disable=g-import-not-at-top

  _, config, _, state = trained
  run = tmp_path / 'bf16_run'
  os.makedirs(run)
  os.symlink(os.path.join(trained[0], 'checkpoints'), run / 'checkpoints')  # same weights
  bf16 = make_config()
  bf16.model.dtype, bf16.model.attention_impl = 'bfloat16', 'cudnn'
  config_lib.save_run_config(bf16, str(run))
  monkeypatch.setattr(vit, '_CUDNN_FALLBACK_LOGGED', set())
  caplog.set_level('WARNING')
  assert inference.inference_config(bf16).model.attention_impl == 'cudnn'  # bf16: kept
  assert inference.inference_config(bf16, dtype='float32').model.attention_impl == 'xla'
  # The evaluation inside training: the bfloat16 / cudnn training graph, computed in float32.
  mesh = sharding.create_mesh(config.mesh)
  graphdef = step_lib.build(bf16, CLASSES, mesh).graphdef
  imgs = images(6, seed=5)
  batch = {'image': imgs, 'mask': np.ones(6, bool), 'id': np.arange(6), 'camera': np.zeros(6),
           'index': np.arange(6)}
  evaluated = {t: extract.extract_embeddings(
      graphdef, (state['params'], state['model_state']), [batch], t, mesh=mesh,
      augment_config=bf16.input.augment, progress=False, dtype='float32').features
      for t in ('face', 'person')}
  loaded = inference.load_model(str(run))  # float32 unless asked
  assert loaded.model.backbone.dtype == jax.numpy.float32
  assert loaded.model.backbone.blocks.attn.attention_impl == 'xla'
  got = inference.embed(loaded, imgs)
  for task, feats in evaluated.items():
    want = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(got[task], want, atol=2e-6, rtol=0)
    np.testing.assert_allclose(got[task], inference.embed(exported[2], imgs)[task], atol=2e-6)
  fallbacks = [r for r in caplog.records if "attention_impl='cudnn'" in r.getMessage()]
  assert len(fallbacks) == 1 and 'float32' in fallbacks[0].getMessage()
  # Asked for bfloat16: bfloat16 compute (here the config's cudnn stays; not run on the CPU).
  assert inference.load_model(str(run), dtype='bfloat16').model.backbone.dtype == jax.numpy.bfloat16
  # The float32 export of the run builds, runs and records XLA attention.
  lines = []
  info = export_lib.export(str(run), str(tmp_path / 'out'), formats='orbax', print_fn=lines.append)
  assert info['model_config']['attention_impl'] == 'xla' and info['dtype'] == 'float32'
  assert "attention_impl='cudnn' exported as 'xla'" in lines[0]
  assert config_lib.load_run_config(str(tmp_path / 'out')).model.attention_impl == 'cudnn'
  reloaded = inference.embed(inference.load_exported(str(tmp_path / 'out')), imgs)
  np.testing.assert_array_equal(reloaded['person'], got['person'])


# --------------------------------------------------------------------------------------------
# The export folder.
# --------------------------------------------------------------------------------------------
def test_model_json_and_orbax_params(exported):
  out, info, model, lines = exported
  on_disk = json.loads(open(os.path.join(out, 'model.json')).read())
  assert on_disk == info
  assert info['backbone'] == 'vit' and info['variant'] == 'Ti/16'
  assert info['image_size'] == SIZE and info['embedding_size'] == 192
  assert info['tasks'] == ['face', 'person', 'product', 'vehicle']
  assert info['normalization']['mean'] == 127.5 and info['normalization']['std'] == 127.5
  assert info['resize']['method'] == 'bicubic' and info['dtype'] == 'float32'
  assert info['source']['step'] == STEP and info['package_version']
  assert sorted(info['files']) == ['jax_export', 'onnx', 'orbax']
  assert info['checks']['jax_export_max_abs_diff'] < 1e-5
  assert info['checks']['onnx_max_abs_diff'] < 1e-4
  assert info['checks']['orbax_max_abs_diff'] < 1e-5
  assert any('embed.onnx' in line for line in lines)
  # The model_id: sha256 of the parameters and the preprocessing, 16 hex digits.
  assert len(info['model_id']) == 16 and int(info['model_id'], 16) >= 0
  assert inference.model_id(model) == info['model_id']
  other = dataclasses.replace(model, normalization=(127.5, 64.0))
  assert inference.model_id(other) != info['model_id']
  # golden.npz: fixed images and the in-process embedding of every task.
  golden = np.load(os.path.join(out, 'golden.npz'))
  assert golden['images'].shape == (4, SIZE, SIZE, 3)
  assert str(golden['model_id']) == info['model_id']
  want = inference.embed(model, golden['images'])
  for task in info['tasks']:
    np.testing.assert_allclose(golden[task], want[task], atol=1e-6)
  # load_exported: no training config, the same parameters and features.
  loaded = inference.load_exported(out)
  assert loaded.step == STEP and loaded.source == os.path.abspath(out)
  assert loaded.model_id == info['model_id'] == inference.model_id(loaded)
  assert (loaded.image_size, loaded.normalization, loaded.tasks) == (
      model.image_size, model.normalization, model.tasks)
  for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)),
                  jax.tree.leaves(nnx.state(model.model))):
    np.testing.assert_array_equal(a, b)
  imgs = images(3, seed=1)
  got, want = inference.embed(loaded, imgs), inference.embed(model, imgs)
  for task in want:
    np.testing.assert_array_equal(got[task], want[task])
  # The export kept the run's config.
  assert config_lib.load_run_config(out).model.depth == 2


def test_jax_export_and_onnx_equal_embed_at_two_batch_sizes(exported):
  out, _, model, _ = exported
  with open(os.path.join(out, 'embed.jax_export'), 'rb') as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  assert sorted(exp.platforms) == ['cpu', 'cuda', 'tpu']
  session = export_lib.onnx_session(os.path.join(out, 'embed.onnx'))
  assert [i.name for i in session.get_inputs()] == ['images']
  assert session.get_inputs()[0].type == 'tensor(uint8)'
  assert [o.name for o in session.get_outputs()] == ['face', 'person', 'product', 'vehicle']
  for n in (3, 6):  # the symbolic / dynamic batch
    imgs = images(n, seed=n)
    want = inference.embed(model, imgs)
    got = exp.call(imgs)
    onnx_out = dict(zip(['face', 'person', 'product', 'vehicle'],
                        session.run(None, {'images': imgs})))
    for task in want:
      assert got[task].shape == (n, 192) and got[task].dtype == np.float32
      np.testing.assert_allclose(np.asarray(got[task]), want[task], atol=1e-5, rtol=0)
      np.testing.assert_allclose(onnx_out[task], want[task], atol=1e-4, rtol=0)


def test_jax_export_runs_with_jax_and_numpy_only(exported, tmp_path):
  out, _, model, _ = exported
  imgs = images(4, seed=2)
  np.save(tmp_path / 'images.npy', imgs)
  script = textwrap.dedent(f"""
      import sys
      import jax, numpy as np
      f = {os.path.join(out, 'embed.jax_export')!r}
      exp = jax.export.deserialize(bytearray(open(f, 'rb').read()))
      out = exp.call(np.load({str(tmp_path / 'images.npy')!r}))
      np.savez({str(tmp_path / 'out.npz')!r}, **{{k: np.asarray(v) for k, v in out.items()}})
      assert not any(m.split('.')[0] == 'ufo_jax' for m in sys.modules), 'ufo_jax imported'
      print('ok')
  """)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]
  got = np.load(tmp_path / 'out.npz')
  want = inference.embed(model, imgs)
  assert sorted(got.files) == sorted(want)
  for task in want:
    np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)


def test_bfloat16_export_computes_in_bfloat16(trained, exported, tmp_path):
  workdir, config, _, _ = trained
  info = export_lib.export(workdir, str(tmp_path), config, formats='orbax', dtype='bfloat16',
                           print_fn=lambda _: None)
  assert info['dtype'] == 'bfloat16' and info['model_config']['dtype'] == 'bfloat16'
  assert info['model_id'] == exported[1]['model_id']  # the same parameters and preprocessing
  model16 = inference.load_exported(str(tmp_path))
  assert model16.model.backbone.dtype == jax.numpy.bfloat16
  imgs = images(3, seed=9)
  got, want = inference.embed(model16, imgs), inference.embed(exported[2], imgs)
  diff = max(np.abs(got[t] - want[t]).max() for t in want)
  assert 1e-5 < diff < 0.1  # bfloat16 rounding of the same model
  with pytest.raises(ValueError, match='unknown format'):
    export_lib.export(workdir, str(tmp_path), formats='orbax,tflite')
  with pytest.raises(FileNotFoundError, match='no config.json'):
    export_lib.export(str(tmp_path / 'x' / 'y' / 'nothing'), str(tmp_path / 'out'))


# --------------------------------------------------------------------------------------------
# Golden checks.
# --------------------------------------------------------------------------------------------
def test_golden_check_passes_every_runtime_and_catches_tampering(trained, exported, tmp_path):
  out, info, model, _ = exported
  lines = []
  diffs = export_lib.check(out, print_fn=lines.append)
  assert sorted(diffs) == ['jax_export', 'onnx', 'orbax']
  assert all(diffs[r] <= export_lib.GOLDEN_TOLERANCES[r] for r in diffs)
  assert 'is sound on jax_export, onnx, orbax' in lines[-1]
  # A runtime that computes differently (here: the model in bfloat16) fails, naming it.
  model16 = inference.load_model(trained[0], dtype='bfloat16')
  with pytest.raises(export_lib.GoldenMismatch,
                     match=r'runtime onnx, task \w+: largest \|difference\| .* > 1e-04'):
    export_lib.check_golden(out, 'onnx', lambda x: inference.embed(model16, x))
  # A tampered params/: the orbax runtime fails its check, in embed and in --check.
  import shutil  # pylint: disable=g-import-not-at-top

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  bad = tmp_path / 'tampered'
  shutil.copytree(out, bad)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.abspath(bad / 'params'))
  params['heads']['person']['neck']['mean'] = params['heads']['person']['neck']['mean'] + 0.05
  shutil.rmtree(bad / 'params')
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(bad / 'params'), params)
  write_image_folder(tmp_path / 'imgs')
  with pytest.raises(export_lib.GoldenMismatch, match='runtime orbax, task person'):
    embed_lib.run(str(bad), str(tmp_path / 'imgs'), str(tmp_path / 'x.npz'), runtime='orbax',
                  print_fn=lambda _: None)
  assert not (tmp_path / 'x.npz').exists()
  export_lib.check(str(bad), ['jax_export'], print_fn=lambda _: None)  # its own copy: intact
  proc = subprocess.run(
      [sys.executable, '-m', 'ufo_jax.export', f'--check={bad}', '--runtimes=orbax'], cwd=ROOT,
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: golden check failed: runtime orbax, task person'), last
  assert 'Traceback' not in proc.stderr


# --------------------------------------------------------------------------------------------
# embed and search.
# --------------------------------------------------------------------------------------------
def write_image_folder(folder):
  """Images of several sizes (one already 32 x 32), one unreadable file and a non-image."""
  rng = np.random.default_rng(7)
  os.makedirs(folder / 'sub')
  files = {'a.jpg': (48, 40), 'b.png': (SIZE, SIZE), 'sub/c.png': (20, 64), 'd.jpeg': (90, 90)}
  for name, (w, h) in files.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
  (folder / 'broken.jpg').write_bytes(b'not an image')
  (folder / 'notes.txt').write_text('not listed')
  return sorted(str(folder / n) for n in files)


@pytest.mark.parametrize('runtime', ['jax_export', 'onnx', 'orbax'])
def test_embed_folder_resizes_as_evaluation_and_skips_unreadable(exported, tmp_path, runtime):
  out_dir, _, model, _ = exported
  good = write_image_folder(tmp_path / 'imgs')
  lines = []
  summary = embed_lib.run(out_dir, str(tmp_path / 'imgs'), str(tmp_path / 'e.npz'),
                          batch_size=3, runtime=runtime, print_fn=lines.append)
  assert summary['images'] == 4 and summary['unreadable'] == 1
  assert '1 unreadable file(s) skipped' in lines[0]
  data = np.load(tmp_path / 'e.npz')
  assert list(data['paths']) == good
  resized = np.stack([augment.eval_transform(Image.open(p).convert('RGB'), SIZE) for p in good])
  np.testing.assert_array_equal(resized[1], np.asarray(Image.open(good[1]).convert('RGB')))
  want = inference.embed(model, resized)
  for task in want:
    np.testing.assert_allclose(data[task], want[task], atol=1e-4, rtol=0)


def test_embed_tasks_glob_and_errors(exported, tmp_path):
  out_dir = exported[0]
  write_image_folder(tmp_path / 'imgs')
  embed_lib.run(out_dir, str(tmp_path / 'imgs' / '*.png'), str(tmp_path / 'p.npz'),
                tasks=['person'], print_fn=lambda _: None)
  data = np.load(tmp_path / 'p.npz')
  assert sorted(data.files) == ['image_size', 'model_id', 'package_version', 'paths', 'person',
                                'tasks'] and len(data['paths']) == 1
  assert str(data['model_id']) == exported[1]['model_id'] and list(data['tasks']) == ['person']
  assert int(data['image_size']) == SIZE and str(data['package_version'])
  with pytest.raises(FileNotFoundError, match='no image file found'):
    embed_lib.run(out_dir, str(tmp_path / 'empty*'), str(tmp_path / 'x.npz'))
  with pytest.raises(ValueError, match='no readable image among the 1 files'):
    embed_lib.run(out_dir, str(tmp_path / 'imgs' / 'broken.jpg'), str(tmp_path / 'x.npz'),
                  print_fn=lambda _: None)
  with pytest.raises(ValueError, match="unknown task"):
    embed_lib.run(out_dir, str(tmp_path / 'imgs'), str(tmp_path / 'x.npz'), tasks=['cars'])


def test_search_ranks_like_brute_force_and_draws_the_rank_list(tmp_path):
  rng = np.random.default_rng(4)
  g = rng.normal(size=(30, 8)).astype(np.float32)
  q = np.concatenate([g[[3, 17]] * 2.0, rng.normal(size=(1, 8)).astype(np.float32)])
  img_dir = tmp_path / 'img'
  os.makedirs(img_dir)
  for i in range(30):
    Image.fromarray(np.full((20, 10, 3), i * 8, np.uint8)).save(img_dir / f'g{i:02d}.png')
  g_paths = [str(img_dir / f'g{i:02d}.png') for i in range(30)]
  q_paths = [g_paths[3], g_paths[17], str(tmp_path / 'missing.png')]
  np.savez(tmp_path / 'g.npz', paths=np.array(g_paths), person=g, face=g[:, :4])
  np.savez(tmp_path / 'q.npz', paths=np.array(q_paths), person=q)
  lines = []
  results = search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q.npz'), 'person',
                              topk=5, out_dir=str(tmp_path / 'out'), print_fn=lines.append)
  on_disk = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert on_disk == results and results['topk'] == 5
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  for i, row in enumerate(results['results']):
    assert row['query'] == q_paths[i]
    want = np.argsort(-(qn[i] @ gn.T), kind='stable')[:5]
    assert [m['path'] for m in row['matches']] == [g_paths[j] for j in want]
    np.testing.assert_allclose([m['score'] for m in row['matches']], (qn[i] @ gn.T)[want],
                               atol=1e-5)
  assert results['results'][0]['matches'][0]['path'] == g_paths[3]
  png = tmp_path / 'out' / 'rank_list.png'
  assert png.exists() and str(png) in lines[-1]
  assert Image.open(png).size[0] > 300
  with pytest.raises(ValueError, match=r"no 'vehicle' features \(it has: person, face\)"):
    search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q.npz'), 'vehicle')
  with pytest.raises(ValueError, match='dimension 4, the query 8'):
    np.savez(tmp_path / 'q4.npz', paths=np.array(q_paths), face=q)
    search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q4.npz'), 'face')
  # The command line: a bad --task is one error line, exit status 1.
  proc = subprocess.run(
      [sys.executable, '-m', 'ufo_jax.search', f'--gallery={tmp_path / "g.npz"}',
       f'--query={tmp_path / "q.npz"}', '--task=vehicle'], cwd=ROOT, capture_output=True,
      text=True, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'), timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --gallery=")
  assert 'Traceback' not in proc.stderr


def test_search_refuses_features_of_two_models(tmp_path, capsys):
  rng = np.random.default_rng(5)
  g, q = rng.normal(size=(12, 8)), rng.normal(size=(2, 8))
  paths = [f'/gallery/{i}.jpg' for i in range(12)]
  embed_lib.write_npz(str(tmp_path / 'g.npz'), paths, {'person': g}, model_id='1111aaaa')
  embed_lib.write_npz(str(tmp_path / 'q.npz'), paths[:2], {'person': q}, model_id='2222bbbb')
  np.savez(tmp_path / 'old.npz', paths=np.array(paths[:2]), person=q)  # no model_id
  quiet = dict(out_dir=str(tmp_path / 'out'), rank_list_queries=0, print_fn=lambda _: None)
  with pytest.raises(ValueError, match=r'g.npz is of model 1111aaaa, .*q.npz of model 2222bbbb'):
    search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q.npz'), 'person', **quiet)
  capsys.readouterr()
  mixed = search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q.npz'), 'person',
                            allow_mixed_models=True, **quiet)
  assert len(mixed['results']) == 2 and '--allow_mixed_models' in capsys.readouterr().err
  old = search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'old.npz'), 'person', **quiet)
  assert old['model_id'] == '1111aaaa'
  assert 'old.npz has no model_id' in capsys.readouterr().err
  with pytest.raises(ValueError, match='metadata names'):
    embed_lib.write_npz(str(tmp_path / 'x.npz'), paths, {'tasks': g})


# --------------------------------------------------------------------------------------------
# Evaluation from the exported folder equals --mode=eval on the checkpoint.
# --------------------------------------------------------------------------------------------
class NullWriter:
  def write_scalars(self, step, scalars):
    pass

  def flush(self):
    pass


def test_evaluation_of_the_export_equals_evaluation_of_the_checkpoint(trained, exported,
                                                                      tmp_path):
  from data_prep import build, generate  # pylint: disable=g-import-not-at-top
  raw, data = tmp_path / 'raw', tmp_path / 'data'
  sizes = generate.Sizes(num_ids=4, images_per_id=3, image_size=40, num_pairs=20)
  for name in EVAL_SETS:
    build.convert(name, generate.write_dataset(name, raw, sizes=sizes).path, data,
                  skip_count_check=True)
  config = make_config(str(data))
  from_ckpt = eval_run.evaluate_checkpoint(config, str(tmp_path / 'a'), checkpoint=trained[0],
                                           writer=NullWriter())
  from_export = eval_run.evaluate_checkpoint(config, str(tmp_path / 'b'), exported=exported[0],
                                             writer=NullWriter())
  assert set(from_ckpt) == set(EVAL_SETS)
  assert from_ckpt['lfw']['accuracy'] == from_export['lfw']['accuracy']
  np.testing.assert_array_equal(from_ckpt['lfw']['tpr'], from_export['lfw']['tpr'])
  np.testing.assert_array_equal(from_ckpt['market1501']['cmc'], from_export['market1501']['cmc'])
  assert from_ckpt['market1501']['mAP'] == from_export['market1501']['mAP']
  for sub in ('a', 'b'):  # both reports at the checkpoint's step
    report = json.loads((tmp_path / sub / 'eval' / f'step_{STEP}' / 'report.json').read_text())
    assert report['step'] == STEP
  # The operating thresholds of that evaluation go into an export's model.json, and search
  # applies them.
  source = tmp_path / 'a' / 'eval' / f'step_{STEP}' / 'report.json'
  lines = []
  info = export_lib.export(trained[0], str(tmp_path / 'export'), formats=('orbax',),
                           thresholds_from=str(source), print_fn=lines.append)
  points = from_ckpt['market1501']['operating_points']
  assert info['thresholds']['person']['far1e-3'] == points['far1e-3']['threshold']
  assert set(info['thresholds']) == {'face', 'person'} and 'none for product' in ''.join(lines)
  cut = info['thresholds']['person']['far1e-2']
  rng = np.random.default_rng(2)
  g = rng.normal(size=(40, 8)).astype(np.float32)
  q = np.concatenate([g[:2] + 0.01, rng.normal(size=(4, 8)).astype(np.float32)])
  np.savez(tmp_path / 'g.npz', paths=np.array([f'g{i}.png' for i in range(40)]), person=g)
  np.savez(tmp_path / 'q.npz', paths=np.array([f'q{i}.png' for i in range(6)]), person=q)
  for spec, value in (('far1e-2', cut), ('0.9', 0.9)):
    res = search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q.npz'), 'person', topk=3,
                            out_dir=str(tmp_path / 's'), threshold=spec,
                            model_dir=str(tmp_path / 'export'), print_fn=lines.append)
    assert res['threshold']['value'] == pytest.approx(value)
    for row in res['results']:
      assert [m['above_threshold'] for m in row['matches']] == [m['score'] > value
                                                                for m in row['matches']]
      assert row['in_gallery'] == any(m['score'] > value for m in row['matches'])
    assert res['results'][0]['in_gallery']  # a near-duplicate of a gallery item
    assert json.loads((tmp_path / 's' / 'results.json').read_text()) == res
  assert not all(r['in_gallery'] for r in res['results'])  # at 0.9 the random queries are not
  with pytest.raises(ValueError, match='pass --model=EXPORT_DIR'):
    search_lib.search(str(tmp_path / 'g.npz'), str(tmp_path / 'q.npz'), 'person',
                      threshold='far1e-3', rank_list_queries=0)
  with pytest.raises(ValueError, match="no far1e-2 threshold for task 'vehicle'"):
    search_lib.resolve_threshold('far1e-2', 'vehicle', str(tmp_path / 'export'))
  # The thresholds of one model do not apply to another model's features.
  for name, feats in (('g2.npz', g), ('q2.npz', q)):
    embed_lib.write_npz(str(tmp_path / name), [f'{name}{i}.png' for i in range(len(feats))],
                        {'person': feats}, model_id='ffff0000ffff0000')
  with pytest.raises(ValueError, match='of model ffff0000ffff0000'):
    search_lib.search(str(tmp_path / 'g2.npz'), str(tmp_path / 'q2.npz'), 'person',
                      threshold='far1e-2', model_dir=str(tmp_path / 'export'),
                      rank_list_queries=0, print_fn=lines.append)


# --------------------------------------------------------------------------------------------
# Output folders, damaged files and inputs as users have them.
# --------------------------------------------------------------------------------------------
def _tree(folder):
  """{relative path: bytes} of every file below ``folder``."""
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, folder)] = fh.read()
  return out


def test_export_writes_only_where_it_may_and_replaces_an_export_only_when_complete(
    trained, exported, tmp_path, monkeypatch):
  import shutil

  workdir = trained[0]
  quiet = lambda _: None  # noqa: E731
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'todo.txt').write_text('mine')
  with pytest.raises(ValueError, match=r'is not empty \(todo.txt\) and holds no export'):
    export_lib.export(workdir, str(notes), formats='orbax', overwrite=True, print_fn=quiet)
  assert os.listdir(notes) == ['todo.txt']
  with pytest.raises(ValueError, match='inside the checkpoints folder'):
    export_lib.export(workdir, os.path.join(workdir, 'checkpoints', 'export'), formats='orbax',
                      print_fn=quiet)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', 'export'))
  # An earlier export (all three formats) beside a file of the user's.
  out = tmp_path / 'model'
  shutil.copytree(exported[0], out)
  (out / 'README.txt').write_text('notes of the user')
  before = _tree(out)
  with pytest.raises(ValueError, match='holds an earlier export .*pass --overwrite'):
    export_lib.export(workdir, str(out), formats='orbax', print_fn=quiet)

  def broken(*args, **kwargs):  # jax2onnx failing after params/ and embed.jax_export were written
    raise ImportError('--formats=onnx needs jax2onnx (No module named jax2onnx)')

  monkeypatch.setattr(export_lib, 'export_onnx', broken)
  with pytest.raises(ImportError, match='jax2onnx'):
    export_lib.export(workdir, str(out), overwrite=True, print_fn=quiet)
  monkeypatch.setattr(export_lib, 'export_jax', lambda *a, **k: (_ for _ in ()).throw(
      KeyboardInterrupt()))  # Ctrl-C while writing embed.jax_export
  with pytest.raises(KeyboardInterrupt):
    export_lib.export(workdir, str(out), overwrite=True, print_fn=quiet)
  assert _tree(out) == before and sorted(os.listdir(tmp_path)) == ['model', 'notes']
  monkeypatch.undo()
  lines = []
  info = export_lib.export(workdir, str(out), formats='orbax', overwrite=True,
                           print_fn=lines.append)
  assert sorted(os.listdir(out)) == ['README.txt', 'config.json', 'golden.npz', 'model.json',
                                  'params']
  assert (out / 'README.txt').read_text() == 'notes of the user'
  assert json.loads((out / 'model.json').read_text())['files'] == info['files'] == {
      'orbax': 'params'}
  assert any(line.startswith(f'export: {out / "params"} (orbax, backbone + necks')
             for line in lines)  # the final paths
  assert sorted(os.listdir(tmp_path)) == ['model', 'notes']  # no temporary folder left
  np.testing.assert_array_equal(
      inference.embed(inference.load_exported(str(out)), images(2))['person'],
      inference.embed(exported[2], images(2))['person'])


def test_export_config_that_changes_inference_is_refused(trained, tmp_path):
  workdir, config, _, _ = trained
  for field, value in (('input.augment.mean', 0.5), ('input.image_size', 64),
                       ('model.variant', 'S/16')):
    other = config_lib.apply_overrides(config, {field: value})
    with pytest.raises(config_lib.ConfigError) as e:
      export_lib.export(workdir, str(tmp_path / 'out'), other, formats='orbax',
                        print_fn=lambda _: None)
    assert str(e.value).startswith(f'--config: {field} is {value!r}, but the run was trained '
                                   'with ') and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'out')
  harmless = config_lib.apply_overrides(config, {'eval.batch_size': 3, 'train.steps': 1})
  info = export_lib.export(workdir, str(tmp_path / 'out'), harmless, formats='orbax',
                           print_fn=lambda _: None)
  assert info['normalization']['mean'] == config.input.augment.mean


def test_damaged_export_files_are_one_line(exported, tmp_path):
  import shutil

  out = str(shutil.copytree(exported[0], tmp_path / 'model'))
  for runtime, name in (('jax_export', 'embed.jax_export'), ('onnx', 'embed.onnx')):
    path = os.path.join(out, name)
    os.truncate(path, os.path.getsize(path) // 2)  # a copy that stopped half-way
    with pytest.raises(ValueError) as e:
      embed_lib.Embedder(out, runtime)
    assert str(e.value).startswith(f'{path} does not load (') and '\n' not in str(e.value)
    assert 'damaged or truncated; export again (python -m ufo_jax.export' in str(e.value)
  info = json.loads((tmp_path / 'model' / 'model.json').read_text())
  info['image_size'] = 64  # model.json no longer describes params/
  (tmp_path / 'model' / 'model.json').write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"params does not fit .*model.json: \['backbone'\]"
                     r"\['pos_embed'\] has shape \(1, 5, 192\) there, \(1, 17, 192\)") as e:
    inference.load_exported(out)
  assert 'strict' not in str(e.value)


def _exif_jpeg(path, pixels, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation  # Orientation, as phone cameras write it
  Image.fromarray(pixels).save(path, 'JPEG', quality=95, exif=exif.tobytes())


def test_embed_reads_photos_16_bit_images_and_linked_folders_as_users_have_them(
    exported, tmp_path, monkeypatch):
  out_dir, _, loaded, _ = exported
  embedder = embed_lib.Embedder(out_dir, 'orbax')
  rng = np.random.default_rng(5)
  photos = tmp_path / 'photos'
  photos.mkdir()
  # A phone photo stored sideways (landscape pixels) with EXIF orientation 6: upright it is
  # the same pixels turned 90 degrees clockwise.
  _exif_jpeg(photos / 'phone.jpg', rng.integers(0, 256, (SIZE, 2 * SIZE, 3), dtype=np.uint8), 6)
  stored = np.asarray(Image.open(photos / 'phone.jpg').convert('RGB'))
  upright = np.ascontiguousarray(np.rot90(stored, k=-1))
  got = embed_lib.load_image(str(photos / 'phone.jpg'), SIZE)
  np.testing.assert_array_equal(got, augment.eval_transform(Image.fromarray(upright), SIZE))
  as_stored = embed_lib.load_image(str(photos / 'phone.jpg'), SIZE, exif_transpose=False)
  np.testing.assert_array_equal(as_stored, augment.eval_transform(Image.fromarray(stored), SIZE))
  assert np.abs(got.astype(int) - as_stored).mean() > 20
  # The evaluation reads its sets as stored, and an image without the tag (the public test
  # sets carry none) is read identically by embed and by the evaluation.
  data = (photos / 'phone.jpg').read_bytes()
  np.testing.assert_array_equal(np.asarray(augment.decode_image(data)), stored)
  Image.fromarray(stored).save(photos / 'plain.jpg', quality=95)
  np.testing.assert_array_equal(
      embed_lib.load_image(str(photos / 'plain.jpg'), SIZE),
      augment.eval_transform(augment.decode_image((photos / 'plain.jpg').read_bytes()), SIZE))
  # A 16-bit grey PNG embeds as its 8-bit reduction, not as a white image.
  deep = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
  Image.fromarray(deep).save(photos / 'scan16.png')
  Image.fromarray((deep >> 8).astype(np.uint8)).convert('RGB').save(photos / 'scan8.png')
  # Linked folders are followed; a link back up (a loop) is entered once.
  other = tmp_path / 'elsewhere'
  other.mkdir()
  Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(other / 'x.png')
  os.symlink(other, photos / 'linked')
  os.symlink(photos, photos / 'linked' / 'back_up')
  os.symlink('.', photos / 'loop')
  names = ['linked/x.png', 'phone.jpg', 'plain.jpg', 'scan16.png', 'scan8.png']
  assert embed_lib.list_images(str(photos)) == [str(photos / n) for n in names]
  lines = []
  summary = embed_lib.run(out_dir, str(photos), str(tmp_path / 'feats'), runtime='orbax',
                          print_fn=lines.append)
  written = str(tmp_path / 'feats.npz')
  assert summary['out'] == written and lines[-1].endswith(f'-> {written}')
  feats = np.load(written)
  assert list(feats['paths']) == [str(photos / n) for n in names]
  np.testing.assert_array_equal(feats['person'][3], feats['person'][4])  # 16-bit == 8-bit
  np.testing.assert_allclose(feats['person'][1], embedder(np.stack([got]))['person'][0],
                             atol=1e-5)
  # --out is checked before anything is embedded.
  monkeypatch.setattr(embed_lib, 'Embedder', lambda *a: pytest.fail('embedded before --out'))
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(ValueError, match=r'a_file/f.npz cannot be written \(.*a_file is a file'):
    embed_lib.run(out_dir, str(photos), str(tmp_path / 'a_file' / 'f.npz'))
  with pytest.raises(ValueError, match=r'is a folder; give the .npz file to write, e.g. '):
    embed_lib.run(out_dir, str(photos), str(tmp_path))


def test_search_names_bad_gallery_files_and_warns_on_duplicates(tmp_path, capsys):
  feats = np.eye(3, 4, dtype=np.float32)
  np.savez(tmp_path / 'q.npz', paths=np.array(['q.jpg']), person=feats[:1])
  np.save(tmp_path / 'g.npy', feats)  # the features alone, as np.save writes them
  np.savez(tmp_path / 'obj.npz', paths=np.array(['a', 'b', 'c'], dtype=object), person=feats)
  np.savez(tmp_path / 'empty.npz', paths=np.zeros((0,), str), person=np.zeros((0, 4), np.float32))
  (tmp_path / 'text.npz').write_text('a b c')
  np.savez(tmp_path / 'dup.npz', paths=np.array(['a.jpg', 'b.jpg', 'a.jpg']), person=feats)
  for name, message in (('g.npy', 'is a single .npy array; give the .npz that python -m '
                                  'ufo_jax.embed writes'),
                        ('obj.npz', "its 'paths' array holds Python objects"),
                        ('empty.npz', r'holds no items \(0 embedded images\)'),
                        ('text.npz', r'is not an .npz \(zip\) archive')):
    with pytest.raises(ValueError, match=message) as e:
      search_lib.search(str(tmp_path / name), str(tmp_path / 'q.npz'), 'person',
                        rank_list_queries=0, print_fn=lambda _: None)
    assert 'allow_pickle' not in str(e.value) and 'topk' not in str(e.value)
  out = search_lib.search(str(tmp_path / 'dup.npz'), str(tmp_path / 'q.npz'), 'person',
                          rank_list_queries=0, print_fn=lambda _: None)
  assert [m['path'] for m in out['results'][0]['matches']] == ['a.jpg', 'b.jpg', 'a.jpg']
  assert (f'search: warning: --gallery={tmp_path / "dup.npz"} lists 1 path(s) more than once '
          '(e.g. a.jpg 2 times)') in capsys.readouterr().err
