"""The one memo of jitted functions, keyed by module and options.

A jitted function caches its compilations per input shape, but only for as long as the same
function object is called again: a fresh `jax.jit(make_fn(module))` per call compiles again
every time. The callers (capture, probes, similarity steps) therefore keep one jitted function
per (module, selection, options) here.

Keys usually hold a Flax module, hashable through its dataclass fields; a module with an
unhashable field (a list, an array) cannot be a dict key, and is then built fresh on every call
(correct, only slower) rather than rejected.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import jax

from vit_analysis.runtime import compilation

T = TypeVar("T")


class JitCache(Generic[T]):
  """A dict of built functions; `get(key, build)` builds on the first use of a key.

  Args:
    max_size: at most this many entries, the oldest evicted first (None: unbounded). Bound a
      cache whose keys may hold inline lambdas: each such lambda is a new key.
  """

  def __init__(self, max_size: int | None = None):
    if max_size is not None and max_size < 1:
      raise ValueError(f"max_size must be positive or None, got {max_size}")
    self.max_size = max_size
    self._entries: dict[Hashable, T] = {}

  def __len__(self) -> int:
    return len(self._entries)

  def clear(self) -> None:
    self._entries.clear()

  def get(self, key: Any, build: Callable[[], T]) -> T:
    """The entry for `key`, built by `build()` if absent; uncached if `key` is unhashable."""
    try:
      entry = self._entries.get(key)
    except TypeError:  # An unhashable part (a module field holding a list): build every time.
      return build()
    if entry is None:
      if self.max_size is not None and len(self._entries) >= self.max_size:
        del self._entries[next(iter(self._entries))]
      entry = self._entries[key] = build()
    return entry

  def jit(self, fn: Callable[..., Any], *, key: Any = None, fast: bool = False,
          **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` with `compilation.compiler_options(fast)`, memoised.

    Args:
      fn: the function to jit (called only through the result).
      key: what identifies `fn` (default: `fn` itself); pass the parts `fn` was made from when
        it is a fresh closure on every call.
      fast: XLA:CPU optimisation level 0 (`vit_analysis.runtime.compilation`).
      **jit_kwargs: further `jax.jit` arguments (`static_argnames`, `donate_argnums`, ...);
        they are part of the key, so they must be hashable for the result to be cached.
    """
    options = compilation.compiler_options(bool(fast))
    # The resolved options, not `fast`: on GPU/TPU fast and slow are one program.
    full_key = (fn if key is None else key, options is not None,
                tuple(sorted(jit_kwargs.items())))
    return self.get(full_key, lambda: jax.jit(fn, compiler_options=options, **jit_kwargs))
