"""Probe figures: accuracy against normalised layer depth (Figs 11, 13, F.x), per-token grids (D.4)."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from vit_analysis.plotting import PANEL_INCHES, heatmap


def layer_curves(curves: Sequence[dict], *, title: str = "",
                 ylabel: str = "top-1 accuracy (%)") -> plt.Figure:
  """One line per curve: x = layer index / (num_layers - 1) in [0, 1], y = accuracy in %.

  Args:
    curves: dicts with 'label', 'mean' [L] and optional 'std' [L] (fractions in [0, 1]; drawn as
      a band) and 'layers' (names, used for a single-curve tick labelling only).
    title: axes title.
  """
  fig, ax = plt.subplots(figsize=(1.6 * PANEL_INCHES, PANEL_INCHES))
  for c in curves:
    mean = 100 * np.asarray(c["mean"], np.float64)
    if mean.ndim != 1 or not len(mean):
      raise ValueError(f"curve {c.get('label')!r}: need a non-empty [L] mean, got {mean.shape}")
    x = np.linspace(0, 1, len(mean)) if len(mean) > 1 else np.zeros(1)
    (line,) = ax.plot(x, mean, marker="o", markersize=2.5, label=c["label"])
    if c.get("std") is not None:
      std = 100 * np.asarray(c["std"], np.float64)
      ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlabel("normalised layer (input → output)")
  ax.set_ylabel(ylabel)
  ax.set_xlim(0, 1)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  ax.legend(fontsize=6, loc="best")
  return fig


def token_grids(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]]) -> plt.Figure:
  """Per-token probe accuracy as grid heatmaps (Fig D.4): one row per model, one panel per layer.

  Args:
    rows: (row label, [(layer name, accuracy grid [gh, gw] in [0, 1]), ...]). Each panel has its
      own colour range, as in the paper (the value spread inside one layer is the point).
  """
  ncols = max(len(panels) for _, panels in rows)
  fig, axes = plt.subplots(len(rows), ncols, squeeze=False,
                           figsize=(0.75 * PANEL_INCHES * ncols, 0.7 * PANEL_INCHES * len(rows)))
  for r, (label, panels) in enumerate(rows):
    for c in range(ncols):
      ax = axes[r, c]
      if c >= len(panels):
        ax.axis("off")
        continue
      layer, grid = panels[c]
      grid = 100 * np.asarray(grid, np.float64)
      heatmap(ax, grid, vmin=float(grid.min()), vmax=float(grid.max()) + 1e-9, cmap="viridis",
              title=f"{label}\n{layer}" if c == 0 else layer, origin="upper")
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle("per-token probe accuracy (%)", fontsize=9)
  fig.tight_layout()
  return fig
