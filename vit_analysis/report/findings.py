"""The paper's findings as checks on an analysis' saved metrics and arrays.

Each check states the expectation, the number it measured and the threshold it applied, and
returns `Finding.shown` True / False, or None when the result it needs is absent (the analysis
did not run, or the run has no model of the family the expectation is about). The report opens
with these rows, so a reader sees at once which findings a run reproduces.

Only NumPy and the saved files are used (no JAX): `vit_analysis.report` rebuilds the page, and
these checks, from a workdir alone. The thresholds are this project's reading of the paper's
figures; each is printed next to its verdict, so a reader can judge it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vit_analysis.models import layers as layers_lib
from vit_analysis.similarity import agreement


@dataclasses.dataclass(frozen=True)
class Finding:
  """One expectation checked on one run.

  Attributes:
    analysis: the analysis name ('cka_intra', ...).
    expectation: what the paper found, in one line.
    measured: the measured number(s), as text.
    threshold: the rule that decides `shown`, as text.
    shown: True (reproduced), False (not), None (the needed result is absent).
  """
  analysis: str
  expectation: str
  measured: str
  threshold: str
  shown: bool | None


class SavedRun:
  """What the checks read: per-analysis metrics, model summaries and saved result arrays.

  Args:
    metrics: analysis name -> its `AnalysisResult.metrics` dict.
    models: the run's model summaries (`models.json`: dicts with 'key', 'name', optionally
      'family' and 'classifier').
    arrays: result stem (e.g. 'cka_intra_vit') -> {array name: array}; for a workdir-backed run
      the files `results/<stem>.npz` are read on demand instead.
    workdir: where `results/` lives (None: only `arrays`).
  """

  def __init__(self, metrics: Mapping[str, Mapping[str, Any]],
               models: Sequence[Mapping[str, Any]] = (),
               arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
               workdir: str | None = None):
    self.metrics = {k: dict(v) for k, v in metrics.items()}
    self.models = {m["key"]: dict(m) for m in models if "key" in m}
    self._arrays = dict(arrays or {})
    self.workdir = workdir

  @classmethod
  def from_workdir(cls, workdir: str) -> SavedRun:
    """Reads `results/<analysis>.json` and `models.json` of a workdir."""
    metrics = {}
    results = os.path.join(workdir, "results")
    for stem in sorted(os.listdir(results)) if os.path.isdir(results) else []:
      if stem.endswith(".json"):
        with open(os.path.join(results, stem)) as f:
          d = json.load(f)
        if isinstance(d, dict) and {"name", "metrics"} <= set(d):
          metrics[d["name"]] = d["metrics"]
    models = []
    if os.path.exists(os.path.join(workdir, "models.json")):
      with open(os.path.join(workdir, "models.json")) as f:
        models = json.load(f)
    return cls(metrics, models, workdir=workdir)

  def arrays(self, stem: str) -> Mapping[str, np.ndarray] | None:
    """The arrays of `results/<stem>.npz`, or None when absent."""
    if stem in self._arrays:
      return self._arrays[stem]
    if self.workdir:
      path = os.path.join(self.workdir, "results", stem + ".npz")
      if os.path.exists(path):
        with np.load(path) as z:
          self._arrays[stem] = {k: z[k] for k in z.files}
        return self._arrays[stem]
    return None

  def family(self, key: str) -> str:
    """'vit', 'resnet', 'mixer', 'hybrid' or 'other' for a model key: its summary's 'family'
    (written by `main` from `models.describe`)."""
    return str(self.models.get(key, {}).get("family", "other")).lower()

  def has_cls(self, key: str) -> bool:
    """True for a model whose token 0 is a CLS token (its summary's 'has_cls')."""
    return bool(self.models.get(key, {}).get("has_cls", False))


def _fmt(x: float) -> str:
  return "NaN" if np.isnan(x) else f"{x:.3g}"


def _per_key(metrics: Mapping[str, Any], field: str) -> dict[str, Mapping[str, Any]]:
  return {k: v for k, v in metrics.items() if isinstance(v, Mapping) and field in v}


def _absent(analysis: str, expectation: str, threshold: str, why: str) -> Finding:
  return Finding(analysis, expectation, why, threshold, None)


def _split_tag(tag: str, keys: Sequence[str]) -> tuple[str, str] | None:
  """'vit_gap_vs_resnet' -> ('vit_gap', 'resnet') using the known model keys."""
  parts = tag.split("_vs_")
  for i in range(1, len(parts)):
    a, b = "_vs_".join(parts[:i]), "_vs_".join(parts[i:])
    if a in keys and b in keys:
      return a, b
  return None


# ----------------------------------------------------------------------------------------------
# CKA heatmaps.


def _offdiag(mean_cka: float, n: int) -> float:
  # The metric's mean includes the diagonal, where CKA(layer, itself) = 1 exactly.
  return (mean_cka * n * n - n) / (n * n - n) if n > 1 else float("nan")


def check_cka_intra(run: SavedRun) -> list[Finding]:
  name = "cka_intra"
  per = _per_key(run.metrics.get(name, {}), "mean_cka")
  vit = {k: v for k, v in per.items() if run.family(k) == "vit"}
  res = {k: v for k, v in per.items() if run.family(k) == "resnet"}
  out = []
  exp, thr = ("ViT more uniform across depth than ResNet (Fig 1)",
              "mean off-diagonal CKA of every ViT > that of every ResNet")
  if vit and res:
    od = {k: _offdiag(v["mean_cka"], int(v["num_layers_a"])) for k, v in {**vit, **res}.items()}
    text = ", ".join(f"{k} {_fmt(x)}" for k, x in od.items())
    out.append(Finding(name, exp, text, thr,
                       min(od[k] for k in vit) > max(od[k] for k in res)))
  else:
    out.append(_absent(name, exp, thr, "needs intra-model CKA of a ViT and a ResNet"))
  exp, thr = ("ViT lowest and highest layers more similar than ResNet's (Fig 1)",
              "CKA(first layer, last layer) of every ViT > that of every ResNet")
  if vit and res:
    text = ", ".join(f"{k} {_fmt(v['first_last'])}" for k, v in {**vit, **res}.items())
    out.append(Finding(name, exp, text, thr, min(v["first_last"] for v in vit.values()) >
                       max(v["first_last"] for v in res.values())))
  else:
    out.append(_absent(name, exp, thr, "needs intra-model CKA of a ViT and a ResNet"))
  exp, thr = ("ResNet similarity is block-diagonal by stage (Fig 1)",
              "mean CKA within a stage - across stages > 0.1 for every ResNet")
  contrasts = {}
  for key in res:
    z = run.arrays(f"{name}_{key}")
    if z is not None:
      contrasts[key] = stage_contrast(np.asarray(z["mean"]), [str(n) for n in z["names_a"]])
  if contrasts:
    out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(c)}" for k, c in contrasts.items()), thr,
                       all(c > 0.1 for c in contrasts.values())))
  else:
    out.append(_absent(name, exp, thr, "needs a ResNet's saved intra-model CKA grid"))
  return out


