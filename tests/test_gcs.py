"""A run on gs:// for real, against a Cloud Storage API server on localhost (tests/gcs.py).

Two smoke runs sharing a model cache on the bucket (orbax's checkpoints, through tensorstore), a
SIGKILL mid-run, its rerun ("finished in an earlier run, not recomputed") and resume to
identical arrays, the page rebuilt from the bucket without figures/ (each figure redrawn from its
recipe), and `runtime.workdir`'s one write, on a local disk and on the bucket.
Nothing may land in a local folder named `gs:`.
"""
import base64
import io
import json
import os
import re
import subprocess
import sys

import gcs
import helpers
import numpy as np
import pytest

from vit_analysis.report import page as report
from vit_analysis.runtime import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket():
  """The emulator's environment, also set in this process; skipped only where it cannot start."""
  reason = gcs.missing()
  if reason:
    helpers.skip_unless_ci(reason)
  try:
    server = gcs.emulator()
    _, env = server.__enter__()
  except RuntimeError as e:
    helpers.skip_unless_ci(f"the Cloud Storage emulator did not start: {e}")
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"  # if fsspec read its env earlier
  try:
    yield env
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.__exit__(None, None, None)


def _run(args, env, cwd, timeout=600):
  env = dict(os.environ, **env, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------------------------------------
# runtime.workdir: the layout and the one write.


def test_layout_names_every_path():
  run = workdir.Layout("gs://b/run")
  assert run.config == "gs://b/run/config.json"
  assert run.result("cka_intra") == "gs://b/run/results/cka_intra.json"
  assert run.result("cka_intra_vit", ".npz") == "gs://b/run/results/cka_intra_vit.npz"
  assert run.figure("x") == "gs://b/run/figures/x.png"
  assert run.partial("cka_intra", "vit") == "gs://b/run/partial/cka_intra/vit"
  assert (run.models, run.models_json, run.timings, run.report, run.sweep) == (
      "gs://b/run/models", "gs://b/run/models.json", "gs://b/run/timings.json",
      "gs://b/run/report.html", "gs://b/run/sweep.json")
  assert workdir.absolute("gs://b/run") == "gs://b/run"  # never <cwd>/gs:/...
  assert workdir.absolute("rel") == os.path.abspath("rel")
  assert workdir.parent("gs://b/run/x") == "gs://b/run" and workdir.parent("gs://b") is None
  assert workdir.relpath("gs://b/run/p1", "gs://b/run") == "p1"
  assert workdir.basename("gs://b/run/") == "run"


def test_local_write_replaces_whole_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / "sub" / "a.json")
  workdir.write_json(path, {"v": 1})  # the folder is created
  assert workdir.read_json(path) == {"v": 1}
  assert oct(os.stat(path).st_mode & 0o777) == "0o644"

  def crash(src, dst):
    raise OSError("disk died between write and rename")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="disk died"):
    workdir.write_json(path, {"v": 2})
  monkeypatch.undo()
  assert workdir.read_json(path) == {"v": 1}  # the old file, whole
  assert os.listdir(tmp_path / "sub") == ["a.json"]  # the temporary file is gone
  workdir.save_npz(str(tmp_path / "z.npz"), a=np.arange(3), b=np.eye(2))
  z = workdir.load_npz(str(tmp_path / "z.npz"))
  np.testing.assert_array_equal(z["a"], np.arange(3))
  assert workdir.read_json(str(tmp_path / "missing.json"), "default") == "default"


def test_bucket_write_is_one_object(bucket, tmp_path):
  del bucket
  root = "gs://bucket/unit"
  path = workdir.join(root, "results", "a.json")
  assert not workdir.exists(path) and workdir.listdir(root) == []
  workdir.write_json(path, {"v": 1})
  workdir.write_json(path, {"v": 2})  # overwritten by one upload, not by a renamed copy
  assert workdir.read_json(path) == {"v": 2}
  assert workdir.listdir(workdir.join(root, "results")) == ["a.json"]  # no temporary object
  assert workdir.isdir(workdir.join(root, "results")) and workdir.isfile(path)
  workdir.save_npz(workdir.join(root, "results", "z.npz"), a=np.arange(4.0))
  np.testing.assert_array_equal(workdir.load_npz(workdir.join(root, "results", "z.npz"))["a"],
                                np.arange(4.0))
  assert [f for _, _, files in workdir.walk(root) for f in files] == ["a.json", "z.npz"]
  with pytest.raises(FileNotFoundError):
    workdir.read_bytes(workdir.join(root, "nothing"))
  workdir.remove(path)
  assert not workdir.exists(path)
  workdir.rmtree(root)
  assert not workdir.exists(workdir.join(root, "results", "z.npz"))
  assert not os.path.exists("gs:") and not os.path.exists(tmp_path / "gs:")


