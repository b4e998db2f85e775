"""Skip-connection norm ratios and cosines (paper Figs 7, E.1, E.2).

For sublayer s (attention or MLP) of block i, z is the residual stream entering it (the skip path)
and f(z) the branch output; per token t, r_t = ||z_t|| / ||f(z)_t|| (norm over channels), averaged
over images (docs/method.md#skip-norms). A large ratio means the skip dominates the token. The
ResNet equivalent takes, per unit, z = the shortcut (the projection '.../proj' where the unit has
one, else the unit input) and f = the residual branch '.../conv_c', norms over the flattened
h*w*c tensor. Fig E.2's cosine is cos(z, z + f(z)) (option: cos(z, f(z))).

A branch that outputs exactly zero has an infinite ratio: it is kept as +inf and counted in
`num_infinite` (never NaN), so a dead branch is visible in the results instead of silently
poisoning a mean.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.input import streaming
from vit_analysis.models import capture, layers
from vit_analysis.plotting import mechanisms
from vit_analysis.runtime import compilation


def _norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=axes))


def norm_ratio(z: jax.Array, fz: jax.Array, axes: tuple[int, ...] = (-1,)) -> jax.Array:
  """||z|| / ||f(z)|| over `axes` (channels for tokens, (1, 2, 3) for a feature map).

  Returns:
    The ratio with `axes` reduced; +inf where ||f(z)|| == 0 (dead branch).
  """
  if z.shape != fz.shape:
    raise ValueError(f"skip {z.shape} and branch {fz.shape} shapes differ")
  zn, fn = _norm(z, axes), _norm(fz, axes)
  return jnp.where(fn > 0, zn / jnp.where(fn > 0, fn, 1.0), jnp.inf)


def cosine(a: jax.Array, b: jax.Array, axes: tuple[int, ...] = (-1,)) -> jax.Array:
  """cos(a, b) over `axes`; 0 where either vector is zero (the angle is undefined)."""
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  den = _norm(a, axes) * _norm(b, axes)
  return jnp.where(den > 0, jnp.sum(a * b, axis=axes) / jnp.where(den > 0, den, 1.0), 0.0)


def skip_pairs(names: Sequence[str]) -> list[tuple[str, str, str]]:
  """(label, skip name, branch name) for every residual sublayer, in forward order.

  Inferred from a model's `out` names (vit_analysis.models.capture.layer_names):
    ViT: 'block{i}/sa' with skip = the previous block output (or 'embedding'), then
      'block{i}/mlp' with skip = 'block{i}/+sa'.
    Mixer: 'block{i}/token_mixing' (skip = previous block or 'stem'), 'block{i}/channel_mixing'
      (skip = 'block{i}/+token').
    ResNet: 'block{s}/unit{u}' with skip = '.../proj' if present else the previous unit output
      (or 'root'), branch = '.../conv_c'.

  Raises:
    KeyError: if no residual sublayer is recognised.
  """
  names = list(names)
  present = set(names)
  pairs = []
  prev = None
  for name in names:
    layer = layers.parse(name)
    if name in ("embedding", "stem", "root") or (layer.kind == "block" and layer.is_output):
      prev = name
    elif layer.kind == "block" and layer.point in ("sa", "token_mixing"):
      pairs.append((name, prev, name))
    elif layer.kind == "block" and layer.point in ("mlp", "channel_mixing"):
      after_first = "+sa" if layer.point == "mlp" else "+token"
      pairs.append((name, layers.block(layer.block, after_first), name))
    elif layer.kind == "unit" and layer.is_output:
      proj = f"{name}/proj"
      pairs.append((name, proj if proj in present else prev, f"{name}/conv_c"))
      prev = name
  if not pairs or any(p[1] is None or p[1] not in present or p[2] not in present for p in pairs):
    raise KeyError(f"cannot find skip/branch pairs in layer names {names[:12]}...: {pairs[:4]}")
  return pairs


def pair_statistics(out: dict[str, jax.Array], pairs: Sequence[tuple[str, str, str]],
                    mask: jax.Array) -> dict[str, jax.Array]:
  """Per-batch sums of the per-token statistics of every pair (for streaming over images).

  Token tensors [b, T, D] give per-token values [b, T]; feature maps [b, h, w, c] give one value
  per image ([b, 1]). Pairs must all have the same number of tokens (true within one model).

  Args:
    out: captured activations holding every skip and branch name.
    pairs: from `skip_pairs`.
    mask: [b] 1 for real images, 0 for padding.

  Returns:
    {'ratio', 'skip_norm', 'branch_norm', 'cos_out', 'cos_branch', 'num_infinite'}: each [P, T]
    summed over the (unmasked) images, plus 'count' (scalar, number of images).
  """
  stats = {k: [] for k in ("ratio", "skip_norm", "branch_norm", "cos_out", "cos_branch",
                           "num_infinite")}
  w = mask.astype(jnp.float32)[:, None]  # [b, 1]
  for _, skip_name, branch_name in pairs:
    z, f = out[skip_name], out[branch_name]
    axes = (-1,) if z.ndim == 3 else tuple(range(1, z.ndim))
    ratio = norm_ratio(z, f, axes)
    ratio = ratio if ratio.ndim == 2 else ratio[:, None]
    finite = jnp.isfinite(ratio)

    def tok(x):
      return x if x.ndim == 2 else x[:, None]

    # Padded images get weight 0; where(...) keeps 0 * inf from becoming NaN.
    stats["ratio"].append(jnp.where(w > 0, ratio, 0.0).sum(0) * 1.0)
    stats["num_infinite"].append(jnp.where(w > 0, ~finite, False).sum(0).astype(jnp.float32))
    stats["skip_norm"].append((tok(_norm(z, axes)) * w).sum(0))
    stats["branch_norm"].append((tok(_norm(f, axes)) * w).sum(0))
    stats["cos_out"].append((tok(cosine(z, z + f, axes)) * w).sum(0))
    stats["cos_branch"].append((tok(cosine(z, f, axes)) * w).sum(0))
  result = {k: jnp.stack(v) for k, v in stats.items()}
  result["count"] = w.sum()
  return result


def finalize(sums: dict[str, np.ndarray], average: str = "per_image") -> dict[str, np.ndarray]:
  """Means over images from streamed `pair_statistics` sums.

  Args:
    sums: host copies of the summed statistics.
    average: 'per_image' (mean of per-image ratios, paper default) or 'ratio_of_means'.

  Returns:
    {'ratio', 'cos_out', 'cos_branch', 'num_infinite'}: float64 [P, T].
  """
  if average not in ("per_image", "ratio_of_means"):
    raise ValueError(f"average must be 'per_image' or 'ratio_of_means', got {average!r}")
  n = float(sums["count"])
  if n <= 0:
    raise ValueError("no images were accumulated")
  get = lambda k: np.asarray(sums[k], np.float64)
  if average == "per_image":
    ratio = get("ratio") / n
  else:
    b = get("branch_norm")
    ratio = np.where(b > 0, get("skip_norm") / np.where(b > 0, b, 1.0), np.inf)
  return {"ratio": ratio, "cos_out": get("cos_out") / n, "cos_branch": get("cos_branch") / n,
          "num_infinite": get("num_infinite")}


def model_skip_statistics(model: base.LoadedModel, source, mesh, *, num_images: int,
                          batch_size: int, seed: int = 0, average: str = "per_image",
                          fast: bool = False, resume: Any = None
                          ) -> tuple[list[str], dict[str, np.ndarray], dict[str, float]]:
  """Norm ratios and cosines of every residual sublayer of one model, averaged over images.

  The images are a seeded sample of `source` (`streaming.sample`); `resume` is an optional
  `resume.Checkpointer` for the running sums.

  Returns:
    (pair labels in forward order, `finalize` output ([P, T]; T = 1 for ResNets), stats).
  """
  names = capture.layer_names(model.module, (model.image_size, model.image_size, 3))
  pairs = skip_pairs(names)
  needed = sorted({n for _, skip, branch in pairs for n in (skip, branch)})
  fn = capture.make_capture_fn(model.module, tuple(layers.literal(n) for n in needed))

  def step_fn(variables, images, mask):
    return pair_statistics(fn(variables, images), pairs, mask)

  indices = streaming.sample(len(source), min(int(num_images), len(source)), seed)
  sums, stats = streaming.stream_sums(
      step_fn, model.variables, source, indices,
      step_size=streaming.round_step(min(int(batch_size), len(indices)), mesh),
      image_size=model.image_size, normalization=model.info.normalization, mesh=mesh,
      desc=f"skip norms {model.key}", compiler_options=compilation.compiler_options(fast),
      resume=resume)
  return [p[0] for p in pairs], finalize(sums, average), stats


def _json_number(x: float):
  """JSON has no inf/NaN: a dead branch's ratio is reported as the string 'inf'."""
  x = float(x)
  return x if np.isfinite(x) else ("inf" if x > 0 else str(x))


