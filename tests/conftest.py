"""Test-wide JAX settings: 4 simulated CPU devices, strict rank promotion.

Both must be set before any JAX operation runs, so they live here and not in the library.
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