def stage_contrast(cka: np.ndarray, names: Sequence[str]) -> float:
  """Mean off-diagonal CKA within ResNet stages minus across stages (root layers: stage 0)."""
  stages = np.asarray([layers_lib.parse(n).stage or 0 for n in names])
  same = stages[:, None] == stages[None, :]
  off = ~np.eye(len(names), dtype=bool)
  if not (same & off).any() or not (~same).any():
    return float("nan")
  return float(cka[same & off].mean() - cka[~same].mean())


def check_cka_cross(run: SavedRun) -> list[Finding]:
  name = "cka_cross"
  exp1, thr1 = ("lower half of ResNet layers matches the lower ViT layers (Fig 2)",
                ("mean normalised depth of the best-matching ViT layer of each lower-half "
                "ResNet layer < 0.5 (paper: the lowest quarter)"))
  exp2, thr2 = ("top third of ViT layers dissimilar to every ResNet layer (Fig 2)",
                "mean best CKA of the top-third ViT layers < that of the lower two thirds")
  out = []
  for tag in _per_key(run.metrics.get(name, {}), "mean_cka"):
    pair = _split_tag(tag, list(run.models))
    z = run.arrays(f"{name}_{tag}")
    if pair is None or z is None:
      continue
    fams = tuple(run.family(k) for k in pair)
    if sorted(fams) != ["resnet", "vit"]:
      continue
    cka = np.asarray(z["mean"], np.float64)
    if fams[0] == "resnet":
      cka = cka.T  # rows: ViT layers, columns: ResNet layers.
    n_vit, n_res = cka.shape
    best_vit = np.nanargmax(cka[:, :max(1, n_res // 2)], axis=0) / max(n_vit - 1, 1)
    depth = float(best_vit.mean())
    out.append(Finding(name, f"{exp1} [{tag}]", f"{_fmt(depth)}", thr1, depth < 0.5))
    top = max(1, n_vit // 3)
    best = np.nanmax(cka, axis=1)
    hi, lo = float(best[-top:].mean()), float(best[:-top].mean()) if n_vit > top else np.nan
    out.append(Finding(name, f"{exp2} [{tag}]", f"top {_fmt(hi)} vs lower {_fmt(lo)}", thr2,
                       bool(hi < lo)))
  if not out:
    out = [_absent(name, e, t, "needs a saved ViT vs ResNet cross-model grid")
           for e, t in ((exp1, thr1), (exp2, thr2))]
  return out


def check_head_subsets(run: SavedRun) -> list[Finding]:
  name = "head_subsets"
  exp, thr = ("CKA with ResNet lower layers falls as the heads become more global (Fig 5)",
              "Spearman rho(subset distance, CKA) < 0 for every ResNet layer")
  out = []
  for tag, m in _per_key(run.metrics.get(name, {}), "spearman").items():
    rho = {k: float(v) for k, v in m["spearman"].items()}
    text = ", ".join(f"{k} {_fmt(v)}" for k, v in rho.items())
    out.append(Finding(name, f"{exp} [{tag}]", text, thr,
                       bool(rho) and all(v < 0 for v in rho.values())))
  return out or [_absent(name, exp, thr, "no head-subset result")]


# ----------------------------------------------------------------------------------------------
# Mechanisms.


def check_attention_distance(run: SavedRun) -> list[Finding]:
  name = "attention_distance"
  out = []
  for key, m in _per_key(run.metrics.get(name, {}), "uniform_attention").items():
    u = float(m["uniform_attention"])
    lo, hi = float(m["block0_min_head"]), float(m["block0_max_head"])
    out.append(Finding(
        name, f"block 0 spans local and global heads (Fig 3) [{key}]",
        f"min {_fmt(lo)}, max {_fmt(hi)}, uniform {_fmt(u)}",
        "min head < 0.5 x uniform-attention distance and max head > 0.8 x", lo < 0.5 * u and
        hi > 0.8 * u))
    last = float(m["last_block_mean"])
    out.append(Finding(name, f"the last block's heads are all global (Fig 3) [{key}]",
                       f"mean {_fmt(last)}, uniform {_fmt(u)}",
                       "mean head distance of the last block > 0.8 x uniform", last > 0.8 * u))
  return out or [_absent(name, "block 0 spans local and global heads (Fig 3)",
                         "min head < 0.5 x uniform and max > 0.8 x", "no ViT was measured")]


def check_receptive_field(run: SavedRun) -> list[Finding]:
  name = "receptive_field"
  per = _per_key(run.metrics.get(name, {}), "area_fraction")
  post = {k.split("/")[0]: v for k, v in per.items() if k.endswith("/post")}
  res = {k: v for k, v in post.items() if run.family(k) == "resnet"}
  vit = {k: v for k, v in post.items() if run.family(k) == "vit"}
  out = []
  exp, thr = ("ResNet receptive fields grow gradually with depth (Fig 6)",
              "Spearman rho(depth, ERF area) > 0.8 for every ResNet")
  if res:
    rho = {k: agreement.rank_correlation(np.arange(len(v["area_fraction"])), v["area_fraction"])
           for k, v in res.items()}
    out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(r)}" for k, r in rho.items()), thr,
                       all(r > 0.8 for r in rho.values())))
  else:
    out.append(_absent(name, exp, thr, "no ResNet receptive field"))
  exp, thr = ("ViT receptive fields are larger than ResNet's in the lower layers (Fig 6)",
              "mean ERF area fraction over the lower half of layers: every ViT > every ResNet")
  if res and vit:
    low = {k: float(np.mean(v["area_fraction"][:max(1, len(v["area_fraction"]) // 2)]))
           for k, v in {**vit, **res}.items()}
    out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(a)}" for k, a in low.items()), thr,
                       min(low[k] for k in vit) > max(low[k] for k in res)))
  else:
    out.append(_absent(name, exp, thr, "needs a ViT and a ResNet"))
  exp, thr = ("ViT receptive fields keep a peak at the centre patch (Fig 6)",
              "centre-patch share of the last layer's ERF mass > 2 x its share of the image")
  shares = {}
  for key, v in vit.items():
    patch = _patch_size(run, key)
    size = run.models.get(key, {}).get("image_size")
    if v.get("centre_patch_mass") and patch and size:
      shares[key] = (float(v["centre_patch_mass"][-1]), patch * patch / float(size * size))
  if shares:
    out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(s)} (image share {_fmt(u)})"
                                            for k, (s, u) in shares.items()), thr,
                       all(s > 2 * u for s, u in shares.values())))
  else:
    out.append(_absent(name, exp, thr, "needs a ViT's centre-patch mass and patch size"))
  return out


