"""Named representations: list them, select them by glob, compute only the selected ones.

Built-in models (vit_analysis.models), and any module whose `apply(v, images, train=False)`
returns `(logits, out)`, give `out`: a plain dict of '/'-joined names filled in forward order
(see vit_analysis/models/layers.py). Any other Flax linen module is used unchanged: its forward pass
`model.apply(variables, images[, train=False])` runs under `nn.intercept_methods`, and the output of every
submodule `__call__` is recorded under the submodule's scope path ('Encoder_0/Block_3/Mlp_0'),
in the order the calls return (a block after its children), with the module's own output as
'output'. A submodule called twice gets 'path', then 'path@1'; a call returning several arrays
gets 'path/0', 'path/1', ... (its pytree leaves in order).

This module never changes a model: it calls `apply` and keeps the selected entries. Under `jit`,
XLA removes whatever the outputs do not depend on, so unselected representations (and, with
`reduce`, the full-size selected ones) are never materialized.

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

from vit_analysis.models import info as model_info
from vit_analysis.runtime import jit_cache

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


_MODE_CACHE: jit_cache.JitCache[str] = jit_cache.JitCache()


def _find_mode(model: nn.Module, image_shape: Sequence[int]) -> str:
  """'out' (returns (logits, dict)), 'train' or 'plain' (intercepted, with / without train=)."""
  if model_info.describe(model).family != 'other':
    return 'out'
  struct = _image_struct(tuple(image_shape)[-3:])
  try:
    y = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], struct)
  except TypeError:  # No `train` argument.
    return 'plain'
  return 'out' if isinstance(y, tuple) and len(y) == 2 and isinstance(y[1], dict) else 'train'


def _mode(model: nn.Module, image_shape: Sequence[int]) -> str:
  return _MODE_CACHE.get((model, tuple(image_shape)[-3:]),
                         lambda: _find_mode(model, image_shape))


def uses_interception(model: nn.Module, image_shape: Sequence[int]) -> bool:
  """True when `model` does not return `(logits, out)` and its layers are intercepted.

  Built-in models (and any module whose `apply(v, images, train=False)` returns
  `(logits, dict)`) fill `out`; every other module is called as `apply(v, images,
  train=False)` if it takes `train`, else `apply(v, images)`, under `nn.intercept_methods`.
  """
  return _mode(model, image_shape) != 'out'


def _record(out: dict[str, Any], name: str, value: Any) -> None:
  leaves = jax.tree_util.tree_leaves(value)
  arrays = [v for v in leaves if isinstance(v, (jax.Array, np.ndarray))]
  if len(arrays) == 1 and len(leaves) == 1:
    out[name] = arrays[0]
  else:
    out.update({f'{name}/{i}': v for i, v in enumerate(arrays)})


def _interceptor(out: dict[str, Any]):
  """Records every submodule `__call__` output into `out`, keyed by scope path."""
  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and module.scope is not None:
      path = '/'.join(module.scope.path) or 'output'
      name, n = path, 1
      while name in out or f'{name}/0' in out:
        name, n = f'{path}@{n}', n + 1
      _record(out, name, y)
    return y
  return interceptor


def forward(model: nn.Module, variables: Any, images: Array) -> tuple[Any, dict[str, Array]]:
  """(model output, {name: representation} in forward order) for built-in or foreign modules.

  Models that fill `out` are called as `apply(variables, images, train=False)`; other modules
  as `apply(variables, images)`, their layers recorded by method interception.
  """
  mode = _mode(model, images.shape)
  if mode == 'out':
    return model.apply(variables, images, train=False)
  out: dict[str, Array] = {}
  with nn.intercept_methods(_interceptor(out)):
    y = model.apply(variables, images, **({'train': False} if mode == 'train' else {}))
  return y, out


def _trace(model: nn.Module, images: jax.ShapeDtypeStruct) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract forward pass: {name: ShapeDtypeStruct} in forward order (no FLOPs, no memory)."""
  order = []
  mode = _mode(model, images.shape)

  def forward(x):
    if mode == 'out':
      (_, out), _ = model.init_with_output(jax.random.key(0), x, train=False)
    else:
      out = {}
      with nn.intercept_methods(_interceptor(out)):
        model.init_with_output(jax.random.key(0), x,
                               **({'train': False} if mode == 'train' else {}))
    order.extend(out)  # Python-side, during tracing: the dict still has forward order here.
    return out

  shapes = jax.eval_shape(forward, images)
  return {name: shapes[name] for name in order}


_SHAPES_CACHE: jit_cache.JitCache[dict[str, jax.ShapeDtypeStruct]] = jit_cache.JitCache()


def _shapes(model: nn.Module, images: jax.ShapeDtypeStruct) -> dict[str, jax.ShapeDtypeStruct]:
  return _SHAPES_CACHE.get((model, images.shape), lambda: _trace(model, images))


def layer_names(model: nn.Module, image_shape: Sequence[int]) -> list[str]:
  """Every capturable representation of `model`, in forward order.

  Args:
    model: a registry model (returns `(logits, out)`) or any Flax linen module taking images.
    image_shape: (h, w, c) or (b, h, w, c).

  Returns:
    The names of `out`, e.g. ['embedding', 'block00/ln0', ..., 'logits'], or for a foreign
    module the scope paths of its submodule calls, e.g. ['Conv_0', ..., 'Dense_0', 'output'].
  """
  return list(_shapes(model, _image_struct(image_shape)))


def layer_shapes(model: nn.Module, image_shape: Sequence[int]
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """{name: ShapeDtypeStruct} of every representation, in forward order (no compute).

  Args:
    model: a registry model or any Flax linen module (see the module docstring).
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
    model: a registry model or any Flax linen module (see the module docstring).
    layers: glob(s) over the model's names (resolved when the function is traced).
    reduce: optional callable applied to each selected array, e.g. a Gram
      `lambda x: (f := x.reshape(x.shape[0], -1)) @ f.T` or token pooling.

  Returns:
    fn(variables, images) -> {name: array or reduce(array)}, names in forward order (a dict that
    crosses a jit boundary is re-sorted by JAX; use `select` on `layer_names` for the order).
  """
  patterns = _as_patterns(layers)

  def fn(variables, images):
    _, out = forward(model, variables, images)
    names = select(list(out), patterns)
    return {n: out[n] if reduce is None else reduce(out[n]) for n in names}

  return fn


# Bounded, oldest evicted first: a `reduce` written as an inline lambda is a new key on every call.
_JIT_CACHE = jit_cache.JitCache(max_size=32)


def _jitted(model: nn.Module, names: tuple[str, ...], reduce: Reduce):
  """One jitted capture per (model, selection, reduce); jit caches per shape/dtype itself."""
  return _JIT_CACHE.jit(make_capture_fn(model, names, reduce), key=(model, names, reduce))


def capture(model: nn.Module, variables: Any, images: Array, layers: Patterns = '*',
            reduce: Reduce = None) -> dict[str, Array]:
  """Jitted forward pass returning only the selected representations.

  Args:
    model: a registry model or any Flax linen module (see the module docstring).
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
    model: a registry model or any Flax linen module (see the module docstring).
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
