"""Each finding check on constructed metrics that show the paper's expectation, that do not, and
whose uncertainty leaves it open."""
import numpy as np
import pytest

from vit_analysis.report import findings

S, N, I = "shown", "not shown", "inconclusive"
Z = 1.959963984540054  # two-sided 95%

# models.json summaries as main writes them (the facts come from models.describe).
MODELS = [{"key": "vit", "name": "ViT-B_32", "image_size": 224, "family": "vit", "has_cls": True,
           "patch_size": 32},
          {"key": "vit_gap", "name": "ViT-B_32-gap", "image_size": 224, "family": "vit",
           "has_cls": False, "patch_size": 32},
          {"key": "resnet", "name": "R50x1", "image_size": 224, "family": "resnet",
           "has_cls": False, "patch_size": None}]


def _run(name, metrics, arrays=None, models=MODELS):
  return findings.SavedRun({name: metrics}, models, arrays=arrays)


def _shown(name, metrics, arrays=None, match=""):
  out = [f for f in findings.CHECKS[name](_run(name, metrics, arrays)) if match in f.expectation]
  assert out, f"no finding of {name} matches {match!r}"
  for f in out:
    assert f.threshold and f.measured
  return [f.verdict for f in out]


def _repeats(grid, spread, mask=None, r=4):
  """Saved arrays with `r` per-repeat grids: `grid` + spread x [-1.5, -0.5, 0.5, 1.5] on `mask`.

  The repeats' mean is `grid`; a statistic linear in the masked cells has SE 0.645 x spread.
  """
  grid = np.asarray(grid, np.float64)
  mask = np.ones(grid.shape, bool) if mask is None else mask
  offsets = spread * (np.arange(r) - (r - 1) / 2)
  return np.stack([grid + o * mask for o in offsets])


def _intra_arrays(vit_offdiag, res_offdiag, spread, n=10):
  off = ~np.eye(n, dtype=bool)
  grid = lambda v: np.where(off, v, 1.0)
  return {"cka_intra_vit": {"values": _repeats(grid(vit_offdiag), spread, off),
                            "mean": grid(vit_offdiag)},
          "cka_intra_resnet": {"values": _repeats(grid(res_offdiag), spread, off),
                               "mean": grid(res_offdiag)}}


def test_family_and_cls_from_the_summaries():
  run = findings.SavedRun({}, MODELS + [{"key": "h", "name": "R50+ViT-B_16", "family": "hybrid",
                                         "has_cls": True},
                                        {"key": "x", "name": "ViT-like-name"}])
  assert [run.family(k) for k in ("vit", "resnet", "h", "x")] == [
      "vit", "resnet", "hybrid", "other"]  # never guessed from a name
  assert run.has_cls("vit") and not run.has_cls("vit_gap") and not run.has_cls("x")


def _intra(vit_mean, res_mean, n=10, first_last=(0.6, 0.3)):
  return {"vit": {"mean_cka": vit_mean, "first_last": first_last[0], "num_layers_a": n},
          "resnet": {"mean_cka": res_mean, "first_last": first_last[1], "num_layers_a": n}}


def test_cka_intra_uniformity_uses_off_diagonal_means():
  # n = 10: off-diagonal mean = (100 m - 10) / 90. Without per-repeat grids: no uncertainty.
  f = findings.check_cka_intra(_run("cka_intra", _intra(0.82, 0.7)))[0]
  assert f.measured == f"vit {(82 - 10) / 90:.3g}, resnet {(70 - 10) / 90:.3g}"
  assert f.verdict == I and "no per-repeat grids saved" in f.interval
  # The difference of two models' statistics, SE sqrt(se1² + se2²) over repeats.
  assert _shown("cka_intra", _intra(0.8, 0.7), _intra_arrays(0.8, 0.7, 0.01), "uniform") == [S]
  assert _shown("cka_intra", _intra(0.8, 0.7), _intra_arrays(0.8, 0.7, 0.2), "uniform") == [I]
  assert _shown("cka_intra", _intra(0.7, 0.8), _intra_arrays(0.7, 0.8, 0.01), "uniform") == [N]
  f = findings.check_cka_intra(_run("cka_intra", _intra(0.8, 0.7), _intra_arrays(0.8, 0.7, 0.01)))
  # Off-diagonal 0.8 - 0.7 = 0.1; each SE 0.645 x 0.01, the difference's sqrt(2) x that.
  half = 1.959963984540054 * np.hypot(*[0.01 * np.std([-1.5, -0.5, 0.5, 1.5], ddof=1) / 2] * 2)
  assert f[0].interval == f"[{0.1 - half:.3g}, {0.1 + half:.3g}] vs > 0 (over 4 repeats)"
  # First-last CKA from the same grids: the constant off-diagonal gives ViT 0.8 vs ResNet 0.7.
  assert [x.verdict for x in f if "lowest" in x.expectation] == [S]
  assert _shown("cka_intra", _intra(0.8, 0.7), _intra_arrays(0.2, 0.3, 0.01), "lowest") == [N]
  assert _shown("cka_intra", {"vit": _intra(0.8, 0.7)["vit"]}, match="uniform") == [None]


