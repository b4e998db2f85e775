"""report.html: self-contained, rebuilt from saved results without JAX, runs compared, sizes kept."""
import base64
import html.parser
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import plotly.graph_objects as go
import pytest

from vit_analysis.plotting import recipes
from vit_analysis.plotting import similarity as plotting_similarity
from vit_analysis.analyses.base import AnalysisResult
from vit_analysis.report import figures as report_figures
from vit_analysis.report import html as report_html
from vit_analysis.report import interactive
from vit_analysis.report import page as report
from vit_analysis.report.findings import Finding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Collector(html.parser.HTMLParser):

  def __init__(self):
    super().__init__()
    self.imgs, self.external, self.ids, self.scripts = [], [], [], 0

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.imgs.append(attrs.get("src", ""))
    for key in ("src", "href"):
      if key in attrs and not attrs[key].startswith(("data:", "#")):
        self.external.append((tag, attrs[key]))
    if tag == "script":
      self.scripts += 1
    if tag in ("link", "iframe"):
      self.external.append((tag, attrs))
    if "id" in attrs:
      self.ids.append(attrs["id"])


def _read(path, mode="r"):
  with open(path, mode, encoding=None if "b" in mode else "utf-8") as f:
    return f.read()


def vit_names(blocks: int) -> list[str]:
  """Fine-granularity ViT capture names: embedding, 6 per block, encoder_norm (2 + 6 blocks)."""
  points = ("ln0", "sa", "+sa", "ln2", "mlp_hidden")
  names = ["embedding"]
  for b in range(blocks):
    names += [f"block{b:02d}/{p}" for p in points] + [f"block{b:02d}"]
  return names + ["encoder_norm"]


def resnet_names(units: int) -> list[str]:
  return ["root/conv", "root"] + [f"block{1 + u // 3}/unit{1 + u % 3:02d}" for u in range(units)]


def save_comparison(workdir, stem, mean, names_a, names_b, repeats=2, seed=0, **extra):
  """Writes results/<stem>.npz|json as `RepeatedCKA.save` does (values [R, A, B], ...)."""
  rng = np.random.default_rng(seed)
  values = np.clip(mean[None] + 0.01 * rng.standard_normal((repeats,) + mean.shape), -1, 1)
  values += mean[None] - values.mean(0, keepdims=True)  # the saved mean is exactly `mean`
  stderr = 0.02 + 0.001 * rng.random(values.shape)
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
  path = os.path.join(workdir, "results", stem)
  np.savez(path + ".npz", values=values, stderr=stderr, mean=values.mean(0),
           std=values.std(0, ddof=1), names_a=np.asarray(names_a), names_b=np.asarray(names_b),
           **extra)
  with open(path + ".json", "w") as f:
    json.dump({"names_a": list(names_a), "names_b": list(names_b), "repeats": repeats}, f)
  return {"values": values, "stderr": stderr, "mean": values.mean(0), "std": values.std(0, ddof=1)}


def make_workdir(workdir, *, vit_blocks=2, resnet_units=3, seed=0, resnet_names_fn=resnet_names):
  """A saved run with intra-model CKA of a ViT and a ResNet, as `main.run` leaves it."""
  rng = np.random.default_rng(seed)
  arrays, metrics = {}, {"num_examples": 64, "minibatch_size": 16, "repeats": 2}
  for key, names in (("vit", vit_names(vit_blocks)), ("resnet", resnet_names_fn(resnet_units))):
    n = len(names)
    m = rng.uniform(0.2, 0.9, (n, n))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    arrays[key] = save_comparison(workdir, f"cka_intra_{key}", m, names, names, seed=seed)
    mean = arrays[key]["mean"]
    metrics[key] = {"mean_cka": float(mean.mean()), "first_last": float(mean[0, -1]),
                        "num_layers_a": n, "num_layers_b": n}
  result = AnalysisResult("cka_intra", "Intra-model CKA (Figs 1, B.1, H.1)", "Shows. Found.",
                          [], metrics, 1.5)
  with open(os.path.join(workdir, "results", "cka_intra.json"), "w") as f:
    f.write(result.to_json())
  with open(os.path.join(workdir, "models.json"), "w") as f:
    json.dump([{"key": "vit", "name": "ViT-B_32", "params": 10, "test_accuracy": 0.5},
               {"key": "resnet", "name": "R50x1", "params": 20, "test_accuracy": 0.4}], f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"analyses": ["cka_intra"], "seed": seed}, f)
  return arrays


