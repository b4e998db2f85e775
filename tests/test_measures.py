"""vit_analysis.similarity.measures against float64 NumPy references computed from the features."""
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ref_hsic_unbiased

from vit_analysis.similarity import agreement, cka, measures

# The first four measures; the reviewer's measures are tests/test_measures_reviewer.py's.
MEASURES = measures.MEASURES[:4]


def rng(seed):
  return np.random.default_rng(seed)


def centred(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x - x.mean(0, keepdims=True)


# ------------------------------------------------------------------------------------------------
# References from the equations.


def ref_hsic_biased(k, l):
  n = len(k)
  c = np.eye(n) - np.ones((n, n)) / n
  return np.trace(c @ k @ c @ l) / (n - 1) ** 2


def ref_rbf_kernel(x, sigma):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  d2 = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)  # explicit pairwise distances
  return np.exp(-d2 / (2 * sigma ** 2 * np.median(d2)))


def ref_rbf_cka(x, y, sigma=0.5, debiased=False):
  k, l = ref_rbf_kernel(x, sigma), ref_rbf_kernel(y, sigma)
  h = ref_hsic_unbiased if debiased else ref_hsic_biased
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def ref_procrustes(x, y):
  x, y = centred(x), centred(y)
  return np.linalg.svd(x.T @ y, compute_uv=False).sum() / (np.linalg.norm(x) * np.linalg.norm(y))


def ref_neighbours(x, k):
  """Brute force: for each i, sort the others by (-cosine, index) in Python."""
  x = centred(x)
  out = []
  for i in range(len(x)):
    sims = []
    for j in range(len(x)):
      if j != i:
        den = np.linalg.norm(x[i]) * np.linalg.norm(x[j])
        sims.append((-(x[i] @ x[j]) / den if den > 0 else 0.0, j))
    out.append({j for _, j in sorted(sims)[:k]})
  return out


def ref_knn(x, y, k):
  nx, ny = ref_neighbours(x, k), ref_neighbours(y, k)
  return np.mean([len(a & b) / k for a, b in zip(nx, ny)])


REF = {"linear_cka": lambda x, y: _ref_linear(x, y, True),
       "rbf_cka": lambda x, y: ref_rbf_cka(x, y, debiased=True),
       "procrustes": ref_procrustes,
       "mutual_knn": lambda x, y: ref_knn(x, y, 10)}


def _ref_linear(x, y, debiased):
  x, y = centred(x), centred(y)
  h = ref_hsic_unbiased if debiased else ref_hsic_biased
  k, l = x @ x.T, y @ y.T
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


grams, run = helpers.measure_grams, helpers.run_measure


@pytest.fixture(scope="module")
def demo():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  return x, y


# ------------------------------------------------------------------------------------------------
# Full batch.


def test_known_values(demo):
  x, y = demo
  assert x[0, :3] == pytest.approx([-0.70319, -0.49028, -0.32181], abs=1e-5)
  assert measures.linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
  assert measures.linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)
  assert measures.rbf_cka(x, y) == pytest.approx(0.65483, abs=5e-6)
  assert measures.rbf_cka(x, y, debiased=True) == pytest.approx(0.41928, abs=5e-6)


@pytest.mark.parametrize("p1,p2", [(6, 9), (40, 25)])  # narrower and wider than n
def test_full_batch_against_references(p1, p2):
  r = rng(p1)
  x = r.normal(size=(30, p1)) + 3.0
  y = x[:, :1] * r.normal(size=(1, p2)) + r.normal(size=(30, p2))
  for sigma in (0.5, 1.3):
    for debiased in (False, True):
      assert measures.rbf_cka(x, y, sigma, debiased) == pytest.approx(
          ref_rbf_cka(x, y, sigma, debiased), abs=2e-6)
  # One minibatch of the per-minibatch path: float32 Grams, so float32 agreement.
  assert measures.procrustes(x, y) == pytest.approx(ref_procrustes(x, y), abs=2e-6)
  for k in (1, 5, 10):
    # shared / (n k) divided in float32 on device: exact up to one float32 rounding.
    assert measures.mutual_knn(x, y, k) == pytest.approx(ref_knn(x, y, k), abs=1e-7)
  assert measures.linear_cka(x, y) == pytest.approx(_ref_linear(x, y, False), abs=1e-6)


