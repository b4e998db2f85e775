"""Attention distances of a model's heads on a sample of images (docs/method.md#attention-distance).

For head h, query patch q and key patch k with attention weight a_hqk (softmax over all keys, CLS
included) and pixel distance d(q, k) = P * ||grid(q) - grid(k)||_2, a head's distance on one
image is mean_q sum_k a_hqk d(q, k). By default the CLS token is dropped as both query and key
and the remaining patch weights are NOT renormalised, so a head that puts mass on CLS looks more
local; `renormalize=True` divides by the patch mass instead.

Error bars: the standard error over images of each head's distance (and of each block's mean over
heads), from per-image sums of squares streamed with the sums (`model_distance_statistics`).

`mean_attention_distance` is the one implementation: the attention-distance analysis (Figs 3, 4)
and the head-subset analysis (Fig 5, which orders heads from local to global) both read it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis.input import streaming
from vit_analysis.models import capture
from vit_analysis.runtime import compilation

if TYPE_CHECKING:  # for annotations only: building models pulls in training
  from vit_analysis.models.build import LoadedModel


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
                            *, has_cls: bool, renormalize: bool = False,
                            num_prefix: int | None = None) -> jax.Array:
  """Mean attention distance of every head, per image.

  Args:
    attn_weights: [b, H, T, T] softmax weights (query axis -2, key axis -1), T = gh*gw (+1 with
      CLS first).
    grid: (gh, gw) token grid.
    patch_size: pixels per grid step (the model's patch size for distances in pixels).
    has_cls: whether token 0 is a CLS token; it is dropped as query and key.
    renormalize: divide each query's patch weights by their sum (CLS mass redistributed).
    num_prefix: tokens before the patch grid (CLS and register tokens; default `has_cls`), all
      dropped as query and key.

  Returns:
    [b, H] float32: mean over queries of sum_k a_qk d(q, k).

  Raises:
    ValueError: if the shape does not match the grid.
  """
  if attn_weights.ndim != 4 or attn_weights.shape[-1] != attn_weights.shape[-2]:
    raise ValueError(f"attn_weights must be [b, H, T, T], got shape {attn_weights.shape}")
  num_patches = int(grid[0]) * int(grid[1])
  prefix = int(has_cls) if num_prefix is None else int(num_prefix)
  expected = num_patches + prefix
  if attn_weights.shape[-1] != expected:
    raise ValueError(
        f"attn_weights have {attn_weights.shape[-1]} tokens but grid {tuple(grid)} with "
        f"{prefix} prefix tokens (has_cls={has_cls}) needs {expected}")
  a = attn_weights[..., prefix:, prefix:].astype(jnp.float32)  # [b, H, N, N]
  if renormalize:
    a = a / jnp.maximum(a.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  dist = jnp.asarray(patch_distances(grid, patch_size))  # [N, N]
  per_query = jnp.einsum("bhqk,qk->bhq", a, dist)
  return per_query.mean(-1)


def block_attention_distances(out: dict[str, jax.Array], grid: tuple[int, int],
                              patch_size: float, *, has_cls: bool,
                              renormalize: bool = False,
                              num_prefix: int | None = None) -> jax.Array:
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
      mean_attention_distance(out[n], grid, patch_size, has_cls=has_cls, renormalize=renormalize,
                              num_prefix=num_prefix)
      for n in names], axis=1)


@dataclasses.dataclass(frozen=True)
class DistanceStatistics:
  """Attention distances of a ViT's heads over a sample of images, with their error bars.

  Attributes:
    mean: [L, H] float64, each head's distance averaged over the n images.
    stderr: [L, H] standard error of `mean` over images, s / sqrt(n) with s the sample standard
      deviation (ddof=1) of the per-image head distances; NaN for n < 2.
    block_mean: [L], the mean over heads of `mean` (one per block).
    block_mean_stderr: [L] its standard error over images: the SE of the mean over images of each
      image's head-averaged distance (it includes the correlation between heads).
    num_images: n.
  """
  mean: np.ndarray
  stderr: np.ndarray
  block_mean: np.ndarray
  block_mean_stderr: np.ndarray
  num_images: int


def stderr_from_sums(total: np.ndarray, total_sq: np.ndarray, n: float) -> np.ndarray:
  """Standard error of a mean over n samples from their sum and sum of squares.

  s^2 = (sum x^2 - (sum x)^2 / n) / (n - 1) is the sample variance (ddof=1) and SE = s / sqrt(n).
  The sums are float32 accumulations, so s^2 carries a relative error of about
  1e-6 E[x^2] / s^2 (negligible unless the spread is below ~0.1% of the values); rounding that
  makes s^2 slightly negative is clipped to 0.

  Args:
    total: [...] sum over the samples.
    total_sq: [...] sum of the squares.
    n: the number of samples.

  Returns:
    [...] float64; NaN where n < 2.
  """
  total, total_sq = np.asarray(total, np.float64), np.asarray(total_sq, np.float64)
  if n < 2:
    return np.full(total.shape, np.nan)
  var = np.maximum(total_sq - total * total / n, 0.0) / (n - 1)
  return np.sqrt(var / n)


def model_distance_statistics(model: LoadedModel, source, mesh, *, num_images: int,
                              batch_size: int, seed: int = 0, renormalize: bool = False,
                              unit: str = "pixels", fast: bool = False, resume: Any = None,
                              indices: np.ndarray | None = None
                              ) -> tuple[DistanceStatistics, dict[str, float]]:
  """Mean attention distance of every head of every block of a ViT, with its SE over images.

  One pass: each step adds the per-image distances d [b, L, H], their squares and the squares of
  their head means, so the error bars cost no extra forward pass.

  Args:
    model: a ViT (or hybrid) whose `out` holds 'block*/attn_weights'.
    source: random-access raw images.
    mesh: the device mesh; each global batch is split over it.
    num_images: images of a seeded sample of `source` (`streaming.sample`), unless `indices`.
    batch_size: global batch (rounded up to a multiple of the device count).
    seed: the sample's seed.
    renormalize, unit: see `mean_attention_distance` ('pixels' or 'patches').
    fast: XLA:CPU fast compilation.
    resume: optional `resume.Checkpointer` for the running sums.
    indices: explicit example indices (overrides `num_images` / `seed`).

  Returns:
    (the distances and their standard errors, streaming stats).
  """
  info = model.info
  if not info.has_attention_weights:
    raise ValueError(f"model {model.key!r} ({model.name}) exposes no attention weights "
                     "('block*/attn_weights'); attention distances need a ViT")
  if unit not in ("pixels", "patches"):
    raise ValueError(f"unit must be 'pixels' or 'patches', got {unit!r}")
  step = 1.0 if unit == "patches" else float(info.patch_size)
  fn = capture.make_capture_fn(model.module, "block*/attn_weights")

  def step_fn(variables, images, mask):
    d = block_attention_distances(fn(variables, images), info.grid, step,
                                  has_cls=info.has_cls, num_prefix=info.num_prefix_tokens,
                                  renormalize=renormalize)  # [b, L, H]
    block = d.mean(-1)  # [b, L]
    return {"sum": jnp.einsum("blh,b->lh", d, mask),
            "sum_sq": jnp.einsum("blh,b->lh", d * d, mask),
            "block_sum_sq": jnp.einsum("bl,b->l", block * block, mask), "count": mask.sum()}

  if indices is None:
    indices = streaming.sample(len(source), min(int(num_images), len(source)), seed)
  sums, stats = streaming.stream_sums(
      step_fn, model.variables, source, indices, step_size=streaming.round_step(
          min(int(batch_size), len(indices)), mesh), image_size=model.image_size,
      normalization=info.normalization, mesh=mesh, desc=f"attention distance {model.key}",
      compiler_options=compilation.compiler_options(fast), resume=resume)
  n = float(sums["count"])
  total = np.asarray(sums["sum"], np.float64)
  return DistanceStatistics(
      mean=total / n, stderr=stderr_from_sums(total, sums["sum_sq"], n),
      block_mean=total.mean(1) / n,
      block_mean_stderr=stderr_from_sums(total.mean(1), sums["block_sum_sq"], n),
      num_images=int(n)), stats


def model_distances(model: LoadedModel, source, mesh, *, num_images: int, batch_size: int,
                    seed: int = 0, renormalize: bool = False, unit: str = "pixels",
                    fast: bool = False, resume: Any = None,
                    indices: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
  """`model_distance_statistics` without the error bars.

  Returns:
    ([L, H] float64 distances averaged over images, streaming stats).
  """
  result, stats = model_distance_statistics(
      model, source, mesh, num_images=num_images, batch_size=batch_size, seed=seed,
      renormalize=renormalize, unit=unit, fast=fast, resume=resume, indices=indices)
  return result.mean, stats