def test_every_vit_above_every_resnet_is_the_weakest_pair():
  metrics = {**_intra(0.8, 0.7), "vit_gap": {"mean_cka": 0.8, "first_last": 0.5,
                                             "num_layers_a": 10}}
  arrays = _intra_arrays(0.8, 0.7, 0.01)
  for spread, verdict in ((0.01, S), (0.2, I)):  # one pair shown, the other open: inconclusive
    off = ~np.eye(10, dtype=bool)
    grid = np.where(off, 0.75, 1.0)
    arrays["cka_intra_vit_gap"] = {"values": _repeats(grid, spread, off), "mean": grid}
    f = findings.check_cka_intra(_run("cka_intra", metrics, arrays))[0]
    assert f.verdict == verdict
  assert f.interval.startswith("vit_gap - resnet:")
  arrays["cka_intra_vit_gap"]["values"] = _repeats(np.where(off, 0.5, 1.0), 0.01, off)
  assert findings.check_cka_intra(_run("cka_intra", metrics, arrays))[0].verdict == N


def _stage_grid(contrast, spread=0.01):
  """A ResNet grid whose repeats' stage contrasts are `contrast` + spread x [-1.5 .. 1.5]."""
  names = ["root"] + [f"block{s}/unit{u:02d}" for s in (1, 2) for u in (1, 2, 3)]
  stages = np.array([0, 1, 1, 1, 2, 2, 2])
  same = stages[:, None] == stages[None, :]
  m = np.where(same, 0.5 + contrast, 0.5)
  np.fill_diagonal(m, 1.0)
  within = same & ~np.eye(len(names), dtype=bool)
  return {"mean": m, "values": _repeats(m, spread, within), "names_a": np.array(names)}


def test_cka_intra_stage_structure_from_the_saved_grid():
  metrics = _intra(0.8, 0.7)
  assert findings.stage_contrast(_stage_grid(0.3)["mean"], _stage_grid(0.3)["names_a"]) == (
      pytest.approx(0.3))
  # Same mean contrast 0.3 (threshold 0.1): tight repeats decide, wide ones leave it open.
  assert _shown("cka_intra", metrics, {"cka_intra_resnet": _stage_grid(0.3)}, "stage") == [S]
  assert _shown("cka_intra", metrics, {"cka_intra_resnet": _stage_grid(0.3, 0.3)},
                "stage") == [I]
  assert _shown("cka_intra", metrics, {"cka_intra_resnet": _stage_grid(0.05)}, "stage") == [N]
  f = [x for x in findings.check_cka_intra(_run("cka_intra", metrics, {
      "cka_intra_resnet": _stage_grid(0.3, 0.3)})) if "stage" in x.expectation][0]
  half = 1.959963984540054 * 0.3 * np.std([-1.5, -0.5, 0.5, 1.5], ddof=1) / 2
  assert f.interval == f"[{0.3 - half:.3g}, {0.3 + half:.3g}] vs > 0.1 (over 4 repeats)"
  one = _stage_grid(0.3)
  one["values"] = one["values"][:1]  # one repeat: no spread, so no verdict
  assert _shown("cka_intra", metrics, {"cka_intra_resnet": one}, "stage") == [I]
  assert _shown("cka_intra", metrics, None, "stage") == [None]


def _cross(low_match_depth, top_best):
  """[vit 9, resnet 6]: lower-half ResNet layers best match ViT row `low_match_depth`."""
  m = np.full((9, 6), 0.3)
  m[low_match_depth, :3] = 0.9
  m[:6, 3:] = 0.7
  m[6:, :] = top_best if low_match_depth < 6 else np.maximum(m[6:, :], top_best)
  return {"mean": m, "values": np.stack([m] * 3)}  # identical repeats: SE 0


