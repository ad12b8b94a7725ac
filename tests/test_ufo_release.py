"""UFO's released model (`paddle.save` state dict) read without Paddle and mapped to our model."""

import dataclasses
import os
import pickle

import numpy as np
import pytest
from flax import nnx
from ufo_release_fixtures import reference_embeddings, release_state, write_release

from ufo_jax.models import heads as heads_lib
from ufo_jax.models import multitask, ufo_release, vit

NUM_HEADS = 3  # width 192 / 64, as our Ti/16


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  state = release_state(extra={'backbone.sie_embed': np.zeros((3, 1, 192), np.float32)})
  d = tmp_path_factory.mktemp('ufo_release')
  new = write_release(d / 'new.pdmodel', state)
  old = write_release(d / 'old.pdmodel', state, numpy_module='numpy.core.multiarray')
  return state, new, old


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def test_reads_both_numpy_module_names(release):
  state, new, old = release
  for path in (new, old):
    got = ufo_release.read_state_dict(path)
    assert sorted(got) == sorted(state)  # the name table is dropped
    for k, v in state.items():
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  # Protocol 2 (bytes as latin-1 strings through _codecs.encode) reads too.
  p2 = write_release(os.path.join(os.path.dirname(new), 'p2.pdmodel'), state, protocol=2)
  np.testing.assert_array_equal(ufo_release.read_state_dict(p2)['backbone.norm.weight'],
                                state['backbone.norm.weight'])


def test_architecture_from_shapes(release):
  state, _, _ = release
  arch = ufo_release.architecture(state)
  assert (arch.width, arch.depth, arch.heads, arch.mlp_dim, arch.patch, arch.image_size) == (
    192, 2, NUM_HEADS, 768, 16, 32)
  assert arch.tasks == ('task1', 'task2', 'task3', 'task4')
  assert ufo_release.vit_config(arch) == ('Ti/16', 2)
  big = {'backbone.cls_token': np.zeros((1, 1, 1024)), 'backbone.norm.weight': 0,
         'backbone.patch_embed.proj.weight': np.zeros((1024, 3, 16, 16)),
         'backbone.pos_embed': np.zeros((1, 577, 1024)),
         'backbone.blocks.0.attn.qkv.bias': 0, 'backbone.blocks.0.mlp.fc1.weight': np.zeros(
           (1024, 4096)), 'backbone.blocks.23.norm1.weight': 0,
         'heads.task1.bottleneck.0.weight': 0}
  arch = ufo_release.architecture(big)
  assert (arch.heads, arch.image_size, arch.depth) == (16, 384, 24)
  assert ufo_release.vit_config(arch) == ('L/16', 0)
  with pytest.raises(ValueError, match=r'not 256 px \(an overlapping patch stride'):
    ufo_release.architecture(big, image_size=256)
  nonsquare = dict(big, **{'backbone.pos_embed': np.zeros((1, 129, 1024))})  # 256x128
  with pytest.raises(ValueError, match='non-square'):
    ufo_release.architecture(nonsquare)
  small = {k: v for k, v in big.items() if k != 'backbone.blocks.0.attn.qkv.bias'}
  with pytest.raises(ValueError, match="'small' ViT"):
    ufo_release.architecture(small)


def _release_model(arch, heads):
  config = ufo_release.release_config(arch, tuple(heads))
  model = multitask.create_model(config, {t: 1 for t in heads}, rngs=nnx.Rngs(0),
                                 load_pretrained=False)
  return model


@pytest.mark.parametrize('which', ['new', 'old'])
def test_embeddings_match_ufo_forward(release, images, which):
  """Our imported model == a numpy forward pass done UFO's way (scanned blocks, neck bias)."""
  state, new, old = release
  path = new if which == 'new' else old
  arch = ufo_release.architecture(state)
  model = _release_model(arch, ufo_release.EVALUATION_HEADS)
  assert model.backbone.scan_layers
  info = ufo_release.load_into(model, path)
  assert info['heads'] == ufo_release.EVALUATION_HEADS
  assert info['ignored'] == ['backbone.sie_embed', 'heads.task2.bottleneck.0._mean',
                             'heads.task2.bottleneck.0._variance',
                             'heads.task2.bottleneck.0.bias', 'heads.task2.bottleneck.0.weight']
  want = reference_embeddings(state, images, ufo_release.EVALUATION_HEADS, NUM_HEADS)
  x = (images.astype(np.float32) - 127.5) / 127.5
  got = nnx.jit(lambda m, x: {t: m.embed(x, t) for t in want})(model, x)
  for task, ref in want.items():
    np.testing.assert_allclose(np.asarray(got[task]), ref, rtol=2e-4, atol=2e-4, err_msg=task)
  # person and vehicle share task3 (evaluation_script.py); the training order gives task2.
  np.testing.assert_array_equal(want['person'], want['vehicle'])
  train = reference_embeddings(state, images, {'person': 'task2'}, NUM_HEADS)['person']
  assert np.abs(train - want['person']).max() > 1e-2


