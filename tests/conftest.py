"""Test-wide JAX settings: 4 simulated CPU devices, strict rank promotion.

Both must be set before any JAX operation runs, so they live here and not in the library.
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture
def model_cache(tmp_path_factory):
  """One model cache for the whole session, so that each smoke model trains once."""
  path = tmp_path_factory.getbasetemp() / "shared_model_cache"
  path.mkdir(exist_ok=True)
  return str(path)
