"""Spatial localisation of output tokens (Figs 9, 10, D.1–D.3).

For a token at grid position (r, c) of some layer and the raw input patch at every position
(r', c'), compute minibatch CKA(token(r, c) features, preprocessed pixels of patch (r', c'))
over the same images. A well-localised token peaks at its own patch. ViT tokens are the patch
tokens (CLS excluded, index = row * grid + col); a ResNet "token" is all channels at one spatial
position of a feature map, whose input patch is image_size / map_size pixels wide.

Summary scores over every token position (not only the drawn ones):
  own_is_best  fraction of tokens whose most similar input patch is their own;
  own_rank     mean rank of the own patch among all patches (0 = best);
  own_margin   mean of CKA(own) - max CKA(other patches) (> 0: the own patch wins);
  own_contrast mean of CKA(own) - mean CKA(other patches).

own_contrast is linear in the CKA grid (`contrast_weights`), so it is saved with its standard
error (`own_contrast_stderr`, over repeats or the minibatch jackknife, `own_contrast_over`;
docs/method.md#error-bars-of-cka-statistics).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.input import streaming
from vit_analysis.models import capture
from vit_analysis.plotting import similarity as plots
from vit_analysis.similarity import cka_runner, representations


def input_patches(images: jax.Array, patch: int) -> jax.Array:
  """Non-overlapping patches, row-major: images [b, H, W, C] -> [b, H/P, W/P, P*P*C]."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image {h}x{w} is not divisible into {patch}-pixel patches")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def token_grid(x: jax.Array, num_prefix: int) -> jax.Array:
  """A layer's tokens on their grid: [b, T, D] tokens (the first `num_prefix`, CLS and
  registers, dropped) or a [b, h, w, c] feature map -> [b, g, g, D]."""
  if x.ndim == 4:
    if x.shape[1] != x.shape[2]:
      raise ValueError(f"localisation needs a square feature map, got {x.shape}")
    return x
  if x.ndim != 3:
    raise ValueError(f"localisation needs [b, T, D] tokens or a [b, h, w, c] map, got {x.shape}")
  x = x[:, int(num_prefix):]
  g = int(round(np.sqrt(x.shape[1])))
  if g * g != x.shape[1]:
    raise ValueError(f"{x.shape[1]} patch tokens do not form a square grid")
  return x.reshape(x.shape[0], g, g, x.shape[2])


def default_tokens(grid: int) -> list[tuple[int, int]]:
  """The paper's B/32 positions (0,0), (2,1), (4,2), (4,4) on a 7-grid, scaled to `grid`."""
  return [(0, 0)] + [(grid * r // 7, grid * c // 7) for r, c in ((2, 1), (4, 2), (4, 4))]


def sides(model: base.LoadedModel, layer: str,
          patch_positions: Sequence[tuple[int, int]] | None = None,
          ) -> tuple[representations.Side, representations.Side, int]:
  """The token side (one feature per grid position), the input-patch side (the positions in
  `patch_positions`, default all) and the grid size."""
  prefix = model.info.num_prefix_tokens
  (layer,) = capture.select(
      capture.layer_names(model.module, (model.image_size,) * 2 + (3,)), [layer])
  capture_fn = capture.make_capture_fn(model.module, [layer])
  image = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), np.float32)
  g = jax.eval_shape(lambda v, x: token_grid(capture_fn(v, x)[layer], prefix),
                     model.variables, image).shape[1]
  if model.image_size % g:
    raise ValueError(f"image size {model.image_size} is not a multiple of the {g}x{g} grid")
  patch = model.image_size // g
  positions = [(r, c) for r in range(g) for c in range(g)]

  def tokens(variables, images):
    grid = token_grid(capture_fn(variables, images)[layer], prefix)
    return {f"token{r}_{c}": grid[:, r, c] for r, c in positions}

  patch_positions = positions if patch_positions is None else [tuple(p) for p in patch_positions]

  def patches(_, images):
    grid = input_patches(images, patch)
    return {f"patch{r}_{c}": grid[:, r, c] for r, c in patch_positions}

  names = lambda prefix, ps: tuple(f"{prefix}{r}_{c}" for r, c in ps)  # noqa: E731
  norm = model.info.normalization
  return (representations.Side(tokens, model.variables, model.image_size, names("token", positions),
                          norm),
          representations.Side(patches, {}, model.image_size, names("patch", patch_positions), norm),
          g)


