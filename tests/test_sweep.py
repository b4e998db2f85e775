"""vit_analysis.sweep: big_vision's hyper semantics, point names, bad sweeps, --dry_run, a real
two-point sweep that a rerun skips, its two points compared in one report, and a point's page
rebuilt with its figures/ deleted (each figure redrawn from its recipe)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import smoke_sweep

from vit_analysis import sweep
from vit_analysis.report import page as report

REPO = smoke_sweep.REPO
H = sweep.Hyper


def test_hyper_sweep_fixed_product_zipit_chainit():
  assert H.sweep("config.seed", [0, 1]) == [{"config.seed": 0}, {"config.seed": 1}]
  assert H.fixed("a", 3, length=2) == [{"a": 3}, {"a": 3}]
  assert H.product([H.sweep("a", [1, 2]), H.sweep("b", ["x", "y"])]) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert H.zipit([H.sweep("a", [1, 2]), H.sweep("b", ["x", "y"])]) == [
      {"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
  assert H.chainit([H.sweep("a", [1]), H.sweep("b", [2, 3])]) == [{"a": 1}, {"b": 2}, {"b": 3}]
  assert H.product([]) == [{}]
  assert H.product([H.sweep("a", [1, 2]), H.sweep("b", [])]) == []
  nested = H.product([H.zipit([H.sweep("n", ["B", "L"]), H.sweep("c", ["b.npz", "l.npz"])]),
                      H.sweep("s", [0, 1]), H.fixed("r", 5)])
  assert nested == [
      {"n": "B", "c": "b.npz", "s": 0, "r": 5}, {"n": "B", "c": "b.npz", "s": 1, "r": 5},
      {"n": "L", "c": "l.npz", "s": 0, "r": 5}, {"n": "L", "c": "l.npz", "s": 1, "r": 5}]


def test_hyper_errors():
  with pytest.raises(ValueError, match="different lengths"):
    H.zipit([H.sweep("a", [1, 2]), H.sweep("b", [1])])
  with pytest.raises(ValueError, match="set twice"):
    H.product([H.sweep("a", [1]), H.sweep("a", [2])])


def test_config_points_get_hyper_and_sweep_add():
  class GetHyper:
    @staticmethod
    def get_hyper(hyper, arg=None):
      return hyper.sweep("config.seed", [0, 1] if arg == "smoke" else [0])

  class SweepAdd:
    @staticmethod
    def sweep(add):
      for r in (1, 2):
        add(**{"cka_intra.repeats": r})

  assert sweep.config_points(GetHyper, "smoke") == [{"config.seed": 0}, {"config.seed": 1}]
  assert sweep.config_points(GetHyper, None) == [{"config.seed": 0}]
  assert sweep.config_points(SweepAdd, None) == [{"cka_intra.repeats": 1}, {"cka_intra.repeats": 2}]
  assert sweep.config_points(object(), None) is None


def test_cli_points_product_with_parsed_values():
  assert sweep.cli_points(["seed=0,1", "cka_intra.tokens=all,cls_only"]) == [
      {"seed": 0, "cka_intra.tokens": "all"}, {"seed": 0, "cka_intra.tokens": "cls_only"},
      {"seed": 1, "cka_intra.tokens": "all"}, {"seed": 1, "cka_intra.tokens": "cls_only"}]
  assert sweep.cli_points(["x=0.5,true"]) == [{"x": 0.5}, {"x": True}]
  with pytest.raises(ValueError, match="KEY=V1,V2"):
    sweep.cli_points(["seed"])


def test_point_names():
  assert sweep.point_names([{"seed": 0}, {"seed": 1}]) == ["seed=0", "seed=1"]
  # A checkpoint zipped with its name, and an option fixed per group, are left out.
  fig1 = H.chainit([
      H.zipit([H.sweep("models.vit.name", ["ViT-B_32", "ViT-B_16"]),
               H.sweep("models.vit.checkpoint", ["/c/ViT-B_32.npz", "/c/ViT-B_16.npz"]),
               H.fixed("cka_intra.models", ("vit",), 2)]),
      H.zipit([H.sweep("models.resnet.name", ["R50x1"]),
               H.sweep("models.resnet.checkpoint", ["/c/BiT-M-R50x1.npz"]),
               H.fixed("cka_intra.models", ("resnet",), 1)])])
  assert sweep.point_names(fig1) == ["vit.name=ViT-B_32", "vit.name=ViT-B_16", "resnet.name=R50x1"]
  assert sweep.point_names(H.product([H.sweep("models.vit.name", ["a", "b"]),
                                      H.sweep("seed", [0, 1])])) == [
      "vit.name=a,seed=0", "vit.name=a,seed=1", "vit.name=b,seed=0", "vit.name=b,seed=1"]
  # Paths read as their file name, tuples joined with '+', unsafe characters replaced.
  assert sweep.point_names([{"data.name": "folder:/x/val"}, {"data.name": "folder:/y/train"}]) == [
      "name=val", "name=train"]
  assert sweep.point_names([{"l": ("a b", "c")}, {"l": ("d",)}]) == ["l=a_b+c", "l=d"]
  assert sweep.point_names([{}, {"seed": 1}]) == ["default", "seed=1"]


CKA_SMOKE = os.path.join(REPO, "configs", "cka_intra.py") + ":smoke"


def test_unknown_key_names_the_closest(tmp_path):
  with pytest.raises(KeyError, match="did you mean 'cka_intra.repeats'"):
    sweep.Sweep(CKA_SMOKE, str(tmp_path), sweep=["cka_intra.repeat=1,2"], config_sweep=False)
  with pytest.raises(KeyError, match="unknown sweep key 'sed'.*'seed'"):
    sweep.Sweep(CKA_SMOKE, str(tmp_path), sweep=["sed=1,2"], config_sweep=False)
  assert not os.listdir(tmp_path)  # nothing ran, nothing was written


def test_bad_value_and_duplicate_names(tmp_path):
  with pytest.raises(TypeError, match="repeats=.abc.: the config.s cka_intra.repeats is 2"):
    sweep.Sweep(CKA_SMOKE, str(tmp_path), sweep=["cka_intra.repeats=2,abc"], config_sweep=False)
  with pytest.raises(ValueError, match=r"named \['seed=0'\]"):
    sweep.Sweep(CKA_SMOKE, str(tmp_path), sweep=["seed=0,1,0"], config_sweep=False)


def test_empty_and_missing_sweeps(tmp_path):
  config = tmp_path / "empty.py"
  config.write_text(
      "from vit_analysis import config_lib\n"
      "def get_config(arg=None):\n  return config_lib.base_config(arg)\n"
      "def get_hyper(hyper):\n"
      "  return hyper.product([hyper.sweep('config.seed', [0, 1]),\n"
      "                        hyper.sweep('config.seed', [])])\n")
  with pytest.raises(ValueError, match="has no points"):
    sweep.Sweep(str(config), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="declares no sweep"):
    sweep.Sweep(os.path.join(REPO, "configs", "train_digits.py"), str(tmp_path / "w"))


def test_shipped_sweeps():
  fig1 = sweep.Sweep(os.path.join(REPO, "configs", "cka_intra.py") + ":full,ckpt_dir=/ck", "/w")
  assert [p["name"] for p in fig1.points] == [
      "vit.name=ViT-B_32", "vit.name=ViT-B_16", "vit.name=ViT-L_16", "vit.name=ViT-H_14",
      "resnet.name=R50x1", "resnet.name=R152x2"]
  assert fig1.points[3]["overrides"] == {"models.vit.name": "ViT-H_14",
                                         "models.vit.checkpoint": "/ck/ViT-H_14.npz",
                                         "cka_intra.models": ("vit",)}
  assert fig1.configs[5].models.resnet.checkpoint == "/ck/BiT-M-R152x2.npz"
  assert tuple(fig1.configs[5].cka_intra.models) == ("resnet",)
  assert fig1.configs[0].cka_intra.repeats == 20  # everything else is the :full config
  fig12 = sweep.Sweep(os.path.join(REPO, "configs", "dataset_scale.py"), "/w")
  assert len(fig12.points) == 6 and fig12.points[0]["name"] == "vit.name=ViT-demo_4,fractions=0.03"
  assert all(not c.dataset_scale.finetune for c in fig12.configs)
  assert sweep.Sweep(os.path.join(REPO, "configs", "dataset_scale.py") + ":smoke",
                     "/w").points[1]["name"] == "fractions=0.3"


def test_dry_run_prints_both_forms():
  out = subprocess.run(
      [sys.executable, "-m", "vit_analysis.sweep", "--config=configs/cka_intra.py:smoke",
       "--workdir=/tmp/fig1", "--config.cka_intra.repeats=3", "--dry_run"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  common = ("--config=configs/cka_intra.py:smoke --workdir=/tmp/fig1/{name} "
            "--config.cka_intra.repeats=3 --config.model_cache=/tmp/fig1/models {rest}")
  points = [("vit.name=ViT-smoke_8",
             "--config.models.vit.name=ViT-smoke_8 --config.cka_intra.models=vit"),
            ("vit.name=ViT-smoke_8-gap",
             "--config.models.vit.name=ViT-smoke_8-gap --config.cka_intra.models=vit"),
            ("resnet.name=R-smoke",
             "--config.models.resnet.name=R-smoke --config.cka_intra.models=resnet")]
  expected = []
  for name, rest in points:
    args = common.format(name=name, rest=rest)
    tpu = ("gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all "
           f'--command="python -m vit_analysis.main {args}"')
    expected += [f"# {name}", f"python -m vit_analysis.main {args}", tpu]
  assert out.splitlines() == expected


def test_dry_run_quotes_for_the_shell():
  s = sweep.Sweep(CKA_SMOKE, "/tmp/a b", sweep=["description=x y,$HOME"], config_sweep=False)
  _, plain, tpu = s.commands()[1]
  assert "'--config.description=$HOME'" in plain
  assert "'--workdir=/tmp/a b/description=_HOME'" in plain
  assert '--command="python -m vit_analysis.main' in tpu and "\\$HOME" in tpu


def test_smoke_sweep_runs_then_skips():
  workdir, entries = smoke_sweep.run()
  assert [(e["name"], e["status"]) for e in entries] == [("seed=0", "finished"),
                                                         ("seed=1", "finished")]
  with open(os.path.join(workdir, "sweep.json")) as f:
    index = json.load(f)
  assert index["config"] == smoke_sweep.CONFIG and index["keys"] == ["seed"]
  assert index["overrides"]["model_cache"] == os.path.join(workdir, "models")
  assert [(p["name"], p["workdir"], p["overrides"], p["status"]) for p in index["points"]] == [
      ("seed=0", "seed=0", {"seed": 0}, "finished"), ("seed=1", "seed=1", {"seed": 1}, "finished")]
  for p in index["points"]:
    assert os.path.exists(os.path.join(workdir, p["workdir"], "results", "cka_intra.json"))
    assert p["seconds"] > 0
  with open(os.path.join(workdir, "seed=1", "config.json")) as f:
    assert json.load(f)["seed"] == 1

  def must_not_run(config, folder):
    raise AssertionError(f"finished point rerun: {folder}")

  again = sweep.Sweep(smoke_sweep.CONFIG, workdir, sweep=smoke_sweep.SWEEP,
                      overrides=smoke_sweep.OVERRIDES, config_sweep=False)
  assert [again.status(i) for i in range(2)] == ["finished", "finished"]
  assert [e["status"] for e in again.run(must_not_run)] == ["finished", "finished"]


def test_interrupted_point_resumes_and_failures_are_recorded(tmp_path):
  workdir, _ = smoke_sweep.run()
  s = sweep.Sweep(smoke_sweep.CONFIG, workdir, sweep=smoke_sweep.SWEEP,
                  overrides=smoke_sweep.OVERRIDES, config_sweep=False)
  # A point started but not finished (config.json, no result) runs again; finished ones do not.
  result = os.path.join(workdir, "seed=1", "results", "cka_intra.json")
  with open(result) as f:
    saved = f.read()
  os.remove(result)
  assert s.status(1) == "running"
  ran = []

  def fake(config, folder):
    ran.append(os.path.basename(folder))
    with open(result, "w") as f:
      f.write(saved)

  assert [e["status"] for e in s.run(fake)] == ["finished", "finished"] and ran == ["seed=1"]
  # A failing point is recorded and named; the others still have their turn.
  other = sweep.Sweep(CKA_SMOKE, str(tmp_path), sweep=["seed=5,6"], config_sweep=False)

  def fail_first(config, folder):
    if config.seed == 5:
      raise ValueError("boom")

  with pytest.raises(RuntimeError, match=r"\['seed=5'\]"):
    other.run(fail_first)
  with open(tmp_path / "sweep.json") as f:
    points = json.load(f)["points"]
  assert [(p["status"], p["error"]) for p in points] == [("failed", "ValueError: boom"),
                                                        ("finished", None)]


def _figures(run):
  folder = os.path.join(run, "figures")
  return {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def test_report_compares_two_sweep_points_and_redraws_deleted_figures(tmp_path):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_sweep.run()
  point_a, point_b = (os.path.join(workdir, p) for p in ("seed=0", "seed=1"))
  # --compare names another point of the same sweep, or its folder.
  for compare in ("seed=1", point_b):
    out = report.main(["--workdir", point_a, f"--compare={compare}",
                       f"--out={tmp_path / 'compare.html'}"])
    with open(out, encoding="utf-8") as f:
      page = f.read()
    assert "<h3>seed=0</h3>" in page and "<h3>seed=1</h3>" in page
    assert "difference: " in page  # the same layers in both points: a - b heatmaps
  with pytest.raises(FileNotFoundError, match=r"seed=7.*the points \['seed=0', 'seed=1'\]"):
    report.main(["--workdir", point_a, "--compare=seed=7"])
  # A copy of one point without figures/: the page redraws every figure from its recipe.
  run = str(tmp_path / "run")
  shutil.copytree(point_a, run)
  before = _figures(run)
  assert any(n.endswith(".png") for n in before) and any(n.endswith(".pdf") for n in before)
  pngs = {n: matplotlib.image.imread(os.path.join(run, "figures", n)).shape
          for n in before if n.endswith(".png")}
  shutil.rmtree(os.path.join(run, "figures"))
  with open(report.main(["--workdir", run]), encoding="utf-8") as f:
    page = f.read()
  assert sorted(_figures(run)) == sorted(before)
  for name, shape in pngs.items():
    assert matplotlib.image.imread(os.path.join(run, "figures", name)).shape == shape, name
  assert page.count('<img alt="') == len(pngs) and "not redrawn" not in page
