"""vit_analysis.similarity.cka against float64 NumPy references written from the equations (docs/method.md#minibatch-cka)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ref_hsic_unbiased

from vit_analysis.similarity import cka

TOL = 1e-6
MAX_DEV = {}  # adversarial case -> max |ours - reference|, printed at the end (pytest -s)


# ------------------------------------------------------------------------------------------------
# Float64 references, straight from the equations. Features are centred in float64 first: C X X^T C
# = (CX)(CX)^T is an identity, and it keeps the reference itself exact when offsets are 1e4.


def ref_gram(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  x = x - x.mean(0)
  return x @ x.T


def ref_hsic_biased(k, l):
  n = len(k)
  c = np.eye(n) - np.ones((n, n)) / n  # centring matrix
  return np.trace(c @ k @ c @ c @ l @ c) / (n - 1) ** 2


def ref_cka(x, y, debiased=False):
  k, l = ref_gram(x), ref_gram(y)
  h = ref_hsic_unbiased if debiased else ref_hsic_biased
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def ref_minibatch_cka(xs, ys):
  """xs, ys: lists over minibatches. Sums of unbiased HSIC, divided once (docs/method.md#the-minibatch-estimator)."""
  hs = np.array([[ref_hsic_unbiased(ref_gram(x), ref_gram(y)),
                  ref_hsic_unbiased(ref_gram(x), ref_gram(x)),
                  ref_hsic_unbiased(ref_gram(y), ref_gram(y))] for x, y in zip(xs, ys)])
  s = hs.sum(0)
  return s[0] / np.sqrt(s[1] * s[2]), hs


def kornblith_demo():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  return x, y


# ------------------------------------------------------------------------------------------------
# Estimators and known values.


def test_kornblith_demo_values():
  x, y = kornblith_demo()
  np.testing.assert_allclose(x[0, :3], [-0.70319, -0.49028, -0.32181], atol=1e-5)
  assert abs(cka.linear_cka(x, y) - 0.55761) < 5e-6
  assert abs(cka.linear_cka(x, y, debiased=True) - 0.51346) < 5e-6
  assert abs(cka.linear_cka(x, y) - ref_cka(x, y)) < TOL
  assert abs(cka.linear_cka(x, y, debiased=True) - ref_cka(x, y, True)) < TOL
  for k, expected in ((4, 0.51327), (2, 0.53084), (1, 0.51346)):
    pairs = [([a], [b]) for a, b in zip(np.split(x, k), np.split(y, k))]
    got = cka.minibatch_cka(pairs)
    assert got.shape == (1, 1) and got.dtype == np.float64
    assert abs(got[0, 0] - expected) < 5e-6, (k, got)
    assert abs(got[0, 0] - ref_minibatch_cka(np.split(x, k), np.split(y, k))[0]) < TOL
  # One minibatch of everything is debiased full-batch CKA.
  assert abs(cka.minibatch_cka([([x], [y])])[0, 0] - cka.linear_cka(x, y, debiased=True)) < TOL


def test_hsic_functions_match_reference_and_u_centring_identity():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(30, 7)), rng.normal(size=(30, 5))
  k, l = ref_gram(x), ref_gram(y)
  with jax.enable_x64(True):
    kj, lj = jnp.asarray(k), jnp.asarray(l)
    assert abs(float(cka.hsic_unbiased(kj, lj)) - ref_hsic_unbiased(k, l)) < 1e-12
    assert abs(float(cka.hsic_biased(kj, lj)) - ref_hsic_biased(k, l)) < 1e-12
    # Neither estimator sees row/column offsets, so the uncentred Gram gives the same values.
    raw = jnp.asarray(x @ x.T)
    assert abs(float(cka.hsic_unbiased(raw, lj)) - ref_hsic_unbiased(k, l)) < 1e-12
    # U-centring identity: <U(K), U(L)> = n(n-3) HSIC_1(K, L).
    u = float(jax.jit(lambda a, b: jnp.sum(cka.u_centre(a) * cka.u_centre(b)))(kj, lj))
    assert abs(u - 30 * 27 * ref_hsic_unbiased(k, l)) < 1e-9 * abs(u)
  g = np.asarray(cka.gram_linear(x.astype(np.float32)), np.float64)  # float32 path
  np.testing.assert_allclose(g, k, rtol=0, atol=1e-5 * np.abs(k).max())
  with pytest.raises(ValueError, match="n >= 4"):
    cka.hsic_unbiased(jnp.eye(3), jnp.eye(3))
  with pytest.raises(ValueError, match="square"):
    cka.hsic_biased(jnp.eye(3), jnp.eye(4))