@pytest.mark.parametrize("transpose", [False, True])
def test_cka_cross_lower_layers_and_top_third(transpose):
  metrics = {"vit_vs_resnet": {"mean_cka": 0.5}}
  arrays = {"cka_cross_vit_vs_resnet": _cross(1, 0.2)}
  if transpose:  # ResNet rows, ViT columns: the check orients the grid itself.
    metrics = {"resnet_vs_vit": {"mean_cka": 0.5}}
    m = arrays["cka_cross_vit_vs_resnet"]["mean"].T
    arrays = {"cka_cross_resnet_vs_vit": {"mean": m, "values": np.stack([m] * 3)}}
  assert _shown("cka_cross", metrics, arrays, "lower half") == [S]
  assert _shown("cka_cross", metrics, arrays, "top third") == [S]
  bad = _cross(7, 0.95)
  t = lambda z: {"mean": z["mean"].T, "values": z["values"].transpose(0, 2, 1)}
  arrays = {k: (t(bad) if transpose else bad) for k in arrays}
  assert _shown("cka_cross", metrics, arrays, "lower half") == [N]
  assert _shown("cka_cross", metrics, arrays, "top third") == [N]
  mean_only = {k: {"mean": v["mean"]} for k, v in arrays.items()}
  assert _shown("cka_cross", metrics, mean_only) == [I, I]
  assert _shown("cka_cross", metrics, None) == [None, None]


def _heads(rho, n=7):
  return {"vit_block00_vs_resnet": {"spearman": dict(zip(("block1/unit01", "block1/unit02"), rho)),
                                    "subset_distance": list(range(n))}}


def test_head_subsets_spearman_negative():
  # Fisher z: atanh(rho) ± 1.96 x 1.06 / sqrt(n - 3), back-transformed.
  assert _shown("head_subsets", _heads((-0.9, -0.95))) == [S]
  assert _shown("head_subsets", _heads((-0.9, -0.2))) == [I]  # -0.2 over 7 subsets: open
  assert _shown("head_subsets", _heads((-0.9, 0.9))) == [N]
  assert _shown("head_subsets", _heads((-0.99, -0.99), n=3)) == [I]  # n < 4: no interval
  f = findings.check_head_subsets(_run("head_subsets", _heads((-0.9, -0.2))))[0]
  half = 1.959963984540054 * 1.06 / 2
  assert f.interval == (f"block1/unit02: [{np.tanh(np.arctanh(-0.2) - half):.3g}, "
                        f"{np.tanh(np.arctanh(-0.2) + half):.3g}] vs < 0 (Fisher z over 7 points)")


def test_head_subsets_local_minus_global_with_saved_errors():
  # The analysis' saved difference and its error decide, whatever the number of subsets.
  def heads(diff, se):
    m = _heads((-1.0, -0.5), n=3)
    m["vit_block00_vs_resnet"].update(
        cka_local_minus_global=dict(zip(("block1/unit01", "block1/unit02"), diff)),
        cka_local_minus_global_stderr=dict(zip(("block1/unit01", "block1/unit02"), se)),
        cka_local_minus_global_over="over 3 repeats")
    return m
  assert _shown("head_subsets", heads((0.05, 0.04), (0.01, 0.01))) == [S]
  assert _shown("head_subsets", heads((0.05, 0.04), (0.01, 0.03))) == [I]  # 0.04 ± 0.059
  assert _shown("head_subsets", heads((0.05, -0.05), (0.01, 0.01))) == [N]
  f = findings.check_head_subsets(_run("head_subsets", heads((0.05, 0.04), (0.01, 0.03))))[0]
  lo, hi = 0.04 - Z * 0.03, 0.04 + Z * 0.03
  assert f.interval == f"block1/unit02: [{lo:.3g}, {hi:.3g}] vs > 0 (over 3 repeats)"
  assert f.measured == "block1/unit01 +0.05 (rho -1), block1/unit02 +0.04 (rho -0.5)"


def _attn(lo, hi, last, u=100.0):
  return {"vit": {"uniform_attention": u, "block0_min_head": lo, "block0_max_head": hi,
                      "last_block_mean": last}}


def test_attention_distance_without_saved_spread_is_inconclusive():
  # Only per-head means over images are saved: no interval, so never a silent 'shown'.
  for attn in (_attn(20, 90, 95), _attn(55, 90, 95), _attn(20, 90, 70)):
    out = findings.check_attention_distance(_run("attention_distance", attn))
    assert [f.verdict for f in out] == [I, I]
    assert all("no uncertainty saved" in f.interval for f in out)
  f = findings.check_attention_distance(_run("attention_distance", _attn(20, 90, 95)))[0]
  assert f.measured == "min 20, max 90, uniform 100"


