"""Layer-by-layer CKA heatmaps: within one model (Figs 1, B.1, H.1), across two (Figs 2, G.2, H.2).

The sampling protocol, sides and repeat loop live in `vit_analysis.similarity.cka_runner`
(docs/method.md#minibatch-cka); this module holds only the two analyses and their figures.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.plotting import similarity as plots
from vit_analysis.similarity import agreement, cka, cka_runner, representations, significance
from vit_analysis.similarity import measures as measures_lib


def default_config() -> ml_collections.ConfigDict:
  """Every option of `cka_intra` and `cka_cross`, with the paper's defaults."""
  c = cka_runner.protocol_config()
  c.models = ()             # cka_intra: model keys (empty: every model)
  c.pairs = ()              # cka_cross: (row key, column key) pairs, or 'a:b,c:d' (empty: first two)
  c.layers = "fine"         # 'fine' | 'coarse' | 'blocks' | globs (tuple or comma-separated)
  c.layers_per_model = {}   # model key -> preset or globs (overrides `layers`)
  c.tokens = "all"          # 'all' | 'exclude_cls' | 'cls_only' | 'token_mean'
  c.figure_formats = ("png", "pdf")
  return c


def layers_for(cfg: Any, key: str) -> str | tuple[str, ...]:
  """The layer spec of model `key`: `layers_per_model[key]`, else `layers`."""
  per_model = cfg.get("layers_per_model", None) or {}
  return representations.layer_spec(per_model.get(key, cfg.layers))


# A cell is "carried by one minibatch" when leaving that minibatch out moves it by more than this
# many of its standard errors (docs/method.md#cka-pitfalls).
ONE_MINIBATCH_FACTOR = 3.0


def summary(rep: cka_runner.RepeatedCKA) -> dict[str, Any]:
  """Headline numbers of one heatmap (mean over cells, first-to-last layer, error bars), and how
  many cells one minibatch can move by more than ONE_MINIBATCH_FACTOR standard errors."""
  mean = rep.mean
  out = dict(mean_cka=float(mean.mean()), first_last=float(mean[0, -1]),
             max_std=float(rep.std.max()), max_stderr=float(rep.stderr.max()),
             num_layers_a=len(rep.names_a), num_layers_b=len(rep.names_b))
  if rep.max_leave_one_out is not None and len(rep.max_leave_one_out):
    with np.errstate(invalid="ignore"):
      moved = (rep.max_leave_one_out > ONE_MINIBATCH_FACTOR * rep.stderr).any(0)
    out["cells_moved_by_one_minibatch"] = int(moved.sum())
    out["max_leave_one_out"] = float(np.nanmax(rep.max_leave_one_out))
  return out


def measure_values(rep: cka_runner.RepeatedCKA) -> dict[str, np.ndarray]:
  """{measure: [A, B] mean over repeats}, linear CKA first."""
  return {"linear_cka": rep.mean, **{n: v["values"].mean(0) for n, v in rep.measures.items()}}


def measure_summary(rep: cka_runner.RepeatedCKA, intra: bool) -> dict[str, Any]:
  """Where the measures agree and disagree, and how many cells beat the shuffle null.

  Rank correlation (Spearman) between every two measures over all cells (intra-model: each
  pair of layers once), the five layer pairs whose rank differs most between measures, and per
  measure how many cells are above the shuffle null by Benjamini–Hochberg at q = 0.05 over the
  heatmap's cells (docs/method.md#significance), or that the run had too few permutations to
  call any cell.
  """
  out: dict[str, Any] = {}
  arrays = rep.arrays()
  if rep.measures:
    values = measure_values(rep)
    out["measure_mean"] = {n: float(v.mean()) for n, v in values.items()}
    # Agreement is about which cells are more alike: a distance enters with its sign flipped.
    alike = {n: v if measures_lib.higher_is_similar(n) else -v for n, v in values.items()}
    rows, cols = rep.mean.shape
    cells = rows * (rows - 1) // 2 if intra else rows * cols
    if cells < 3:  # a rank correlation needs 3 cells (2 layers intra-model have 1)
      out["measure_agreement"] = (f"not computed: {cells} cell(s), a rank correlation needs "
                                  "at least 3")
    else:
      out["measure_agreement"] = {f"{a} ~ {b}": rho for (a, b), rho in
                                  agreement.rank_agreement(alike, intra=intra).items()}
      out["measure_disagreements"] = agreement.disagreements(
          alike, rep.names_a, rep.names_b, top=5, intra=intra)
      for d in out["measure_disagreements"]:  # the values as measured, not sign-flipped
        d["value"] = {n: v if measures_lib.higher_is_similar(n) else -v
                      for n, v in d["value"].items()}
  above, tested = {}, 0
  for name, found in null_discoveries(arrays, intra).items():
    above[name], tested = found
  if above:
    out["cells_above_null"] = {n: f"{int(c)} of {tested}" for n, c in above.items()}
    out["cells_above_null_fraction"] = {n: float(c) / max(tested, 1) for n, c in above.items()}
    perms = int(next(v for k, v in arrays.items() if k.endswith("_null_values")).shape[0])
    need = significance.min_permutations(tested, NULL_FDR)
    if perms < need:
      out["null_too_few_permutations"] = (
          f"{perms} permutations cannot call any of {tested} cells at q = {NULL_FDR} (the "
          f"smallest p-value is 1/{perms + 1}); use null_permutations >= {need}")
      logging.warning("%s", out["null_too_few_permutations"])
  return out


