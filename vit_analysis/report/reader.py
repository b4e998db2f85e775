"""Reading a run's saved files: the one way the report and the findings read a workdir.

A workdir holds `results/<analysis>.json` (an `AnalysisResult` summary), `results/<stem>.npz`
(its arrays), `models.json`, `config.json` and `timings.json` (the layout of
`vit_analysis.runtime.workdir`, through which every file is read: local folders and `gs://`
alike). Nothing here imports JAX.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from vit_analysis.runtime import workdir as workdir_lib

RESULT_FIELDS = ("name", "title", "caption", "figures", "metrics", "seconds")


def as_result(result: Any) -> dict[str, Any]:
  """An AnalysisResult (or its JSON dict) as a plain dict of its fields."""
  if isinstance(result, Mapping):
    missing = [f for f in RESULT_FIELDS[:5] if f not in result]
    if missing:
      raise ValueError(f"result {result.get('name', '?')!r} lacks the fields {missing}")
    return {f: result.get(f, 0.0) for f in RESULT_FIELDS}
  return {f: getattr(result, f) for f in RESULT_FIELDS}


def read_json(path: str, default: Any = None) -> Any:
  """The JSON at `path`, or `default` when the file does not exist."""
  return workdir_lib.read_json(path, default)


def load_results(workdir: str) -> list[dict[str, Any]]:
  """The saved analysis summaries `results/<analysis>.json`, in the config's analysis order."""
  run = workdir_lib.Layout(workdir)
  if not workdir_lib.isdir(run.results_dir):
    raise FileNotFoundError(f"{workdir!r} has no results/ folder: is it a vit_analysis workdir?")
  found = {}
  for fname in workdir_lib.listdir(run.results_dir):
    if fname.endswith(".json"):
      d = read_json(workdir_lib.join(run.results_dir, fname))
      if isinstance(d, dict) and set(RESULT_FIELDS[:5]) <= set(d):
        found[d["name"]] = as_result(d)
  order = list((read_json(run.config, {}) or {}).get("analyses", ()))
  return [found[n] for n in order if n in found] + [r for n, r in found.items() if n not in order]


def load_models(workdir: str) -> list[dict[str, Any]]:
  """The model summaries of `models.json` (empty when absent)."""
  return list(read_json(workdir_lib.Layout(workdir).models_json, []))


def load_arrays(workdir: str, stem: str) -> dict[str, np.ndarray] | None:
  """The arrays of `results/<stem>.npz`, or None when absent."""
  path = workdir_lib.Layout(workdir).result(stem, ".npz")
  if not workdir_lib.exists(path):
    return None
  return workdir_lib.load_npz(path)


def split_tag(tag: str, keys: Collection[str]) -> tuple[str, str] | None:
  """'vit_gap_vs_resnet' -> ('vit_gap', 'resnet') using the known model keys; None if no split
  of the tag at a '_vs_' names two of them (model keys may themselves contain '_vs_')."""
  parts = tag.split("_vs_")
  for i in range(1, len(parts)):
    a, b = "_vs_".join(parts[:i]), "_vs_".join(parts[i:])
    if a in keys and b in keys:
      return a, b
  return None