def _adversarial(case, rng, n=64):
  p = 96
  z = rng.normal(size=(n, 8))
  x = z @ rng.normal(size=(8, p)) + 0.5 * rng.normal(size=(n, p))
  y = np.tanh(z @ rng.normal(size=(8, p))) + 0.5 * rng.normal(size=(n, p))
  if case == "offset_1e4":  # residual streams / post-ReLU: far from centred
    x, y = x + rng.uniform(-1e4, 1e4, size=p), np.abs(y) + 1e4
  elif case == "scale_1e-3_1e3":
    x, y = 1e-3 * x, 1e3 * y
  elif case == "low_rank":
    x = rng.normal(size=(n, 2)) @ rng.normal(size=(2, p)) + 3e3
    y = np.repeat((x[:, :6] - 3e3) ** 2, p // 6, axis=1)
  elif case == "float16_vs_bfloat16":
    x, y = (x + 50).astype(np.float16), (y * 7 + 100).astype(ml_dtypes.bfloat16)
  elif case == "width_64_vs_65536":
    x = rng.normal(size=(n, 64))
    y = np.repeat(x, 1024, axis=1) * rng.uniform(0.5, 2, 65536) + rng.normal(size=(n, 65536))
  if x.dtype == np.float64:
    x, y = x.astype(np.float32), y.astype(np.float32)
  return x, y  # the reference sees exactly these (quantised) values


@pytest.mark.parametrize("case", ["random", "offset_1e4", "scale_1e-3_1e3", "low_rank",
                                  "float16_vs_bfloat16", "width_64_vs_65536"])
def test_adversarial_features_match_float64_reference(case):
  x, y = _adversarial(case, np.random.default_rng(1))
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  devs = [abs(cka.linear_cka(x, y) - ref_cka(x64, y64)),
          abs(cka.linear_cka(x, y, debiased=True) - ref_cka(x64, y64, True))]
  x2 = x * 3 + 1  # a second layer, quantised in its own dtype
  state = cka.update(cka.init(2, 1), [x.reshape(4, 16, -1), x2.reshape(4, 16, -1)],
                     [y.reshape(4, 16, -1)], stacked=True)
  ys = np.split(y64, 4)
  ref = [ref_minibatch_cka(np.split(a.astype(np.float64), 4), ys)[0] for a in (x, x2)]
  devs += list(np.abs(cka.result(state).cka[:, 0] - ref))
  MAX_DEV[case] = max(devs)
  print(f"\nmax |CKA - float64 reference| for {case}: {max(devs):.2e}")
  assert max(devs) <= TOL, devs


# ------------------------------------------------------------------------------------------------
# Symmetric block Grams (m >= 128: 2-8 row blocks, only those on and below the diagonal computed).


@pytest.mark.parametrize("case,n", [(c, 200) for c in (
    "random", "offset_1e4", "scale_1e-3_1e3", "low_rank", "float16_vs_bfloat16",
    "width_64_vs_65536")] + [("offset_1e4", 520), ("random", 131)])
def test_centred_grams_blocks_match_float64_reference(case, n):
  """200 rows: 3 uneven blocks (66, 67, 67); 520: 8 blocks; 131: 2. The widest layer also runs
  the chunk loop (65,536 = 40 chunks of 1,638 columns at m = 200, plus a tail)."""
  x, y = _adversarial(case, np.random.default_rng(5), n=n)
  assert cka._block_bounds(n)[1:-1], "these shapes must exercise the block path"
  grams = np.asarray(cka.centred_grams([x, y]), np.float64)
  assert grams.shape == (2, n, n) and grams.dtype == np.float64
  # float32 column means are off by rounding: a column shift, which C (like every HSIC
  # estimator) removes, so the float32 Gram is compared after C . C.
  c = np.eye(n) - 1 / n
  for g, v in zip(grams, (x, y)):
    ref = ref_gram(v)
    np.testing.assert_allclose(c @ g @ c, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(g, g.T)  # blocks above the diagonal are the transposes
  # HSIC terms of these Grams against float64: CKA within 1e-6 (one minibatch).
  cross, sa, sb = (np.asarray(v, np.float64) for v in
                   cka.terms_from_grams(grams[:1], grams[1:])[:3])
  k, l = ref_gram(x), ref_gram(y)
  ref = ref_hsic_unbiased(k, l) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l, l))
  dev = abs(cross[0, 0] / np.sqrt(sa[0] * sb[0]) - ref)
  MAX_DEV[f"{case}, blocks, m={n}"] = dev
  print(f"\nmax |CKA - float64 reference| for {case}, {n} rows in blocks: {dev:.2e}")
  assert dev <= TOL, dev


