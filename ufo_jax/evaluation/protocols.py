"""The evaluation protocols, one small class each (docs/EVALUATION.md, "Protocols").

    protocol = protocols.of('market1501')         # the protocol of a benchmark
    embs = {split: extract(split) for split in protocol.splits(catalog.get(name))}
    metrics = protocol.evaluate(name, embs, context)
    chance = protocol.chance(name, embs, context)  # the same metrics of a random ranking
    points = protocol.operating_points(name, embs, context)  # cosine thresholds at FAR 1e-2..
    protocol.scalars(metrics)    # {'rank1': ..., 'mAP': ...}: TensorBoard eval/<set>/<metric>
    protocol.headline(metrics)   # the report table's cell, in %: (rank1, mAP)
    protocol.details(metrics)    # the report's "more" column, as short strings
    protocol.curve(metrics)      # its figure's data (``curve_kind``: 'cmc', 'roc' or None)
    protocol.figures(out_dir, name, embs, context)  # extra PNGs (re-id rank lists)

``evaluation.run`` and ``evaluation.report`` loop over benchmarks through ``of(name)`` and know
no protocol by name. Four protocols, keyed by ``catalog.PROTOCOL_*``:

* ``Verification`` (face sets): the insightface 10-fold accuracy of the pairs, rows ``[0::2]``
  and ``[1::2]`` of the ``test`` split, with the set's ``is_same``;
* ``ReId`` (Market-1501, DukeMTMC, MSMT17, VeRi-776, VeRi-Wild): CMC / mAP / mINP of ``query``
  against ``gallery``, same pid and camera removed (the fast-reid / torchreid protocol);
* ``VehicleId``: seeded one-image-per-identity galleries of ``test``, repeated;
* ``Retrieval`` (SOP): Recall@K of every item querying all the others.

Chance levels are computed from the data: the expected metric under a uniformly random ranking
(face: the best constant answer). Operating points (``thresholds``): the cosine threshold at
FAR 1e-2, 1e-3 and 1e-4 and the TAR there, over the face set's verification pairs, a re-id
set's query-gallery pairs, or every ordered pair of distinct SOP / VehicleID items.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np
from absl import logging

from ufo_jax import catalog
from ufo_jax import config as config_lib
from ufo_jax import data as data_lib
from ufo_jax.data import augment
from ufo_jax.evaluation import face, figures, reid, retrieval, thresholds, vehicleid
from ufo_jax.evaluation.extract import Embeddings

MAX_RANK = 50
RECALL_KS = (1, 10, 100, 1000)
NUM_FOLDS = 10
RANK_LIST_QUERIES = 3
RANK_LIST_TOPK = 10
THUMBNAIL = 160  # longest side of the images drawn in rank lists, in pixels


@dataclasses.dataclass(frozen=True)
class Context:
  """What a protocol needs besides the embeddings.

  Attributes:
    data_dir: the converted test sets (face pair labels, rank-list images).
    vehicleid_repeats: VehicleID gallery draws (``config.eval.vehicleid_repeats``).
    vehicleid_seed: draw ``r`` uses ``np.random.default_rng(seed + r)``.
    rank_list_queries: queries drawn per re-id set in ``figures`` (0: none).
    thresholds: whether ``run.evaluate`` computes the operating points (``eval.thresholds``).
    ufo_protocols: compute as UFO's released evaluation does where it differs
      (``config.eval.ufo_protocols``; docs/EVALUATION.md, "Against UFO's evaluators"): VehicleID
      from one gallery draw, SOP dropping each query's nearest neighbour instead of itself.
  """

  data_dir: str = ''
  vehicleid_repeats: int = 10
  vehicleid_seed: int = 0
  rank_list_queries: int = RANK_LIST_QUERIES
  thresholds: bool = True
  ufo_protocols: bool = False


# --------------------------------------------------------------------------------------------
# Chance levels: expected metrics of a uniformly random ranking, from the data.
# --------------------------------------------------------------------------------------------
def _harmonic(n: np.ndarray) -> np.ndarray:
  """Harmonic numbers H_n (H_0 = 0) of an integer array."""
  n = np.asarray(n, np.int64)
  table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(n.max()), 0) + 1))])
  return table[n]


def expected_ap(positives: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Expected AP of a uniformly random ranking of ``valid`` items holding ``positives``.

  ``E[AP] = (H_V + (P - 1) / (V - 1) * (V - H_V)) / V`` (P positives among V items; 1 when
  V = 1): the mean over ranks k of P(rel_k) * E[precision@k | rel_k] / P.
  """
  p = np.asarray(positives, np.float64)
  v = np.asarray(valid, np.int64)
  h = _harmonic(v)
  vf = v.astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    spread = np.where(v > 1, (p - 1) / np.maximum(vf - 1, 1) * (vf - h), 0.0)
  return (h + spread) / vf