def test_report_redraws_missing_figures_and_names_those_it_cannot(tmp_path):
  import test_report  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  test_report.make_workdir(run)
  results = test_report._results(run)  # pylint: disable=protected-access
  for r in results:  # as main.run saves them, each naming its PNG under figures/
    workdir.write_text(workdir.Layout(run).result(r.name), r.to_json())
  figures = [f for r in results for f in r.figures]
  assert figures and all(workdir.exists(os.path.join(run, f)) for f in figures)
  page = _read(report.rebuild(run))  # figures/ present: the PNGs inlined
  assert page.count('<img alt="') == len(results)
  before = _figures(run)
  workdir.rmtree(os.path.join(run, "figures"))
  page = _read(report.main(["--workdir", run]))  # redrawn from results/recipes/, written back
  _assert_same_figures(before, _figures(run))
  assert page.count('<img alt="') == len(results) and "not redrawn" not in page
  # A missing recipe, and one naming a function outside vit_analysis.plotting: named, not run.
  workdir.rmtree(os.path.join(run, "figures"))
  workdir.remove(workdir.Layout(run).recipe("a"))
  workdir.write_json(workdir.Layout(run).recipe("b"), {"plot": "os:system", "args": {}})
  page = _read(report.main(["--workdir", run]))
  assert '<img alt="' not in page and _figures(run) == {}
  assert f"{figures[0]}</code> absent and not redrawn: no recipe" in page
  assert f"{figures[1]}</code> absent and not redrawn: recipe plot &#x27;os:system&#x27; is " \
         "not a function of vit_analysis.plotting" in page
  assert "Plotly.newPlot" in page  # the interactive figures, from results/ alone


def _read(path):
  return workdir.read_text(path)


# ------------------------------------------------------------------------------------------------
# Whole runs on the bucket.


def _figures(run):
  """{file name: bytes} of a run's figures/ folder (local or gs://)."""
  folder = workdir.Layout(run).join("figures")
  return {n: workdir.read_bytes(workdir.join(folder, n)) for n in workdir.listdir(folder)}


def _assert_same_figures(before, after):
  """The same files; each PNG decodes to an image of the same size (the redraw's look)."""
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  assert sorted(after) == sorted(before) and before
  for name, data in before.items():
    if name.endswith(".png"):
      old, new = (matplotlib.image.imread(io.BytesIO(d), format="png") for d in (data, after[name]))
      assert new.shape == old.shape and new.std() > 0, name
    else:
      assert after[name][:5] == data[:5] == b"%PDF-", name