def test_features_flattened_per_example():
  r = rng(1)
  x, y = r.normal(size=(20, 3, 4)), r.normal(size=(20, 2, 5))
  for f in (measures.procrustes, measures.mutual_knn, measures.rbf_cka, measures.linear_cka):
    assert f(x, y) == pytest.approx(f(x.reshape(20, -1), y.reshape(20, -1)), abs=1e-7)


def test_invariances_and_identity():
  r = rng(2)
  x = r.normal(size=(40, 12))
  y = x @ r.normal(size=(12, 8)) + r.normal(size=(40, 8))
  q, _ = np.linalg.qr(r.normal(size=(12, 12)))
  fns = {"linear_cka": measures.linear_cka, "rbf_cka": measures.rbf_cka,
         "procrustes": measures.procrustes, "mutual_knn": lambda a, b: measures.mutual_knn(a, b, 5)}
  for name, f in fns.items():
    base = f(x, y)
    assert 0 <= base <= 1, name
    assert f(x @ q, y) == pytest.approx(base, abs=1e-6), name   # orthogonal transform
    assert f(1.337 * x, y) == pytest.approx(base, abs=1e-6), name  # isotropic scaling
    assert f(x + 7.0, y) == pytest.approx(base, abs=1e-6), name  # translation (centred)
    assert f(x, x) == pytest.approx(1.0, abs=1e-6), name
  general = r.normal(size=(12, 12)) * np.linspace(0.1, 3, 12)[None, :]
  assert abs(measures.procrustes(x @ general, y) - measures.procrustes(x, y)) > 1e-2
  assert abs(measures.linear_cka(x @ general, y) - measures.linear_cka(x, y)) > 1e-2


def test_bad_input_raises():
  r = rng(3)
  x, y = r.normal(size=(10, 4)), r.normal(size=(10, 4))
  bad = x.copy()
  bad[2, 1] = np.nan
  for f in (measures.procrustes, measures.mutual_knn, measures.rbf_cka, measures.linear_cka):
    with pytest.raises(ValueError, match="x contains NaN"):
      f(bad, y)
    with pytest.raises(ValueError, match="y contains NaN"):
      f(x, np.where(np.isnan(bad), np.inf, y))
    with pytest.raises(ValueError, match="same examples"):
      f(x, y[:9])
    with pytest.raises(ValueError, match="constant"):
      f(x, np.ones_like(y))
  with pytest.raises(ValueError, match="k < n"):
    measures.mutual_knn(x, y, 10)
  with pytest.raises(ValueError, match="sigma"):
    measures.rbf_cka(x, y, sigma=0)


def tie_features():
  """Integer features with zero column means: Grams and cosines exact, duplicates tie exactly."""
  base = np.array([[3, 0], [1, 1], [1, 1], [1, 1], [0, 2], [-2, -1], [-2, -1], [-2, -3]], float)
  assert not base.sum(0).any()
  return base


