"""Killed with SIGKILL mid-stream and rerun, a run gives bit-identical results (CKA and other
similarity measures with their null: one of each kind of saved state)."""
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, cache, kill_at):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(REPO, "tests", "resume_worker.py"),
                         str(workdir), cache, str(kill_at)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def test_sigkill_mid_repeat_then_rerun_is_bit_identical(tmp_path, model_cache):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  proc = _run(whole, model_cache, 0)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Killed at the 4th save of attention distance (8 steps, a save after each), then in the
  # rerun, which resumes attention distance at step 3 (5 more saves), at cka_intra's 6th save:
  # inside its 2nd repeat of 3 (4 saves per repeat: after steps 1-3 and at the repeat's end).
  proc = _run(killed, model_cache, 4)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert os.path.exists(killed / "partial" / "attention_distance")
  assert not os.path.exists(killed / "results" / "attention_distance.json")
  proc = _run(killed, model_cache, 5 + 6)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert os.path.exists(killed / "results" / "attention_distance.json")
  saved = np.load(killed / "partial" / "cka_intra" / "vit" / "state.npz")
  position = json.loads(str(saved["__meta__"]))["position"]
  assert 4 < position < 8, position  # inside the second repeat
  proc = _run(killed, model_cache, 0)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "attention_distance: finished in an earlier run, not recomputed" in proc.stderr
  assert not os.path.exists(killed / "partial" / "cka_intra")
  a, b = (np.load(w / "results" / "attention_distance.npz") for w in (whole, killed))
  np.testing.assert_array_equal(a["vit"], b["vit"])
  a, b = (np.load(w / "results" / "cka_intra_vit.npz") for w in (whole, killed))
  assert sorted(a.files) == sorted(b.files)
  for name in ("values", "stderr", "examples_counted", "pwcca_null_p", "rsa_stderr",
               "distance_correlation_null_values"):
    assert name in a.files, (name, a.files)
  for key in a.files:  # CKA and every measure's values, errors and null, bit for bit
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_array_equal(b["examples_counted"], [256, 256, 256])  # none twice or lost
  with open(killed / "results" / "attention_distance.json") as f:
    assert json.load(f)["metrics"]["vit"]["num_images"] == 64
