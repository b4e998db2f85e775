"""The report's interactive figures, rebuilt from a workdir's saved results alone (no JAX).

Each analysis saves its arrays under `results/` (see each `vit_analysis.analyses` module):
CKA-family comparisons as `results/<analysis>_<tag>.npz` (values [R, A, B], stderr [R, A, B],
mean, std, names_a, names_b, plus per-measure `<measure>_mean|_stderr|_null_z` when computed),
and per-model arrays in `results/<analysis>.npz`. `figures(run_dir, result)` turns the saved
arrays of one analysis into (caption, plotly figure) pairs; `differences(dir_a, dir_b, ...)` draws
`a - b` grids for the comparisons two runs share.
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vit_analysis.models import layers
from vit_analysis.plotting import similarity as plots
from vit_analysis.report import interactive, reader
from vit_analysis.runtime import workdir as workdir_lib

Figure = tuple[str, dict[str, Any]]
_CKA_FAMILY = ("cka_intra", "cka_cross", "cka_zoo", "skip_removal", "head_subsets", "localization",
               "dataset_scale")


def load_npz(path: str) -> dict[str, np.ndarray]:
  return workdir_lib.load_npz(path)  # local or gs://


def comparison_stems(run_dir: str, analysis: str) -> list[str]:
  """Stems `<analysis>_<tag>` of the saved CKA-family comparisons of one analysis, sorted."""
  names = workdir_lib.listdir(workdir_lib.Layout(run_dir).results_dir)
  return [n[:-4] for n in names if fnmatch.fnmatchcase(n, f"{analysis}_*.npz")]


def _stderr(z: Mapping[str, np.ndarray]) -> np.ndarray | None:
  # Per-repeat jackknife errors over minibatches, averaged over the repeats.
  return np.asarray(z["stderr"], np.float64).mean(0) if "stderr" in z else None


def _spread(z: Mapping[str, np.ndarray]) -> np.ndarray | None:
  return np.asarray(z["std"]) if "std" in z and len(z.get("values", [0, 0])) > 1 else None


def measures(z: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray | None]]:
  """Measure name -> {'mean', 'stderr', 'null_z'} for the `<measure>_mean` keys of a saved npz."""
  out = {}
  for key in z:
    if key.endswith("_mean") and np.ndim(z[key]) == 2:
      m = key[:-len("_mean")]
      out[m] = {"mean": z[key], "stderr": z.get(f"{m}_stderr"), "null_z": z.get(f"{m}_null_z"),
                "null_p": z.get(f"{m}_null_p")}
  return out


def _loo(z: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The largest change of the cell when one minibatch is left out (max over repeats)."""
  if "max_leave_one_out" not in z:
    return {}
  return {"max change, one minibatch left out": np.asarray(z["max_leave_one_out"]).max(0)}


def _null_p(p: np.ndarray | None) -> dict[str, np.ndarray] | None:
  return None if p is None else {"null p (permutations)": p}


def _names(z: Mapping[str, np.ndarray], key: str) -> list[str]:
  return [str(n) for n in z[key]]


def cka_figures(z: Mapping[str, np.ndarray], title: str, model_a: str = "",
                model_b: str = "") -> list[Figure]:
  """The CKA grid of one saved comparison, then one grid per extra saved measure."""
  names_a, names_b = _names(z, "names_a"), _names(z, "names_b")
  repeats = len(z["values"]) if "values" in z else 1
  figs = [(f"{title}: CKA, mean over {repeats} repeat(s)", interactive.cka_heatmap(
      z["mean"], names_a, names_b, stderr=_stderr(z), spread=_spread(z),
      null_z=z.get("cka_null_z", z.get("null_z")),
      extra={**(_null_p(z.get("cka_null_p")) or {}), **_loo(z)},
      title=title, model_a=model_a, model_b=model_b))]
  for m, f in measures(z).items():
    if m == "cka":
      continue
    if m.endswith("_null"):
      # A null's mean on its measure's own scale, so that noise near 0 looks like noise; a
      # measure of unknown range on a diverging scale centred at 0.
      base = "linear_cka" if m == "cka_null" else m[:-len("_null")]
      figs.append((f"{title}: {base}, mean under the shuffle null", interactive.cka_heatmap(
          f["mean"], names_a, names_b, title=f"{title}: {base} under the shuffle null",
          model_a=model_a, model_b=model_b, measure=f"{base} (null mean)",
          **_colour(base, f["mean"]))))
      continue
    figs.append((f"{title}: {m}", interactive.cka_heatmap(
        f["mean"], names_a, names_b, stderr=f["stderr"], null_z=f["null_z"],
        extra=_null_p(f["null_p"]), title=f"{title}: {m}", model_a=model_a, model_b=model_b,
        measure=m, **_colour(m, f["mean"]))))
  return figs


