"""Mean attention distance per head (paper Figs 3, 4, C.5, C.6).

The maths (`mean_attention_distance`, `model_distances`; docs/method.md#attention-distance) lives
in `vit_analysis.models.attention`, which the head-subset analysis (Fig 5) shares. By default the
CLS token is dropped as both query and key and the remaining patch weights are NOT renormalised,
so a head that puts mass on CLS looks more local; `renormalize=True` divides by the patch mass.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.models import attention
from vit_analysis.plotting import mechanisms


def default_config() -> ml_collections.ConfigDict:
  """Every option of the attention-distance analysis, with the paper's defaults."""
  return base.image_sample_config(
      num_images=5000,      # the paper's 5,000 ImageNet validation images
      batch_size=64,
      renormalize=False,    # CLS dropped as query and key, no renormalisation (method.md)
      unit="pixels",        # 'pixels' (grid step x patch size) | 'patches'
      blocks=(),            # blocks of the sorted-heads plot; empty = first two and last two
  )


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Attention distances of every ViT in `ctx.models` (Figs 3, 4, C.5, C.6)."""
  keys = ctx.model_keys(config_lib.names(cfg.models), where=lambda m: m.info.has_attention_weights,
                        what="ViT")
  source = ctx.sources[cfg.split]
  distances, stderrs, metrics = {}, {}, {}
  for key in keys:
    model = ctx.model(key)
    result, stats = attention.model_distance_statistics(
        model, source, ctx.mesh, num_images=cfg.num_images, batch_size=cfg.batch_size,
        seed=cfg.seed, renormalize=cfg.renormalize, unit=cfg.unit, fast=ctx.fast_compile,
        resume=ctx.checkpointer(key))
    d, se = result.mean, result.stderr
    distances[key] = d
    stderrs[key] = se
    info = model.info
    step = 1.0 if cfg.unit == "patches" else float(info.patch_size)
    # A minimum / maximum over heads carries the SE of the head that attains it
    # (docs/method.md#attention-distance).
    lo, hi = int(np.argmin(d[0])), int(np.argmax(d[0]))
    metrics[key] = {
        "uniform_attention": float(attention.patch_distances(info.grid, step).mean()),
        "block0_min_head": float(d[0, lo]), "block0_min_head_stderr": float(se[0, lo]),
        "block0_max_head": float(d[0, hi]), "block0_max_head_stderr": float(se[0, hi]),
        "last_block_mean": float(result.block_mean[-1]),
        "last_block_mean_stderr": float(result.block_mean_stderr[-1]),
        "per_block_mean": result.block_mean.round(3).tolist(),
        "per_block_mean_stderr": result.block_mean_stderr.round(4).tolist(),
        "uncertainty_over": f"images (n={result.num_images})",
        "num_images": stats["num_images"], "examples_per_s": round(stats["examples_per_s"], 2)}
  ctx.save_arrays("attention_distance", **distances)
  ctx.save_arrays("attention_distance_stderr", **stderrs)
  labels = {k: f"{k} ({ctx.model(k).name})" for k in keys}
  figures = [
      ctx.save_figure("attention_distance", mechanisms.attention_distance_scatter,
                      distances={labels[k]: distances[k] for k in keys}, unit=cfg.unit,
                      uniform={labels[k]: metrics[k]["uniform_attention"] for k in keys}),
      ctx.save_figure("attention_distance_sorted", mechanisms.attention_distance_sorted,
                      distances={labels[k]: distances[k] for k in keys},
                      blocks=tuple(cfg.blocks or ()), unit=cfg.unit),
  ]
  return base.AnalysisResult(
      name="attention_distance", title="Mean attention distance per head (Figs 3, 4, C.5, C.6)",
      caption=("Each point is one head: the attention-weighted mean distance between query and "
               "key patches, averaged over queries and images. The paper finds both local and "
               "global heads in the lowest blocks of large-data ViTs (none local when trained on "
               "ImageNet only for L/H), and only global heads at the top."),
      figures=figures, metrics=metrics)
