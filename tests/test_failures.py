"""Expected failures end plainly: one paragraph on stderr, a non-zero exit status, and nothing
non-finite or half-written left behind (issue #26)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_analysis import config_lib, main, models
from vit_analysis.input import data
from vit_analysis.models import train as train_lib
from vit_analysis.runtime import errors, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_VIT = "--config=configs/train_digits.py:smoke,model=vit"


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", errors.TRACEBACK_ENV)}
  return dict(env, JAX_PLATFORMS="cpu", **extra)


def _cli(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "vit_analysis.main", *args], cwd=REPO,
                        env=env or _env(), capture_output=True, text=True, timeout=timeout,
                        check=False)


def _ending(e):
  """What the command line prints and returns for `e` (in-process runs)."""
  return errors.plain_ending(e, "test", with_traceback=False)


def _smoke_vit(cache, **train):
  config = config_lib.base_config("smoke")
  del config.models["resnet"]
  config.model_cache = str(cache)
  config.train.update({"num_steps": 4, "log_every_steps": 1, **train})
  return config


def test_diverging_training_stops_at_the_first_non_finite_step(tmp_path):
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  proc = _cli(SMOKE_VIT, f"--workdir={workdir}", f"--config.model_cache={cache}",
              "--config.train.learning_rate=1e12", "--config.train.num_steps=8")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  # Step 3 (warm-up of 2 steps, then the full rate), found between two log lines (every 4).
  assert last.startswith("error: training of model 'vit' diverged at step 3: "), last
  assert "last finite loss" in last and "learning rate is most likely too high" in last
  assert "loss nan" not in proc.stderr and "test accuracy" not in proc.stderr
  (entry,) = os.listdir(cache)
  # Nothing of the diverged model: no summary, no checkpoint, only finite metrics lines.
  assert not os.path.exists(cache / entry / "summary.json")
  assert os.listdir(cache / entry / "ckpt") == []
  metrics = cache / entry / "metrics.jsonl"  # none before the first log line (step 4)
  for line in metrics.read_text().splitlines() if metrics.exists() else []:
    assert all(math.isfinite(v) for v in json.loads(line).values()), line
  assert not os.path.exists(workdir / "models.json")
  assert not os.path.exists(workdir / "report.html")


def _poison(folder):
  """Rewrites the last train state of a model cache entry with NaN parameters."""
  manager = ocp.CheckpointManager(os.path.abspath(folder / "ckpt"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  state = dict(restored["state"])
  state["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), state["params"])
  manager.delete(step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(restored["data"])))
  manager.wait_until_finished()
  manager.close()


# orbax's aborted reads of the mismatched arrays end as "exception ignored" coroutines.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_poisoned_model_cache_entry_is_refused_with_its_path(tmp_path, capsys):
  cache = tmp_path / "cache"
  config = _smoke_vit(cache, num_steps=2)
  main.run(config, str(tmp_path / "first"))
  (entry,) = os.listdir(cache)
  # Another architecture in the same folder (e.g. after a code change): refused with the path.
  sources = {k: data.get_source(config.data, k) for k in ("train", "test")}
  with pytest.raises(errors.UserError, match=f"does not fit model 'vit'.*delete the folder "
                     f"{cache / entry} and rerun"):
    train_lib.train(models.create_model("ViT-smoke_8", 7),
                    train_lib.effective_config(config.train, config.models.vit.train),
                    train_source=sources["train"], test_source=sources["test"], image_size=32,
                    mesh=sharding.make_mesh(), workdir=str(cache / entry), seed=0, name="vit")
  _poison(cache / entry)
  with pytest.raises(errors.UserError) as e:
    main.run(config, str(tmp_path / "second"))
  assert _ending(e.value) == 1
  text = capsys.readouterr().err.strip()
  assert "holds non-finite parameters" in text
  assert f"delete the folder {cache / entry}" in text and "Traceback" not in text
  assert os.path.exists(cache / entry)  # left for the user to delete, not silently replaced
  assert not os.path.exists(tmp_path / "second" / "models.json")


def test_unknown_config_override_is_one_line_naming_key_match_and_options(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli("--config=configs/cka_intra.py:smoke", f"--workdir={workdir}",
              "--config.cka_intra.repat=3")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
  assert "unknown config key 'cka_intra.repat' (did you mean 'repeats'?)" in proc.stderr
  assert "'num_examples'" in proc.stderr  # the valid options
  assert not os.path.exists(workdir)
  # --verbosity=1 brings the traceback back.
  proc = _cli("--config=configs/cka_intra.py:smoke", f"--workdir={workdir}",
              "--config.cka_intra.repat=3", "--verbosity=1")
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  assert "did you mean 'repeats'" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("traceback", [False, True])
def test_workdir_that_is_a_file_is_one_sentence(tmp_path, traceback):
  workdir, cache = tmp_path / "notadir", tmp_path / "cache"
  workdir.write_text("mine")
  env = _env(**{errors.TRACEBACK_ENV: "1"}) if traceback else _env()
  proc = _cli(SMOKE_VIT, f"--workdir={workdir}", f"--config.model_cache={cache}", env=env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: workdir '{workdir}' is a file, not a folder: pass another --workdir or move the "
      "file away")
  assert ("Traceback" in proc.stderr) == traceback
  assert workdir.read_text() == "mine" and not os.path.exists(cache)


def test_invalid_config_leaves_no_config_json(tmp_path):
  workdir = tmp_path / "run"
  config = _smoke_vit(tmp_path / "cache")
  config.models.vit.checkpoint = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError) as e:
    main.run(config, str(workdir))
  assert errors.is_expected(e.value) and _ending(e.value) == 1
  assert not os.path.exists(workdir)


def test_sigterm_saves_says_how_to_resume_and_the_rerun_finishes(tmp_path, model_cache):
  workdir = tmp_path / "run"
  args = ("--config=configs/cka_intra.py:smoke", f"--workdir={workdir}",
          f"--config.model_cache={model_cache}", "--config.cka_intra.checkpoint_every_s=0")
  proc = subprocess.Popen([sys.executable, "-m", "vit_analysis.main", *args], cwd=REPO,
                          env=_env(), stderr=subprocess.PIPE, text=True)
  log, deadline = [], time.time() + 240
  for line in proc.stderr:
    log.append(line)
    if "analysis cka_intra ..." in line:
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "".join(log[-20:])
  rest = proc.communicate(timeout=120)[1]
  log = "".join(log) + rest
  assert proc.returncode == 143, log[-3000:]
  assert rest.strip().splitlines()[-1] == (
      "interrupted at analysis cka_intra; rerun the same command to resume")
  assert "Traceback" not in log
  assert not os.path.exists(workdir / "results" / "cka_intra.json")
  proc = _cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(workdir / "results" / "cka_intra.json")
  assert os.path.exists(workdir / "report.html")


def test_interrupt_endings(capsys):
  """Ctrl-C ends with 130 and SIGTERM with 143, both with the same one line (the real SIGINT
  path differs from the SIGTERM one above only in the signal: Python raises KeyboardInterrupt)."""
  assert errors.plain_ending(KeyboardInterrupt(), "analysis probes", False) == 130
  assert errors.plain_ending(errors.Interrupted(signal.SIGTERM), "model vit", False) == 143
  assert capsys.readouterr().err.splitlines() == [
      "interrupted at analysis probes; rerun the same command to resume",
      "interrupted at model vit; rerun the same command to resume"]
  assert errors.plain_ending(RuntimeError("a bug"), "x", False) is None  # keeps its traceback