def _colour(measure: str, mean: np.ndarray) -> dict[str, Any]:
  """A measure's (or its null's) colour range as the static figure draws it
  (`plotting.similarity.colour_scale`): its own range, or diverging and symmetric about 0."""
  lo, hi, diverging = plots.colour_scale(measure, mean)
  return {"value_range": (lo, hi), **({"colorscale": "RdBu"} if diverging else {})}


def _model_name(models: Mapping[str, Mapping[str, Any]], key: str) -> str:
  name = models.get(key, {}).get("name")
  return f"{key} ({name})" if name else key


def _similarity(run_dir, result, models) -> list[Figure]:
  figs = []
  for stem in comparison_stems(run_dir, result["name"]):
    tag = stem[len(result["name"]) + 1:]
    pair = reader.split_tag(tag, models) if "_vs_" in tag else (tag, tag)
    a, b = pair or tag.split("_vs_", 1)  # keys not in models.json: split at the first "_vs_"
    z = load_npz(os.path.join(run_dir, "results", stem + ".npz"))
    figs += cka_figures(z, f"{_model_name(models, a)} vs {_model_name(models, b)}",
                        _model_name(models, a), _model_name(models, b))
  return figs


def _zoo(run_dir, result, models) -> list[Figure]:
  """A CKA zoo: the model x model summary, every grid as one panel figure, then each grid."""
  name = result["name"]
  summary = os.path.join(run_dir, "results", f"{name}_summary.npz")
  if not workdir_lib.exists(summary):  # local or gs://
    return []
  z = load_npz(summary)
  keys = [str(k) for k in z["keys"]]
  labels = [_model_name(models, k) for k in keys]
  figs = [("Which models resemble which: mean CKA of each grid's diagonal band (layers within "
           "10% of relative depth)", interactive.heatmap(
               z["band_mean"], row_names=labels, col_names=labels, title="CKA zoo summary",
               value_name="band mean CKA", zmin=0.0, zmax=1.0, square=True, height=420))]
  grids, per_grid = {}, []
  for stem in comparison_stems(run_dir, name):
    tag = stem[len(name) + 1:]
    if tag == "summary":
      continue
    a, b = (reader.split_tag(tag, keys) or ("", "")) if "_vs_" in tag else (tag, tag)
    if a not in keys or b not in keys:
      continue
    arrays = load_npz(os.path.join(run_dir, "results", stem + ".npz"))
    i, j = keys.index(a), keys.index(b)
    grids[(i, j)] = arrays["mean"]
    if i != j:
      grids[(j, i)] = np.asarray(arrays["mean"]).T
    per_grid += cka_figures(arrays, f"{_model_name(models, a)} vs {_model_name(models, b)}",
                            _model_name(models, a), _model_name(models, b))
  figs.append(("Every intra-model (diagonal) and cross-model grid of the zoo, one pass",
               interactive.zoo_grid(grids, labels, title="CKA zoo")))
  return figs + per_grid


def _skip_removal(run_dir, result, models) -> list[Figure]:
  figs = []
  for stem in comparison_stems(run_dir, "skip_removal"):
    key = stem[len("skip_removal_"):]
    m = result["metrics"].get(key, {})
    acc = m.get("test_accuracy") if isinstance(m, Mapping) else None
    removed = m.get("skip_removed") if isinstance(m, Mapping) else None
    label = f"{key}: skips of block {removed} removed" if removed else f"{key}: unmodified"
    if acc is not None:
      label += f", test accuracy {100 * acc:.1f}%"
    figs += cka_figures(load_npz(os.path.join(run_dir, "results", stem + ".npz")), label)
  return figs


