"""Agreement between similarity measures: rank statistics over the cells of their [A, B] maps.

NumPy/SciPy only, so the report (`vit_analysis.report`) reads it without JAX
(docs/method.md#other-similarity-measures). `rank_agreement` is the Spearman correlation between
measures over cells, `disagreements` the layer pairs whose ranks differ most, `rank_correlation`
the tie-aware Spearman correlation of two 1-D sequences.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats


def rank_correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
  """Spearman rank correlation of x [n] and y [n]: Pearson of the ranks, ties at their average rank.

  Returns:
    rho in [-1, 1]; NaN when n < 2 or either sequence is constant.
  """
  x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
  if x.size < 2:
    return float("nan")
  rx = scipy.stats.rankdata(x) - (x.size + 1) / 2
  ry = scipy.stats.rankdata(y) - (y.size + 1) / 2
  den = np.sqrt((rx @ rx) * (ry @ ry))
  return float(rx @ ry / den) if den > 0 else float("nan")



def _cells(values: Mapping[str, Any], intra: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Measure names, [M, cells] values and [cells, 2] (row, col) indices of the cells used."""
  names = list(values)
  if len(names) < 2:
    raise ValueError(f"need at least two measures, got {names}")
  arrays = [np.asarray(values[n], np.float64) for n in names]
  shape = arrays[0].shape
  for n, v in zip(names, arrays):
    if v.ndim != 2 or v.shape != shape:
      raise ValueError(f"every measure needs the same [A, B] matrix; {n} has {v.shape}, "
                       f"{names[0]} has {shape}")
    if not np.isfinite(v).all():
      raise ValueError(f"{n} has non-finite cells")
  if intra:
    if shape[0] != shape[1]:
      raise ValueError(f"intra-model matrices must be square, got {shape}")
    idx = np.stack(np.triu_indices(shape[0], 1), axis=1)
  else:
    idx = np.stack(np.unravel_index(np.arange(np.prod(shape)), shape), axis=1)
  if len(idx) < 3:
    raise ValueError(f"need at least 3 cells to rank, got {len(idx)}")
  return names, np.stack([v[idx[:, 0], idx[:, 1]] for v in arrays]), idx


def rank_agreement(values: Mapping[str, np.ndarray], *,
                   intra: bool = False) -> dict[tuple[str, str], float]:
  """Spearman rank correlation between every two measures over the cells of their [A, B] maps.

  Args:
    values: {measure: [A, B] matrix} for one comparison.
    intra: the matrices are intra-model (symmetric): use the upper triangle without the diagonal
      (each pair of layers once; the diagonal is 1 by definition).

  Returns:
    {(m1, m2): rho} for m1 before m2 in `values`' order; NaN where a measure is constant.
  """
  names, cells, _ = _cells(values, intra)
  return {(n1, names[j]): rank_correlation(cells[i], cells[j])
          for i, n1 in enumerate(names) for j in range(i + 1, len(names))}


def disagreements(values: Mapping[str, np.ndarray], names_a: Sequence[str],
                  names_b: Sequence[str] | None = None, top: int = 5, *,
                  intra: bool = False) -> list[dict[str, Any]]:
  """The layer pairs whose rank among all cells differs most between measures.

  Each cell's rank under each measure is scaled to a percentile in [0, 1] (average ranks for
  ties); a cell's spread is max - min percentile over measures. Cells are sorted by spread,
  descending, ties by cell order (row-major).

  Args:
    values: {measure: [A, B]}.
    names_a: A row layer names; names_b: B column names (default names_a).
    top: how many cells to return.
    intra: use the upper triangle without the diagonal (as `rank_agreement`).

  Returns:
    [{'a': name, 'b': name, 'spread': float, 'percentile': {measure: p}, 'value': {measure: v}}].
  """
  names_b = names_a if names_b is None else names_b
  names, cells, idx = _cells(values, intra)
  shape = np.shape(values[names[0]])
  if (len(names_a), len(names_b)) != shape:
    raise ValueError(f"{len(names_a)} x {len(names_b)} names for {shape} matrices")
  n = cells.shape[1]
  pct = np.stack([(scipy.stats.rankdata(c) - 1) / (n - 1) for c in cells])
  spread = pct.max(0) - pct.min(0)
  order = np.argsort(-spread, kind="stable")[:top]
  return [{"a": str(names_a[idx[c, 0]]), "b": str(names_b[idx[c, 1]]),
           "spread": float(spread[c]),
           "percentile": {m: float(pct[i, c]) for i, m in enumerate(names)},
           "value": {m: float(cells[i, c]) for i, m in enumerate(names)}} for c in order]


__all__ = ["disagreements", "rank_agreement", "rank_correlation"]
