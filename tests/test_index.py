"""FAISS indexes (ufo_jax.index): build / add / remove / search round trips for every kind, the
measured recall, model ids, atomic writes, and search --index."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ufo_jax import embed as embed_lib
from ufo_jax import index as index_lib
from ufo_jax import search as search_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 16
MODEL = '0123456789abcdef'


def clustered(n, seed, clusters=12, dim=DIM, noise=0.35):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(clusters, dim))
  x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(queries, gallery, k):
  """Top-k rows and scores by cosine, numpy only."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  scores = q @ g.T
  rows = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(scores, rows, 1), rows


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A gallery of 300 paths, 100 more of which 40 re-embed gallery paths, and queries."""
  d = tmp_path_factory.mktemp('features')
  paths = np.array([f'/data/g/{i:04d}.jpg' for i in range(360)])
  gallery, more = clustered(300, 1), clustered(100, 2)
  more_paths = paths[260:360]  # 260..299 are already in the gallery: replaced
  embed_lib.write_npz(str(d / 'g.npz'), paths[:300], {'person': gallery}, model_id=MODEL)
  embed_lib.write_npz(str(d / 'more.npz'), more_paths, {'person': more}, model_id=MODEL)
  embed_lib.write_npz(str(d / 'q.npz'), [f'/q/{i}.jpg' for i in range(20)],
                      {'person': clustered(20, 3)}, model_id=MODEL)
  embed_lib.write_npz(str(d / 'other.npz'), ['/x/1.jpg'], {'person': clustered(1, 4)},
                      model_id='fedcba9876543210')
  removed = list(paths[0:15]) + list(paths[280:285]) + ['/never/added.jpg']
  (d / 'remove.txt').write_text('\n'.join(removed) + '\n')
  # What the index must hold at the end: gallery 15..259 and 285..299 replaced by `more`.
  final = {p: v for p, v in zip(paths[:300], gallery)}
  final.update(zip(more_paths, more))
  for p in removed:
    final.pop(p, None)
  return d, final, removed


@pytest.mark.parametrize('kind', index_lib.KINDS)
def test_build_add_remove_search_round_trip(files, tmp_path, kind):
  d, final, removed = files
  out = str(tmp_path / kind)
  lines = []
  m = {'ivf_pq': 8, 'hnsw': 16}.get(kind)
  built = index_lib.build(str(d / 'g.npz'), 'person', kind, out, m=m, print_fn=lines.append)
  assert built.count == 300 and built.model_id == MODEL and built.task == 'person'
  if kind in index_lib.APPROXIMATE:
    assert 'recall@10' in lines[0] and 0.0 < built.meta['recall_at_10'] <= 1.0
  else:
    assert 'recall_at_10' not in built.meta
  with pytest.raises(FileExistsError, match='already holds an index'):
    index_lib.build(str(d / 'g.npz'), 'person', kind, out)
  grown = index_lib.add(out, str(d / 'more.npz'), print_fn=lines.append)
  assert grown.count == 360 and '40 of them replaced' in lines[-1]
  pruned = index_lib.remove(out, str(d / 'remove.txt'), print_fn=lines.append)
  assert pruned.count == len(final) == 340 and '1 listed path(s) were not in the index' in lines[-1]
  index = index_lib.open_index(out)  # from disk
  assert index.count == len(final) and index.kind == kind
  assert index_lib.info(out, print_fn=lines.append)['entries'] == len(final)
  assert f'{len(final)} entries' in lines[-1] and MODEL in lines[-1]

  want_paths = np.array(sorted(final))
  want = np.stack([final[p] for p in want_paths])
  # A removed or replaced vector as the query: its path never comes back (removed) or comes
  # back with the NEW vector's score (replaced).
  old = clustered(300, 1)
  scores, rows = index.search(old[[0, 1, 280, 290]], index.count)
  got = index.paths[rows]
  assert not np.isin(got, removed).any() and (rows >= 0).all()
  assert len(set(got[0])) == index.count  # each live entry once
  replaced = got[3] == '/data/g/0290.jpg'
  np.testing.assert_allclose(scores[3][replaced], old[290] @ final['/data/g/0290.jpg'],
                             atol=0.05 if kind == 'ivf_pq' else 1e-5)
  # Top-10 of the queries against numpy on the final entries.
  queries = np.load(d / 'q.npz')['person']
  scores, rows = index.search(queries, 10)
  b_scores, b_rows = brute_force(queries, want, 10)
  hits = np.mean([len(set(index.paths[r]) & set(want_paths[b])) / 10
                  for r, b in zip(rows, b_rows)])
  if kind == 'flat':
    assert hits == 1.0
    np.testing.assert_allclose(scores, b_scores, atol=1e-5)
  else:
    assert hits >= {'ivf': 0.9, 'hnsw': 0.9, 'ivf_pq': 0.5}[kind], hits
  # search --index: the same ranking, in results.json.
  results = search_lib.search(None, str(d / 'q.npz'), None, index_dir=out, topk=5,
                              out_dir=str(tmp_path / 'hits'), rank_list_queries=0,
                              print_fn=lines.append)
  assert results['search'] == f'{kind} index' and results['model_id'] == MODEL
  assert [m['path'] for m in results['results'][0]['matches']] == list(index.paths[rows[0, :5]])
  with pytest.raises(ValueError, match='holds person features'):
    search_lib.search(None, str(d / 'q.npz'), 'face', index_dir=out)


def test_measured_recall_is_that_of_the_index_against_brute_force(tmp_path):
  """ivf reading 1 of 16 cells: build's recall@10 equals a numpy recount on its sample."""
  vectors = clustered(1200, 7, clusters=40, dim=32, noise=0.6)
  paths = [f'/r/{i}.jpg' for i in range(len(vectors))]
  embed_lib.write_npz(str(tmp_path / 'g.npz'), paths, {'face': vectors}, model_id=MODEL)
  index = index_lib.build(str(tmp_path / 'g.npz'), 'face', 'ivf', str(tmp_path / 'ix'),
                          nlist=16, nprobe=1, recall_queries=200, print_fn=lambda _: None)
  rows = index_lib.recall_sample(len(vectors), 200)
  assert index.meta['recall']['queries'] == 200 == len(rows)
  _, truth = brute_force(vectors[rows], vectors, 11)
  _, found = index.search(vectors[rows], 11)
  recount = np.mean([len(set(t[t != r][:10]) & set(f[f != r][:10])) / 10
                     for t, f, r in zip(truth, found, rows)])
  assert index.meta['recall_at_10'] == pytest.approx(recount, abs=1e-4)
  assert 0.3 < recount < 0.999  # approximate: some true neighbours live in unread cells
  exhaustive = index_lib.build(str(tmp_path / 'g.npz'), 'face', 'ivf', str(tmp_path / 'all'),
                               nlist=16, nprobe=16, recall_queries=200, print_fn=lambda _: None)
  assert exhaustive.meta['recall_at_10'] == pytest.approx(1.0, abs=1e-3)


