"""What one side of a comparison is: a model's layers, token options and features.

A `Side` says what to compute from a minibatch of images (the features of the selected layers,
captured inside the jitted step) and how its images are prepared (resolution, normalisation).
Layers are chosen by a preset of the model's family (`models.describe(...).layer_presets`:
'fine', 'coarse', 'blocks'; docs/method.md#presets) or by glob patterns over its layer names.
`cka_runner` runs the comparison; this module knows nothing of CKA.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
from absl import logging

from vit_analysis.models import capture
from vit_analysis.runtime import jit_cache

if TYPE_CHECKING:  # for annotations only: building models pulls in training
  from vit_analysis.models.build import LoadedModel

FeatureFn = Callable[[Any, jax.Array], dict[str, jax.Array]]

# Capture-point presets (docs/method.md#capture-points) as glob lists over the `out` names of
# each family (`models.describe(...).layer_presets`).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "vit": {
        "fine": ("embedding", "block*/ln0", "block*/sa", "block*/+sa", "block*/ln2",
                 "block*/mlp_hidden", "block??", "encoder_norm"),
        "coarse": ("embedding", "block*/ln0", "block*/+sa", "block*/ln2", "block??",
                   "encoder_norm"),
        "blocks": ("block??",),
    },
    "resnet": {
        "fine": ("root/conv", "root", "block*/preact_a", "block*/proj", "block*/conv_a",
                 "block*/preact_b", "block*/conv_b", "block*/preact_c", "block*/conv_c",
                 "block?/unit??"),
        "coarse": ("block*/preact_a", "block?/unit??"),
        "blocks": ("block?/unit??",),
    },
    "mixer": {
        "fine": ("stem", "block*/ln0", "block*/token_mixing", "block*/+token", "block*/ln1",
                 "block*/channel_mixing", "block??", "pre_head_layer_norm"),
        "coarse": ("stem", "block*/ln0", "block*/+token", "block*/ln1", "block??",
                   "pre_head_layer_norm"),
        "blocks": ("block??",),
    },
}
PRESET_NAMES = ("fine", "coarse", "blocks")
PRESETS["hybrid"] = {
    "fine": ("resnet/root", "resnet/block?/unit??") + PRESETS["vit"]["fine"],
    "coarse": ("resnet/block?/unit??",) + PRESETS["vit"]["coarse"],
    "blocks": ("resnet/block?/unit??", "block??"),
}
TOKEN_MODES = ("all", "exclude_cls", "cls_only", "token_mean")


def resolve_layers(model: LoadedModel, spec: str | Sequence[str]) -> list[str]:
  """Layer names (forward order) from a preset name ('fine', 'coarse', 'blocks') or glob list."""
  names = capture.layer_names(model.module, (model.image_size, model.image_size, 3))
  if isinstance(spec, str):
    presets = PRESETS.get(model.info.layer_presets, {})
    if not presets:
      raise KeyError(f"model {model.key!r} ({model.name}) is a {model.info.family!r} module with "
                     f"no layer presets; give glob patterns of its layer names (e.g. "
                     f"{capture.layer_names(model.module, (model.image_size,) * 2 + (3,))[:3]})")
    if spec not in presets:
      raise KeyError(f"unknown layer preset {spec!r}; known: {sorted(presets)} or a glob list")
    patterns = _existing_patterns(names, presets[spec])
  else:
    patterns = list(spec)
  return capture.select(names, patterns)


def _existing_patterns(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
  # Presets name points that some variants lack (projection shortcuts, small stems): keep those
  # that match, so a preset never fails on an architecture detail; user globs stay strict.
  return [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)]


def token_features(x: jax.Array, mode: str, has_cls: bool, num_prefix: int | None = None
                   ) -> jax.Array:
  """Applies a token option (docs/method.md#minibatch-cka) to a ViT token array `x: [b, T, D]`.

  'all' keeps every token, 'token_mean' averages them, 'cls_only' keeps token 0 and
  'exclude_cls' drops the `num_prefix` tokens before the patch grid (CLS and registers; default
  1 with a CLS token).
  """
  if mode == "all" or x.ndim != 3:
    return x
  if mode == "token_mean":
    return x.mean(axis=1)
  if not has_cls:
    raise ValueError(f"token mode {mode!r} needs a CLS model")
  prefix = 1 if num_prefix is None else int(num_prefix)
  return x[:, prefix:] if mode == "exclude_cls" else x[:, 0]


def model_feature_fn(model: LoadedModel, layers: Sequence[str],
                     tokens: str = "all") -> FeatureFn:
  """Pure `(variables, images) -> {layer: [b, ...]}` capturing only `layers` (traced in a jit)."""
  if tokens not in TOKEN_MODES:
    raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
  # One function object per (module, layers, tokens), so that models of one architecture (data
  # subsets, fine-tuned copies) share one compiled step.
  return _FEATURE_FNS.get((model.module, tuple(layers), tokens),
                          lambda: _feature_fn(model.module, layers, tokens, model.info))


_FEATURE_FNS: jit_cache.JitCache[FeatureFn] = jit_cache.JitCache()


def _feature_fn(module: Any, layers: Sequence[str], tokens: str, info: Any) -> FeatureFn:
  fn = capture.make_capture_fn(module, list(layers))
  tokenised = info.family in ("vit", "hybrid") and tokens != "all"

  def features(variables, images):
    out = fn(variables, images)
    if tokenised:
      out = {k: token_features(v, tokens, info.has_cls, info.num_prefix_tokens)
             for k, v in out.items()}
    return out
  return features


@dataclasses.dataclass(frozen=True)
class Side:
  """One side of a CKA comparison: what to compute from images, and at what resolution.

  Attributes:
    features: pure `(variables, images [b, s, s, 3] in [-1, 1]) -> {name: [b, ...]}`.
    variables: passed to `features` (replicated on the mesh).
    image_size: side `s` the images are resized to for this side.
    names: the feature names in heatmap order.
    normalization: how this side's pixels are normalised ('minus_one_one' or (mean, std) in
      [0, 1] units; `models.describe(...).normalization`).
  """
  features: FeatureFn
  variables: Any
  image_size: int
  names: tuple[str, ...]
  normalization: Any = "minus_one_one"


def layer_spec(spec: Any) -> str | tuple[str, ...]:
  """A preset name, or a tuple of globs from a tuple/list or a comma-separated string.

  A string that names no preset ('block*/+sa,block??', or one glob 'block??') is a glob list, so
  globs can be given on the command line (`--config.cka_intra.layers='block*/+sa,block??'`).
  """
  if isinstance(spec, str):
    if spec in PRESET_NAMES:
      return spec
    return tuple(p.strip() for p in spec.split(",") if p.strip())
  return tuple(spec)


def model_side(model: LoadedModel, layers: str | Sequence[str],
               tokens: str = "all", minibatch_size: int = 0) -> Side:
  """The Side of `model` at the layers of a preset or glob list (see `resolve_layers`)."""
  names = resolve_layers(model, layers)
  if minibatch_size:  # memory plan (eval_shape, no compute): activations one minibatch keeps
    plan = capture.plan_bytes(model.module, (model.image_size,) * 2 + (3,), minibatch_size,
                              names)
    logging.info("%s: %d layers, %.1f MiB of captured activations per minibatch of %d, "
                 "largest %s", model.key, len(names), sum(plan.values()) / 2**20,
                 minibatch_size, max(plan, key=plan.get))
  return Side(model_feature_fn(model, names, tokens), model.variables, model.image_size,
              tuple(names), model.info.normalization)
