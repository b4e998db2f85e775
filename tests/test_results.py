"""vit_analysis.results: every run of a sweep as one tidy frame, cell values as saved."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import smoke_sweep

from vit_analysis import results


@pytest.fixture(scope="module")
def sweep_dir():
  return smoke_sweep.run()[0]


def test_columns_and_swept_values(sweep_dir):
  df = results.load(sweep_dir)
  assert list(df.columns) == list(results.COLUMNS) + ["seed"]
  assert sorted(df.run.unique()) == ["seed=0", "seed=1"]
  assert (df.groupby("run").seed.first() == pd.Series({"seed=0": 0, "seed=1": 1})).all()
  assert set(df.kind) == {"cell", "metric"} and set(df.analysis) == {"cka_intra"}


def test_a_row_per_cell_and_per_metric(sweep_dir):
  df = results.load(sweep_dir)
  for run in ("seed=0", "seed=1"):
    folder = os.path.join(sweep_dir, run, "results")
    with np.load(os.path.join(folder, "cka_intra_vit.npz")) as z:
      mean, names_a, names_b = z["mean"], list(z["names_a"]), list(z["names_b"])
    with open(os.path.join(folder, "cka_intra.json")) as f:
      metrics = json.load(f)["metrics"]
    cells = df[(df.run == run) & (df.kind == "cell")]
    assert len(cells) == mean.size == len(names_a) * len(names_b)
    assert set(cells.comparison) == {"vit"} and set(cells.measure) == {"linear_cka"}
    # A cell's value is the saved one.
    a, b = names_a[3], names_b[-1]
    row = cells[(cells.layer_a == a) & (cells.layer_b == b)]
    assert len(row) == 1 and row.value.item() == pytest.approx(float(mean[3, -1]), abs=0)
    pivot = cells.pivot(index="layer_a", columns="layer_b", values="value").loc[names_a, names_b]
    np.testing.assert_array_equal(pivot.to_numpy(), mean)
    assert cells.stderr.notna().all() and cells.null_z.isna().all()
    def leaves(d, prefix=""):
      for k, v in d.items():
        if isinstance(v, dict):
          yield from leaves(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
          yield f"{prefix}{k}", v
    flat = dict(leaves(metrics))
    # A metric's `<name>_stderr` sibling is that row's error bar, not a row of its own.
    numeric = [k for k in flat if not (k.endswith("_stderr") and k[:-len("_stderr")] in flat)]
    got = df[(df.run == run) & (df.kind == "metric")]
    assert sorted(got.measure) == sorted(numeric)
    assert got[got.measure == "vit/mean_cka"].value.item() == metrics["vit"]["mean_cka"]
    assert got.layer_a.isna().all() and got.layer_b.isna().all()


def test_one_workdir_and_a_folder_of_runs(sweep_dir, tmp_path):
  one = results.load(os.path.join(sweep_dir, "seed=0"))
  assert set(one.run) == {"seed=0"} and set(one.seed) == {0}  # the sweep above it still counts
  # Runs outside a sweep: no swept columns.
  shutil.copytree(os.path.join(sweep_dir, "seed=1"), tmp_path / "a" / "run1",
                  ignore=shutil.ignore_patterns("models"))
  df = results.load(str(tmp_path))
  assert list(df.columns) == list(results.COLUMNS) and set(df.run) == {os.path.join("a", "run1")}
  with pytest.raises(FileNotFoundError, match="no run"):
    results.load(str(tmp_path / "a" / "run1" / "figures"))


def test_other_measures_and_null(tmp_path):
  """A comparison saved with another measure and a null: a row per measure and cell, z beside."""
  folder = tmp_path / "run" / "results"
  folder.mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text(json.dumps({"analyses": ["cka_cross"]}))
  (folder / "cka_cross.json").write_text(json.dumps(dict(
      name="cka_cross", title="t", caption="c", figures=[], seconds=1.0,
      metrics={"vit_vs_resnet": {"mean_cka": 0.5, "mean_cka_stderr": 0.1, "note": "x"}})))
  rng = np.random.default_rng(0)
  values = rng.random((2, 2, 3))
  arrays = dict(names_a=np.array(["a0", "a1"]), names_b=np.array(["b0", "b1", "b2"]),
                values=values, stderr=values / 10, mean=values.mean(0), std=values.std(0),
                cka_null_mean=np.zeros((2, 3)), cka_null_std=np.ones((2, 3)),
                cka_null_z=values.mean(0), rbf_cka_values=values + 1,
                rbf_cka_stderr=np.full((2, 3), 0.2), rbf_cka_mean=values.mean(0) + 1,
                rbf_cka_std=np.zeros((2, 3)))
  np.savez(folder / "cka_cross_vit_vs_resnet.npz", **arrays)
  (folder / "cka_cross_vit_vs_resnet.json").write_text(json.dumps(dict(
      names_a=["a0", "a1"], names_b=["b0", "b1", "b2"], measures=["rbf_cka"], null=True)))
  df = results.load(str(tmp_path / "run"))
  cells = df[df.kind == "cell"]
  assert len(cells) == 2 * 6 and set(cells.comparison) == {"vit_vs_resnet"}
  lin = cells[cells.measure == "linear_cka"].set_index(["layer_a", "layer_b"])
  rbf = cells[cells.measure == "rbf_cka"].set_index(["layer_a", "layer_b"])
  assert lin.loc[("a1", "b2")].value == values.mean(0)[1, 2]
  assert lin.loc[("a1", "b2")].stderr == pytest.approx((values / 10).mean(0)[1, 2])
  assert lin.loc[("a1", "b2")].null_z == values.mean(0)[1, 2]
  assert rbf.loc[("a0", "b1")].value == values.mean(0)[0, 1] + 1 and rbf.stderr.eq(0.2).all()
  assert rbf.null_z.isna().all()
  metric = df[df.kind == "metric"]
  assert list(metric.measure) == ["vit_vs_resnet/mean_cka"]
  assert metric.stderr.item() == 0.1