def _figure(workdir, name):
  """figures/<name>.png|pdf and its recipe, as `Context.save_figure` writes them."""
  return recipes.save(workdir, name, plotting_similarity.cka_heatmap,
                      {"matrix": np.random.default_rng(0).random((4, 4)), "title": name})[0]


def _results(workdir):
  png_a = _figure(workdir, "a")
  png_b = _figure(workdir, "b")
  return [
      AnalysisResult("cka_intra", "Intra-model CKA", "What it shows. What the paper found.",
                     [os.path.relpath(png_a, workdir)],
                     {"vit": {"mean_offdiag": {"mean": 0.61234, "std": 0.0123}}, "n": 128}, 3.5),
      AnalysisResult("attention_distance", "Attention distance", "Shows. Found.",
                     [os.path.relpath(png_b, workdir)], {"block00": [1.0, 2.5]}, 1.25),
  ]


def test_report_is_self_contained_and_complete(tmp_path):
  workdir = str(tmp_path)
  results = _results(workdir)
  models = [{"key": "vit", "name": "ViT-smoke_8", "params": 12345, "image_size": 32,
             "test_accuracy": 0.975, "train_seconds": 12.0}]
  path = report.write_report(workdir, {"seed": 0, "analyses": ["cka_intra"]}, results, models,
                             timings={"train: vit": 12.0})
  assert path == os.path.join(workdir, "report.html")
  text = _read(path)
  parser = _Collector()
  parser.feed(text)
  assert parser.external == []
  assert text.count("* plotly.js v") == 1  # the bundle, inlined once
  assert len(parser.imgs) == 2
  for src, result in zip(parser.imgs, results):
    assert src.startswith("data:image/png;base64,")
    embedded = base64.b64decode(src.split(",", 1)[1])
    assert embedded == _read(os.path.join(workdir, result.figures[0]), "rb")
  for stage in ("findings", "models", "cka_intra", "attention_distance", "timings", "config"):
    assert stage in parser.ids
  assert text.index("id='findings'") < text.index("id='models'")
  assert "0.6123 ± 0.0123 (std)" in text
  assert "97.50%" in text and "ViT-smoke_8" in text and "12,345" in text
  assert "train: vit" in text and "analysis: cka_intra" in text
  assert not os.path.exists(path + ".tmp")
  assert json.loads(_read(os.path.join(workdir, "timings.json"))) == {"train: vit": 12.0}


def test_report_shows_nan_and_rejects_non_png(tmp_path):
  bad = AnalysisResult("x", "X", "c", ["figures/x.pdf"], {"value": float("nan")})
  with pytest.raises(ValueError, match="PNG"):
    report.render_report({}, [bad], [], str(tmp_path))
  page = report.render_report({}, [AnalysisResult("x", "X", "c", [], {"v": float("nan")})], [],
                              str(tmp_path))
  assert "NaN" in page


def _plot_specs(page: str) -> dict[str, tuple]:
  """div id -> (data, layout) of every `Plotly.newPlot` call in a page."""
  specs = {}
  for m in re.finditer(r"Plotly\.newPlot\('([^']+)',(.*?)\);</script>", page, flags=re.DOTALL):
    data, layout, _ = json.loads("[" + m.group(2) + "]")
    specs[m.group(1)] = (data, layout)
  return specs