def test_mixing_models_is_refused(files, tmp_path, capsys):
  d = files[0]
  out = str(tmp_path / 'ix')
  index_lib.build(str(d / 'g.npz'), 'person', 'flat', out, print_fn=lambda _: None)
  with pytest.raises(ValueError, match=rf'ix is of model {MODEL}, .*other.npz of model fedcba'):
    index_lib.add(out, str(d / 'other.npz'))
  with pytest.raises(ValueError, match='--allow_mixed_models'):
    search_lib.search(None, str(d / 'other.npz'), None, index_dir=out)
  capsys.readouterr()
  assert index_lib.add(out, str(d / 'other.npz'), allow_mixed_models=True,
                       print_fn=lambda _: None).count == 301
  assert 'mixing them' in capsys.readouterr().err


def test_an_interrupted_write_leaves_the_previous_version(files, tmp_path, monkeypatch):
  d = files[0]
  out = str(tmp_path / 'ix')
  index_lib.build(str(d / 'g.npz'), 'person', 'hnsw', out, print_fn=lambda _: None)
  real_savez = np.savez

  def dies(*args, **kwargs):  # index.faiss is written, entries.npz is not: a crash mid-write
    raise KeyboardInterrupt

  monkeypatch.setattr(index_lib.np, 'savez', dies)
  with pytest.raises(KeyboardInterrupt):
    index_lib.add(out, str(d / 'more.npz'), print_fn=lambda _: None)
  assert os.path.isdir(os.path.join(out, '.tmp-v000002'))
  assert index_lib.open_index(out).count == 300  # version 1, whole
  monkeypatch.setattr(index_lib.np, 'savez', real_savez)
  assert index_lib.add(out, str(d / 'more.npz'), print_fn=lambda _: None).count == 360
  assert sorted(os.listdir(out)) == ['CURRENT', 'v000001', 'v000002']
  (tmp_path / 'ix' / 'CURRENT').write_text('v000009\n')  # points at nothing
  with pytest.raises(ValueError, match='version v000009 is damaged'):
    index_lib.open_index(out)


def test_command_line(files, tmp_path, capsys):
  d = files[0]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, '-m', 'ufo_jax.index', *args], cwd=ROOT, capture_output=True, text=True,
      env=env, timeout=300)
  proc = run('build', f'--features={d / "g.npz"}', '--task=person', '--kind=ivf', '--nlist=4',
             f'--out={tmp_path / "ix"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'index build: 300 person features' in proc.stdout and 'recall@10' in proc.stdout
  meta = json.loads((tmp_path / 'ix' / 'v000001' / 'index.json').read_text())
  assert meta['kind'] == 'ivf' and meta['nlist'] == 4 and meta['model_id'] == MODEL
  with pytest.raises(SystemExit) as exit_info:  # a bad command: one error line, status 1
    index_lib.main(['index', 'shrink'])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.startswith('error: expected one command of build, add')
