"""Each finding check on constructed metrics that show the paper's expectation and that do not."""
import numpy as np
import pytest

from vit_analysis.report import findings

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
  return [f.shown for f in out]


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
  # n = 10: off-diagonal mean = (100 m - 10) / 90.
  assert _shown("cka_intra", _intra(0.8, 0.7), match="uniform") == [True]
  assert _shown("cka_intra", _intra(0.7, 0.8), match="uniform") == [False]
  f = findings.check_cka_intra(_run("cka_intra", _intra(0.82, 0.7)))[0]
  assert f.measured == f"vit {(82 - 10) / 90:.3g}, resnet {(70 - 10) / 90:.3g}"
  assert _shown("cka_intra", _intra(0.8, 0.7, first_last=(0.2, 0.3)), match="lowest") == [False]
  assert _shown("cka_intra", {"vit": _intra(0.8, 0.7)["vit"]}, match="uniform") == [None]


def _stage_grid(contrast):
  names = ["root"] + [f"block{s}/unit{u:02d}" for s in (1, 2) for u in (1, 2, 3)]
  stages = np.array([0, 1, 1, 1, 2, 2, 2])
  same = stages[:, None] == stages[None, :]
  m = np.where(same, 0.5 + contrast, 0.5)
  np.fill_diagonal(m, 1.0)
  return {"mean": m, "names_a": np.array(names)}


def test_cka_intra_stage_structure_from_the_saved_grid():
  metrics = _intra(0.8, 0.7)
  assert findings.stage_contrast(_stage_grid(0.3)["mean"], _stage_grid(0.3)["names_a"]) == (
      pytest.approx(0.3))
  assert _shown("cka_intra", metrics, {"cka_intra_resnet": _stage_grid(0.3)}, "stage") == [True]
  assert _shown("cka_intra", metrics, {"cka_intra_resnet": _stage_grid(0.05)}, "stage") == [False]
  assert _shown("cka_intra", metrics, None, "stage") == [None]


def _cross(low_match_depth, top_best):
  """[vit 9, resnet 6]: lower-half ResNet layers best match ViT row `low_match_depth`."""
  m = np.full((9, 6), 0.3)
  m[low_match_depth, :3] = 0.9
  m[:6, 3:] = 0.7
  m[6:, :] = top_best if low_match_depth < 6 else np.maximum(m[6:, :], top_best)
  return {"mean": m}


@pytest.mark.parametrize("transpose", [False, True])
def test_cka_cross_lower_layers_and_top_third(transpose):
  metrics = {"vit_vs_resnet": {"mean_cka": 0.5}}
  arrays = {"cka_cross_vit_vs_resnet": _cross(1, 0.2)}
  if transpose:  # ResNet rows, ViT columns: the check orients the grid itself.
    metrics = {"resnet_vs_vit": {"mean_cka": 0.5}}
    arrays = {"cka_cross_resnet_vs_vit": {"mean": arrays["cka_cross_vit_vs_resnet"]["mean"].T}}
  assert _shown("cka_cross", metrics, arrays, "lower half") == [True]
  assert _shown("cka_cross", metrics, arrays, "top third") == [True]
  bad = _cross(7, 0.95)
  arrays = {k: ({"mean": bad["mean"].T} if transpose else bad) for k in arrays}
  assert _shown("cka_cross", metrics, arrays, "lower half") == [False]
  assert _shown("cka_cross", metrics, arrays, "top third") == [False]
  assert _shown("cka_cross", metrics, None) == [None, None]


def test_head_subsets_spearman_negative():
  good = {"vit_block00_vs_resnet": {"spearman": {"block1/unit01": -0.9, "block1/unit02": -0.2}}}
  bad = {"vit_block00_vs_resnet": {"spearman": {"block1/unit01": -0.9, "block1/unit02": 0.1}}}
  assert _shown("head_subsets", good) == [True]
  assert _shown("head_subsets", bad) == [False]


def _attn(lo, hi, last, u=100.0):
  return {"vit": {"uniform_attention": u, "block0_min_head": lo, "block0_max_head": hi,
                      "last_block_mean": last}}


def test_attention_distance_thresholds():
  assert _shown("attention_distance", _attn(20, 90, 95), match="spans") == [True]
  assert _shown("attention_distance", _attn(55, 90, 95), match="spans") == [False]  # not local
  assert _shown("attention_distance", _attn(20, 75, 95), match="spans") == [False]  # not global
  assert _shown("attention_distance", _attn(20, 90, 95), match="last") == [True]
  assert _shown("attention_distance", _attn(20, 90, 70), match="last") == [False]


def _rf(res_area, vit_area, centre):
  return {"resnet/post": {"layers": ["a"] * len(res_area), "area_fraction": res_area},
          "vit/post": {"layers": ["b"] * len(vit_area), "area_fraction": vit_area,
                       "centre_patch_mass": [0.5, centre]}}


