"""Every intra- and cross-model CKA heatmap of N models from one pass (Figs 1 and 2 at once).

Each model is forwarded once per minibatch and each model's centred Grams are computed once; the
intra-model grid of every model and the cross-model grid of every pair come from those Grams
(`cka_runner.cka_pairs_over_repeats`, docs/method.md#one-pass-for-many-models). Six models'
grids are 21 heatmaps from 6 forwards per image instead of 36. Each grid is saved under the
names `cka_intra` and `cka_cross` use (`cka_zoo_<key>`, `cka_zoo_<a>_vs_<b>`) and is identical
to theirs for the same models, seed and images.
"""
from __future__ import annotations

import itertools

import ml_collections
import numpy as np
from absl import logging

from vit_analysis import config_lib
from vit_analysis.analyses import base, similarity
from vit_analysis.plotting import similarity as plots
from vit_analysis.similarity import cka_runner, representations


def default_config() -> ml_collections.ConfigDict:
  """Every option of `cka_zoo`: those of `cka_intra` / `cka_cross`, plus the memory limit."""
  c = similarity.default_config()
  del c["pairs"]
  c.models = ()             # model keys (empty: every model); every pair of them is compared
  c.intra = True            # also each model's own grid
  c.memory_limit_gb = 0.0   # per device; 0: the device's own limit (CPU: available RAM)
  return c


def band_mean(mean: np.ndarray, width: float = 0.1) -> float:
  """Mean CKA of the diagonal band of an [A, B] grid: cells within `width` of relative depth.

  Layer i of A and j of B sit at relative depths i / (A - 1) and j / (B - 1); the band is the
  cells whose depths differ by at most `width` (the corresponding layers of two models of
  different depth).
  """
  a, b = mean.shape
  da = np.arange(a)[:, None] / max(a - 1, 1)
  db = np.arange(b)[None, :] / max(b - 1, 1)
  return float(mean[np.abs(da - db) <= width + 1e-9].mean())


def summary_matrix(means: dict[tuple[str, str | None], np.ndarray], keys: list[str]
                   ) -> np.ndarray:
  """[N, N] model x model band means (symmetric; the diagonal from the intra grids, NaN where
  the intra grid was not computed)."""
  out = np.full((len(keys), len(keys)), np.nan)
  for (a, b), mean in means.items():
    i, j = keys.index(a), keys.index(a if b is None else b)
    out[i, j] = out[j, i] = band_mean(mean)
  return out


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Intra grids of every model and cross grids of every pair of `cka_zoo.models`, one pass."""
  keys = ctx.model_keys(config_lib.names(cfg.models))
  settings = cka_runner.protocol(cfg)
  m = settings["minibatch_size"]
  loaded = {k: ctx.model(k) for k in keys}
  sides = {k: representations.model_side(loaded[k], similarity.layers_for(cfg, k), cfg.tokens, m)
           for k in keys}
  pairs = ([(k, None) for k in keys] if cfg.intra else []) + list(
      itertools.combinations(keys, 2))
  limit = cka_runner.device_memory_gb(float(cfg.memory_limit_gb))
  reps = cka_runner.cka_pairs_over_repeats(
      sides, pairs, ctx.sources[cfg.split], seed=ctx.seed, mesh=ctx.mesh, desc=ctx.name,
      resume=ctx.checkpointer("zoo"), memory_limit_gb=limit, **settings)
  figures, metrics, means = [], {}, {}
  for (a, b), rep in reps.items():
    tag = a if b is None else f"{a}_vs_{b}"
    name_a, name_b = loaded[a].name, loaded[a if b is None else b].name
    metrics[tag] = dict(similarity.summary(rep),
                        **similarity.measure_summary(rep, intra=b is None))
    stem = ctx.results_stem(f"{ctx.name}_{tag}")
    means[(a, b)] = rep.mean
    if ctx.is_main:
      rep.save(stem)
    figures += similarity.save_figures(ctx, rep, f"{ctx.name}_{tag}", name_a, name_b,
                                       intra=b is None)
  band = summary_matrix(means, keys)
  names = [loaded[k].name for k in keys]
  if ctx.is_main:
    ctx.save_arrays(f"{ctx.name}_summary", band_mean=band, keys=np.asarray(keys),
                    names=np.asarray(names))
  figures.append(ctx.save_figure(
      f"{ctx.name}_grid", plots.zoo_figure,
      means={(a if b is None else f"{a}_vs_{b}"): m for (a, b), m in means.items()},
      keys=keys, names=names, band=band))
  logging.info("%s: diagonal-band mean CKA\n%s", ctx.name, band)
  return base.AnalysisResult(
      name=ctx.name, title="CKA zoo: every intra- and cross-model grid from one pass (Figs 1, 2)",
      caption="Every model's own CKA grid (diagonal panels) and every pair's cross grid (rows: "
              "the row model's layers), all from one pass that forwards each model once per "
              "minibatch; the small heatmap is the mean CKA of each grid's diagonal band "
              "(layers within 10% of relative depth): which models resemble which.",
      figures=figures,
      metrics=dict(settings, tokens=cfg.tokens, models=keys, band_mean=band.tolist(), **metrics))
