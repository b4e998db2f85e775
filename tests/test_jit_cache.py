"""The one memo of jitted functions (`vit_analysis.runtime.jit_cache`)."""
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.runtime import jit_cache


def _double(x):
  return 2 * x


def test_same_key_gives_the_same_compiled_function():
  cache = jit_cache.JitCache()
  f = cache.jit(_double)
  assert cache.jit(_double) is f
  # A fresh closure with an explicit key reuses the entry made from the first closure.
  g = cache.jit(lambda x: 3 * x, key=("triple", 1))
  assert cache.jit(lambda x: 3 * x, key=("triple", 1)) is g
  assert len(cache) == 2
  np.testing.assert_allclose(f(jnp.arange(3.0)), [0, 2, 4])
  np.testing.assert_allclose(g(jnp.arange(3.0)), [0, 3, 6])


def test_unhashable_key_still_works_uncached():
  cache = jit_cache.JitCache()
  key = ("model", [1, 2])  # a list field, as in a module with an unhashable attribute
  f = cache.jit(_double, key=key)
  g = cache.jit(_double, key=key)
  assert f is not g and len(cache) == 0
  np.testing.assert_allclose(f(jnp.ones(2)), [2, 2])
  built = []
  assert cache.get({"a": 1}, lambda: built.append(1) or "value") == "value"
  assert cache.get({"a": 1}, lambda: built.append(1) or "value") == "value"
  assert len(built) == 2 and len(cache) == 0


def test_different_options_give_different_entries():
  cache = jit_cache.JitCache()
  plain = cache.jit(_double)
  fast = cache.jit(_double, fast=True)  # XLA:CPU level 0 (one program elsewhere)
  static = cache.jit(lambda x, n: x * n, key="mul", static_argnames=("n",))
  donating = cache.jit(lambda x, n: x * n, key="mul", static_argnames=("n",), donate_argnums=0)
  assert static is not donating and plain is not fast
  assert cache.jit(_double, fast=True) is fast
  assert len(cache) == 4
  np.testing.assert_allclose(fast(jnp.ones(2)), plain(jnp.ones(2)))
  np.testing.assert_allclose(static(jnp.ones(2), n=3), [3, 3])


def test_get_builds_once_and_evicts_the_oldest():
  cache = jit_cache.JitCache(max_size=2)
  calls = []
  build = lambda k: lambda: calls.append(k) or k.upper()
  assert cache.get("a", build("a")) == "A"
  assert cache.get("a", build("a")) == "A"
  cache.get("b", build("b"))
  cache.get("c", build("c"))  # evicts "a"
  assert len(cache) == 2 and calls == ["a", "b", "c"]
  cache.get("a", build("a"))
  assert calls == ["a", "b", "c", "a"]
  with pytest.raises(ValueError, match="max_size"):
    jit_cache.JitCache(max_size=0)