def _patch_size(run: SavedRun, key: str) -> int | None:
  patch = run.models.get(key, {}).get("patch_size")
  return int(patch) if patch else None


def check_skip_norms(run: SavedRun) -> list[Finding]:
  name = "skip_norms"
  metrics = run.metrics.get(name, {})
  out = []
  vit = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and run.family(k) == "vit"}
  res = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and run.family(k) == "resnet"}
  exp, thr = ("ViT skip/branch norm ratios far above ResNet's (Fig 7)",
              "smallest mean ViT ratio (attention or MLP) > 2 x largest mean ResNet ratio")
  vit_r = {f"{k} {kind}": float(v[kind]["ratio_mean"]) for k, v in vit.items()
           for kind in ("sa", "mlp") if kind in v}
  res_r = {k: float(v["unit"]["ratio_mean"]) for k, v in res.items() if "unit" in v}
  if vit_r and res_r:
    text = ", ".join(f"{k} {_fmt(x)}" for k, x in {**vit_r, **res_r}.items())
    out.append(Finding(name, exp, text,
                       thr, min(vit_r.values()) > 2 * max(res_r.values())))
  else:
    out.append(_absent(name, exp, thr, "needs a ViT and a ResNet"))
  cls_keys = [k for k in vit if run.has_cls(k)]
  for half, exp, thr in (
      (0, "CLS skip ratio large in the early blocks: the skip dominates CLS (Fig 7)",
       ("mean CLS ratio over the first half of blocks > mean spatial-token ratio, "
       "attention and MLP")),
      (1, "phase change at mid-depth: late blocks change CLS more than spatial tokens (Fig 7)",
       ("mean CLS ratio over the second half of blocks < mean spatial-token ratio, "
       "attention and MLP"))):
    rows = {}
    for key in cls_keys:
      for kind in ("sa", "mlp"):
        cls, spatial = _cls_spatial(run, key, kind)
        if cls is None:
          continue
        n = len(cls)
        part = slice(0, max(1, n // 2)) if half == 0 else slice(n // 2, n)
        rows[f"{key} {kind}"] = (float(np.mean(cls[part])), float(np.mean(spatial[part])))
    if rows:
      ok = all((c > s) if half == 0 else (c < s) for c, s in rows.values())
      out.append(Finding(name, exp, ", ".join(f"{k}: CLS {_fmt(c)} vs spatial {_fmt(s)}"
                                              for k, (c, s) in rows.items()), thr, ok))
    else:
      out.append(_absent(name, exp, thr, "needs a CLS ViT's per-token ratios"))
  return out


def _cls_spatial(run: SavedRun, key: str, kind: str):
  """Per-block CLS and spatial-token (CLS excluded) ratios; spatial from the npz when saved."""
  z = run.arrays("skip_norms")
  if z is not None and f"{key}/ratio" in z:
    labels = [str(s) for s in z[f"{key}/labels"]]
    idx = [i for i, l in enumerate(labels) if l.split("/")[-1] == kind]
    if idx:
      r = np.asarray(z[f"{key}/ratio"], np.float64)[idx]
      return r[:, 0], r[:, 1:].mean(1)
  m = run.metrics.get("skip_norms", {}).get(key, {}).get(kind, {})
  if "ratio_cls_per_block" in m:  # fallback: the mean over all tokens includes CLS
    return np.asarray(m["ratio_cls_per_block"], float), np.asarray(m["ratio_per_block"], float)
  return None, None


def check_skip_removal(run: SavedRun) -> list[Finding]:
  name = "skip_removal"
  out = []
  for key, m in _per_key(run.metrics.get(name, {}), "skip_removed").items():
    if not m["skip_removed"]:
      continue
    blocks = ",".join(map(str, m["skip_removed"]))
    exp = f"removing the skips of block {blocks} costs accuracy (Fig 8) [{key}]"
    thr = "test accuracy drop > 1 point (paper: ~4 for a middle block)"
    if m.get("accuracy_drop") is not None:
      drop = 100 * float(m["accuracy_drop"])
      acc = m.get("test_accuracy")
      text = f"drop {drop:+.2f} points" + (f" (skips removed: {100 * acc:.1f}%)"
                                           if acc is not None else "")
      out.append(Finding(name, exp, text, thr, drop > 1.0))
    else:
      out.append(_absent(name, exp, thr, "accuracies not measured"))
    exp = f"similarity splits before / after block {blocks} (Fig 8) [{key}]"
    thr = "within-minus-across CKA contrast exceeds the unmodified model's by > 0.05"
    if "split" in m and "split_unmodified" in m:
      a, b = float(m["split"]["contrast"]), float(m["split_unmodified"]["contrast"])
      out.append(Finding(name, exp, f"{_fmt(a)} vs unmodified {_fmt(b)}", thr, a - b > 0.05))
    else:
      out.append(_absent(name, exp, thr, "no split contrast saved"))
  return out or [_absent(name, "removing the skips of a block costs accuracy (Fig 8)",
                         "test accuracy drop > 1 point", "no skip-removed model")]


# ----------------------------------------------------------------------------------------------
# Localisation, probes, data scale.


def _interior_own_best(mean: np.ndarray, grid: int) -> float:
  """Fraction of interior tokens (not on the grid border) whose best input patch is their own."""
  hits = []
  for r in range(1, grid - 1):
    for c in range(1, grid - 1):
      row = mean[r * grid + c]
      if np.isfinite(row[r * grid + c]):
        hits.append(np.nanargmax(row) == r * grid + c)
  return float(np.mean(hits)) if hits else float("nan")


def check_localization(run: SavedRun) -> list[Finding]:
  name = "localization"
  per = _per_key(run.metrics.get(name, {}), "own_contrast")
  by_model: dict[str, tuple[str, Mapping[str, Any]]] = {}
  for tag, m in per.items():  # the last listed layer of each model (its final block / unit)
    by_model[tag.split("/")[0]] = (tag, m)
  cls = {k: v for k, v in by_model.items() if run.family(k) == "vit" and run.has_cls(k)}
  gap = {k: v for k, v in by_model.items() if run.family(k) == "vit" and not run.has_cls(k)}
  res = {k: v for k, v in by_model.items() if run.family(k) == "resnet"}
  out = []
  exp, thr = ("interior CLS-ViT tokens peak at their own input patch (Fig 9)",
              "fraction of interior tokens whose most similar patch is their own >= 0.5")
  fractions = {}
  for key, (tag, m) in cls.items():
    z = run.arrays(f"{name}_{key}_{tag.split('/', 1)[1].replace('/', '-')}")
    g = int(m.get("grid", 0))
    fractions[key] = (_interior_own_best(np.asarray(z["mean"], np.float64), g)
                      if z is not None and g > 2 else float(m["own_is_best"]))
  if fractions:
    out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(f)}" for k, f in fractions.items()), thr,
                       all(f >= 0.5 for f in fractions.values())))
  else:
    out.append(_absent(name, exp, thr, "no CLS ViT localisation"))
  for others, exp in ((gap, "a GAP ViT is less localised than the CLS ViT (Fig 10)"),
                      (res, ("ResNet final-stage tokens are more diffuse than CLS-ViT tokens "
                            "(Fig 9)"))):
    thr = "own-patch contrast (own CKA - mean other) of every CLS ViT > every compared model"
    if cls and others:
      vals = {k: float(m["own_contrast"]) for k, (_, m) in {**cls, **others}.items()}
      out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items()), thr,
                         min(vals[k] for k in cls) > max(vals[k] for k in others)))
    else:
      out.append(_absent(name, exp, thr, "needs a CLS ViT and the compared model"))
  return out


