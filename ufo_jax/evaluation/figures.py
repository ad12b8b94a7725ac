"""PNG figures of an evaluation: CMC curves, face ROC curves and re-id rank lists.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend
change). A rank list shows a query and its top-k gallery images (junk removed), framed green
where the gallery image shows the query's identity and red where it does not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ufo_jax.evaluation import ranking

GREEN = (0, 170, 0)
RED = (220, 0, 0)
GRAY = (128, 128, 128)


def _save(fig: Figure, path: str, **kwargs) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100, **kwargs)
  return path


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str, *, title: str = 'CMC') -> str:
  """CMC curves (fractions per rank, rank 1 first) of several sets in one PNG."""
  if not curves:
    raise ValueError('plot_cmc needs at least one curve')
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  for name, cmc in curves.items():
    cmc = np.asarray(cmc, np.float64)
    if cmc.ndim != 1 or cmc.size == 0:
      raise ValueError(f'CMC curve {name!r} must be a non-empty 1-D array, got {cmc.shape}')
    ax.plot(np.arange(1, cmc.size + 1), 100 * cmc, marker='.', label=f'{name} (R1 '
            f'{100 * cmc[0]:.1f})')
  ax.set_xlabel('rank')
  ax.set_ylabel('matching rate (%)')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc='lower right', fontsize='small')
  return _save(fig, path)


def plot_roc(rocs: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
             title: str = 'ROC') -> str:
  """ROC curves, ``{name: (fpr, tpr)}``, in one PNG."""
  if not rocs:
    raise ValueError('plot_roc needs at least one curve')
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  for name, (fpr, tpr) in rocs.items():
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
      raise ValueError(f'ROC {name!r}: fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-D')
    order = np.argsort(fpr, kind='stable')
    ax.plot(fpr[order], tpr[order], label=name)
  ax.plot([0, 1], [0, 1], color='gray', linestyle=':', linewidth=1)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel('false positive rate')
  ax.set_ylabel('true positive rate')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc='lower right', fontsize='small')
  return _save(fig, path)


def _as_rgb(image, what: str) -> np.ndarray:
  img = np.asarray(image)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise ValueError(f'{what} must be a uint8 HxWx3 (or HxW) array, got {img.dtype} {img.shape}')
  return img


def framed(image: np.ndarray, color: tuple[int, int, int], width: int | None = None) -> np.ndarray:
  """The image with a solid border of ``color`` (about 5% of its size) around it."""
  img = _as_rgb(image, 'image')
  width = width or max(2, round(0.05 * max(img.shape[:2])))
  out = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), np.uint8)
  out[...] = np.asarray(color, np.uint8)
  out[width:-width, width:-width] = img
  return out


@dataclasses.dataclass(frozen=True)
class Panel:
  """One image of a rank list: the image, its frame colour and its caption."""

  image: np.ndarray  # uint8 HxWx3 (or HxW)
  frame: tuple[int, int, int]
  caption: str
  caption_color: str = 'black'


def plot_rank_rows(rows: Sequence[Sequence[Panel]], path: str, *, title: str | None = None,
                   fontsize: int = 9) -> str:
  """Rank lists in one PNG: one row of framed, captioned panels per query (query first)."""
  if not rows or not all(rows):
    raise ValueError('plot_rank_rows needs at least one row, and a panel in each row')
  framed_rows = [[framed(_as_rgb(p.image, f'row {r} image {c}'), p.frame)
                  for c, p in enumerate(row)] for r, row in enumerate(rows)]
  cols = max(len(row) for row in rows)
  fig = Figure(figsize=(1.3 * cols, 1.6 * len(rows) + 1.0))
  for r, row in enumerate(rows):
    for c, panel in enumerate(row):
      ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
      ax.imshow(framed_rows[r][c])
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      ax.set_title(panel.caption, fontsize=fontsize, color=panel.caption_color)
  if title:
    fig.suptitle(title, fontsize=fontsize + 1)
  return _save(fig, path, bbox_inches='tight', pad_inches=0.1)


def plot_rank_list(query_image, gallery_images: Sequence, matches: Sequence[bool], path: str, *,
                   title: str | None = None, captions: Sequence[str] | None = None) -> str:
  """One row: the query (gray frame), then its ranked gallery images framed green / red."""
  if len(gallery_images) != len(matches):
    raise ValueError(f'{len(gallery_images)} gallery images but {len(matches)} match flags')
  if captions is not None and len(captions) != len(gallery_images):
    raise ValueError(f'{len(gallery_images)} gallery images but {len(captions)} captions')
  row = [Panel(query_image, GRAY, 'query')]
  row += [Panel(img, GREEN if m else RED, captions[i] if captions else f'{i + 1}',
                'green' if m else 'red')
          for i, (img, m) in enumerate(zip(gallery_images, matches))]
  return plot_rank_rows([row], path, title=title)


def ranked_gallery(dist_row: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray,
                   g_camids: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery indices of one query (stable order, junk removed) and their match flags."""
  order = np.argsort(np.asarray(dist_row), kind='stable')
  junk = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
  top = order[~junk][:topk]
  return top, g_pids[top] == q_pid


def write_rank_lists(distmat, q_pids, g_pids, q_camids, g_camids,
                     load_image: Callable[[str, int], np.ndarray], out_dir: str, *,
                     num_queries: int = 4, topk: int = 10, seed: int = 0,
                     query_indices: Sequence[int] | None = None,
                     prefix: str = 'rank_list') -> list[str]:
  """Rank lists of a few queries as PNGs ``{prefix}_q{index}.png``; returns their paths.

  Args:
    distmat: ``(Q, G)`` distances, or any object with ``shape`` and ``distmat[i]`` giving query
      ``i``'s distance row (e.g. ``reid.LazyDistances`` for a set too large for the matrix).
    q_pids, g_pids, q_camids, g_camids: the ids (junk = same pid and camera, not shown).
    load_image: ``load_image(split, index)`` with split ``'query'`` or ``'gallery'`` returns a
      uint8 HxWx3 image.
    out_dir: output folder (created).
    num_queries: queries drawn at random (seeded) among those with a positive.
    topk: gallery images per list.
    query_indices: explicit queries instead of the random draw.
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  num_q, num_g = distmat.shape
  if len(q_pids) != num_q or len(q_camids) != num_q:
    raise ValueError(f'{num_q} query rows but {len(q_pids)} q_pids / {len(q_camids)} q_camids')
  if len(g_pids) != num_g or len(g_camids) != num_g:
    raise ValueError(f'{num_g} gallery columns but {len(g_pids)} g_pids / '
                     f'{len(g_camids)} g_camids')
  if query_indices is None:
    _, offsets = ranking.find_positives(q_pids, g_pids, q_camids, g_camids)
    pos = np.flatnonzero(np.diff(offsets) > 0)
    if len(pos) == 0:
      raise ValueError('no query has a positive (same pid, another camera) in the gallery')
    rng = np.random.default_rng(seed)
    query_indices = sorted(rng.choice(pos, size=min(num_queries, len(pos)), replace=False))
  paths = []
  for i in query_indices:
    i = int(i)
    top, matches = ranked_gallery(np.asarray(distmat[i]), q_pids[i], q_camids[i], g_pids,
                                  g_camids, topk)
    path = os.path.join(out_dir, f'{prefix}_q{i}.png')
    plot_rank_list(load_image('query', i), [load_image('gallery', int(j)) for j in top],
                   matches, path, title=f'query {i} (pid {q_pids[i]}, camera {q_camids[i]})',
                   captions=[f'{r + 1}' for r in range(len(top))])
    paths.append(path)
  return paths