def _head_subsets(run_dir, result, models) -> list[Figure]:
  figs = []
  for stem in comparison_stems(run_dir, "head_subsets"):
    z = load_npz(os.path.join(run_dir, "results", stem + ".npz"))
    mean = np.asarray(z["mean"]).T  # [other layers, subsets]
    err = np.asarray(z["std"]).T if _spread(z) is not None else None
    title = stem[len("head_subsets_"):]
    figs.append((title, interactive.head_subset_lines(
        z["subset_distance"], mean, _names(z, "names_b"), error=err, title=title)))
  return figs


def _localization(run_dir, result, models) -> list[Figure]:
  figs = []
  for stem in comparison_stems(run_dir, "localization"):
    z = load_npz(os.path.join(run_dir, "results", stem + ".npz"))
    g = int(z["grid"])
    tokens = [tuple(int(v) for v in t) for t in np.asarray(z["tokens"]).reshape(-1, 2)]
    title = stem[len("localization_"):]
    blank = int(np.isnan(np.asarray(z["mean"], np.float64)).all(0).sum())
    note = f"; {blank} of {g * g} input patches constant, left out (blank)" if blank else ""
    figs.append((title, interactive.localization_maps(
        z["mean"], g, tokens, stderr=_stderr(z), spread=_spread(z),
        title=f"{title}: CKA(token, input patch){note}")))
  return figs


def _dataset_scale(run_dir, result, models) -> list[Figure]:
  panels: dict[str, dict[str, Mapping[str, np.ndarray]]] = {}
  for stem in comparison_stems(run_dir, "dataset_scale"):
    rest = stem[len("dataset_scale_"):]
    panel = next((p for p in ("data_fraction", "finetune") if rest.startswith(p + "_")),
                 rest.split("_")[0])
    z = load_npz(os.path.join(run_dir, "results", stem + ".npz"))
    label = str(z["label"]) if "label" in z else rest[len(panel) + 1:]
    panels.setdefault(panel, {})[label] = z
  figs = []
  for panel, curves in panels.items():
    names = {k: _names(z, "names_a") for k, z in curves.items()}
    errors = {k: np.diag(z["std"]) for k, z in curves.items() if _spread(z) is not None}
    title = ("subset model vs 100% model" if panel == "data_fraction" else
             "before vs after fine-tuning" if panel == "finetune" else panel)
    figs.append((title, interactive.depth_lines(
        {k: np.diag(z["mean"]) for k, z in curves.items()}, names=names, errors=errors,
        title=f"per-block CKA: {title}", y_title="CKA", y_range=(0, 1.02))))
  return figs


def _attention_distance(run_dir, result, models) -> list[Figure]:
  path = os.path.join(run_dir, "results", "attention_distance.npz")
  if not workdir_lib.exists(path):
    return []
  z = load_npz(path)
  metrics = result["metrics"]
  uniform = {_model_name(models, k): metrics[k]["uniform_attention"] for k in z
             if isinstance(metrics.get(k), Mapping) and "uniform_attention" in metrics[k]}
  return [("attention distance", interactive.attention_distances(
      {_model_name(models, k): v for k, v in z.items()}, uniform=uniform))]


