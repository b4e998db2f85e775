"""Effective receptive fields (paper Figs 6, C.1-C.4).

ERF_l(u, v) = mean over images and over channels c of |dF_l[centre, c] / dx[u, v]|, with the 3
colour channels reduced by mean (docs/method.md#effective-receptive-fields). "Centre" is position (h//2, w//2)
of layer l's feature map ([b, h, w, c] for ResNets, the patch tokens of [b, T, D] for ViTs).
Post-residual ERFs use the stream after the skip add ('block03/+sa', 'block03',
'block2/unit01'); branch-only ERFs use the long branch ('block03/sa', '.../conv_c').

The default is the literal per-channel absolute gradient: one VJP of the forward pass, pulled back
once per channel (channels in chunks under `lax.scan`, so memory is `chunk * batch * image`).
The cheap option (`per_channel=False`) takes abs(grad of the channel mean), one pull-back.

Error bars over images: the same pass keeps each image's own ERF (`erf_maps`), and streams its
area fraction and centre-patch and total masses (`image_statistics`) with their squares. The
metrics give the per-image areas' mean and SE (`area_fraction_per_image[_stderr]`, also averaged
over the lower half of the layers) and the delta-method SE of the mean ERF's centre-patch share
(`centre_patch_mass_stderr`); `uncertainty_over` names the images.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.input import streaming
from vit_analysis.models import capture
from vit_analysis.models import layers as layers_lib
from vit_analysis.plotting import mechanisms
from vit_analysis.runtime import compilation


def centre_activations(features: jax.Array, *, grid: tuple[int, int] | None = None,
                       has_cls: bool = False, num_prefix: int | None = None) -> jax.Array:
  """The features at the centre position (h//2, w//2) of a layer.

  Args:
    features: [b, h, w, c] feature map, or [b, T, D] tokens (patch tokens row-major, after a CLS
      token when `has_cls`).
    grid: (gh, gw) of the tokens; inferred as a square when None.
    has_cls: whether token 0 is CLS (skipped).
    num_prefix: tokens before the grid (CLS and registers; default `has_cls`), skipped.

  Returns:
    [b, c].
  """
  if features.ndim == 4:
    return features[:, features.shape[1] // 2, features.shape[2] // 2, :]
  if features.ndim != 3:
    raise ValueError(f"features must be [b, h, w, c] or [b, T, D], got shape {features.shape}")
  prefix = int(has_cls) if num_prefix is None else int(num_prefix)
  num_patches = features.shape[1] - prefix
  if grid is None:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
      raise ValueError(f"{num_patches} patch tokens are not a square grid; pass grid=")
    grid = (side, side)
  if grid[0] * grid[1] != num_patches:
    raise ValueError(f"grid {grid} does not match {num_patches} patch tokens "
                     f"(features {features.shape}, {prefix} prefix tokens)")
  index = prefix + (grid[0] // 2) * grid[1] + grid[1] // 2
  return features[:, index, :]


def erf_maps(centre_fn: Callable[[jax.Array], Any], images: jax.Array,
             mask: jax.Array | None = None, *, per_channel: bool = True,
             channel_chunk: int = 16, rgb_reduce: str = "mean") -> Any:
  """Each image's ERF, for one or several layers at once.

  Images must not interact in `centre_fn` (true for eval-mode ViT/ResNet/Mixer: LayerNorm and
  GroupNorm are per example), so the gradient of sum_b F[b, c] w.r.t. x[b] is image b's own.
  Several layers share one forward pass: their centre channels are concatenated, pulled back in
  chunks, and each channel's |gradient| is added to its own layer's maps.

  Args:
    centre_fn: images [b, H, W, C] -> centre activations [b, c], or a dict name -> [b, c_name].
    images: [b, H, W, C].
    mask: [b] 1 for real images, 0 for padding (padded images get all-zero maps).
    per_channel: mean over c of |dF_c/dx| (paper default); else |d(mean_c F_c)/dx|.
    channel_chunk: channels pulled back together (memory: chunk * b * H * W * C floats).
    rgb_reduce: 'mean' or 'sum' over the input colour channels.

  Returns:
    [b, H, W] float32 per-image maps; a dict of them if `centre_fn` returns one.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [b, H, W, C], got shape {images.shape}")
  if rgb_reduce not in ("mean", "sum"):
    raise ValueError(f"rgb_reduce must be 'mean' or 'sum', got {rgb_reduce!r}")
  reduce_rgb = jnp.mean if rgb_reduce == "mean" else jnp.sum
  shapes = jax.eval_shape(centre_fn, images)
  single = not isinstance(shapes, dict)
  names = ["_"] if single else sorted(shapes)
  shapes = {"_": shapes} if single else shapes
  for n in names:
    if len(shapes[n].shape) != 2:
      raise ValueError(f"centre_fn must return [b, c], got {n}: {shapes[n].shape}")
  widths = [shapes[n].shape[1] for n in names]
  num_layers, c = len(names), sum(widths)

  def flat_fn(x):
    out = centre_fn(x)
    return jnp.concatenate([out if single else out[n] for n in names], axis=1)

  centre, vjp_fn = jax.vjp(flat_fn, images)  # centre: [b, c], all layers' channels.
  b = centre.shape[0]
  weight = jnp.ones((b,), centre.dtype) if mask is None else mask.astype(centre.dtype)
  layer_of = np.repeat(np.arange(num_layers), widths)  # [c] layer id of each channel.
  inv_width = jnp.asarray(1.0 / np.asarray(widths, np.float64), jnp.float32)  # [L]

  if not per_channel:
    # One pull-back per layer of the channel mean: cotangent 1/c_l on layer l's channels.
    cot = jax.nn.one_hot(layer_of, num_layers, dtype=centre.dtype).T * inv_width[:, None]
    (grads,) = jax.vmap(vjp_fn)(cot[:, None, :] * weight[None, :, None])  # [L, b, H, W, C]
    maps = reduce_rgb(jnp.abs(grads), axis=-1)  # [L, b, H, W]
  else:
    chunk = max(1, min(int(channel_chunk), c))
    num_chunks = -(-c // chunk)
    # Padded channel ids are -1: one_hot gives a zero cotangent and a zero layer assignment.
    ids = np.full((num_chunks * chunk,), -1, np.int32)
    ids[:c] = np.arange(c)
    lids = np.full((num_chunks * chunk,), -1, np.int32)
    lids[:c] = layer_of

    def body(total, xs):
      chunk_ids, chunk_layers = xs
      cot = jax.nn.one_hot(chunk_ids, c, dtype=centre.dtype)[:, None, :] * weight[None, :, None]
      (grads,) = jax.vmap(vjp_fn)(cot)  # [chunk, b, H, W, C]
      per_channel_map = reduce_rgb(jnp.abs(grads), axis=-1)  # [chunk, b, H, W]
      to_layer = jax.nn.one_hot(chunk_layers, num_layers, dtype=jnp.float32)  # [chunk, L]
      return total + jnp.einsum("kbhw,kl->lbhw", per_channel_map, to_layer), None

    maps = jnp.zeros((num_layers, b) + images.shape[1:3], jnp.float32)
    xs = (jnp.asarray(ids.reshape(num_chunks, chunk)), jnp.asarray(lids.reshape(num_chunks, chunk)))
    maps, _ = jax.lax.scan(body, maps, xs)
    maps = maps * inv_width[:, None, None, None]
  return maps[0] if single else {n: maps[i] for i, n in enumerate(names)}


def erf_sum(centre_fn: Callable[[jax.Array], Any], images: jax.Array,
            mask: jax.Array | None = None, *, per_channel: bool = True,
            channel_chunk: int = 16, rgb_reduce: str = "mean") -> Any:
  """Sum over the images of a batch of each image's ERF (`erf_maps` summed over the batch).

  Returns:
    [H, W] float32 sum over the (unmasked) images; a dict of them if `centre_fn` returns one.
  """
  maps = erf_maps(centre_fn, images, mask, per_channel=per_channel,
                  channel_chunk=channel_chunk, rgb_reduce=rgb_reduce)
  return jax.tree.map(lambda m: m.sum(0), maps)


def image_statistics(maps: jax.Array, fraction: float = 0.5,
                     patch_size: int | None = None) -> dict[str, jax.Array]:
  """Per-image ERF summaries, for error bars over images.

  See docs/method.md#effective-receptive-fields.

  Args:
    maps: [b, H, W] per-image ERFs (`erf_maps`).
    fraction: as in `mass_area_fraction`.
    patch_size: with a patch size, the mass inside the centre patch (`centre_patch_mass`'s patch).

  Returns:
    {'area': [b] `mass_area_fraction` of each image's own ERF, 'total': [b] each ERF's mass} and,
    with `patch_size`, 'centre': [b] the mass inside the centre patch.
  """
  b, h, w = maps.shape
  flat = maps.reshape(b, h * w).astype(jnp.float32)
  cum = jnp.cumsum(-jnp.sort(-flat, axis=1), axis=1)  # mass of the k largest pixels
  total = cum[:, -1]
  # The fewest pixels holding `fraction` of the mass: #{k : cum_k < fraction * total} + 1.
  count = jnp.sum(cum < fraction * total[:, None], axis=1) + 1
  area = jnp.where(total > 0, jnp.minimum(count, h * w) / (h * w), 0.0)
  out = {"area": area, "total": flat.sum(1)}
  if patch_size:
    r0, c0 = (h // patch_size // 2) * patch_size, (w // patch_size // 2) * patch_size
    out["centre"] = maps[:, r0:r0 + patch_size, c0:c0 + patch_size].astype(jnp.float32).sum((1, 2))
  return out


def ratio_stderr(num: np.ndarray, den: np.ndarray, num_sq: np.ndarray, den_sq: np.ndarray,
                 cross: np.ndarray, n: float) -> np.ndarray:
  """Delta-method SE over n images of R = sum C_i / sum T_i from streamed sums.

  With R fixed, R - R_true ~ mean_i (C_i - R T_i) / mean_i T_i, so
  SE(R)^2 = sum_i (C_i - R T_i)^2 / (n (n - 1)) / mean(T)^2, and
  sum_i (C_i - R T_i)^2 = sum C^2 - 2 R sum C T + R^2 sum T^2.

  Args:
    num, den: [...] sum over images of C_i and T_i.
    num_sq, den_sq, cross: [...] sums of C_i^2, T_i^2 and C_i T_i.
    n: the number of images.

  Returns:
    [...] float64; NaN for n < 2 or where the denominator is 0.
  """
  num, den, num_sq, den_sq, cross = (np.asarray(x, np.float64)
                                     for x in (num, den, num_sq, den_sq, cross))
  if n < 2:
    return np.full(num.shape, np.nan)
  with np.errstate(invalid="ignore", divide="ignore"):
    r = num / den
    ss = np.maximum(num_sq - 2 * r * cross + r * r * den_sq, 0.0)
    return np.where(den > 0, np.sqrt(ss / (n * (n - 1))) / (den / n), np.nan)


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


# Default layers per family and mode: post-residual (after the skip add) or the long branch only.
_LAYER_PATTERNS = {
    "post": (r"root/conv", r"block\d+/unit\d+", r"block\d+/\+sa", r"block\d+/\+token",
             r"block\d+"),
    "branch": (r"block\d+/unit\d+/conv_c", r"block\d+/(sa|mlp)",
               r"block\d+/(token_mixing|channel_mixing)"),
}


_MODE_TITLES = {"post": "post-residual", "branch": "branch-only (pre-residual)"}


def default_layers(names: list[str], mode: str) -> list[str]:
  """The layers of a model's `out` names whose ERFs Figs 6, C.1-C.4 show, in forward order.

  Args:
    names: `capture.layer_names(...)`.
    mode: 'post' (ViT '+sa' and block outputs, ResNet 'root/conv' and unit outputs) or 'branch'
      (ViT 'sa'/'mlp', ResNet '.../conv_c', Mixer mixing branches).
  """
  if mode not in _LAYER_PATTERNS:
    raise ValueError(f"mode must be one of {list(_LAYER_PATTERNS)}, got {mode!r}")
  pattern = re.compile("|".join(f"(?:{p})" for p in _LAYER_PATTERNS[mode]))
  layers = [n for n in names if pattern.fullmatch(n)]
  if not layers:
    raise KeyError(f"no {mode} layers among {names[:10]}...")
  return layers


@dataclasses.dataclass(frozen=True)
class ErfSpread:
  """Error bars over the n images of a model's ERF summaries (layers in the order asked for).

  Attributes:
    area_mean: [L] mean over images of each image's own `mass_area_fraction`.
    area_cov: [L, L] sample covariance (ddof=1) over images of those per-image areas; the SE of
      an average w . area over layers is sqrt(w^T area_cov w / n).
    centre_share_stderr: [L] delta-method SE of the mean ERF's centre-patch share
      (`centre_patch_mass`, a ratio of sums over images; `ratio_stderr`), or None without a patch.
    num_images: n.
  """
  area_mean: np.ndarray
  area_cov: np.ndarray
  centre_share_stderr: np.ndarray | None
  num_images: int

  def stderr(self, weights: np.ndarray) -> float:
    """SE over images of the weighted sum `weights . area_mean` ([L] weights)."""
    if self.num_images < 2:
      return float("nan")
    w = np.asarray(weights, np.float64)
    return float(np.sqrt(max(w @ self.area_cov @ w, 0.0) / self.num_images))


def model_erfs(model: base.LoadedModel, layers: list[str], source, mesh, *, num_images: int,
               batch_size: int, seed: int = 0, per_channel: bool = True,
               channel_chunk: int = 16, rgb_reduce: str = "mean", fast: bool = False,
               resume: Any = None, fraction: float = 0.5
               ) -> tuple[dict[str, np.ndarray], ErfSpread, dict[str, float]]:
  """Mean ERF over images of each of `layers` of one model (all layers in one jitted pass).

  The images are a seeded sample of `source` (`streaming.sample`); `resume` is an optional
  `resume.Checkpointer` for the running sums. Each step also adds the per-image summaries of
  `image_statistics` (with `fraction`; the centre patch for non-ResNets with a patch size) and
  their squares, for the error bars.

  Returns:
    ({layer: [image_size, image_size] float64}, their spread over images, streaming stats).
  """
  info = model.info
  grid = info.grid if info.family in ("vit", "hybrid", "mixer") else None
  patch = int(info.patch_size) if info.patch_size and info.family != "resnet" else None
  fn = capture.make_capture_fn(model.module, tuple(layers_lib.literal(n) for n in layers))

  def step_fn(variables, images, mask):
    def centres(x):
      out = fn(variables, x)
      return {n: centre_activations(out[n], grid=grid,
                                    num_prefix=info.num_prefix_tokens if out[n].ndim == 3 else 0)
              for n in layers}
    maps = erf_maps(centres, images, mask, per_channel=per_channel,
                    channel_chunk=channel_chunk, rgb_reduce=rgb_reduce)
    # All layers' maps in one sort (one op to compile instead of one per layer).
    stacked = jnp.stack([maps[n] for n in layers])  # [L, b, H, W]
    per = image_statistics(stacked.reshape((-1,) + stacked.shape[2:]), fraction, patch)
    stat = lambda k: per[k].reshape(stacked.shape[:2]).T  # [b, L]
    area, total, w = stat("area"), stat("total"), mask.astype(jnp.float32)
    sums = {"erf": jax.tree.map(lambda m: m.sum(0), maps), "count": mask.sum(),
            "area": jnp.einsum("bl,b->l", area, w),
            "area_outer": jnp.einsum("bk,bl,b->kl", area, area, w)}
    if patch:
      centre = stat("centre")  # padded images have all-zero maps: they add nothing below
      sums.update(centre=centre.sum(0), total=total.sum(0), centre_sq=(centre * centre).sum(0),
                  total_sq=(total * total).sum(0), centre_total=(centre * total).sum(0))
    return sums

  indices = streaming.sample(len(source), min(int(num_images), len(source)), seed)
  sums, stats = streaming.stream_sums(
      step_fn, model.variables, source, indices,
      step_size=streaming.round_step(min(int(batch_size), len(indices)), mesh),
      image_size=model.image_size, normalization=info.normalization, mesh=mesh,
      desc=f"ERF {model.key}", compiler_options=compilation.compiler_options(fast),
      resume=resume)
  n = float(sums["count"])
  area = np.asarray(sums["area"], np.float64) / n
  cov = ((np.asarray(sums["area_outer"], np.float64) - n * np.outer(area, area)) / (n - 1)
         if n >= 2 else np.full((len(layers),) * 2, np.nan))
  centre_se = (ratio_stderr(sums["centre"], sums["total"], sums["centre_sq"], sums["total_sq"],
                            sums["centre_total"], n) if patch else None)
  spread = ErfSpread(area_mean=area, area_cov=cov, centre_share_stderr=centre_se,
                     num_images=int(n))
  return {k: np.asarray(v, np.float64) / n for k, v in sums["erf"].items()}, spread, stats


def centre_patch_mass(erf: np.ndarray, patch_size: int) -> float:
  """Fraction of the ERF mass inside the centre patch (a ViT's own token; paper: a strong peak)."""
  side = erf.shape[0] // patch_size
  r0, c0 = (side // 2) * patch_size, (erf.shape[1] // patch_size // 2) * patch_size
  total = erf.sum()
  return float(erf[r0:r0 + patch_size, c0:c0 + patch_size].sum() / total) if total > 0 else 0.0


def _num(x: float) -> float | None:
  """A float for JSON; None where there is no value (NaN: fewer than 2 images)."""
  return float(x) if np.isfinite(x) else None


def default_config() -> ml_collections.ConfigDict:
  """Every option of the receptive-field analysis, with the paper's defaults."""
  return base.image_sample_config(
      num_images=32,            # the paper's 32 images
      batch_size=8,
      modes=("post", "branch"),  # after the skip add (Figs 6, C.1-C.3) / long branch (Fig C.4)
      layers={},                # model key -> globs, replaces the default layers of every mode
      per_channel=True,         # mean over channels of |per-channel gradient| (method.md)
      channel_chunk=32,         # channels pulled back at once (memory vs speed)
      rgb_reduce="mean",        # over the 3 input colour channels ('mean' | 'sum')
      mass_fraction=0.5,        # summary: fraction of the image holding this share of the mass
  )


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Effective receptive fields of every model in `ctx.models` (Figs 6, C.1-C.4)."""
  keys = ctx.model_keys(config_lib.names(cfg.models))
  source = ctx.sources[cfg.split]
  fraction = float(cfg.mass_fraction)
  overrides = dict(cfg.layers or {})
  metrics, arrays, figures = {}, {}, []
  for key in keys:
    model = ctx.model(key)
    names = capture.layer_names(model.module, (model.image_size, model.image_size, 3))
    for mode in config_lib.names(cfg.modes):
      layers = (capture.select(names, tuple(overrides[key])) if key in overrides
                else default_layers(names, mode))
      erfs, spread, stats = model_erfs(
          model, layers, source, ctx.mesh, num_images=cfg.num_images,
          batch_size=cfg.batch_size, seed=cfg.seed, per_channel=cfg.per_channel,
          channel_chunk=cfg.channel_chunk, rgb_reduce=cfg.rgb_reduce, fast=ctx.fast_compile,
          resume=ctx.checkpointer(f"{key}_{mode}"), fraction=fraction)
      area = {n: mass_area_fraction(e, fraction) for n, e in erfs.items()}
      # The lower half of the layers, as the 'larger in the lower layers' finding reads them.
      lower = np.zeros(len(layers))
      lower[:max(1, len(layers) // 2)] = 1.0 / max(1, len(layers) // 2)
      m = {"layers": layers, "area_fraction": [area[n] for n in layers],
           "radius_px": [mass_radius(erfs[n], fraction) for n in layers],
           # Error bars need per-image values: the mean over images of each image's own area.
           "area_fraction_per_image": [_num(x) for x in spread.area_mean],
           "area_fraction_per_image_stderr": [_num(spread.stderr(np.eye(len(layers))[i]))
                                              for i in range(len(layers))],
           "lower_half_area_per_image": _num(lower @ spread.area_mean),
           "lower_half_area_per_image_stderr": _num(spread.stderr(lower)),
           "uncertainty_over": f"images (n={spread.num_images})",
           "num_images": stats["num_images"], "examples_per_s": round(stats["examples_per_s"], 3)}
      if spread.centre_share_stderr is not None:
        m["centre_patch_mass"] = [centre_patch_mass(erfs[n], model.info.patch_size)
                                  for n in layers]
        m["centre_patch_mass_stderr"] = [_num(x) for x in spread.centre_share_stderr]
      metrics[f"{key}/{mode}"] = m
      arrays.update({f"{key}/{mode}/{n}": erfs[n] for n in layers})
      title = (f"{key} ({model.name}): {_MODE_TITLES[mode]} ERFs, "
               f"{int(stats['num_images'])} images")
      figures.append(ctx.save_figure(
          f"receptive_field_{key}_{mode}", mechanisms.receptive_fields,
          erfs={n: erfs[n] for n in layers}, summaries=area, title=title))
  ctx.save_arrays("receptive_field", **arrays)
  return base.AnalysisResult(
      name="receptive_field", title="Effective receptive fields (Figs 6, C.1-C.4)",
      caption=(f"Mean |d centre activation / d input pixel| per layer, each panel scaled to its "
               f"maximum; the number is the fraction of the image holding {fraction:.0%} of the "
               "mass. The paper finds ResNet ERFs small and growing gradually, while ViT ERFs "
               "become global by mid-depth yet keep a peak at the centre patch (skip "
               "connections)."),
      figures=figures, metrics=metrics)
