"""config.eval.ufo_protocols: the two places where UFO's released evaluators compute differently."""

import numpy as np

from ufo_jax.evaluation import protocols, retrieval, vehicleid
from ufo_jax.evaluation.extract import Embeddings


def ufo_recall_at_ks(feats, labels, ks):
  """UFO's retri_evaluator.recall_at_ks (self-query, offset 1), with a stable exact search."""
  f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  order = np.argsort(-(f @ f.T), axis=1, kind='stable')[:, :max(ks) + 1]
  return {k: float((labels[:, None] == labels[order[:, 1:k + 1]]).any(1).mean()) for k in ks}


def test_sop_ufo_recall_drops_the_nearest_neighbour():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(12), 3)
  feats = rng.standard_normal((36, 8)).astype(np.float32) + 2.0 * np.eye(12, 8)[labels % 8]
  # Exact duplicates in other classes: item 27 + j ties with item 3 * j, which comes first.
  for j in range(4):
    feats[27 + j] = feats[3 * j]
  ks = (1, 2, 5, 10)
  got = retrieval.recall_at_k_ufo(feats, labels, ks)
  assert got == ufo_recall_at_ks(feats, labels, ks)
  ours = retrieval.recall_at_k(feats, labels, ks)
  assert got != ours  # the duplicates make the two rules differ

  emb = Embeddings(feats, labels.astype(np.int64), np.full(36, -1), np.arange(36), 36)
  p = protocols.PROTOCOLS['retrieval']
  assert p.evaluate('sop', {'test': emb}, protocols.Context(ufo_protocols=True))[1] == got[1]
  assert p.evaluate('sop', {'test': emb}, protocols.Context())[1] == ours[1]


def test_vehicleid_ufo_protocols_is_one_draw():
  rng = np.random.default_rng(1)
  ids = np.repeat(np.arange(10), 3)
  feats = rng.standard_normal((30, 6)).astype(np.float32) + 2.0 * np.eye(10, 6)[ids % 6]
  emb = Embeddings(feats, ids.astype(np.int64), np.full(30, -1), np.arange(30), 30)
  p = protocols.PROTOCOLS['vehicleid']
  got = p.evaluate('vehicleid', {'test': emb},
                   protocols.Context(vehicleid_repeats=10, ufo_protocols=True))
  one = vehicleid.evaluate_vehicleid(feats, ids, repeats=1, seed=0, max_rank=protocols.MAX_RANK)
  assert got['rank1'] == one['rank1'] and got['mAP'] == one['mAP']
  assert len(got['per_repeat']) == 1
