"""Every script in benchmarks/ runs its `--smoke` mode and prints its table, so none can rot.

Each runs as a user would (`python benchmarks/<name>.py --smoke`, from the repository root, the
package on PYTHONPATH) in its own process: the benchmarks set their own JAX options, and a crash
in one must not take the others' results with it. The processes run two at a time (the slow
part is each one's compiles, not the work); every test waits only for its own.
"""
import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TIMEOUT_S = 300

# name -> (arguments, lines of its table that must appear).
CASES = {
    "capture_overhead": (["--smoke"], ["blocks/fwd", "grams/fwd", "ViT-smoke_8", "R-smoke"]),
    # Both tables; the peers are optional (torch): each is printed as measured or unavailable.
    "cka_bench": (["--smoke"], ["ours/XLA wall", "ours cross ViT x ResNet", "ours intra",
                                "max |dCKA|", "ours: cka.minibatch_cka", "cka-pytorch, 1 epoch",
                                "torch-cka", "ours: Grams on XLA's GEMM",
                                "Gram path on CPU: SYRK custom call", "through the custom call"]),
    "input_bench": (["--smoke"], ["CPU ms/image", "Stream, 2 workers, to device",
                                  "fine-preset CKA step", "workers"]),
    "measures_bench": (["--smoke"], ["x linear_cka", "procrustes (method=newton_schulz)",
                                     "z (X vs X)", "Gram of one layer",
                                     "fine step, linear CKA alone", "fine step, every measure on"]),
    "probe_bench": (["--smoke"], ["max |acc diff|", "l2 agree 100%"]),
    "zoo_bench": (["--smoke"], ["zoo (one pass", "separate (3 intra + 3 cross", "speed-up",
                                "projected TPU v3-8: zoo of"]),
}


def _script(case: str) -> str:
  return os.path.join("benchmarks", case + ".py")


def _run(case: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
  # XLA:CPU optimisation level 0 halves the compiles, which are most of a smoke run.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  try:
    return subprocess.run([sys.executable, _script(case), *CASES[case][0]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:
    return subprocess.CompletedProcess(e.cmd, -1, e.stdout or "", f"timed out after {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def runs():
  """{case: future of its CompletedProcess}, started together, two processes at a time."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    yield {case: pool.submit(_run, case) for case in CASES}


def test_every_benchmark_has_a_case():
  scripts = {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")}
  assert scripts == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_smoke_run_prints_its_table(runs, case):
  proc = runs[case].result()
  log = f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
  assert proc.returncode == 0, f"{_script(case)} {CASES[case][0]} failed:\n{log}"
  for line in CASES[case][1]:
    assert line in proc.stdout, f"{line!r} not printed by {_script(case)}:\n{log}"


def test_input_benchmark_writes_distinct_jpegs_and_measures_every_path(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top

  from vit_analysis.input import data  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("input_bench",
                                                os.path.join(ROOT, _script("input_bench")))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  paths = bench.write_images(str(tmp_path), 4, size=(40, 30))
  assert len({pathlib.Path(p).read_bytes() for p in paths}) == 4  # four different files
  assert data.FolderSource(str(tmp_path))[0]["image"].shape == (30, 40, 3)
  rates = bench.input_rates(str(tmp_path), image_size=16, reps=1, step_size=4)
  assert set(rates) == {"decode", "old_path", "stream_host_w1", "stream_device_w1",
                        "stream_host_w2", "stream_device_w2"}
  assert all(r > 0 and ms >= 0 for r, ms in rates.values())
