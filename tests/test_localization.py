"""Localisation: tokens equal to their own input patch peak on the diagonal; end to end."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import run_analysis

from vit_analysis.analyses import base, localization
from vit_analysis.input import data as data_lib
from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka_runner, representations


class PatchTokens(nn.Module):
  """Layers built from the input patches: 'tokens' = each grid position's own patch,
  'shifted' = the patch one column to the right (cyclically), 'map' = an affine map of the own
  patch laid out as a [b, g, g, c] feature map. (CLS handling is `token_grid`'s, tested below.)"""
  patch: int = 4

  @nn.compact
  def __call__(self, images, train=False):
    del train
    grid = localization.input_patches(images, self.patch)  # [b, g, g, P*P*3]
    b, g = grid.shape[:2]
    tokens = lambda x: x.reshape(b, g * g, -1)  # noqa: E731
    out = {"tokens": tokens(grid), "shifted": tokens(jnp.roll(grid, -1, axis=2)),
           "map": 2.0 * grid + 1.0}
    return grid.sum((1, 2, 3)), out


def _source(n=64, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return data_lib.ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                              np.zeros(n, np.int64), 1)


def _loaded(module, size, key="m"):
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(0)
  # Random parameters of the right shapes; compiling `init` is slow on the loaded test machine.
  variables = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(max(np.prod(s.shape[:-1]), 1)))
      .astype(s.dtype), shapes)
  return base.LoadedModel(key, type(module).__name__, module, variables, size)


def test_input_patches_row_major():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  p = localization.input_patches(x, 2)
  assert p.shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(p[0, 0, 1], [2, 3, 6, 7])
  np.testing.assert_array_equal(p[1, 1, 0], 16 + np.array([8, 9, 12, 13]))
  with pytest.raises(ValueError):
    localization.input_patches(x, 3)


def test_synthetic_tokens_peak_at_their_own_patch():
  model = _loaded(PatchTokens(), 12)
  layers = ("tokens", "shifted", "map")
  sides = {layer: localization.sides(model, layer) for layer in layers}
  assert all(g == 3 and len(t.names) == 9 for t, _, g in sides.values())
  # All three layers in one pass (one compile): rows layer-major, 9 positions each.
  combined = representations.Side(
      lambda v, x: {f"{ly}/{n}": a for ly in layers
                    for n, a in sides[ly][0].features(v, x).items()},
      model.variables, 12, tuple(f"{ly}/{n}" for ly in layers for n in sides[ly][0].names))
  rep = cka_runner.cka_over_repeats(combined, sides["tokens"][1], _source(size=12),
                                    num_examples=64, minibatch_size=16, repeats=1, seed=0,
                                    mesh=sharding.make_mesh())
  own, shifted, feature_map = rep.mean[:9], rep.mean[9:18], rep.mean[18:]
  for m in (own, feature_map):  # tokens equal (up to an affine map) to their own patch
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)
    assert np.abs(m[~np.eye(9, dtype=bool)]).max() < 0.5
    s = localization.scores(m)
    assert s["own_is_best"] == 1.0 and s["own_rank"] == 0.0 and s["own_margin"] > 0.5
  s = localization.scores(shifted)
  assert s["own_is_best"] == 0.0 and s["own_margin"] < -0.5
  assert shifted[0, 1] == pytest.approx(1.0, abs=1e-5)  # token (0,0) is patch (0,1)


def test_token_grid_drops_prefix_tokens():
  x = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)  # 2 prefix tokens + a 2x2 grid
  g = localization.token_grid(x, 2)
  assert g.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(g[1, 1, 0], x[1, 2 + 2])
  assert localization.token_grid(jnp.zeros((1, 3, 3, 5)), 1).shape == (1, 3, 3, 5)
  with pytest.raises(ValueError, match="square grid"):
    localization.token_grid(x, 1)


def test_scores_closed_form():
  m = np.array([[0.9, 0.1, 0.2], [0.5, 0.4, 0.0], [0.1, 0.1, 0.3]])
  s = localization.scores(m)
  assert s["own_is_best"] == pytest.approx(2 / 3)
  assert s["own_rank"] == pytest.approx(1 / 3)
  assert s["own_margin"] == pytest.approx(((0.9 - 0.2) + (0.4 - 0.5) + (0.3 - 0.1)) / 3)
  assert s["own_contrast"] == pytest.approx(((0.9 - 0.15) + (0.4 - 0.25) + (0.3 - 0.1)) / 3)
  assert localization.default_tokens(7) == [(0, 0), (2, 1), (4, 2), (4, 4)]


