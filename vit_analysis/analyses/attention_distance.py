"""Mean attention distance per head (paper Figs 3, 4, C.5, C.6).

The maths (`mean_attention_distance`, `model_distances`; docs/method.md#attention-distance) lives
in `vit_analysis.models.attention`, which the head-subset analysis (Fig 5) shares. By default the
CLS token is dropped as both query and key and the remaining patch weights are NOT renormalised,
so a head that puts mass on CLS looks more local; `renormalize=True` divides by the patch mass.
"""
from __future__ import annotations

import ml_collections

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
  distances, metrics = {}, {}
  for key in keys:
    model = ctx.model(key)
    d, stats = attention.model_distances(
        model, source, ctx.mesh, num_images=cfg.num_images, batch_size=cfg.batch_size,
        seed=cfg.seed, renormalize=cfg.renormalize, unit=cfg.unit, fast=ctx.fast_compile,
        resume=ctx.checkpointer(key))
    distances[key] = d
    info = model.info
    step = 1.0 if cfg.unit == "patches" else float(info.patch_size)
    metrics[key] = {
        "uniform_attention": float(attention.patch_distances(info.grid, step).mean()),
        "block0_min_head": float(d[0].min()), "block0_max_head": float(d[0].max()),
        "last_block_mean": float(d[-1].mean()), "per_block_mean": d.mean(1).round(3).tolist(),
        "num_images": stats["num_images"], "examples_per_s": round(stats["examples_per_s"], 2)}
  ctx.save_arrays("attention_distance", **distances)
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