def test_rebuild_cli_reads_saved_results_without_jax(tmp_path):
  workdir = str(tmp_path / "run")
  arrays = make_workdir(workdir)
  code = ("import sys, runpy; sys.argv = ['report', '--workdir', sys.argv[1]]; "
          "runpy.run_module('vit_analysis.report', run_name='__main__'); "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')); "
          "print('HEAVY', bad)")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code, workdir], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  assert "HEAVY []" in out.stdout
  page = _read(os.path.join(workdir, "report.html"))
  specs = _plot_specs(page)
  assert len(specs) == 2  # one grid per saved comparison
  grids = {layout["title"]["text"]: data[0] for data, layout in specs.values()}
  trace = grids["resnet (R50x1) vs resnet (R50x1)"]
  names = resnet_names(3)
  assert trace["x"] == names and trace["y"] == names
  np.testing.assert_allclose(np.asarray(trace["z"]), arrays["resnet"]["mean"], rtol=1e-3)
  custom = np.asarray(trace["customdata"])  # [A, B, fields]: stderr, spread
  np.testing.assert_allclose(custom[..., 0], arrays["resnet"]["stderr"].mean(0), rtol=1e-3)
  np.testing.assert_allclose(custom[..., 1], arrays["resnet"]["std"], rtol=1e-3)
  assert "stderr (minibatches)" in trace["hovertemplate"]
  assert "ViT more uniform across depth than ResNet" in page  # the findings table


def test_compare_draws_differences_and_names_mismatches(tmp_path):
  dir_a, dir_b = str(tmp_path / "a"), str(tmp_path / "b")
  arr_a = make_workdir(dir_a, seed=0)
  arr_b = make_workdir(dir_b, seed=1, resnet_names_fn=lambda u: resnet_names(u + 1))
  out = report.rebuild(dir_a, compare=dir_b, out=str(tmp_path / "cmp.html"))
  page = _read(out)
  assert "a: measured" in page and "b: measured" in page
  assert ("cka_intra_resnet: not compared, the runs have 5 and 6 row layers" in page)
  specs = _plot_specs(page)
  diffs = [d[0] for d, layout in specs.values() if layout["title"]["text"].startswith(
      "cka_intra_vit: CKA a - b")]
  assert len(diffs) == 1
  np.testing.assert_allclose(np.asarray(diffs[0]["z"]),
                             arr_a["vit"]["mean"] - arr_b["vit"]["mean"], rtol=1e-3, atol=1e-4)
  both = np.asarray(diffs[0]["customdata"])
  np.testing.assert_allclose(both[..., 0], arr_a["vit"]["mean"], rtol=1e-3)
  np.testing.assert_allclose(both[..., 1], arr_b["vit"]["mean"], rtol=1e-3)
  # Same names, one row renamed: said plainly, not drawn.
  renamed = vit_names(2)
  renamed[3] = "block00/renamed"
  za = report_figures.load_npz(os.path.join(dir_a, "results", "cka_intra_vit.npz"))
  save_comparison(dir_b, "cka_intra_vit", za["mean"], renamed, renamed)
  figs, notes = report_figures.differences(dir_a, dir_b, "cka_intra", "a", "b")
  assert not [f for f in figs if f[0].startswith("cka_intra_vit")]
  assert "cka_intra_vit: not compared, row layer 3 is 'block00/+sa' in one run and " \
         "'block00/renamed' in the other" in notes


