"""Figures of the representation-similarity analyses (Figs 1, 2, 5, 9, 10, 12, B.1, D.x, G.x, H.x).

Pure functions: arrays and layer names in, a matplotlib Figure out (`Context.save_figure` writes it
and its recipe, `plotting.recipes`). Every CKA colour scale is fixed to [0, 1] so that panels of
different models compare by colour.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np

from vit_analysis.models import layers
from vit_analysis.plotting import PANEL_INCHES, heatmap

# Layer name -> the group its tick is labelled with: ViT/Mixer 'block03/...' -> 'B3',
# ResNet 'block2/unit01/...' -> 'b2u1' (`layers.parse`). Names outside any group (embedding,
# root, norms) label themselves.
_SHORT = {"embedding": "emb", "encoder_norm": "norm", "stem": "stem", "root/conv": "root",
          "root": "root", "pre_head_layer_norm": "norm", "head_norm": "norm",
          "pre_logits": "pre", "logits": "logits"}


def layer_group(name: str) -> str:
  """Short label of the block/unit a layer belongs to ('B3', 'b2u1', 'emb', ...)."""
  parsed = layers.parse(name)
  if parsed.kind != "other":
    return parsed.group
  return _SHORT.get(name, name.split("/")[0])


def layer_ticks(names: Sequence[str], max_labels: int = 14) -> tuple[list[int], list[str]]:
  """Tick positions (first layer of each block/unit) and their labels, thinned to `max_labels`.

  Returns:
    (positions, labels): layer indices into `names` and the group labels drawn there.
  """
  positions, labels = [], []
  previous = None
  for i, name in enumerate(names):
    group = layer_group(name)
    if group != previous:
      positions.append(i)
      labels.append(group)
      previous = group
  if len(positions) > max_labels:
    step = int(np.ceil(len(positions) / max_labels))
    keep = list(range(0, len(positions), step))
    positions = [positions[k] for k in keep]
    labels = [labels[k] for k in keep]
  return positions, labels


def _label_axis(ax, names: Sequence[str] | None, axis: str, title: str) -> None:
  if names is None:
    return
  positions, labels = layer_ticks(names)
  if axis == "x":
    ax.set_xticks(positions, labels, rotation=90)
    ax.set_xlabel(f"{title} layer ({len(names)})")
  else:
    ax.set_yticks(positions, labels)
    ax.set_ylabel(f"{title} layer ({len(names)})")


def cka_heatmap(matrix: np.ndarray, *, row_names: Sequence[str] | None = None,
                col_names: Sequence[str] | None = None, row_model: str = "",
                col_model: str = "", title: str = "",
                spread: np.ndarray | None = None) -> matplotlib.figure.Figure:
  """CKA heatmap between the layers of two models (or one model with itself).

  Args:
    matrix: [rows, cols] CKA (mean over repeats); rows are the y-axis from the input (bottom) up.
    row_names, col_names: layer names for the tick labels (blocks/units), or None for plain indices.
    row_model, col_model: model names written on the axes.
    title: figure title.
    spread: optional [rows, cols] spread (std over repeats): drawn as a second panel whose colour
      range is [0, max spread].

  Returns:
    The figure (one or two panels).
  """
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2:
    raise ValueError(f"CKA matrix must be 2-D, got shape {matrix.shape}")
  if row_names is not None and len(row_names) != matrix.shape[0]:
    raise ValueError(f"{len(row_names)} row names for a matrix of shape {matrix.shape}")
  if col_names is not None and len(col_names) != matrix.shape[1]:
    raise ValueError(f"{len(col_names)} column names for a matrix of shape {matrix.shape}")
  panels = 1 if spread is None else 2
  fig, axes = plt.subplots(1, panels, figsize=(1.15 * PANEL_INCHES * panels, PANEL_INCHES),
                           squeeze=False)
  ax = axes[0, 0]
  heatmap(ax, matrix, title=title or "CKA")
  _label_axis(ax, col_names, "x", col_model)
  _label_axis(ax, row_names, "y", row_model)
  if spread is not None:
    spread = np.asarray(spread, np.float64)
    if spread.shape != matrix.shape:
      raise ValueError(f"spread shape {spread.shape} != matrix shape {matrix.shape}")
    ax = axes[0, 1]
    heatmap(ax, spread, vmin=0.0, vmax=max(float(np.nanmax(spread)), 1e-6), cmap="viridis",
            title="std over repeats")
    _label_axis(ax, col_names, "x", col_model)
    _label_axis(ax, row_names, "y", row_model)
  fig.tight_layout()
  return fig


# Every measure's colour range (docs/method.md#other-similarity-measures), shared with the
# interactive report (`report/figures.py`) so that both pages colour a value alike. Measures in
# [0, 1] share CKA's range, so that side-by-side panels compare by colour; RSA is a rank
# correlation, ridge R^2 is unbounded below (None: the panel's minimum, at most 0), the
# Procrustes angle is in [0, pi/2] radians with lower = more similar.
MEASURE_RANGE = {m: (0.0, 1.0) for m in ("linear_cka", "rbf_cka", "procrustes", "mutual_knn",
                                         "svcca", "pwcca", "distance_correlation")}
MEASURE_RANGE.update(rsa=(-1.0, 1.0), linear_predictivity=(None, 1.0),
                     procrustes_distance=(0.0, np.pi / 2))
_LOWER_IS_SIMILAR = ("procrustes_distance",)
MASKED_COLOUR = "#bdbdbd"  # cells not above the null: grey, outside every colour map used here


def colour_scale(measure: str, matrix: np.ndarray) -> tuple[float, float, bool]:
  """(vmin, vmax, diverging) of a heatmap of `measure`.

  A measure of known range is drawn on that range (a None end follows the data: ridge R^2's
  minimum, at most 0); any other (e.g. a null's mean of an unknown measure) on a diverging map
  centred at 0 with the symmetric range [-max |x|, max |x|], so that noise around 0 reads as
  noise.
  """
  finite = np.asarray(matrix, np.float64)
  finite = finite[np.isfinite(finite)]
  if measure in MEASURE_RANGE:
    lo, hi = MEASURE_RANGE[measure]
    if lo is None:
      lo = min(0.0, float(finite.min())) if finite.size else 0.0
    if hi is None:
      hi = max(1.0, float(finite.max())) if finite.size else 1.0
    return lo, hi, False
  bound = float(np.abs(finite).max()) if finite.size else 0.0
  bound = bound or 1.0
  return -bound, bound, True


def measure_heatmaps(values: Mapping[str, np.ndarray], *, row_names: Sequence[str],
                     col_names: Sequence[str], row_model: str = "", col_model: str = "",
                     above_null: Mapping[str, np.ndarray] | None = None,
                     null_means: Mapping[str, np.ndarray] | None = None, fdr: float = 0.05,
                     note: str = "", title: str = "") -> matplotlib.figure.Figure:
  """One heatmap per similarity measure, side by side; below them each measure's shuffle null.

  The measures in [0, 1] share one colour range, so that panels compare by colour; a measure with
  another range (RSA, ridge R^2, the Procrustes angle) is drawn on its own (`colour_scale`). A
  null's mean is drawn on its measure's scale, or on a diverging map centred at 0 with a
  symmetric range when the measure's range is unknown.

  Args:
    values: {measure: [rows, cols]} (mean over repeats), e.g. linear CKA, RBF CKA, Procrustes.
    row_names, col_names: layer names for the tick labels.
    row_model, col_model: model names written on the axes.
    above_null: optional {measure: [rows, cols] bool}: the cells above the shuffle null
      (Benjamini–Hochberg at q = `fdr` over the heatmap, docs/method.md#significance); the others
      are masked (grey), each panel title counts them and the figure says what grey means.
    null_means: optional {measure: [rows, cols]} mean of the measure under the shuffle null,
      drawn as a second row (measures without one leave their cell empty).
    fdr: the false-discovery rate of `above_null`, for the explanation.
    note: a line under the title (e.g. why no cell is masked).
    title: figure title.

  Returns:
    The figure: 1 x M panels, or 2 x M with `null_means`.
  """
  if not values:
    raise ValueError("no measures to draw")
  shape = (len(row_names), len(col_names))
  null_means = {k: v for k, v in (null_means or {}).items() if k in values}
  rows = 2 if null_means else 1
  fig, axes = plt.subplots(rows, len(values), squeeze=False,
                           figsize=(1.1 * PANEL_INCHES * len(values), PANEL_INCHES * rows))
  masked_any = False
  for j, (name, matrix) in enumerate(values.items()):
    ax = axes[0, j]
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != shape:
      raise ValueError(f"{name}: shape {matrix.shape} for {shape[0]} x {shape[1]} names")
    lo, hi, diverging = colour_scale(name, matrix)
    label = name + (" (lower = more similar)" if name in _LOWER_IS_SIMILAR else "")
    if above_null is not None and name in above_null:
      keep = np.asarray(above_null[name], bool)
      if keep.shape != shape:
        raise ValueError(f"above_null[{name!r}]: shape {keep.shape} != {shape}")
      matrix = np.where(keep, matrix, np.nan)
      masked = int((~keep).sum())
      masked_any |= masked > 0
      label += f"\n{masked} of {keep.size} cells not above the null"
    _masked_heatmap(ax, matrix, lo, hi, diverging, label)
    _label_axis(ax, col_names, "x", col_model)
    _label_axis(ax, row_names, "y", row_model)
    if rows == 2:
      ax = axes[1, j]
      if name not in null_means:
        ax.axis("off")
        continue
      null = np.asarray(null_means[name], np.float64)
      if null.shape != shape:
        raise ValueError(f"null_means[{name!r}]: shape {null.shape} != {shape}")
      lo, hi, diverging = colour_scale(name, null)
      _masked_heatmap(ax, null, lo, hi, diverging, f"{name}: mean under the shuffle null")
      _label_axis(ax, col_names, "x", col_model)
      _label_axis(ax, row_names, "y", row_model)
  notes = [t for t in (title, note) if t]
  if masked_any:
    notes.append(f"grey cells: not above the shuffle null (Benjamini–Hochberg, q = {fdr:g}, "
                 "over each heatmap's cells)")
  if notes:
    fig.suptitle("\n".join(notes))
  fig.tight_layout()
  return fig


def _masked_heatmap(ax, matrix: np.ndarray, lo: float, hi: float, diverging: bool,
                    title: str) -> None:
  """`heatmap` with NaN cells in `MASKED_COLOUR`; a diverging map (blue < 0 < red) if asked."""
  cmap = plt.get_cmap("RdBu_r" if diverging else "magma").with_extremes(bad=MASKED_COLOUR)
  heatmap(ax, matrix, vmin=lo, vmax=hi, cmap=cmap, title=title)


def head_subset_lines(mean_distance: np.ndarray, cka: np.ndarray, *,
                      layer_names: Sequence[str], title: str = "",
                      error: np.ndarray | None = None) -> matplotlib.figure.Figure:
  """Fig 5: CKA of head subsets (x = the subset's mean attention distance) vs ResNet layers.

  Args:
    mean_distance: [subsets] mean attention distance (pixels) of each head subset, ascending.
    cka: [layers, subsets] CKA of each ResNet layer with each subset.
    layer_names: the ResNet layer of each row (one line each).
    title: panel title.
    error: optional [layers, subsets] spread drawn as error bars.
  """
  mean_distance = np.asarray(mean_distance, np.float64)
  cka = np.asarray(cka, np.float64)
  if cka.shape != (len(layer_names), mean_distance.shape[0]):
    raise ValueError(f"cka shape {cka.shape} != (layers {len(layer_names)}, "
                     f"subsets {mean_distance.shape[0]})")
  fig, ax = plt.subplots(figsize=(1.2 * PANEL_INCHES, PANEL_INCHES))
  for i, name in enumerate(layer_names):
    yerr = None if error is None else np.asarray(error)[i]
    ax.errorbar(mean_distance, cka[i], yerr=yerr, marker="o", markersize=3, capsize=2,
                label=name)
  ax.set_xlabel("mean attention distance of head subset (px)")
  ax.set_ylabel("CKA")
  ax.set_title(title)
  ax.legend(fontsize=6)
  fig.tight_layout()
  return fig


def localization_maps(maps: np.ndarray, tokens: Sequence[tuple[int, int]], *, title: str = "",
                      vmin: float = 0.0, vmax: float | None = 1.0) -> matplotlib.figure.Figure:
  """Figs 9, 10, D.x: CKA of one output token with the input patch at every grid position.

  Args:
    maps: [num_tokens, rows, cols] CKA per input patch position for each chosen token.
    tokens: the (row, col) grid position of each chosen token (marked with a cross).
    title: figure title (model and layer).
    vmin, vmax: colour range shared by all panels; vmax=None uses the largest value.
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim != 3 or maps.shape[0] != len(tokens):
    raise ValueError(f"maps must be [num_tokens={len(tokens)}, rows, cols], got {maps.shape}")
  vmax = float(np.nanmax(maps)) if vmax is None else vmax
  n = len(tokens)
  fig, axes = plt.subplots(1, n, figsize=(0.8 * PANEL_INCHES * n, 0.85 * PANEL_INCHES),
                           squeeze=False)
  for i, (ax, m, (r, c)) in enumerate(zip(axes[0], maps, tokens)):
    # One shared colour range; the bar is drawn once, next to the last panel. NaN (left-out
    # constant patches) stays blank.
    heatmap(ax, m, vmin=vmin, vmax=vmax, origin="upper", colorbar=i == n - 1,
            title=f"token ({r}, {c})", cmap="viridis")
    ax.plot([c], [r], marker="x", color="red", markersize=5)
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def per_block_lines(curves: Mapping[str, np.ndarray], *, block_labels: Sequence[str] | None = None,
                    title: str = "", ylabel: str = "CKA",
                    errors: Mapping[str, np.ndarray] | None = None,
                    ylim: tuple[float, float] = (0.0, 1.0)) -> matplotlib.figure.Figure:
  """Figs 12, G.1: one line per model (data fraction / fine-tuning task), x = block index.

  Args:
    curves: label -> [blocks] CKA with the reference model at each block.
    block_labels: tick labels of the blocks (default 0..blocks-1).
    title, ylabel: text.
    errors: optional label -> [blocks] spread for error bars.
    ylim: y range (CKA: [0, 1]).
  """
  fig, ax = plt.subplots(figsize=(1.2 * PANEL_INCHES, PANEL_INCHES))
  for label, y in curves.items():
    y = np.asarray(y, np.float64)
    yerr = None if errors is None or label not in errors else np.asarray(errors[label])
    ax.errorbar(np.arange(y.shape[0]), y, yerr=yerr, marker="o", markersize=3, capsize=2,
                label=label)
  if block_labels is not None:
    ax.set_xticks(np.arange(len(block_labels)), block_labels, rotation=90)
  ax.set_xlabel("block")
  ax.set_ylabel(ylabel)
  ax.set_ylim(*ylim)
  ax.set_title(title)
  ax.legend(fontsize=6)
  fig.tight_layout()
  return fig


def zoo_figure(means: Mapping[str, np.ndarray], keys: Sequence[str], names: Sequence[str],
               band: np.ndarray) -> matplotlib.figure.Figure:
  """Every grid of a CKA zoo as an N x N panel grid, plus the model x model summary heatmap.

  Args:
    means: {tag: [A, B] mean CKA}, tags `<key>` (intra) and `<a>_vs_<b>` (cross, a before b in
      `keys`).
    keys, names: the N model keys in order and their model names.
    band: [N, N] model x model summary (mean CKA of each grid's diagonal band).

  Returns:
    The figure: panel (i, j) above the diagonal is model i's layers (rows) against model j's
    (columns), the diagonal the intra grids, below it the transposes; the last column the summary.
  """
  n = len(keys)
  band = np.asarray(band, np.float64)
  if band.shape != (n, n):
    raise ValueError(f"summary shape {band.shape} != ({n}, {n}) for models {list(keys)}")
  size = 0.6 * PANEL_INCHES
  fig, axes = plt.subplots(n, n + 1, figsize=(size * (n + 1.6), size * n), squeeze=False)
  for i in range(n):
    for j in range(n):
      ax = axes[i, j]
      if i == j:
        matrix = means.get(keys[i])
      elif i < j:
        matrix = means.get(f"{keys[i]}_vs_{keys[j]}")
      else:
        cross = means.get(f"{keys[j]}_vs_{keys[i]}")
        matrix = None if cross is None else np.asarray(cross).T
      if matrix is None:
        ax.axis("off")
        continue
      heatmap(ax, matrix, colorbar=False)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == n - 1:
        ax.set_xlabel(names[j], fontsize=7)
      if j == 0:
        ax.set_ylabel(names[i], fontsize=7)
  for i in range(1, n):
    axes[i, n].axis("off")
  ax = axes[0, n]
  heatmap(ax, band, origin="upper", title="band mean CKA")
  ax.set_xticks(range(n), names, rotation=90, fontsize=6)
  ax.set_yticks(range(n), names, fontsize=6)
  for (i, j), v in np.ndenumerate(band):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
              color="white" if v < 0.6 else "black")
  fig.tight_layout()
  return fig