def _last(curve: Mapping[str, Any]) -> float:
  return float(curve["acc_mean"][-1])


def check_probe(run: SavedRun) -> list[Finding]:
  name = "probe"
  per = _per_key(run.metrics.get(name, {}), "aggregated")
  vit = {k: v for k, v in per.items() if run.family(k) == "vit"}
  cls = {k: v for k, v in vit.items() if "cls" in v["aggregated"]}
  gap = {k: v for k, v in vit.items() if "cls" not in v["aggregated"]}
  res = {k: v for k, v in per.items() if run.family(k) == "resnet"}
  token = lambda m: float(list(m["tokens"].values())[-1]["acc_mean"]) if m.get("tokens") else None
  out = []

  def compare(exp, thr, good, poor, value, margin):
    vg = {k: value(v) for k, v in good.items() if value(v) is not None}
    vp = {k: value(v) for k, v in poor.items() if value(v) is not None}
    if not vg or not vp:
      out.append(_absent(name, exp, thr, "needs both models' probes"))
      return
    text = ", ".join(f"{k} {100 * x:.1f}%" for k, x in {**vg, **vp}.items())
    out.append(Finding(name, exp, text, thr, min(vg.values()) > max(vp.values()) + margin))

  compare("GAP-ViT tokens become good at the top while CLS-ViT tokens stay poor (Fig 11a)",
          "last-layer per-token accuracy: every GAP ViT > every CLS ViT + 5 points", gap, cls,
          token, 0.05)
  compare("ResNet tokens become good at the top, unlike CLS-ViT tokens (Fig 11a)",
          "last-layer per-token accuracy: every ResNet > every CLS ViT + 5 points", res, cls,
          token, 0.05)
  exp, thr = ("a CLS ViT's CLS token carries the class, its patch tokens do not (Fig 11)",
              "last-layer CLS-token probe > last-layer per-token mean + 5 points")
  rows = {k: (_last(v["aggregated"]["cls"]), token(v)) for k, v in cls.items()
          if token(v) is not None}
  if rows:
    out.append(Finding(name, exp, ", ".join(f"{k}: CLS {100 * a:.1f}% vs tokens {100 * t:.1f}%"
                                            for k, (a, t) in rows.items()), thr,
                       all(a > t + 0.05 for a, t in rows.values())))
  else:
    out.append(_absent(name, exp, thr, "needs a CLS ViT with per-token probes"))
  for exp, thr, pairs in (
      ("CLS;CLS and GAP;GAP probes nearly equal at the last layer (Fig 11b)",
       "|CLS-token probe of the CLS ViT - mean-token probe of the GAP ViT| < 5 points",
       [(f"{c} cls vs {g} mean", _last(cv["aggregated"]["cls"]), _last(gv["aggregated"]["mean"]))
        for c, cv in cls.items() for g, gv in gap.items() if "mean" in gv["aggregated"]]),
      ("GAP;first-token nearly matches GAP;GAP at the last layer (Fig 11b)",
       "|first-token probe - mean-token probe| of the GAP ViT < 5 points",
       [(g, _last(gv["aggregated"]["first"]), _last(gv["aggregated"]["mean"]))
        for g, gv in gap.items() if {"first", "mean"} <= set(gv["aggregated"])])):
    if pairs:
      out.append(Finding(name, exp, ", ".join(f"{k}: {100 * a:.1f}% vs {100 * b:.1f}%"
                                              for k, a, b in pairs), thr,
                         all(abs(a - b) < 0.05 for _, a, b in pairs)))
    else:
      out.append(_absent(name, exp, thr, "needs a CLS and a GAP ViT"))
  return out


