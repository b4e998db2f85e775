"""Mean attention distance per head (paper Figs 3, 4, C.5, C.6).

For head h, query patch q and key patch k with attention weight a_hqk (softmax over all keys, CLS
included) and pixel distance d(q, k) = P * ||grid(q) - grid(k)||_2, a head's distance on one image
is mean_q sum_k a_hqk d(q, k) (paper.md §1.6). By default the CLS token is dropped as both query and
key and the remaining patch weights are NOT renormalised, so a head that puts mass on CLS looks
more local; `renormalize=True` divides by the patch mass instead.

`mean_attention_distance` is the one shared implementation: the head-subset analysis (Fig 5)
imports it to order heads from local to global. Keep its name and signature stable.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

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