def _skip_norms(run_dir, result, models) -> list[Figure]:
  path = os.path.join(run_dir, "results", "skip_norms.npz")
  if not workdir_lib.exists(path):
    return []
  z = load_npz(path)
  keys = list(dict.fromkeys(k.split("/")[0] for k in z))  # model order of the saved file
  ratio, cos, names, figs = {}, {}, {}, []
  for key in keys:
    labels = _names(z, f"{key}/labels")
    r, c = np.asarray(z[f"{key}/ratio"], np.float64), np.asarray(z[f"{key}/cos_out"], np.float64)
    metrics = result["metrics"].get(key, {})
    kinds: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
      kinds.setdefault(label.split("/")[-1] if r.shape[1] > 1 else "unit", []).append(i)
    for kind, idx in kinds.items():
      block_names = [labels[i] for i in idx]
      if r.shape[1] == 1:
        ratio[f"{key} ({kind})"], cos[f"{key} ({kind})"] = r[idx, 0], c[idx, 0]
        names[f"{key} ({kind})"] = block_names
        continue
      has_cls = "ratio_cls_per_block" in metrics.get(kind, {})
      spatial = slice(1, None) if has_cls else slice(None)
      label = f"{key} {kind.upper()}"
      ratio[label], cos[label], names[label] = (r[idx, spatial].mean(1), c[idx, spatial].mean(1),
                                                block_names)
      if has_cls:
        ratio[label + "-CLS"], cos[label + "-CLS"] = r[idx, 0], c[idx, 0]
        names[label + "-CLS"] = block_names
      tokens = layers.token_labels(r.shape[1], has_cls)
      figs.append((f"{key} {kind}: ratio per token", interactive.heatmap(
          r[idx], row_names=block_names, col_names=tokens, title=f"{_model_name(models, key)}: "
          f"||z|| / ||f(z)||, {kind}", row_title="block", col_title="token", value_name="ratio",
          fields={"cosine": c[idx]}, colorscale="Viridis", height=360)))
  figs.insert(0, ("skip / branch norm ratio", interactive.depth_lines(
      ratio, names=names, title="skip / branch norm ratio ||z|| / ||f(z)||", y_title="ratio",
      log_y=True)))
  figs.insert(1, ("cosine", interactive.depth_lines(
      cos, names=names, title="cos(z, z + f(z))", y_title="cosine")))
  return figs


def _receptive_field(run_dir, result, models) -> list[Figure]:
  curves, names = {}, {}
  for tag, m in result["metrics"].items():
    if isinstance(m, Mapping) and "area_fraction" in m:
      curves[tag], names[tag] = m["area_fraction"], m["layers"]
  if not curves:
    return []
  return [("ERF area", interactive.depth_lines(
      curves, names=names, normalise_x=True, y_title="area fraction holding half the mass",
      title="effective receptive field size by layer"))]


def _probe(run_dir, result, models) -> list[Figure]:
  curves, names, errors, token_curves, token_names, token_x = {}, {}, {}, {}, {}, {}
  for key, m in result["metrics"].items():
    if not isinstance(m, Mapping) or "aggregated" not in m:
      continue
    for method, c in m["aggregated"].items():
      label = f"{key}; {method}"
      curves[label] = 100 * np.asarray(c["acc_mean"], np.float64)
      errors[label] = 100 * np.asarray(c["acc_std"], np.float64)
      names[label] = c["layers"]
    if m.get("tokens"):
      # Place each probed layer at its depth among the model's aggregated layers.
      depth = next(iter(m["aggregated"].values()), {}).get("layers", [])
      tokens = sorted(m["tokens"].items(),
                      key=lambda kv: depth.index(kv[0]) if kv[0] in depth else len(depth))
      token_curves[key] = 100 * np.asarray([t["acc_mean"] for _, t in tokens])
      token_names[key] = [name for name, _ in tokens]
      if all(t in depth for t in token_names[key]) and len(depth) > 1:
        token_x[key] = [depth.index(t) / (len(depth) - 1) for t in token_names[key]]
  figs = []
  if curves:
    figs.append(("probes by layer", interactive.depth_lines(
        curves, names=names, errors=errors, normalise_x=True, y_title="test accuracy (%)",
        title="linear probes on aggregated representations")))
  if token_curves:
    figs.append(("per-token probes", interactive.depth_lines(
        token_curves, names=token_names, normalise_x=True, x=token_x,
        y_title="test accuracy (%)",
        title="per-token probes (mean over tokens, CLS excluded)")))
  grids = probe_token_grids(run_dir, result)
  if grids:
    figs.append(("per-token grids", interactive.token_grids(grids)))
  return figs


