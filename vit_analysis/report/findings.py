"""The paper's findings as checks on an analysis' saved metrics and arrays.

Each check states the expectation, the number it measured and the threshold it applied, and
decides with the uncertainty of what it compares (docs/method.md#significance): its 95% interval
against the threshold gives `Finding.verdict` 'shown', 'not shown' or 'inconclusive', or None when
the result it needs is absent (the analysis did not run, or the run has no model of the family the
expectation is about). A check whose saved files hold no uncertainty is inconclusive and says so.
The report opens with these rows, so a reader sees at once which findings a run reproduces.

Only NumPy and the saved files are used (no JAX): `vit_analysis.report` rebuilds the page, and
these checks, from a workdir alone. The thresholds are this project's reading of the paper's
figures; each is printed next to its verdict, with the interval it used, so a reader can judge it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vit_analysis.models import layers as layers_lib
from vit_analysis.report import reader
from vit_analysis.similarity import agreement, significance

SHOWN, NOT_SHOWN, INCONCLUSIVE = (significance.SHOWN, significance.NOT_SHOWN,
                                  significance.INCONCLUSIVE)


@dataclasses.dataclass(frozen=True)
class Finding:
  """One expectation checked on one run.

  Attributes:
    analysis: the analysis name ('cka_intra', ...).
    expectation: what the paper found, in one line.
    measured: the measured number(s), as text.
    threshold: the rule that decides the verdict, as text.
    verdict: 'shown', 'not shown', 'inconclusive' (the 95% interval contains the threshold, or
      no uncertainty was saved), or None (the needed result is absent).
    interval: the 95% interval the verdict used and where its uncertainty comes from, as text.
  """
  analysis: str
  expectation: str
  measured: str
  threshold: str
  verdict: str | None
  interval: str = ""

  @property
  def shown(self) -> bool | None:
    """True if shown, False if not shown, None if inconclusive or not measured."""
    return {SHOWN: True, NOT_SHOWN: False}.get(self.verdict)


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
    """The run saved in a workdir, read the report's way (`vit_analysis.report.results`)."""
    metrics = {r["name"]: r["metrics"] for r in reader.load_results(workdir)}
    return cls(metrics, reader.load_models(workdir), workdir=workdir)

  def arrays(self, stem: str) -> Mapping[str, np.ndarray] | None:
    """The arrays of `results/<stem>.npz`, or None when absent."""
    if stem not in self._arrays and self.workdir:
      arrays = reader.load_arrays(self.workdir, stem)
      if arrays is not None:
        self._arrays[stem] = arrays
    return self._arrays.get(stem)

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


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A measured quantity with its standard error and where that error comes from.

  Attributes:
    value: the estimate.
    stderr: its standard error; NaN when the saved files hold no uncertainty.
    source: where the error comes from ('over 3 repeats', ...), or why there is none.
    fisher: True for a rank correlation whose value and error are on the Fisher-z scale
      atanh(rho); thresholds are transformed and intervals back-transformed.
  """
  value: float
  stderr: float
  source: str
  fisher: bool = False


def _unknown(value: float, why: str = "no uncertainty saved") -> Estimate:
  return Estimate(float(value), float("nan"), why)


def _saved(value: float, stderr: Any, over: Any, why: str) -> Estimate:
  """An estimate whose standard error an analysis saved with what it is over (`over`); `why`
  when it saved none."""
  if stderr is None:
    return _unknown(value, why)
  return Estimate(float(value), float(stderr), str(over or "saved standard error"))


def _difference(a: Estimate, b: Estimate) -> Estimate:
  """a - b with SE sqrt(se_a² + se_b²), treating the two as independent (docs/method.md)."""
  source = a.source if a.source == b.source else f"{a.source}; {b.source}"
  return Estimate(a.value - b.value, math.hypot(a.stderr, b.stderr), source)


def _added(a: Estimate, b: Estimate) -> Estimate:
  """a - b with SE se_a + se_b: an upper bound whatever their correlation (two CKA statistics
  of the same images, whose errors are not independent; docs/method.md)."""
  source = a.source if a.source == b.source else f"{a.source}; {b.source}"
  return Estimate(a.value - b.value, a.stderr + b.stderr, f"{source}; the two errors added")


def over_repeats(arrays: Mapping[str, np.ndarray] | None,
                 statistic: Callable[[np.ndarray], float]) -> Estimate | None:
  """A statistic of a saved CKA grid: its mean ± std / sqrt(R) over the R per-repeat grids.

  Args:
    arrays: a saved comparison (`values` [R, A, B], as `cka_runner.RepeatedCKA.save` writes).
    statistic: grid [A, B] -> float.

  Returns:
    The estimate (stderr NaN, with the reason, when fewer than two repeats were saved), or None
    without a saved grid.
  """
  if arrays is None:
    return None
  if "values" not in arrays:
    return _unknown(statistic(np.asarray(arrays["mean"], np.float64)), "no per-repeat grids saved")
  values = np.asarray(arrays["values"], np.float64)
  stats = np.asarray([statistic(v) for v in values], np.float64)
  if len(stats) < 2:
    return _unknown(float(stats.mean()), "one repeat: no spread")
  # Sample std (ddof=1): the repeats are draws of the CKA estimate's sampling distribution.
  return Estimate(float(stats.mean()), float(stats.std(ddof=1) / math.sqrt(len(stats))),
                  f"over {len(stats)} repeats")


def accuracy(a: float, n: int | None) -> Estimate:
  """A test accuracy with its binomial SE sqrt(a (1 - a) / n) over n test images."""
  if not n or n <= 0:
    return _unknown(a, "no uncertainty saved (number of test images unknown)")
  a = float(a)
  return Estimate(a, math.sqrt(max(a * (1 - a), 0.0) / n), f"over {int(n)} test images")


def rank_correlation(rho: float, n: int) -> Estimate:
  """Spearman's rho on the Fisher-z scale, SE 1.06 / sqrt(n - 3) (Fieller et al. 1957)."""
  if n < 4 or not math.isfinite(rho):
    return _unknown(rho, f"{n} points: too few for an interval" if n < 4 else "undefined")
  # Clipping keeps rho = ±1 (a perfect ordering) finite on the z scale.
  z = math.atanh(float(np.clip(rho, -1 + 1e-9, 1 - 1e-9)))
  return Estimate(z, 1.06 / math.sqrt(n - 3), f"Fisher z over {n} points", fisher=True)