def test_page_for_fig1_grid_sizes_stays_under_15_mb(tmp_path):
  # ViT-L/16 fine (146 layers) and a 150-layer ResNet: the paper's Fig 1 sizes, 20 repeats.
  workdir = str(tmp_path)
  rng = np.random.default_rng(0)
  for key, names in (("vit", vit_names(24)), ("resnet", resnet_names(148))):
    assert len(names) in (146, 150)
    m = rng.uniform(0, 1, (len(names),) * 2)
    save_comparison(workdir, f"cka_intra_{key}", m, names, names, repeats=20,
                    cka_null_z=rng.normal(size=m.shape) * 30)
  result = AnalysisResult("cka_intra", "Intra", "c", [], {}, 1.0)
  path = report.write_report(workdir, {}, [result], [])
  size = os.path.getsize(path)
  print(f"page with a 150x150 and a 146x146 grid: {size / 2**20:.2f} MiB")
  assert size < 15 * 2**20
  specs = _plot_specs(_read(path))
  assert sorted(len(d[0]["z"]) for d, _ in specs.values()) == [146, 150]
  assert all("null z" in d[0]["hovertemplate"] for d, _ in specs.values())


def test_to_json_is_compact_and_maps_nan_to_null():
  a = np.array([[0.123456789, np.nan], [np.inf, -2.5e-7]])
  text = interactive.to_json({"z": a, "n": 3, "ok": True, "s": "x<y", "l": [1.5, 2]})
  back = json.loads(text)
  assert back["z"] == [[0.1235, None], [None, -2.5e-07]]
  assert back["n"] == 3 and back["ok"] is True and back["s"] == "x<y" and back["l"] == [1.5, 2]
  assert "0.123456789" not in text


def test_builders_make_valid_plotly_figures():
  names = vit_names(1)
  n = len(names)
  m = np.random.default_rng(0).random((n, n))
  figs = [interactive.cka_heatmap(m, names, names, stderr=m / 10, spread=m / 5, null_z=m),
          interactive.difference_heatmap(m, m.T, names, names, label_a="a", label_b="b"),
          interactive.localization_maps(np.random.default_rng(1).random((9, 9)), 3,
                                        [(0, 0), (1, 2)]),
          interactive.token_grids([("vit", [("block00", np.ones((2, 2))),
                                            ("block01", np.zeros((3, 3)))])]),
          interactive.attention_distances({"vit": np.ones((2, 3))}, uniform={"vit": 1.2}),
          interactive.depth_lines({"a": [1, 2, 3]}, names={"a": ["x", "y", "z"]},
                                  errors={"a": [0.1, 0.1, 0.1]}, log_y=True, normalise_x=True),
          interactive.head_subset_lines(np.array([1.0, 2.0]), np.ones((3, 2)), ["p", "q", "r"])]
  for fig in figs:
    go.Figure(json.loads(interactive.to_json(fig)))  # plotly's schema validator: raises on typos


def test_builders_reject_bad_shapes():
  names = ["a", "b"]
  with pytest.raises(ValueError, match="names give"):
    interactive.heatmap(np.ones((2, 3)), row_names=names, col_names=names)
  with pytest.raises(ValueError, match="hover field 'stderr"):
    interactive.cka_heatmap(np.ones((2, 2)), names, names, stderr=np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"3x3 grid needs \(9, 9\)"):
    interactive.localization_maps(np.ones((4, 4)), 3, [(0, 0)])
  with pytest.raises(ValueError, match="2 names for 3 points"):
    interactive.depth_lines({"a": [1, 2, 3]}, names={"a": ["x", "y"]})


def test_localization_maps_pick_each_tokens_row():
  g = 3
  mean = np.arange(81, dtype=float).reshape(9, 9) / 100
  fig = interactive.localization_maps(mean, g, [(1, 2), (2, 0)])
  heat = [t for t in fig["data"] if t["type"] == "heatmap"]
  np.testing.assert_array_equal(heat[0]["z"], mean[1 * g + 2].reshape(g, g))
  np.testing.assert_array_equal(heat[1]["z"], mean[2 * g + 0].reshape(g, g))
  marks = [t for t in fig["data"] if t["type"] == "scatter"]
  assert (marks[0]["x"], marks[0]["y"]) == ([2], [1])  # the token's own cell: x col, y row