def test_terms_from_grams_against_float64_and_composition():
  rng = np.random.default_rng(6)
  m = 24
  xs = [rng.normal(size=(m, p)) + 5 for p in (7, 30)]
  ys = [np.tanh(xs[0] @ rng.normal(size=(7, 9))) + 0.3 * rng.normal(size=(m, 9))]
  ka, kb = [ref_gram(x) for x in xs], [ref_gram(y) for y in ys]
  with jax.enable_x64(True):  # the maths alone, in float64: agreement to 1e-12
    cross, sa, sb, ca, cb = (np.asarray(v) for v in cka.terms_from_grams(
        jnp.asarray(np.stack(ka)), jnp.asarray(np.stack(kb))))
    # Uncentred Grams: the same HSIC (U-centring removes row/column offsets).
    raw = cka.terms_from_grams(jnp.asarray(np.stack([x @ x.T for x in xs])),
                               jnp.asarray(np.stack(kb)))
    intra = cka.terms_from_grams(jnp.asarray(np.stack(ka)))
  np.testing.assert_allclose(
      cross, [[ref_hsic_unbiased(k, l) for l in kb] for k in ka], rtol=1e-12, atol=0)
  np.testing.assert_allclose(sa, [ref_hsic_unbiased(k, k) for k in ka], rtol=1e-12)
  np.testing.assert_allclose(sb, [ref_hsic_unbiased(l, l) for l in kb], rtol=1e-12)
  np.testing.assert_allclose(ca, [np.trace(k) ** 2 / (m * (m - 3)) for k in ka], rtol=1e-12)
  np.testing.assert_allclose(cb, [np.trace(l) ** 2 / (m * (m - 3)) for l in kb], rtol=1e-12)
  np.testing.assert_allclose(np.asarray(raw[0]), cross, rtol=1e-9)
  np.testing.assert_allclose(np.asarray(intra[0]), [[ref_hsic_unbiased(k, l) for l in ka]
                                                    for k in ka], rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(intra[1]), np.asarray(intra[2]))
  # minibatch_terms is exactly the two public halves composed, vmapped over minibatches.
  a0, a1, b0 = _layers(0)
  terms = jax.jit(lambda fa, fb: cka.minibatch_terms(fa, fb))([a0, a1], [b0])
  composed = jax.jit(jax.vmap(lambda fa, fb: cka.terms_from_grams(
      cka.centred_grams(fa), cka.centred_grams(fb))))([a0, a1], [b0])
  for got, want in zip(terms[:5], composed):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Bad input is named.
  with pytest.raises(ValueError, match=r"grams_a must be \[layers, m, m\]"):
    cka.terms_from_grams(jnp.zeros((2, 5, 6)))
  with pytest.raises(ValueError, match="same m"):
    cka.terms_from_grams(jnp.zeros((2, 5, 5)), jnp.zeros((1, 6, 6)))
  with pytest.raises(ValueError, match="m >= 4"):
    cka.terms_from_grams(jnp.zeros((2, 3, 3)))
  with pytest.raises(ValueError, match="same examples"):
    cka.centred_grams([a0[0], a1[0, :5]])


