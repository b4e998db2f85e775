"""Figures: pure functions from result arrays to matplotlib Figures, one module per figure family.

`similarity` (CKA heatmaps, head subsets, localisation, dataset scale), `mechanisms` (attention
distance, receptive fields, skip norms), `probes` (layer-wise probe accuracy); `recipes` saves a
figure's function and arguments under the run's results so that the report can redraw it. This
module holds the pieces they share: the figure style and `heatmap`.
"""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

# No backend is forced here: on a machine without a display matplotlib falls back to Agg by
# itself, and forcing it would break `%matplotlib inline` in notebooks that import this package.

# Readable in a two-column paper: ~3.3 in per panel, 8-9 pt text.
PANEL_INCHES = 3.3
plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 150})


def heatmap(ax: matplotlib.axes.Axes, matrix: np.ndarray, *, vmin: float = 0.0, vmax: float = 1.0,
            xlabel: str = "", ylabel: str = "", title: str = "",
            cmap: str | matplotlib.colors.Colormap = "magma", colorbar: bool = True,
            origin: str = "lower") -> matplotlib.image.AxesImage:
  """Draws `matrix: [rows, cols]` with a fixed colour range (default [0, 1], as CKA) on `ax`.

  Rows run bottom-to-top (`origin='lower'`) so that layer 0 of both axes meets at the corner, as in
  the paper's heatmaps.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.ndim != 2:
    raise ValueError(f"heatmap needs a 2-D matrix, got shape {matrix.shape}")
  image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap, origin=origin,
                    interpolation="nearest", aspect="auto")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if colorbar:
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  return image