def check_dataset_scale(run: SavedRun) -> list[Finding]:
  name = "dataset_scale"
  per = _per_key(run.metrics.get(name, {}), "block_cka")
  fractions = {k: v for k, v in per.items() if "fraction" in v}
  tuned = {k: v for k, v in per.items() if "task" in v}
  quarter = lambda c: max(1, len(c) // 4)
  low = lambda c: float(np.mean(c[:quarter(c)]))
  high = lambda c: float(np.mean(c[-quarter(c):]))
  out = []
  if fractions:
    key = min(fractions, key=lambda k: fractions[k]["fraction"])
    c = fractions[key]["block_cka"]
    pct = f"{100 * fractions[key]['fraction']:g}%"
    out.append(Finding(name, f"low blocks similar even at small data (Fig 12) [{pct}]",
                       f"{_fmt(low(c))}", "mean CKA of the lowest quarter of blocks with the "
                       "full-data model >= 0.8, at the smallest fraction", low(c) >= 0.8))
    out.append(Finding(name, f"upper blocks diverge more than lower ones (Fig 12) [{pct}]",
                       f"top {_fmt(high(c))} vs lowest {_fmt(low(c))}",
                       "mean CKA of the top quarter of blocks < the lowest quarter's",
                       high(c) < low(c)))
  else:
    out.append(_absent(name, "low blocks similar even at small data (Fig 12)",
                       "lowest-quarter mean CKA >= 0.8", "no data-fraction model"))
  for key, v in tuned.items():
    c = v["block_cka"]
    out.append(Finding(name, f"lower blocks preserved by fine-tuning (Fig G.1) [{v['task']}]",
                       f"{_fmt(low(c))}", "mean CKA of the lowest quarter of blocks before vs "
                       "after fine-tuning >= 0.8", low(c) >= 0.8))
  return out


CHECKS: dict[str, Callable[[SavedRun], list[Finding]]] = {
    "cka_intra": check_cka_intra,
    "cka_cross": check_cka_cross,
    "head_subsets": check_head_subsets,
    "attention_distance": check_attention_distance,
    "receptive_field": check_receptive_field,
    "skip_norms": check_skip_norms,
    "skip_removal": check_skip_removal,
    "localization": check_localization,
    "probe": check_probe,
    "dataset_scale": check_dataset_scale,
}


def check(run: SavedRun, analyses: Sequence[str] | None = None) -> list[Finding]:
  """Every finding of the analyses that ran (or of `analyses`), in registry order."""
  names = [n for n in CHECKS if n in (run.metrics if analyses is None else analyses)]
  return [f for n in names for f in CHECKS[n](run)]
