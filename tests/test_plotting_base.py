"""Shared plotting helpers and figure recipes: colour range fixed, bad shapes rejected, a figure
redrawn from its saved recipe, recipes naming anything outside vit_analysis.plotting refused."""
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vit_analysis import plotting
from vit_analysis.plotting import recipes
from vit_analysis.plotting import similarity as plots
from vit_analysis.runtime import workdir as workdir_lib


def test_heatmap_fixes_the_colour_range_and_rejects_non_matrix():
  fig, ax = plt.subplots()
  image = plotting.heatmap(ax, np.eye(3) * 2.0)
  assert image.get_clim() == (0.0, 1.0)  # CKA colour bar is fixed to [0, 1] whatever the data.
  with pytest.raises(ValueError, match="2-D"):
    plotting.heatmap(ax, np.zeros((2, 2, 2)))
  plt.close(fig)


def test_recipe_saves_figure_and_redraws_the_same_bytes(tmp_path):
  run = str(tmp_path)
  args = dict(values={"linear_cka": np.eye(3), "rsa": -np.eye(3)}, row_names=["a", "b", "c"],
              col_names=("a", "b", "c"), above_null={"linear_cka": np.eye(3, dtype=bool)},
              null_means={"rsa": np.full((3, 3), 0.01)}, title="t", fdr=np.float64(0.05))
  paths = recipes.save(run, "m", plots.measure_heatmaps, args)
  layout = workdir_lib.Layout(run)
  assert paths == [layout.figure("m", "png"), layout.figure("m", "pdf")]
  recipe = workdir_lib.read_json(layout.recipe("m"))
  assert recipe["plot"] == "vit_analysis.plotting.similarity:measure_heatmaps"
  assert recipe["args"]["values"]["rsa"] == {"__array__": "a1"} and recipe["args"]["fdr"] == 0.05
  with open(layout.figure("m"), "rb") as f:
    png = f.read()
  files = recipes.redraw(run, "m")
  assert sorted(files) == ["pdf", "png"] and files["png"] == png


@pytest.mark.parametrize("plot, message", [
    ("os:system", "not a function of vit_analysis.plotting"),
    ("vit_analysis.plotting.similarity:np", "defines no function"),
    ("vit_analysis.plotting.similarity:heatmap", "not a figure function"),
    ("vit_analysis.plotting.nothing:f", "no module"),
    ("vit_analysis.plotting.similarity:_masked_heatmap", "not a function of"),
])
def test_recipe_naming_anything_else_is_refused(tmp_path, plot, message):
  workdir_lib.write_json(workdir_lib.Layout(str(tmp_path)).recipe("x"),
                         {"plot": plot, "args": {}, "formats": ["png"]})
  with pytest.raises(recipes.RecipeError, match=message):
    recipes.redraw(str(tmp_path), "x")


def test_recipe_errors_name_the_problem(tmp_path):
  with pytest.raises(recipes.RecipeError, match="no recipe"):
    recipes.redraw(str(tmp_path), "absent")
  with pytest.raises(recipes.RecipeError, match="not a module-level function|not a function of"):
    recipes.save(str(tmp_path), "x", lambda: plt.figure(), {})
  with pytest.raises(TypeError, match=r"figure argument values\['a'\]: set"):
    recipes.save(str(tmp_path), "x", plots.measure_heatmaps, {"values": {"a": {1}}})
  path = workdir_lib.Layout(str(tmp_path)).recipe("bad")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(json.dumps({"plot": "vit_analysis.plotting.similarity:cka_heatmap",
                        "args": {"matrix": {"__array__": "a0"}}}))
  with pytest.raises(recipes.RecipeError, match="absent from its .npz"):
    recipes.redraw(str(tmp_path), "bad")
  assert not os.path.exists(workdir_lib.Layout(str(tmp_path)).figure("x"))


def test_measure_heatmaps_shared_scale_masked_cells_and_diverging_null():
  values = {"linear_cka": np.full((2, 2), 0.5), "procrustes": np.full((2, 2), 0.4),
            "rsa": np.full((2, 2), 0.2), "weird": np.array([[0.1, -0.3], [0.0, 0.2]])}
  fig = plots.measure_heatmaps(
      values, row_names=["a", "b"], col_names=["a", "b"],
      above_null={"linear_cka": np.array([[True, False], [True, True]])},
      null_means={"linear_cka": np.full((2, 2), 0.02), "weird": np.array([[0.05, -0.1],
                                                                             [0.0, 0.0]])})
  images = {ax.get_title().split("\n")[0]: ax.images[0] for ax in fig.axes if ax.images}
  assert images["linear_cka"].get_clim() == images["procrustes"].get_clim() == (0.0, 1.0)
  assert images["rsa"].get_clim() == (-1.0, 1.0)
  assert images["weird"].get_clim() == (-0.3, 0.3)  # unknown range: symmetric about 0
  assert images["weird: mean under the shuffle null"].get_clim() == (-0.1, 0.1)
  assert images["weird: mean under the shuffle null"].get_cmap().name.startswith("RdBu")
  assert images["linear_cka: mean under the shuffle null"].get_clim() == (0.0, 1.0)
  masked = images["linear_cka"]
  assert np.isnan(masked.get_array().filled(np.nan)).sum() == 1
  assert masked.get_cmap().get_bad()[:3] == pytest.approx([0xbd / 255] * 3)
  assert "1 of 4 cells not above the null" in next(
      ax.get_title() for ax in fig.axes if ax.get_title().startswith("linear_cka\n"))
  assert "grey cells: not above the shuffle null" in fig._suptitle.get_text()  # pylint: disable=protected-access
  plt.close(fig)


def test_measures_figure_masks_nothing_when_the_null_cannot_call_a_cell():
  from vit_analysis.analyses import similarity  # pylint: disable=g-import-not-at-top
  from vit_analysis.similarity import cka_runner  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  r, a, b = 1, 3, 4
  values = rng.uniform(0.5, 1.0, (r, a, b))
  null = lambda p: dict(null_mean=np.zeros((r, a, b)), null_std=np.full((r, a, b), 0.01),
                        null_values=rng.uniform(0, 0.1, (p, a, b)))
  for perms, masked in ((2, False), (400, True)):
    rep = cka_runner.RepeatedCKA(
        ["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"], values, np.full((r, a, b), 0.01), 64, 16,
        measures={"rbf_cka": dict(values=values, stderr=np.full((r, a, b), 0.01), **null(perms))},
        null=null(perms))
    args = similarity.measures_args(rep, "t", "A", "B", intra=False)
    assert (args["above_null"] is not None) == masked
    assert ("no cell masked: 2 null permutations cannot call any of 12 cells" in args["note"]
            ) == (not masked)
    fig = plots.measure_heatmaps(**args)
    title = fig._suptitle.get_text()  # pylint: disable=protected-access
    assert args["note"] in title and "grey cells" not in title  # every cell above the null
    plt.close(fig)
