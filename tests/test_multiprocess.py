"""2 processes x 2 CPU devices (jax.distributed + gloo) give the saved numbers of 1 process x 4.

One run of every analysis of `configs/demo.py:smoke`, the models trained once and shared through
the model cache, so that the analyses are compared alone; only process 0 writes; training under
2 processes matches 1 process to float32 rounding.
"""
import glob
import json
import os
import sys

import flax
import helpers
import jax
import numpy as np

from vit_analysis import config_lib, main, models
from vit_analysis.input import data
from vit_analysis.models import train as train_lib
from vit_analysis.runtime import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wall-clock and throughput fields differ between any two runs.
_TIMING = {"seconds", "examples_per_s", "first_batch_seconds", "train_seconds"}
# Standard errors over images come from float32 sums and sums of squares reduced on the devices:
# s^2 = (sum x^2 - (sum x)^2 / n) / (n - 1) multiplies the reduction order's rounding by
# (mean^2 + s^2) / s^2 (~10 for attention distances, 2e-5 relative between 1 and 2 processes),
# still far below an SE's own sampling error (1 / sqrt(2 (n - 1)), ~3% at n = 500).
_SE_RTOL = 1e-3


def _rtol(where):
  return _SE_RTOL if "stderr" in where else 1e-5


def _demo_smoke():
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def _compare(a, b, where):
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), where
    for k in a:
      if k not in _TIMING:
        _compare(a[k], b[k], f"{where}/{k}")
  elif isinstance(a, list) and a and not isinstance(a[0], str):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _compare(x, y, f"{where}[{i}]")
  elif isinstance(a, (int, float)) and not isinstance(a, bool):
    np.testing.assert_allclose(b, a, rtol=_rtol(where), atol=1e-6, err_msg=where)
  else:
    assert a == b, where


def test_two_processes_reproduce_one_process(tmp_path, model_cache):
  config = _demo_smoke()
  config.model_cache = model_cache
  reference = str(tmp_path / "one")
  main.run(config, reference)  # 1 process x 4 devices (conftest); trains the models once

  workdir, out = str(tmp_path / "two"), str(tmp_path / "out")
  os.makedirs(out)
  port = helpers.free_port()
  helpers.run_processes([[sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py"),
                          str(port), str(i), workdir, model_cache, "smoke", out]
                         for i in range(2)], timeout=900, what="2-process workers")

  with open(os.path.join(out, "writes1.json")) as f:
    assert json.load(f) == []  # process 1 wrote nothing under the workdir
  # Files only: results/recipes/ holds the figures' recipes (drawn, not measured).
  listed = lambda w: sorted(os.path.relpath(f, w) for f in glob.glob(f"{w}/results/*")
                            if os.path.isfile(f))
  files = listed(reference)
  assert len(files) >= 30
  assert files == listed(workdir)
  for rel in files:
    one, two = os.path.join(reference, rel), os.path.join(workdir, rel)
    if rel.endswith(".npz"):
      a, b = np.load(one), np.load(two)
      assert sorted(a.files) == sorted(b.files), rel
      for k in a.files:
        if a[k].dtype.kind in "fc":
          np.testing.assert_allclose(b[k], a[k], rtol=_rtol(f"{rel}:{k}"), atol=1e-6,
                                         err_msg=f"{rel}:{k}")
        else:
          np.testing.assert_array_equal(b[k], a[k], err_msg=f"{rel}:{k}")
    else:
      with open(one) as f1, open(two) as f2:
        _compare(json.load(f1), json.load(f2), rel)

  # Training: the same few steps on 1 process x 4 devices.
  cfg = train_lib.effective_config(config_lib.train_defaults(True),
                                   {"num_steps": 3, "batch_size": 16})
  outcome = train_lib.train(models.create_model("ViT-smoke_8", 10), cfg,
                            train_source=data.digits_source("train"),
                            test_source=data.digits_source("test"), image_size=32,
                            mesh=sharding.make_mesh(), workdir=str(tmp_path / "train1"), seed=0)
  one = flax.traverse_util.flatten_dict(jax.device_get(outcome.params), sep="/")
  for i in range(2):
    two = np.load(os.path.join(out, f"params{i}.npz"))
    assert sorted(two.files) == sorted(one)
    for k, v in one.items():
      np.testing.assert_allclose(two[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
