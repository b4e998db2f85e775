"""Mean attention distance per head (paper Figs 3, 4, C.5, C.6).

For head h, query patch q and key patch k with attention weight a_hqk (softmax over all keys, CLS
included) and pixel distance d(q, k) = P * ||grid(q) - grid(k)||_2, a head's distance on one
image is mean_q sum_k a_hqk d(q, k) (paper.md §1.6). By default the CLS token is dropped as both
query and key and the remaining patch weights are NOT renormalised, so a head that puts mass on
CLS looks more local; `renormalize=True` divides by the patch mass instead.

`mean_attention_distance` is the one shared implementation: the head-subset analysis (Fig 5)
imports it to order heads from local to global. Keep its name and signature stable.
`stream_sums` (sum a jitted per-batch statistic over N images on the mesh, bounded memory,
examples/s) is shared by the receptive-field and skip-norm analyses.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vit_analysis import sharding
from vit_analysis.analyses import base


def patch_distances(grid: tuple[int, int], patch_size: float = 1.0) -> np.ndarray:
  """Euclidean distances between patch centres of a row-major grid, in pixels.

  Args:
    grid: (gh, gw), the token grid (e.g. (14, 14) for a /16 model at 224 px).
    patch_size: pixels per grid step (1 gives distances in patch units).

  Returns:
    float32 [gh * gw, gh * gw], entry (q, k) = patch_size * ||(r_q, c_q) - (r_k, c_k)||.
  """
  gh, gw = (int(g) for g in grid)
  if gh <= 0 or gw <= 0:
    raise ValueError(f"grid must be positive, got {grid}")
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  pos = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.float64)  # [N, 2], row-major.
  diff = pos[:, None, :] - pos[None, :, :]
  return (patch_size * np.sqrt((diff ** 2).sum(-1))).astype(np.float32)


def mean_attention_distance(attn_weights: jax.Array, grid: tuple[int, int], patch_size: float,
                            *, has_cls: bool, renormalize: bool = False) -> jax.Array:
  """Mean attention distance of every head, per image.

  Args:
    attn_weights: [b, H, T, T] softmax weights (query axis -2, key axis -1), T = gh*gw (+1 with
      CLS first).
    grid: (gh, gw) token grid.
    patch_size: pixels per grid step (the model's patch size for distances in pixels).
    has_cls: whether token 0 is a CLS token; it is dropped as query and key.
    renormalize: divide each query's patch weights by their sum (CLS mass redistributed).

  Returns:
    [b, H] float32: mean over queries of sum_k a_qk d(q, k).

  Raises:
    ValueError: if the shape does not match the grid.
  """
  if attn_weights.ndim != 4 or attn_weights.shape[-1] != attn_weights.shape[-2]:
    raise ValueError(f"attn_weights must be [b, H, T, T], got shape {attn_weights.shape}")
  num_patches = int(grid[0]) * int(grid[1])
  expected = num_patches + int(has_cls)
  if attn_weights.shape[-1] != expected:
    raise ValueError(
        f"attn_weights have {attn_weights.shape[-1]} tokens but grid {tuple(grid)} with "
        f"has_cls={has_cls} needs {expected}")
  a = attn_weights[..., int(has_cls):, int(has_cls):].astype(jnp.float32)  # [b, H, N, N]
  if renormalize:
    a = a / jnp.maximum(a.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  dist = jnp.asarray(patch_distances(grid, patch_size))  # [N, N]
  per_query = jnp.einsum("bhqk,qk->bhq", a, dist)
  return per_query.mean(-1)


def block_attention_distances(out: dict[str, jax.Array], grid: tuple[int, int],
                              patch_size: float, *, has_cls: bool,
                              renormalize: bool = False) -> jax.Array:
  """`mean_attention_distance` of every 'block{i}/attn_weights' in a ViT's `out`.

  Returns:
    [b, L, H], blocks in index order.

  Raises:
    KeyError: if `out` holds no attention weights.
  """
  names = sorted(n for n in out if n.endswith("/attn_weights"))
  if not names:
    raise KeyError(f"no '*/attn_weights' in out (keys: {sorted(out)[:8]}...)")
  return jnp.stack([
      mean_attention_distance(out[n], grid, patch_size, has_cls=has_cls, renormalize=renormalize)
      for n in names], axis=1)


# ---------------------------------------------------------------------------------------------
# Streaming over images (shared by the mechanism analyses: attention distance, ERFs, skip norms).


class _Subset:
  """The first `n` examples of a seeded permutation of a source (random access)."""

  def __init__(self, src, n: int, seed: int):
    self.src, self.num_classes = src, getattr(src, "num_classes", None)
    self.indices = np.random.default_rng(seed).permutation(len(src))[:n]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.src[int(self.indices[i])]


# XLA:CPU spends most of a small model's compile time in LLVM's optimisation passes; level 0
# halves it (smoke runs, tests). Ignored on other backends.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_compile(config, cfg) -> bool:
  """The sub-config's `fast_compile`, else the training defaults' (True in smoke configs)."""
  if "fast_compile" in cfg:
    return bool(cfg.fast_compile)
  train = config.get("train", None)
  return bool(train.get("fast_compile", False)) if train is not None else False


def stream_sums(step_fn, variables: Any, source, *, num_images: int, batch_size: int,
                image_size: int, mesh: jax.sharding.Mesh, seed: int = 0,
                desc: str = "", fast: bool = False) -> tuple[Any, dict[str, float]]:
  """Sums `step_fn(variables, images, mask)` over `num_images` images streamed in batches.

  The images are a seeded sample of `source`, preprocessed to `image_size`, cut into global
  batches split over the mesh (the last batch padded and masked), so memory is bounded by one
  batch whatever `num_images` is. `step_fn(variables, images, mask)` is jitted here (`fast`: XLA
  optimisation level 0 on CPU) and must return per-batch SUMS weighted by `mask` ([b] float32,
  0 on padding); the sums stay on device until the end.

  Returns:
    (host NumPy pytree of the sums, {'num_images', 'seconds', 'examples_per_s'}).
  """
  from vit_analysis import data  # pylint: disable=g-import-not-at-top

  num_images = min(int(num_images), len(source))
  if num_images <= 0:
    raise ValueError(f"num_images must be positive (source has {len(source)} images)")
  per = jax.device_count()
  batch_size = -(-max(1, min(int(batch_size), num_images)) // per) * per
  subset = _Subset(source, num_images, seed)
  it = data.batches(subset, batch_size, seed=seed, shuffle=False, drop_remainder=False,
                    image_size=image_size)
  options = dict(_FAST_COMPILE) if fast and jax.default_backend() == "cpu" else None
  step_fn = jax.jit(step_fn, compiler_options=options)
  params = sharding.replicate(variables, mesh)
  total, done, start, last_log = None, 0, time.time(), time.time()
  first_done, first_end = 0, None  # The first batch pays for compilation; rates exclude it.
  for batch in it:
    images, mask = sharding.shard_batch(
        (batch["image"], np.asarray(batch["mask"], np.float32)), mesh)
    sums = step_fn(params, images, mask)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    done += int(np.asarray(batch["mask"]).sum()) * jax.process_count()
    if first_end is None:
      jax.block_until_ready(total)
      first_done, first_end = done, time.time()
    if time.time() - last_log > 10:
      jax.block_until_ready(total)
      rate = (done - first_done) / max(time.time() - first_end, 1e-9)
      logging.info("%s: %d/%d images, %.1f examples/s, ETA %.0f s", desc, done, num_images,
                   rate, (num_images - done) / max(rate, 1e-9))
      last_log = time.time()
  total = jax.tree.map(np.asarray, jax.device_get(total))
  seconds = time.time() - start
  if done > first_done:  # Steady state, after the first (compiling) batch.
    rate = (done - first_done) / max(time.time() - first_end, 1e-9)
  else:
    rate = done / max(seconds, 1e-9)
  stats = {"num_images": float(done), "seconds": seconds, "examples_per_s": rate,
           "first_batch_seconds": first_end - start}
  logging.info("%s: %d images in %.1f s (first batch incl. compilation %.1f s; then %.1f "
               "examples/s)", desc, done, seconds, first_end - start, rate)
  return total, stats


def is_vit(module) -> bool:
  """ViTs expose `num_heads` and `patch_size` (contracts.md)."""
  return hasattr(module, "num_heads") and hasattr(module, "patch_size")


def model_distances(model: base.LoadedModel, source, mesh, *, num_images: int, batch_size: int,
                    seed: int = 0, renormalize: bool = False,
                    unit: str = "pixels", fast: bool = False
                    ) -> tuple[np.ndarray, dict[str, float]]:
  """Mean attention distance of every head of every block of a ViT, averaged over images.

  Returns:
    ([L, H] float64 distances, streaming stats).
  """
  from vit_analysis import capture  # pylint: disable=g-import-not-at-top

  module = model.module
  if not is_vit(module):
    raise ValueError(f"model {model.key!r} ({model.name}) is not a ViT (no num_heads/patch_size)")
  if unit not in ("pixels", "patches"):
    raise ValueError(f"unit must be 'pixels' or 'patches', got {unit!r}")
  side = model.image_size // module.patch_size
  grid, has_cls = (side, side), module.classifier == "token"
  step = 1.0 if unit == "patches" else float(module.patch_size)
  fn = capture.make_capture_fn(module, "block*/attn_weights")

  def step_fn(variables, images, mask):
    d = block_attention_distances(fn(variables, images), grid, step, has_cls=has_cls,
                                  renormalize=renormalize)  # [b, L, H]
    return {"sum": jnp.einsum("blh,b->lh", d, mask), "count": mask.sum()}

  sums, stats = stream_sums(step_fn, model.variables, source, num_images=num_images,
                            batch_size=batch_size, image_size=model.image_size, mesh=mesh,
                            seed=seed, desc=f"attention distance {model.key}", fast=fast)
  return np.asarray(sums["sum"], np.float64) / float(sums["count"]), stats


def run(config, ctx: base.Context) -> base.AnalysisResult:
  """Attention distances of every ViT in `ctx.models` (Figs 3, 4, C.5, C.6).

  Sub-config `config.attention_distance`: split, num_images (paper 5000), batch_size, seed,
  models (keys; empty = every ViT), renormalize, unit ('pixels' | 'patches'), blocks (for the
  sorted-heads figure; empty = first two and last two), figure_formats (default png + pdf),
  fast_compile (XLA:CPU level 0; default `config.train.fast_compile`).
  """
  from vit_analysis import plotting  # pylint: disable=g-import-not-at-top
  from vit_analysis.plotting import mechanisms  # pylint: disable=g-import-not-at-top

  cfg = config.attention_distance
  formats = tuple(cfg.get("figure_formats", ("png", "pdf")))
  start = time.time()
  keys = list(cfg.get("models", ()) or [k for k, m in ctx.models.items() if is_vit(m.module)])
  if not keys:
    raise ValueError(f"attention_distance needs a ViT; models are {list(ctx.models)}")
  source = ctx.sources[cfg.get("split", "test")]
  distances, metrics = {}, {}
  for key in keys:
    if key not in ctx.models:
      raise KeyError(f"attention_distance: unknown model {key!r}; known: {list(ctx.models)}")
    d, stats = model_distances(
        ctx.models[key], source, ctx.mesh, num_images=cfg.get("num_images", 5000),
        batch_size=cfg.get("batch_size", 64), seed=cfg.get("seed", 0),
        renormalize=cfg.get("renormalize", False), unit=cfg.get("unit", "pixels"),
        fast=fast_compile(config, cfg))
    distances[key] = d
    module, size = ctx.models[key].module, ctx.models[key].image_size
    step = 1.0 if cfg.get("unit", "pixels") == "patches" else float(module.patch_size)
    metrics[key] = {
        "uniform_attention": float(patch_distances((size // module.patch_size,) * 2, step).mean()),
        "block0_min_head": float(d[0].min()), "block0_max_head": float(d[0].max()),
        "last_block_mean": float(d[-1].mean()), "per_block_mean": d.mean(1).round(3).tolist(),
        "num_images": stats["num_images"], "examples_per_s": round(stats["examples_per_s"], 2)}
  figures = []
  if sharding.is_main_process():
    np.savez(ctx.path("results", "attention_distance.npz"), **distances)
    unit = cfg.get("unit", "pixels")
    labels = {k: f"{k} ({ctx.models[k].name})" for k in keys}
    fig = mechanisms.attention_distance_scatter(
        {labels[k]: distances[k] for k in keys}, unit=unit,
        uniform={labels[k]: metrics[k]["uniform_attention"] for k in keys})
    figures.append(plotting.save_figure(fig, ctx.path("figures", "attention_distance"), formats))
    fig = mechanisms.attention_distance_sorted({labels[k]: distances[k] for k in keys},
                                               blocks=tuple(cfg.get("blocks", ()) or ()), unit=unit)
    figures.append(plotting.save_figure(
        fig, ctx.path("figures", "attention_distance_sorted"), formats))
    figures = [f[len(ctx.workdir):].lstrip("/") if f.startswith(ctx.workdir) else f
               for f in figures]
  result = base.AnalysisResult(
      name="attention_distance", title="Mean attention distance per head (Figs 3, 4, C.5, C.6)",
      caption=("Each point is one head: the attention-weighted mean distance between query and "
               "key patches, averaged over queries and images. The paper finds both local and "
               "global heads in the lowest blocks of large-data ViTs (none local when trained on "
               "ImageNet only for L/H), and only global heads at the top."),
      figures=figures, metrics=metrics, seconds=time.time() - start)
  if sharding.is_main_process():
    base.save_result(ctx, result)
  return result