# ------------------------------------------------------------------------------------------------
# Properties (docs/method.md#reference-values).


def test_invariances():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(48, 12)), rng.normal(size=(48, 9)) + 0.3 * rng.normal(size=(48, 1))
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  a = rng.normal(size=(12, 12))
  # One dtype and shape for every call: one compilation.
  x, y, q, a = (v.astype(np.float32) for v in (x, y, q, a))
  for debiased in (False, True):
    base = cka.linear_cka(x, y, debiased=debiased)
    assert abs(cka.linear_cka(x, x, debiased=debiased) - 1) < TOL
    assert abs(cka.linear_cka(1.337 * x, y, debiased=debiased) - base) < TOL
    assert abs(cka.linear_cka(x @ q, y, debiased=debiased) - base) < TOL
    assert abs(cka.linear_cka(x + 5.0, y, debiased=debiased) - base) < TOL
    assert abs(cka.linear_cka(x @ a, y, debiased=debiased) - base) > 1e-3
  # float64 NumPy input: a 1e-3 signal on a 1e6 offset, below float32 resolution of the raw values.
  x64 = 1e6 + 1e-3 * x.astype(np.float64)
  assert abs(cka.linear_cka(x64, y, debiased=True) - ref_cka(x64, y, True)) < TOL


# ------------------------------------------------------------------------------------------------
# The accumulator. One feature layout for every test below keeps compilations few.

K, M = 6, 8


