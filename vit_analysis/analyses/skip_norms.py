"""Skip-connection norm ratios and cosines (paper Figs 7, E.1, E.2).

For sublayer s (attention or MLP) of block i, z is the residual stream entering it (the skip path)
and f(z) the branch output; per token t, r_t = ||z_t|| / ||f(z)_t|| (norm over channels), averaged
over images (docs/method.md#skip-norms). A large ratio means the skip dominates the token. The
ResNet equivalent takes, per unit, z = the shortcut (the projection '.../proj' where the unit has
one, else the unit input) and f = the residual branch '.../conv_c', norms over the flattened
h*w*c tensor. Fig E.2's cosine is cos(z, z + f(z)) (option: cos(z, f(z))).

Error bars: the standard error over images of every saved mean ratio ('ratio_stderr' per token,
`<metric>_stderr` beside each metric), from per-image sums of squares and of outer products of
per-image features streamed with the sums (docs/method.md#skip-norms).

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
                    mask: jax.Array, num_prefix: int = 0) -> dict[str, jax.Array]:
  """Per-batch sums of the per-token statistics of every pair (for streaming over images).

  Token tensors [b, T, D] give per-token values [b, T]; feature maps [b, h, w, c] give one value
  per image ([b, 1]). Pairs must all have the same number of tokens (true within one model).

  For the error bars over images, each image also gets 3P features (docs/method.md#skip-norms):
  per pair its ratio averaged over all tokens, its token-0 (CLS) ratio and its ratio averaged over
  the tokens after the `num_prefix` prefix tokens (all tokens when 0); their sums of outer
  products give the covariance of any average of them over blocks. An infinite ratio enters these
  squares as 0 (never NaN); `finalize` gives no error bar where a pair has one.

  Args:
    out: captured activations holding every skip and branch name.
    pairs: from `skip_pairs`.
    mask: [b] 1 for real images, 0 for padding.
    num_prefix: tokens before the patch grid (CLS and registers).

  Returns:
    {'ratio', 'ratio_sq', 'skip_norm', 'branch_norm', 'cos_out', 'cos_branch', 'num_infinite'}:
    each [P, T] summed over the (unmasked) images; 'feature_outer' [3P, 3P], the sum over images
    of v v^T with v = (all-token means [P], token-0 ratios [P], after-prefix means [P]); and
    'count' (scalar, number of images).
  """
  stats = {k: [] for k in ("ratio", "ratio_sq", "skip_norm", "branch_norm", "cos_out",
                           "cos_branch", "num_infinite")}
  features = []
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
    kept = jnp.where((w > 0) & finite, ratio, 0.0)  # [b, T]
    stats["ratio_sq"].append((kept * kept).sum(0))
    features.append(jnp.stack([kept.mean(1), kept[:, 0],
                               kept[:, min(num_prefix, kept.shape[1] - 1):].mean(1)], 0))
    stats["num_infinite"].append(jnp.where(w > 0, ~finite, False).sum(0).astype(jnp.float32))
    stats["skip_norm"].append((tok(_norm(z, axes)) * w).sum(0))
    stats["branch_norm"].append((tok(_norm(f, axes)) * w).sum(0))
    stats["cos_out"].append((tok(cosine(z, z + f, axes)) * w).sum(0))
    stats["cos_branch"].append((tok(cosine(z, f, axes)) * w).sum(0))
  result = {k: jnp.stack(v) for k, v in stats.items()}
  v = jnp.stack(features, 1).reshape(3 * len(pairs), -1)  # [3P, b]: all, token 0, after prefix
  result["feature_outer"] = jnp.einsum("kb,lb->kl", v, v)  # padding rows are 0 already
  result["count"] = w.sum()
  return result


def features(ratio: np.ndarray, num_prefix: int = 0) -> np.ndarray:
  """The per-image features of `pair_statistics` from mean ratios [P, T]: [3P] (all-token
  means, token-0 ratios, after-prefix means), so that their means are this of the mean ratios."""
  ratio = np.asarray(ratio, np.float64)
  start = min(num_prefix, ratio.shape[1] - 1)
  return np.concatenate([ratio.mean(1), ratio[:, 0], ratio[:, start:].mean(1)])


def combination_stderr(result: dict[str, np.ndarray], weights: np.ndarray) -> float:
  """SE over images of a weighted sum of `finalize`'s features, sqrt(w^T C w / n).

  Args:
    result: `finalize` output with 'feature_cov' [3P, 3P] and 'count'.
    weights: [3P] over the features (`features` order).

  Returns:
    The standard error; NaN without a covariance (fewer than 2 images, `ratio_of_means`) or when
    a weighted pair has an infinite ratio.
  """
  cov = result.get("feature_cov")
  if cov is None:
    return float("nan")
  weights = np.asarray(weights, np.float64)
  num_pairs = cov.shape[0] // 3
  used = np.abs(weights).reshape(3, num_pairs).sum(0) > 0
  if np.any(result["num_infinite"][used] > 0):
    return float("nan")
  return float(np.sqrt(max(weights @ cov @ weights, 0.0) / float(result["count"])))


def finalize(sums: dict[str, np.ndarray], average: str = "per_image",
             num_prefix: int = 0) -> dict[str, np.ndarray]:
  """Means over images, and their standard errors, from streamed `pair_statistics` sums.

  Args:
    sums: host copies of the summed statistics.
    average: 'per_image' (mean of per-image ratios, paper default) or 'ratio_of_means'.
    num_prefix: as passed to `pair_statistics`.

  Returns:
    {'ratio', 'cos_out', 'cos_branch', 'num_infinite'}: float64 [P, T]; with 'per_image' and at
    least 2 images also 'ratio_stderr' [P, T] (SE over images; NaN where a ratio is infinite),
    'feature_cov' [3P, 3P] (sample covariance, ddof=1, of the per-image features) and 'count'.
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
  result = {"ratio": ratio, "cos_out": get("cos_out") / n, "cos_branch": get("cos_branch") / n,
            "num_infinite": get("num_infinite")}
  if average == "per_image" and n >= 2 and "ratio_sq" in sums:
    # s^2 = (sum x^2 - n mean^2) / (n - 1) per token; C likewise for the feature vectors.
    finite = result["num_infinite"] == 0
    mean = np.where(finite, ratio, 0.0)
    var = np.maximum(get("ratio_sq") - n * mean * mean, 0.0) / (n - 1)
    result["ratio_stderr"] = np.where(finite, np.sqrt(var / n), np.nan)
    f = features(mean, num_prefix)
    result["feature_cov"] = (get("feature_outer") - n * np.outer(f, f)) / (n - 1)
    result["count"] = np.asarray(n)
  return result


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

  prefix = model.info.num_prefix_tokens

  def step_fn(variables, images, mask):
    return pair_statistics(fn(variables, images), pairs, mask, prefix)

  indices = streaming.sample(len(source), min(int(num_images), len(source)), seed)
  sums, stats = streaming.stream_sums(
      step_fn, model.variables, source, indices,
      step_size=streaming.round_step(min(int(batch_size), len(indices)), mesh),
      image_size=model.image_size, normalization=model.info.normalization, mesh=mesh,
      desc=f"skip norms {model.key}", compiler_options=compilation.compiler_options(fast),
      resume=resume)
  return [p[0] for p in pairs], finalize(sums, average, prefix), stats


def _se(result: dict[str, np.ndarray], weights: np.ndarray):
  """`combination_stderr` for JSON: NaN (no error bar) as None."""
  se = combination_stderr(result, weights)
  return float(se) if np.isfinite(se) else None


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
         "num_infinite": int(num_inf.sum()),
         "uncertainty_over": (f"images (n={int(res['count'])})" if "feature_cov" in res else
                              f"none (average={cfg.average!r} saves no per-image spread)")}
    num_pairs = len(labels)

    def weights(pairs, feature):
      """[3P] weights averaging `feature` (0 all tokens, 1 CLS, 2 after prefix) over `pairs`."""
      w = np.zeros(3 * num_pairs)
      w[feature * num_pairs + np.asarray(pairs, int)] = 1.0 / len(pairs)
      return w

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
                 "ratio_mean_stderr": _se(res, weights(idx, 0)),
                 "ratio_per_block": [_json_number(x) for x in r.mean(1)],
                 "ratio_per_block_stderr": [_se(res, weights([i], 0)) for i in idx],
                 "cosine_per_block": [round(float(x), 4) for x in c.mean(1)]}
      if r.shape[1] > 1 and has_cls:
        m[kind]["ratio_cls_per_block"] = [_json_number(x) for x in r[:, 0]]
        m[kind]["ratio_cls_per_block_stderr"] = [_se(res, weights([i], 1)) for i in idx]
        # CLS minus spatial-token ratio averaged over the first / second half of the blocks
        # (the Fig 7 phase change), with its SE over images (docs/method.md#skip-norms).
        halves = {"early": idx[:max(1, len(idx) // 2)], "late": idx[len(idx) // 2:]}
        for half, part in halves.items():
          w = weights(part, 1) - weights(part, 2)
          part_ratio = ratio[part]
          with np.errstate(invalid="ignore"):  # a dead branch: inf - inf is NaN, saved as 'nan'
            m[kind][f"cls_minus_spatial_{half}"] = _json_number(
                np.mean(part_ratio[:, 0] - part_ratio[:, prefix:].mean(1)))
          m[kind][f"cls_minus_spatial_{half}_stderr"] = _se(res, w)
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