def varying_positions(source: Any, indices: np.ndarray, image_size: int, grid: int,
                      min_fraction: float = 0.1,
                      normalization: Any = "minus_one_one") -> list[tuple[int, int]]:
  """Grid positions whose input patch varies: differs from its median over the images at
  `indices` in at least `min_fraction` of them.

  A (nearly) constant patch (the empty border of every digit, a letterbox) has no meaningful CKA:
  a patch that differs in only one image of a minibatch has unbiased self-HSIC ~ 0. Such
  positions are left out of the comparison and drawn blank. Every process reads all of
  `indices`, so all agree on the positions.
  """
  images = streaming.host_images(source, indices, image_size, normalization)
  patches = np.asarray(input_patches(images, image_size // grid))  # [n, g, g, P*P*3]
  differs = (patches != np.median(patches, axis=0)).any(-1).mean(0)  # [g, g]
  return [(r, c) for r in range(grid) for c in range(grid) if differs[r, c] >= min_fraction]


def expand_columns(rep: cka_runner.RepeatedCKA, grid: int) -> cka_runner.RepeatedCKA:
  """[R, N, valid] -> [R, N, g*g] with NaN in the columns of left-out (constant) patches."""
  full = [f"patch{r}_{c}" for r in range(grid) for c in range(grid)]
  cols = [full.index(n) for n in rep.names_b]
  values = np.full(rep.values.shape[:2] + (len(full),), np.nan)
  stderr = np.full_like(values, np.nan)
  values[..., cols], stderr[..., cols] = rep.values, rep.stderr
  loo = None
  if rep.leave_one_out is not None:
    loo = np.full(rep.leave_one_out.shape[:3] + (len(full),), np.nan)
    loo[..., cols] = rep.leave_one_out
  return cka_runner.RepeatedCKA(rep.names_a, full, values, stderr, rep.num_examples,
                                rep.minibatch_size, rep.examples_counted,
                                leave_one_out=loo)


def scores(matrix: np.ndarray) -> dict[str, float]:
  """Summary scores of a [N, N] token-by-patch CKA matrix (row i's own patch is column i).

  NaN cells (constant patches) are ignored; tokens whose own patch is NaN are left out.
  """
  matrix = np.asarray(matrix, np.float64)
  n = matrix.shape[0]
  if matrix.shape != (n, n):
    raise ValueError(f"localisation matrix must be square, got {matrix.shape}")
  own = np.diag(matrix)
  keep = np.isfinite(own)
  if not keep.any():
    raise ValueError("no token has a finite CKA with its own patch")
  m, own = matrix[keep], own[keep]
  eye = np.eye(n, dtype=bool)[keep]
  valid_other = np.isfinite(m) & ~eye
  best = np.where(np.isfinite(m), m, -np.inf).argmax(1)
  other_max = np.where(valid_other, m, -np.inf).max(1)
  other_mean = np.where(valid_other, m, 0).sum(1) / np.maximum(valid_other.sum(1), 1)
  return dict(own_is_best=float((best == np.flatnonzero(keep)).mean()),
              own_rank=float((np.where(valid_other, m, -np.inf) > own[:, None]).sum(1).mean()),
              own_margin=float((own - other_max).mean()),
              own_contrast=float((own - other_mean).mean()),
              own_cka=float(own.mean()), tokens_scored=int(keep.sum()))


def contrast_weights(matrix: np.ndarray) -> np.ndarray:
  """Weights w [N, N] with sum(w * m) == scores(m)['own_contrast'] for every grid m with the NaN
  cells of `matrix`.

  Each of the n tokens with a finite own cell contributes (own - mean of its finite other cells)
  / n: +1/n on its own cell, -1/(n n_i) on each of its n_i finite other cells, 0 elsewhere.
  """
  matrix = np.asarray(matrix, np.float64)
  n = matrix.shape[0]
  if matrix.shape != (n, n):
    raise ValueError(f"localisation matrix must be square, got {matrix.shape}")
  finite = np.isfinite(matrix)
  keep = np.diag(finite).copy()
  if not keep.any():
    raise ValueError("no token has a finite CKA with its own patch")
  other = finite & ~np.eye(n, dtype=bool) & keep[:, None]
  w = -other.astype(np.float64) / np.maximum(other.sum(1, keepdims=True), 1)
  w[np.arange(n), np.arange(n)] = keep
  return w / keep.sum()


def _layers(cfg: Any, key: str, model: base.LoadedModel) -> Sequence[str]:
  per_model = cfg.get("layers_per_model", None) or {}
  if key in per_model:
    return config_lib.names(per_model[key])
  return (representations.resolve_layers(model, "blocks")[-1],)  # final block / final unit


def maps_args(mean: np.ndarray, title: str, tokens: Sequence[tuple[int, int]], grid: int,
              vmax: float | None = 1.0) -> dict[str, Any]:
  """The arguments of `plotting.similarity.localization_maps` for the chosen tokens.

  Args:
    mean: [grid * grid, grid * grid] CKA of each token (rows) with each input patch (columns).
    title: figure title; the count of left-out (constant, NaN) input patches is added.
    tokens: the (row, col) grid positions drawn.
    grid: tokens per side.
    vmax: colour range [0, vmax] (None: the largest value).
  """
  mean = np.asarray(mean).reshape(grid * grid, grid, grid)
  blank = int(np.isnan(mean).all(0).sum())
  if blank:
    title = f"{title}\n{blank} of {grid * grid} input patches constant, left out (blank)"
  return dict(maps=np.stack([mean[r * grid + c] for r, c in tokens]),
              tokens=[list(t) for t in tokens], title=title, vmax=vmax)


def default_config() -> ml_collections.ConfigDict:
  """Every option of the localisation analysis, with the paper's defaults."""
  c = cka_runner.protocol_config()
  c.models = ()                # model keys (tuple or comma-separated); empty = all
  c.layers_per_model = {}      # key -> layer name(s); default the final block / final unit
  c.tokens = ()                # (row, col) positions drawn; () = the paper's B/32 positions
  c.vmax = 1.0                 # colour range [0, vmax]; None: the largest value
  c.min_patch_variation = 0.1  # leave out input patches that differ in < 10% of images
  c.figure_formats = ("png", "pdf")
  return c


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Localisation maps and scores for every model in `localization.models` (default all)."""
  source = ctx.sources[cfg.split]
  settings = cka_runner.protocol(cfg)
  figures, metrics = [], {}
  for key in ctx.model_keys(config_lib.names(cfg.models)):
    model = ctx.model(key)
    for layer in _layers(cfg, key, model):
      token_side, patch_side, g = sides(model, layer)
      # The images of the first repeat (up to 2048) decide which patches are constant.
      check = streaming.cka_plan(len(source), settings["num_examples"],
                                 settings["minibatch_size"], 1, ctx.seed).reshape(-1)[:2048]
      positions = varying_positions(source, check, model.image_size, g,
                                    float(cfg.min_patch_variation), model.info.normalization)
      if len(positions) < g * g:
        logging.info("localization/%s: %d of %d input patches are constant and left out", key,
                     g * g - len(positions), g * g)
        token_side, patch_side, g = sides(model, layer, positions)
      tokens = [tuple(int(v) for v in t) for t in (cfg.tokens or default_tokens(g))]
      bad = [t for t in tokens if not (0 <= t[0] < g and 0 <= t[1] < g)]
      if bad:
        raise ValueError(f"localization.tokens {bad} outside the {g}x{g} grid of {key}/{layer}")
      tag = f"{key}_{layer.replace('/', '-')}"
      rep = cka_runner.cka_over_repeats(token_side, patch_side, source, seed=ctx.seed,
                                        mesh=ctx.mesh, desc=f"localization/{key}/{layer}",
                                        resume=ctx.checkpointer(tag), **settings)
      rep = expand_columns(rep, g)
      contrast = cka_runner.linear_estimate([(rep, contrast_weights(rep.mean))])
      metrics[f"{key}/{layer}"] = dict(scores(rep.mean), grid=g, model=model.name,
                                       own_contrast_stderr=contrast["stderr"],
                                       own_contrast_over=contrast["over"])
      stem = ctx.results_stem(f"localization_{tag}")
      if ctx.is_main:
        rep.save(stem, grid=g, tokens=np.asarray(tokens))
      figures.append(ctx.save_figure(
          f"localization_{tag}", plots.localization_maps,
          **maps_args(rep.mean, f"{model.name} {layer}: CKA(token, input patch)", tokens, g,
                      cfg.vmax)))
  return base.AnalysisResult(
      name="localization", title="Spatial localisation (Figs 9, 10, D.1-D.3)",
      caption="CKA between one output token (red cross) and the raw input patch at every grid "
              "position. The paper finds interior CLS-ViT tokens peaking at their own patch, a GAP "
              "ViT clearly less localised, and ResNet final units diffuse. Input patches that are "
              "(nearly) constant over the images, such as the empty border of every digit, have "
              "no defined CKA: they are left out and drawn blank (each figure counts them).",
      figures=figures, metrics=dict(settings, **metrics))