def test_own_contrast_error_against_numpy_jackknife():
  from test_skip_removal import jackknife, synthetic_comparison

  from vit_analysis.similarity import cka_runner
  rep, ref = synthetic_comparison(np.random.default_rng(3), k=4, a=9, b=9)
  rep.values[:, :, 2] = ref["cka"][:, 2] = np.nan  # a constant input patch
  w = localization.contrast_weights(rep.mean)
  assert (np.nan_to_num(rep.mean) * w).sum() == pytest.approx(
      localization.scores(rep.mean)["own_contrast"], rel=1e-12)
  assert (w[2] == 0).all() and (w[:, 2] == 0).all()  # token 2's own patch is NaN: left out
  est = cka_runner.linear_estimate([(rep, w)])
  assert est["value"] == pytest.approx(localization.scores(ref["cka"])["own_contrast"], rel=1e-12)
  # Per token: own - mean of the finite others, averaged over the 8 tokens with a finite own.
  keep = [i for i in range(9) if i != 2]
  others = lambda i: [j for j in keep if j != i]  # noqa: E731
  loo = np.mean([ref["loo"][:, i, i] - ref["loo"][:, i, others(i)].mean(1) for i in keep], 0)
  assert est["stderr"] == pytest.approx(jackknife(loo), rel=1e-9)
  bound = sum(ref["se"][i, i] + ref["se"][i, others(i)].sum() / 7 for i in keep) / 8
  assert est["stderr"] < bound


def test_end_to_end(tmp_path):
  # The synthetic model keeps this to one cheap compile; the ViT/ResNet layer handling is the
  # same code (token_grid) exercised above, and the smoke config runs real models.
  ms = {"toy": _loaded(PatchTokens(), 12, "toy")}
  src = _source(n=48, size=12, seed=2)
  ctx = base.Context(str(tmp_path), ms, {"test": src, "train": src}, sharding.make_mesh())
  config = ml_collections.ConfigDict(dict(seed=0, localization=dict(
      models=("toy",), layers_per_model={"toy": "shifted"}, num_examples=32,
      minibatch_size=8, repeats=2, tokens=((0, 0), (1, 2)))))
  result = run_analysis("localization", config, ctx)
  assert len(result.figures) == 1
  assert os.path.exists(os.path.join(str(tmp_path), result.figures[0]))
  assert result.metrics["toy/shifted"]["own_is_best"] == 0.0
  assert result.metrics["toy/shifted"]["grid"] == 3
  saved = cka_runner.RepeatedCKA.load(os.path.join(str(tmp_path), "results",
                                                   "localization_toy_shifted"))
  assert saved.mean.shape == (9, 9) and saved.names_a[5] == "token1_2"
  assert saved.mean[5, 3] == pytest.approx(1.0, abs=1e-5)  # token (1,2) is patch (1,0)
  assert saved.values.shape[0] == 2
  # Two repeats: own_contrast's error is the spread of the per-repeat contrasts / sqrt(2).
  per_repeat = [localization.scores(v)["own_contrast"] for v in saved.values]
  m = result.metrics["toy/shifted"]
  assert m["own_contrast_stderr"] == pytest.approx(np.std(per_repeat, ddof=1) / np.sqrt(2),
                                                   rel=1e-9)
  assert m["own_contrast_over"] == "over 2 repeats" and m["own_contrast_stderr"] > 0


def test_constant_patches_left_out_and_scores_ignore_nan():
  images = np.random.default_rng(0).integers(0, 256, (20, 12, 12, 3), dtype=np.uint8)
  images[:, :4, :4] = 7  # patch (0, 0) constant
  images[:, 4:8, 4:8] = 0  # patch (1, 1) differs in one image of 20 only
  images[3, 5, 5] = 1
  src = data_lib.ArraySource(images, np.zeros(20, np.int64), 1)
  positions = localization.varying_positions(src, np.arange(20), 12, 3)
  assert len(positions) == 7 and (0, 0) not in positions and (1, 1) not in positions
  assert len(localization.varying_positions(src, np.arange(20), 12, 3, min_fraction=0.05)) == 8
  loo = np.arange(16.0).reshape(1, 4, 2, 2)  # [R, k, tokens, patches]
  rep = cka_runner.RepeatedCKA(["t0", "t1"], ["patch0_1", "patch1_1"], np.ones((1, 2, 2)),
                               np.zeros((1, 2, 2)), 8, 2, leave_one_out=loo)
  full = localization.expand_columns(rep, 2)
  assert np.isnan(full.values[0, :, 0]).all() and full.values[0, 0, 1] == 1.0
  # The leave-one-minibatch-out grids move with their columns.
  assert full.leave_one_out.shape == (1, 4, 2, 4) and np.isnan(full.leave_one_out[..., 0]).all()
  np.testing.assert_array_equal(full.leave_one_out[..., [1, 3]], loo)
  m = np.array([[np.nan, 0.2, 0.1], [np.nan, 0.5, 0.6], [np.nan, 0.1, 0.9]])
  s = localization.scores(m)
  assert s["tokens_scored"] == 2 and s["own_is_best"] == pytest.approx(0.5)
  assert s["own_margin"] == pytest.approx(((0.5 - 0.6) + (0.9 - 0.1)) / 2)
