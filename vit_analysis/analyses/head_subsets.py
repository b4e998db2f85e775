"""Subsets of early ViT attention heads vs the lower ResNet layers (Fig 5).

Heads of one ViT block are ordered by their mean attention distance (the shared measure of
`analyses.attention_distance`), then grouped into subsets (default paper.md §6 row 8: sliding
windows of H/2 heads, stride 1). A subset's representation is its heads' attention outputs before
the output projection, `[b, T, |S| * d_h]` flattened ('block{i}/attn_heads' restricted to the
subset); option `post_projection` uses the subset's contribution after the projection,
`sum_{h in S} heads_h W_out[h]`.
Each subset is compared by minibatch CKA with lower ResNet unit outputs. The paper finds CKA falling
monotonically as the subset's mean distance grows, for every ResNet layer.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis import capture
from vit_analysis import data as data_lib
from vit_analysis import sharding
from vit_analysis.analyses import attention_distance
from vit_analysis.analyses import base
from vit_analysis.analyses import similarity


def head_distances(model: base.LoadedModel, block: int, source: Any, num_examples: int,
                   batch_size: int = 64) -> np.ndarray:
  """Mean attention distance (pixels) of every head of `block`, averaged over examples.

  Returns:
    float64 [H].
  """
  layer = f"block{block:02d}/attn_weights"
  patch = int(model.module.patch_size)
  grid = (model.image_size // patch,) * 2
  has_cls = model.module.classifier == "token"
  fn = capture.make_capture_fn(model.module, [layer])
  dist = jax.jit(lambda v, x: attention_distance.mean_attention_distance(
      fn(v, x)[layer], grid, patch, has_cls=has_cls).sum(0))
  num_examples = min(num_examples, len(source))
  total = np.zeros((model.module.num_heads,), np.float64)
  for start in range(0, num_examples, batch_size):
    idx = range(start, min(start + batch_size, num_examples))
    images = data_lib.preprocess(np.stack([source[i]["image"] for i in idx]), model.image_size)
    total += np.asarray(dist(model.variables, images), np.float64)
  return total / num_examples


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
                post_projection: bool = False) -> similarity.Side:
  """A Side whose feature `subset{j}` is the heads of subset j: [b, T, |S|, d_h] (or [b, T, D])."""
  layer = f"block{block:02d}/attn_heads"
  fn = capture.make_capture_fn(model.module, [layer])
  names = tuple(f"subset{j:02d}" for j in range(len(subsets)))
  kernel_key = f"Transformer/encoderblock_{block}/MultiHeadDotProductAttention_1/out/kernel"

  def features(variables, images):
    heads = fn(variables, images)[layer]  # [b, T, H, d_h]
    out = {}
    for name, subset in zip(names, subsets):
      x = heads[:, :, np.asarray(subset)]
      if post_projection:
        w = flax.traverse_util.flatten_dict(variables["params"], sep="/")[kernel_key]
        x = jnp.einsum("bthd,hdD->btD", x, w[np.asarray(subset)],
                       precision=jax.lax.Precision.HIGHEST)
      out[name] = x
    return out

  return similarity.Side(features, model.variables, model.image_size, names)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation (ties broken by order; enough for distinct real values)."""
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  if len(x) < 2:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def run(config: Any, ctx: base.Context) -> base.AnalysisResult:
  """Head-subset CKA for every (vit key, other key) in `config.head_subsets.pairs`.

  The other model is a ResNet in the paper (its lower unit outputs: `layers` globs, default the
  first `num_units` = 5 unit outputs); any model whose 'blocks' preset exists works.
  """
  t0 = time.time()
  sub = config.head_subsets
  source = ctx.sources[sub.get("split", "test")]
  settings = similarity.protocol(sub)
  pairs = [tuple(p) for p in sub.get("pairs", None) or [("vit", "resnet")]]
  blocks = [int(b) for b in sub.get("blocks", (0,))]
  figures, metrics = [], {}
  for vit_key, resnet_key in pairs:
    vit, resnet = ctx.models[vit_key], ctx.models[resnet_key]
    if similarity.model_family(vit.module) != "vit":
      raise ValueError(f"head_subsets: {vit_key!r} ({vit.name}) is not a ViT")
    spec = sub.get("layers", None)
    if spec:
      resnet_names = similarity.resolve_layers(resnet, tuple(spec))
    else:  # the paper's block1 unit1..3, block2 unit1..2: the first five unit outputs.
      resnet_names = similarity.resolve_layers(resnet, "blocks")[:int(sub.get("num_units", 5))]
    resnet_side = similarity.Side(similarity.model_feature_fn(resnet, resnet_names),
                                  resnet.variables, resnet.image_size, tuple(resnet_names))
    for block in blocks:
      dist = head_distances(vit, block, source, int(sub.get("distance_examples", 5000)))
      subsets = head_subsets(dist, sub.get("mode", "window"), int(sub.get("size", 0)))
      subset_dist = np.asarray([dist[list(s)].mean() for s in subsets])
      side = subset_side(vit, block, subsets, bool(sub.get("post_projection", False)))
      rep = similarity.cka_over_repeats(side, resnet_side, source,
                                        seed=int(config.get("seed", 0)), mesh=ctx.mesh,
                                        desc=f"head_subsets/{vit_key}/block{block}", **settings)
      cka = rep.mean.T  # [resnet layers, subsets]
      tag = f"{vit_key}_block{block:02d}_vs_{resnet_key}"
      metrics[tag] = dict(
          head_distance=dist.tolist(), subsets=[list(s) for s in subsets],
          subset_distance=subset_dist.tolist(),
          spearman={n: spearman(subset_dist, c) for n, c in zip(resnet_names, cka)},
          cka_local_minus_global={n: float(c[0] - c[-1]) for n, c in zip(resnet_names, cka)})
      if sharding.is_main_process():
        stem = ctx.path("results", f"head_subsets_{tag}")
        rep.save(stem, subset_distance=subset_dist, head_distance=dist)
        figures.append(draw(stem, f"{vit.name} block {block} heads vs {resnet.name}",
                            ctx.workdir))
  result = base.AnalysisResult(
      name="head_subsets", title="Head subsets vs ResNet lower layers (Fig 5)",
      caption="CKA of subsets of early-block ViT heads (x: the subset's mean attention distance) "
              "with lower ResNet unit outputs. The paper finds CKA decreasing monotonically as "
              "the heads become more global (negative Spearman correlation).",
      figures=figures, metrics=dict(settings, **metrics), seconds=time.time() - t0)
  if sharding.is_main_process():
    base.save_result(ctx, result)
  return result


def draw(stem: str, title: str, workdir: str = "") -> str:
  """Redraws a saved head-subset result; returns the PNG path (relative to `workdir` if given)."""
  from vit_analysis import plotting  # pylint: disable=g-import-not-at-top
  from vit_analysis.plotting import similarity as plots  # pylint: disable=g-import-not-at-top
  rep = similarity.RepeatedCKA.load(stem)
  distance = np.load(stem + ".npz")["subset_distance"]
  error = rep.std.T if len(rep.values) > 1 else None
  fig = plots.head_subset_lines(distance, rep.mean.T, layer_names=rep.names_b, title=title,
                                error=error)
  png = plotting.save_figure(fig, stem.replace("/results/", "/figures/"))
  return png[len(workdir):].lstrip("/") if workdir else png
