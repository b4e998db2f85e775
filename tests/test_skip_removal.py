"""Skip removal: split summary closed forms, entry rewriting, the analysis end to end; the
standard errors of linear CKA statistics (`cka_runner.linear_estimate`) against float64 NumPy."""
import ml_collections
import numpy as np
import pytest

from vit_analysis.analyses import skip_removal as sr
from vit_analysis.similarity import cka, cka_runner


def synthetic_comparison(rng, k=5, a=4, b=4, m=16):
  """One repeat of k minibatches of made-up HSIC terms, through the package's accumulator.

  Returns:
    (RepeatedCKA with values/stderr [1, a, b] and leave_one_out [1, k, a, b] from `cka.result`,
    the NumPy float64 reference
    {'cka': [a, b], 'loo': [k, a, b] leave-one-minibatch-out CKA, 'se': [a, b] its jackknife}).
  """
  sa, sb = rng.uniform(1, 2, (k, a)), rng.uniform(1, 2, (k, b))
  rho = rng.uniform(0.2, 0.9, (a, b)) * rng.uniform(0.9, 1.1, (k, a, b))
  cross = rho * np.sqrt(sa[:, :, None] * sb[:, None, :])  # |c_i| < sqrt(a_i b_i)
  terms = cka.HSICTerms(cross, sa, sb, sa, sb, np.full(k, m))
  res = cka.result(cka.accumulate(cka.init(a, b), terms))
  rep = cka_runner.RepeatedCKA([f"a{i}" for i in range(a)], [f"b{j}" for j in range(b)],
                               res.cka[None], res.stderr[None], k * m, m,
                               leave_one_out=res.leave_one_out[None])
  # Independent reference: CKA_(-i) = (C - c_i) / sqrt((A - a_i)(B - b_i)), float64.
  c, ta, tb = cross.sum(0), sa.sum(0), sb.sum(0)
  full = c / np.sqrt(np.outer(ta, tb))
  loo = np.stack([(c - cross[i]) / np.sqrt(np.outer(ta - sa[i], tb - sb[i])) for i in range(k)])
  se = np.sqrt((k - 1) / k * ((loo - loo.mean(0)) ** 2).sum(0))
  return rep, dict(cka=full, loo=loo, se=se)


def jackknife(theta_loo):
  """The jackknife SE of a scalar from its k leave-one-out values (float64 NumPy)."""
  k = len(theta_loo)
  return float(np.sqrt((k - 1) / k * ((theta_loo - theta_loo.mean()) ** 2).sum()))


def test_linear_estimate_one_repeat_is_the_exact_jackknife_of_the_statistic():
  rng = np.random.default_rng(0)
  rep, ref = synthetic_comparison(rng, k=5, a=6, b=6)
  np.testing.assert_allclose(rep.stderr[0], ref["se"], rtol=1e-9)
  np.testing.assert_allclose(rep.leave_one_out[0], ref["loo"], rtol=1e-9)
  w = sr.split_weights(6, 2)
  est = cka_runner.linear_estimate([(rep, w)])
  assert est["value"] == pytest.approx((w * ref["cka"]).sum(), rel=1e-12)
  # The statistic's own jackknife, from the leave-one-minibatch-out grids; smaller here than
  # the cells' errors added with |w| (which bound it).
  exact = jackknife((ref["loo"] * w).sum((1, 2)))
  assert est["stderr"] == pytest.approx(exact, rel=1e-9)
  assert est["over"] == "jackknife over 5 minibatches"
  assert exact < (np.abs(w) * ref["se"]).sum()
  # One cell: its own jackknife error.
  one = np.zeros((6, 6))
  one[2, 3] = -2.0
  est = cka_runner.linear_estimate([(rep, one)])
  assert est["stderr"] == pytest.approx(2.0 * ref["se"][2, 3], rel=1e-9)
  # Two comparisons of the same minibatches: the change is formed per left-out minibatch.
  rep2, ref2 = synthetic_comparison(rng, k=5, a=6, b=6)
  change = cka_runner.linear_estimate([(rep2, w), (rep, -w)])
  assert change["value"] == pytest.approx((w * (ref2["cka"] - ref["cka"])).sum(), rel=1e-12)
  assert change["stderr"] == pytest.approx(
      jackknife((w * (ref2["loo"] - ref["loo"])).sum((1, 2))), rel=1e-9)
  # A comparison saved without its leave-one-out grids has no error to give, and says so.
  old = cka_runner.RepeatedCKA(rep.names_a, rep.names_b, rep.values, rep.stderr, 80, 16)
  est = cka_runner.linear_estimate([(old, w)])
  assert np.isnan(est["stderr"]) and "without its leave-one-minibatch-out grids" in est["over"]


