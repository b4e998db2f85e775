"""Attention distance: closed forms, a float64 reference, the analysis end to end."""
import numpy as np
import pytest
from helpers import FAST, make_context, run_analysis

from vit_analysis.models import attention as ad


def _uniform(b, h, n, cls):
  t = n + int(cls)
  return np.full((b, h, t, t), 1.0 / t, np.float32)


@pytest.mark.parametrize("g,p,expected", [(7, 32, 115.503), (14, 16, 116.492), (16, 14, 116.565)])
def test_uniform_attention_matches_paper_reference(g, p, expected):
  # Known values (docs/method.md#attention-distance): uniform attention over the patch grid, CLS excluded, self-pairs included.
  a = _uniform(1, 2, g * g, cls=False)
  d = np.asarray(ad.mean_attention_distance(a, (g, g), p, has_cls=False))
  assert d.shape == (1, 2)
  np.testing.assert_allclose(d, expected, atol=2e-3)


def test_uniform_with_cls_renormalised_equals_patch_uniform():
  a = _uniform(2, 3, 49, cls=True)
  d = np.asarray(ad.mean_attention_distance(a, (7, 7), 32, has_cls=True, renormalize=True))
  np.testing.assert_allclose(d, 115.503, atol=2e-3)
  # Without renormalisation the CLS mass (1/50) is simply lost.
  d = np.asarray(ad.mean_attention_distance(a, (7, 7), 32, has_cls=True))
  np.testing.assert_allclose(d, 115.503 * 49 / 50, atol=2e-3)


def test_self_attention_only_is_zero():
  a = np.broadcast_to(np.eye(17, dtype=np.float32), (2, 4, 17, 17))
  d = np.asarray(ad.mean_attention_distance(a, (4, 4), 16, has_cls=True))
  np.testing.assert_array_equal(d, 0.0)


def test_random_weights_match_float64_reference():
  rng = np.random.default_rng(0)
  gh, gw, p = 3, 5, 8
  logits = rng.normal(size=(2, 3, gh * gw + 1, gh * gw + 1))
  a = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ref = np.zeros((2, 3))
  for b in range(2):
    for h in range(3):
      for q in range(gh * gw):
        for k in range(gh * gw):
          dq = np.array(divmod(q, gw)) - np.array(divmod(k, gw))  # Row-major (row, col).
          ref[b, h] += a[b, h, q + 1, k + 1] * p * np.sqrt((dq ** 2).sum())
  ref /= gh * gw
  d = np.asarray(ad.mean_attention_distance(a.astype(np.float32), (gh, gw), p, has_cls=True))
  np.testing.assert_allclose(d, ref, rtol=1e-5)


def test_shape_errors():
  with pytest.raises(ValueError, match="needs 17"):
    ad.mean_attention_distance(np.zeros((1, 1, 16, 16)), (4, 4), 8, has_cls=True)
  with pytest.raises(ValueError, match=r"\[b, H, T, T\]"):
    ad.mean_attention_distance(np.zeros((1, 16, 16)), (4, 4), 8, has_cls=False)
  with pytest.raises(KeyError, match="attn_weights"):
    ad.block_attention_distances({"block00/sa": np.zeros(1)}, (4, 4), 8, has_cls=False)


def test_run_matches_direct_computation_on_all_images(tmp_path):
  import jax
  import ml_collections

  from vit_analysis.input import data
  ctx = make_context(tmp_path, {"m0": "ViT-smoke_8", "m1": "ViT-smoke_8-gap"})
  config = ml_collections.ConfigDict({"attention_distance": {
      "split": "test", "num_images": 7, "batch_size": 4, "seed": 3,
      "figure_formats": ("png",), "fast_compile": True}})  # 7 = 4 + 3 padded.
  result = run_analysis("attention_distance", config, ctx)
  saved = np.load(tmp_path / "results" / "attention_distance.npz")
  assert sorted(saved.files) == ["m0", "m1"]
  saved_se = np.load(tmp_path / "results" / "attention_distance_stderr.npz")
  for key, has_cls in (("m0", True), ("m1", False)):
    m = ctx.models[key]
    idx = np.random.default_rng(3).permutation(10)[:7]
    images = data.preprocess(np.stack([ctx.sources["test"][int(i)]["image"] for i in idx]), 32)
    _, out = jax.jit(lambda v, x, m=m: m.module.apply(v, x, train=False)).lower(
        m.variables, images).compile(FAST)(m.variables, images)
    per_image = np.stack([np.asarray(ad.mean_attention_distance(
        out[f"block{b:02d}/attn_weights"], (4, 4), 8, has_cls=has_cls), np.float64)
        for b in range(2)], axis=1)  # [7, L, H]
    direct = per_image.mean(0)
    assert saved[key].shape == (2, 2)
    np.testing.assert_allclose(saved[key], direct, rtol=1e-4)
    # Error bars: the SE over the 7 images (padding excluded), per head and of the head mean.
    se = per_image.std(0, ddof=1) / np.sqrt(7)
    np.testing.assert_allclose(saved_se[key], se, rtol=2e-3)
    m = result.metrics[key]
    lo, hi = np.argmin(direct[0]), np.argmax(direct[0])
    np.testing.assert_allclose([m["block0_min_head_stderr"], m["block0_max_head_stderr"]],
                               [se[0, lo], se[0, hi]], rtol=2e-3)
    np.testing.assert_allclose(m["last_block_mean_stderr"],
                               per_image[:, -1].mean(1).std(ddof=1) / np.sqrt(7), rtol=2e-3)
    assert m["uncertainty_over"] == "images (n=7)"
    # Random init attends almost uniformly: close to uniform attention's distance (CLS mass lost).
    assert 0.5 * 8 * 1.8 < saved[key].mean() < 8 * 2.5
  assert result.metrics["m0"]["num_images"] == 7
  assert all((tmp_path / f).exists() for f in result.figures)
  assert (tmp_path / "results" / "attention_distance.json").exists()