def test_hostile_pickle_refused(tmp_path):
  marker = tmp_path / 'ran'

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pdmodel'
  path.write_bytes(pickle.dumps({'backbone.cls_token': Evil()}, protocol=4))
  with pytest.raises(ufo_release.UnsafePickleError) as e:
    ufo_release.read_state_dict(path)
  msg = str(e.value)
  assert '\n' not in msg and str(path) in msg and 'system' in msg
  assert not marker.exists()
  path.write_bytes(b'not a pickle')
  with pytest.raises(ValueError, match='not a readable paddle.save pickle'):
    ufo_release.read_state_dict(path)


def test_mismatched_file_names_key_and_shapes(release, tmp_path):
  state, _, _ = release
  bad = dict(state)
  bad['backbone.blocks.1.attn.qkv.weight'] = np.zeros((192, 500), np.float32)
  path = write_release(tmp_path / 'bad.pdmodel', bad)
  model = _release_model(ufo_release.architecture(state), ufo_release.EVALUATION_HEADS)
  with pytest.raises(ValueError) as e:
    ufo_release.load_into(model, path)
  msg = str(e.value)
  assert "'backbone.blocks.1.attn.qkv.weight' has shape [192, 500], expected [192, 576]" in msg
  # A model of another size: the key and both shapes.
  other = vit.VisionTransformer(dataclasses.replace(vit.VARIANTS['Ti/16'], depth=2, mlp_dim=384),
                                image_size=32, rngs=nnx.Rngs(0))
  model.backbone = other
  with pytest.raises(ValueError, match=r"tensor 'backbone.blocks.0.mlp.fc1.bias' has shape "
                                       r'\[768\], the model needs \[384\]'):
    ufo_release.load_into(model, release[1])


def test_neck_bias_frozen_zero_from_scratch():
  neck = heads_lib.MaskedBatchNorm(4)
  assert isinstance(neck.bias, nnx.BatchStat)  # not a Param: no gradient, no optimizer state
  np.testing.assert_array_equal(neck.bias[...], np.zeros(4))
  neck.bias[...] = np.full((4,), 2.0, np.float32)
  neck.use_running_average = True
  np.testing.assert_allclose(neck(np.zeros((1, 4), np.float32)), np.full((1, 4), 2.0))


def test_pretrained_release_fine_tuning(release):
  """--config.model.pretrained=*.pdmodel through the training path (step.build, init,
  load_pretrained): backbone + the four necks in the training order; a fifth task and the class
  weights start as usual; another image size resizes the position grid."""
  import copy

  from ufo_test_utils import host_copy

  from ufo_jax import config as config_lib
  from ufo_jax import sharding
  from ufo_jax import step as step_lib

  state_dict, new, _ = release
  config = config_lib.load_config('ufo_tiny')
  config.input.image_size = 48
  config.model.variant, config.model.depth, config.model.scan_layers = 'Ti/16', 2, True
  config.model.pretrained = str(new)
  config.tasks.logo = copy.deepcopy(config.tasks.product)
  for task in config.tasks:
    config.tasks[task].batch_size = 4
  mesh = sharding.create_mesh(config.mesh)
  classes = dict.fromkeys(config.tasks, 5)
  setup = step_lib.build(config, classes, mesh,
                         compiler_options={'xla_backend_optimization_level': 0})
  fresh = setup.init()
  fresh_host = host_copy(fresh)
  state = step_lib.load_pretrained(config, setup, fresh)
  params = vit.get_vit_params(step_lib.merge_model(setup, state).backbone)
  np.testing.assert_array_equal(params['blocks.1.mlp.fc2.kernel'],
                                state_dict['backbone.blocks.1.mlp.fc2.weight'])
  assert params['pos_embed'].shape == (1, 10, 192)  # 2x2 grid -> 3x3
  necks = state['model_state']['heads']
  for task, head in ufo_release.TRAINING_HEADS.items():
    neck = necks[task]['neck']
    np.testing.assert_array_equal(neck['bias'][...], state_dict[f'heads.{head}.bottleneck.0.bias'])
    np.testing.assert_array_equal(neck['var'][...],
                                  state_dict[f'heads.{head}.bottleneck.0._variance'])
    np.testing.assert_array_equal(state['params']['heads'][task]['neck']['scale'][...],
                                  state_dict[f'heads.{head}.bottleneck.0.weight'])
  for name in ('bias', 'mean', 'var'):  # the fifth task's neck and the class weights: fresh
    np.testing.assert_array_equal(necks['logo']['neck'][name][...],
                                  fresh_host['model_state']['heads']['logo']['neck'][name][...])
  np.testing.assert_array_equal(state['params']['heads']['face']['class_weights'][...],
                                fresh_host['params']['heads']['face']['class_weights'][...])
  # The bias is model state, not a parameter: no gradient and no optimizer update reach it.
  assert 'bias' not in state['params']['heads']['person']['neck']