def default_config() -> ml_collections.ConfigDict:
  """Every option of the skip-norm analysis, with the paper's defaults."""
  return base.image_sample_config(
      num_images=5000,
      batch_size=64,
      average="per_image",     # mean of per-image ratios | 'ratio_of_means' (method.md)
      cosine="out",            # cos(z, z + f(z)) | 'branch': cos(z, f(z))
      heatmap_tokens=10,       # tokens in the Fig 7 heatmap (0 = CLS); Fig E.1 shows all
  )


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Skip/branch norm ratios and cosines of every model in `ctx.models` (Figs 7, E.1, E.2)."""
  keys = ctx.model_keys(config_lib.names(cfg.models))
  source = ctx.sources[cfg.split]
  if cfg.cosine not in ("out", "branch"):
    raise ValueError(f"skip_norms.cosine must be 'out' or 'branch', got {cfg.cosine!r}")
  cos_key = {"out": "cos_out", "branch": "cos_branch"}[cfg.cosine]
  metrics, arrays, ratio_lines, cos_lines, figures = {}, {}, {}, {}, []
  for key in keys:
    model = ctx.model(key)
    labels, res, stats = model_skip_statistics(
        model, source, ctx.mesh, num_images=cfg.num_images, batch_size=cfg.batch_size,
        seed=cfg.seed, average=cfg.average, fast=ctx.fast_compile,
        resume=ctx.checkpointer(key))
    for k, v in res.items():
      arrays[f"{key}/{k}"] = v
    arrays[f"{key}/labels"] = np.asarray(labels)
    ratio, cos, num_inf = res["ratio"], res[cos_key], res["num_infinite"]
    m = {"num_images": stats["num_images"], "examples_per_s": round(stats["examples_per_s"], 2),
         "num_infinite": int(num_inf.sum())}
    # Branches of residual sublayers: ViT 'sa'/'mlp', Mixer mixing, ResNet units (T = 1).
    kinds = {}
    for i, label in enumerate(labels):
      kind = layers.parse(label).point if ratio.shape[1] > 1 else "unit"
      kinds.setdefault(kind, []).append(i)
    has_cls = model.info.has_cls
    prefix = model.info.num_prefix_tokens
    for kind, idx in kinds.items():
      r, c = ratio[idx], cos[idx]
      if r.shape[1] > 1:  # Tokens: CLS (token 0, when the model has one) vs spatial tokens.
        ratio_lines[f"{key} {kind.upper()}"] = r[:, prefix:].mean(1)
        cos_lines[f"{key} {kind.upper()}"] = c[:, prefix:].mean(1)
        if has_cls:
          ratio_lines[f"{key} {kind.upper()}-CLS"] = r[:, 0]
          cos_lines[f"{key} {kind.upper()}-CLS"] = c[:, 0]
      else:
        ratio_lines[f"{key} ({model.name})"] = r[:, 0]
        cos_lines[f"{key} ({model.name})"] = c[:, 0]
      m[kind] = {"ratio_mean": _json_number(np.mean(r)),
                 "ratio_per_block": [_json_number(x) for x in r.mean(1)],
                 "cosine_per_block": [round(float(x), 4) for x in c.mean(1)]}
      if r.shape[1] > 1 and has_cls:
        m[kind]["ratio_cls_per_block"] = [_json_number(x) for x in r[:, 0]]
    metrics[key] = m
    if ratio.shape[1] > 1:
      panels = {f"identity / {kind}": ratio[idx] for kind, idx in kinds.items()}
      figures.append(ctx.save_figure(
          f"skip_norms_{key}_tokens", mechanisms.token_block_heatmaps, panels=panels,
          max_tokens=cfg.heatmap_tokens, has_cls=has_cls,
          title=f"{key} ({model.name}): norm ratio, first tokens"))
      figures.append(ctx.save_figure(
          f"skip_norms_{key}_all", mechanisms.token_block_heatmaps, panels=panels,
          has_cls=has_cls, title=f"{key} ({model.name}): all tokens"))
  figures.insert(0, ctx.save_figure(
      "skip_norms_ratio", mechanisms.depth_lines, lines=ratio_lines,
      ylabel="||z|| / ||f(z)||", log=True, title="skip / branch norm ratio"))
  figures.insert(1, ctx.save_figure(
      "skip_norms_cosine", mechanisms.depth_lines, lines=cos_lines,
      ylabel="cos(z, z + f(z))" if cos_key == "cos_out" else "cos(z, f(z))",
      title="skip vs sublayer output"))
  ctx.save_arrays("skip_norms", **arrays)
  return base.AnalysisResult(
      name="skip_norms", title="Skip-connection norm ratios and cosines (Figs 7, E.1, E.2)",
      caption=("Ratio of the norm of the residual stream entering each sublayer to the norm of "
               "the sublayer's branch output, per token and block (CLS vs spatial tokens) and "
               "per ResNet unit. The paper finds ViT ratios far above ResNet's, with a phase "
               "change at mid-depth: early blocks leave CLS mostly untouched, late blocks change "
               "CLS and leave spatial tokens to the skip path."),
      figures=figures, metrics=metrics)