def _counts(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """How often each of ``keys`` occurs in ``table``."""
  values, counts = np.unique(table, return_counts=True)
  pos = np.clip(np.searchsorted(values, keys), 0, len(values) - 1)
  return np.where(values[pos] == keys, counts[pos], 0)


def chance_reid(q_pids, g_pids, q_camids, g_camids) -> dict:
  """Rank-1 and mAP of a random ranking: mean over valid queries of P/V and of E[AP].

  P = gallery items with the query's pid on another camera, V = gallery items left after
  removing those with its pid and camera.
  """
  q_pids, g_pids = np.asarray(q_pids, np.int64), np.asarray(g_pids, np.int64)
  q_cams, g_cams = np.asarray(q_camids, np.int64), np.asarray(g_camids, np.int64)
  low = min(q_cams.min(), g_cams.min())
  span = max(q_cams.max(), g_cams.max()) - low + 1
  same_pid = _counts(g_pids, q_pids)
  junk = _counts(g_pids * span + (g_cams - low), q_pids * span + (q_cams - low))
  positives, valid = same_pid - junk, len(g_pids) - junk
  ok = positives > 0
  if not ok.any():
    raise ValueError('chance level: no query has a positive in the gallery')
  return {'rank1': float(np.mean(positives[ok] / valid[ok])),
          'mAP': float(np.mean(expected_ap(positives[ok], valid[ok]))),
          'num_valid_queries': int(ok.sum())}


def chance_vehicleid(pids) -> dict:
  """VehicleID: one positive among a gallery of one image per identity (G = #identities)."""
  g = len(np.unique(np.asarray(pids)))
  return {'rank1': 1.0 / g, 'mAP': float(expected_ap(np.array([1]), np.array([g]))[0])}


def chance_retrieval(labels) -> dict:
  """Recall@1 of a random ranking: mean over items of (same-class others) / (n - 1)."""
  labels = np.asarray(labels, np.int64)
  n = len(labels)
  if n < 2:
    raise ValueError('chance level: retrieval needs at least 2 items')
  others = _counts(labels, labels) - 1
  return {1: float(np.mean(others / (n - 1)))}


def chance_face(is_same) -> dict:
  """The accuracy of the best constant answer: 50% for the balanced insightface sets."""
  p = float(np.mean(np.asarray(is_same, bool)))
  return {'accuracy': max(p, 1.0 - p)}


# --------------------------------------------------------------------------------------------
# Helpers of the protocols.
# --------------------------------------------------------------------------------------------
def _check_ids(emb: Embeddings, what: str, cameras: bool = False) -> None:
  if len(emb) == 0:
    raise ValueError(f'{what}: no valid image (all rows failed to decode?)')
  if np.all(emb.ids < 0):
    raise ValueError(f'{what}: the converted split has no identities (id is -1 everywhere)')
  if cameras and np.all(emb.cameras < 0):
    raise ValueError(f'{what}: the converted split has no camera ids (camera is -1 everywhere)')


def face_pairs(emb: Embeddings, is_same: np.ndarray, what: str = 'face set', *,
               warn: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(embeddings1, embeddings2, is_same)`` of the pairs whose two images are both present.

  Row ``2i`` and ``2i + 1`` are the sides of pair ``i``; a pair with an undecodable side is left
  out (with a warning, unless ``warn`` is False).
  """
  is_same = np.asarray(is_same, bool)
  num_rows = 2 * len(is_same)
  if emb.num_rows is not None and emb.num_rows != num_rows:
    raise ValueError(f'{what}: {emb.num_rows} rows but {len(is_same)} pairs (expected '
                     f'{num_rows} rows)')
  if len(emb) and (emb.index.min() < 0 or emb.index.max() >= num_rows):
    raise ValueError(f'{what}: row index outside [0, {num_rows})')
  position = np.full(num_rows, -1, np.int64)
  position[emb.index] = np.arange(len(emb))
  a, b = position[0::2], position[1::2]
  ok = (a >= 0) & (b >= 0)
  if warn and not ok.all():
    logging.warning('%s: %d of %d pairs have an undecodable image and are left out', what,
                    int((~ok).sum()), len(ok))
  return emb.features[a[ok]], emb.features[b[ok]], is_same[ok]


def _recall(metrics: Mapping[Any, Any], k: int) -> float:
  for key in (k, str(k), f'recall@{k}', f'R@{k}'):
    if key in metrics:
      return float(metrics[key])
  raise ValueError(f'retrieval metrics have no Recall@{k} (keys: {sorted(map(str, metrics))})')


def _reid_pair(metrics: Mapping[str, Any]) -> tuple[float, float]:
  if 'rank1' in metrics:
    rank1 = float(metrics['rank1'])
  elif 'cmc' in metrics:
    rank1 = float(np.asarray(metrics['cmc'])[0])
  else:
    raise ValueError(f're-id metrics need "rank1" or "cmc" (keys: {sorted(metrics)})')
  if 'mAP' not in metrics:
    raise ValueError(f're-id metrics need "mAP" (keys: {sorted(metrics)})')
  return rank1, float(metrics['mAP'])


def _all_pairs_operating_points(emb: Embeddings) -> dict:
  """Operating points over every ordered pair of distinct items (each item its own camera)."""
  own = np.arange(len(emb))
  return thresholds.pair_operating_points(emb.features, emb.features, emb.ids, emb.ids, own,
                                          own)


def load_thumbnail(split, index: int, size: int = THUMBNAIL) -> np.ndarray:
  """Row ``index`` of a converted split as a uint8 RGB array, longest side at most ``size``."""
  img = augment.decode_image(split.read([int(index)])[0]['image'])
  img.thumbnail((size, size))
  return np.asarray(img)


# --------------------------------------------------------------------------------------------
# The protocols.
# --------------------------------------------------------------------------------------------
class Protocol(abc.ABC):
  """One evaluation protocol; subclasses implement the abstract methods (all take numpy and
  return numbers)."""

  key: ClassVar[str]  # catalog.PROTOCOL_*
  curve_kind: ClassVar[str | None] = None  # which figure ``curve`` goes in: 'cmc', 'roc'

  def splits(self, info: catalog.DatasetInfo) -> tuple[str, ...]:
    """The converted splits the benchmark reads."""
    return (info.eval_split,)

  @abc.abstractmethod
  def evaluate(self, name: str, embs: Mapping[str, Embeddings], context: Context) -> dict:
    """The protocol's metrics (fractions in [0, 1]) from the embeddings of ``splits``."""

  @abc.abstractmethod
  def chance(self, name: str, embs: Mapping[str, Embeddings], context: Context) -> dict:
    """The headline metrics of a uniformly random ranking, in the form of ``evaluate``'s."""

  @abc.abstractmethod
  def operating_points(self, name: str, embs: Mapping[str, Embeddings],
                       context: Context) -> dict:
    """Cosine thresholds at ``thresholds.FARS`` with their TAR (``thresholds`` module)."""

  def scalars(self, metrics: Mapping[Any, Any]) -> dict[str, float]:
    """The scalars of the metrics (fractions), as named in TensorBoard: the protocol's own
    (``metric_scalars``), then ``tar@far1e-3``, ``threshold@far1e-3``... of the operating
    points."""
    return {**self.metric_scalars(metrics),
            **thresholds.scalars(metrics.get('operating_points'))}

  @abc.abstractmethod
  def metric_scalars(self, metrics: Mapping[Any, Any]) -> dict[str, float]:
    """The protocol's own scalars."""

  @abc.abstractmethod
  def headline(self, metrics: Mapping[Any, Any]) -> tuple[float, ...]:
    """The published metric(s) in %, the report table's cell."""

  def details(self, metrics: Mapping[Any, Any]) -> list[str]:
    """Further metrics as short strings (the report's per-benchmark column)."""
    return []

  def note(self, info: catalog.DatasetInfo) -> str | None:
    """A line the report adds about how this set was evaluated (None: nothing to say)."""
    del info
    return None

  def curve(self, metrics: Mapping[Any, Any]) -> Any:
    """The data of this benchmark's curve in the ``curve_kind`` figure."""
    return None

  def figures(self, out_dir: str, name: str, embs: Mapping[str, Embeddings],
              context: Context) -> list[str]:
    """PNGs of one benchmark beyond the shared curves; returns their paths."""
    return []


class Verification(Protocol):
  """Face verification: 10-fold accuracy of the pairs (insightface ``verification.py``)."""

  key = catalog.PROTOCOL_VERIFICATION
  curve_kind = 'roc'

  def _is_same(self, name: str, context: Context) -> np.ndarray:
    return data_lib.load_pairs_labels(context.data_dir, name, catalog.get(name).eval_split)

  def evaluate(self, name, embs, context):
    e1, e2, same = face_pairs(embs['test'], self._is_same(name, context), name)
    return face.verification_accuracy(e1, e2, same, nfolds=NUM_FOLDS)

  def chance(self, name, embs, context):
    return chance_face(self._is_same(name, context))

  def operating_points(self, name, embs, context):
    e1, e2, same = face_pairs(embs['test'], self._is_same(name, context), name, warn=False)
    return thresholds.verification_operating_points(e1, e2, same)

  def metric_scalars(self, metrics):
    keys = ('accuracy', 'accuracy_std', 'threshold')
    return {k: float(metrics[k]) for k in keys if k in metrics}

  def headline(self, metrics):
    if 'accuracy' not in metrics:
      raise ValueError(f'verification metrics need "accuracy" (keys: {sorted(metrics)})')
    return (100.0 * float(metrics['accuracy']),)

  def details(self, metrics):
    parts = []
    if 'accuracy_std' in metrics:
      parts.append(f'std {100 * float(metrics["accuracy_std"]):.2f}')
    if 'threshold' in metrics:
      parts.append(f'threshold {float(metrics["threshold"]):.2f}')
    return parts

  def curve(self, metrics):
    return metrics['fpr'], metrics['tpr']


class _Ranked(Protocol):
  """Shared by the protocols reporting rank-1 / mAP and a CMC curve."""

  curve_kind = 'cmc'

  def metric_scalars(self, metrics):
    out = {}
    cmc = np.asarray(metrics.get('cmc', []))
    for r in (1, 5, 10):
      if len(cmc) >= r:
        out[f'rank{r}'] = float(cmc[r - 1])
    for k in ('mAP', 'mINP', 'rank1_std', 'rank5_std', 'mAP_std', 'mINP_std'):
      if k in metrics:
        out[k] = float(metrics[k])
    return out

  def headline(self, metrics):
    return tuple(100.0 * v for v in _reid_pair(metrics))

  def details(self, metrics):
    parts = []
    if 'cmc' in metrics and len(metrics['cmc']) >= 10:
      cmc = np.asarray(metrics['cmc'])
      parts.append(f'R5 {100 * cmc[4]:.2f}, R10 {100 * cmc[9]:.2f}')
    if 'mINP' in metrics:
      parts.append(f'mINP {100 * float(metrics["mINP"]):.2f}')
    for key in ('rank1_std', 'mAP_std'):
      if key in metrics:
        parts.append(f'{key} {100 * float(metrics[key]):.2f}')
    if 'num_valid_queries' in metrics:
      parts.append(f'{int(metrics["num_valid_queries"])} queries')
    return parts

  def curve(self, metrics):
    return metrics['cmc']


class ReId(_Ranked):
  """Re-id: CMC / mAP / mINP of query vs gallery, same pid and camera removed."""

  key = catalog.PROTOCOL_REID

  def splits(self, info):
    return ('query', 'gallery')

  @staticmethod
  def cameras(name: str, query: Embeddings, gallery: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """The cameras the removal compares. A set without cameras (a custom set) gets query 0 and
    gallery 1: no gallery image shares a query's camera, so only the query image itself, which
    is not in the gallery split, is left out."""
    if catalog.get(name).has_camera:
      return query.cameras, gallery.cameras
    return np.zeros_like(query.ids), np.ones_like(gallery.ids)

  def note(self, info):
    if info.has_camera:
      return None
    return (f'{info.name}: no camera ids, so only the query image itself is removed from its '
            'gallery (no same-identity-same-camera removal)')

  def evaluate(self, name, embs, context):
    query, gallery = embs['query'], embs['gallery']
    has_camera = catalog.get(name).has_camera
    _check_ids(query, f'{name} query', cameras=has_camera)
    _check_ids(gallery, f'{name} gallery', cameras=has_camera)
    q_cams, g_cams = self.cameras(name, query, gallery)
    out = reid.evaluate_rank_from_features(query.features, gallery.features, query.ids,
                                           gallery.ids, q_cams, g_cams, max_rank=MAX_RANK)
    out['rank1'] = float(out['cmc'][0])
    return out

  def chance(self, name, embs, context):
    q, g = embs['query'], embs['gallery']
    return chance_reid(q.ids, g.ids, *self.cameras(name, q, g))

  def operating_points(self, name, embs, context):
    q, g = embs['query'], embs['gallery']
    return thresholds.pair_operating_points(q.features, g.features, q.ids, g.ids, q.cameras,
                                            g.cameras)

  def figures(self, out_dir, name, embs, context):
    """``rank_list_<name>_q<i>.png`` of ``context.rank_list_queries`` queries."""
    if context.rank_list_queries < 1:
      return []
    query, gallery = embs['query'], embs['gallery']
    splits = {s: data_lib.open_split(context.data_dir, name, s) for s in ('query', 'gallery')}
    rows = {'query': query.index, 'gallery': gallery.index}

    def load(split: str, i: int) -> np.ndarray:
      return load_thumbnail(splits[split], int(rows[split][i]))

    return figures.write_rank_lists(
        reid.LazyDistances(query.features, gallery.features), query.ids, gallery.ids,
        *self.cameras(name, query, gallery), load, out_dir,
        num_queries=context.rank_list_queries,
        topk=RANK_LIST_TOPK, prefix=f'rank_list_{name}')


class VehicleId(_Ranked):
  """VehicleID: seeded one-image-per-identity galleries, mean and spread over the repeats."""

  key = catalog.PROTOCOL_VEHICLEID

  def evaluate(self, name, embs, context):
    _check_ids(embs['test'], f'{name} test')
    return vehicleid.evaluate_vehicleid(embs['test'].features, embs['test'].ids,
                                        repeats=1 if context.ufo_protocols
                                        else int(context.vehicleid_repeats),
                                        seed=int(context.vehicleid_seed), max_rank=MAX_RANK)

  def chance(self, name, embs, context):
    return chance_vehicleid(embs['test'].ids)

  def operating_points(self, name, embs, context):
    return _all_pairs_operating_points(embs['test'])


class Retrieval(Protocol):
  """SOP: Recall@1/10/100/1000 of every item querying all the others, ``id`` as the class."""

  key = catalog.PROTOCOL_RETRIEVAL

  def evaluate(self, name, embs, context):
    _check_ids(embs['test'], f'{name} test')
    recall = retrieval.recall_at_k_ufo if context.ufo_protocols else retrieval.recall_at_k
    return recall(embs['test'].features, embs['test'].ids, ks=RECALL_KS)

  def chance(self, name, embs, context):
    return chance_retrieval(embs['test'].ids)

  def operating_points(self, name, embs, context):
    return _all_pairs_operating_points(embs['test'])

  def metric_scalars(self, metrics):
    return {f'recall@{k}': float(v) for k, v in metrics.items() if isinstance(k, int)}

  def headline(self, metrics):
    return (100.0 * _recall(metrics, 1),)

  def details(self, metrics):
    parts = []
    for k in RECALL_KS[1:]:
      try:
        parts.append(f'R@{k} {100 * _recall(metrics, k):.2f}')
      except ValueError:
        pass
    return parts


PROTOCOLS: dict[str, Protocol] = {
    p.key: p for p in (Verification(), ReId(), VehicleId(), Retrieval())}


def of(name: str) -> Protocol:
  """The protocol of benchmark ``name`` (a ``catalog.benchmarks()`` name: the 13 public ones or
  a learned custom set)."""
  info = catalog.get(name)
  if info.protocol is None or info.eval_split is None:
    raise config_lib.ConfigError(
        f'{name!r} is not a benchmark; benchmarks: {", ".join(catalog.benchmarks())}')
  return PROTOCOLS[info.protocol]


def splits(name: str) -> tuple[str, ...]:
  """The converted splits benchmark ``name`` reads."""
  return of(name).splits(catalog.get(name))


def context(config: Any, data_dir: str) -> Context:
  """The ``Context`` of an experiment config's ``eval.*`` fields."""
  return Context(data_dir=data_dir, vehicleid_repeats=int(config.eval.vehicleid_repeats),
                 vehicleid_seed=int(config.eval.get('vehicleid_seed', 0)),
                 rank_list_queries=int(config.eval.get('rank_list_queries',
                                                       RANK_LIST_QUERIES)),
                 thresholds=bool(config.eval.get('thresholds', True)),
                 ufo_protocols=bool(config.eval.get('ufo_protocols', False)))


def by_kind(results: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """``{benchmark: curve}`` of the results whose protocol draws in figure ``kind``."""
  return {n: of(n).curve(m) for n, m in results.items() if of(n).curve_kind == kind}