def test_knn_ties_lower_index_first():
  x = tie_features()
  # Example 0's neighbours by cosine: 1, 2, 3 tie (cos 0.707); k = 2 must pick 1 and 2.
  ind = np.asarray(measures.knn_indicators(grams([x]), 2))[0]
  assert set(np.flatnonzero(ind[0])) == {1, 2}  # device top_k: the lower index first
  nb = np.array([sorted(n) for n in ref_neighbours(x, 2)])
  assert np.array_equal(ind, np.eye(8)[nb].sum(1))
  y = x[:, ::-1].copy()
  for k in (1, 2, 3):
    assert measures.mutual_knn(x, y, k) == pytest.approx(ref_knn(x, y, k), abs=1e-12)
    got = run("mutual_knn", [[x]], [[y]], k=k).value[0, 0]
    assert got == pytest.approx(ref_knn(x, y, k), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Minibatch terms from Grams.


def layer_set(seed, m, widths, offset=5.0):
  r = rng(seed)
  common = r.normal(size=(m, 6))
  return [common @ r.normal(size=(6, w)) + r.normal(size=(m, w)) * (i + 1) * 0.5 + offset
          for i, w in enumerate(widths)]


@pytest.mark.parametrize("measure", MEASURES)
def test_one_minibatch_equals_full_batch(measure):
  xs, ys = layer_set(10, 48, (8, 60)), layer_set(11, 48, (30, 5, 70))
  res = run(measure, [xs], [ys])
  full = {"linear_cka": lambda x, y: measures.linear_cka(x, y, debiased=True),
          "rbf_cka": lambda x, y: measures.rbf_cka(x, y, debiased=True),
          "procrustes": measures.procrustes, "mutual_knn": measures.mutual_knn}[measure]
  want = np.array([[full(x, y) for y in ys] for x in xs])
  ref = np.array([[REF[measure](x, y) for y in ys] for x in xs])
  np.testing.assert_allclose(want, ref, atol=2e-6)
  np.testing.assert_allclose(res.value, want, atol=2e-5)
  assert res.value.shape == (2, 3) and np.isnan(res.stderr).all()  # one minibatch: no stderr


def test_biased_per_minibatch_cka_equals_full_batch():
  xs, ys = layer_set(12, 40, (8, 30)), layer_set(13, 40, (20,))
  lin = run("linear_cka", [xs], [ys], debiased=False).value
  rbf = run("rbf_cka", [xs], [ys], debiased=False, sigma=0.8).value
  np.testing.assert_allclose(lin[:, 0], [measures.linear_cka(x, ys[0]) for x in xs], atol=2e-6)
  np.testing.assert_allclose(rbf[:, 0], [ref_rbf_cka(x, ys[0], 0.8) for x in xs], atol=2e-6)


def test_procrustes_newton_schulz_matches_svd():
  xs, ys = layer_set(14, 64, (10, 90)), layer_set(15, 64, (40, 7))
  svd = run("procrustes", [xs], [ys]).value
  ns = run("procrustes", [xs], [ys], method="newton_schulz").value
  np.testing.assert_allclose(ns, svd, atol=2e-5)
  assert (ns <= svd + 1e-6).all()  # its error is one-sided


def test_procrustes_max_rank_is_procrustes_of_pca_approximations():
  xs, ys = layer_set(16, 40, (12, 50)), layer_set(17, 40, (30,))

  def pca(x, r):
    u, s, vt = np.linalg.svd(centred(x), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]
  for r in (3, 8):
    got = run("procrustes", [xs], [ys], max_rank=r).value[:, 0]
    want = [ref_procrustes(pca(x, r), pca(ys[0], r)) for x in xs]
    np.testing.assert_allclose(got, want, atol=2e-5)
  full = run("procrustes", [xs], [ys]).value
  np.testing.assert_allclose(run("procrustes", [xs], [ys], max_rank=40).value, full, atol=1e-6)


@pytest.mark.parametrize("m,dup", [(7, 0), (8, 0), (9, 5)])  # odd/even m^2; many equal distances
def test_rbf_kernel_from_gram(m, dup):
  x = rng(m).normal(size=(m, 5)) + 2.0
  x[:dup] = x[0]  # duplicates: the median falls on repeated values (and on exact zeros)
  got = np.asarray(measures.rbf_kernels(grams([x]), 0.7))[0]
  np.testing.assert_allclose(got, ref_rbf_kernel(x, 0.7), atol=2e-6)
  v = np.abs(rng(1).normal(size=50)).astype(np.float32)
  v[:20] = v[20]
  order_statistic = measures._order_statistic  # pylint: disable=protected-access
  for k in (0, 10, 20, 25, 49):
    assert float(order_statistic(jnp.asarray(v), k)) == np.sort(v)[k]


def test_several_minibatches_sum_or_average():
  m, k = 24, 3
  r = rng(20)
  xs = [[r.normal(size=(m, 9)) + 1, r.normal(size=(m, 40))] for _ in range(k)]
  ys = [[x[0] @ r.normal(size=(9, 12)) + r.normal(size=(m, 12))] for x in xs]
  stack = lambda f: jnp.stack([grams(b) for b in f])  # [k, A, m, m]
  step = jax.jit(lambda ga, gb: measures.terms(
      {"rbf_cka": {}, "procrustes": {}, "mutual_knn": {"k": 4}, "linear_cka": {}}, ga, gb,
      stacked=True))
  out = step(stack(xs), stack(ys))
  res = {}
  for name, t in out.items():
    opts = {"k": 4} if name == "mutual_knn" else {}
    res[name] = measures.result(measures.accumulate(measures.init(name, 2, 1, **opts), t))
  # CKA-type: unbiased HSIC summed over minibatches, divided once; bandwidth per minibatch.
  for a in range(2):
    kx = [ref_rbf_kernel(b[a], 0.5) for b in xs]
    ky = [ref_rbf_kernel(b[0], 0.5) for b in ys]
    h = np.sum([[ref_hsic_unbiased(p, q), ref_hsic_unbiased(p, p), ref_hsic_unbiased(q, q)]
                for p, q in zip(kx, ky)], axis=0)
    assert res["rbf_cka"].value[a, 0] == pytest.approx(h[0] / np.sqrt(h[1] * h[2]), abs=2e-5)
    for name, f in (("procrustes", ref_procrustes), ("mutual_knn", lambda p, q: ref_knn(p, q, 4))):
      per = np.array([f(xs[i][a], ys[i][0]) for i in range(k)])
      assert res[name].value[a, 0] == pytest.approx(per.mean(), abs=2e-5)
      assert res[name].stderr[a, 0] == pytest.approx(per.std(ddof=1) / np.sqrt(k), abs=2e-5)
  assert res["linear_cka"].value == pytest.approx(
      cka.minibatch_cka(zip(xs, ys)), abs=1e-6)
  assert all(r.num_minibatches == k and r.num_examples == k * m for r in res.values())


@pytest.mark.parametrize("measure", MEASURES)
def test_intra_model(measure):
  xs = layer_set(30, 32, (6, 40, 12))
  intra = run(measure, [xs])
  cross = run(measure, [xs], [xs])
  np.testing.assert_allclose(intra.value, intra.value.T, atol=1e-12)
  np.testing.assert_allclose(intra.value, cross.value, atol=2e-5)
  np.testing.assert_allclose(np.diagonal(intra.value), 1.0, atol=2e-5)


def test_mask_merge_and_checks():
  m = 16
  r = rng(40)
  batches = [[r.normal(size=(m, 5)), r.normal(size=(m, 9))] for _ in range(3)]
  for name in ("procrustes", "rbf_cka"):
    t = [measures.minibatch_terms(name, grams(b), grams(b[:1])) for b in batches]
    full = measures.init(name, ["p", "q"], ["r"])
    for x in t:
      full = measures.accumulate(full, x)
    parts = [measures.accumulate(measures.init(name, ["p", "q"], ["r"]), x) for x in t]
    merged = measures.merge(measures.merge(parts[0], parts[1]), parts[2])
    np.testing.assert_allclose(measures.result(merged).value, measures.result(full).value,
                               atol=1e-12)
    # Masked-out minibatches are skipped.
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *t)
    masked = measures.accumulate(measures.init(name, ["p", "q"], ["r"]), stacked, mask=[1, 1, 0])
    two = measures.merge(parts[0], parts[1])
    np.testing.assert_allclose(measures.result(masked).value, measures.result(two).value,
                               atol=1e-12)
    with pytest.raises(ValueError, match="different measures"):
      measures.merge(full, measures.init(name, ["p", "x"], ["r"]))
  # NaN in a layer, and a constant layer, are refused with the layer's name.
  for name in ("procrustes", "mutual_knn", "linear_cka"):
    bad = [batches[0][0], batches[0][1].copy()]
    bad[1][3, 2] = np.nan
    state = measures.init(name, ["p", "q"], ["r"])
    with pytest.raises(ValueError, match=r"non-finite.*'q'"):
      measures.accumulate(state, measures.minibatch_terms(name, grams(bad), grams(bad[:1])))
    const = [batches[0][0], np.ones((m, 9))]
    with pytest.raises(ValueError, match=r"constant.*'q'"):
      measures.result(measures.accumulate(
          state, measures.minibatch_terms(name, grams(const), grams(const[:1]))))


