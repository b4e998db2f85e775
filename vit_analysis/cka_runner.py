"""The CKA driver shared by every CKA-family analysis: sides, layer presets, the repeat loop.

Protocol (docs/method.md#minibatch-cka): draw N examples without replacement, split them into N/m
minibatches of m, sum the per-minibatch unbiased HSIC terms of every layer pair over the
minibatches, divide once; do it R times with a fresh sample and report the mean and spread of the
R CKA values per cell. Both sides see the same images in the same minibatches, each with its own
preprocessing and resolution.

Everything per minibatch happens inside one jitted step: the forward pass captures only the
selected layers, the Grams and HSIC terms are computed where the activations live, and only the
small per-minibatch terms leave the device (vit_analysis.cka holds all of the maths). A step
carries `[minibatches, m, h, w, c]` images with the minibatch axis sharded over the device mesh.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from vit_analysis import capture, cka, sharding, streaming
from vit_analysis import resume as resume_lib

if TYPE_CHECKING:  # the analyses' model record; imported for annotations only
  from vit_analysis.analyses.base import LoadedModel

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
  key = (model.module, tuple(layers), tokens)
  try:
    cached = _FEATURE_FNS.get(key)
  except TypeError:  # an unhashable module field
    return _feature_fn(model.module, layers, tokens, model.info)
  if cached is None:
    cached = _FEATURE_FNS[key] = _feature_fn(model.module, layers, tokens, model.info)
  return cached


_FEATURE_FNS: dict[Any, FeatureFn] = {}
_STEPS: dict[Any, Callable[..., Any]] = {}


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


@dataclasses.dataclass
class RepeatedCKA:
  """CKA matrices of R independent samples.

  Attributes:
    names_a, names_b: row and column names.
    values: [R, A, B] CKA per repeat.
    stderr: [R, A, B] jackknife standard error over the minibatches of each repeat.
    num_examples, minibatch_size: per repeat.
    examples_counted: [R] examples the accumulator actually summed per repeat (= num_examples
      unless a step was lost or counted twice, e.g. across an interruption).
  """
  names_a: list[str]
  names_b: list[str]
  values: np.ndarray
  stderr: np.ndarray
  num_examples: int
  minibatch_size: int
  examples_counted: np.ndarray | None = None

  @property
  def mean(self) -> np.ndarray:
    return self.values.mean(0)

  @property
  def std(self) -> np.ndarray:
    return self.values.std(0, ddof=1) if len(self.values) > 1 else np.zeros_like(self.values[0])

  def save(self, path_without_ext: str, **extra: Any) -> None:
    """Writes `.npz` (arrays) and `.json` (names, mean, std, settings) for redrawing."""
    counted = (np.full(len(self.values), self.num_examples) if self.examples_counted is None
               else np.asarray(self.examples_counted))
    tmp = path_without_ext + ".tmp.npz"
    np.savez(tmp, values=self.values, stderr=self.stderr, mean=self.mean, std=self.std,
             names_a=np.asarray(self.names_a), names_b=np.asarray(self.names_b),
             examples_counted=counted, **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path_without_ext + ".npz")
    with open(path_without_ext + ".json.tmp", "w") as f:
      json.dump(dict(names_a=self.names_a, names_b=self.names_b, mean=self.mean.tolist(),
                     std=self.std.tolist(), repeats=len(self.values),
                     num_examples=self.num_examples, minibatch_size=self.minibatch_size,
                     examples_counted=counted.tolist()), f)
    os.replace(path_without_ext + ".json.tmp", path_without_ext + ".json")

  @classmethod
  def load(cls, path_without_ext: str) -> "RepeatedCKA":
    z = np.load(path_without_ext + ".npz")
    with open(path_without_ext + ".json") as f:
      meta = json.load(f)
    return cls(list(z["names_a"]), list(z["names_b"]), z["values"], z["stderr"],
               meta["num_examples"], meta["minibatch_size"], z.get("examples_counted"))


def make_step(side_a: Side, side_b: Side | None) -> Callable[..., Any]:
  """The jitted per-step function: images of `s` minibatches -> per-minibatch HSIC terms.

  Cached per (feature functions, names), so repeated comparisons of one architecture compile once.

  Returns:
    `step(vars_a, images_a, vars_b, images_b, mask) -> cka.HSICTerms` ([s, ...] leaves, a few kB),
    images `[s, m, h, w, 3]` sharded on axis 0, `mask: [s]` (0 for padding minibatches).
  """
  key = (side_a.features, side_a.names) + (
      () if side_b is None else (side_b.features, side_b.names))
  if key not in _STEPS:
    _STEPS[key] = _make_step(side_a, side_b)
  return _STEPS[key]


def _make_step(side_a: Side, side_b: Side | None) -> Callable[..., Any]:

  def features(side, variables, images):
    s, m = images.shape[:2]
    feats = side.features(variables, images.reshape((s * m,) + images.shape[2:]))
    missing = [n for n in side.names if n not in feats]
    if missing:
      raise KeyError(f"feature function did not return {missing}")
    return [feats[n].reshape((s, m) + feats[n].shape[1:]) for n in side.names]

  def step(vars_a, images_a, vars_b, images_b, mask):
    fa = features(side_a, vars_a, images_a)
    fb = None if side_b is None else features(side_b, vars_b, images_b)
    return cka.minibatch_terms(fa, fb, mask=mask)

  return jax.jit(step)


def cka_over_repeats(side_a: Side, side_b: Side | None, source: Any, *, num_examples: int,
                     minibatch_size: int, repeats: int, seed: int, mesh: jax.sharding.Mesh,
                     minibatches_per_step: int = 0, desc: str = "cka",
                     resume: resume_lib.Checkpointer | None = None) -> RepeatedCKA:
  """Minibatch CKA between every feature of `side_a` and of `side_b` (None: `side_a` with itself).

  Args:
    side_a, side_b: the two representations; `side_b=None` is intra-model (each Gram once).
    source: random-access raw data (`src[i]['image']` uint8).
    num_examples: N examples per repeat, drawn without replacement (multiple of `minibatch_size`).
    minibatch_size: m (>= 4 for unbiased HSIC).
    repeats: R independent samples (`streaming.cka_plan`).
    seed: sampling seed.
    mesh: 1-D device mesh; the minibatch axis of a step is split over it.
    minibatches_per_step: s; 0 = one minibatch per device. Rounded up to a multiple of the
      device count; a short last step is padded and masked.
    desc: name used in progress logs.
    resume: optional `resume.Checkpointer`: the finished repeats, the running accumulator and the
      stream position are saved every `resume.every_s` seconds, and a rerun continues from them
      with bit-identical results.

  Returns:
    RepeatedCKA with `values: [R, A, B]`.
  """
  if minibatch_size < 4:
    raise ValueError(f"minibatch_size must be >= 4 for unbiased HSIC, got {minibatch_size}")
  if num_examples % minibatch_size or num_examples <= 0:
    raise ValueError(f"num_examples {num_examples} must be a positive multiple of "
                     f"minibatch_size {minibatch_size}")
  if num_examples > len(source):
    raise ValueError(f"num_examples {num_examples} > {len(source)} examples in the source")
  s = streaming.round_step(max(minibatches_per_step, 1), mesh)
  m = minibatch_size
  step = make_step(side_a, side_b)
  vars_a = sharding.replicate(side_a.variables, mesh)
  vars_b = None if side_b is None else sharding.replicate(side_b.variables, mesh)
  views = {"a": (side_a.image_size, side_a.normalization)}
  if side_b is not None and (side_b.image_size, side_b.normalization) != views["a"]:
    views["b"] = (side_b.image_size, side_b.normalization)
  plan = streaming.cka_plan(len(source), num_examples, m, repeats, seed)  # [R, k, m]
  k = num_examples // m
  steps_per_repeat = -(-k // s)
  names_b = tuple(side_a.names if side_b is None else side_b.names)
  empty = cka.init(side_a.names, None if side_b is None else side_b.names)
  values = np.zeros((repeats, len(side_a.names), len(names_b)))
  errors = np.zeros_like(values)
  counted = np.zeros((repeats,), np.int64)
  state, position = empty, 0
  plan_id = streaming.plan_fingerprint(plan.reshape(-1), s * m, views)
  if resume is not None:
    restored = resume.restore(like={"state": empty, "values": values, "errors": errors,
                                    "counted": counted})
    if restored is not None:
      saved, position, extra = restored
      if extra.get("plan") != plan_id:
        raise resume_lib.CheckpointError(
            f"{resume.path} holds CKA sums of another plan (examples, minibatches or "
            "preprocessing); delete it to start again")
      state, values, errors = saved["state"], saved["values"], saved["errors"]
      counted = saved["counted"]
      logging.info("%s: resuming at repeat %d, step %d of %d", desc,
                   position // steps_per_repeat + 1, position % steps_per_repeat,
                   steps_per_repeat)
  t0, done = time.time(), 0
  for r in range(position // steps_per_repeat, repeats):
    start = position - r * steps_per_repeat if r == position // steps_per_repeat else 0
    if start == 0:
      state = empty
    stream = streaming.Stream(source, plan[r].reshape(-1), views=views, mesh=mesh,
                              step_size=s * m, group=m, start_step=start,
                              desc=f"{desc} repeat {r + 1}/{repeats}")
    pending = None
    for batch in stream:
      images_b = None if side_b is None else batch.images.get("b", batch.images["a"])
      # Dispatch is asynchronous: the device computes this step while the host adds the
      # previous step's terms (and the workers decode the next steps).
      terms = step(vars_a, batch.images["a"], vars_b, images_b, batch.mask)
      if pending is not None:
        state = cka.accumulate(state, pending)
        if resume is not None:  # `state` holds every step before this one
          resume.maybe_save({"state": state, "values": values, "errors": errors,
                             "counted": counted}, r * steps_per_repeat + batch.step,
                            {"plan": plan_id})
      pending = terms
      done += batch.num_real
    state = cka.accumulate(state, pending)
    res = cka.result(state)
    values[r], errors[r] = np.asarray(res.cka, np.float64), np.asarray(res.stderr, np.float64)
    counted[r] = int(res.num_examples)
    if resume is not None:
      resume.maybe_save({"state": empty, "values": values, "errors": errors,
                         "counted": counted}, (r + 1) * steps_per_repeat, {"plan": plan_id})
    elapsed = time.time() - t0
    logging.info("%s: repeat %d/%d, %d examples, %.1f examples/s", desc, r + 1, repeats,
                 num_examples, done / max(elapsed, 1e-9))
  return RepeatedCKA(list(side_a.names), list(names_b), values, errors, num_examples,
                     minibatch_size, counted)


def protocol_config() -> ml_collections.ConfigDict:
  """The sampling options every CKA-family analysis takes, with the paper's defaults.

  10,240 examples drawn without replacement, in minibatches of 1,024, 20 repeats
  (docs/method.md#minibatch-cka); the examples come from the `split` source.
  """
  return ml_collections.ConfigDict(dict(
      split="test",
      num_examples=10240,
      minibatch_size=1024,
      repeats=20,
      minibatches_per_step=0,   # 0: one minibatch per device per step
      checkpoint_every_s=60.0,  # partial accumulators saved this often (resumable)
      fast_compile=None,        # None: config.train.fast_compile
  ))


def protocol(sub: Any) -> dict[str, Any]:
  """The keyword arguments of `cka_over_repeats` from a merged sub-config."""
  return dict(num_examples=int(sub.num_examples), minibatch_size=int(sub.minibatch_size),
              repeats=int(sub.repeats), minibatches_per_step=int(sub.minibatches_per_step))


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
