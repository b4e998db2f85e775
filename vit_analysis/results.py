"""Every run as one table: `load(path)` -> a tidy pandas DataFrame of saved results.

  from vit_analysis import results
  df = results.load("runs/fig1")          # a workdir, a sweep folder or any folder of runs
  df[df.kind == "cell"].pivot_table(index="layer_a", columns="layer_b", values="value")

A run is a folder with `config.json` and `results/`. Each saved heatmap (`results/<analysis>_
<comparison>.npz` with its `.json`, as `similarity.cka_runner.RepeatedCKA.save` writes them)
gives one row per cell and measure: linear CKA as 'linear_cka' (its stderr averaged over
repeats, as the report shows it), every other measure by its name, each with `stderr`, `std`
(spread over repeats) and, with a shuffle null, `null_z`. Each numeric metric of
`results/<analysis>.json` gives one row (`kind='metric'`, `measure` its '/'-joined path, no
layers), with the metric `<name>_stderr` / `<name>_null_z` beside it as its error bar. A run
inside a sweep (a `sweep.json` above it that lists it) has a column per swept key.

Reads files only: no JAX, so it works in any notebook.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from vit_analysis.report import page as report
from vit_analysis.runtime import workdir as workdir_lib

# Columns every frame has, in this order; swept config keys follow.
COLUMNS = ("run", "workdir", "analysis", "comparison", "kind", "measure", "layer_a", "layer_b",
           "value", "stderr", "std", "null_z")
_SKIP_DIRS = {workdir_lib.MODELS, workdir_lib.PARTIAL, workdir_lib.FIGURES, workdir_lib.RESULTS}


def find_runs(path: str) -> list[str]:
  """Every run folder at or under `path` (config.json + results/), sorted."""
  runs = []
  for folder, dirs, files in workdir_lib.walk(path):
    if workdir_lib.CONFIG in files and workdir_lib.RESULTS in dirs:
      runs.append(folder)
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
  return sorted(runs)


def swept_values(run: str) -> dict[str, Any]:
  """The run's point overrides from the nearest `sweep.json` above it that lists it ({} if none)."""
  run = workdir_lib.absolute(run).rstrip("/") or "/"
  folder = workdir_lib.parent(run)
  while folder is not None:
    index = workdir_lib.read_json(workdir_lib.Layout(folder).sweep)
    if index is not None:
      rel = workdir_lib.relpath(run, folder)
      for p in index.get("points", []):
        if os.path.normpath(p.get("workdir", p.get("name", ""))) == rel:
          return {k: tuple(v) if isinstance(v, list) else v
                  for k, v in p.get("overrides", {}).items()}
    folder = workdir_lib.parent(folder)
  return {}


def _heatmaps(run: str, analyses: list[str]) -> list[pd.DataFrame]:
  """One frame per saved comparison of a finished analysis: a row per (measure, cell)."""
  folder = workdir_lib.Layout(run).results_dir
  names = workdir_lib.listdir(folder)
  frames = []
  for fname in names:
    name = fname[:-len(".npz")]
    stem = workdir_lib.join(folder, name)
    if not fname.endswith(".npz") or name + ".json" not in names:  # .json: written last
      continue
    meta = workdir_lib.read_json(stem + ".json")
    if not isinstance(meta, dict) or "names_a" not in meta:
      continue
    owners = [a for a in analyses if name.startswith(a + "_")]
    if not owners:  # arrays of an analysis whose result is not saved (yet)
      continue
    analysis = max(owners, key=len)
    arrays = workdir_lib.load_npz(stem + ".npz")
    names_a, names_b = [str(n) for n in meta["names_a"]], [str(n) for n in meta["names_b"]]
    # linear CKA: 'mean', per-repeat 'stderr' [R, A, B]; other measures '<m>_mean', '<m>_stderr'.
    measures = {"linear_cka": ("mean", "stderr", "std", "cka_null_z")}
    measures.update({m: (f"{m}_mean", f"{m}_stderr", f"{m}_std", f"{m}_null_z")
                     for m in meta.get("measures", []) if m != "linear_cka"})
    for measure, (mean, stderr, std, null_z) in measures.items():
      if mean not in arrays:
        continue
      shape = arrays[mean].shape
      cols = {"comparison": name[len(analysis) + 1:], "analysis": analysis, "kind": "cell",
              "measure": measure,
              "layer_a": np.repeat(names_a, len(names_b)),
              "layer_b": np.tile(names_b, len(names_a)),
              "value": arrays[mean].reshape(-1)}
      for col, key in (("stderr", stderr), ("std", std), ("null_z", null_z)):
        a = arrays.get(key)
        if a is not None and a.ndim == len(shape) + 1:  # per repeat: the mean over repeats
          a = a.mean(0)
        cols[col] = (np.broadcast_to(a, shape).reshape(-1).astype(float) if a is not None
                     else np.full(math.prod(shape), np.nan))
      frames.append(pd.DataFrame(cols))
  return frames


def _flatten(metrics: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in (metrics or {}).items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metrics(result: dict[str, Any]) -> pd.DataFrame:
  """A row per numeric metric of one analysis, its `_stderr` / `_null_z` siblings beside it."""
  flat = {k: v for k, v in _flatten(result["metrics"]).items() if _is_number(v)}
  rows = []
  for key, value in flat.items():
    if (key.endswith("_stderr") and key[:-len("_stderr")] in flat) or (
        key.endswith("_null_z") and key[:-len("_null_z")] in flat):
      continue  # shown as the error bar of its metric
    rows.append(dict(analysis=result["name"], comparison=None, kind="metric", measure=key,
                     layer_a=None, layer_b=None, value=float(value),
                     stderr=float(flat.get(f"{key}_stderr", np.nan)), std=np.nan,
                     null_z=float(flat.get(f"{key}_null_z", np.nan))))
  return pd.DataFrame(rows)


def load(path: str) -> pd.DataFrame:
  """Every run at or under `path` as one tidy frame (see the module docstring).

  Columns: `COLUMNS`, then one per swept config key (dotted, as in sweep.json; empty for runs
  outside a sweep). `run` is the run's folder relative to `path` (its name when `path` is the run).

  Raises:
    FileNotFoundError: when `path` holds no run.
  """
  runs = find_runs(path)
  if not runs:
    raise FileNotFoundError(f"no run (config.json + results/) at or under {path!r}")
  frames, swept_keys = [], []
  for run in runs:
    results = report.load_results(run)
    parts = _heatmaps(run, [r["name"] for r in results]) + [_metrics(r) for r in results]
    parts = [p for p in parts if len(p)]
    if not parts:
      continue
    frame = pd.concat(parts, ignore_index=True)
    rel = workdir_lib.relpath(run, path)
    frame.insert(0, "run", workdir_lib.basename(workdir_lib.absolute(run)) if rel == "." else rel)
    frame.insert(1, "workdir", workdir_lib.absolute(run))
    for key, value in swept_values(run).items():
      swept_keys.append(key)
      frame[key] = [value] * len(frame)
    frames.append(frame)
  swept_keys = list(dict.fromkeys(swept_keys))
  if not frames:
    return pd.DataFrame(columns=list(COLUMNS) + swept_keys)
  df = pd.concat(frames, ignore_index=True)
  for key in swept_keys:
    if key not in df:
      df[key] = None
  return df[list(COLUMNS) + swept_keys]