def test_extra_measures_slot_into_the_hover(tmp_path):
  names = ["embedding", "block00", "encoder_norm"]
  m = np.eye(3) * 0.5 + 0.5
  save_comparison(str(tmp_path), "cka_intra_vit", m, names, names,
                  rbf_mean=m / 2, rbf_stderr=m / 20, rbf_null_z=m * 7)
  z = report_figures.load_npz(str(tmp_path / "results" / "cka_intra_vit.npz"))
  assert set(report_figures.measures(z)) == {"rbf"}
  figs = report_figures.cka_figures(z, "vit")
  assert [c for c, _ in figs] == ["vit: CKA, mean over 2 repeat(s)", "vit: rbf"]
  rbf = figs[1][1]["data"][0]
  np.testing.assert_allclose(rbf["z"], m / 2)
  assert "null z" in rbf["hovertemplate"] and "rbf" in rbf["hovertemplate"]
  np.testing.assert_allclose(rbf["customdata"][..., 1], m * 7)  # stderr, null z (no spread)


def test_probe_token_grids_drop_cls_and_reshape(tmp_path):
  os.makedirs(tmp_path / "results")
  acc = np.arange(2 * 6, dtype=float).reshape(2, 6) / 100  # [seeds, units]
  units = ["block00:cls"] + [f"block00:tokens@{t}" for t in range(5)]
  np.savez(tmp_path / "results" / "probe.npz", **{"vit/units": np.asarray(units), "vit/acc": acc})
  result = {"name": "probe", "metrics": {"vit": {"aggregated": {"cls": {}}}}}
  rows = report_figures.probe_token_grids(str(tmp_path), result)
  assert [r[0] for r in rows] == ["vit"]
  ((layer, grid),) = rows[0][1]
  assert layer == "block00"
  np.testing.assert_allclose(grid, acc.mean(0)[2:].reshape(2, 2))  # token 0 (CLS) left out


def _save_result(workdir, name, metrics):
  with open(os.path.join(workdir, "results", f"{name}.json"), "w") as f:
    f.write(AnalysisResult(name, name.replace("_", " "), "Shows. Found.", [], metrics).to_json())