def _rf(res_area, vit_area, centre):
  return {"resnet/post": {"layers": ["a"] * len(res_area), "area_fraction": res_area},
          "vit/post": {"layers": ["b"] * len(vit_area), "area_fraction": vit_area,
                       "centre_patch_mass": [0.5, centre]}}


def test_receptive_field_checks():
  # ViT-B_32 at 224 px: the centre patch is 1/49 of the image.
  good = _rf([0.01, 0.02, 0.05, 0.1], [0.2, 0.5], 0.1)
  bad = _rf([0.1, 0.05, 0.02, 0.01], [0.01, 0.5], 0.03)
  # Rank correlation over 4 layers: rho = ±1 is decided even with Fisher-z SE 1.06.
  assert _shown("receptive_field", good, match="grow") == [S]
  assert _shown("receptive_field", bad, match="grow") == [N]
  assert _shown("receptive_field", _rf([0.01, 0.02, 0.05], [0.2], 0.1), match="grow") == [I]
  assert _shown("receptive_field", _rf([0.01, 0.02, 0.05, 0.1, 0.08], [0.2], 0.1),
                match="grow") == [I]  # rho 0.9 over 5 layers: the interval reaches below 0.8
  for match in ("larger", "centre"):  # ERF areas: no spread over images saved
    assert _shown("receptive_field", good, match=match) == [I]
    assert _shown("receptive_field", bad, match=match) == [I]


def _skip_arrays(cls_early, cls_late, spatial=2.0):
  r = np.full((4, 5), spatial)  # [block/kind labels, tokens]; CLS is token 0
  r[:2, 0], r[2:, 0] = cls_early, cls_late
  labels = np.array(["block00/sa", "block00/mlp", "block01/sa", "block01/mlp"])
  return {"skip_norms": {"vit/ratio": r, "vit/labels": labels}}


def test_skip_norms_checks():
  metrics = {"vit": {"sa": {"ratio_mean": 30.0}, "mlp": {"ratio_mean": 10.0}},
             "resnet": {"unit": {"ratio_mean": 2.0}}}
  # Norm ratios are saved as means over images only: inconclusive, with the reason.
  assert _shown("skip_norms", metrics, match="far above") == [I]
  assert _shown("skip_norms", metrics, _skip_arrays(50, 0.5), "early") == [I]
  assert _shown("skip_norms", metrics, _skip_arrays(1, 5), "phase") == [I]
  f = findings.check_skip_norms(_run("skip_norms", metrics, _skip_arrays(50, 0.5)))
  assert all("no uncertainty saved" in x.interval for x in f)
  assert "vit sa: CLS 50 vs spatial 2" in f[1].measured
  assert _shown("skip_norms", metrics, None, "early") == [None]


def _removal(base, removed, n):
  extra = {"num_test": n} if n else {}
  return {"vit": {"skip_removed": [], "test_accuracy": base, **extra},
          "vit_noskip05": {"skip_removed": [5], "test_accuracy": removed,
                           "accuracy_drop": base - removed, "split": {"contrast": 0.4},
                           "split_unmodified": {"contrast": 0.1}, **extra}}


def test_skip_removal_accuracy_and_split():
  # Binomial SE per accuracy over the test images, SE of the drop sqrt(se1² + se2²).
  assert _shown("skip_removal", _removal(0.95, 0.91, 10000)) == [S, I]  # split: no repeats saved
  f = findings.check_skip_removal(_run("skip_removal", _removal(0.95, 0.953, 10000)))
  assert f[0].verdict == N and f[0].measured == "drop -0.30 points (skips removed: 95.3%)"
  se = 100 * np.hypot(np.sqrt(0.95 * 0.05 / 1e4), np.sqrt(0.953 * 0.047 / 1e4))
  lo, hi = -0.3 - 1.959963984540054 * se, -0.3 + 1.959963984540054 * se
  assert f[0].interval == f"[{lo:.3g}, {hi:.3g}] vs > 1 (over 10000 test images)"
  # A 0.3-point drop on 1,000 images: the interval (±1.9 points) reaches past 1 point.
  assert _shown("skip_removal", _removal(0.953, 0.95, 1000)) == [I, I]
  assert _shown("skip_removal", _removal(0.953, 0.95, 10000)) == [N, I]
  f = findings.check_skip_removal(_run("skip_removal", _removal(0.99, 0.5, None)))[0]
  assert f.verdict == I and "number of test images unknown" in f.interval
  bad = {"vit_noskip05": {"skip_removed": [5], "accuracy_drop": -0.003}}
  f = findings.check_skip_removal(_run("skip_removal", bad))
  assert [x.verdict for x in f] == [I, None] and f[0].measured == "drop -0.30 points"


