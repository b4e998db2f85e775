"""cka_zoo: one pass for N models equals the separate cka_intra / cka_cross analyses; 1 vs 4
devices; resume after an interruption; the memory plan and its refusal."""
import json
import os

import helpers
import jax
import ml_collections
import numpy as np
import pytest
from test_similarity import LAYERS, Transforms, _side, _source

from vit_analysis.analyses import zoo
from vit_analysis.input import streaming
from vit_analysis.report import figures as report_figures
from vit_analysis.report import interactive
from vit_analysis.runtime import resume, sharding
from vit_analysis.similarity import cka_runner

PAIRS = [("s8", None), ("s12", None), ("s16", None), ("s8", "s12"), ("s8", "s16"),
         ("s12", "s16")]


def _sides():
  """Three sides at their own resolutions (three views of every image)."""
  return {f"s{size}": _side(helpers.loaded(Transforms(), size, f"s{size}"), LAYERS)
          for size in (8, 12, 16)}


def test_zoo_equals_separate_analyses(tmp_path):
  names = {"vit": "ViT-smoke_8", "vit_gap": "ViT-smoke_8-gap", "resnet": "R-smoke"}
  ctx = helpers.make_context(tmp_path, names, num_images=48)
  common = dict(num_examples=32, minibatch_size=8, repeats=2, split="test", layers="coarse",
                measures=("linear_cka", "mutual_knn"), measure_options={"mutual_knn": {"k": 3}},
                null_permutations=3)
  keys = tuple(names)
  config = ml_collections.ConfigDict(dict(
      seed=0, analyses=("cka_intra", "cka_cross", "cka_zoo"),
      cka_intra=dict(models=keys, **common),
      cka_cross=dict(pairs=(("vit", "vit_gap"), ("vit", "resnet"), ("vit_gap", "resnet")),
                     **common),
      cka_zoo=dict(models=keys, **common)))
  results = {n: helpers.run_analysis(n, config, ctx) for n in config.analyses}
  res = os.path.join(ctx.workdir, "results")
  tags = list(keys) + ["vit_vs_vit_gap", "vit_vs_resnet", "vit_gap_vs_resnet"]
  worst = 0.0
  for tag in tags:
    separate = "cka_intra" if "_vs_" not in tag else "cka_cross"
    want = np.load(os.path.join(res, f"{separate}_{tag}.npz"))
    got = np.load(os.path.join(res, f"cka_zoo_{tag}.npz"))
    assert sorted(got.files) == sorted(want.files), tag
    assert "cka_null_p" in got.files and "mutual_knn_null_values" in got.files
    for k in want.files:
      if want[k].dtype.kind in "fc":
        diff = np.nanmax(np.abs(got[k] - want[k])) if want[k].size else 0.0
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=f"{tag} {k}")
        worst = max(worst, float(diff))
      else:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{tag} {k}")
    with open(os.path.join(res, f"cka_zoo_{tag}.json")) as f:
      assert json.load(f)["null"] is True
  print(f"max |zoo - separate| over every saved array: {worst:.2e}")
  band = np.load(os.path.join(res, "cka_zoo_summary.npz"))["band_mean"]
  assert band.shape == (3, 3) and np.allclose(band, band.T)
  np.testing.assert_allclose(np.diag(band), 1.0, atol=1e-4)  # intra band includes the diagonal
  assert results["cka_zoo"].metrics["band_mean"] == band.tolist()
  figures = results["cka_zoo"].figures
  assert "figures/cka_zoo_grid.png" in figures and len(figures) == 2 * 6 + 1
  for fig in figures:
    assert os.path.exists(os.path.join(ctx.workdir, fig))
  # The report (no JAX): the summary, the panel grid, then every grid (CKA + mutual_knn).
  go = pytest.importorskip("plotly.graph_objects")
  figs = report_figures.figures(ctx.workdir, {"name": "cka_zoo"}, {})
  assert len(figs) >= 2 + 2 * 6 and "diagonal band" in figs[0][0]
  assert len(figs[1][1]["data"]) == 9  # 3 x 3 panels
  for _, fig in figs:
    go.Figure(json.loads(interactive.to_json(fig)))


def test_zoo_on_1_and_4_devices_and_as_separate_runs():
  src, sides = _source(n=96, size=16), _sides()
  common = dict(num_examples=64, minibatch_size=16, repeats=2, seed=3,
                measures=("linear_cka", "rbf_cka"), null_permutations=2)
  runs = [cka_runner.cka_pairs_over_repeats(sides, PAIRS, src, mesh=sharding.make_mesh(d),
                                            **common)
          for d in (jax.devices()[:1], jax.devices())]
  for pair in PAIRS:
    one, four = runs[0][pair].arrays(), runs[1][pair].arrays()
    assert sorted(one) == sorted(four)
    for k in one:
      np.testing.assert_allclose(four[k], one[k], rtol=1e-5, atol=1e-6, err_msg=f"{pair} {k}")
  # Each pair equals its own one-pair run (intra: side_b None).
  for a, b in (("s12", None), ("s8", "s16")):
    alone = cka_runner.cka_over_repeats(sides[a], None if b is None else sides[b], src,
                                        mesh=sharding.make_mesh(), **common).arrays()
    for k, v in alone.items():
      np.testing.assert_allclose(runs[1][(a, b)].arrays()[k], v, rtol=0, atol=1e-6, err_msg=k)
  # Rotations / isotropic scalings of the same pooled input at any resolution: CKA 1.
  mean = runs[1][("s8", "s16")].mean
  np.testing.assert_allclose(mean[0, :3], 1.0, atol=1e-4)


