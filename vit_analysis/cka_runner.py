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
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from vit_analysis import capture
from vit_analysis import cka
from vit_analysis import data as data_lib
from vit_analysis import sharding

if TYPE_CHECKING:  # the analyses' model record; imported for annotations only
  from vit_analysis.analyses.base import LoadedModel

FeatureFn = Callable[[Any, jax.Array], dict[str, jax.Array]]

# Capture-point presets (paper.md §1.5) as glob lists over the `out` names of each family.
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
TOKEN_MODES = ("all", "exclude_cls", "cls_only", "token_mean")


def model_family(module: Any) -> str:
  """'vit', 'resnet', 'mixer' (from the attributes of contracts.md) or 'other'."""
  if hasattr(module, "num_heads"):
    return "vit"
  if hasattr(module, "block_units"):
    return "resnet"
  if hasattr(module, "patch_size"):
    return "mixer"
  return "other"


def resolve_layers(model: LoadedModel, spec: str | Sequence[str]) -> list[str]:
  """Layer names (forward order) from a preset name ('fine', 'coarse', 'blocks') or glob list."""
  names = capture.layer_names(model.module, (model.image_size, model.image_size, 3))
  if isinstance(spec, str):
    presets = PRESETS.get(model_family(model.module), {})
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


def token_features(x: jax.Array, mode: str, has_cls: bool) -> jax.Array:
  """Applies the CLS option of paper.md §6 row 3 to a ViT token array `x: [b, T, D]`."""
  if mode == "all" or x.ndim != 3:
    return x
  if mode == "token_mean":
    return x.mean(axis=1)
  if not has_cls:
    raise ValueError(f"token mode {mode!r} needs a CLS model")
  return x[:, 1:] if mode == "exclude_cls" else x[:, 0]


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
    return _feature_fn(model.module, layers, tokens)
  if cached is None:
    cached = _FEATURE_FNS[key] = _feature_fn(model.module, layers, tokens)
  return cached


_FEATURE_FNS: dict[Any, FeatureFn] = {}
_STEPS: dict[Any, Callable[..., Any]] = {}