def test_skip_removal_split_with_saved_errors():
  def removal(change, se, over="jackknife over 4 minibatches"):
    m = _removal(0.95, 0.91, 10000)
    m["vit_noskip05"]["split_change"] = {"value": change, "stderr": se, "over": over}
    return m
  # The paired change of the contrast against > 0.05.
  assert _shown("skip_removal", removal(0.3, 0.05), match="splits") == [S]
  assert _shown("skip_removal", removal(0.1, 0.05), match="splits") == [I]  # 0.1 ± 0.098
  assert _shown("skip_removal", removal(0.0, 0.01), match="splits") == [N]
  f = findings.check_skip_removal(_run("skip_removal", removal(0.1, 0.05)))[1]
  assert f.interval == (f"[{0.1 - Z * 0.05:.3g}, {0.1 + Z * 0.05:.3g}] vs > 0.05 (jackknife over "
                        "4 minibatches)")
  assert f.measured == "0.4 vs unmodified 0.1"
  # Only the two contrasts' errors saved: added (the same images), 0.3 ± 1.96 x 0.2.
  m = _removal(0.95, 0.91, 10000)
  m["vit_noskip05"]["split"]["contrast_stderr"] = 0.1
  m["vit_noskip05"]["split_unmodified"]["contrast_stderr"] = 0.1
  assert _shown("skip_removal", m, match="splits") == [I]
  m["vit_noskip05"]["split"]["contrast_stderr"] = 0.02
  m["vit_noskip05"]["split_unmodified"]["contrast_stderr"] = 0.02
  assert _shown("skip_removal", m, match="splits") == [S]
  # The analysis' saved drop error is the one used.
  m = _removal(0.95, 0.91, None)
  m["vit_noskip05"].update(accuracy_drop_stderr=0.03, accuracy_drop_over="over 40 test images")
  f = findings.check_skip_removal(_run("skip_removal", m))[0]
  assert f.verdict == I and f.interval.endswith("vs > 1 (over 40 test images)")
  m["vit_noskip05"]["accuracy_drop_stderr"] = 0.005
  assert findings.check_skip_removal(_run("skip_removal", m))[0].verdict == S


def _loc_grid(own, other, g=4):
  m = np.full((g * g, g * g), other)
  np.fill_diagonal(m, own)
  return {"mean": m, "values": np.stack([m] * 3)}


def test_localization_checks():
  metrics = {"vit/block11": {"own_contrast": 0.4, "own_is_best": 0.2, "grid": 4},
             "vit_gap/block11": {"own_contrast": 0.1, "grid": 4},
             "resnet/block4/unit03": {"own_contrast": 0.05, "grid": 4}}
  arrays = {"localization_vit_block11": _loc_grid(0.8, 0.3)}
  assert _shown("localization", metrics, arrays, "interior") == [S]
  assert _shown("localization", metrics, {"localization_vit_block11": _loc_grid(0.2, 0.3)},
                "interior") == [N]
  # Repeats that disagree (own patch best in 2 of 3): fraction 2/3 ± 0.33, open against 0.5.
  mixed = _loc_grid(0.8, 0.3)
  mixed["values"] = np.stack([_loc_grid(o, 0.3)["mean"] for o in (0.8, 0.8, 0.2)])
  assert _shown("localization", metrics, {"localization_vit_block11": mixed}, "interior") == [I]
  assert _shown("localization", metrics, None, "interior") == [I]  # own_is_best: no spread
  # Own-patch contrasts are saved as means over repeats only.
  assert _shown("localization", metrics, match="GAP") == [I]
  assert _shown("localization", metrics, match="ResNet") == [I]


