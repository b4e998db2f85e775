"""The one fast-compile setting: options on CPU, lookup order sub-config > train defaults."""
import jax
import jax.numpy as jnp
import ml_collections

from vit_analysis.runtime import compilation


def test_options_and_lookup():
  assert compilation.compiler_options(False) is None
  assert compilation.compiler_options(True) == {"xla_backend_optimization_level": 0}
  f = compilation.jit(lambda x: 2 * x, fast=True)
  assert float(f(jnp.float32(3))) == 6.0
  config = ml_collections.ConfigDict({"train": {"fast_compile": True}})
  assert compilation.fast_compile(config, ml_collections.ConfigDict({"fast_compile": None}))
  assert not compilation.fast_compile(config, ml_collections.ConfigDict({"fast_compile": False}))
  assert not compilation.fast_compile(ml_collections.ConfigDict(), ml_collections.ConfigDict())
  assert jax.default_backend() == "cpu"
