"""The CPU Gram path: BLAS SYRK through an XLA FFI custom call (vit_analysis/similarity/cpu_gram.py,
docs/method.md#numerics-and-checks), against float64 NumPy from the definition C X X^T C."""
import logging
import re
import shutil
import tempfile

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka, cpu_gram


@pytest.fixture(scope="module", autouse=True)
def syrk_handler():
  if not cpu_gram.available():
    helpers.skip_unless_ci(f"the SYRK Gram handler did not build here: {cpu_gram._state['why']}")


def ref_centred_gram(x: np.ndarray) -> np.ndarray:
  """float64 C X X^T C of x: [m, p] from the definition."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  c = np.eye(len(x)) - 1.0 / len(x)
  return c @ x @ x.T @ c


@pytest.mark.parametrize("m, p, offset", [(7, 3, 0.0), (64, 300, 1e4), (130, 70_000, 10.0),
                                          (5, 1, -3.0), (64, 3000, 1e3), (64, 5000, 0.0)])
def test_equals_float64_definition_whatever_the_offset(m, p, offset):
  # A chunk is 2^17 / m columns: p = 3,000 and 5,000 at m = 64 are 2 and 3 chunks (as many
  # partial Grams), p = 70,000 at m = 130 is 70 chunks in 4 parts. Offset 1e4 on unit features
  # is a residual stream's: centring before the product keeps all of its signal.
  rng = np.random.default_rng(m + p)
  x = (rng.normal(size=(m, p)) + offset + rng.uniform(0, 4, size=p)).astype(np.float32)
  gram = np.asarray(jax.jit(cpu_gram.centred_grams)(x))
  ref = ref_centred_gram(x)
  np.testing.assert_array_equal(gram, gram.T)
  assert np.abs(gram - ref).max() <= 1e-6 * np.abs(ref).max()


def test_is_the_path_of_cka_on_cpu_and_more_accurate_than_xla_gemm():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(96, 5000)) + 1e4).astype(np.float32)
  ref = ref_centred_gram(x)
  err = lambda g: np.abs(np.asarray(g) - ref).max() / np.abs(ref).max()
  assert jax.default_backend() == "cpu"
  via_cka = cka.gram_linear(x)
  np.testing.assert_array_equal(via_cka, jax.jit(cpu_gram.centred_grams)(x))
  assert "vit_analysis_centred_grams" in cka._centred_grams.lower([x], "highest").as_text()
  # XLA's GEMM path (float32 column means) loses ~1e-4 of the Gram at this offset; SYRK's
  # centring (float64 means, split into two float32 terms) keeps it at float32 rounding.
  xla = jax.jit(lambda v: cka._xla_centred_gram(v, jax.lax.Precision.HIGHEST))(x)
  assert err(via_cka) < 1e-6 < err(xla)


def test_batched_equals_one_at_a_time_bitwise():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 20, 40)).astype(np.float32)
  batched = np.asarray(jax.jit(cpu_gram.centred_grams)(x))
  vmapped = np.asarray(jax.jit(jax.vmap(jax.vmap(cpu_gram.centred_grams), in_axes=1,
                                        out_axes=1))(x))
  single = np.stack([[np.asarray(jax.jit(cpu_gram.centred_grams)(x[i, j])) for j in range(3)]
                     for i in range(2)])
  np.testing.assert_array_equal(batched, single)
  np.testing.assert_array_equal(vmapped, single)
  assert batched.shape == (2, 3, 20, 20)


def test_sharded_minibatches_stay_on_their_devices():
  mesh = sharding.make_mesh(jax.devices()[:4])
  x = np.random.default_rng(2).normal(size=(4, 16, 30)).astype(np.float32)
  xs = jax.device_put(x, sharding.data_sharding(mesh))
  step = jax.jit(cpu_gram.centred_grams)
  text = step.lower(xs).compile().as_text()
  assert re.search(r"custom-call\(.*\).*vit_analysis_centred_grams", text)
  assert re.search(r"f32\[1,16,16\].*custom-call", text)  # one minibatch per device
  assert not re.search(r"all-gather|all-reduce|collective-permute|all-to-all", text)
  out = step(xs)
  assert out.sharding.is_equivalent_to(sharding.data_sharding(mesh), 3)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(step(x)))


def test_rejects_what_it_cannot_compute():
  with pytest.raises(ValueError, match=r"float32 \[\.\.\., m, p\].*float16"):
    cpu_gram.centred_grams(jnp.zeros((4, 3), jnp.float16))
  with pytest.raises(ValueError, match=r"float32 \[\.\.\., m, p\].*\(4,\)"):
    cpu_gram.centred_grams(jnp.zeros((4,), jnp.float32))


def test_without_a_compiler_cka_says_why_and_uses_xla(monkeypatch, tmp_path, caplog):
  saved = dict(cpu_gram._state)
  monkeypatch.setattr(cpu_gram, "_state", {})
  monkeypatch.setenv("CXX", "no-such-compiler-xyz")
  monkeypatch.setenv("VIT_ANALYSIS_CACHE", str(tmp_path))
  with caplog.at_level(logging.WARNING):
    assert not cpu_gram.available()
    assert not cpu_gram.available()  # said once
  said = [r.getMessage() for r in caplog.records if "XLA's GEMM" in r.getMessage()]
  assert len(said) == 1 and "no C++ compiler 'no-such-compiler-xyz'" in said[0]
  with pytest.raises(RuntimeError, match="unavailable: RuntimeError: no C\\+\\+ compiler"):
    cpu_gram.centred_grams(jnp.zeros((4, 3), jnp.float32))
  x = np.random.default_rng(3).normal(size=(12, 50)).astype(np.float32)
  text = jax.jit(lambda v: cka._centred_gram(v, jax.lax.Precision.HIGHEST)).lower(x).as_text()
  assert "vit_analysis_centred_grams" not in text and "dot_general" in text
  monkeypatch.setattr(cpu_gram, "_state", saved)


def test_choice_by_environment(monkeypatch):
  monkeypatch.setenv(cpu_gram.ENV_CHOICE, "xla")
  assert not cpu_gram.available()
  monkeypatch.setenv(cpu_gram.ENV_CHOICE, "syrk")
  with pytest.raises(ValueError, match=r"VIT_ANALYSIS_CPU_GRAM must be one of \('blas', 'xla'\)"):
    cpu_gram.available()


def test_compiled_once_per_source_and_jaxlib(tmp_path, monkeypatch):
  if shutil.which("c++") is None:
    helpers.skip_unless_ci("no C++ compiler")
  monkeypatch.setenv("VIT_ANALYSIS_CACHE", str(tmp_path))
  first = cpu_gram._build()
  assert first.parent == tmp_path / "cpu_gram" and first.name.startswith("cpu_gram-")
  stamp = first.stat().st_mtime_ns
  assert cpu_gram._build() == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_blas_threads_are_given_back():
  import threadpoolctl
  # Each call runs SYRK on one thread; the BLAS's count must be what it was once they are done,
  # whatever calls overlapped (12 layers in one program run concurrently on XLA's pool).
  xs = [np.random.default_rng(i).normal(size=(48, 700)).astype(np.float32) for i in range(12)]
  with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
    for _ in range(4):
      jax.block_until_ready(cka.centred_grams(xs))
    counts = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
              if i["internal_api"] == "openblas"}
  assert counts and set(counts.values()) == {3}, counts


def test_cache_folder_falls_back_when_home_cannot_be_written(tmp_path, monkeypatch):
  monkeypatch.delenv("VIT_ANALYSIS_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert cpu_gram.cache_dir() == tmp_path / "cache" / "vit_analysis" / "cpu_gram"
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
  fallback = cpu_gram.cache_dir()
  assert fallback.name == "cpu_gram" and str(fallback).startswith(tempfile.gettempdir())
  monkeypatch.setenv("VIT_ANALYSIS_CACHE", str(tmp_path / "mine"))
  assert cpu_gram.cache_dir() == tmp_path / "mine" / "cpu_gram"
