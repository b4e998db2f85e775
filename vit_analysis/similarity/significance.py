"""Deciding with uncertainty: permutation p-values, Benjamini–Hochberg over a heatmap's cells,
and three-way verdicts of an estimate against a threshold (docs/method.md#significance).

NumPy only: the report decides its findings from saved results without JAX.
"""
from __future__ import annotations

import math

import numpy as np

# Two-sided 95% normal quantile: an interval estimate ± 1.96 standard errors.
Z95 = 1.959963984540054

SHOWN, NOT_SHOWN, INCONCLUSIVE = "shown", "not shown", "inconclusive"


def permutation_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
  """Add-one permutation p-values, p = (1 + #{null >= observed}) / (P + 1), per cell.

  Adding one counts the observed labelling among the permutations, so p is never 0 and the test
  stays exact under the null (docs/method.md#significance).

  Args:
    observed: [...] the statistic per cell.
    null: [P, ...] the statistic under each of P permutations.

  Returns:
    [...] float64 p-values in [1 / (P + 1), 1]; NaN where the observed value is NaN.

  Raises:
    ValueError: no permutations, or shapes that do not match.
  """
  observed = np.asarray(observed, np.float64)
  null = np.asarray(null, np.float64)
  if null.ndim != observed.ndim + 1 or null.shape[1:] != observed.shape:
    raise ValueError(f"null must be [P, *observed.shape]; got {null.shape} for {observed.shape}")
  if null.shape[0] == 0:
    raise ValueError("no permutations: a p-value needs null_permutations >= 1")
  if not np.isfinite(null).all():
    raise ValueError("non-finite null values")
  p = (1.0 + (null >= observed[None]).sum(0)) / (null.shape[0] + 1.0)
  return np.where(np.isnan(observed), np.nan, p)


def benjamini_hochberg(p_values: np.ndarray, q: float = 0.05) -> np.ndarray:
  """Which cells are discoveries at false-discovery rate `q` (Benjamini & Hochberg 1995).

  Over the m finite p-values sorted p_(1) <= ... <= p_(m), reject the k smallest, where k is the
  largest i with p_(i) <= q i / m (step-up). NaN cells are neither counted nor rejected.

  Args:
    p_values: [...] p-values of all the cells tested together (e.g. one heatmap).
    q: the false-discovery rate, in (0, 1).

  Returns:
    [...] bool, True where the cell is above the null.
  """
  if not 0 < q < 1:
    raise ValueError(f"q must be in (0, 1), got {q}")
  p = np.asarray(p_values, np.float64)
  flat = p.reshape(-1)
  tested = np.flatnonzero(~np.isnan(flat))
  out = np.zeros(flat.shape, bool)
  m = tested.size
  if m:
    order = tested[np.argsort(flat[tested], kind="stable")]
    # A relative 1e-12 so that rounding does not decide ties such as p = 1/140 vs q/7 at q=0.05.
    passing = flat[order] <= q * np.arange(1, m + 1) / m * (1 + 1e-12)
    if passing.any():
      k = int(np.flatnonzero(passing)[-1]) + 1
      out[order[:k]] = True
  return out.reshape(p.shape)


def min_permutations(num_cells: int, q: float = 0.05) -> int:
  """The fewest permutations P for which BH can call any of `num_cells` cells significant.

  The smallest attainable p-value is 1 / (P + 1); BH's first threshold is q / num_cells, so a
  discovery needs P + 1 >= num_cells / q.
  """
  return max(1, math.ceil(num_cells / q) - 1)


def verdict(estimate: float, stderr: float, threshold: float, *, above: bool = True,
            z: float = Z95) -> tuple[str, tuple[float, float]]:
  """Shown / not shown / inconclusive: the interval estimate ± z·stderr against a threshold.

  Args:
    estimate: the measured quantity.
    stderr: its standard error (0 for an exact quantity; NaN if unknown).
    threshold: what the expectation requires the quantity to exceed (`above`) or stay below.
    above: True if the expectation is `quantity > threshold`.
    z: the interval's half-width in standard errors (default: two-sided 95%).

  Returns:
    (verdict, (low, high)): SHOWN when the whole interval is on the expected side, NOT_SHOWN when
    it is all on the other side, INCONCLUSIVE when it contains the threshold (or the estimate or
    its error is unknown).
  """
  estimate, stderr = float(estimate), float(stderr)
  if not (math.isfinite(estimate) and math.isfinite(stderr)) or stderr < 0:
    return INCONCLUSIVE, (math.nan, math.nan)
  low, high = estimate - z * stderr, estimate + z * stderr
  if (low > threshold) if above else (high < threshold):
    return SHOWN, (low, high)
  if (high < threshold) if above else (low > threshold):
    return NOT_SHOWN, (low, high)
  return INCONCLUSIVE, (low, high)


def heatmap_discoveries(p_values: np.ndarray, q: float = 0.05, *,
                        symmetric: bool = False) -> tuple[np.ndarray, int]:
  """Cells of one heatmap above the null, by Benjamini–Hochberg over its cells.

  Args:
    p_values: [A, B] permutation p-values of one heatmap.
    q: the false-discovery rate.
    symmetric: an intra-model heatmap: each pair of layers is tested once (i < j) and the
      decision mirrored; the diagonal (a layer with itself) is not tested and left unmasked.

  Returns:
    ([A, B] bool mask of the cells above the null, the number of cells tested).
  """
  p = np.asarray(p_values, np.float64)
  if p.ndim != 2:
    raise ValueError(f"p_values must be [A, B], got {p.shape}")
  if not symmetric:
    return benjamini_hochberg(p, q), int((~np.isnan(p)).sum())
  if p.shape[0] != p.shape[1]:
    raise ValueError(f"a symmetric heatmap must be square, got {p.shape}")
  upper = np.triu_indices(p.shape[0], k=1)
  found = np.zeros(p.shape, bool)
  found[upper] = benjamini_hochberg(p[upper], q)
  found |= found.T
  np.fill_diagonal(found, True)
  return found, int((~np.isnan(p[upper])).sum())
