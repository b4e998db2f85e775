"""Named representations: list them, select them by glob, compute only the selected ones.

Every model returns `(logits, out)` where `out` is a plain dict of '/'-joined names filled in
forward order (contracts.md). This module never changes a model: it calls `apply` and keeps the
selected entries. Under `jit`, XLA removes whatever the outputs do not depend on, so unselected
representations (and, with `reduce`, the full-size selected ones) are never materialized.

Ordering: JAX flattens dicts with sorted keys, so a dict that crosses a `jit` boundary comes back
sorted. Names are therefore recorded in forward order while tracing and results are re-ordered
before they are returned.

  names = layer_names(model, (32, 32, 3))
  feats = capture(model, variables, images, layers=['block*/+sa', 'encoder_norm'])
  gram_fn = make_capture_fn(model, 'block??', reduce=gram)  # call inside your own jit
"""
import difflib
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Patterns = str | Sequence[str]
Reduce = Callable[[Array], Array] | None


def _as_patterns(patterns: Patterns) -> tuple[str, ...]:
  if isinstance(patterns, str):
    return (patterns,)
  patterns = tuple(patterns)
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise ValueError(f'layers must be a glob or a non-empty sequence of globs, got {patterns!r}')
  return patterns


def _image_struct(image_shape: Sequence[int], batch: int = 1) -> jax.ShapeDtypeStruct:
  shape = tuple(int(s) for s in image_shape)
  if len(shape) == 3:
    shape = (batch,) + shape
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f'image_shape must be (h, w, c) or (b, h, w, c), got {image_shape!r}')
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _trace(model: nn.Module, images: jax.ShapeDtypeStruct) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract forward pass: {name: ShapeDtypeStruct} in forward order (no FLOPs, no memory)."""
  order = []

  def forward(x):
    (_, out), _ = model.init_with_output(jax.random.key(0), x, train=False)
    order.extend(out)  # Python-side, during tracing: the dict still has forward order here.
    return out

  shapes = jax.eval_shape(forward, images)
  return {name: shapes[name] for name in order}


_SHAPES_CACHE: dict[Any, dict[str, jax.ShapeDtypeStruct]] = {}


def _shapes(model: nn.Module, images: jax.ShapeDtypeStruct) -> dict[str, jax.ShapeDtypeStruct]:
  key = (model, images.shape)
  try:
    cached = _SHAPES_CACHE.get(key)
  except TypeError:  # An unhashable module field: trace every time.
    return _trace(model, images)
  if cached is None:
    cached = _SHAPES_CACHE[key] = _trace(model, images)
  return cached


def layer_names(model: nn.Module, image_shape: Sequence[int]) -> list[str]:
  """Every capturable representation of `model`, in forward order.

  Args:
    model: a registry model (returns `(logits, out)`).
    image_shape: (h, w, c) or (b, h, w, c).

  Returns:
    The names of `out`, e.g. ['embedding', 'block00/ln0', ..., 'logits'].
  """
  return list(_shapes(model, _image_struct(image_shape)))


def layer_shapes(model: nn.Module, image_shape: Sequence[int]
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """{name: ShapeDtypeStruct} of every representation, in forward order (no compute).

  Args:
    model: a registry model.
    image_shape: (h, w, c) (batch 1) or (b, h, w, c).
  """
  return dict(_shapes(model, _image_struct(image_shape)))


def select(names: Sequence[str], patterns: Patterns) -> list[str]:
  """Names matching any of the glob patterns, in the order of `names` (forward order).

  Args:
    names: candidate names, e.g. from `layer_names`.
    patterns: one glob or a sequence of globs ('block*/+sa', 'block0[0-5]', 'encoder_norm').
      `fnmatch` syntax: '*' also matches '/', so 'block*' selects sub-layers too; use
      'block??' for block outputs only.

  Returns:
    Matching names, each once, in the order of `names`.

  Raises:
    KeyError: a pattern matches nothing; the message lists close matches.
  """
  patterns = _as_patterns(patterns)
  names = list(names)
  for p in patterns:
    if not fnmatch.filter(names, p):
      close = difflib.get_close_matches(p, names, n=5, cutoff=0.4)
      raise KeyError(f'layer pattern {p!r} matches nothing; close matches: {close} '
                     f'(of {len(names)} names: {names[:4]} ... {names[-3:]})')
  return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def make_capture_fn(model: nn.Module, layers: Patterns,
                    reduce: Reduce = None) -> Callable[[Any, Array], dict[str, Array]]:
  """A pure function (variables, images) -> {name: array} for use inside your own `jit`.

  Only the selected (and reduced) arrays leave the function, so when it runs inside a jitted
  computation (CKA Gram accumulation, pooled probe features) XLA never materializes the rest.

  Args:
    model: a registry model.
    layers: glob(s) over the model's names (resolved when the function is traced).
    reduce: optional callable applied to each selected array, e.g. a Gram
      `lambda x: (f := x.reshape(x.shape[0], -1)) @ f.T` or token pooling.

  Returns:
    fn(variables, images) -> {name: array or reduce(array)}, names in forward order (a dict that
    crosses a jit boundary is re-sorted by JAX; use `select` on `layer_names` for the order).
  """
  patterns = _as_patterns(layers)

  def fn(variables, images):
    _, out = model.apply(variables, images, train=False)
    names = select(list(out), patterns)
    return {n: out[n] if reduce is None else reduce(out[n]) for n in names}

  return fn


_JIT_CACHE: dict[Any, Callable[..., dict[str, Array]]] = {}
# Bounded, oldest evicted first: a `reduce` written as an inline lambda is a new key on every call.
_JIT_CACHE_SIZE = 32


def _jitted(model: nn.Module, names: tuple[str, ...], reduce: Reduce):
  """One jitted capture per (model, selection, reduce); jit caches per shape/dtype itself."""
  key = (model, names, reduce)
  try:
    fn = _JIT_CACHE.get(key)
  except TypeError:  # An unhashable module field: no caching.
    return jax.jit(make_capture_fn(model, names, reduce))
  if fn is None:
    if len(_JIT_CACHE) >= _JIT_CACHE_SIZE:
      del _JIT_CACHE[next(iter(_JIT_CACHE))]
    fn = _JIT_CACHE[key] = jax.jit(make_capture_fn(model, names, reduce))
  return fn


def capture(model: nn.Module, variables: Any, images: Array, layers: Patterns = '*',
            reduce: Reduce = None) -> dict[str, Array]:
  """Jitted forward pass returning only the selected representations.

  Args:
    model: a registry model.
    variables: {'params': ...}.
    images: [b, h, w, c] float32 in [-1, 1].
    layers: glob(s) over `layer_names(model, images.shape)`.
    reduce: optional per-array callable applied inside the same jit. Pass a named function, not
      a fresh lambda per call: compiled functions are cached per (model, selection, reduce).

  Returns:
    {name: jax.Array} in forward order.

  Raises:
    KeyError: a pattern matches no name (close matches listed).
    ValueError: images are not [b, h, w, c].
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'images must be [b, h, w, c], got shape {images.shape}')
  names = tuple(select(layer_names(model, images.shape[1:]), layers))
  result = _jitted(model, names, reduce)(variables, images)
  return {n: result[n] for n in names}


def plan_bytes(model: nn.Module, image_shape: Sequence[int], batch: int,
               layers: Patterns = '*', reduce: Reduce = None) -> dict[str, int]:
  """Bytes each selected representation takes for one batch (via `jax.eval_shape`, no compute).

  Args:
    model: a registry model.
    image_shape: (h, w, c) (or (b, h, w, c), whose b is replaced by `batch`).
    batch: batch size.
    layers: glob(s) over the model's names.
    reduce: optional per-array callable, planned on its output shape.

  Returns:
    {name: bytes} in forward order; `sum(plan.values())` is the total.
  """
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}')
  shape = tuple(image_shape)[-3:]
  shapes = _shapes(model, _image_struct(shape, batch))
  names = select(list(shapes), layers)
  plan = {}
  for n in names:
    s = shapes[n] if reduce is None else jax.eval_shape(reduce, shapes[n])
    plan[n] = math.prod(s.shape) * np.dtype(s.dtype).itemsize
  return plan