def decide(estimates: Mapping[str, Estimate], threshold: float, *,
           above: bool = True) -> tuple[str, str]:
  """One verdict for `every estimate > threshold` (or `<`, `above=False`) and its interval text.

  Shown only if every estimate is shown, not shown if any is not shown, else inconclusive; the
  interval printed is the deciding one (the first not shown, else the first inconclusive, else
  the one closest to the threshold).
  """
  rows = []
  for label, e in estimates.items():
    thr = math.atanh(float(np.clip(threshold, -1 + 1e-9, 1 - 1e-9))) if e.fisher else threshold
    v, (lo, hi) = significance.verdict(e.value, e.stderr, thr, above=above)
    if e.fisher:
      lo, hi = math.tanh(lo), math.tanh(hi)
    rows.append((label, e, v, lo, hi))
  if not rows:
    return INCONCLUSIVE, "nothing to compare"
  verdicts = [r[2] for r in rows]
  verdict = (SHOWN if all(v == SHOWN for v in verdicts) else
             NOT_SHOWN if NOT_SHOWN in verdicts else INCONCLUSIVE)
  if verdict == SHOWN:
    key = lambda r: (r[3] - threshold) if above else (threshold - r[4])
    label, e, _, lo, hi = min(rows, key=key)
  else:
    label, e, _, lo, hi = next(r for r in rows if r[2] == verdict)
  prefix = f"{label}: " if len(rows) > 1 and label else ""
  side = f"{'>' if above else '<'} {threshold:g}"
  if math.isnan(lo):
    return verdict, f"{prefix}{e.source}"
  return verdict, f"{prefix}[{_fmt(lo)}, {_fmt(hi)}] vs {side} ({e.source})"


def _decided(analysis: str, expectation: str, measured: str, threshold: str,
             estimates: Mapping[str, Estimate], bound: float, above: bool = True) -> Finding:
  verdict, interval = decide(estimates, bound, above=above)
  return Finding(analysis, expectation, measured, threshold, verdict, interval)


def _pairwise(high: Mapping[str, Estimate], low: Mapping[str, Estimate],
              margin: float = 0.0) -> dict[str, Estimate]:
  """`every high > every low + margin` as the differences of every pair, minus the margin."""
  return {f"{h} - {l}": dataclasses.replace(_difference(eh, el), value=eh.value - el.value - margin)
          for h, eh in high.items() for l, el in low.items()}