def make_full_workdir(workdir, seed=0):
  """`make_workdir` plus every other analysis' saved files, in the layouts the analyses write."""
  rng = np.random.default_rng(seed)
  arrays = make_workdir(workdir, seed=seed)
  vit, res = vit_names(2), resnet_names(3)
  save_comparison(workdir, "cka_cross_vit_vs_resnet", rng.random((len(vit), len(res))), vit, res)
  _save_result(workdir, "cka_cross", {"vit_vs_resnet": {"mean_cka": 0.5}})
  np.savez(os.path.join(workdir, "results", "attention_distance.npz"),
           vit=rng.uniform(10, 100, (2, 3)))
  _save_result(workdir, "attention_distance", {"vit": {
      "uniform_attention": 110.0, "block0_min_head": 10.0, "block0_max_head": 100.0,
      "last_block_mean": 95.0}})
  save_comparison(workdir, "head_subsets_vit_block00_vs_resnet", rng.random((2, 3)),
                  ["heads 0,1", "heads 1,2"], res[2:], subset_distance=np.array([20.0, 80.0]),
                  head_distance=np.array([10.0, 30.0, 90.0]))
  _save_result(workdir, "head_subsets", {"vit_block00_vs_resnet": {"spearman": {res[2]: -1.0}}})
  g = 3
  save_comparison(workdir, "localization_vit_block01", rng.random((g * g, g * g)),
                  [f"token{r}_{c}" for r in range(g) for c in range(g)],
                  [f"patch{r}_{c}" for r in range(g) for c in range(g)], grid=g,
                  tokens=np.array([[0, 0], [1, 1]]))
  _save_result(workdir, "localization", {"vit/block01": {"own_contrast": 0.3, "own_is_best": 0.8,
                                                             "grid": g, "model": "ViT-B_32"}})
  for label, stem in (("10%", "data_fraction_10pct"), ("parity", "finetune_parity")):
    save_comparison(workdir, f"dataset_scale_{stem}", rng.random((3, 3)), ["block00", "block01",
                                                                           "block02"],
                    ["block00", "block01", "block02"], label=label)
  _save_result(workdir, "dataset_scale", {
      "vit_frac0.1": {"fraction": 0.1, "block_cka": [0.9, 0.8, 0.5]},
      "vit_ft_parity": {"task": "digits:parity", "block_cka": [0.99, 0.9, 0.8]}})
  labels = np.array(["block00/sa", "block00/mlp", "block01/sa", "block01/mlp"])
  np.savez(os.path.join(workdir, "results", "skip_norms.npz"), **{
      "vit/ratio": rng.uniform(0.1, 50, (4, 10)), "vit/cos_out": rng.random((4, 10)),
      "vit/labels": labels, "resnet/ratio": rng.uniform(1, 2, (3, 1)),
      "resnet/cos_out": rng.random((3, 1)), "resnet/labels": np.array(res[2:])})
  _save_result(workdir, "skip_norms", {
      "vit": {"sa": {"ratio_mean": 20.0, "ratio_cls_per_block": [30.0, 1.0]},
              "mlp": {"ratio_mean": 10.0, "ratio_cls_per_block": [30.0, 1.0]}},
      "resnet": {"unit": {"ratio_mean": 1.5}}})
  for key in ("vit", "vit_noskip01"):
    save_comparison(workdir, f"skip_removal_{key}", rng.random((4, 4)), vit[:4], vit[:4])
  _save_result(workdir, "skip_removal", {
      "vit": {"skip_removed": [], "test_accuracy": 0.5},
      "vit_noskip01": {"skip_removed": [1], "test_accuracy": 0.45, "accuracy_drop": 0.05}})
  _save_result(workdir, "receptive_field", {
      "vit/post": {"layers": ["block00", "block01"], "area_fraction": [0.2, 0.5]},
      "resnet/post": {"layers": res[2:], "area_fraction": [0.01, 0.02, 0.05]}})
  units = ["embedding:cls", "block01:cls", "block01:mean"] + [
      f"block01:tokens@{t}" for t in range(5)]
  np.savez(os.path.join(workdir, "results", "probe.npz"), **{
      "vit/units": np.array(units), "vit/acc": rng.random((2, len(units)))})
  _save_result(workdir, "probe", {"vit": {
      "aggregated": {"cls": {"layers": ["embedding", "block01"], "acc_mean": [0.1, 0.5],
                             "acc_std": [0.01, 0.02]}},
      "tokens": {"block01": {"acc_mean": 0.2, "acc_std": 0.01}}}})
  for stem, (a, b) in {"cka_zoo_vit": (vit, vit), "cka_zoo_resnet": (res, res),
                       "cka_zoo_vit_vs_resnet": (vit, res)}.items():
    save_comparison(workdir, stem, rng.random((len(a), len(b))), a, b)
  np.savez(os.path.join(workdir, "results", "cka_zoo_summary.npz"),
           band_mean=np.array([[1.0, 0.4], [0.4, 1.0]]), keys=np.array(["vit", "resnet"]))
  _save_result(workdir, "cka_zoo", {"vit_vs_resnet": {"mean_cka": 0.5}})
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"analyses": list(report_figures._BUILDERS)}, f)
  return arrays