def test_receptive_field_checks():
  # ViT-B_32 at 224 px: the centre patch is 1/49 of the image.
  good = _rf([0.01, 0.02, 0.05, 0.1], [0.2, 0.5], 0.1)
  bad = _rf([0.1, 0.05, 0.02, 0.01], [0.01, 0.5], 0.03)
  for match in ("grow", "larger", "centre"):
    assert _shown("receptive_field", good, match=match) == [True]
    assert _shown("receptive_field", bad, match=match) == [False]


def _skip_arrays(cls_early, cls_late, spatial=2.0):
  r = np.full((4, 5), spatial)  # [block/kind labels, tokens]; CLS is token 0
  r[:2, 0], r[2:, 0] = cls_early, cls_late
  labels = np.array(["block00/sa", "block00/mlp", "block01/sa", "block01/mlp"])
  return {"skip_norms": {"vit/ratio": r, "vit/labels": labels}}


def test_skip_norms_checks():
  metrics = {"vit": {"sa": {"ratio_mean": 30.0}, "mlp": {"ratio_mean": 10.0}},
             "resnet": {"unit": {"ratio_mean": 2.0}}}
  assert _shown("skip_norms", metrics, match="far above") == [True]
  metrics["resnet"]["unit"]["ratio_mean"] = 6.0
  assert _shown("skip_norms", metrics, match="far above") == [False]
  assert _shown("skip_norms", metrics, _skip_arrays(50, 0.5), "early") == [True]
  assert _shown("skip_norms", metrics, _skip_arrays(50, 0.5), "phase") == [True]
  assert _shown("skip_norms", metrics, _skip_arrays(1, 5), "early") == [False]
  assert _shown("skip_norms", metrics, _skip_arrays(1, 5), "phase") == [False]
  assert _shown("skip_norms", metrics, None, "early") == [None]


def test_skip_removal_accuracy_and_split():
  good = {"vit": {"skip_removed": []},
          "vit_noskip05": {"skip_removed": [5], "accuracy_drop": 0.04,
                           "split": {"contrast": 0.4}, "split_unmodified": {"contrast": 0.1}}}
  assert _shown("skip_removal", good) == [True, True]
  bad = {"vit_noskip05": {"skip_removed": [5], "accuracy_drop": -0.003,
                          "split": {"contrast": 0.12}, "split_unmodified": {"contrast": 0.1}}}
  f = findings.check_skip_removal(_run("skip_removal", bad))
  assert [x.shown for x in f] == [False, False] and f[0].measured == "drop -0.30 points"


def _loc_grid(own, other, g=4):
  m = np.full((g * g, g * g), other)
  np.fill_diagonal(m, own)
  return {"mean": m}


def test_localization_checks():
  metrics = {"vit/block11": {"own_contrast": 0.4, "own_is_best": 0.2, "grid": 4},
             "vit_gap/block11": {"own_contrast": 0.1, "grid": 4},
             "resnet/block4/unit03": {"own_contrast": 0.05, "grid": 4}}
  arrays = {"localization_vit_block11": _loc_grid(0.8, 0.3)}
  assert _shown("localization", metrics, arrays, "interior") == [True]
  assert _shown("localization", metrics, {"localization_vit_block11": _loc_grid(0.2, 0.3)},
                "interior") == [False]
  assert _shown("localization", metrics, None, "interior") == [False]  # own_is_best 0.2
  assert _shown("localization", metrics, match="GAP") == [True]
  assert _shown("localization", metrics, match="ResNet") == [True]
  metrics["vit_gap/block11"]["own_contrast"] = 0.5
  metrics["resnet/block4/unit03"]["own_contrast"] = 0.45
  assert _shown("localization", metrics, match="GAP") == [False]
  assert _shown("localization", metrics, match="ResNet") == [False]


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
  assert _shown("probe", good) == [True] * 5
  assert _shown("probe", bad) == [False] * 5


def test_dataset_scale_checks():
  good = {"vit_frac0.03": {"fraction": 0.03, "block_cka": [0.95, 0.9, 0.7, 0.4]},
          "vit_frac0.3": {"fraction": 0.3, "block_cka": [0.2, 0.2, 0.2, 0.2]},
          "vit_ft_c10": {"task": "cifar10", "block_cka": [0.99, 0.9, 0.8, 0.5]}}
  assert _shown("dataset_scale", good) == [True, True, True]  # the 3% model is the one checked
  bad = {"vit_frac0.03": {"fraction": 0.03, "block_cka": [0.5, 0.6, 0.7, 0.8]},
         "vit_ft_c10": {"task": "cifar10", "block_cka": [0.6, 0.9]}}
  assert _shown("dataset_scale", bad) == [False, False, False]


def test_check_covers_only_analyses_that_ran_and_absent_results_are_none():
  run = findings.SavedRun({"attention_distance": {}}, MODELS)
  out = findings.check(run)
  assert {f.analysis for f in out} == {"attention_distance"}
  assert [f.shown for f in out] == [None]
  assert len(findings.check(run, analyses=list(findings.CHECKS))) >= len(findings.CHECKS)