def test_options_and_names_checked():
  g = grams([rng(0).normal(size=(8, 3))])
  with pytest.raises(ValueError, match="did you mean 'procrustes'"):
    measures.minibatch_terms("procrustes_", g)
  with pytest.raises(ValueError, match="unknown option"):
    measures.minibatch_terms("rbf_cka", g, bandwidth=1.0)
  with pytest.raises(ValueError, match="k < m"):
    measures.minibatch_terms("mutual_knn", g, k=8)
  with pytest.raises(ValueError, match=r"\[B, 8, 8\]"):
    measures.minibatch_terms("procrustes", g, g[:, :4, :4])
  with pytest.raises(ValueError, match="num_perms"):
    state = measures.init("mutual_knn", 1, 1, num_perms=2)
    measures.accumulate(state, measures.minibatch_terms("mutual_knn", g, g, k=2))


# ------------------------------------------------------------------------------------------------
# Shuffle null.


def test_null_permutations_deterministic():
  p = measures.null_permutations(7, 5, 12)
  assert p.shape == (5, 12) and p.dtype == np.int32
  assert np.array_equal(p, measures.null_permutations(7, 5, 12))
  assert all(np.array_equal(np.sort(row), np.arange(12)) for row in p)
  q = measures.null_permutations(jax.random.key(3), 4, 12)
  assert np.array_equal(q, measures.null_permutations(jax.random.key(3), 4, 12))
  assert all(np.array_equal(np.sort(row), np.arange(12)) for row in q)