# ----------------------------------------------------------------------------------------------
# CKA heatmaps.


def _offdiag(mean_cka: float, n: int) -> float:
  # The metric's mean includes the diagonal, where CKA(layer, itself) = 1 exactly.
  return (mean_cka * n * n - n) / (n * n - n) if n > 1 else float("nan")


def _offdiag_grid(cka: np.ndarray) -> float:
  n = cka.shape[0]
  return float(cka[~np.eye(n, dtype=bool)].mean()) if n > 1 else float("nan")


def _intra_estimate(run: SavedRun, key: str, statistic: Callable[[np.ndarray], float],
                    point: float) -> Estimate:
  """The statistic over the repeats of `cka_intra_<key>`, else the metric with no uncertainty."""
  est = over_repeats(run.arrays(f"cka_intra_{key}"), statistic)
  return est if est is not None else _unknown(point, "no per-repeat grids saved")


def check_cka_intra(run: SavedRun) -> list[Finding]:
  name = "cka_intra"
  per = _per_key(run.metrics.get(name, {}), "mean_cka")
  vit = [k for k in per if run.family(k) == "vit"]
  res = [k for k in per if run.family(k) == "resnet"]
  out = []

  def every_vit_above_every_resnet(exp, thr, statistic, saved):
    if not (vit and res):
      return _absent(name, exp, thr, "needs intra-model CKA of a ViT and a ResNet")
    est = {k: _intra_estimate(run, k, statistic, saved(per[k])) for k in vit + res}
    text = ", ".join(f"{k} {_fmt(e.value)}" for k, e in est.items())
    return _decided(name, exp, text, thr, _pairwise({k: est[k] for k in vit},
                                                    {k: est[k] for k in res}), 0.0)

  out.append(every_vit_above_every_resnet(
      "ViT more uniform across depth than ResNet (Fig 1)",
      "mean off-diagonal CKA of every ViT > that of every ResNet", _offdiag_grid,
      lambda m: _offdiag(m["mean_cka"], int(m["num_layers_a"]))))
  out.append(every_vit_above_every_resnet(
      "ViT lowest and highest layers more similar than ResNet's (Fig 1)",
      "CKA(first layer, last layer) of every ViT > that of every ResNet",
      lambda g: float(g[0, -1]), lambda m: float(m["first_last"])))
  exp, thr = ("ResNet similarity is block-diagonal by stage (Fig 1)",
              "mean CKA within a stage - across stages > 0.1 for every ResNet")
  contrasts = {}
  for key in res:
    z = run.arrays(f"{name}_{key}")
    if z is not None and "names_a" in z:
      names = [str(n) for n in z["names_a"]]
      contrasts[key] = over_repeats(z, lambda g, names=names: stage_contrast(g, names))
  if contrasts:
    out.append(_decided(name, exp, ", ".join(f"{k} {_fmt(e.value)}" for k, e in contrasts.items()),
                        thr, contrasts, 0.1))
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