NULL_FDR = 0.05  # Benjamini–Hochberg false-discovery rate over a heatmap's cells


def null_discoveries(arrays: Mapping[str, np.ndarray],
                     intra: bool) -> dict[str, tuple[int, int]]:
  """{measure: (cells above the null, cells tested)} from the saved `<measure>_null_p`."""
  out = {}
  for key, p in arrays.items():
    if key.endswith("_null_p"):
      name = key[:-len("_null_p")]
      found, tested = significance.heatmap_discoveries(p, NULL_FDR, symmetric=intra)
      count = int((found & ~np.eye(*found.shape, dtype=bool)).sum()) // 2 if intra else int(
          found.sum())
      out["linear_cka" if name == "cka" else name] = (count, tested)
  return out


def null_masks(arrays: Mapping[str, np.ndarray], intra: bool) -> dict[str, np.ndarray]:
  """{measure: [A, B] bool, True where the cell is above the null (BH, q = NULL_FDR)}."""
  return {("linear_cka" if k == "cka_null_p" else k[:-len("_null_p")]):
          significance.heatmap_discoveries(p, NULL_FDR, symmetric=intra)[0]
          for k, p in arrays.items() if k.endswith("_null_p")}


def heatmap_args(rep: cka_runner.RepeatedCKA, title: str, model_a: str,
                 model_b: str) -> dict[str, Any]:
  """The arguments of `plotting.similarity.cka_heatmap` for a comparison (mean, spread)."""
  return dict(matrix=rep.mean, row_names=list(rep.names_a), col_names=list(rep.names_b),
              row_model=model_a, col_model=model_b, title=title,
              spread=rep.std if len(rep.values) > 1 else None)


def measures_args(rep: cka_runner.RepeatedCKA, title: str, model_a: str, model_b: str,
                  intra: bool) -> dict[str, Any]:
  """The arguments of `plotting.similarity.measure_heatmaps`: every measure, the cells above the
  null (BH, q = NULL_FDR) and each measure's mean under the shuffle null."""
  arrays = rep.arrays()
  nulls = {("linear_cka" if k == "cka_null_mean" else k[:-len("_null_mean")]): v
           for k, v in arrays.items() if k.endswith("_null_mean")}
  above, note = null_masks(arrays, intra) or None, ""
  found = null_discoveries(arrays, intra)
  if found:
    tested = next(iter(found.values()))[1]
    perms = int(next(v for k, v in arrays.items() if k.endswith("_null_values")).shape[0])
    need = significance.min_permutations(tested, NULL_FDR)
    if perms < need:  # no cell could be called: masking every cell would hide the values
      above = None
      note = (f"no cell masked: {perms} null permutations cannot call any of {tested} cells at "
              f"q = {NULL_FDR} (use null_permutations >= {need})")
  return dict(values=measure_values(rep), row_names=list(rep.names_a),
              col_names=list(rep.names_b), row_model=model_a, col_model=model_b,
              above_null=above, null_means=nulls or None, fdr=NULL_FDR, note=note, title=title)


def save_figures(ctx: base.Context, rep: cka_runner.RepeatedCKA, name: str, model_a: str,
                 model_b: str, intra: bool) -> list[str]:
  """The static figures of one saved comparison: its CKA heatmap and, when the run computed
  other measures, all measures side by side (`figures/<name>[_measures].png`)."""
  title = f"{model_a} vs {model_b}"
  figures = [ctx.save_figure(name, plots.cka_heatmap,
                             **heatmap_args(rep, title, model_a, model_b))]
  if rep.measures:
    figures.append(ctx.save_figure(f"{name}_measures", plots.measure_heatmaps,
                                   **measures_args(rep, title, model_a, model_b, intra)))
  return figures