class _NullWriter:
  def write_scalars(self, *a, **k):
    pass

  def write_images(self, *a, **k):
    pass

  def flush(self):
    pass


def test_export_embed_and_eval_from_the_imported_folder(release, images, tmp_path):
  """--ufo_release: a normal export folder (no Paddle) that load_exported, embed and
  --mode=eval --exported read; model.json names the source file and the heads."""
  from PIL import Image

  from data_prep import build, generate
  from ufo_jax import config as config_lib
  from ufo_jax import embed as embed_lib
  from ufo_jax import export as export_lib
  from ufo_jax import inference
  from ufo_jax.evaluation import run as eval_run

  state, new, _ = release
  out = str(tmp_path / 'export')
  info = export_lib.export_ufo_release(str(new), out, formats='orbax,jax_export',
                                       print_fn=lambda _: None)
  assert info['tasks'] == ['face', 'person', 'product', 'vehicle']
  src = info['source']
  assert src['ufo_release']['name'] == 'new.pdmodel'
  assert src['ufo_release']['size'] == os.path.getsize(new)
  assert len(src['ufo_release']['sha256']) == 64
  assert src['heads'] == ufo_release.EVALUATION_HEADS and src['step'] is None
  assert info['checks']['jax_export_max_abs_diff'] < 1e-4
  loaded = inference.load_exported(out)
  got = inference.embed(loaded, images)
  want = reference_embeddings(state, images, ufo_release.EVALUATION_HEADS, NUM_HEADS)
  for task, ref in want.items():
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got[task], ref, atol=2e-4, err_msg=task)

  folder = tmp_path / 'imgs'
  folder.mkdir()
  for i, img in enumerate(images):
    Image.fromarray(img).save(folder / f'{i}.png')
  embed_lib.run(out, str(folder), str(tmp_path / 'e.npz'), runtime='jax_export',
                print_fn=lambda _: None)
  np.testing.assert_allclose(np.load(tmp_path / 'e.npz')['person'], got['person'], atol=1e-5)

  raw, data = tmp_path / 'raw', tmp_path / 'data'
  sizes = generate.Sizes(num_ids=3, images_per_id=2, image_size=40, num_pairs=10)
  for name in ('lfw', 'market1501'):
    build.convert(name, generate.write_dataset(name, raw, sizes=sizes).path, data,
                  skip_count_check=True)
  config = config_lib.load_run_config(out)  # the export's config.json: ufo_l + the release's
  assert (config.model.variant, config.model.depth, config.input.image_size) == ('Ti/16', 2, 32)
  with config.unlocked():
    config.input.data_dir = str(data)
    config.input.allow_partial_data = True
    config.eval.sets = ('lfw', 'market1501')
    config.eval.batch_size = 8
    config.eval.figures = False
  results = eval_run.evaluate_checkpoint(config, str(tmp_path / 'eval'), exported=out,
                                         writer=_NullWriter())
  assert 0.0 <= results['lfw']['accuracy'] <= 1.0 and 0.0 <= results['market1501']['mAP'] <= 1.0
  reports = list((tmp_path / 'eval').rglob('report.md'))
  text = reports[0].read_text()  # the imported model's row beside the published UFO rows
  assert '| UFO ViT-L, drop path 0.2 | 95.92 |' in text
  assert 'UFO release new.pdmodel (imported)** | - | - | 90.00' in text or (
    'UFO release new.pdmodel (imported)** |' in text)
