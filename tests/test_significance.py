"""Permutation p-values, Benjamini–Hochberg and three-way verdicts against direct computations."""
import numpy as np
import pytest

from vit_analysis.similarity import significance


def test_p_values_match_a_brute_force_count():
  rng = np.random.default_rng(0)
  observed = rng.normal(size=(5, 4))
  null = rng.normal(size=(19, 5, 4))
  null[3, 1, 2] = observed[1, 2]  # a tie counts as "at least as large"
  p = significance.permutation_p_values(observed, null)
  for i in range(5):
    for j in range(4):
      count = sum(1 for k in range(19) if null[k, i, j] >= observed[i, j])
      assert p[i, j] == pytest.approx((1 + count) / 20)
  assert p.min() >= 1 / 20 and p.max() <= 1


def test_p_values_reject_bad_input():
  with pytest.raises(ValueError, match="no permutations"):
    significance.permutation_p_values(np.zeros(3), np.zeros((0, 3)))
  with pytest.raises(ValueError, match="null must be"):
    significance.permutation_p_values(np.zeros(3), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="non-finite"):
    significance.permutation_p_values(np.zeros(1), np.array([[np.nan]]))


def _bh_direct(p, q):
  """Rejects H_(1..k) for the largest k with p_(k) <= k q / m, from the definition."""
  p = np.asarray(p, float).ravel()
  m = len(p)
  ranked = sorted(range(m), key=lambda i: (p[i], i))
  k = max([r + 1 for r in range(m) if p[ranked[r]] <= (r + 1) * q / m], default=0)
  out = np.zeros(m, bool)
  out[ranked[:k]] = True
  return out


@pytest.mark.parametrize("seed", range(5))
def test_benjamini_hochberg_matches_the_definition(seed):
  rng = np.random.default_rng(seed)
  p = np.concatenate([rng.uniform(0, 0.01, 10), rng.uniform(size=40)])
  rng.shuffle(p)
  for q in (0.01, 0.05, 0.2):
    got = significance.benjamini_hochberg(p.reshape(5, 10), q)
    assert got.shape == (5, 10)
    np.testing.assert_array_equal(got.ravel(), _bh_direct(p, q))


def test_benjamini_hochberg_step_up_and_nan():
  # p_(2) = 0.04 > 0.05 * 2 / 4 but p_(3) = 0.036 <= 0.05 * 3 / 4: step-up rejects three.
  p = np.array([0.001, 0.03, 0.036, 0.9])
  np.testing.assert_array_equal(significance.benjamini_hochberg(p, 0.05), [1, 1, 1, 0])
  p = np.array([0.001, np.nan, 0.9])
  np.testing.assert_array_equal(significance.benjamini_hochberg(p, 0.05), [1, 0, 0])
  with pytest.raises(ValueError, match="q must be"):
    significance.benjamini_hochberg(p, 0)


def test_min_permutations_is_where_bh_can_first_reject():
  for cells in (1, 7, 100, 676):
    need = significance.min_permutations(cells, 0.05)
    # One cell beyond every permutation, the others not: the hardest case for BH.
    smallest = lambda perms: np.concatenate([[1 / (perms + 1)], np.ones(cells - 1)])
    assert significance.benjamini_hochberg(smallest(need), 0.05)[0]
    if need > 1:
      assert not significance.benjamini_hochberg(smallest(need - 1), 0.05).any()


def test_verdicts():
  v = significance.verdict
  assert v(0.9, 0.01, 0.5)[0] == significance.SHOWN
  assert v(0.1, 0.01, 0.5)[0] == significance.NOT_SHOWN
  assert v(0.52, 0.05, 0.5)[0] == significance.INCONCLUSIVE  # the interval contains 0.5
  assert v(0.1, 0.01, 0.5, above=False)[0] == significance.SHOWN
  assert v(0.9, np.nan, 0.5)[0] == significance.INCONCLUSIVE
  verdict, (low, high) = v(1.0, 0.1, 0.0)
  assert (low, high) == pytest.approx((1 - 0.196, 1 + 0.196), abs=1e-4)
  assert verdict == significance.SHOWN


def test_heatmap_discoveries_test_each_pair_of_an_intra_heatmap_once():
  rng = np.random.default_rng(3)
  p = rng.uniform(size=(6, 6))
  p[0, 5] = p[5, 0] = 1e-4
  p = np.minimum(p, p.T)
  found, tested = significance.heatmap_discoveries(p, 0.05, symmetric=True)
  assert tested == 15
  upper = np.triu_indices(6, k=1)
  np.testing.assert_array_equal(found[upper], _bh_direct(p[upper], 0.05))
  np.testing.assert_array_equal(found, found.T)
  assert found.diagonal().all()
  found, tested = significance.heatmap_discoveries(p[:, :4], 0.05)
  assert tested == 24
  np.testing.assert_array_equal(found.ravel(), _bh_direct(p[:, :4], 0.05))