def test_localization_contrasts_with_saved_errors():
  def metrics(vit, gap, res, se, over="over 3 repeats"):
    return {f"{k}/{layer}": {"own_contrast": v, "own_contrast_stderr": se,
                             "own_contrast_over": over, "own_is_best": 0.8, "grid": 4}
            for k, layer, v in (("vit", "block11", vit), ("vit_gap", "block11", gap),
                                ("resnet", "block4/unit03", res))}
  assert _shown("localization", metrics(0.4, 0.1, 0.05, 0.02), match="GAP") == [S]
  assert _shown("localization", metrics(0.4, 0.1, 0.05, 0.02), match="ResNet") == [S]
  # The same images for every model: the two errors are added, 0.3 ± 1.96 x 0.2.
  assert _shown("localization", metrics(0.4, 0.1, 0.05, 0.1), match="GAP") == [I]
  assert _shown("localization", metrics(0.05, 0.3, 0.4, 0.02), match="GAP") == [N]
  assert _shown("localization", metrics(0.05, 0.3, 0.4, 0.02), match="ResNet") == [N]
  f = [x for x in findings.check_localization(_run("localization", metrics(0.4, 0.1, 0.05, 0.1)))
       if "GAP" in x.expectation][0]
  assert f.interval == (f"[{0.3 - Z * 0.2:.3g}, {0.3 + Z * 0.2:.3g}] vs > 0 (over 3 repeats; "
                        "the two errors added)")


def _probe(cls_tok, gap_tok, res_tok, cls_cls, gap_mean, gap_first):
  curve = lambda v: {"acc_mean": [0.01, v]}
  return {"vit": {"aggregated": {"cls": curve(cls_cls), "mean": curve(0.3)},
                  "tokens": {"block11": {"acc_mean": cls_tok}}},
          "vit_gap": {"aggregated": {"mean": curve(gap_mean), "first": curve(gap_first)},
                      "tokens": {"block11": {"acc_mean": gap_tok}}},
          "resnet": {"aggregated": {"s2d": curve(0.5)}, "tokens": {"b4": {"acc_mean": res_tok}}}}


def test_probe_checks():
  good = _probe(cls_tok=0.08, gap_tok=0.55, res_tok=0.5, cls_cls=0.6, gap_mean=0.58,
                gap_first=0.56)
  bad = _probe(cls_tok=0.5, gap_tok=0.52, res_tok=0.4, cls_cls=0.52, gap_mean=0.7,
               gap_first=0.3)
  assert _shown("probe", good) == [I] * 5  # no num_test saved: no binomial error
  for m in (*good.values(), *bad.values()):
    m["num_test"] = 10000
  assert _shown("probe", good) == [S] * 5
  assert _shown("probe", bad) == [N] * 5
  # |0.60 - 0.58| < 5 points on 10,000 images is shown; on 100 images it is open.
  for m in good.values():
    m["num_test"] = 100
  assert _shown("probe", good, match="nearly equal") == [I]
  f = [x for x in findings.check_probe(_run("probe", good)) if "nearly equal" in x.expectation]
  assert f[0].interval.endswith("vs within ±0.05 (over 100 test images)")


def test_dataset_scale_checks():
  good = {"vit_frac0.03": {"fraction": 0.03, "block_cka": [0.95, 0.9, 0.7, 0.4]},
          "vit_frac0.3": {"fraction": 0.3, "block_cka": [0.2, 0.2, 0.2, 0.2]},
          "vit_ft_c10": {"task": "cifar10", "block_cka": [0.99, 0.9, 0.8, 0.5]}}
  # Per-block CKA means only: the 3% model is the one checked, each inconclusive with its reason.
  out = findings.check_dataset_scale(_run("dataset_scale", good))
  assert [f.verdict for f in out] == [I, I, I] and "[3%]" in out[0].expectation
  assert all("no uncertainty saved" in f.interval for f in out)
  bad = {"vit_frac0.03": {"fraction": 0.03, "block_cka": [0.5, 0.6, 0.7, 0.8]},
         "vit_ft_c10": {"task": "cifar10", "block_cka": [0.6, 0.9]}}
  assert _shown("dataset_scale", bad) == [I, I, I]