@pytest.mark.parametrize("measure", MEASURES)
def test_null_is_the_measure_on_shuffled_side_b(measure):
  xs, ys = layer_set(50, 32, (7, 30)), layer_set(51, 32, (12,))
  perms = measures.null_permutations(0, 3, 32)
  res = run(measure, [xs], [ys], perms=perms)
  want = np.array([[[REF[measure](x, ys[0][p]) for x in xs]] for p in perms])  # [P, 1, A]
  np.testing.assert_allclose(res.null, np.swapaxes(want, 1, 2), atol=3e-5)
  np.testing.assert_allclose(res.null_mean, res.null.mean(0), atol=1e-12)
  np.testing.assert_allclose(res.z, (res.value - res.null_mean) / res.null.std(0, ddof=1))


def test_z_scores_independent_vs_identical():
  m, layers = 32, 4
  r = rng(60)
  xs = [[r.normal(size=(m, 20)) for _ in range(layers)] for _ in range(2)]
  ys = [[r.normal(size=(m, 20)) for _ in range(layers)] for _ in range(2)]
  perms = measures.null_permutations(1, 24, m)
  for name in MEASURES:
    opts = {"k": 5} if name == "mutual_knn" else {}
    z = run(name, xs, ys, perms=perms, **opts).z.ravel()
    assert abs(z.mean()) < 1.0 and 0.3 < z.std() < 2.0 and np.abs(z).max() < 4.5, (name, z)
    same = run(name, xs, xs, perms=perms, **opts).z
    assert np.diagonal(same).min() > 8, (name, np.diagonal(same))


def test_biased_cka_null_is_far_above_zero_unbiased_is_not():
  m, p = 128, 512
  r = rng(70)
  xs, ys = [[r.normal(size=(m, p))]], [[r.normal(size=(m, p))]]
  perms = measures.null_permutations(2, 16, m)
  biased = run("linear_cka", xs, ys, perms=perms, debiased=False)
  unbiased = run("linear_cka", xs, ys, perms=perms, debiased=True)
  # Biased HSIC_0 of independent Gaussians: E ~ p/(p + m) ~ 0.8 at these sizes; unbiased ~ 0.
  assert biased.null_mean[0, 0] > 0.5 and biased.value[0, 0] > 0.5
  assert abs(unbiased.null_mean[0, 0]) < 0.01 and abs(unbiased.value[0, 0]) < 0.03


# ------------------------------------------------------------------------------------------------
# Agreement between measures.