def _feature_fn(module: Any, layers: Sequence[str], tokens: str) -> FeatureFn:
  fn = capture.make_capture_fn(module, list(layers))
  family = model_family(module)
  has_cls = family == "vit" and getattr(module, "classifier", "token") == "token"

  def features(variables, images):
    out = fn(variables, images)
    if family == "vit":
      out = {k: token_features(v, tokens, has_cls) for k, v in out.items()}
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
  """
  features: FeatureFn
  variables: Any
  image_size: int
  names: tuple[str, ...]


@dataclasses.dataclass
class RepeatedCKA:
  """CKA matrices of R independent samples.

  Attributes:
    names_a, names_b: row and column names.
    values: [R, A, B] CKA per repeat.
    stderr: [R, A, B] jackknife standard error over the minibatches of each repeat.
    num_examples, minibatch_size: per repeat.
  """
  names_a: list[str]
  names_b: list[str]
  values: np.ndarray
  stderr: np.ndarray
  num_examples: int
  minibatch_size: int

  @property
  def mean(self) -> np.ndarray:
    return self.values.mean(0)

  @property
  def std(self) -> np.ndarray:
    return self.values.std(0, ddof=1) if len(self.values) > 1 else np.zeros_like(self.values[0])

  def save(self, path_without_ext: str, **extra: Any) -> None:
    """Writes `.npz` (arrays) and `.json` (names, mean, std, settings) for redrawing."""
    np.savez(path_without_ext + ".npz", values=self.values, stderr=self.stderr, mean=self.mean,
             std=self.std, names_a=np.asarray(self.names_a), names_b=np.asarray(self.names_b),
             **{k: np.asarray(v) for k, v in extra.items()})
    with open(path_without_ext + ".json", "w") as f:
      json.dump(dict(names_a=self.names_a, names_b=self.names_b, mean=self.mean.tolist(),
                     std=self.std.tolist(), repeats=len(self.values),
                     num_examples=self.num_examples, minibatch_size=self.minibatch_size), f)

  @classmethod
  def load(cls, path_without_ext: str) -> "RepeatedCKA":
    z = np.load(path_without_ext + ".npz")
    with open(path_without_ext + ".json") as f:
      meta = json.load(f)
    return cls(list(z["names_a"]), list(z["names_b"]), z["values"], z["stderr"],
               meta["num_examples"], meta["minibatch_size"])


def _load_images(source: Any, indices: np.ndarray) -> list[np.ndarray]:
  """The raw uint8 [h, w, c] images (sizes may differ, as in ImageNet) at `indices`."""
  return [np.asarray(source[int(i)]["image"]) for i in indices]


def _step_images(side: Side, images: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
  """Raw images of `s*m` examples -> [s, m, size, size, 3] float32 in [-1, 1] for this side."""
  if all(im.shape == images[0].shape for im in images):
    x = data_lib.preprocess(np.stack(images), side.image_size)
  else:
    x = np.concatenate([data_lib.preprocess(im[None], side.image_size) for im in images])
  return x.reshape(shape + x.shape[1:])


def _host_step(side_a: Side, side_b: Side | None, source: Any, chunk: np.ndarray, s: int,
               s_local: int, m: int) -> dict[str, np.ndarray]:
  """This process's part of one global step: `chunk` [<= s, m] example indices -> images.

  A short last step is padded with copies of its first minibatch, masked out on device.
  """
  mask = np.zeros((s,), np.float32)
  mask[:len(chunk)] = 1.0
  chunk = np.concatenate([chunk, np.repeat(chunk[:1], s - len(chunk), 0)], 0)
  local = slice(jax.process_index() * s_local, (jax.process_index() + 1) * s_local)
  images = _load_images(source, chunk[local].reshape(-1))
  batch = dict(a=_step_images(side_a, images, (s_local, m)), mask=mask[local])
  if side_b is not None:
    batch["b"] = _step_images(side_b, images, (s_local, m))
  return batch


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
                     minibatches_per_step: int = 0, desc: str = "cka") -> RepeatedCKA:
  """Minibatch CKA between every feature of `side_a` and of `side_b` (None: `side_a` with itself).

  Args:
    side_a, side_b: the two representations; `side_b=None` is intra-model (each Gram once).
    source: random-access raw data (`src[i]['image']` uint8).
    num_examples: N examples per repeat, drawn without replacement (multiple of `minibatch_size`).
    minibatch_size: m (>= 4 for unbiased HSIC).
    repeats: R independent samples (`data.cka_minibatch_indices(..., repeat=r, seed)`).
    seed: sampling seed.
    mesh: 1-D device mesh; the minibatch axis of a step is split over it.
    minibatches_per_step: s; 0 = one minibatch per device. Rounded up to a multiple of the
      device count; a short last step is padded and masked.
    desc: name used in progress logs.

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
  devices, procs = mesh.devices.size, jax.process_count()
  s = max(minibatches_per_step, devices)
  s = -(-s // devices) * devices
  s_local = s // procs
  step = make_step(side_a, side_b)
  vars_a = sharding.replicate(side_a.variables, mesh)
  vars_b = None if side_b is None else sharding.replicate(side_b.variables, mesh)
  m = minibatch_size
  values, errors = [], []
  t0 = time.time()
  all_indices = data_lib.cka_minibatch_indices(len(source), num_examples, m, repeats, seed)
  k = num_examples // m
  for r in range(repeats):
    idx = all_indices[r * k:(r + 1) * k]
    state = cka.init(side_a.names, None if side_b is None else side_b.names)
    pending = None
    for start in range(0, k, s):
      batch = _host_step(side_a, side_b, source, idx[start:start + s], s, s_local, m)
      batch = sharding.shard_batch(batch, mesh)
      # Dispatch is asynchronous: the device computes this step while the host pulls the
      # previous step's terms and then loads the next step's images.
      terms = step(vars_a, batch["a"], vars_b, batch.get("b"), batch["mask"])
      if pending is not None:
        state = cka.accumulate(state, pending)
      pending = terms
    state = cka.accumulate(state, pending)
    res = cka.result(state)
    values.append(np.asarray(res.cka, np.float64))
    errors.append(np.asarray(res.stderr, np.float64))
    elapsed = time.time() - t0
    logging.info("%s: repeat %d/%d, %d examples, %.1f examples/s, ETA %.0f s", desc, r + 1,
                 repeats, num_examples, (r + 1) * num_examples / elapsed,
                 elapsed / (r + 1) * (repeats - r - 1))
  names_b = list(side_a.names if side_b is None else side_b.names)
  return RepeatedCKA(list(side_a.names), names_b, np.stack(values), np.stack(errors),
                     num_examples, minibatch_size)


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
              tuple(names))
