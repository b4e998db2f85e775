"""The one fast-compile setting.

XLA:CPU spends most of a small model's compile time in LLVM's optimisation passes; optimisation
level 0 roughly halves it, at some cost in run time. Smoke runs and tests use it; other backends
ignore it.
"""
from __future__ import annotations

from typing import Any

import jax

FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def compiler_options(fast: bool) -> dict[str, Any] | None:
  """`compiler_options` for `jax.jit`: level 0 when `fast` on CPU, else None (XLA defaults)."""
  if fast and jax.default_backend() == "cpu":
    return dict(FAST_COMPILE_OPTIONS)
  return None


def jit(fn, *, fast: bool = False, **kwargs):
  """`jax.jit(fn, **kwargs)` with `compiler_options(fast)`."""
  return jax.jit(fn, compiler_options=compiler_options(fast), **kwargs)


def fast_compile(config: Any, sub: Any) -> bool:
  """An analysis' `fast_compile`: its sub-config's value if set (not None), else the training
  defaults' `config.train.fast_compile` (True in smoke configs)."""
  value = sub.get("fast_compile", None) if sub is not None else None
  if value is not None:
    return bool(value)
  train = config.get("train", None) if config is not None else None
  return bool(train.get("fast_compile", False)) if train is not None else False