def test_every_analysis_layout_gives_valid_figures(tmp_path):
  workdir = str(tmp_path)
  make_full_workdir(workdir)
  run = report.Run(workdir)
  assert [r["name"] for r in run.results] == list(report_figures._BUILDERS)
  counts = {}
  for result in run.results:
    figs = report_figures.figures(workdir, result, run.models_by_key)
    counts[result["name"]] = len(figs)
    for _, fig in figs:
      go.Figure(json.loads(interactive.to_json(fig)))
  assert counts == {"cka_intra": 2, "cka_cross": 1, "skip_removal": 2, "head_subsets": 1,
                    "localization": 1, "dataset_scale": 2, "attention_distance": 1,
                    "skip_norms": 4, "receptive_field": 1, "probe": 3,
                    "cka_zoo": 5}  # summary, all grids as panels, then each of the 3 grids
  # The zoo's grids are cka_intra's and cka_cross's; the findings are checked on those analyses.
  assert {f.analysis for f in run.findings} == set(counts) - {"cka_zoo"}


def test_findings_table_shows_three_verdicts_and_intervals():
  rows = [Finding("a", "e1", "0.3", "> 0.1", "shown", "[0.2, 0.4] vs > 0.1 (over 4 repeats)"),
          Finding("a", "e2", "0.1", "> 0.1", "inconclusive", "no uncertainty saved"),
          Finding("a", "e3", "0.0", "> 0.1", "not shown", "[-0.1, 0.05] vs > 0.1 (over 4 repeats)"),
          Finding("a", "e4", "absent", "> 0.1", None)]
  text = report_html.findings_table([types.SimpleNamespace(label="run", findings=rows)])
  for cls, word in (("shown", "shown"), ("notshown", "not shown"),
                    ("inconclusive", "inconclusive"), ("absent", "not measured")):
    assert f'<td class="{cls}">{word}</td>' in text
  assert "95% interval" in text and "[0.2, 0.4] vs &gt; 0.1 (over 4 repeats)" in text
  assert "run: 1 shown, 1 not shown, 1 inconclusive of 3" in text
  assert [f.shown for f in rows] == [True, None, False, None]


def test_null_heatmaps_on_their_measures_scale_and_measures_share_one():
  rng = np.random.default_rng(0)
  names = [f"block{i:02d}" for i in range(4)]
  m = rng.uniform(0.5, 1.0, (4, 4))
  z = dict(names_a=np.array(names), names_b=np.array(names), mean=m, values=m[None],
           cka_null_mean=rng.normal(0, 0.002, (4, 4)), procrustes_mean=m / 2,
           procrustes_null_mean=m / 3, newmeasure_mean=m - 0.8,
           newmeasure_null_mean=rng.normal(0, 0.01, (4, 4)))
  figs = dict(report_figures.cka_figures(z, "t"))
  ranges = {k: (f["data"][0].get("zmin"), f["data"][0].get("zmax"), f["data"][0]["colorscale"])
            for k, f in figs.items()}
  # Noise around 0 drawn on CKA's [0, 1], not stretched over its own tiny range.
  assert ranges["t: linear_cka, mean under the shuffle null"][:2] == (0.0, 1.0)
  assert ranges["t: procrustes"][:2] == (0.0, 1.0)
  assert ranges["t: procrustes, mean under the shuffle null"][:2] == (0.0, 1.0)
  low, high, scale = ranges["t: newmeasure, mean under the shuffle null"]
  assert low == -high and scale == "RdBu"


def test_probe_token_grids_in_model_depth_order(tmp_path):
  os.makedirs(tmp_path / "results")
  # Saved grouped by feature shape (stages 1 and 3 share one): the panels still follow depth.
  saved = ["block1/unit01", "block3/unit01", "block2/unit01", "block4/unit01"]
  units = [f"{layer}:tokens@{t}" for layer in saved for t in range(4)]
  acc = np.arange(len(units), dtype=float)[None] / 100
  np.savez(tmp_path / "results" / "probe.npz",
           **{"res/units": np.asarray(units), "res/acc": acc})
  depth = ["block1/unit01", "block2/unit01", "block3/unit01", "block4/unit01"]
  result = {"name": "probe", "metrics": {"res": {"aggregated": {"gap": {"layers": depth}}}}}
  ((key, grids),) = report_figures.probe_token_grids(str(tmp_path), result)
  assert [layer for layer, _ in grids] == depth