def test_rank_agreement_known_values():
  a = np.array([[1.0, 2.0], [3.0, 4.0]])
  b = np.array([[1.0, 3.0], [2.0, 4.0]])  # two middle cells swapped
  c = -a
  got = agreement.rank_agreement({"a": a, "b": b, "c": c})
  # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60.
  assert got[("a", "b")] == pytest.approx(0.8)
  assert got[("a", "c")] == pytest.approx(-1.0)
  assert got[("b", "c")] == pytest.approx(-0.8)
  # Intra: upper triangle without the diagonal; the diagonal cannot change the answer.
  s = np.array([[9.0, 1, 2, 3], [1, 9, 4, 5], [2, 4, 9, 6], [3, 5, 6, 9]])
  t = s.copy()
  t[0, 1] = t[1, 0] = 7.0  # cell (0, 1) moves from lowest to highest
  np.fill_diagonal(t, -5.0)
  rho = agreement.rank_agreement({"s": s, "t": t}, intra=True)[("s", "t")]
  ranks_t = np.array([6, 1, 2, 3, 4, 5])  # upper-triangle order (0,1),(0,2),(0,3),(1,2),(1,3),(2,3)
  want = 1 - 6 * np.sum((np.arange(1, 7) - ranks_t) ** 2) / (6 * 35)
  assert rho == pytest.approx(want)
  with pytest.raises(ValueError, match="same"):
    agreement.rank_agreement({"a": a, "b": s})


def test_disagreements_names_the_flipped_cell():
  r = rng(80)
  a = r.uniform(size=(3, 4))
  b = a.copy()
  i, j = np.unravel_index(np.argmax(a), a.shape)
  b[i, j] = a.min() - 1  # highest under a, lowest under b
  out = agreement.disagreements({"a": a, "b": b}, ["r0", "r1", "r2"], ["c0", "c1", "c2", "c3"],
                               top=2)
  assert (out[0]["a"], out[0]["b"]) == (f"r{i}", f"c{j}")
  assert out[0]["spread"] == pytest.approx(1.0)
  assert out[0]["percentile"] == {"a": 1.0, "b": 0.0}
  assert out[0]["value"]["a"] == a[i, j]
  assert out[1]["spread"] == pytest.approx(1 / 11)  # every other cell moved up by one rank
  same = agreement.disagreements({"a": a, "b": 2 * a + 1}, ["r0", "r1", "r2"],
                                ["c0", "c1", "c2", "c3"])
  assert [d["spread"] for d in same] == [0.0] * 5
  assert [(d["a"], d["b"]) for d in same] == [("r0", "c0"), ("r0", "c1"), ("r0", "c2"),
                                              ("r0", "c3"), ("r1", "c0")]  # ties: cell order


# CKA-type and mean-type states, of the first four measures and of the reviewers' ones.
@pytest.mark.parametrize("measure", ["rbf_cka", "mutual_knn", "svcca", "distance_correlation"])
def test_state_resumes_through_orbax(measure, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  m = 12
  r = rng(90)
  batches = [([r.normal(size=(m, 6))], [r.normal(size=(m, 4))]) for _ in range(3)]
  perms = measures.null_permutations(0, 2, m)
  opts = {"k": 3} if measure == "mutual_knn" else {}
  t = [measures.minibatch_terms(measure, grams(a), grams(b), perms=perms, **opts)
       for a, b in batches]
  init = lambda: measures.init(measure, ["a"], ["b"], num_perms=2, **opts)
  one_pass = init()
  for x in t:
    one_pass = measures.accumulate(one_pass, x)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(1, args=ocp.args.StandardSave(measures.accumulate(init(), t[0])))
  mngr.wait_until_finished()
  resumed = mngr.restore(1, args=ocp.args.StandardRestore(init()))
  for x in t[1:]:
    resumed = measures.accumulate(resumed, x)
  got, want = measures.result(resumed), measures.result(one_pass)
  np.testing.assert_allclose(got.value, want.value, rtol=1e-12)
  np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-12)
  np.testing.assert_allclose(got.null, want.null, rtol=1e-12)
  assert got.num_minibatches == 3
