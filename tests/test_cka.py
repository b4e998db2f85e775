"""vit_analysis.cka against float64 NumPy references written from the equations (paper.md §1)."""
import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vit_analysis import cka

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


def ref_hsic_unbiased(k, l):
  """Song et al. (2012) eq. (5), with zeroed diagonals."""
  n = len(k)
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def ref_cka(x, y, debiased=False):
  k, l = ref_gram(x), ref_gram(y)
  h = ref_hsic_unbiased if debiased else ref_hsic_biased
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def ref_minibatch_cka(xs, ys):
  """xs, ys: lists over minibatches. Sums of unbiased HSIC, divided once (paper.md §1.3)."""
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
    u = float(jnp.sum(cka._u_centre(kj) * cka._u_centre(lj)))
    assert abs(u - 30 * 27 * ref_hsic_unbiased(k, l)) < 1e-9 * abs(u)
  g = np.asarray(cka.gram_linear(x.astype(np.float32)), np.float64)  # float32 path
  np.testing.assert_allclose(g, k, rtol=0, atol=1e-5 * np.abs(k).max())
  with pytest.raises(ValueError, match="n >= 4"):
    cka.hsic_unbiased(jnp.eye(3), jnp.eye(3))
  with pytest.raises(ValueError, match="square"):
    cka.hsic_biased(jnp.eye(3), jnp.eye(4))


def _adversarial(case, rng):
  n, p = 64, 96
  z = rng.normal(size=(n, 8))
  x = z @ rng.normal(size=(8, p)) + 0.5 * rng.normal(size=(n, p))
  y = np.tanh(z @ rng.normal(size=(8, p))) + 0.5 * rng.normal(size=(n, p))
  if case == "offset_1e4":  # residual streams / post-ReLU: far from centred
    x, y = x + rng.uniform(-1e4, 1e4, size=p), np.abs(y) + 1e4
  elif case == "scale_1e-3_1e3":
    x, y = 1e-3 * x, 1e3 * y
  elif case == "low_rank":
    x = rng.normal(size=(n, 2)) @ rng.normal(size=(2, p)) + 3e3
    y = x[:, :5] ** 2
  elif case == "float16":
    x, y = (x + 50).astype(np.float16), y.astype(np.float16)
  elif case == "bfloat16":
    x, y = (x * 7 + 100).astype(ml_dtypes.bfloat16), y.astype(ml_dtypes.bfloat16)
  elif case == "width_64_vs_65536":
    x = rng.normal(size=(n, 64))
    y = np.repeat(x, 1024, axis=1) * rng.uniform(0.5, 2, 65536) + rng.normal(size=(n, 65536))
  if x.dtype == np.float64:
    x, y = x.astype(np.float32), y.astype(np.float32)
  return x, y  # the reference sees exactly these (quantised) values


@pytest.mark.parametrize("case", ["random", "offset_1e4", "scale_1e-3_1e3", "low_rank", "float16",
                                  "bfloat16", "width_64_vs_65536"])
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
# Properties (paper.md §1.2, §5).


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
