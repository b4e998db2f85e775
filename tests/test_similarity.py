"""CKA heatmaps: known transforms, repeat statistics vs float64 NumPy, end to end, figures."""
import json
import os

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_analysis import models
from vit_analysis.analyses import base, head_subsets, similarity
from vit_analysis.input import data as data_lib
from vit_analysis.plotting import similarity as plots
from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka_runner, representations

_RNG = np.random.default_rng(0)
_Q, _ = np.linalg.qr(_RNG.normal(size=(48, 48)))       # orthogonal
_R = _RNG.normal(size=(48, 48)).astype(np.float32)     # mixing for the noise layer


class Transforms(nn.Module):
  """Layers that are known transforms of the (4x4x3) input; returns (logits, out) as models do."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    # Resize-free: any input size is average-pooled to 4x4 so both sides share the "same" input.
    b, h = images.shape[0], images.shape[1]
    x = images.reshape(b, 4, h // 4, 4, h // 4, 3).mean((2, 4)).reshape(b, 48)
    out = {}
    out["identity"] = x
    out["rotated"] = x @ jnp.asarray(_Q, jnp.float32)
    out["scaled"] = 3.7 * x.reshape(b, 16, 3) + 50.0  # isotropic scale and a feature offset
    # A fast-oscillating function of the input: statistically independent of its linear structure.
    out["noise"] = jnp.sin(30.0 * (x @ jnp.asarray(_R)))
    return x.sum(-1), out


def _source(n=128, size=8, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
  return data_lib.ArraySource(images, np.zeros(n, np.int64), 1)


def _loaded(module, size, key="m"):
  return helpers.loaded(module, size, key)


# ---- float64 NumPy reference, straight from docs/method.md#minibatch-cka ----

def _reference(feats_a, feats_b, indices, repeats):
  """feats_*: list of float64 [num_source, p] -> [R, A, B] minibatch CKA per repeat."""
  k = indices.shape[0] // repeats
  out = np.zeros((repeats, len(feats_a), len(feats_b)))
  for r in range(repeats):
    for i, fa in enumerate(feats_a):
      for j, fb in enumerate(feats_b):
        xy = xx = yy = 0.0
        for row in indices[r * k:(r + 1) * k]:
          ka, kb = fa[row] @ fa[row].T, fb[row] @ fb[row].T
          xy, xx, yy = xy + helpers.ref_hsic_unbiased(ka, kb), xx + helpers.ref_hsic_unbiased(ka, ka), yy + helpers.ref_hsic_unbiased(kb, kb)
        out[r, i, j] = xy / np.sqrt(xx * yy)
  return out


def _side(model, layers):
  return representations.Side(representations.model_feature_fn(model, layers), model.variables,
                         model.image_size, tuple(layers))


LAYERS = ["identity", "rotated", "scaled", "noise"]


def test_known_transforms_and_repeat_statistics_match_numpy():
  src = _source()
  model = _loaded(Transforms(), 8)
  # 6 minibatches per repeat on 4 devices: the second step is padded and masked.
  rep = cka_runner.cka_over_repeats(_side(model, LAYERS), None, src, num_examples=96,
                                    minibatch_size=16, repeats=3, seed=5,
                                    mesh=sharding.make_mesh())
  assert rep.values.shape == (3, 4, 4)
  mean = rep.mean
  np.testing.assert_allclose(np.diag(mean), 1.0, atol=1e-5)
  np.testing.assert_allclose(mean[0, 1], 1.0, atol=1e-5)  # orthogonal rotation
  np.testing.assert_allclose(mean[0, 2], 1.0, atol=1e-5)  # isotropic scaling + offset
  assert abs(mean[0, 3]) < 0.15                           # independent noise
  np.testing.assert_allclose(mean, mean.T, atol=1e-6)

  # Independent float64 computation on the same sample.
  images = data_lib.preprocess(src.images, 8)
  _, out = model.module.apply(model.variables, images)
  feats = [np.asarray(out[n], np.float64).reshape(len(images), -1) for n in LAYERS]
  indices = data_lib.cka_minibatch_indices(len(src), 96, 16, 3, 5)
  ref = _reference(feats, feats, indices, 3)
  np.testing.assert_allclose(rep.values, ref, atol=2e-5)
  np.testing.assert_allclose(rep.mean, ref.mean(0), atol=2e-5)
  np.testing.assert_allclose(rep.std, ref.std(0, ddof=1), atol=2e-5)
  assert np.all(rep.stderr >= 0)


def test_cross_model_each_side_own_resolution():
  src = _source(size=12)
  a, b = _loaded(Transforms(), 8), _loaded(Transforms(), 16)
  rep = cka_runner.cka_over_repeats(_side(a, ["identity", "noise"]), _side(b, LAYERS[:3]), src,
                                    num_examples=64, minibatch_size=16, repeats=2, seed=0,
                                    mesh=sharding.make_mesh())
  feats = {}
  for m in (a, b):
    _, out = m.module.apply(m.variables, data_lib.preprocess(src.images, m.image_size))
    feats[m.image_size] = {n: np.asarray(v, np.float64).reshape(len(src), -1)
                           for n, v in out.items()}
  indices = data_lib.cka_minibatch_indices(len(src), 64, 16, 2, 0)
  ref = _reference([feats[8]["identity"], feats[8]["noise"]],
                   [feats[16][n] for n in LAYERS[:3]], indices, 2)
  np.testing.assert_allclose(rep.values, ref, atol=2e-5)
  assert rep.values.shape == (2, 2, 3)


def test_presets_select_paper_granularity():
  vit = _loaded(models.create_model("ViT-smoke_8", 10), 32)
  fine = representations.resolve_layers(vit, "fine")
  assert len(fine) == 2 + 6 * vit.module.num_layers
  assert fine[:3] == ["embedding", "block00/ln0", "block00/sa"] and fine[-1] == "encoder_norm"
  assert len(representations.resolve_layers(vit, "coarse")) == 2 + 4 * vit.module.num_layers
  assert representations.resolve_layers(vit, "blocks") == [
      f"block{i:02d}" for i in range(vit.module.num_layers)]
  # Paper totals (docs/method.md#presets): B/32 fine 74, coarse 50; R50 fine 118 (7 per unit, +proj, root).
  b32 = base.LoadedModel("b", "ViT-B_32", models.create_model("ViT-B_32", 10), None, 224)
  assert len(representations.resolve_layers(b32, "fine")) == 74
  assert len(representations.resolve_layers(b32, "coarse")) == 50
  # ResNet: root (2) + 7 per unit + a projection in each stage's first unit (R50: 118);
  # coarse 2 per unit (R50: 32, Fig H.2's axis). R-smoke has one unit per stage.
  rs = base.LoadedModel("r", "R-smoke", models.create_model("R-smoke", 10), None, 32)
  assert len(representations.resolve_layers(rs, "fine")) == 2 + 4 * 7 + 4
  assert len(representations.resolve_layers(rs, "coarse")) == 2 * 4
  mixer = base.LoadedModel("x", "Mixer", models.create_model("Mixer-smoke_8", 10), None, 32)
  assert mixer.info.layer_presets == "mixer"
  assert representations.resolve_layers(mixer, "coarse")[:3] == [
      "stem", "block00/ln0", "block00/+token"]
  with pytest.raises(KeyError):
    representations.resolve_layers(vit, "medium")
  with pytest.raises(KeyError):
    representations.resolve_layers(vit, ["block*/nonexistent"])


def test_token_modes():
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  np.testing.assert_array_equal(representations.token_features(x, "cls_only", True), x[:, 0])
  np.testing.assert_array_equal(representations.token_features(x, "exclude_cls", True), x[:, 1:])
  np.testing.assert_allclose(representations.token_features(x, "token_mean", False), x.mean(1))
  with pytest.raises(ValueError):
    representations.token_features(x, "cls_only", False)


def test_head_subsets_windows_and_cumulative():
  dist = np.array([50.0, 10.0, 90.0, 30.0])
  assert head_subsets.head_subsets(dist) == [(1, 3), (3, 0), (0, 2)]
  assert head_subsets.head_subsets(dist, "cumulative", 3) == [(1, 3, 0), (1, 3, 0, 2)]
  with pytest.raises(ValueError):
    head_subsets.head_subsets(dist, "window", 5)
  assert head_subsets.spearman(np.arange(4.0), -np.arange(4.0) ** 2) == pytest.approx(-1.0)


def test_end_to_end_intra_cross_and_head_subsets(tmp_path):
  ms = {"vit": _loaded(models.create_model("ViT-smoke_8", 10), 32, "vit"),
        "resnet": _loaded(models.create_model("R-smoke", 10), 32, "resnet")}
  src = _source(n=64, size=28, seed=3)
  ctx = base.Context(workdir=str(tmp_path), models=ms, sources={"test": src, "train": src},
                     mesh=sharding.make_mesh())
  settings = dict(num_examples=32, minibatch_size=8, repeats=2, split="test")
  config = ml_collections.ConfigDict(dict(
      seed=0, analyses=("cka_intra", "cka_cross", "head_subsets"),
      cka_intra=dict(models=("vit",), layers="fine", **settings),
      cka_cross=dict(pairs=(("vit", "resnet"),), layers="blocks", **settings),
      # Fig 5 compares with a ResNet; a second ViT keeps this test to one ResNet compile.
      head_subsets=dict(pairs=(("vit", "vit"),), blocks=(0,), distance_examples=16,
                        num_units=2, **settings)))
  for name in config.analyses:
    result = helpers.run_analysis(name, config, ctx)
    assert result.figures, name
    for fig in result.figures:
      assert os.path.exists(os.path.join(ctx.workdir, fig))
      assert os.path.exists(os.path.join(ctx.workdir, fig[:-4] + ".pdf"))
    with open(os.path.join(ctx.workdir, "results", f"{name}.json")) as f:
      assert json.load(f)["name"] == name
  stem = os.path.join(ctx.workdir, "results", "cka_intra_vit")
  rep = cka_runner.RepeatedCKA.load(stem)
  np.testing.assert_allclose(np.diag(rep.mean), 1.0, atol=1e-4)
  assert rep.values.shape[0] == 2 and len(rep.names_a) == 2 + 6 * 2
  # Redrawing from the saved arrays needs no model.
  assert similarity.draw(stem, "redrawn", "ViT", "ViT").axes
  cross = cka_runner.RepeatedCKA.load(os.path.join(ctx.workdir, "results",
                                                   "cka_cross_vit_vs_resnet"))
  assert cross.mean.shape == (2, 4) and cross.names_b[0] == "block1/unit01"
  assert np.all(np.abs(cross.mean) <= 1.0 + 1e-5)
  heads = result.metrics["vit_block00_vs_vit"]
  assert heads["subsets"] == [[int(np.argmin(heads["head_distance"]))],
                              [int(np.argmax(heads["head_distance"]))]]


def test_plot_ticks_and_shapes():
  names = ["embedding"] + [f"block{i:02d}/{s}" for i in range(3) for s in ("ln0", "+sa")]
  positions, labels = plots.layer_ticks(names)
  assert positions == [0, 1, 3, 5] and labels == ["emb", "B0", "B1", "B2"]
  assert plots.layer_group("block3/unit02/conv_a") == "b3u2"
  fig = plots.cka_heatmap(np.eye(7), row_names=names, col_names=names, spread=np.zeros((7, 7)))
  assert len(fig.axes) == 4  # two panels, two colour bars
  with pytest.raises(ValueError):
    plots.cka_heatmap(np.eye(7), row_names=names[:3])


def test_localization_and_line_figures():
  fig = plots.localization_maps(np.full((3, 4, 4), np.nan), [(0, 0), (1, 1), (2, 3)], vmax=1.0)
  assert len(fig.axes) == 4  # three panels, one shared colour bar
  with pytest.raises(ValueError):
    plots.localization_maps(np.zeros((2, 4, 4)), [(0, 0)])
  fig = plots.per_block_lines({"3%": np.array([0.9, 0.5])}, block_labels=["B0", "B1"],
                              errors={"3%": np.array([0.01, 0.02])})
  assert fig.axes[0].get_ylim() == (0.0, 1.0)
  fig = plots.head_subset_lines(np.array([10.0, 20.0]), np.array([[0.5, 0.4]]),
                                layer_names=["block1/unit01"])
  assert len(fig.axes[0].get_lines()) >= 1
  with pytest.raises(ValueError):
    plots.head_subset_lines(np.array([10.0]), np.zeros((1, 2)), layer_names=["x"])


def test_measures_and_null_from_the_same_pass_on_1_and_4_devices():
  src = _source()
  model = _loaded(Transforms(), 8)
  side = _side(model, LAYERS)
  common = dict(num_examples=64, minibatch_size=16, repeats=2, seed=1)
  plain = cka_runner.cka_over_repeats(side, None, src, mesh=sharding.make_mesh(), **common)
  runs = [cka_runner.cka_over_repeats(
      side, None, src, mesh=sharding.make_mesh(devices), measures=(
          "linear_cka", "rbf_cka", "procrustes", "mutual_knn"), null_permutations=4, **common)
      for devices in (jax.devices()[:1], jax.devices())]
  rep = runs[1]
  # Linear CKA is the same with or without the other measures, and on 1 or 4 devices.
  np.testing.assert_allclose(rep.values, plain.values, rtol=0, atol=1e-6)
  for a, b in zip(runs[0].arrays().items(), rep.arrays().items()):
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6, err_msg=a[0])
  # Rotations and an isotropic scale + offset of the same features: every measure says 1.
  i, r, s = LAYERS.index("identity"), LAYERS.index("rotated"), LAYERS.index("scaled")
  for name in ("rbf_cka", "procrustes", "mutual_knn"):
    v = rep.measures[name]["values"].mean(0)
    np.testing.assert_allclose([v[i, i], v[i, r], v[i, s]], 1.0, atol=1e-4, err_msg=name)
    assert np.all((v >= -1e-5) & (v <= 1 + 1e-5)), name
  arrays = rep.arrays()
  assert arrays["cka_null_z"][i, r] > 5 and abs(arrays["cka_null_mean"][i, r]) < 0.2
  assert arrays["procrustes_null_z"].shape == (4, 4)
  # The null of the mean over repeats: permutation p's value averaged over the repeats, so its
  # mean over permutations is the repeats' mean null; p-values count it (add-one).
  for name in ("cka", "procrustes"):
    null = arrays[f"{name}_null_values"]
    assert null.shape == (4, 4, 4)
    np.testing.assert_allclose(null.mean(0), arrays[f"{name}_null_mean"], rtol=1e-10, atol=1e-12)
    mean = arrays["mean" if name == "cka" else f"{name}_mean"]
    count = sum((null[k] >= mean).astype(int) for k in range(4))
    np.testing.assert_array_equal(arrays[f"{name}_null_p"], (1 + count) / 5)
  assert arrays["cka_null_p"][i, r] == pytest.approx(1 / 5)
  with pytest.raises(ValueError, match="unknown measures"):
    cka_runner.cka_over_repeats(side, None, src, mesh=sharding.make_mesh(),
                                measures=("cca",), **common)


def test_measure_results_save_load_and_summary(tmp_path):
  src = _source()
  model = _loaded(Transforms(), 8)
  rep = cka_runner.cka_over_repeats(_side(model, LAYERS), None, src, mesh=sharding.make_mesh(),
                                    num_examples=32, minibatch_size=16, repeats=1, seed=0,
                                    measures=("linear_cka", "procrustes"), null_permutations=2)
  stem = str(tmp_path / "rep")
  rep.save(stem)
  again = cka_runner.RepeatedCKA.load(stem)
  for k, v in rep.arrays().items():
    np.testing.assert_array_equal(again.arrays()[k], v, err_msg=k)
  summary = similarity.measure_summary(rep, intra=True)
  assert set(summary["measure_agreement"]) == {"linear_cka ~ procrustes"}
  assert -1 <= summary["measure_agreement"]["linear_cka ~ procrustes"] <= 1
  assert len(summary["measure_disagreements"]) == 5
  assert set(summary["cells_above_null"]) == {"linear_cka", "procrustes"}
  pairs = len(LAYERS) * (len(LAYERS) - 1) // 2
  assert summary["cells_above_null"]["linear_cka"].endswith(f"of {pairs}")
  # 2 permutations: the smallest p-value is 1/3, so BH over the heatmap can call nothing.
  assert "use null_permutations >= " in summary["null_too_few_permutations"]
  fig = similarity.draw_measures(stem, "t", "a", "a", True)
  assert len(fig.axes) >= 2


def test_summary_counts_cells_carried_by_one_minibatch():
  values = np.full((2, 2, 3), 0.5)
  stderr = np.full((2, 2, 3), 0.01)
  loo = np.full((2, 2, 3), 0.02)
  loo[1, 0, 2] = 0.05  # > 3 standard errors in repeat 2 only
  rep = cka_runner.RepeatedCKA(["a0", "a1"], ["b0", "b1", "b2"], values, stderr, 64, 16,
                               max_leave_one_out=loo)
  out = similarity.summary(rep)
  assert out["cells_moved_by_one_minibatch"] == 1
  assert out["max_leave_one_out"] == pytest.approx(0.05)
  assert "max_leave_one_out" in rep.arrays()


def test_a_distance_agrees_with_its_similarity_in_the_summary():
  rng = np.random.default_rng(0)
  sim = rng.uniform(0.1, 0.9, (1, 3, 4))
  measures = {"procrustes": {"values": sim, "stderr": sim * 0},
              "procrustes_distance": {"values": np.arccos(sim), "stderr": sim * 0}}
  rep = cka_runner.RepeatedCKA(["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"], sim, sim * 0, 64,
                               16, measures=measures)
  out = similarity.measure_summary(rep, intra=False)
  assert out["measure_agreement"]["procrustes ~ procrustes_distance"] == pytest.approx(1.0)
  d = out["measure_disagreements"][0]
  i, j = ["a0", "a1", "a2"].index(d["a"]), ["b0", "b1", "b2", "b3"].index(d["b"])
  assert d["value"]["procrustes_distance"] == pytest.approx(np.arccos(sim[0, i, j]))


class _Widths(nn.Module):
  """Layers of 5, 96 (as [8, 12]) and 48 features per example."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    x = images.reshape(images.shape[0], -1)[:, :48]
    out = {"narrow": x[:, :5], "wide": jnp.concatenate([x, -x], -1).reshape(-1, 8, 12),
           "middle": x}
    return x.sum(-1), out


def test_widest_is_the_largest_flattened_feature_of_a_side():
  model = _loaded(_Widths(), 8)
  assert similarity.widest(_side(model, ["narrow", "wide", "middle"]), 4) == 96
  assert similarity.widest(_side(model, ["narrow", "middle"]), 4) == 48
  assert similarity.widest(_side(model, ["narrow"]), 4) == 5
