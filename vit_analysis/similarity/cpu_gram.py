"""Centred Grams on CPU through BLAS SYRK: an XLA FFI custom call (cpu_gram.cc).

OpenBLAS's SYRK computes one triangle of X X^T, half the FLOPs of XLA:CPU's GEMM, so on CPU the
Gram of every layer is this custom call: the features are centred chunk by chunk in cache and
handed to the OpenBLAS that SciPy loaded (`ssyrk`, the kernels of NumPy's `x @ x.T`), one thread
per call (XLA already runs independent layers' Grams concurrently), with no copy in or out of
XLA. GPUs and TPUs keep XLA's own GEMM. Measured in
docs/method.md#numerics-and-checks (benchmarks/cka_bench.py --peers).

The handler is compiled on first use with the C++ compiler (`$CXX`, else `c++`) against the
installed jaxlib's FFI headers into a cache folder (`$VIT_ANALYSIS_CACHE`, else
`~/.cache/vit_analysis`), keyed by the source and the jaxlib version. Where that fails (no
compiler, no SciPy BLAS) the Grams stay on XLA's GEMM, with one warning saying why; the two paths
agree to float32 rounding. `VIT_ANALYSIS_CPU_GRAM=xla` chooses XLA's GEMM.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
from absl import logging
from jax._src import custom_partitioning_sharding_rule as sharding_rule
from jax.extend import core as jax_core
from jax.interpreters import batching, mlir

_TARGET = "vit_analysis_centred_grams"
_SOURCE = pathlib.Path(__file__).with_name("cpu_gram.cc")
ENV_CHOICE = "VIT_ANALYSIS_CPU_GRAM"
CHOICES = ("blas", "xla")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str, "lib": ctypes.CDLL (kept alive)


def cache_dir() -> pathlib.Path:
  """Where compiled handlers live: $VIT_ANALYSIS_CACHE, else ~/.cache/vit_analysis (or, where
  that cannot be written, a folder of this user's in the system's temporary directory)."""
  explicit = os.environ.get("VIT_ANALYSIS_CACHE")
  if explicit:
    return pathlib.Path(explicit) / "cpu_gram"
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "vit_analysis", "cpu_gram")
  try:
    default.mkdir(parents=True, exist_ok=True)
    if os.access(default, os.W_OK):
      return default
  except OSError:
    pass
  user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
  return pathlib.Path(tempfile.gettempdir(), f"vit_analysis-{user}", "cpu_gram")


def _compiler() -> str:
  cxx = os.environ.get("CXX") or "c++"
  found = shutil.which(cxx)
  if not found:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set CXX, or install g++)")
  return found


def _build() -> pathlib.Path:
  """Compiles cpu_gram.cc once per (source, jaxlib, Python ABI); concurrent builders race to an
  atomic rename, so a reader never sees half a library."""
  import jaxlib
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + sys.platform.encode()
                       ).hexdigest()[:16]
  target = cache_dir() / f"cpu_gram-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  cmd = [_compiler(), "-O3", "-std=c++17", "-shared", "-fPIC",
         f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _openblas() -> tuple[int, int]:
  """Addresses of ssyrk (Fortran interface, 32-bit ints) and openblas_set_num_threads_local in
  the OpenBLAS that SciPy loaded (found by threadpoolctl; NumPy's own is ILP64, so not used)."""
  import scipy.linalg  # noqa: F401 (loads SciPy's BLAS)
  import threadpoolctl
  seen = []
  for info in threadpoolctl.threadpool_info():
    if info.get("internal_api") != "openblas":
      continue
    seen.append(f"{info['filepath']} ({info.get('version')})")
    lib = ctypes.CDLL(info["filepath"])
    config = next((getattr(lib, name) for name in ("scipy_openblas_get_config",
                                                   "openblas_get_config") if hasattr(lib, name)),
                  None)
    if config is not None:
      config.restype = ctypes.c_char_p
      if b"USE64BITINT" in (config() or b""):  # 64-bit BLAS ints: not the ABI cpu_gram.cc calls
        continue
    syrk = next((getattr(lib, name) for name in ("scipy_ssyrk_", "ssyrk_")
                 if hasattr(lib, name)), None)
    local = getattr(lib, "openblas_set_num_threads_local", None)
    if syrk is not None and local is not None:
      as_address = lambda f: ctypes.cast(f, ctypes.c_void_p).value
      _state["blas"] = seen[-1]
      return as_address(syrk), as_address(local)
  raise RuntimeError("no loaded OpenBLAS has a 32-bit-index ssyrk and "
                     "openblas_set_num_threads_local (OpenBLAS >= 0.3.27); OpenBLAS libraries "
                     f"loaded: {seen or 'none'}")


def _load() -> None:
  path = _build()
  syrk, set_local_threads = _openblas()
  lib = ctypes.CDLL(str(path))
  lib.vit_analysis_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
  lib.vit_analysis_set_blas.restype = None
  lib.vit_analysis_set_blas(syrk, set_local_threads)
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.VitAnalysisCentredGrams),
                              platform="cpu")
  # Leading (minibatch) axes may be sharded over devices: each device computes its own Grams,
  # nothing is gathered.
  jax.ffi.register_ffi_target_as_batch_partitionable(_TARGET)
  _state["lib"] = lib