def _best_match_depth(cka: np.ndarray) -> float:
  """Mean normalised depth of the best-matching ViT row of each lower-half ResNet column."""
  n_vit, n_res = cka.shape
  return float((np.nanargmax(cka[:, :max(1, n_res // 2)], axis=0) / max(n_vit - 1, 1)).mean())


def _top_third_gap(cka: np.ndarray) -> float:
  """Mean best CKA of the lower two thirds of ViT rows minus that of the top third."""
  n_vit = cka.shape[0]
  top = max(1, n_vit // 3)
  best = np.nanmax(cka, axis=1)
  return float(best[:-top].mean() - best[-top:].mean()) if n_vit > top else float("nan")


def check_cka_cross(run: SavedRun) -> list[Finding]:
  name = "cka_cross"
  exp1, thr1 = ("lower half of ResNet layers matches the lower ViT layers (Fig 2)",
                ("mean normalised depth of the best-matching ViT layer of each lower-half "
                "ResNet layer < 0.5 (paper: the lowest quarter)"))
  exp2, thr2 = ("top third of ViT layers dissimilar to every ResNet layer (Fig 2)",
                "mean best CKA of the top-third ViT layers < that of the lower two thirds")
  out = []
  for tag in _per_key(run.metrics.get(name, {}), "mean_cka"):
    pair = reader.split_tag(tag, run.models)
    z = run.arrays(f"{name}_{tag}")
    if pair is None or z is None:
      continue
    fams = tuple(run.family(k) for k in pair)
    if sorted(fams) != ["resnet", "vit"]:
      continue
    # Rows: ViT layers, columns: ResNet layers.
    orient = (lambda g: np.asarray(g, np.float64).T) if fams[0] == "resnet" else (
        lambda g: np.asarray(g, np.float64))
    depth = over_repeats(z, lambda g: _best_match_depth(orient(g)))
    out.append(_decided(name, f"{exp1} [{tag}]", _fmt(depth.value), thr1, {tag: depth}, 0.5,
                        above=False))
    cka = orient(z["mean"])
    top = max(1, cka.shape[0] // 3)
    best = np.nanmax(cka, axis=1)
    hi = float(best[-top:].mean())
    lo = float(best[:-top].mean()) if cka.shape[0] > top else float("nan")
    # Paired within each repeat: the lower rows' best minus the top rows' best.
    gap = over_repeats(z, lambda g: _top_third_gap(orient(g)))
    out.append(_decided(name, f"{exp2} [{tag}]", f"top {_fmt(hi)} vs lower {_fmt(lo)}", thr2,
                        {"lower - top": gap}, 0.0))
  if not out:
    out = [_absent(name, e, t, "needs a saved ViT vs ResNet cross-model grid")
           for e, t in ((exp1, thr1), (exp2, thr2))]
  return out


def check_head_subsets(run: SavedRun) -> list[Finding]:
  name = "head_subsets"
  exp, thr = ("CKA with ResNet lower layers falls as the heads become more global (Fig 5)",
              "Spearman rho(subset distance, CKA) < 0 for every ResNet layer")
  thr_diff = ("CKA of the most local subset - CKA of the most global subset > 0 for every "
              "ResNet layer")
  out = []
  for tag, m in _per_key(run.metrics.get(name, {}), "spearman").items():
    rho = {k: float(v) for k, v in m["spearman"].items()}
    se = m.get("cka_local_minus_global_stderr")
    if se is not None:
      # The difference is linear in the CKA grid and carries the analysis' saved error
      # (docs/method.md#error-bars-of-cka-statistics); a rank correlation over a few subsets has
      # no interval.
      diff = {k: _saved(v, se.get(k), m.get("cka_local_minus_global_over"),
                        "no uncertainty saved for this layer")
              for k, v in m["cka_local_minus_global"].items()}
      text = ", ".join(f"{k} {e.value:+.3g} (rho {_fmt(rho[k])})" if k in rho else
                       f"{k} {e.value:+.3g}" for k, e in diff.items())
      out.append(_decided(name, f"{exp} [{tag}]", text, thr_diff, diff, 0.0))
      continue
    n = len(m.get("subset_distance") or m.get("subsets") or ())
    text = ", ".join(f"{k} {_fmt(v)}" for k, v in rho.items())
    out.append(_decided(name, f"{exp} [{tag}]", text, thr,
                        {k: rank_correlation(v, n) for k, v in rho.items()}, 0.0, above=False))
  return out or [_absent(name, exp, thr, "no head-subset result")]


# ----------------------------------------------------------------------------------------------
# Mechanisms.


# Analyses that save per-image means only: no spread over images to decide with.
_NO_SPREAD_IMAGES = "no uncertainty saved (per-image spread not saved)"


def check_attention_distance(run: SavedRun) -> list[Finding]:
  name = "attention_distance"
  out = []
  for key, m in _per_key(run.metrics.get(name, {}), "uniform_attention").items():
    u = float(m["uniform_attention"])
    lo, hi = float(m["block0_min_head"]), float(m["block0_max_head"])
    out.append(Finding(
        name, f"block 0 spans local and global heads (Fig 3) [{key}]",
        f"min {_fmt(lo)}, max {_fmt(hi)}, uniform {_fmt(u)}",
        "min head < 0.5 x uniform-attention distance and max head > 0.8 x", INCONCLUSIVE,
        _NO_SPREAD_IMAGES))
    last = float(m["last_block_mean"])
    out.append(Finding(name, f"the last block's heads are all global (Fig 3) [{key}]",
                       f"mean {_fmt(last)}, uniform {_fmt(u)}",
                       "mean head distance of the last block > 0.8 x uniform", INCONCLUSIVE,
                       _NO_SPREAD_IMAGES))
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
    out.append(_decided(name, exp, ", ".join(f"{k} {_fmt(r)}" for k, r in rho.items()), thr,
                        {k: rank_correlation(r, len(res[k]["area_fraction"]))
                         for k, r in rho.items()}, 0.8))
  else:
    out.append(_absent(name, exp, thr, "no ResNet receptive field"))
  exp, thr = ("ViT receptive fields are larger than ResNet's in the lower layers (Fig 6)",
              "mean ERF area fraction over the lower half of layers: every ViT > every ResNet")
  if res and vit:
    low = {k: float(np.mean(v["area_fraction"][:max(1, len(v["area_fraction"]) // 2)]))
           for k, v in {**vit, **res}.items()}
    out.append(Finding(name, exp, ", ".join(f"{k} {_fmt(a)}" for k, a in low.items()), thr,
                       INCONCLUSIVE, _NO_SPREAD_IMAGES))
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
                       INCONCLUSIVE, _NO_SPREAD_IMAGES))
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
    out.append(Finding(name, exp, text, thr, INCONCLUSIVE, _NO_SPREAD_IMAGES))
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
      out.append(Finding(name, exp, ", ".join(f"{k}: CLS {_fmt(c)} vs spatial {_fmt(s)}"
                                              for k, (c, s) in rows.items()), thr, INCONCLUSIVE,
                         _NO_SPREAD_IMAGES))
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


def _num_test(run: SavedRun, key: str, metrics: Mapping[str, Any]) -> int | None:
  """How many test images an accuracy was measured on (its metrics, else the model summary)."""
  for source in (metrics, run.models.get(key, {})):
    for field in ("num_test", "test_examples"):
      if source.get(field):
        return int(source[field])
  return None


def check_skip_removal(run: SavedRun) -> list[Finding]:
  name = "skip_removal"
  per = _per_key(run.metrics.get(name, {}), "skip_removed")
  out = []
  for key, m in per.items():
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
      base_key = key.rsplit("_noskip", 1)[0]
      base = per.get(base_key, {})
      if m.get("accuracy_drop_stderr") is not None:
        est = _saved(m["accuracy_drop"], m["accuracy_drop_stderr"], m.get("accuracy_drop_over"),
                     "no uncertainty saved")
      elif acc is not None and base.get("test_accuracy") is not None:
        # Both accuracies on the same test images: adding the variances ignores their positive
        # correlation, so the interval is conservative (wider than a paired one).
        est = _difference(accuracy(base["test_accuracy"], _num_test(run, base_key, base)),
                          accuracy(acc, _num_test(run, key, m)))
        est = dataclasses.replace(est, value=float(m["accuracy_drop"]))
      else:
        est = _unknown(float(m["accuracy_drop"]), "no uncertainty saved (accuracies not saved)")
      scaled = dataclasses.replace(est, value=100 * est.value, stderr=100 * est.stderr)
      out.append(_decided(name, exp, text, thr, {key: scaled}, 1.0))
    else:
      out.append(_absent(name, exp, thr, "accuracies not measured"))
    exp = f"similarity splits before / after block {blocks} (Fig 8) [{key}]"
    thr = "within-minus-across CKA contrast exceeds the unmodified model's by > 0.05"
    if "split" in m and "split_unmodified" in m:
      a, b = float(m["split"]["contrast"]), float(m["split_unmodified"]["contrast"])
      text = f"{_fmt(a)} vs unmodified {_fmt(b)}"
      change = m.get("split_change")
      if change is not None:  # paired within each repeat (the same images for both models)
        est = _saved(change["value"], change.get("stderr"), change.get("over"),
                     "no uncertainty saved (split change)")
      elif m["split"].get("contrast_stderr") is not None:  # the same images: errors added
        est = _added(*(_saved(c["contrast"], c.get("contrast_stderr"),
                              c.get("contrast_over"), "no uncertainty saved")
                       for c in (m["split"], m["split_unmodified"])))
      else:
        est = _unknown(a - b, "no uncertainty saved (per-repeat split contrasts not saved)")
      out.append(_decided(name, exp, text, thr, {key: est}, 0.05))
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
    fractions[key] = (over_repeats(z, lambda grid, g=g: _interior_own_best(grid, g))
                      if z is not None and g > 2 else
                      _unknown(float(m["own_is_best"]), "no per-repeat grids saved"))
  if fractions:
    out.append(_decided(name, exp, ", ".join(f"{k} {_fmt(f.value)}"
                                             for k, f in fractions.items()), thr, fractions, 0.5))
  else:
    out.append(_absent(name, exp, thr, "no CLS ViT localisation"))
  for others, exp in ((gap, "a GAP ViT is less localised than the CLS ViT (Fig 10)"),
                      (res, ("ResNet final-stage tokens are more diffuse than CLS-ViT tokens "
                            "(Fig 9)"))):
    thr = "own-patch contrast (own CKA - mean other) of every CLS ViT > every compared model"
    if cls and others:
      est = {k: _saved(m["own_contrast"], m.get("own_contrast_stderr"),
                       m.get("own_contrast_over"),
                       "no uncertainty saved (per-repeat own-patch contrasts not saved)")
             for k, (_, m) in {**cls, **others}.items()}
      # Every model saw the same images: the errors are added (_added), not taken as independent.
      out.append(_decided(name, exp, ", ".join(f"{k} {_fmt(e.value)}" for k, e in est.items()),
                          thr, {f"{c} - {o}": _added(est[c], est[o])
                                for c in cls for o in others}, 0.0))
    else:
      out.append(_absent(name, exp, thr, "needs a CLS ViT and the compared model"))
  return out


def _last(curve: Mapping[str, Any]) -> float:
  return float(curve["acc_mean"][-1])


def _within(analysis: str, expectation: str, measured: str, threshold: str,
            estimates: Mapping[str, Estimate], margin: float) -> Finding:
  """`|every estimate| < margin`: an interval inside (-margin, margin) is shown, one wholly
  outside it not shown; combined as in `decide`."""
  rows = []
  for label, e in estimates.items():
    low, _ = significance.verdict(e.value, e.stderr, -margin, above=True)
    high, (lo, hi) = significance.verdict(e.value, e.stderr, margin, above=False)
    v = (SHOWN if (low, high) == (SHOWN, SHOWN) else
         NOT_SHOWN if NOT_SHOWN in (low, high) else INCONCLUSIVE)
    rows.append((label, e, v, lo, hi))
  verdicts = [r[2] for r in rows]
  verdict = (SHOWN if all(v == SHOWN for v in verdicts) else
             NOT_SHOWN if NOT_SHOWN in verdicts else INCONCLUSIVE)
  label, e, _, lo, hi = (max(rows, key=lambda r: abs(r[1].value)) if verdict == SHOWN else
                         next(r for r in rows if r[2] == verdict))
  prefix = f"{label}: " if len(rows) > 1 else ""
  interval = (f"{prefix}{e.source}" if math.isnan(lo) else
              f"{prefix}[{_fmt(lo)}, {_fmt(hi)}] vs within ±{margin:g} ({e.source})")
  return Finding(analysis, expectation, measured, threshold, verdict, interval)


def check_probe(run: SavedRun) -> list[Finding]:
  name = "probe"
  per = _per_key(run.metrics.get(name, {}), "aggregated")
  vit = {k: v for k, v in per.items() if run.family(k) == "vit"}
  cls = {k: v for k, v in vit.items() if "cls" in v["aggregated"]}
  gap = {k: v for k, v in vit.items() if "cls" not in v["aggregated"]}
  res = {k: v for k, v in per.items() if run.family(k) == "resnet"}
  token = lambda m: float(list(m["tokens"].values())[-1]["acc_mean"]) if m.get("tokens") else None
  # Probe accuracies are over the num_test test images (a per-token mean: conservatively the
  # SE of one token's accuracy).
  acc = lambda key, m, a: accuracy(a, _num_test(run, key, m))
  out = []

  def compare(exp, thr, good, poor, value, margin):
    vg = {k: value(v) for k, v in good.items() if value(v) is not None}
    vp = {k: value(v) for k, v in poor.items() if value(v) is not None}
    if not vg or not vp:
      out.append(_absent(name, exp, thr, "needs both models' probes"))
      return
    text = ", ".join(f"{k} {100 * x:.1f}%" for k, x in {**vg, **vp}.items())
    out.append(_decided(name, exp, text, thr, _pairwise(
        {k: acc(k, good[k], x) for k, x in vg.items()},
        {k: acc(k, poor[k], x) for k, x in vp.items()}, margin), 0.0))

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
    diffs = {k: _difference(acc(k, cls[k], a), acc(k, cls[k], t)) for k, (a, t) in rows.items()}
    out.append(_decided(name, exp, ", ".join(f"{k}: CLS {100 * a:.1f}% vs tokens {100 * t:.1f}%"
                                             for k, (a, t) in rows.items()), thr, diffs, 0.05))
  else:
    out.append(_absent(name, exp, thr, "needs a CLS ViT with per-token probes"))
  for exp, thr, pairs in (
      ("CLS;CLS and GAP;GAP probes nearly equal at the last layer (Fig 11b)",
       "|CLS-token probe of the CLS ViT - mean-token probe of the GAP ViT| < 5 points",
       [(f"{c} cls vs {g} mean", acc(c, cv, _last(cv["aggregated"]["cls"])),
         acc(g, gv, _last(gv["aggregated"]["mean"])))
        for c, cv in cls.items() for g, gv in gap.items() if "mean" in gv["aggregated"]]),
      ("GAP;first-token nearly matches GAP;GAP at the last layer (Fig 11b)",
       "|first-token probe - mean-token probe| of the GAP ViT < 5 points",
       [(g, acc(g, gv, _last(gv["aggregated"]["first"])),
         acc(g, gv, _last(gv["aggregated"]["mean"])))
        for g, gv in gap.items() if {"first", "mean"} <= set(gv["aggregated"])])):
    if pairs:
      out.append(_within(name, exp, ", ".join(f"{k}: {100 * a.value:.1f}% vs {100 * b.value:.1f}%"
                                              for k, a, b in pairs), thr,
                         {k: _difference(a, b) for k, a, b in pairs}, 0.05))
    else:
      out.append(_absent(name, exp, thr, "needs a CLS and a GAP ViT"))
  return out


# Runs saved before `block_cka_stderr`: the per-block CKA metrics are means over repeats only.
_NO_SPREAD_REPEATS = "no uncertainty saved (per-block CKA over repeats not in the metrics)"


def _quarter_mean(m: Mapping[str, Any], top: bool) -> Estimate:
  """Mean block CKA of the lowest (or top) quarter of blocks, SE from `block_cka_stderr`.

  The blocks' errors are added (SE of a mean <= the mean of the SEs, whatever their
  correlation): exact for one block, an upper bound for several.
  """
  c = np.asarray(m["block_cka"], np.float64)
  q = max(1, len(c) // 4)
  part = slice(len(c) - q, len(c)) if top else slice(0, q)
  value = float(c[part].mean())
  if m.get("block_cka_stderr") is None:
    return _unknown(value, _NO_SPREAD_REPEATS)
  se = np.asarray(m["block_cka_stderr"], np.float64)[part]
  over = str(m.get("block_cka_over") or "saved standard errors")
  return Estimate(value, float(se.mean()),
                  over if q == 1 else f"{over}; {q} blocks' errors added")


def check_dataset_scale(run: SavedRun) -> list[Finding]:
  name = "dataset_scale"
  per = _per_key(run.metrics.get(name, {}), "block_cka")
  fractions = {k: v for k, v in per.items() if "fraction" in v}
  tuned = {k: v for k, v in per.items() if "task" in v}
  out = []
  if fractions:
    key = min(fractions, key=lambda k: fractions[k]["fraction"])
    low, high = _quarter_mean(fractions[key], False), _quarter_mean(fractions[key], True)
    pct = f"{100 * fractions[key]['fraction']:g}%"
    out.append(_decided(name, f"low blocks similar even at small data (Fig 12) [{pct}]",
                        f"{_fmt(low.value)}", "mean CKA of the lowest quarter of blocks with the "
                        "full-data model >= 0.8, at the smallest fraction", {key: low}, 0.8))
    gap = _added(low, high)  # both quarters from the same images
    out.append(_decided(name, f"upper blocks diverge more than lower ones (Fig 12) [{pct}]",
                        f"top {_fmt(high.value)} vs lowest {_fmt(low.value)}",
                        "mean CKA of the top quarter of blocks < the lowest quarter's",
                        {"lowest - top": gap}, 0.0))
  else:
    out.append(_absent(name, "low blocks similar even at small data (Fig 12)",
                       "lowest-quarter mean CKA >= 0.8", "no data-fraction model"))
  for key, v in tuned.items():
    low = _quarter_mean(v, False)
    out.append(_decided(name, f"lower blocks preserved by fine-tuning (Fig G.1) [{v['task']}]",
                        f"{_fmt(low.value)}", "mean CKA of the lowest quarter of blocks before "
                        "vs after fine-tuning >= 0.8", {key: low}, 0.8))
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