def draw_measures(stem: str, title: str, model_a: str, model_b: str, intra: bool):
  """Every measure of a saved comparison (`.npz` + `.json`) side by side, without recomputation."""
  return plots.measure_heatmaps(**measures_args(cka_runner.RepeatedCKA.load(stem), title,
                                                model_a, model_b, intra))


def draw(stem: str, title: str, model_a: str, model_b: str):
  """The heatmap figure of a saved comparison (`.npz` + `.json`), without recomputation."""
  return plots.cka_heatmap(**heatmap_args(cka_runner.RepeatedCKA.load(stem), title, model_a,
                                          model_b))


def _run(ctx: base.Context, cfg: ml_collections.ConfigDict,
         pairs: Sequence[tuple[str, str | None]], title: str, caption: str) -> base.AnalysisResult:
  source = ctx.sources[cfg.split]
  settings = cka_runner.protocol(cfg)
  figures, metrics = [], {}
  widths = [0, 0]
  for key_a, key_b in pairs:
    model_a = ctx.model(key_a)
    model_b = None if key_b is None else ctx.model(key_b)
    m = settings["minibatch_size"]
    side_a = representations.model_side(model_a, layers_for(cfg, key_a), cfg.tokens, m)
    side_b = None if model_b is None else representations.model_side(
        model_b, layers_for(cfg, key_b), cfg.tokens, m)
    tag = key_a if key_b is None else f"{key_a}_vs_{key_b}"
    widths = [max(widths[0], widest(side_a, m)), max(widths[1], widest(side_b or side_a, m))]
    rep = cka_runner.cka_over_repeats(side_a, side_b, source, seed=ctx.seed, mesh=ctx.mesh,
                                      desc=f"{ctx.name}/{tag}", resume=ctx.checkpointer(tag),
                                      **settings)
    label_b = model_a.name if model_b is None else model_b.name
    metrics[tag] = dict(summary(rep), **measure_summary(rep, intra=model_b is None))
    stem = ctx.results_stem(f"{ctx.name}_{tag}")
    if ctx.is_main:
      rep.save(stem)
    figures += save_figures(ctx, rep, f"{ctx.name}_{tag}", model_a.name, label_b,
                            intra=key_b is None)
  mean, se = cka.null_bias_check(settings["minibatch_size"], *widths, seed=ctx.seed)
  check = dict(minibatch_size=settings["minibatch_size"], width_a=widths[0], width_b=widths[1],
               cka=mean, cka_stderr=se,
               statement=f"on independent random features at m = {settings['minibatch_size']} "
                         f"and widths {widths[0]} x {widths[1]} (capped at 4096), this "
                         f"estimator gives {mean:.4f} ± {se:.4f} (population value 0)")
  return base.AnalysisResult(name=ctx.name, title=title, caption=caption, figures=figures,
                             metrics=dict(settings, tokens=cfg.tokens, null_bias_check=check,
                                          **metrics))


def widest(side: representations.Side, m: int) -> int:
  """The largest per-example feature width among a side's layers (from shapes, no compute)."""
  images = jax.ShapeDtypeStruct((m, side.image_size, side.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(side.features, side.variables, images)
  return max(int(np.prod(s.shape[1:])) for s in shapes.values())


def run_intra(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Intra-model CKA heatmap of every model in `cka_intra.models` (default: all)."""
  keys = ctx.model_keys(config_lib.names(cfg.models))
  return _run(ctx, cfg, [(k, None) for k in keys], "Intra-model CKA (Figs 1, B.1, H.1)",
              "CKA between every pair of captured layers of one model, mean over repeats (the "
              "hover, and the static figure's right panel, give the spread over repeats; the "
              "hover also the standard error over minibatches). The paper finds ViTs uniform "
              "across depth with a grid texture, ResNets block-diagonal by stage, Mixers two "
              "uncorrelated blocks.")


def run_cross(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Cross-model CKA heatmap for every `(row_key, col_key)` in `cka_cross.pairs`."""
  pairs = config_lib.pairs(cfg.pairs) or [tuple(ctx.models)[:2]]
  return _run(ctx, cfg, pairs, "Cross-model CKA (Figs 2, B.1, G.2, H.2)",
              "CKA between every layer of one model (rows) and of another (columns), the same "
              "images in the same minibatches. The paper finds the lower half of R50 layers "
              "matching the lowest quarter of ViT layers and the top third of ViT matching none.")
