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
                                "torch-cka"]),
    "input_bench": (["--smoke"], ["CPU ms/image", "Stream, 2 workers, to device",
                                  "fine-preset CKA step", "workers"]),
    "measures_bench": (["--smoke"], ["x linear_cka", "procrustes (method=newton_schulz)",
                                     "z (X vs X)", "Gram of one layer"]),
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