def probe_token_grids(run_dir: str, result: Mapping[str, Any],
                      max_layers: int = 5) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
  """Per model, (layer, [g, g] accuracy grid) from `results/probe.npz` (CLS position dropped).

  Units are '<layer>:<pooling>@<token>'; a model whose aggregated probes include 'cls' has its
  CLS token at position 0, which is left out of the grid (Fig D.4).
  """
  path = os.path.join(run_dir, "results", "probe.npz")
  if not workdir_lib.exists(path):
    return []
  z = load_npz(path)
  rows = []
  for key, m in result["metrics"].items():
    if f"{key}/units" not in z or not isinstance(m, Mapping):
      continue
    units, acc = _names(z, f"{key}/units"), np.asarray(z[f"{key}/acc"], np.float64).mean(0)
    has_cls = "cls" in m.get("aggregated", {})
    per_layer: dict[str, dict[int, float]] = {}
    for u, a in zip(units, acc):
      if "@" in u:
        layer = u.split(":")[0]
        per_layer.setdefault(layer, {})[int(u.split("@")[1])] = a
    # Panels in the model's depth order (the aggregated probes list the layers in forward
    # order); the saved units are grouped by feature shape, which interleaves ResNet stages.
    depth = next(iter(m.get("aggregated", {}).values()), {}).get("layers", [])
    order = {layer: i for i, layer in enumerate(depth)}
    grids = []
    for layer, vals in sorted(per_layer.items(), key=lambda kv: order.get(kv[0], len(order))):
      positions = sorted(vals)[1:] if has_cls else sorted(vals)
      side = round(float(np.sqrt(len(positions))))
      if side * side == len(positions) and side > 0:
        grids.append((layer, np.asarray([vals[p] for p in positions]).reshape(side, side)))
    if len(grids) > max_layers:
      grids = [grids[i] for i in np.linspace(0, len(grids) - 1, max_layers).round().astype(int)]
    if grids:
      rows.append((key, grids))
  return rows


_BUILDERS: dict[str, Callable[[str, Mapping[str, Any], Mapping[str, Any]], list[Figure]]] = {
    "cka_intra": _similarity, "cka_cross": _similarity, "skip_removal": _skip_removal,
    "head_subsets": _head_subsets, "localization": _localization,
    "dataset_scale": _dataset_scale, "attention_distance": _attention_distance,
    "skip_norms": _skip_norms, "receptive_field": _receptive_field, "probe": _probe,
    "cka_zoo": _zoo,
}


def figures(run_dir: str, result: Mapping[str, Any],
            models: Mapping[str, Mapping[str, Any]]) -> list[Figure]:
  """(caption, plotly figure) pairs for one analysis' saved results (empty if unknown)."""
  builder = _BUILDERS.get(result["name"])
  return builder(run_dir, result, models) if builder else []


def differences(dir_a: str, dir_b: str, analysis: str, label_a: str,
                label_b: str) -> tuple[list[Figure], list[str]]:
  """Difference grids `a - b` of the comparisons both runs saved for `analysis`.

  Returns:
    (figures, notes): one figure per shared comparison with identical row and column names;
    one note per shared comparison whose names or shapes differ, saying how.
  """
  if analysis not in _CKA_FAMILY:
    return [], []
  shared = sorted(set(comparison_stems(dir_a, analysis)) & set(comparison_stems(dir_b, analysis)))
  figs, notes = [], []
  for stem in shared:
    za = load_npz(os.path.join(dir_a, "results", stem + ".npz"))
    zb = load_npz(os.path.join(dir_b, "results", stem + ".npz"))
    if "mean" not in za or "mean" not in zb:
      continue
    mismatch = _name_mismatch(za, zb)
    if mismatch:
      notes.append(f"{stem}: not compared, {mismatch}")
      continue
    figs.append((f"{stem}: {label_a} - {label_b}", interactive.difference_heatmap(
        za["mean"], zb["mean"], _names(za, "names_a"), _names(za, "names_b"), label_a=label_a,
        label_b=label_b, title=f"{stem}: CKA {label_a} - {label_b}")))
  return figs, notes


def _name_mismatch(za: Mapping[str, np.ndarray], zb: Mapping[str, np.ndarray]) -> str:
  for key, what in (("names_a", "row"), ("names_b", "column")):
    a, b = _names(za, key), _names(zb, key)
    if a != b:
      if len(a) != len(b):
        return f"the runs have {len(a)} and {len(b)} {what} layers"
      i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
      return f"{what} layer {i} is {a[i]!r} in one run and {b[i]!r} in the other"
  if np.shape(za["mean"]) != np.shape(zb["mean"]):
    return f"grid shapes {np.shape(za['mean'])} and {np.shape(zb['mean'])} differ"
  return ""


__all__ = ["cka_figures", "comparison_stems", "differences", "figures", "measures",
           "probe_token_grids"]
