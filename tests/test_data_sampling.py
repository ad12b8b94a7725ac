"""Samplers: P x K identity batches, uniform epochs, process slices, the homogeneous draw."""

import collections

import numpy as np
import pytest

from ufo_jax.data import sampling


def _labels(num_ids=40, seed=0):
  """Shuffled labels with identities of 1..11 images (some fewer than K=4)."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 12, size=num_ids)
  counts[:5] = [1, 2, 3, 1, 2]
  labels = np.repeat(np.arange(num_ids), counts)
  return labels[rng.permutation(len(labels))]


def test_identity_batches_are_p_ids_times_k_images():
  labels = _labels()
  counts = np.bincount(labels)
  s = sampling.IdentitySampler(labels, 24, 4, seed=3)
  assert s.p == 6
  for step in range(3 * s.steps_per_epoch + 1):
    recs = s.batch(step)
    assert recs.shape == (24,)
    lab = labels[recs].reshape(6, 4)
    assert (lab == lab[:, :1]).all(), 'K consecutive images of one identity'
    assert len(set(lab[:, 0])) == 6, 'P distinct identities'
    for group, ident in zip(recs.reshape(6, 4), lab[:, 0]):
      if counts[ident] >= 4:
        assert len(set(group)) == 4, 'no repeats when the identity has K images'
      else:  # with replacement: every image of the identity, plus repeats
        assert set(group) == set(np.flatnonzero(labels == ident))


def test_identity_epoch_uses_each_image_at_most_once():
  labels = _labels(num_ids=60, seed=1)
  counts = np.bincount(labels)
  s = sampling.IdentitySampler(labels, 16, 4, seed=0)
  for epoch in range(2):
    recs = np.concatenate([s.batch(epoch * s.steps_per_epoch + j)
                           for j in range(s.steps_per_epoch)])
    big = recs[counts[labels[recs]] >= 4]
    assert len(big) == len(set(big))
    # An identity appears in about images / K batches (at least once if it fits in the epoch).
    per_id = collections.Counter(labels[recs].tolist())
    assert max(per_id.values()) <= 4 * max(1, counts.max() // 4)
  assert s.steps_per_epoch == int(np.maximum(counts // 4, 1).sum()) // 4


def test_identity_sampler_seeded_and_reshuffled():
  labels = _labels()
  a = sampling.IdentitySampler(labels, 24, 4, seed=0)
  b = sampling.IdentitySampler(labels, 24, 4, seed=0)
  c = sampling.IdentitySampler(labels, 24, 4, seed=1)
  n = a.steps_per_epoch
  np.testing.assert_array_equal(a.batch(5), b.batch(5))
  np.testing.assert_array_equal(a.batch(n + 2), b.batch(n + 2))
  assert not np.array_equal(a.batch(0), c.batch(0))
  assert not np.array_equal(a.batch(0), a.batch(n))  # the next epoch is reshuffled


def test_identity_process_slices_disjoint_and_covering():
  labels = _labels(num_ids=50)
  parts = [sampling.IdentitySampler(labels, 8, 4, seed=0, process_index=p, process_count=2)
           for p in range(2)]
  recs = [set(p.local_records().tolist()) for p in parts]
  assert not recs[0] & recs[1]
  assert recs[0] | recs[1] == set(range(len(labels)))
  ids = [set(labels[list(r)].tolist()) for r in recs]
  assert not ids[0] & ids[1], 'an identity lives on one process with all its images'
  for p, part in enumerate(parts):
    for step in range(10):
      assert set(part.batch(step).tolist()) <= recs[p]


def test_identity_substitute_keeps_identity():
  labels = _labels()
  s = sampling.IdentitySampler(labels, 8, 4, seed=0)
  rng = np.random.default_rng(0)
  for rec in s.batch(0):
    sub = s.substitute(int(rec), rng)
    if (labels == labels[rec]).sum() > 1:
      assert labels[sub] == labels[rec] and sub != rec


def test_identity_sampler_errors_name_the_setting():
  labels = np.repeat(np.arange(3), 5)
  with pytest.raises(ValueError, match='config.tasks.person.batch_size'):
    sampling.IdentitySampler(labels, 16, 4, seed=0, name='person')
  with pytest.raises(ValueError, match='multiple of num_instances'):
    sampling.IdentitySampler(labels, 6, 4, seed=0)


def test_uniform_epochs_and_process_slices():
  n, b = 103, 10
  parts = [sampling.UniformSampler(n, b, seed=0, process_index=p, process_count=3)
           for p in range(3)]
  local = [set(p.local_records().tolist()) for p in parts]
  assert sum(len(x) for x in local) == n and set.union(*local) == set(range(n))
  for p, part in enumerate(parts):
    assert part.steps_per_epoch == len(local[p]) // b
    epoch = np.concatenate([part.batch(j) for j in range(part.steps_per_epoch)])
    assert len(set(epoch)) == len(epoch) and set(epoch) <= local[p]
    nxt = np.concatenate([part.batch(part.steps_per_epoch + j)
                          for j in range(part.steps_per_epoch)])
    assert not np.array_equal(epoch, nxt)
  again = sampling.UniformSampler(n, b, seed=0, process_index=1, process_count=3)
  np.testing.assert_array_equal(again.batch(7), parts[1].batch(7))


def test_uniform_split_smaller_than_the_batch_streams_epochs():
  s = sampling.UniformSampler(5, 8, seed=0)
  stream = np.concatenate([s.batch(j) for j in range(5)])  # 40 draws = 8 epochs of 5
  for e in range(8):
    assert sorted(stream[5 * e:5 * e + 5]) == list(range(5))
  again = sampling.UniformSampler(5, 8, seed=0)
  np.testing.assert_array_equal(again.batch(3), s.batch(3))


def test_task_chooser_proportions_and_occurrences():
  chooser = sampling.TaskChooser([1024, 512, 512, 512], seed=0)
  draws = [chooser.choose(s) for s in range(6000)]
  tasks = np.array([t for t, _ in draws])
  freq = np.bincount(tasks, minlength=4) / len(tasks)
  np.testing.assert_allclose(freq, [0.4, 0.2, 0.2, 0.2], atol=0.025)
  for t in range(4):
    occ = [o for tt, o in draws if tt == t]
    assert occ == list(range(len(occ)))  # each task walks through its own batches in order
  fresh = sampling.TaskChooser([1024, 512, 512, 512], seed=0)
  assert fresh.choose(4321) == draws[4321]  # random access gives the same answer
