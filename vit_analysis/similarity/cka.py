"""Linear CKA: HSIC estimators and an exact, device-sharded minibatch CKA accumulator.

The only place CKA maths lives (docs/method.md#minibatch-cka). Notation: m examples per minibatch, k
minibatches, A and B layers on the two sides, p features of one layer (everything after the
example axis, flattened as in the official code).

Minibatch CKA (Nguyen et al. 2021) sums the unbiased HSIC_1 of every minibatch separately for the
cross term and both self terms, and divides once:
  CKA_ab = sum_i HSIC_1(K_ai, L_bi) / sqrt(sum_i HSIC_1(K_ai, K_ai) * sum_i HSIC_1(L_bi, L_bi)).
HSIC_1 is not additive over parts of one minibatch, so a minibatch always lives whole on one device.

Two halves:
* On device, pure and jittable: `minibatch_terms(feats_a, feats_b, mask=...)` maps a global step of
  `[k, m, ...]` features (axis 0 may be sharded over a mesh; vmap over it keeps every minibatch on
  its device) to per-minibatch HSIC values `[k, A, B]`, `[k, A]`, `[k, B]` -- a few kB. Call it
  inside the jit that captures the activations, so activations never leave the device. Per
  minibatch it is `terms_from_grams(centred_grams(feats_a), centred_grams(feats_b))`: other
  Gram-based similarity measures can share those Grams inside the same jitted step.
* On the host, float64: `accumulate(state, terms)` appends them to a `CKAState` (the per-minibatch
  values, [k, A, B] + [k, A] + [k, B]: independent of m), `merge` concatenates two states
  (associative), `result` divides once and returns a `CKAResult` with the exact
  leave-one-minibatch-out jackknife standard error.
`update(state, feats_a, feats_b, stacked=False)` does both for features you already hold: one
minibatch `[m, ...]` per layer, or with `stacked=True` a global step `[k, m, ...]` (shapes alone
cannot tell `[k, m, p]` from `[m, h, w]`, hence the explicit flag).

Numerics: features are centred per minibatch in float32 before the Gram (HSIC is invariant to
column offsets, and a 1e4 offset would otherwise cancel catastrophically inside the Gram). Grams use
precision=HIGHEST unless `gram_precision` says otherwise (GPU/TPU only); ratios and sums over
minibatches are float64 on the host, added minibatch by minibatch in order, and the sums on device
have a fixed order: a minibatch's terms, and so the result, are bitwise the same whether its
minibatches come one per call, stacked, through `minibatch_cka` or on 1, 2 or 4 devices (tested);
`result` sums them in a canonical order, so merging in any order or grouping changes no bit.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vit_analysis.similarity import cpu_gram

Features = Sequence[jax.typing.ArrayLike] | Mapping[str, jax.typing.ArrayLike]
_HIGHEST = jax.lax.Precision.HIGHEST
# A layer whose self-HSIC is below this fraction of (trace of its centred Gram)^2 is constant up
# to float32 rounding (a constant layer gives ~eps^2 = 1e-14; real layers with p features >= 1/p).
CONSTANT_RTOL = 1e-10
# |CKA| <= 1 by Cauchy-Schwarz; anything beyond rounding is a bug or corrupted input.
RANGE_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Kernels and HSIC estimators (pure jnp, any float dtype).


# Columns per Gram chunk: m * chunk float32 values (2 MB) stay in cache between centring and GEMM.
_CHUNK_ELEMENTS = 1 << 19
# Row blocks of the symmetric Gram (CPU): only the b(b+1)/2 blocks on and below the diagonal of
# the b x b block grid are computed, (b+1)/(2b) of the full GEMM's FLOPs. Measured on XLA:CPU
# (single-thread CPU time against the bare full GEMM, p = 8k-32k): blocks of 64 rows run at full
# GEMM speed (m = 256: 0.68-0.73x of the full GEMM, ideal 0.625x), smaller ones do not (32 rows:
# 0.72-0.77x); at m = 1,024 eight blocks of 128 and four of 256 both gave 0.57-0.69x.
_BLOCK_ROWS = 64
_MAX_BLOCKS = 8
GRAM_PRECISIONS = ("highest", "high", "default")
_PRECISION = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
              "default": jax.lax.Precision.DEFAULT}


def _precision(gram_precision: str) -> jax.lax.Precision:
  """The matmul precision of the Gram GEMMs; XLA:CPU computes float32 at full precision anyway,
  so there it is always HIGHEST (results identical whatever the option)."""
  if not isinstance(gram_precision, str) or gram_precision not in _PRECISION:
    close = difflib.get_close_matches(str(gram_precision), GRAM_PRECISIONS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"gram_precision must be one of {GRAM_PRECISIONS}, got "
                     f"{gram_precision!r}{hint}")
  return _HIGHEST if jax.default_backend() == "cpu" else _PRECISION[gram_precision]


def _block_bounds(m: int) -> list[int]:
  """Row bounds [0, ..., m] of b = clip(m // 64, 1, 8) near-equal blocks."""
  b = min(max(1, m // _BLOCK_ROWS), _MAX_BLOCKS)
  return [i * m // b for i in range(b + 1)]


def _centred_gram(x: jax.Array, precision: jax.lax.Precision) -> jax.Array:
  """C X X^T C of one layer x: [m, ...] -> [m, m] (see `gram_linear`); traceable, not jitted."""
  x = jnp.reshape(x, (x.shape[0], -1))
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if jax.default_backend() == "cpu" and dtype == jnp.float32 and cpu_gram.available():
    return cpu_gram.centred_grams(x.astype(dtype))  # SYRK, one triangle (cpu_gram.py)
  return _xla_centred_gram(x, precision)


def _xla_centred_gram(x: jax.Array, precision: jax.lax.Precision) -> jax.Array:
  """C X X^T C of x: [m, p] with XLA's GEMM (accelerators; CPU without the SYRK handler)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  n, p = x.shape
  cpu = jax.default_backend() == "cpu"
  # Without SYRK (float64, or no compiler): a Gram is symmetric, so on CPU only the blocks
  # (i, j), i >= j, of a b x b grid of row blocks are computed; the rest is their transpose.
  # GPU/TPU: one GEMM (see `centred_grams`).
  bounds = _block_bounds(n) if cpu else [0, n]
  pairs = [(i, j) for i in range(len(bounds) - 1) for j in range(i + 1)]

  def blocks(start, size):
    cols = jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    # Column means of this chunk only: the chunk is then still in cache for the centring and the
    # GEMM (one pass over the features instead of two).
    mean = jnp.dot(jnp.ones((n,), dtype), cols.astype(dtype), precision=_HIGHEST) / n
    xc = [cols[r0:r1].astype(dtype) - mean[None, :] for r0, r1 in itertools.pairwise(bounds)]
    # Contract the feature axes directly: under vmap, `xc @ xc.T` becomes a batched dot whose
    # transposed operand XLA:CPU copies (1.5x slower).
    return [jax.lax.dot_general(xc[i], xc[j], (((1,), (1,)), ((), ())), precision=precision)
            for i, j in pairs]

  # Chunking pays on CPU caches; GPU/TPU fuse the centring and prefer one large GEMM.
  chunk = max(128, _CHUNK_ELEMENTS // n) if cpu else p
  full, tail = divmod(p, chunk)
  if full <= 1:
    out = blocks(0, p)
  else:
    zeros = [jnp.zeros((bounds[i + 1] - bounds[i], bounds[j + 1] - bounds[j]), dtype)
             for i, j in pairs]
    out = jax.lax.fori_loop(
        0, full, lambda i, acc: [a + g for a, g in zip(acc, blocks(i * chunk, chunk))], zeros)
    if tail:
      out = [a + g for a, g in zip(out, blocks(full * chunk, tail))]
  if len(pairs) == 1:
    return out[0]
  lower = dict(zip(pairs, out))
  b = len(bounds) - 1
  return jnp.concatenate([
      jnp.concatenate([lower[i, j] if i >= j else lower[j, i].T for j in range(b)], axis=1)
      for i in range(b)], axis=0)


@functools.partial(jax.jit, static_argnames="gram_precision")
def gram_linear(x: jax.Array, *, gram_precision: str = "highest") -> jax.Array:
  """Linear Gram of column-centred features.

  Centring changes no HSIC estimator (they annihilate row/column offsets) but keeps large feature
  offsets (residual streams, post-ReLU maps) from cancelling catastrophically in float32.

  Where it is computed (docs/method.md#numerics-and-checks, benchmarks/cka_bench.py --peers):
  on CPU, float32 Grams are OpenBLAS's SYRK through an XLA custom call (`cpu_gram.py`): one
  triangle, half the FLOPs of a GEMM, the features centred per column chunk in cache with float64
  means, and XLA runs the layers' calls concurrently. GPU/TPU run one GEMM with the centring
  fused. Where the SYRK handler is unavailable (float64 features, no C++ compiler), XLA's GEMM
  is summed over column chunks of ~2 MB (per chunk the column means are a GEMV 1^T X / m and the
  centred copy is still in cache when the GEMM reads it; a separate `mean(x, 0)` is a strided
  reduction as slow as the GEMM), and only the row blocks on and below the diagonal are
  multiplied (b = clip(m // 64, 1, 8) blocks: (b+1)/(2b) of the FLOPs).

  Args:
    x: [n, ...] features (flattened per example); float16/bfloat16/int are computed in float32.
    gram_precision: matmul precision of the Gram on GPU/TPU: 'highest' (float32; six bf16 passes
      on TPU), 'high' (bf16x3 on TPU, TF32 on GPU) or 'default' (one bf16 pass on TPU). Ignored on
      CPU, which always computes float32 dots in full precision (identical results).

  Returns:
    [n, n] Gram C X X^T C, C = I - 11^T/n.
  """
  x = jnp.asarray(x)
  return _centred_gram(x, _precision(gram_precision))


def _ordered_sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis in a fixed pairwise order (halving with elementwise adds).

  XLA:CPU sums a reduction in an order that depends on the array's other axes (e.g. the batch
  axis of a vmap over minibatches) and may re-compute it inside fused consumers; elementwise adds
  are exact IEEE operations that XLA does not reorder. So a minibatch's terms are bitwise the same
  however many minibatches share a step. Pairwise summation is also accurate (error ~log2(n) eps).
  """
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    head = x[..., :half] + x[..., half:2 * half]
    x = jnp.concatenate([head, x[..., 2 * half:]], axis=-1) if x.shape[-1] % 2 else head
  return x[..., 0]


def u_centre(k: jax.Array) -> jax.Array:
  """U-centring (Szekely & Rizzo 2014) of k [n, n]: <U(K), U(L)> = n(n-3) HSIC_1(K, L) exactly."""
  n = k.shape[-1]
  off = ~jnp.eye(n, dtype=bool)
  k = jnp.where(off, k, 0)
  s = _ordered_sum(k)  # row sums = column sums of a symmetric Gram
  total = _ordered_sum(s)
  mean = s / (n - 2) - total / (2 * (n - 1) * (n - 2))
  return jnp.where(off, k - mean[:, None] - mean[None, :], 0)


def _check_grams(k: jax.Array, l: jax.Array, min_n: int) -> int:
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
    raise ValueError(f"Grams must be square and of equal shape, got {k.shape} and {l.shape}")
  if k.shape[0] < min_n:
    raise ValueError(f"HSIC needs n >= {min_n} examples, got Grams of shape {k.shape}")
  return k.shape[0]


@jax.jit
def hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Unbiased HSIC_1 (Song et al. 2012) via U-centring. k, l: [n, n] Grams, n >= 4. Can be < 0."""
  n = _check_grams(k, l, 4)
  return jnp.sum(u_centre(k) * u_centre(l)) / (n * (n - 3))


@jax.jit
def hsic_biased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Biased HSIC_0 = <CKC, CLC> / (n-1)^2 (Gretton et al. 2005). k, l: [n, n] Grams."""
  n = _check_grams(k, l, 2)
  return jnp.sum(double_centre(k) * double_centre(l)) / (n - 1) ** 2


def double_centre(g: jax.Array) -> jax.Array:
  """C G C. Needed even for a Gram of centred features: their float32 column means are off by
  rounding (a column shift, which C -- like U-centring -- removes)."""
  return g - jnp.mean(g, 0, keepdims=True) - jnp.mean(g, 1, keepdims=True) + jnp.mean(g)


@jax.jit
def _full_batch_terms(x, y):
  """Both estimators in one program (one compilation per shape): [2 (biased, unbiased), 3], [2]."""
  n = x.shape[0]
  kx, ky = gram_linear(x), gram_linear(y)
  cx, cy = double_centre(kx), double_centre(ky)
  ux, uy = u_centre(kx), u_centre(ky)
  dot = lambda a, b: jnp.sum(a * b)
  h = [jnp.stack([dot(cx, cy), dot(cx, cx), dot(cy, cy)]) / (n - 1) ** 2,
       jnp.stack([dot(ux, uy), dot(ux, ux), dot(uy, uy)]) / (n * (n - 3))]
  return jnp.stack(h), jnp.stack([jnp.trace(kx), jnp.trace(ky)])


def linear_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, *,
               debiased: bool = False) -> float:
  """Full-batch linear CKA (Kornblith et al. 2019) of two representations of the same n examples.

  Args:
    x: [n, ...] features; flattened per example.
    y: [n, ...] features of the same examples.
    debiased: False: biased HSIC_0 in all three terms (the classic estimator, in [0, 1]);
      True: unbiased HSIC_1 in all three (can be slightly negative). Both need n >= 4.

  Returns:
    CKA as a Python float.
  """
  _check_features([x], [y], stacked=False)
  x, y = _host_centred(x, 0), _host_centred(y, 0)
  n = np.shape(x)[0]
  h, t = jax.tree.map(lambda v: np.asarray(v, np.float64), _full_batch_terms(x, y))
  h = h[int(debiased)]
  scale = t ** 2 / (n * (n - 3) if debiased else (n - 1) ** 2)
  return float(check_ratio(h[0], h[1:2], h[2:3], scale[:1], scale[1:], ("x",), ("y",),
                      lower=-1.0 if debiased else 0.0)[0, 0])


# ---------------------------------------------------------------------------------------------
# Device half: per-minibatch HSIC terms of a global step.


class HSICTerms(NamedTuple):
  """Per-minibatch HSIC_1 values of one global step (k minibatches), as left on device.

  Leaves may carry extra leading axes (pmap); `accumulate` flattens everything before [A, B].
  """
  cross: jax.Array    # [k, A, B] HSIC_1(K_a, L_b)
  self_a: jax.Array   # [k, A]    HSIC_1(K_a, K_a) >= 0
  self_b: jax.Array   # [k, B]
  scale_a: jax.Array  # [k, A]    tr(K_a)^2 / (m(m-3)): yardstick for constant layers / overflow
  scale_b: jax.Array  # [k, B]
  count: jax.Array    # [k] examples per minibatch (m), 0 for masked-out minibatches


def centred_grams(feats: Features, *, gram_precision: str = "highest") -> jax.Array:
  """Column-centred linear Grams of one minibatch's layers; pure and jittable.

  The Grams that every Gram-based similarity measure of a minibatch starts from: call it inside
  your own jitted step and share the result (`terms_from_grams` turns it into HSIC terms).
  On CPU each Gram is one SYRK (one triangle; see `gram_linear`).

  Args:
    feats: A arrays [m, ...] of the same m examples (sequence, or dict in its own order);
      float16/bfloat16/int are computed in float32.
    gram_precision: 'highest' | 'high' | 'default' (see `gram_linear`; ignored on CPU).

  Returns:
    [A, m, m] float32 Grams C X_a X_a^T C, C = I - 11^T/m.
  """
  xs = _values(feats)
  _check_features(xs, None, stacked=False, min_m=1)
  return _centred_grams(xs, gram_precision)


@functools.partial(jax.jit, static_argnames="gram_precision")
def _centred_grams(xs, gram_precision):
  precision = _precision(gram_precision)
  return jnp.stack([_centred_gram(jnp.asarray(x), precision) for x in xs])


def terms_from_grams(grams_a: jax.Array, grams_b: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Unbiased HSIC_1 between all pairs of one minibatch's Grams; pure and jittable.

  With U(K) the U-centred Gram (zero diagonal), <U(K), U(L)> = m(m-3) HSIC_1(K, L) exactly, so
  all A x B cross terms are one contraction of the U-centred Grams. Row/column offsets of a Gram
  change nothing (U-centring removes them), so uncentred Grams give the same HSIC.

  Args:
    grams_a: [A, m, m] Grams of side a (e.g. from `centred_grams`), m >= 4.
    grams_b: [B, m, m] Grams of side b on the same examples, or None for intra-model (each Gram
      used once; side b is side a).

  Returns:
    (cross [A, B] HSIC_1(K_a, L_b), self_a [A] HSIC_1(K_a, K_a), self_b [B],
     scale_a [A] tr(K_a)^2 / (m(m-3)), scale_b [B]); intra-model: cross [A, A], self_b = self_a.
  """
  for name, g in (("grams_a", grams_a), ("grams_b", grams_b)):
    if g is not None and (jnp.ndim(g) != 3 or jnp.shape(g)[1] != jnp.shape(g)[2]):
      raise ValueError(f"{name} must be [layers, m, m], got shape {jnp.shape(g)}")
  if grams_b is not None and jnp.shape(grams_b)[1:] != jnp.shape(grams_a)[1:]:
    raise ValueError(f"grams_a and grams_b must have the same m: {jnp.shape(grams_a)} vs "
                     f"{jnp.shape(grams_b)}")
  if jnp.shape(grams_a)[1] < 4:
    raise ValueError(f"unbiased HSIC needs m >= 4 examples, got Grams {jnp.shape(grams_a)}")
  return _terms_from_grams(grams_a, grams_b)


@jax.jit
def _terms_from_grams(grams_a, grams_b):
  m = grams_a.shape[-1]
  norm = m * (m - 3)
  u = jax.vmap(u_centre)
  ua, ta = u(grams_a), _ordered_sum(jnp.diagonal(grams_a, axis1=1, axis2=2))
  if grams_b is None:  # intra-model: self terms are the diagonal of the cross matrix.
    cross = jnp.einsum("aij,bij->ab", ua, ua, precision=_HIGHEST) / norm
    self_a = self_b = jnp.diagonal(cross)
    tb = ta
  else:
    ub, tb = u(grams_b), _ordered_sum(jnp.diagonal(grams_b, axis1=1, axis2=2))
    cross = jnp.einsum("aij,bij->ab", ua, ub, precision=_HIGHEST) / norm
    self_a = jnp.einsum("aij,aij->a", ua, ua, precision=_HIGHEST) / norm
    self_b = jnp.einsum("aij,aij->a", ub, ub, precision=_HIGHEST) / norm
  return cross, self_a, self_b, ta * ta / norm, tb * tb / norm


def _one_minibatch(feats_a, feats_b, gram_precision):
  grams = (_centred_grams(feats_a, gram_precision),
           None if feats_b is None else _centred_grams(feats_b, gram_precision))
  return _terms_from_grams(*jax.lax.optimization_barrier(grams))


def minibatch_terms(feats_a: Features, feats_b: Features | None = None, *,
                    mask: jax.typing.ArrayLike | None = None,
                    gram_precision: str = "highest") -> HSICTerms:
  """Per-minibatch HSIC terms of one global step; pure, call it inside your own jit.

  Each minibatch's Grams and HSIC are computed whole where that minibatch lives (vmap over axis 0,
  so a mesh-sharded axis 0 stays sharded and needs no collectives; k = 1 skips the vmap). Only
  shapes are checked here (at trace time); NaN/Inf and constant layers are caught on the host by
  `accumulate`/`result` from these terms, so the check costs no pass over the activations.
  Per minibatch this is exactly `terms_from_grams(centred_grams(a), centred_grams(b))`.

  Args:
    feats_a: A arrays [k, m, ...] (sequence, or dict in the order of the state's names).
    feats_b: B arrays [k, m, ...] of the same examples, or None for intra-model CKA (each Gram
      computed once, cross matrix [A, A] symmetric).
    mask: optional [k]; minibatches with mask 0 (padding) are skipped by `accumulate`.
    gram_precision: 'highest' | 'high' | 'default': matmul precision of the Grams on GPU/TPU
      (see `gram_linear`); ignored on CPU (identical results).

  Returns:
    HSICTerms with leading axis k.
  """
  _precision(gram_precision)  # validate before tracing anything
  xs, ys = _values(feats_a), None if feats_b is None else _values(feats_b)
  k, m = _check_features(xs, ys, stacked=True)
  one = functools.partial(_one_minibatch, gram_precision=gram_precision)
  if k == 1:  # no batch dimension in the GEMMs
    out = one([x[0] for x in xs], None if ys is None else [y[0] for y in ys])
    cross, sa, sb, ca, cb = (v[None] for v in out)
  else:
    cross, sa, sb, ca, cb = jax.vmap(one)(xs, ys)
  count = jnp.full((k,), m, jnp.int32)
  if mask is not None:
    if jnp.shape(mask) != (k,):
      raise ValueError(f"mask must have shape ({k},), got {jnp.shape(mask)}")
    count = jnp.where(jnp.asarray(mask) > 0, count, 0)
  return HSICTerms(cross, sa, sb, ca, cb, count)


def _host_centred(x: Any, axis: int) -> Any:
  """float64 NumPy features: centred here in float64, then float32 (without x64 the device would
  round them to float32 *before* centring, losing a small signal on a large offset)."""
  if isinstance(x, np.ndarray) and x.dtype == np.float64 and not jax.config.jax_enable_x64:
    return (x - x.mean(axis, keepdims=True)).astype(np.float32)
  return x


def _values(feats: Features) -> list[jax.Array]:
  return list(feats.values()) if isinstance(feats, Mapping) else list(feats)


def _check_features(xs, ys, *, stacked: bool, min_m: int = 4) -> tuple[int, int]:
  """Static shape checks (also at trace time): returns (k, m)."""
  lead = 2 if stacked else 1
  what = "[k, m, ...]" if stacked else "[m, ...]"
  arrays = [("a", i, x) for i, x in enumerate(xs)] + [("b", i, y) for i, y in enumerate(ys or ())]
  if not xs or (ys is not None and not ys):
    raise ValueError("need at least one layer on each side")
  first = np.shape(arrays[0][2])[:lead]
  for side, i, x in arrays:
    shape, dtype = np.shape(x), jnp.result_type(x)
    if len(shape) < lead:
      raise ValueError(f"layer {side}[{i}] must be {what}, got shape {shape}")
    if shape[:lead] != first:
      raise ValueError(f"all layers must share the leading axes of {what} (same examples): layer "
                       f"{side}[{i}] has shape {shape}, layer {arrays[0][0]}[0] has "
                       f"{np.shape(arrays[0][2])}")
    if int(np.prod(shape[lead:], dtype=np.int64)) == 0 or 0 in shape[:lead]:
      raise ValueError(f"layer {side}[{i}] is empty: shape {shape}")
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(f"layer {side}[{i}] has unsupported dtype {dtype}")
  k, m = (first[0], first[1]) if stacked else (1, first[0])
  if m < min_m:
    raise ValueError(f"unbiased HSIC needs minibatches of m >= {min_m} examples, got m = {m}")
  return k, m


# ---------------------------------------------------------------------------------------------
# Host half: float64 accumulator state (clu Metric protocol: init = empty, merge, result).


_DATA_FIELDS = ("cross", "self_a", "self_b", "scale_a", "scale_b", "num_minibatches",
                "num_examples", "fingerprint")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_DATA_FIELDS),
                   meta_fields=["names_a", "names_b", "intra"])
@dataclasses.dataclass(frozen=True)
class CKAState:
  """The per-minibatch HSIC values h_ab = HSIC_1(K_ai, L_bi), h_aa, h_bb of every minibatch i.

  Kept per minibatch (k x (A B + A + B) float64 values, a few MB for hundreds of layers) so that
  `result` computes the exact leave-one-minibatch-out jackknife
  (docs/method.md#error-bars-jackknife-over-minibatches-spread-over-repeats). Rows from
  `num_minibatches` on are unused room: `init(..., capacity=k)` makes a state whose leaves keep
  their shapes over a repeat of k minibatches (a checkpoint template, `runtime/resume.py`); more
  minibatches grow the rows. float64 NumPy leaves, so orbax and `resume` save it as is.
  """
  cross: np.ndarray            # [c, A, B] h_ab of minibatch i in row i
  self_a: np.ndarray           # [c, A]    h_aa
  self_b: np.ndarray           # [c, B]    h_bb
  scale_a: np.ndarray          # [A]       sum tr(K_a)^2/(m(m-3)): yardstick for constant layers
  scale_b: np.ndarray          # [B]
  num_minibatches: np.ndarray  # []        int64, rows in use
  num_examples: np.ndarray     # []        int64
  fingerprint: np.ndarray      # []        int64 CRC of the layer names: catches restoring into the
                               #           wrong template (orbax saves arrays, not names)
  names_a: tuple[str, ...] | None = None
  names_b: tuple[str, ...] | None = None
  intra: bool = False

  @property
  def shape(self) -> tuple[int, int]:
    """(A, B): the layer grid."""
    return tuple(np.shape(self.cross)[1:])


@dataclasses.dataclass(frozen=True)
class CKAResult:
  """Minibatch CKA between every layer of side a (rows) and side b (columns)."""
  cka: np.ndarray          # [A, B] float64
  stderr: np.ndarray       # [A, B] float64 jackknife-over-minibatches standard error (NaN if k < 2)
  names_a: tuple[str, ...]
  names_b: tuple[str, ...]
  num_minibatches: int
  num_examples: int
  # [A, B] the largest |CKA_(-i) - CKA| over the minibatches i: how far leaving one minibatch
  # out moves the cell (one outlying minibatch can move CKA; docs/method.md#cka-pitfalls).
  max_leave_one_out: np.ndarray | None = None
  # [k, A, B] CKA_(-i), the grid without minibatch i: the jackknife of any function of the grid
  # (e.g. a contrast of cells) is exact from these (docs/method.md#error-bars-of-cka-statistics).
  leave_one_out: np.ndarray | None = None


def _fingerprint(names_a, names_b, intra, a, b) -> np.ndarray:
  return np.asarray(zlib.crc32(repr((names_a, names_b, intra, a, b)).encode()), np.int64)


def init(num_a: int | Sequence[str], num_b: int | Sequence[str] | None = None, *,
         capacity: int = 0) -> CKAState:
  """An empty state.

  Args:
    num_a: number of layers on side a, or their names (then dict features are matched by name).
      With a number, the first dict `update` adopts the dict's keys as names.
    num_b: the same for side b; None means intra-model CKA (side b is side a).
    capacity: rows reserved for per-minibatch values. A state restored from a checkpoint must
      have the template's shapes: give the number of minibatches of a repeat, and every state of
      that repeat has the same shapes. More minibatches are always accepted (the rows grow).
  """
  names_a = None if isinstance(num_a, (int, np.integer)) else tuple(map(str, num_a))
  a = len(names_a) if names_a is not None else int(num_a)
  intra = num_b is None
  if intra:
    names_b, b = names_a, a
  else:
    names_b = None if isinstance(num_b, (int, np.integer)) else tuple(map(str, num_b))
    b = len(names_b) if names_b is not None else int(num_b)
  if a < 1 or b < 1:
    raise ValueError(f"need at least one layer per side, got {a} and {b}")
  if capacity < 0:
    raise ValueError(f"capacity must be >= 0, got {capacity}")
  for names in (names_a, names_b):
    if names is not None and len(set(names)) != len(names):
      raise ValueError(f"layer names must be unique, got {names}")
  z = lambda *s: np.zeros(s, np.float64)
  c = int(capacity)
  return CKAState(z(c, a, b), z(c, a), z(c, b), z(a), z(b), np.asarray(0, np.int64),
                  np.asarray(0, np.int64), _fingerprint(names_a, names_b, intra, a, b), names_a,
                  names_b, intra)


def _check_fingerprint(state: CKAState) -> None:
  a, b = state.shape
  if int(state.fingerprint) != int(_fingerprint(state.names_a, state.names_b, state.intra, a, b)):
    raise ValueError(
        "CKA state does not match its layer names (restored into a template made with other "
        f"names? template names: {state.names_a}, {state.names_b}); restore into "
        "init(<the names used when saving>)")


def host(x: Any) -> np.ndarray:
  """A (possibly multi-process sharded) device array as a float64 host array.

  With several processes every process must call it (a sharded array is all-gathered).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x, np.float64)


def append_rows(rows: np.ndarray, used: int, new: np.ndarray, min_rows: int = 0) -> np.ndarray:
  """Per-minibatch rows: rows[:used] [c, ...] followed by new [n, ...], in a fresh float64 array
  of max(c, min_rows, used + n) rows (the room beyond is zero)."""
  out = np.zeros((max(len(rows), min_rows, used + len(new)),) + np.shape(rows)[1:], np.float64)
  out[:used], out[used:used + len(new)] = rows[:used], new
  return out


def accumulate(state: CKAState, terms: HSICTerms) -> CKAState:
  """Appends the per-minibatch terms of one step (from `minibatch_terms`) in float64.

  With several processes every process must call it (it gathers the tiny sharded terms).

  Raises:
    ValueError: non-finite terms (NaN/Inf in the features, or float32 overflow), naming the
      layers; shape mismatch with the state. Nothing is accumulated then.
  """
  _check_fingerprint(state)
  a, b = state.shape
  t = HSICTerms(*map(host, terms))
  if t.cross.shape[-2:] != (a, b) or t.self_a.shape[-1:] != (a,) or t.self_b.shape[-1:] != (b,):
    raise ValueError(f"terms for a {t.cross.shape[-2:]} layer grid, the state is [{a}, {b}]")
  valid = t.count.reshape(-1) > 0
  cross = t.cross.reshape(-1, a, b)[valid]
  sa, ca = t.self_a.reshape(-1, a)[valid], t.scale_a.reshape(-1, a)[valid]
  sb, cb = t.self_b.reshape(-1, b)[valid], t.scale_b.reshape(-1, b)[valid]
  bad_a = ~(np.isfinite(sa).all(0) & np.isfinite(ca).all(0) & np.isfinite(cross).all((0, 2)))
  bad_b = ~(np.isfinite(sb).all(0) & np.isfinite(cb).all(0) & np.isfinite(cross).all((0, 1)))
  if bad_a.any() or bad_b.any():
    na, nb = _names(state)
    raise ValueError(
        "non-finite HSIC (NaN/Inf in the features, or float32 overflow); nothing accumulated. "
        f"Layers a: {[na[i] for i in np.flatnonzero(bad_a)]}, "
        f"layers b: {[nb[i] for i in np.flatnonzero(bad_b)]}")
  k = int(state.num_minibatches)
  scale_a, scale_b = state.scale_a.copy(), state.scale_b.copy()
  for i in range(cross.shape[0]):  # in order: the same sums however the minibatches arrive
    scale_a += ca[i]
    scale_b += cb[i]
  return dataclasses.replace(
      state, cross=append_rows(state.cross, k, cross), self_a=append_rows(state.self_a, k, sa),
      self_b=append_rows(state.self_b, k, sb), scale_a=scale_a, scale_b=scale_b,
      num_minibatches=state.num_minibatches + int(valid.sum()),
      num_examples=state.num_examples + int(t.count.reshape(-1)[valid].sum()))


def merge(s1: CKAState, s2: CKAState) -> CKAState:
  """Combines two states of disjoint minibatches (devices, hosts, resumed runs).

  The per-minibatch rows of s2 follow those of s1, so merging is associative; and `result` reads
  the rows in a canonical order, so it is bit for bit the same in whatever order or grouping the
  minibatches were accumulated and merged.
  """
  _check_fingerprint(s1)
  _check_fingerprint(s2)
  if (s1.names_a, s1.names_b, s1.intra, s1.shape) != (s2.names_a, s2.names_b, s2.intra,
                                                      s2.shape):
    raise ValueError(f"cannot merge CKA states over different layers: {s1.names_a} x "
                     f"{s1.names_b} vs {s2.names_a} x {s2.names_b}")
  k1, k2 = int(s1.num_minibatches), int(s2.num_minibatches)
  rows = lambda f: append_rows(getattr(s1, f), k1, getattr(s2, f)[:k2], len(getattr(s2, f)))
  return dataclasses.replace(
      s1, cross=rows("cross"), self_a=rows("self_a"), self_b=rows("self_b"),
      scale_a=s1.scale_a + s2.scale_a, scale_b=s1.scale_b + s2.scale_b,
      num_minibatches=s1.num_minibatches + s2.num_minibatches,
      num_examples=s1.num_examples + s2.num_examples)


def _names(state: CKAState) -> tuple[tuple[str, ...], tuple[str, ...]]:
  a, b = state.shape
  return (state.names_a or tuple(map(str, range(a))), state.names_b or tuple(map(str, range(b))))


def check_ratio(cross, self_a, self_b, scale_a, scale_b, names_a, names_b, lower) -> np.ndarray:
  """cross / sqrt(self_a self_b) in float64, refusing constant layers, NaN and |CKA| > 1.

  Args:
    cross: [A, B] summed cross HSIC; self_a [A], self_b [B] summed self HSIC.
    scale_a, scale_b: [A], [B] yardsticks (tr(K)^2 / norm): a self-HSIC below `CONSTANT_RTOL`
      of it is a constant layer.
    names_a, names_b: layer names for the errors.
    lower: the estimator's lower bound (-1 unbiased, 0 biased).

  Returns:
    [A, B] float64 CKA clipped to [lower, 1] (after refusing anything beyond rounding).
  """
  self_a, self_b = np.asarray(self_a, np.float64), np.asarray(self_b, np.float64)
  for side, s, c, names in (("a", self_a, scale_a, names_a), ("b", self_b, scale_b, names_b)):
    bad = ~(np.isfinite(s) & np.isfinite(c))
    if bad.any():
      raise ValueError(f"non-finite HSIC on side {side} (NaN/Inf in the features, or float32 "
                       f"overflow): {[names[i] for i in np.flatnonzero(bad)]}")
  for side, s, c, names in (("a", self_a, scale_a, names_a), ("b", self_b, scale_b, names_b)):
    const = ~(s > CONSTANT_RTOL * np.asarray(c))
    if const.any():
      raise ValueError(f"constant layer(s) on side {side} (self-HSIC ~ 0, CKA undefined): "
                       f"{[names[i] for i in np.flatnonzero(const)]}")
  cka = np.reshape(cross, (self_a.size, self_b.size)) / np.sqrt(np.outer(self_a, self_b))
  bad = ~((cka >= lower - RANGE_ATOL) & (cka <= 1 + RANGE_ATOL))  # also catches NaN
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(f"CKA out of [{lower}, 1] (or NaN) at {bad.sum()} cell(s), e.g. "
                     f"({names_a[i]}, {names_b[j]}) = {cka[i, j]}")
  return np.clip(cka, lower, 1.0)


def canonical_sum(rows: np.ndarray) -> np.ndarray:
  """Sum over axis 0 in a canonical order (ascending values per entry): the float64 result then
  depends only on the set of rows, not on the order they were accumulated or merged in."""
  return np.sort(rows, axis=0).sum(0)


def jackknife_stderr(theta_loo: np.ndarray) -> np.ndarray:
  """Jackknife standard error from the k leave-one-out values theta_loo [k, ...].

  SE^2 = (k-1)/k * sum_i (theta_(-i) - mean)^2
  (docs/method.md#error-bars-jackknife-over-minibatches-spread-over-repeats), with the deviations
  taken from the mean (two passes, no raw second moments to cancel) in a canonical order; NaN when
  k < 2.
  """
  k = theta_loo.shape[0]
  if k < 2:
    return np.full(theta_loo.shape[1:], np.nan)
  theta = np.sort(theta_loo, axis=0)
  dev = theta - theta.mean(0, keepdims=True)
  return np.sqrt((k - 1) / k * (dev * dev).sum(0))


def per_minibatch(state: CKAState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The accumulated minibatches' values: cross [k, A, B] (symmetrised per minibatch for an
  intra-model state), self_a [k, A], self_b [k, B]."""
  _check_fingerprint(state)
  k = int(state.num_minibatches)
  cross = state.cross[:k]
  if state.intra:
    cross = (cross + np.swapaxes(cross, 1, 2)) / 2
  return cross, state.self_a[:k], state.self_b[:k]


def result(state: CKAState) -> CKAResult:
  """Divides once: CKA_ab = sum h_ab / sqrt(sum h_aa sum h_bb), plus its jackknife error.

  The error is the exact leave-one-minibatch-out jackknife: for every minibatch i the ratio of
  the sums without it, CKA_(-i) = (H_ab - h_abi) / sqrt((H_aa - h_aai)(H_bb - h_bbi)) with H the
  sums over all k minibatches, and SE = sqrt((k-1)/k sum_i (CKA_(-i) - mean_i CKA_(-i))^2).
  Every CKA_(-i) is a ratio of positive sums, computed without cancellation, so the error stays
  exact where CKA is near 1 and whatever the layers' scales; it is 0 only where every minibatch
  gives the same ratio (e.g. a layer against itself).

  Raises:
    ValueError: nothing accumulated, a constant layer (named), CKA NaN or outside [-1, 1].
  """
  cross, sa, sb = per_minibatch(state)
  k = cross.shape[0]
  if k == 0:
    raise ValueError("no minibatches accumulated")
  names_a, names_b = _names(state)
  total, ta, tb = canonical_sum(cross), canonical_sum(sa), canonical_sum(sb)
  cka = check_ratio(total, ta, tb, state.scale_a, state.scale_b, names_a, names_b, lower=-1.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    loo = (total[None] - cross) / np.sqrt((ta[None] - sa)[:, :, None] * (tb[None] - sb)[:, None])
  if k > 1:
    max_loo = np.abs(loo - cka[None]).max(0)
    if state.intra:
      np.fill_diagonal(max_loo, 0.0)
  else:
    max_loo = np.full_like(cka, np.nan)
  return CKAResult(cka, jackknife_stderr(loo), names_a, names_b, k, int(state.num_examples),
                   max_loo, loo)


# ---------------------------------------------------------------------------------------------
# Conveniences for features already in hand.


@functools.partial(jax.jit, static_argnames=("stacked", "gram_precision"))
def _update_terms(xs, ys, stacked, gram_precision="highest"):
  if not stacked:
    xs = [x[None] for x in xs]
    ys = None if ys is None else [y[None] for y in ys]
  return minibatch_terms(xs, ys, gram_precision=gram_precision)


def _ordered(feats: Features, names: tuple[str, ...] | None, n: int, side: str):
  """Feature list in state order, and the names to keep in the state."""
  if isinstance(feats, Mapping):
    keys = tuple(map(str, feats))
    if names is None:
      names = keys
    missing = [k for k in names if k not in feats]
    extra = [k for k in keys if k not in names]
    if missing or extra:
      raise KeyError(f"side {side}: layers {missing} missing, unexpected layers {extra}")
    xs = [feats[k] for k in names]
  else:
    xs = list(feats)
  if len(xs) != n:
    raise ValueError(f"side {side}: the state has {n} layers, got {len(xs)} feature arrays")
  return xs, names


def _dispatch(state: CKAState, feats_a: Features, feats_b: Features | None, stacked: bool,
              gram_precision: str) -> tuple[CKAState, HSICTerms]:
  """Validates at the edge, adopts dict names, and starts the device step (asynchronously)."""
  _precision(gram_precision)
  if state.intra != (feats_b is None):
    raise ValueError("an intra-model state (init(num_a)) takes feats_b=None; a cross-model state "
                     "(init(num_a, num_b)) needs feats_b")
  a, b = state.shape
  xs, names_a = _ordered(feats_a, state.names_a, a, "a")
  ys, names_b = (None, names_a) if state.intra else _ordered(feats_b, state.names_b, b, "b")
  if (names_a, names_b) != (state.names_a, state.names_b):  # adopt the first dict's names
    state = dataclasses.replace(state, names_a=names_a, names_b=names_b,
                                fingerprint=_fingerprint(names_a, names_b, state.intra, a, b))
  _check_features(xs, ys, stacked=stacked)
  xs = [_host_centred(x, int(stacked)) for x in xs]
  ys = None if ys is None else [_host_centred(y, int(stacked)) for y in ys]
  terms = _update_terms(xs, ys, stacked, gram_precision)
  for leaf in terms:  # a few kB: start the device-to-host copy now, not when accumulating
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
      leaf.copy_to_host_async()
  return state, terms


def update(state: CKAState, feats_a: Features, feats_b: Features | None = None, *,
           stacked: bool = False, gram_precision: str = "highest") -> CKAState:
  """Adds minibatches: `minibatch_terms` jitted on device, then `accumulate` in float64 on host.

  `update` itself is host code (it validates at the edge and sums in float64); the pure,
  jit/shard_map-compatible half is `minibatch_terms` -- use it with `accumulate` to keep the
  feature computation and the Grams in one jitted step. Several minibatches per call
  (`stacked=True`) are one device dispatch; `minibatch_cka` also overlaps the host sums of one
  call with the device work of the next.

  Args:
    state: from `init` (intra-model iff `init` got no `num_b`).
    feats_a: A arrays, a sequence or a dict by layer name; each `[m, ...]` (one minibatch) or,
      with `stacked=True`, `[k, m, ...]` (k minibatches, axis 0 may be sharded over a mesh).
    feats_b: B arrays of the same examples; None for an intra-model state.
    stacked: whether axis 0 is the minibatch axis. Shapes alone cannot tell `[k, m, p]` from
      `[m, h, w]`, hence the flag.
    gram_precision: 'highest' | 'high' | 'default': matmul precision of the Grams on GPU/TPU
      (see `gram_linear`); ignored on CPU (identical results).

  Raises:
    ValueError/KeyError: m < 4, different m or k across layers, empty layer, layer count or
      names not matching the state, NaN/Inf, unknown gram_precision; the state is then unchanged
      (a new one is returned).
  """
  state, terms = _dispatch(state, feats_a, feats_b, stacked, gram_precision)
  return accumulate(state, terms)


def result_from_terms(terms: Iterable[HSICTerms], *, names_a: Sequence[str] | None = None,
                      names_b: Sequence[str] | None = None,
                      valid: int | None = None) -> CKAResult:
  """`result` of the terms of several steps (e.g. one repeat); `valid`: expected minibatches."""
  state = None
  for t in terms:
    if state is None:
      a, b = np.shape(t.cross)[-2:]
      state = init(names_a or a, names_b or b)
    state = accumulate(state, t)
  if state is None:
    raise ValueError("no terms given")
  if valid is not None and int(state.num_minibatches) != valid:
    raise ValueError(f"expected {valid} valid minibatches, accumulated {state.num_minibatches}")
  return result(state)


def minibatch_cka(batches: Iterable[Any], *, stacked: bool = False,
                  gram_precision: str = "highest") -> np.ndarray:
  """Minibatch CKA matrix [A, B] (float64) over an iterable of `(feats_a, feats_b)` pairs.

  `feats_b` None is intra-model (the same for every pair); see `update` for the shapes and
  `gram_precision`. The same numbers as `update` pair by pair; the next pair's device step is
  started before the previous pair's terms are summed on the host, so the two overlap.
  """
  state, pending = None, None
  for fa, fb in batches:
    if state is None:
      na = len(fa)
      state = init(na) if fb is None else init(na, len(fb))
    state, terms = _dispatch(state, fa, fb, stacked, gram_precision)
    if pending is not None:
      state = accumulate(state, pending)
    pending = terms
  if state is None:
    raise ValueError("no minibatches given")
  return result(accumulate(state, pending)).cka


def null_bias_check(m: int, width_a: int, width_b: int, *, num_minibatches: int = 8,
                    seed: int = 0, max_width: int = 4096) -> tuple[float, float]:
  """This estimator on independent random features: (CKA, its jackknife standard error).

  Independent representations have population CKA 0. The unbiased minibatch estimator should
  give 0 within its error at the run's minibatch size and widths, where the biased one is pulled
  towards 1 as the width grows past m (docs/method.md#cka-pitfalls). Widths above `max_width`
  are capped: the estimator's bias is already visible far below, and the check stays cheap.

  Args:
    m: minibatch size; width_a, width_b: feature widths of the two sides.
    num_minibatches: k minibatches of independent standard-normal features [k, m, width].
  """
  rng = np.random.default_rng(seed)
  wa, wb = min(int(width_a), max_width), min(int(width_b), max_width)
  x = rng.standard_normal((num_minibatches, m, wa), dtype=np.float32)
  y = rng.standard_normal((num_minibatches, m, wb), dtype=np.float32)
  res = result(update(init(1, 1), [x], [y], stacked=True))
  return float(res.cka[0, 0]), float(res.stderr[0, 0])
