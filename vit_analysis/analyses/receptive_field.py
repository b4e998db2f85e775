"""Effective receptive fields (paper Figs 6, C.1-C.4).

ERF_l(u, v) = mean over images and over channels c of |dF_l[centre, c] / dx[u, v]|, with the 3
colour channels reduced by mean (paper.md §1.6, §6 rows 9-10). "Centre" is position (h//2, w//2)
of layer l's feature map ([b, h, w, c] for ResNets, the patch tokens of [b, T, D] for ViTs).
Post-residual ERFs use the stream after the skip add ('block03/+sa', 'block03',
'block2/unit01'); branch-only ERFs use the long branch ('block03/sa', '.../conv_c').

The default is the literal per-channel absolute gradient: one VJP of the forward pass, pulled back
once per channel (channels in chunks under `lax.scan`, so memory is `chunk * batch * image`).
The cheap option (`per_channel=False`) takes abs(grad of the channel mean), one pull-back.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis import sharding
from vit_analysis.analyses import base


def centre_activations(features: jax.Array, *, grid: tuple[int, int] | None = None,
                       has_cls: bool = False) -> jax.Array:
  """The features at the centre position (h//2, w//2) of a layer.

  Args:
    features: [b, h, w, c] feature map, or [b, T, D] tokens (patch tokens row-major, after a CLS
      token when `has_cls`).
    grid: (gh, gw) of the tokens; inferred as a square when None.
    has_cls: whether token 0 is CLS (skipped).

  Returns:
    [b, c].
  """
  if features.ndim == 4:
    return features[:, features.shape[1] // 2, features.shape[2] // 2, :]
  if features.ndim != 3:
    raise ValueError(f"features must be [b, h, w, c] or [b, T, D], got shape {features.shape}")
  num_patches = features.shape[1] - int(has_cls)
  if grid is None:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
      raise ValueError(f"{num_patches} patch tokens are not a square grid; pass grid=")
    grid = (side, side)
  if grid[0] * grid[1] != num_patches:
    raise ValueError(f"grid {grid} does not match {num_patches} patch tokens "
                     f"(features {features.shape}, has_cls={has_cls})")
  index = int(has_cls) + (grid[0] // 2) * grid[1] + grid[1] // 2
  return features[:, index, :]


def erf_sum(centre_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
            mask: jax.Array | None = None, *, per_channel: bool = True,
            channel_chunk: int = 16, rgb_reduce: str = "mean") -> jax.Array:
  """Sum over the images of a batch of each image's ERF.

  Images must not interact in `centre_fn` (true for eval-mode ViT/ResNet/Mixer: LayerNorm and
  GroupNorm are per example), so the gradient of sum_b F[b, c] w.r.t. x[b] is image b's own.

  Args:
    centre_fn: images [b, H, W, C] -> centre activations [b, c].
    images: [b, H, W, C].
    mask: [b] 1 for real images, 0 for padding (padded images contribute nothing).
    per_channel: mean over c of |dF_c/dx| (paper default); else |d(mean_c F_c)/dx|.
    channel_chunk: channels pulled back together (memory: chunk * b * H * W * C floats).
    rgb_reduce: 'mean' or 'sum' over the input colour channels.

  Returns:
    [H, W] float32, sum over the (unmasked) images.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [b, H, W, C], got shape {images.shape}")
  if rgb_reduce not in ("mean", "sum"):
    raise ValueError(f"rgb_reduce must be 'mean' or 'sum', got {rgb_reduce!r}")
  reduce_rgb = jnp.mean if rgb_reduce == "mean" else jnp.sum
  centre, vjp_fn = jax.vjp(centre_fn, images)
  if centre.ndim != 2:
    raise ValueError(f"centre_fn must return [b, c], got shape {centre.shape}")
  b, c = centre.shape
  weight = jnp.ones((b,), centre.dtype) if mask is None else mask.astype(centre.dtype)

  if not per_channel:
    (grad,) = vjp_fn(jnp.broadcast_to(weight[:, None] / c, (b, c)))
    return reduce_rgb(jnp.abs(grad), axis=-1).sum(0)

  chunk = max(1, min(int(channel_chunk), c))
  num_chunks = -(-c // chunk)
  # Padded channel ids are -1: one_hot gives a zero cotangent, hence a zero gradient.
  ids = jnp.full((num_chunks * chunk,), -1, jnp.int32).at[:c].set(jnp.arange(c, dtype=jnp.int32))

  def body(total, chunk_ids):
    cot = jax.nn.one_hot(chunk_ids, c, dtype=centre.dtype)[:, None, :] * weight[None, :, None]
    (grads,) = jax.vmap(vjp_fn)(cot)  # [chunk, b, H, W, C]
    return total + reduce_rgb(jnp.abs(grads), axis=-1).sum((0, 1)), None

  total = jnp.zeros(images.shape[1:3], jnp.float32)
  total, _ = jax.lax.scan(body, total, ids.reshape(num_chunks, chunk))
  return total / c


def mass_area_fraction(erf: np.ndarray, fraction: float = 0.5) -> float:
  """Fraction of the image covered by the fewest pixels that hold `fraction` of the ERF mass.

  A local ERF (one 3x3 conv on a 32x32 image) gives about 9/1024 * fraction; a uniform ERF gives
  `fraction`.
  """
  erf = np.asarray(erf, np.float64).ravel()
  if not np.all(np.isfinite(erf)):
    raise ValueError("ERF contains NaN/Inf")
  total = erf.sum()
  if total <= 0:
    return 0.0
  cum = np.cumsum(np.sort(erf)[::-1])
  count = int(np.searchsorted(cum, fraction * total * (1 - 1e-12))) + 1
  return min(count, erf.size) / erf.size


def mass_radius(erf: np.ndarray, fraction: float = 0.5) -> float:
  """Smallest radius (pixels) of a disc about the ERF's centre of mass holding `fraction` of it."""
  erf = np.asarray(erf, np.float64)
  total = erf.sum()
  if total <= 0:
    return 0.0
  rows, cols = np.meshgrid(np.arange(erf.shape[0]), np.arange(erf.shape[1]), indexing="ij")
  cr, cc = (erf * rows).sum() / total, (erf * cols).sum() / total
  radius = np.sqrt((rows - cr) ** 2 + (cols - cc) ** 2).ravel()
  order = np.argsort(radius, kind="stable")
  cum = np.cumsum(erf.ravel()[order])
  return float(radius[order][int(np.searchsorted(cum, fraction * total * (1 - 1e-12)))])
