"""Attention distances of a model's heads on a sample of images (docs/method.md#attention-distance).

For head h, query patch q and key patch k with attention weight a_hqk (softmax over all keys, CLS
included) and pixel distance d(q, k) = P * ||grid(q) - grid(k)||_2, a head's distance on one
image is mean_q sum_k a_hqk d(q, k). By default the CLS token is dropped as both query and key
and the remaining patch weights are NOT renormalised, so a head that puts mass on CLS looks more
local; `renormalize=True` divides by the patch mass instead.

`mean_attention_distance` is the one implementation: the attention-distance analysis (Figs 3, 4)
and the head-subset analysis (Fig 5, which orders heads from local to global) both read it.
"""
from __future__ import annotations

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


def model_distances(model: LoadedModel, source, mesh, *, num_images: int, batch_size: int,
                    seed: int = 0, renormalize: bool = False, unit: str = "pixels",
                    fast: bool = False, resume: Any = None,
                    indices: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
  """Mean attention distance of every head of every block of a ViT, averaged over images.

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
    ([L, H] float64 distances, streaming stats).
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
    return {"sum": jnp.einsum("blh,b->lh", d, mask), "count": mask.sum()}

  if indices is None:
    indices = streaming.sample(len(source), min(int(num_images), len(source)), seed)
  sums, stats = streaming.stream_sums(
      step_fn, model.variables, source, indices, step_size=streaming.round_step(
          min(int(batch_size), len(indices)), mesh), image_size=model.image_size,
      normalization=info.normalization, mesh=mesh, desc=f"attention distance {model.key}",
      compiler_options=compilation.compiler_options(fast), resume=resume)
  return np.asarray(sums["sum"], np.float64) / float(sums["count"]), stats
