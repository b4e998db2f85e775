"""Head subsets: the local-minus-global CKA difference and its error against NumPy (the analysis
end to end is in test_similarity.py)."""
import numpy as np
import pytest
from test_skip_removal import jackknife, synthetic_comparison

from vit_analysis.analyses import head_subsets
from vit_analysis.similarity import cka_runner


def test_local_minus_global_against_numpy():
  # Rows: 4 subsets, most local first; columns: 3 ResNet layers.
  rep, ref = synthetic_comparison(np.random.default_rng(6), k=5, a=4, b=3)
  diff, se, over = head_subsets.local_minus_global(rep)
  np.testing.assert_allclose(diff, ref["cka"][0] - ref["cka"][-1], rtol=1e-12)
  # One repeat: the difference's own jackknife over the leave-one-minibatch-out grids.
  for u in range(3):
    assert se[u] == pytest.approx(jackknife(ref["loo"][:, 0, u] - ref["loo"][:, -1, u]),
                                  rel=1e-9)
    assert se[u] <= ref["se"][0, u] + ref["se"][-1, u]
  assert over == "jackknife over 5 minibatches"
  values = np.random.default_rng(7).uniform(0, 1, (3, 4, 2))
  diff, se, over = head_subsets.local_minus_global(cka_runner.RepeatedCKA(
      list("abcd"), list("xy"), values, np.zeros_like(values), 32, 8))
  per_repeat = values[:, 0] - values[:, -1]  # [R, layers]
  np.testing.assert_allclose(diff, per_repeat.mean(0), rtol=1e-12)
  np.testing.assert_allclose(se, per_repeat.std(0, ddof=1) / np.sqrt(3), rtol=1e-12)
  assert over == "over 3 repeats" and diff[0] == pytest.approx(values.mean(0)[0, 0] -
                                                              values.mean(0)[-1, 0])
