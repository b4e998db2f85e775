"""Skip/branch norm ratios and cosines: closed forms, float64 reference, pairing, end to end."""
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.analyses import skip_norms as sn


def test_identity_branch_is_one_and_zero_branch_is_flagged_infinite():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  np.testing.assert_allclose(sn.norm_ratio(z, z), 1.0, rtol=1e-6)
  r = np.asarray(sn.norm_ratio(z, jnp.zeros_like(z)))
  assert np.all(np.isposinf(r)) and not np.any(np.isnan(r))
  # Through the streaming statistics: a dead branch is +inf and counted, never NaN.
  out = {"z": z, "id": z, "dead": jnp.zeros_like(z)}
  mask = jnp.asarray([1.0, 1.0, 0.0])
  sums = sn.pair_statistics(out, [("id", "z", "id"), ("dead", "z", "dead")], mask)
  res = sn.finalize({k: np.asarray(v) for k, v in sums.items()})
  np.testing.assert_allclose(res["ratio"][0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(res["cos_out"][0], 1.0, rtol=1e-6)  # cos(z, 2z) = 1.
  assert np.all(np.isposinf(res["ratio"][1]))
  np.testing.assert_array_equal(res["num_infinite"], [[0] * 5, [2] * 5])  # Padding not counted.
  np.testing.assert_array_equal(res["cos_branch"][1], 0.0)
  assert np.all(np.isposinf(sn.finalize({k: np.asarray(v) for k, v in sums.items()},
                                        "ratio_of_means")["ratio"][1]))


def test_statistics_match_float64_reference():
  rng = np.random.default_rng(1)
  z, f = rng.normal(size=(2, 4, 3, 3, 6)) * np.array([1.0, 0.3])[:, None, None, None, None]
  out = {"z": jnp.asarray(z, jnp.float32), "f": jnp.asarray(f, jnp.float32)}
  sums = sn.pair_statistics(out, [("u", "z", "f")], jnp.ones((4,)))
  res = sn.finalize({k: np.asarray(v) for k, v in sums.items()})
  zf, ff = z.reshape(4, -1), f.reshape(4, -1)
  ratio = np.linalg.norm(zf, axis=1) / np.linalg.norm(ff, axis=1)
  np.testing.assert_allclose(res["ratio"], [[ratio.mean()]], rtol=1e-5)
  cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  np.testing.assert_allclose(res["cos_out"], [[cos(zf, zf + ff).mean()]], rtol=1e-5)
  np.testing.assert_allclose(res["cos_branch"], [[cos(zf, ff).mean()]], rtol=1e-4, atol=1e-6)
  rom = sn.finalize({k: np.asarray(v) for k, v in sums.items()}, "ratio_of_means")["ratio"]
  np.testing.assert_allclose(rom, [[np.linalg.norm(zf, axis=1).mean()
                                    / np.linalg.norm(ff, axis=1).mean()]], rtol=1e-5)


def test_skip_pairs_from_names():
  vit = ["embedding", "block00/ln0", "block00/attn_weights", "block00/sa", "block00/+sa",
         "block00/ln2", "block00/mlp", "block00", "block01/sa", "block01/+sa", "block01/mlp",
         "block01", "encoder_norm"]
  assert sn.skip_pairs(vit) == [
      ("block00/sa", "embedding", "block00/sa"), ("block00/mlp", "block00/+sa", "block00/mlp"),
      ("block01/sa", "block00", "block01/sa"), ("block01/mlp", "block01/+sa", "block01/mlp")]
  resnet = ["root/conv", "root", "block1/unit01/preact_a", "block1/unit01/proj",
            "block1/unit01/conv_c", "block1/unit01", "block1/unit02/conv_c", "block1/unit02",
            "block2/unit01/proj", "block2/unit01/conv_c", "block2/unit01", "head_norm"]
  assert sn.skip_pairs(resnet) == [
      ("block1/unit01", "block1/unit01/proj", "block1/unit01/conv_c"),
      ("block1/unit02", "block1/unit01", "block1/unit02/conv_c"),
      ("block2/unit01", "block2/unit01/proj", "block2/unit01/conv_c")]
  with pytest.raises(KeyError, match="skip/branch"):
    sn.skip_pairs(["embedding", "encoder_norm"])
  with pytest.raises(ValueError, match="average"):
    sn.finalize({"count": 1}, "median")


def test_run_vit_with_dead_mlp_and_resnet_units(tmp_path):
  import jax
  import ml_collections
  from helpers import make_context, run_analysis

  from vit_analysis.input import data
  ctx = make_context(tmp_path, {"vit": "ViT-smoke_8", "resnet": "R-smoke"}, num_images=6)
  block = ctx.models["vit"].variables["params"]["Transformer"]["encoderblock_1"]["MlpBlock_3"]
  block["Dense_1"] = jax.tree.map(np.zeros_like, block["Dense_1"])  # Block 1's MLP outputs 0.
  config = ml_collections.ConfigDict({"skip_norms": {"num_images": 5, "batch_size": 4,
                                                  "figure_formats": ("png",),
                                                  "fast_compile": True}})
  result = run_analysis("skip_norms", config, ctx)
  res = np.load(tmp_path / "results" / "skip_norms.npz")
  assert list(res["vit/labels"]) == ["block00/sa", "block00/mlp", "block01/sa", "block01/mlp"]
  ratio = res["vit/ratio"]
  assert ratio.shape == (4, 17) and not np.isnan(ratio).any()
  assert np.all(np.isposinf(ratio[3])) and np.all(np.isfinite(ratio[:3]))
  np.testing.assert_array_equal(res["vit/num_infinite"][3], 5)  # Every image flagged, once.
  assert result.metrics["vit"]["num_infinite"] == 5 * 17
  assert result.metrics["vit"]["mlp"]["ratio_per_block"][1] == "inf"
  # ResNet units against a direct float64 computation on the same 5 images.
  m = ctx.models["resnet"]
  idx = np.random.default_rng(0).permutation(6)[:5]
  images = data.preprocess(np.stack([ctx.sources["test"][int(i)]["image"] for i in idx]), 32)
  _, out = jax.jit(lambda v, x: m.module.apply(v, x, train=False)).lower(
      m.variables, images).compile({"xla_backend_optimization_level": 0})(m.variables, images)
  labels = list(res["resnet/labels"])
  assert labels == ["block1/unit01", "block2/unit01", "block3/unit01", "block4/unit01"]
  per_image = []
  for i, unit in enumerate(labels):
    skip = out[f"{unit}/proj"] if f"{unit}/proj" in out else out[labels[i - 1]]
    z = np.asarray(skip, np.float64).reshape(5, -1)
    f = np.asarray(out[f"{unit}/conv_c"], np.float64).reshape(5, -1)
    per_image.append(np.linalg.norm(z, axis=1) / np.linalg.norm(f, axis=1))
    np.testing.assert_allclose(res["resnet/ratio"][i, 0], per_image[-1].mean(), rtol=1e-4)
  # Error bars over the 5 images: per unit, and of the mean over units (metrics).
  se = lambda x: x.std(-1, ddof=1) / np.sqrt(5)
  per_image = np.stack(per_image)  # [units, images]
  np.testing.assert_allclose(res["resnet/ratio_stderr"][:, 0], se(per_image), rtol=2e-3)
  unit = result.metrics["resnet"]["unit"]
  np.testing.assert_allclose(unit["ratio_per_block_stderr"], se(per_image), rtol=2e-3)
  np.testing.assert_allclose(unit["ratio_mean_stderr"], se(per_image.mean(0)), rtol=2e-3)
  assert result.metrics["resnet"]["uncertainty_over"] == "images (n=5)"
  # The dead MLP: no error bar for its blocks, nor for any average that includes them.
  mlp = result.metrics["vit"]["mlp"]
  assert mlp["ratio_mean_stderr"] is None and mlp["ratio_per_block_stderr"][1] is None
  assert mlp["ratio_per_block_stderr"][0] > 0
  assert result.metrics["vit"]["sa"]["ratio_mean_stderr"] > 0
  assert all((tmp_path / f).exists() for f in result.figures) and len(result.figures) == 4


def test_standard_errors_over_images_match_numpy():
  # 5 real images (the 6th is padding), 2 pairs, a prefix token and 4 patch tokens.
  rng = np.random.default_rng(2)
  z = rng.normal(size=(6, 5, 8))
  f = rng.normal(size=(2, 6, 5, 8)) * rng.uniform(0.2, 1.0, size=(2, 6, 5, 1))
  out = {"z": jnp.asarray(z, jnp.float32), "f0": jnp.asarray(f[0], jnp.float32),
         "f1": jnp.asarray(f[1], jnp.float32)}
  mask = jnp.asarray([1.0] * 5 + [0.0])
  sums = sn.pair_statistics(out, [("a", "z", "f0"), ("b", "z", "f1")], mask, num_prefix=1)
  res = sn.finalize({k: np.asarray(v) for k, v in sums.items()}, num_prefix=1)
  r = np.linalg.norm(z[None, :5], axis=-1) / np.linalg.norm(f[:, :5], axis=-1)  # [P, n, T]
  se = lambda x: x.std(axis=-1, ddof=1) / np.sqrt(5)  # over the last axis: images
  np.testing.assert_allclose(res["ratio"], r.mean(1), rtol=1e-5)
  np.testing.assert_allclose(res["ratio_stderr"], se(np.moveaxis(r, 1, -1)), rtol=1e-3)
  # Any average over pairs of all-token / CLS / after-prefix ratios, e.g. the CLS-minus-spatial
  # contrast over both pairs, and the all-token mean of pair b.
  contrast = (r[:, :, 0] - r[:, :, 1:].mean(-1)).mean(0)  # [n]
  w = np.zeros(6)
  w[[2, 3]], w[[4, 5]] = 0.5, -0.5
  np.testing.assert_allclose(sn.combination_stderr(res, w), se(contrast), rtol=1e-3)
  np.testing.assert_allclose(sn.combination_stderr(res, np.eye(6)[1]), se(r[1].mean(-1)),
                             rtol=1e-3)
  # A dead branch gives no error bar (never NaN in the sums, no silent 0).
  out["f1"] = jnp.zeros_like(out["f1"])
  dead = sn.finalize({k: np.asarray(v) for k, v in sn.pair_statistics(
      out, [("a", "z", "f0"), ("b", "z", "f1")], mask, num_prefix=1).items()}, num_prefix=1)
  assert np.isnan(sn.combination_stderr(dead, w))
  np.testing.assert_allclose(sn.combination_stderr(dead, np.eye(6)[0]), se(r[0].mean(-1)),
                             rtol=1e-3)
  assert np.all(np.isnan(dead["ratio_stderr"][1])) and np.all(np.isfinite(dead["ratio_stderr"][0]))
