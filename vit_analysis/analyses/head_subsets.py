"""Subsets of early ViT attention heads vs the lower ResNet layers (Fig 5).

Heads of one ViT block are ordered by their mean attention distance (the shared measure of
`analyses.attention_distance`), then grouped into subsets (default, docs/method.md#head-subsets: sliding
windows of H/2 heads, stride 1). A subset's representation is its heads' attention outputs before
the output projection, `[b, T, |S| * d_h]` flattened ('block{i}/attn_heads' restricted to the
subset); option `post_projection` uses the subset's contribution after the projection,
`sum_{h in S} heads_h W_out[h]`.
Each subset is compared by minibatch CKA with lower ResNet unit outputs. The paper finds CKA falling
monotonically as the subset's mean distance grows, for every ResNet layer.

The trend is saved two ways: Spearman's rho over the subsets, and the CKA of the most local subset
minus that of the most global one (`cka_local_minus_global`), linear in the CKA grid and so saved
with its standard error (`cka_local_minus_global_stderr`, over repeats or the minibatch jackknife,
`cka_local_minus_global_over`; docs/method.md#error-bars-of-cka-statistics). The difference needs
no minimum number of subsets, where a rank correlation over three subsets has no interval.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.models import attention, capture, layers
from vit_analysis.models import vit as vit_lib
from vit_analysis.plotting import similarity as plots
from vit_analysis.similarity import cka_runner, representations


def head_subsets(distances: np.ndarray, mode: str = "window",
                 size: int = 0) -> list[tuple[int, ...]]:
  """Head subsets from most local to most global.

  Args:
    distances: [H] mean attention distance per head.
    mode: 'window' (sliding windows of `size` heads over the sorted heads, stride 1) or
      'cumulative' (the `j` most local heads, j = size..H).
    size: window size (0: H // 2).

  Returns:
    Tuples of head indices (each sorted by distance).
  """
  order = np.argsort(np.asarray(distances), kind="stable")
  h = len(order)
  size = size or max(h // 2, 1)
  if not 1 <= size <= h:
    raise ValueError(f"subset size {size} must be in [1, {h}]")
  if mode == "window":
    return [tuple(int(i) for i in order[j:j + size]) for j in range(h - size + 1)]
  if mode == "cumulative":
    return [tuple(int(i) for i in order[:j]) for j in range(size, h + 1)]
  raise ValueError(f"head subset mode must be 'window' or 'cumulative', got {mode!r}")


def subset_side(model: base.LoadedModel, block: int, subsets: Sequence[tuple[int, ...]],
                post_projection: bool = False) -> representations.Side:
  """A Side whose feature `subset{j}` is the heads of subset j: [b, T, |S|, d_h] (or [b, T, D])."""
  layer = layers.block(block, "attn_heads")
  fn = capture.make_capture_fn(model.module, [layer])
  names = tuple(f"subset{j:02d}" for j in range(len(subsets)))

  def features(variables, images):
    heads = fn(variables, images)[layer]  # [b, T, H, d_h]
    out = {}
    for name, subset in zip(names, subsets):
      x = heads[:, :, np.asarray(subset)]
      if post_projection:
        w = vit_lib.attention_output_kernel(variables["params"], block)  # [H, d_h, D]
        x = jnp.einsum("bthd,hdD->btD", x, w[np.asarray(subset)],
                       precision=jax.lax.Precision.HIGHEST)
      out[name] = x
    return out

  return representations.Side(features, model.variables, model.image_size, names,
                         model.info.normalization)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (ties broken by order; enough for distinct real values)."""
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  if len(x) < 2:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def local_minus_global(rep: cka_runner.RepeatedCKA) -> tuple[list[float], list[float], str]:
  """CKA(most local subset) - CKA(most global subset) per comparison layer, with its errors.

  Args:
    rep: subsets (rows, most local first) x comparison layers (columns), values [R, S, U].

  Returns:
    ([U] differences, [U] standard errors, what they are over), each from
    `cka_runner.linear_estimate` with weight +1 on row 0 and -1 on row S - 1 of the column.
  """
  subsets, units = np.shape(rep.values)[1:]
  out = []
  for u in range(units):
    w = np.zeros((subsets, units))
    w[0, u], w[-1, u] = 1.0, -1.0
    out.append(cka_runner.linear_estimate([(rep, w)]))
  return ([e["value"] for e in out], [e["stderr"] for e in out],
          out[0]["over"] if out else "")


def default_config() -> ml_collections.ConfigDict:
  """Every option of the head-subset analysis, with the paper's defaults."""
  c = cka_runner.protocol_config()
  c.pairs = (("vit", "resnet"),)  # (ViT key, comparison model key), or 'vit:resnet'
  c.blocks = (0,)                 # ViT blocks whose heads are subset (paper: block 0)
  c.mode = "window"               # 'window' (sliding, stride 1) | 'cumulative'
  c.size = 0                      # heads per window; 0 = H // 2
  c.post_projection = False       # the subset's contribution after the output projection
  c.distance_examples = 5000      # images for the attention distances (the paper's 5,000)
  c.distance_seed = 0             # their sample's seed (attention_distance.seed)
  c.layers = ()                   # comparison-model globs; () = first `num_units` unit outputs
  c.num_units = 5                 # paper: block1 unit1..3, block2 unit1..2
  c.figure_formats = ("png", "pdf")
  return c


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Head-subset CKA for every (vit key, other key) in `head_subsets.pairs`.

  The other model is a ResNet in the paper (its lower unit outputs: `layers` globs, default the
  first `num_units` = 5 unit outputs); any model whose 'blocks' preset exists works.
  """
  source = ctx.sources[cfg.split]
  settings = cka_runner.protocol(cfg)
  figures, metrics = [], {}
  for vit_key, resnet_key in config_lib.pairs(cfg.pairs):
    vit, resnet = ctx.model(vit_key), ctx.model(resnet_key)
    if not vit.info.has_attention_weights:
      raise ValueError(f"head_subsets: {vit_key!r} ({vit.name}) is not a ViT (no attention "
                       "weights)")
    spec = representations.layer_spec(cfg.layers) if cfg.layers else None
    if spec:
      resnet_names = representations.resolve_layers(resnet, spec)
    else:  # the paper's block1 unit1..3, block2 unit1..2: the first five unit outputs.
      resnet_names = representations.resolve_layers(resnet, "blocks")[:int(cfg.num_units)]
    resnet_side = representations.Side(representations.model_feature_fn(resnet, resnet_names),
                                  resnet.variables, resnet.image_size, tuple(resnet_names),
                                  resnet.info.normalization)
    distances, _ = attention.model_distances(
        vit, source, ctx.mesh, num_images=int(cfg.distance_examples), batch_size=64,
        seed=int(cfg.distance_seed), fast=ctx.fast_compile,
        resume=ctx.checkpointer(f"{vit_key}_distances"))
    for block in (int(b) for b in cfg.blocks):
      if not 0 <= block < distances.shape[0]:
        raise ValueError(f"head_subsets.blocks: {block} out of range for {vit.name}")
      dist = distances[block]
      subsets = head_subsets(dist, cfg.mode, int(cfg.size))
      subset_dist = np.asarray([dist[list(s)].mean() for s in subsets])
      side = subset_side(vit, block, subsets, bool(cfg.post_projection))
      tag = f"{vit_key}_block{block:02d}_vs_{resnet_key}"
      rep = cka_runner.cka_over_repeats(side, resnet_side, source, seed=ctx.seed, mesh=ctx.mesh,
                                        desc=f"head_subsets/{vit_key}/block{block}",
                                        resume=ctx.checkpointer(tag), **settings)
      cka = rep.mean.T  # [resnet layers, subsets]
      diff, diff_se, diff_over = local_minus_global(rep)
      metrics[tag] = dict(
          head_distance=dist.tolist(), subsets=[list(s) for s in subsets],
          subset_distance=subset_dist.tolist(),
          spearman={n: spearman(subset_dist, c) for n, c in zip(resnet_names, cka)},
          cka_local_minus_global=dict(zip(resnet_names, diff)),
          cka_local_minus_global_stderr=dict(zip(resnet_names, diff_se)),
          cka_local_minus_global_over=diff_over)
      stem = ctx.results_stem(f"head_subsets_{tag}")
      if ctx.is_main:
        rep.save(stem, subset_distance=subset_dist, head_distance=dist)
      figures.append(ctx.save_figure(
          f"head_subsets_{tag}", plots.head_subset_lines, mean_distance=subset_dist, cka=cka,
          layer_names=list(rep.names_b), title=f"{vit.name} block {block} heads vs {resnet.name}",
          error=rep.std.T if len(rep.values) > 1 else None))
  return base.AnalysisResult(
      name="head_subsets", title="Head subsets vs ResNet lower layers (Fig 5)",
      caption="CKA of subsets of early-block ViT heads (x: the subset's mean attention distance) "
              "with lower ResNet unit outputs. The paper finds CKA decreasing monotonically as "
              "the heads become more global (negative Spearman correlation).",
      figures=figures, metrics=dict(settings, **metrics))
