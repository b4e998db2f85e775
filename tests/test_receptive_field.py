"""Effective receptive fields: a 3x3 conv's exact support and values, summaries, a ViT's reach."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.analyses import receptive_field as rf


def _conv(kernel):
  def fn(x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return rf.centre_activations(y)
  return fn


@pytest.mark.parametrize("per_channel", [True, False])
def test_single_conv_erf_is_its_kernel_on_a_3x3_support(per_channel):
  rng = np.random.default_rng(0)
  kernel = rng.uniform(0.5, 1.5, size=(3, 3, 3, 5)) * rng.choice([-1, 1], size=(3, 3, 3, 5))
  images = jnp.asarray(rng.normal(size=(4, 9, 9, 3)), jnp.float32)
  mask = jnp.asarray([1, 1, 1, 0], jnp.float32)  # The padded 4th image must not count.
  erf = np.asarray(jax.jit(lambda x, m: rf.erf_sum(
      _conv(jnp.asarray(kernel, jnp.float32)), x, m, per_channel=per_channel,
      channel_chunk=2))(images, mask))
  assert erf.shape == (9, 9)
  support = np.zeros((9, 9), bool)
  support[3:6, 3:6] = True  # Centre (4, 4) +- 1.
  np.testing.assert_array_equal(erf != 0, support)
  # dy[4,4,c]/dx[u,v,i] = K[u-3, v-3, i, c] (cross-correlation), the same for every image.
  if per_channel:
    ref = np.abs(kernel).mean(axis=(2, 3))
  else:
    ref = np.abs(kernel.mean(axis=3)).mean(axis=2)
  np.testing.assert_allclose(erf[3:6, 3:6], 3 * ref, rtol=1e-5)


def test_centre_of_tokens_and_maps():
  tokens = jnp.arange(2 * 17 * 1, dtype=jnp.float32).reshape(2, 17, 1)
  # 4x4 grid with CLS; on a 2x8 grid, centre (1, 4) is patch 12 = token 13.: centre (2, 2) is patch 10, token 11.
  np.testing.assert_array_equal(rf.centre_activations(tokens, has_cls=True)[:, 0], [11, 28])
  np.testing.assert_array_equal(
      rf.centre_activations(tokens[:, 1:], grid=(2, 8))[:, 0], [13, 30])
  fmap = jnp.zeros((1, 5, 6, 2)).at[0, 2, 3].set(1.0)
  np.testing.assert_array_equal(rf.centre_activations(fmap), [[1.0, 1.0]])
  with pytest.raises(ValueError, match="square"):
    rf.centre_activations(tokens[:, :15])
  with pytest.raises(ValueError, match="does not match"):
    rf.centre_activations(tokens, grid=(3, 3), has_cls=True)


def test_mass_summaries():
  local = np.zeros((32, 32))
  local[15:18, 15:18] = 1.0
  assert rf.mass_area_fraction(local, 0.5) == 5 / 1024  # 4.5 of 9 equal pixels -> 5 pixels.
  assert rf.mass_area_fraction(np.ones((32, 32)), 0.5) == 0.5
  assert rf.mass_radius(local, 0.5) == pytest.approx(1.0)
  assert rf.mass_radius(np.ones((31, 31)), 0.5) > 8
  with pytest.raises(ValueError, match="NaN"):
    rf.mass_area_fraction(np.full((2, 2), np.nan))


def test_several_layers_in_one_pass_equal_separate_passes():
  rng = np.random.default_rng(1)
  k1 = jnp.asarray(rng.normal(size=(3, 3, 3, 3)), jnp.float32)
  k2 = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  both = lambda x: {"a": rf.centre_activations(conv(x, k1)),
                    "b": rf.centre_activations(conv(jnp.tanh(conv(x, k1)), k2))}
  images = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)

  def all_variants(x):  # One program: both modes, together and one layer at a time.
    return {(pc, name): (rf.erf_sum(both, x, per_channel=pc, channel_chunk=2)[name],
                         rf.erf_sum(lambda y, name=name: both(y)[name], x, per_channel=pc))
            for pc in (True, False) for name in ("a", "b")}

  for (_, name), (together, alone) in jax.jit(all_variants)(images).items():
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-7)
    assert np.count_nonzero(together) == (9 if name == "a" else 25)  # 3x3, then 5x5 support.


def test_run_vit_first_block_is_global_and_resnet_stem_is_local(tmp_path):
  import ml_collections
  from helpers import make_context, run_analysis

  ctx = make_context(tmp_path, {"vit": "ViT-smoke_8", "resnet": "R-smoke"}, num_images=6)
  config = ml_collections.ConfigDict({"receptive_field": {
      "num_images": 3, "batch_size": 4, "channel_chunk": 16, "figure_formats": ("png",),
      "modes": ("post",),
      "layers": {"vit": ["embedding", "block00/+sa"], "resnet": ["root/conv"]}}})
  result = run_analysis("receptive_field", config, ctx)
  erfs = np.load(tmp_path / "results" / "receptive_field.npz")
  centre_patch = np.zeros((32, 32), bool)
  centre_patch[16:24, 16:24] = True  # 4x4 grid of 8 px patches: centre token (2, 2).
  # The patch embedding only sees its own patch; after one attention layer every pixel matters.
  np.testing.assert_array_equal(erfs["vit/post/embedding"] > 0, centre_patch)
  assert np.mean(erfs["vit/post/block00/+sa"][~centre_patch] > 0) > 0.99
  # ... but the skip connection keeps a peak on the centre patch.
  sa = erfs["vit/post/block00/+sa"]
  assert sa[centre_patch].mean() > 3 * sa[~centre_patch].mean()
  stem = np.zeros((32, 32), bool)
  stem[15:18, 15:18] = True  # R-smoke's small stem is one 3x3 conv; centre (16, 16).
  np.testing.assert_array_equal(erfs["resnet/post/root/conv"] > 0, stem)
  m = result.metrics["vit/post"]
  assert m["layers"] == ["embedding", "block00/+sa"]
  assert m["centre_patch_mass"][0] == pytest.approx(1.0)
  assert m["area_fraction"][0] <= 64 / 1024 < m["area_fraction"][1]
  assert len(result.figures) == 2 and all((tmp_path / f).exists() for f in result.figures)
  # Error bars over the 3 images, from each image's own ERF (its full Jacobian) in NumPy.
  from vit_analysis.input import data
  model = ctx.models["vit"]
  idx = np.random.default_rng(0).permutation(6)[:3]
  images = data.preprocess(np.stack([ctx.sources["test"][int(i)]["image"] for i in idx]), 32)
  jacobian = jax.jit(jax.jacrev(lambda y: rf.centre_activations(model.module.apply(
      model.variables, y[None], train=False)[1]["block00/+sa"], has_cls=True)[0]))
  maps = np.stack([np.abs(np.asarray(jacobian(x), np.float64)).mean(axis=(0, 3))
                   for x in images])  # [3, 32, 32]
  area = np.array([rf.mass_area_fraction(e, 0.5) for e in maps])
  se = lambda x: x.std(ddof=1) / np.sqrt(3)
  assert m["uncertainty_over"] == "images (n=3)"
  np.testing.assert_allclose(m["area_fraction_per_image"][1], area.mean(), atol=1 / 1024)
  np.testing.assert_allclose(m["area_fraction_per_image_stderr"][1], se(area), atol=1 / 1024)
  assert m["area_fraction_per_image_stderr"][0] == pytest.approx(0.0, abs=1e-9)  # linear embedding
  c, t = maps[:, 16:24, 16:24].sum((1, 2)), maps.sum((1, 2))
  share = c.sum() / t.sum()
  np.testing.assert_allclose(m["centre_patch_mass"][1], share, rtol=1e-4)
  np.testing.assert_allclose(m["centre_patch_mass_stderr"][1],
                             np.sqrt(((c - share * t) ** 2).sum() / 6) / t.mean(), rtol=1e-3)
  assert result.metrics["resnet/post"]["lower_half_area_per_image_stderr"] == pytest.approx(
      0.0, abs=1e-9)  # one linear conv: every image has the same ERF


def test_per_image_summaries_and_their_standard_errors_match_numpy():
  # conv -> tanh -> conv: every image has its own ERF (a linear conv would give identical ones).
  rng = np.random.default_rng(3)
  k1 = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  k2 = jnp.asarray(rng.normal(size=(3, 3, 4, 3)), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  centre = lambda x: rf.centre_activations(conv(jnp.tanh(2 * conv(x, k1)), k2))
  images = jnp.asarray(rng.normal(size=(5, 8, 8, 3)), jnp.float32)
  mask = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)
  maps, stats = jax.jit(lambda x, m: (lambda e: (e, rf.image_statistics(e, 0.5, 4)))(
      rf.erf_maps(centre, x, m, channel_chunk=2)))(images, mask)
  # Independent per-image ERFs: the full Jacobian of one image's centre channels.
  jacobian = jax.jit(jax.jacrev(lambda y: centre(y[None])[0]))  # [c, H, W, 3]
  ref = np.stack([np.abs(np.asarray(jacobian(images[i]), np.float64)).mean(axis=(0, 3))
                  for i in range(4)])
  np.testing.assert_allclose(np.asarray(maps)[:4], ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(maps)[4], 0.0)  # padding
  area = np.array([rf.mass_area_fraction(e, 0.5) for e in ref])
  assert len(set(area)) > 1  # the images' areas differ: a spread to measure
  np.testing.assert_allclose(np.asarray(stats["area"])[:4], area)
  c, t = ref[:, 4:8, 4:8].sum((1, 2)), ref.sum((1, 2))  # centre patch of a 2x2 grid of 4 px
  np.testing.assert_allclose(np.asarray(stats["centre"])[:4], c, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["total"])[:4], t, rtol=1e-5)
  # The centre share of the mean ERF, sum C / sum T, and its delta-method SE over 4 images.
  share = c.sum() / t.sum()
  se = np.sqrt(((c - share * t) ** 2).sum() / (4 * 3)) / t.mean()
  got = rf.ratio_stderr(c.sum(), t.sum(), (c * c).sum(), (t * t).sum(), (c * t).sum(), 4)
  np.testing.assert_allclose(got, se, rtol=1e-9)
  # Exact for a ratio that is the same on every image; NaN for one image.
  assert rf.ratio_stderr(2 * t.sum(), t.sum(), 4 * (t * t).sum(), (t * t).sum(),
                         2 * (t * t).sum(), 4) == pytest.approx(0.0, abs=1e-12)
  assert np.isnan(rf.ratio_stderr(1.0, 2.0, 1.0, 4.0, 2.0, 1))