def test_smoke_run_shared_bucket_cache_and_redrawn_figures(bucket, tmp_path):
  """Two runs on the bucket sharing a model cache on the bucket (orbax through tensorstore), and
  the second's page rebuilt with figures/ deleted. (A rerun's skipping on the bucket: the SIGKILL
  test below.)"""
  cache = "gs://bucket/models"
  first, run = "gs://bucket/first", "gs://bucket/smoke"
  args = lambda w: ["-m", "vit_analysis.main", "--config=configs/cka_intra.py:smoke",
                    f"--workdir={w}", f"--config.model_cache={cache}"]
  proc = _run(args(first), bucket, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert re.search(r"\] step \d+/\d+ loss", proc.stderr)  # trained, into the bucket's cache
  models = workdir.listdir(cache)
  assert any(m.startswith("ViT-smoke_8-") for m in models), models
  vit = workdir.join(cache, next(m for m in models if m.startswith("ViT-smoke_8-")))
  assert "ckpt" in workdir.listdir(vit) and workdir.exists(workdir.join(vit, "summary.json"))
  # Another run naming the same cache trains nothing: the models come from the bucket.
  proc = _run(args(run), bucket, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert not re.search(r"\] step \d+/\d+ loss", proc.stderr)
  assert "resumed from step" in proc.stderr  # restored from the bucket (orbax, tensorstore)
  layout = workdir.Layout(run)
  assert workdir.read_json(layout.result("cka_intra"))["name"] == "cka_intra"
  for path in (layout.config, layout.models_json, layout.timings, layout.report,
               layout.result("cka_intra_vit", ".npz"), layout.figure("cka_intra_vit"),
               layout.recipe("cka_intra_vit")):
    assert workdir.exists(path), path
  assert not workdir.exists(layout.partial("cka_intra"))
  assert not os.path.exists(os.path.join(REPO, "gs:"))
  # The page from results/ alone, on the bucket, figures/ gone: every figure drawn again from
  # its recipe, written back to the bucket and inlined.
  before = _figures(run)
  workdir.rmtree(layout.join("figures"))
  workdir.remove(layout.report)
  assert _figures(run) == {}
  proc = _run(["-m", "vit_analysis.report", f"--workdir={run}"], bucket, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.startswith("gs://bucket/smoke/report.html ")
  _assert_same_figures(before, _figures(run))
  page = workdir.read_text(layout.report)
  assert "Plotly.newPlot" in page and "not redrawn" not in page
  assert page.count('<img alt="') == sum(n.endswith(".png") for n in before)
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(os.path.join(REPO, "gs:"))


def _worker(workdir_, cache, kill_at, env, cwd):
  return _run([os.path.join(REPO, "tests", "resume_worker.py"), workdir_, cache, str(kill_at)],
              env, cwd=cwd)


def test_sigkill_on_the_bucket_then_rerun_is_identical(bucket, tmp_path, model_cache):
  cache = model_cache
  whole, killed = "gs://bucket/whole", "gs://bucket/killed"
  proc = _worker(whole, cache, 0, bucket, str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  # Killed at attention distance's last save + cka_intra's 3rd (tests/test_resume_e2e.py counts
  # them): attention distance finished, cka_intra inside its first repeat.
  proc = _worker(killed, cache, 8 + 3, bucket, str(tmp_path))
  assert proc.returncode == -9, proc.stderr[-4000:]
  k = workdir.Layout(killed)
  assert workdir.exists(k.result("attention_distance"))
  state = workdir.load_npz(workdir.join(k.partial("cka_intra", "vit"), "state.npz"))
  assert 0 < json.loads(str(state["__meta__"]))["position"] < 8
  proc = _worker(killed, cache, 0, bucket, str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "attention_distance: finished in an earlier run, not recomputed" in proc.stderr
  assert not workdir.exists(k.partial("cka_intra"))
  w = workdir.Layout(whole)
  a, b = (workdir.load_npz(r.result("attention_distance", ".npz")) for r in (w, k))
  np.testing.assert_array_equal(a["vit"], b["vit"])
  a, b = (workdir.load_npz(r.result("cka_intra_vit", ".npz")) for r in (w, k))
  for key in ("values", "stderr", "examples_counted"):
    np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(b["examples_counted"], [256, 256, 256])
  assert not os.path.exists(tmp_path / "gs:")


def test_png_tag_is_base64_of_the_file(bucket):
  del bucket
  png = b"\x89PNG\r\n\x1a\nfake"
  workdir.write_bytes("gs://bucket/tag/figures/x.png", png)
  tag = report._image_tag("gs://bucket/tag", "figures/x.png")  # pylint: disable=protected-access
  assert base64.b64decode(tag.split("base64,", 1)[1].rstrip('">')) == png


def test_sweep_dry_run_prints_the_readme_tpu_lines():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme[readme.index("### Launch on a TPU VM"):]
  section = section[:section.index("\n## ")]
  documented = [line for line in section.splitlines()
                if line.startswith("gcloud compute tpus tpu-vm ssh")
                and "vit_analysis.main" in line]
  dry = next(line for line in section.splitlines() if "--dry_run" in line)
  proc = _run(dry.split()[1:], {}, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = [line for line in proc.stdout.splitlines() if line.startswith("gcloud ")]
  assert len(documented) == 6 and printed == documented