def _layers(seed, k=K):
  """Side a: two layers [k, m, 6] and [k, m, 3, 4]; side b: one layer [k, m, 5]."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(k, M, 3))
  a0 = z @ rng.normal(size=(3, 6)) + rng.normal(size=(k, M, 6)) + 10.0
  a1 = (np.tanh(z @ rng.normal(size=(3, 12))) + 0.3 * rng.normal(size=(k, M, 12)))
  b0 = z[..., :2] @ rng.normal(size=(2, 5)) + rng.normal(size=(k, M, 5))
  a1 = a1.reshape(k, M, 3, 4)
  return [v.astype(np.float32) for v in (a0, a1, b0)]


def _ref_cells(feats_a, feats_b):
  """Reference minibatch CKA [A, B] and per-minibatch HSIC [k, A, B, 3] of stacked features."""
  cells = [[ref_minibatch_cka(list(x.astype(np.float64)), list(y.astype(np.float64)))
            for y in feats_b] for x in feats_a]
  return (np.array([[c[0] for c in row] for row in cells]),
          np.array([[c[1] for c in row] for row in cells]).transpose(2, 0, 1, 3))


def test_accumulator_dicts_stacked_intra_against_reference():
  a0, a1, b0 = _layers(0)
  ref, _ = _ref_cells([a0, a1], [b0])
  # One minibatch at a time, dict keys in another order than the state's names.
  state = cka.init(["a0", "a1"], ["b0"])
  for i in range(K):
    state = cka.update(state, {"a1": a1[i], "a0": a0[i]}, {"b0": b0[i]})
  res = cka.result(state)
  assert (res.names_a, res.names_b) == (("a0", "a1"), ("b0",))
  assert (res.num_minibatches, res.num_examples) == (K, K * M)
  np.testing.assert_allclose(res.cka, ref, rtol=0, atol=TOL)
  # A stacked global step [k, m, ...] gives the same.
  stacked = cka.result(cka.update(cka.init(2, 1), [a0, a1], [b0], stacked=True))
  np.testing.assert_allclose(stacked.cka, ref, rtol=0, atol=TOL)
  # Intra-model: symmetric, unit diagonal, off-diagonal = reference(a0, a1).
  intra = cka.result(cka.update(cka.init(["a0", "a1"]), [a0, a1], stacked=True))
  ref_intra, _ = _ref_cells([a0], [a1])
  assert intra.cka.shape == (2, 2) and intra.names_b == ("a0", "a1")
  np.testing.assert_allclose(np.diag(intra.cka), 1.0, rtol=0, atol=TOL)
  assert intra.cka[0, 1] == intra.cka[1, 0]
  assert abs(intra.cka[0, 1] - ref_intra[0, 0]) < TOL
  # A state made with a count adopts the names of the first dict.
  named = cka.update(cka.init(2, 1), {"x": a0[0], "y": a1[0]}, {"z": b0[0]})
  assert (cka.result(named).names_a, cka.result(named).names_b) == (("x", "y"), ("z",))


def test_terms_in_user_jit_mask_and_merge():
  a0, a1, b0 = _layers(0)
  step = jax.jit(lambda fa, fb, mask: cka.minibatch_terms(fa, fb, mask=mask))
  mask = np.array([1, 1, 1, 0, 0, 0], np.float32)
  terms = step([a0, a1], [b0], mask)
  assert terms.cross.shape == (K, 2, 1) and terms.self_a.shape == (K, 2)
  first3 = cka.update(cka.init(2, 1), [a0[:3], a1[:3]], [b0[:3]], stacked=True)
  masked = cka.accumulate(cka.init(2, 1), terms)
  assert int(masked.num_minibatches) == 3 and int(masked.num_examples) == 3 * M
  np.testing.assert_allclose(cka.result(masked).cka, cka.result(first3).cka, rtol=0, atol=1e-12)
  # merge is associative and equals one pass.
  full = cka.accumulate(cka.init(2, 1), step([a0, a1], [b0], np.ones(K, np.float32)))
  parts = [cka.accumulate(cka.init(2, 1), step([a0, a1], [b0], (np.arange(K) // 2 == j) * 1.0))
           for j in range(3)]
  left = cka.merge(cka.merge(parts[0], parts[1]), parts[2])
  right = cka.merge(parts[0], cka.merge(parts[1], parts[2]))
  for f in cka._DATA_FIELDS:
    np.testing.assert_allclose(getattr(left, f), getattr(full, f), rtol=1e-12, atol=0)
    np.testing.assert_allclose(getattr(right, f), getattr(full, f), rtol=1e-12, atol=0)
  # result_from_terms: the similarity analysis' entry point.
  got = cka.result_from_terms([terms, terms], names_a=["a0", "a1"], names_b=["b0"], valid=6)
  np.testing.assert_allclose(got.cka, cka.result(first3).cka, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="expected 5 valid"):
    cka.result_from_terms([terms, terms], valid=5)
  with pytest.raises(ValueError, match="different layers"):
    cka.merge(full, cka.init(2))


def test_identical_results_through_every_path():
  """update per minibatch == stacked == minibatch_cka (both layouts) == result_from_terms of the
  user's jit, bit for bit, with m = 128 (two row blocks per Gram). Sharded: test_cka_sharded."""
  rng = np.random.default_rng(7)
  k, m = 3, 128
  z = rng.normal(size=(k, m, 4))
  a = [(z @ rng.normal(size=(4, 40)) + 1e3).astype(np.float32),
       np.tanh(z @ rng.normal(size=(4, 6))).reshape(k, m, 2, 3).astype(np.float32)]
  b = [(z[..., :2] @ rng.normal(size=(2, 30)) + rng.normal(size=(k, m, 30))).astype(np.float32)]
  per = cka.init(2, 1)
  for i in range(k):
    per = cka.update(per, [x[i] for x in a], [y[i] for y in b])
  stacked = cka.update(cka.init(2, 1), a, b, stacked=True)
  step = jax.jit(lambda fa, fb: cka.minibatch_terms(fa, fb))
  from_terms = cka.result_from_terms([step(a, b)])
  per_step = cka.result_from_terms([step([x[i:i + 1] for x in a], [y[i:i + 1] for y in b])
                                    for i in range(k)])
  for other in (cka.result(stacked), from_terms, per_step):
    np.testing.assert_array_equal(other.cka, cka.result(per).cka)
    np.testing.assert_array_equal(other.stderr, cka.result(per).stderr)
  for f in cka._DATA_FIELDS:
    np.testing.assert_array_equal(getattr(stacked, f), getattr(per, f))
  pairs = [([x[i] for x in a], [y[i] for y in b]) for i in range(k)]
  np.testing.assert_array_equal(cka.minibatch_cka(pairs), cka.result(per).cka)
  np.testing.assert_array_equal(cka.minibatch_cka([(a, b)], stacked=True), cka.result(per).cka)
  ref, _ = _ref_cells(a, b)
  np.testing.assert_allclose(cka.result(per).cka, ref, rtol=0, atol=TOL)
  # Intra-model through the same paths.
  feats = a + b
  intra = cka.init(3)
  for i in range(k):
    intra = cka.update(intra, [x[i] for x in feats])
  np.testing.assert_array_equal(cka.result(cka.update(cka.init(3), feats, stacked=True)).cka,
                                cka.result(intra).cka)
  np.testing.assert_array_equal(cka.minibatch_cka([([x[i] for x in feats], None)
                                                   for i in range(k)]), cka.result(intra).cka)