def test_dataset_scale_checks_with_block_errors():
  def scale(low_curve, se, tuned=(0.99, 0.9, 0.8, 0.5), over="jackknife over 4 minibatches"):
    return {"vit_frac0.1": {"fraction": 0.1, "block_cka": list(low_curve),
                            "block_cka_stderr": [se] * len(low_curve), "block_cka_over": over},
            "vit_ft_c10": {"task": "cifar10", "block_cka": list(tuned),
                           "block_cka_stderr": [se] * len(tuned), "block_cka_over": over}}
  assert _shown("dataset_scale", scale((0.95, 0.9, 0.7, 0.4), 0.01)) == [S, S, S]
  # 0.85 ± 0.098 straddles 0.8; 0.15 ± 2 x 0.098 straddles 0; 0.99 ± 0.098 does not.
  assert _shown("dataset_scale", scale((0.85, 0.9, 0.7, 0.7), 0.05)) == [I, I, S]
  assert _shown("dataset_scale", scale((0.5, 0.6, 0.7, 0.8), 0.01, (0.6, 0.9))) == [N, N, N]
  out = findings.check_dataset_scale(_run("dataset_scale", scale((0.85, 0.9, 0.7, 0.7), 0.05)))
  assert out[0].interval == (f"[{0.85 - Z * 0.05:.3g}, {0.85 + Z * 0.05:.3g}] vs > 0.8 "
                             "(jackknife over 4 minibatches)")
  assert out[1].interval == (f"[{0.15 - Z * 0.1:.3g}, {0.15 + Z * 0.1:.3g}] vs > 0 "
                             "(jackknife over 4 minibatches; the two errors added)")
  # Eight blocks: a quarter is two blocks, their errors added (mean of the two SEs).
  eight = scale((0.9, 0.84, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2), 0.01, over="over 5 repeats")
  eight["vit_frac0.1"]["block_cka_stderr"][1] = 0.03
  out = findings.check_dataset_scale(_run("dataset_scale", eight))
  assert out[0].verdict == S and out[0].interval == (
      f"[{0.87 - Z * 0.02:.3g}, {0.87 + Z * 0.02:.3g}] vs > 0.8 (over 5 repeats; 2 blocks' "
      "errors added)")


def test_check_covers_only_analyses_that_ran_and_absent_results_are_none():
  run = findings.SavedRun({"attention_distance": {}}, MODELS)
  out = findings.check(run)
  assert {f.analysis for f in out} == {"attention_distance"}
  assert [f.shown for f in out] == [None]
  assert len(findings.check(run, analyses=list(findings.CHECKS))) >= len(findings.CHECKS)


Z = 1.959963984540054  # the 95% interval's half-width in SEs


def _attn_se(lo, hi, last, se, u=100.0):
  m = _attn(lo, hi, last, u)
  m["vit"].update(block0_min_head_stderr=se, block0_max_head_stderr=se,
                  last_block_mean_stderr=se, uncertainty_over="images (n=500)")
  return m


def test_attention_distance_decides_with_the_se_over_images():
  check = lambda m: [f.verdict for f in findings.check_attention_distance(
      _run("attention_distance", m))]
  # Thresholds: min < 50, max > 80, last-block mean > 80 (uniform 100).
  assert check(_attn_se(40, 90, 90, 2.0)) == [S, S]
  assert check(_attn_se(60, 90, 70, 2.0)) == [N, N]   # min and last wholly on the wrong side
  assert check(_attn_se(40, 70, 90, 2.0)) == [N, S]   # the max head is not global
  assert check(_attn_se(47, 90, 83, 2.0)) == [I, I]   # 47 + 1.96 x 2 > 50, 83 - 3.92 < 80
  assert check(_attn_se(47, 90, 83, 1.0)) == [S, S]   # the same values with half the error
  f = findings.check_attention_distance(_run("attention_distance", _attn_se(40, 90, 90, 2.0)))
  assert f[0].interval == (f"min head [{40 - Z * 2:.3g}, {40 + Z * 2:.3g}] vs < 50 (SE over "
                           f"images (n=500)); max head [{90 - Z * 2:.3g}, {90 + Z * 2:.3g}] vs "
                           "> 80 (SE over images (n=500))")
  assert f[1].interval == f"[{90 - Z * 2:.3g}, {90 + Z * 2:.3g}] vs > 80 (SE over images (n=500))"


def _rf_se(res_low, vit_low, se, centre, centre_se):
  m = _rf([0.01, 0.02, 0.05, 0.1], [0.2, 0.5], centre)
  for key, low in (("resnet/post", res_low), ("vit/post", vit_low)):
    m[key].update(lower_half_area_per_image=low, lower_half_area_per_image_stderr=se,
                  uncertainty_over="images (n=32)")
  m["vit/post"]["centre_patch_mass_stderr"] = [0.01, centre_se]
  return m


