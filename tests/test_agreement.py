"""vit_analysis.similarity.agreement: tie-aware rank statistics, importable without JAX."""
import subprocess
import sys

import numpy as np
import scipy.stats

from vit_analysis.similarity import agreement


def test_rank_correlation_is_spearman_with_ties():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, size=30).astype(float)  # many ties
  y = x + rng.normal(size=30)
  assert np.isclose(agreement.rank_correlation(x, y), scipy.stats.spearmanr(x, y).statistic)
  assert agreement.rank_correlation([1, 2, 3], [3, 2, 1]) == -1.0
  # Ties are average ranks, not an arbitrary order: a constant input has no correlation.
  assert np.isnan(agreement.rank_correlation([1, 1, 1], [1, 2, 3]))
  assert np.isnan(agreement.rank_correlation([1], [2]))


def test_imports_without_jax():
  code = ("import sys, vit_analysis.similarity.agreement; "
          "assert not any(m.startswith('jax') for m in sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True)