def test_linear_estimate_over_repeats_is_paired():
  rng = np.random.default_rng(1)
  va, vb = rng.uniform(0, 1, (3, 5, 5)), rng.uniform(0, 1, (3, 5, 5))
  va[:, 1, 1] = np.nan  # a NaN cell of weight 0 (here the diagonal) is ignored
  rep = lambda v: cka_runner.RepeatedCKA(list("abcde"), list("abcde"), v,  # noqa: E731
                                         np.full_like(v, 0.5), 64, 16)
  w = sr.split_weights(5, 3)
  est = cka_runner.linear_estimate([(rep(va), w), (rep(vb), -w)])
  per_repeat = np.nansum(va * w, (1, 2)) - (vb * w).sum((1, 2))
  assert est["value"] == pytest.approx(per_repeat.mean(), rel=1e-12)
  assert est["stderr"] == pytest.approx(per_repeat.std(ddof=1) / np.sqrt(3), rel=1e-12)
  assert est["over"] == "over 3 repeats"
  with pytest.raises(ValueError, match="repeats"):
    cka_runner.linear_estimate([(rep(va), w), (rep(vb[:2]), w)])
  one = cka_runner.RepeatedCKA(["a"], ["b"], np.ones((1, 1, 1)), np.zeros((1, 1, 1)), 16, 16)
  assert np.isnan(cka_runner.linear_estimate([(one, np.ones((1, 1)))])["stderr"])


@pytest.mark.parametrize("size,cut", [(6, 2), (6, 1), (5, 4), (7, 3)])
def test_split_weights_give_split_contrast(size, cut):
  m = np.random.default_rng(size + cut).uniform(0, 1, (size, size))
  assert (sr.split_weights(size, cut) * m).sum() == pytest.approx(
      sr.split_contrast(m, cut)["contrast"], rel=1e-12)


def test_accuracy_drop_stderr_is_binomial():
  assert sr.accuracy_drop_stderr(0.95, 0.9, 400) == pytest.approx(
      np.sqrt(0.95 * 0.05 / 400 + 0.9 * 0.1 / 400), rel=1e-12)
  assert np.isnan(sr.accuracy_drop_stderr(0.95, 0.9, 0))


def test_split_contrast_of_a_two_block_matrix():
  m = np.full((5, 5), 0.2)
  m[:2, :2] = 0.9
  m[2:, 2:] = 0.7
  np.fill_diagonal(m, 1.0)  # The diagonal must not count.
  s = sr.split_contrast(m, 2)
  assert s["within"] == pytest.approx(0.8) and s["across"] == pytest.approx(0.2)
  assert s["contrast"] == pytest.approx(0.6)
  assert sr.split_contrast(np.ones((4, 4)), 1)["contrast"] == pytest.approx(0.0)
  with pytest.raises(ValueError, match="cut"):
    sr.split_contrast(m, 0)
  assert sr.split_index(["embedding", "block00/ln0", "block00", "block01/ln0"], 1) == 3
  with pytest.raises(KeyError, match="block 4"):
    sr.split_index(["embedding", "block00"], 4)