def test_receptive_field_decides_with_the_se_over_images():
  larger = lambda *a: _shown("receptive_field", _rf_se(*a), match="larger")
  # Difference of the per-image lower-half areas of the same images: SE se + se.
  assert larger(0.02, 0.10, 0.01, 0.1, 0.01) == [S]
  assert larger(0.10, 0.02, 0.01, 0.1, 0.01) == [N]
  assert larger(0.02, 0.04, 0.01, 0.1, 0.01) == [I]  # 0.02 < 1.96 x 0.0141
  # Centre share vs 2 x 1/49 = 0.0408 (ViT-B/32 at 224 px), the last layer's delta-method SE.
  centre = lambda c, se: _shown("receptive_field", _rf_se(0.02, 0.1, 0.01, c, se),
                                match="centre")
  assert centre(0.1, 0.01) == [S] and centre(0.02, 0.005) == [N] and centre(0.05, 0.01) == [I]
  f = findings.check_receptive_field(_run("receptive_field", _rf_se(0.02, 0.1, 0.01, 0.1, 0.01)))
  assert f[1].interval == (f"[{0.08 - Z * 0.02:.3g}, {0.08 + Z * 0.02:.3g}] vs > 0 "
                           "(SE over images (n=32); the two errors added)")
  assert f[1].measured == "vit 0.1, resnet 0.02"
  assert f[2].interval == f"[{0.1 - Z * 0.01:.3g}, {0.1 + Z * 0.01:.3g}] vs > {2 / 49:g} " \
                          "(SE over images (n=32))"


def _skip_se(vit_sa, vit_mlp, res, se, contrast, contrast_se):
  """Skip-norm metrics with SEs; `contrast`: CLS - spatial (early, late) of both ViT kinds."""
  kind = lambda r, **kw: {"ratio_mean": r, "ratio_mean_stderr": se, **kw}
  cls = {"cls_minus_spatial_early": contrast[0], "cls_minus_spatial_early_stderr": contrast_se,
         "cls_minus_spatial_late": contrast[1], "cls_minus_spatial_late_stderr": contrast_se}
  return {"vit": {"sa": kind(vit_sa, **cls), "mlp": kind(vit_mlp, **cls),
                  "uncertainty_over": "images (n=500)"},
          "resnet": {"unit": kind(res), "uncertainty_over": "images (n=500)"}}


def test_skip_norms_decide_with_the_se_over_images():
  far = lambda *a: _shown("skip_norms", _skip_se(*a, (1, -1), 0.1), match="far above")
  # ViT - 2 x ResNet for every pair, on the same images: SE se + 2 se.
  assert far(30, 10, 2, 0.5) == [S]
  assert far(3, 10, 2, 0.1) == [N]      # 3 - 4 = -1, SE 0.3
  assert far(5.5, 10, 2, 0.5) == [I]    # 1.5 < 1.96 x 1.5
  assert far(5.5, 10, 2, 0.2) == [S]    # 1.5 > 1.96 x 0.6
  arrays = _skip_arrays(50, 0.5)
  phase = lambda contrast, se: (
      _shown("skip_norms", _skip_se(30, 10, 2, 0.5, contrast, se), arrays, "early") +
      _shown("skip_norms", _skip_se(30, 10, 2, 0.5, contrast, se), arrays, "phase"))
  assert phase((48, -3), 1.0) == [S, S]
  assert phase((-1, 3), 0.2) == [N, N]
  assert phase((48, -1.5), 1.0) == [S, I]   # late: [-3.46, 0.46] contains 0
  assert phase((1, -1), 1.0) == [I, I]
  f = findings.check_skip_norms(_run("skip_norms", _skip_se(30, 10, 2, 0.5, (48, -3), 1.0),
                                     arrays))
  assert f[0].measured == "vit sa 30, vit mlp 10, resnet 2"
  assert f[0].interval == (f"vit mlp - 2 x resnet: [{6 - Z * 1.5:.3g}, {6 + Z * 1.5:.3g}] vs > 0 "
                           "(SE over images (n=500); the two errors added)")
  assert "vit sa: CLS 50 vs spatial 2" in f[1].measured
  assert f[2].interval.endswith("vs < 0 (SE over images (n=500))")
  # A dead branch (no SE saved for it) leaves the comparison open.
  dead = _skip_se(30, 10, 2, 0.5, (48, -3), 1.0)
  dead["vit"]["mlp"]["ratio_mean"], dead["vit"]["mlp"]["ratio_mean_stderr"] = "inf", None
  assert _shown("skip_norms", dead, match="far above") == [I]