def available() -> bool:
  """Whether CPU Grams go through SYRK (compiles and registers the handler on the first call).

  False where `VIT_ANALYSIS_CPU_GRAM=xla` or the handler could not be built (one warning, with
  the compiler's message); the caller then uses XLA's GEMM.
  """
  choice = os.environ.get(ENV_CHOICE, "blas").strip().lower() or "blas"
  if choice not in CHOICES:
    raise ValueError(f"{ENV_CHOICE} must be one of {CHOICES}, got {choice!r}")
  if choice == "xla":
    return False
  with _lock:
    if "ok" not in _state:
      try:
        _load()
        _state["ok"] = True
      except Exception as e:  # noqa: BLE001 (any failure means: use XLA's GEMM, say why once)
        _state["ok"], _state["why"] = False, f"{type(e).__name__}: {e}"
        logging.warning("CPU Grams use XLA's GEMM, not BLAS SYRK (%s)", _state["why"])
  return bool(_state["ok"])


def centred_grams(x: jax.Array) -> jax.Array:
  """C X X^T C of float32 features x: [..., m, p] -> [..., m, m] through SYRK; traceable.

  For computations on CPU. Under vmap the batch axes are passed to the handler, which loops over
  them (no per-example dispatch); leading axes sharded over devices stay sharded (each device
  computes its own Grams, no all-gather).

  Raises:
    RuntimeError: the handler is unavailable (`available()` is False; the warning says why).
  """
  if x.dtype != jnp.float32 or x.ndim < 2:
    raise ValueError(f"cpu_gram.centred_grams needs float32 [..., m, p], got {x.dtype} "
                     f"{x.shape}")
  if not available():
    raise RuntimeError(f"the SYRK Gram handler is unavailable: {_state.get('why') or ENV_CHOICE}")
  return _centred_grams_p.bind(x)


# A primitive of its own rather than `jax.ffi.ffi_call`: the custom call must carry the
# `num_batch_dims` frontend attribute for XLA's batch partitioner to keep sharded minibatch axes
# sharded (ffi_call has no way to set it).
_centred_grams_p = jax_core.Primitive("vit_analysis_centred_grams")
_centred_grams_p.def_impl(lambda x: jax.jit(_centred_grams_p.bind)(x))


@_centred_grams_p.def_abstract_eval
def _abstract_eval(x):
  return jax.core.ShapedArray(x.shape[:-1] + (x.shape[-2],), x.dtype)


def _batch(args, dims):
  (x,), (d,) = args, dims
  return _centred_grams_p.bind(jnp.moveaxis(x, d, 0)), 0


def _lower(ctx, x):
  (aval,) = ctx.avals_in
  batch = [f"b{i}" for i in range(len(aval.shape) - 2)]
  attributes = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(len(batch))})}
  # Shardy's propagation sees through a custom call only with a rule: batch axes pass through,
  # a Gram needs all m examples and p features of its minibatch (replicated factors).
  rule = sharding_rule.str_to_sdy_sharding_rule(
      f"{' '.join(batch)} m p -> {' '.join(batch)} m n",
      need_replication_factors=("m", "p", "n"))
  attributes["sdy.sharding_rule"] = sharding_rule.sdy_sharding_rule_to_mlir(
      rule, [mlir.aval_to_ir_type(ctx.module_context, aval)],
      [mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])])
  return jax.ffi.ffi_lowering(_TARGET, extra_attributes=attributes)(ctx, x)


batching.primitive_batchers[_centred_grams_p] = _batch
mlir.register_lowering(_centred_grams_p, _lower, platform="cpu")