def test_removed_entry_adds_the_block_and_leaves_the_original():
  entry = ml_collections.ConfigDict(dict(name="ViT-smoke_8", num_classes=10, checkpoint="",
                                         train=None, overrides={"skip_removed": (3,)}))
  new = sr.removed_entry(entry, 1)
  assert tuple(new.overrides["skip_removed"]) == (1, 3) and new.name == "ViT-smoke_8"
  assert tuple(entry.overrides["skip_removed"]) == (3,)


def test_run_trains_through_train_fn_and_draws_heatmaps(tmp_path):
  from helpers import make_context, random_variables, run_analysis

  from vit_analysis import models
  from vit_analysis.analyses import base
  calls = []

  def train_fn(key, entry):  # Stands in for main's training loop (tested in test_main.py).
    calls.append((key, dict(entry.overrides)))
    module = models.create_model(entry.name, entry.num_classes, **entry.overrides)
    return base.LoadedModel(key, entry.name, module, random_variables(module), 32, 0.25)

  ctx = make_context(tmp_path, {"vit": "ViT-smoke_8"}, num_images=40, train_fn=train_fn)
  ctx.models["vit"].test_accuracy = 0.75
  config = ml_collections.ConfigDict({
      "seed": 0,
      "models": {"vit": dict(name="ViT-smoke_8", num_classes=10, checkpoint="",
                             train={"num_steps": 3}, overrides={})},
      "skip_removal": {"base_model": "vit", "blocks": (1,), "layers": "coarse",
                       "num_examples": 32, "minibatch_size": 8, "repeats": 1,
                       "figure_formats": ("png",)}})
  result = run_analysis("skip_removal", config, ctx)
  assert calls == [("vit_noskip01", {"skip_removed": (1,)})]
  m = result.metrics["vit_noskip01"]
  assert m["skip_removed"] == [1] and m["accuracy_drop"] == pytest.approx(0.5)
  # Same weights, skips of block 1 removed: layers from block 1 on lose their similarity to
  # the earlier ones (measured 0.41 vs 0.63 across the cut at random init).
  assert m["split"]["across"] < m["split_unmodified"]["across"] - 0.1
  saved = np.load(tmp_path / "results" / "skip_removal_vit_noskip01.npz")
  unmodified = np.load(tmp_path / "results" / "skip_removal_vit.npz")
  # One repeat of 4 minibatches: each contrast's error is its exact jackknife from the saved
  # leave-one-minibatch-out grids; the paired change is formed per left-out minibatch.
  w = sr.split_weights(10, sr.split_index([str(n) for n in saved["names_a"]], 1))
  loo, loo0 = saved["leave_one_out"][0], unmodified["leave_one_out"][0]  # [k, L, L]
  assert loo.shape == (4, 10, 10)
  se, se0 = jackknife((w * loo).sum((1, 2))), jackknife((w * loo0).sum((1, 2)))
  assert m["split"]["contrast_stderr"] == pytest.approx(se, rel=1e-9) and se > 0
  assert m["split_unmodified"]["contrast_stderr"] == pytest.approx(se0, rel=1e-9)
  assert m["split_change"]["value"] == pytest.approx(
      m["split"]["contrast"] - m["split_unmodified"]["contrast"], abs=1e-12)
  assert m["split_change"]["stderr"] == pytest.approx(
      jackknife((w * (loo - loo0)).sum((1, 2))), rel=1e-9)
  assert m["split"]["contrast_over"] == m["split_change"]["over"] == (
      "jackknife over 4 minibatches")
  assert m["accuracy_drop_stderr"] == pytest.approx(
      np.sqrt(0.75 * 0.25 / 40 + 0.25 * 0.75 / 40), rel=1e-12)
  assert m["accuracy_drop_over"].startswith("over 40 test images")
  assert saved["mean"].shape == (m["num_layers"],) * 2 == (10, 10)  # coarse: 1 + 4 * 2 + 1.
  np.testing.assert_allclose(np.diag(saved["mean"]), 1.0, atol=1e-4)
  assert all((tmp_path / f).exists() for f in result.figures)
  with pytest.raises(ValueError, match="out of range"):
    config.skip_removal.blocks = (2,)
    run_analysis("skip_removal", config, ctx)