def test_gram_precision_accepted_validated_and_ignored_on_cpu():
  a0, a1, b0 = _layers(0)
  assert jax.default_backend() == "cpu"
  base = cka.update(cka.init(2, 1), [a0, a1], [b0], stacked=True)
  pairs = [([a0[i], a1[i]], [b0[i]]) for i in range(K)]
  for precision in cka.GRAM_PRECISIONS:
    got = cka.update(cka.init(2, 1), [a0, a1], [b0], stacked=True, gram_precision=precision)
    for f in cka._DATA_FIELDS:
      np.testing.assert_array_equal(getattr(got, f), getattr(base, f))
    np.testing.assert_array_equal(cka.minibatch_cka(pairs, gram_precision=precision),
                                  cka.result(base).cka)
    terms = jax.jit(lambda fa, fb, p=precision: cka.minibatch_terms(fa, fb, gram_precision=p))(
        [a0, a1], [b0])
    np.testing.assert_array_equal(np.asarray(terms.cross), np.asarray(
        cka.minibatch_terms([a0, a1], [b0]).cross))
    np.testing.assert_array_equal(np.asarray(cka.gram_linear(a0[0], gram_precision=precision)),
                                  np.asarray(cka.gram_linear(a0[0])))
    np.testing.assert_array_equal(
        np.asarray(cka.centred_grams([a0[0]], gram_precision=precision)),
        np.asarray(cka.centred_grams([a0[0]])))
  calls = [lambda p: cka.update(cka.init(2, 1), [a0, a1], [b0], stacked=True, gram_precision=p),
           lambda p: cka.minibatch_cka(pairs, gram_precision=p),
           lambda p: cka.minibatch_terms([a0, a1], [b0], gram_precision=p),
           lambda p: cka.gram_linear(a0[0], gram_precision=p),
           lambda p: cka.centred_grams([a0[0]], gram_precision=p)]
  for call in calls:
    with pytest.raises(ValueError, match="did you mean 'highest'"):
      call("hihgest")
    with pytest.raises(ValueError, match="gram_precision must be one of"):
      call(jax.lax.Precision.HIGH)


def test_200_minibatches_and_jackknife():
  k = 200
  a0, a1, b0 = _layers(3, k=k)
  ref, hs = _ref_cells([a0, a1], [b0])
  # A third layer on side a is 2 * b0: CKA 1 and (up to rounding) zero error.
  state = cka.update(cka.init(3, 1), [a0, a1, 2 * b0], [b0], stacked=True)
  # The state keeps k rows of per-minibatch values (not the examples); a template made with
  # capacity=k has the shapes of every state of the repeat (checkpoints restore into it).
  assert [np.shape(v) for v in jax.tree.leaves(state)] == [
      np.shape(v) for v in jax.tree.leaves(cka.init(3, 1, capacity=k))]
  assert np.shape(state.cross) == (k, 3, 1)
  res = cka.result(state)
  assert abs(res.cka[2, 0] - 1) < TOL and res.stderr[2, 0] < 1e-5
  res = dataclasses.replace(res, cka=res.cka[:2], stderr=res.stderr[:2])
  np.testing.assert_allclose(res.cka, ref, rtol=0, atol=TOL)
  # Exact leave-one-minibatch-out jackknife from the float64 reference terms.
  loo = hs.sum(0, keepdims=True) - hs  # [k, A, B, 3]
  theta = loo[..., 0] / np.sqrt(loo[..., 1] * loo[..., 2])
  se = np.sqrt((k - 1) / k * ((theta - theta.mean(0)) ** 2).sum(0))
  np.testing.assert_allclose(res.stderr, se, rtol=0.02)
  assert (res.stderr > 0).all()