class _FailingSource:
  """`source` whose example `fail_at` cannot be read (an interrupted pass)."""

  def __init__(self, source, fail_at):
    self.source, self.fail_at = source, fail_at

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if int(i) == self.fail_at:
      raise OSError("preempted")
    return self.source[i]


def test_zoo_resumes_mid_pass_to_the_identical_result(tmp_path):
  src, sides = _source(n=128, size=16), _sides()
  common = dict(num_examples=96, minibatch_size=8, repeats=2, seed=4, mesh=sharding.make_mesh(),
                measures=("linear_cka", "mutual_knn"), measure_options={"mutual_knn": {"k": 3}},
                null_permutations=2)
  want = cka_runner.cka_pairs_over_repeats(sides, PAIRS, src, **common)
  # 12 minibatches per repeat, 4 per step (3 steps): fail in repeat 2's last step, on an example
  # that no earlier step reads.
  plan = streaming.cka_plan(len(src), 96, 8, 2, 4)
  fail_at = next(int(i) for i in plan[1, 8:].reshape(-1)
                 if i not in plan[0] and i not in plan[1, :8])
  ck = resume.Checkpointer(str(tmp_path), every_s=0.0, fingerprint="zoo")
  with pytest.raises(streaming.ExampleError):
    cka_runner.cka_pairs_over_repeats(sides, PAIRS, _FailingSource(src, fail_at), resume=ck,
                                      **common)
  position = ck.restore()[1]
  assert 3 < position < 6  # inside repeat 2: the interruption was mid-pass
  got = cka_runner.cka_pairs_over_repeats(
      sides, PAIRS, src, resume=resume.Checkpointer(str(tmp_path), fingerprint="zoo"), **common)
  for pair in PAIRS:
    for k, v in want[pair].arrays().items():
      np.testing.assert_array_equal(got[pair].arrays()[k], v, err_msg=f"{pair} {k}")
  # Another set of pairs is another plan: refused, not mixed.
  with pytest.raises(resume.CheckpointError):
    cka_runner.cka_pairs_over_repeats(
        sides, PAIRS[:4], src, resume=resume.Checkpointer(str(tmp_path), fingerprint="zoo"),
        **common)


def test_memory_plan_and_refusal(tmp_path):
  sides = _sides()
  plan = cka_runner.memory_plan(sides, 16)
  # Transforms: 48 + 48 + 48 + 48 floats per example of captured features; 4 Grams of 16 x 16.
  assert plan.captured["s8"] == 16 * 4 * 48 * 4 and plan.largest_layer["s8"] == 16 * 48 * 4
  assert plan.grams["s16"] == 4 * 16 * 16 * 4
  assert plan.total() == sum(plan.weights.values()) + 3 * 4 * 16 * 16 * 4 + 16 * 48 * 4
  best = plan.largest_fitting_m(plan.total(64))
  assert best == 64 and plan.total(best + 1) > plan.total(64)
  assert "planned peak" in plan.describe() and "captured features" in plan.describe()
  limit_gb = plan.total(12) / 1e9
  with pytest.raises(MemoryError, match=r"memory plan per device at m = 16 .*"
                                        r"largest minibatch size that fits is m = 12"):
    cka_runner.cka_pairs_over_repeats(sides, PAIRS, _source(n=96, size=16), num_examples=32,
                                      minibatch_size=16, repeats=1, seed=0,
                                      mesh=sharding.make_mesh(jax.devices()[:1]),
                                      memory_limit_gb=limit_gb)
  assert cka_runner.device_memory_gb(0.5) == 0.5 and cka_runner.device_memory_gb() > 0
  # The analysis option: a tiny limit refuses before the pass, naming the plan and the best m.
  ctx = helpers.make_context(tmp_path, {"vit": "ViT-smoke_8", "resnet": "R-smoke"},
                             num_images=16)
  config = ml_collections.ConfigDict(dict(seed=0, analyses=("cka_zoo",), cka_zoo=dict(
      num_examples=16, minibatch_size=8, repeats=1, layers="blocks", memory_limit_gb=1e-4)))
  with pytest.raises(MemoryError, match=r"vit: weights .* resnet: weights .*largest minibatch"):
    helpers.run_analysis("cka_zoo", config, ctx)


def test_band_mean_and_summary():
  assert zoo.band_mean(np.eye(5)) == pytest.approx(1.0)
  cross = np.arange(6.0).reshape(2, 3)  # depths (0, 1) vs (0, .5, 1): band is cells (0,0),(1,2)
  assert zoo.band_mean(cross) == pytest.approx((0 + 5) / 2)
  m = zoo.summary_matrix({("a", None): np.ones((2, 2)), ("a", "b"): cross}, ["a", "b"])
  assert m[0, 0] == 1 and m[0, 1] == m[1, 0] == 2.5 and np.isnan(m[1, 1])
