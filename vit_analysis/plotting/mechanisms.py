"""Figures of the mechanism analyses: attention distance, receptive fields, skip norms/removal.

Pure functions: arrays in, a matplotlib Figure out (`Context.save_figure` writes it and its
recipe, `plotting.recipes`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from vit_analysis.models import layers
from vit_analysis.plotting import PANEL_INCHES, heatmap


def _check(name: str, x, ndim: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
  return x


def attention_distance_scatter(distances: Mapping[str, np.ndarray], unit: str = "pixels",
                               uniform: Mapping[str, float] | None = None):
  """One panel per model: x = block, y = mean distance, one point per head (Figs 3/4 data).

  Args:
    distances: model label -> [L, H].
    uniform: model label -> distance of uniform attention over the patches (dashed line: the
      most global a head can be on average, ~115 px at 224 px in the paper).
  """
  n = len(distances)
  fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n, PANEL_INCHES * 0.8), squeeze=False,
                           sharey=True)
  for ax, (label, d) in zip(axes[0], distances.items()):
    d = _check(label, d, 2)
    num_layers, num_heads = d.shape
    for h in range(num_heads):
      ax.scatter(np.arange(num_layers), d[:, h], s=10, alpha=0.8, label=f"head {h}")
    if uniform and label in uniform:
      ax.axhline(uniform[label], color="grey", ls="--", lw=0.8, label="uniform attention")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("block")
    ax.set_title(label)
    ax.set_xticks(np.arange(num_layers))
  axes[0, 0].set_ylabel(f"mean attention distance ({unit})")
  if n and distances:
    axes[0, -1].legend(fontsize=6, loc="lower right", ncol=2)
  fig.tight_layout()
  return fig


def attention_distance_sorted(distances: Mapping[str, np.ndarray], blocks: Sequence[int] = (),
                              unit: str = "pixels"):
  """Paper layout (Fig 3): x = heads sorted by distance, y = distance, one line per block.

  Args:
    distances: model label -> [L, H].
    blocks: blocks to draw (negative indices allowed); default the first two and last two.
  """
  n = len(distances)
  fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n, PANEL_INCHES * 0.8), squeeze=False,
                           sharey=True)
  for ax, (label, d) in zip(axes[0], distances.items()):
    d = _check(label, d, 2)
    num_layers = d.shape[0]
    chosen = blocks or sorted({0, 1, num_layers - 2, num_layers - 1} & set(range(num_layers)))
    for b in chosen:
      b = b % num_layers
      ax.plot(np.sort(d[b]), marker="o", ms=3, label=f"block {b}")
    ax.set_xlabel("sorted attention head")
    ax.set_title(label)
    ax.legend(fontsize=7)
  axes[0, 0].set_ylabel(f"mean distance ({unit})")
  fig.tight_layout()
  return fig


def receptive_fields(erfs: Mapping[str, np.ndarray], title: str = "", columns: int = 6,
                     summaries: Mapping[str, float] | None = None):
  """A grid of ERF images, one per layer, each scaled to its own maximum (Figs 6, C.1-C.4).

  Args:
    erfs: layer label -> [H, W] (non-negative).
    summaries: optional layer label -> number shown in the panel title (e.g. 50%-mass area).
  """
  n = len(erfs)
  if n == 0:
    raise ValueError("no receptive fields to plot")
  cols = min(columns, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, (label, erf) in zip(axes.ravel(), erfs.items()):
    erf = _check(label, erf, 2)
    ax.imshow(erf / max(erf.max(), 1e-30), cmap="viridis", vmin=0, vmax=1,
              interpolation="nearest")
    extra = f"\n50%: {summaries[label]:.3f}" if summaries and label in summaries else ""
    ax.set_title(f"{label}{extra}", fontsize=6)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def token_block_heatmaps(panels: Mapping[str, np.ndarray], max_tokens: int | None = None,
                         title: str = "", log: bool = True, has_cls: bool = True):
  """Heatmaps x = token ('CLS', 'patch 0', ...), y = block, colour = value (Fig 7, Fig E.1).

  Args:
    panels: panel label -> [L, T] (e.g. 'identity / SelfAttn' ratios).
    max_tokens: show the first tokens only (the paper's Fig 7 shows ~10).
    log: colour by log10 (ratios span decades).
    has_cls: token 0 is a CLS token (labels: `models.layers.token_labels`).
  """
  n = len(panels)
  fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n, PANEL_INCHES * 0.9), squeeze=False)
  for ax, (label, m) in zip(axes[0], panels.items()):
    m = _check(label, m, 2)[:, :max_tokens]
    shown = np.log10(np.clip(m, 1e-6, 1e12)) if log else m
    finite = shown[np.isfinite(shown)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    heatmap(ax, shown, vmin=lo, vmax=max(hi, lo + 1e-6), cmap="viridis", xlabel="token",
            ylabel="block", title=f"{label}{' (log10)' if log else ''}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ticks = [int(t) for t in ax.get_xticks() if 0 <= t < m.shape[1]]
    names = layers.token_labels(m.shape[1], has_cls)  # m holds the first tokens only
    ax.set_xticks(ticks, [names[t].replace("patch ", "p") for t in ticks], rotation=90)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def depth_lines(lines: Mapping[str, np.ndarray], ylabel: str, log: bool = False, title: str = ""):
  """x = block/unit index, one line per series (Fig 7 right, Fig E.2).

  Series of different lengths (ViT blocks vs ResNet units) share the x axis by index; an
  infinite value (dead branch) is drawn as a marker at the top edge and reported in the legend.

  Args:
    lines: label -> [depth].
  """
  fig, ax = plt.subplots(figsize=(PANEL_INCHES * 1.3, PANEL_INCHES * 0.9))
  for label, y in lines.items():
    y = _check(label, y, 1)
    bad = ~np.isfinite(y)
    tag = f" ({bad.sum()} inf)" if bad.any() else ""
    ax.plot(np.arange(len(y)), np.where(bad, np.nan, y), marker="o", ms=3, label=label + tag)
  if log:
    ax.set_yscale("log")
  ax.set_xlabel("block / unit index")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def skip_removal_heatmaps(matrices: Mapping[str, np.ndarray],
                          accuracies: Mapping[str, float | None]):
  """Intra-model CKA heatmap per model, accuracy in the title (Fig 8).

  Args:
    matrices: model label -> [layers, layers] CKA.
    accuracies: model label -> top-1 accuracy in [0, 1] (None if unknown).
  """
  n = len(matrices)
  fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n, PANEL_INCHES), squeeze=False)
  for ax, (label, m) in zip(axes[0], matrices.items()):
    acc = accuracies.get(label)
    title = label if acc is None else f"{label}\nacc {100 * acc:.1f}%"
    heatmap(ax, _check(label, m, 2), xlabel="layer", ylabel="layer", title=title)
  fig.tight_layout()
  return fig