def test_bad_input_raises_and_accumulates_nothing():
  a0, a1, b0 = _layers(0)
  state = cka.update(cka.init(["a0", "a1"], ["b0"]), [a0[0], a1[0]], [b0[0]])
  before = cka.result(state)
  bad_nan, bad_inf = a0[0].copy(), a1[0].copy()
  bad_nan[2, 3] = np.nan
  bad_inf[1, 0, 0] = np.inf
  cases = [
      (ValueError, "m >= 4", [a0[0, :3], a1[0, :3]], [b0[0, :3]]),
      (ValueError, "same examples", [a0[0], a1[0, :7]], [b0[0]]),
      (ValueError, "empty", [a0[0], np.zeros((M, 0), np.float32)], [b0[0]]),
      (ValueError, r"non-finite.*\['a0'\]", [bad_nan, a1[0]], [b0[0]]),
      (ValueError, r"non-finite.*\['a1'\]", [a0[0], bad_inf], [b0[0]]),
      (ValueError, "2 layers, got 1", [a0[0]], [b0[0]]),
      (KeyError, "missing", {"a0": a0[0], "zz": a1[0]}, [b0[0]]),
      (ValueError, "intra-model", [a0[0], a1[0]], None),
  ]
  for err, msg, fa, fb in cases:
    with pytest.raises(err, match=msg):
      cka.update(state, fa, fb)
  after = cka.result(state)  # the state is untouched
  np.testing.assert_array_equal(after.cka, before.cka)
  assert after.num_minibatches == 1
  # A constant layer (also one whose float32 mean rounds) is named instead of dividing by zero.
  for value in (3.0, 0.1, 1e4 + 0.3):
    flat = np.full((M, 3, 4), value, np.float32)  # a1's shape: the compiled step is reused
    const = cka.update(cka.init(["ok", "flat"], ["b0"]), [a0[0], flat], [b0[0]])
    with pytest.raises(ValueError, match=r"constant.*\['flat'\]"):
      cka.result(const)
  with pytest.raises(ValueError, match="constant"):
    cka.linear_cka(np.ones((M, 6), np.float32), b0[0])
  with pytest.raises(ValueError, match="NaN|non-finite"):
    cka.linear_cka(bad_nan, b0[0])
  with pytest.raises(ValueError, match="no minibatches"):
    cka.result(cka.init(1, 1))
  # A corrupted state never yields CKA outside [-1, 1] silently.
  broken = dataclasses.replace(state, cross=state.cross * 3)
  with pytest.raises(ValueError, match=r"out of \[-1.0, 1\]"):
    cka.result(broken)


def test_resume_with_orbax_equals_one_pass(tmp_path):
  a0, a1, b0 = _layers(0)
  one_pass = cka.update(cka.init(["a0", "a1"], ["b0"]), [a0, a1], [b0], stacked=True)
  half = cka.update(cka.init(["a0", "a1"], ["b0"]), [a0[:3], a1[:3]], [b0[:3]], stacked=True)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.StandardSave(half))
  mngr.wait_until_finished()
  restored = mngr.restore(3, args=ocp.args.StandardRestore(cka.init(["a0", "a1"], ["b0"])))
  resumed = cka.update(restored, [a0[3:], a1[3:]], [b0[3:]], stacked=True)
  for f in cka._DATA_FIELDS:
    np.testing.assert_allclose(getattr(resumed, f), getattr(one_pass, f), rtol=1e-12, atol=0)
  assert cka.result(resumed).num_minibatches == K
  wrong = mngr.restore(3, args=ocp.args.StandardRestore(cka.init(["a0", "zz"], ["b0"])))
  with pytest.raises(ValueError, match="does not match its layer names"):
    cka.result(wrong)
