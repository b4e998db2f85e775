"""The CKA and measure standard errors are the exact leave-one-minibatch-out jackknife
(docs/method.md#error-bars-jackknife-over-minibatches-spread-over-repeats), in every state: intra
and cross, merged in any grouping, on 1 or 4 devices, and on adversarial layers (CKA > 0.99,
offsets of 1e4, scales of 1e-3 and 1e3). The reference is written here in float64 NumPy from the
per-minibatch HSIC values alone.
"""
import dataclasses

import jax
import numpy as np
import pytest
from helpers import ref_hsic_unbiased

from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka, measures

K, M, P = 8, 24, 12
RTOL = 0.02


def _gram(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  x = x - x.mean(0)
  return x @ x.T


def ref_terms(x, y):
  """[k, 3] float64 per-minibatch (HSIC_1(K, L), HSIC_1(K, K), HSIC_1(L, L)); x, y: [k, m, p]."""
  return np.array([[ref_hsic_unbiased(_gram(a), _gram(b)), ref_hsic_unbiased(_gram(a), _gram(a)),
                    ref_hsic_unbiased(_gram(b), _gram(b))] for a, b in zip(x, y)])


def ref_jackknife(h):
  """Exact leave-one-out: CKA_(-i) from the sums without minibatch i; SE over i."""
  k = len(h)
  theta = np.array([h[np.arange(k) != i, 0].sum()
                    / np.sqrt(h[np.arange(k) != i, 1].sum() * h[np.arange(k) != i, 2].sum())
                    for i in range(k)])
  return np.sqrt((k - 1) / k * np.sum((theta - theta.mean()) ** 2))


def ref_se(xs, ys):
  return np.array([[ref_jackknife(ref_terms(x, y)) for y in ys] for x in xs])


def _chain(seed, num=5):
  """num float32 layers [K, M, P], each a noisy nonlinear map of the previous one."""
  rng = np.random.default_rng(seed)
  out = [rng.normal(size=(K, M, P))]
  for _ in range(num - 1):
    w = rng.normal(size=(P, P)) / np.sqrt(P)
    out.append(np.tanh(out[-1] @ w) + 0.3 * rng.normal(size=(K, M, P)))
  return [x.astype(np.float32) for x in out]


def _adversarial():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(K, M, P))
  near = x + 0.02 * rng.normal(size=(K, M, P))  # CKA ~ 0.9996
  mix = x @ rng.normal(size=(P, P)) + 0.5 * rng.normal(size=(K, M, P))
  pairs = {"cka_above_0.99": (x, near), "offset_1e4": (x + 1e4, near + 1e4),
           "scales_1e-3_1e3": (1e-3 * x, 1e3 * near), "offset_and_scales": (1e-3 * x + 1e4, 1e3 * mix)}
  # float32 as the model would give them; the reference reads the same rounded values.
  return {k: (a.astype(np.float32), b.astype(np.float32)) for k, (a, b) in pairs.items()}


def test_intra_and_cross_equal_the_exact_jackknife():
  layers = _chain(0, 6)
  ref = ref_se(layers, layers)
  intra = cka.result(cka.update(cka.init(6), layers, stacked=True))
  cross = cka.result(cka.update(cka.init(6, 6), layers, layers, stacked=True))
  off = ~np.eye(6, dtype=bool)
  for res in (intra, cross):
    np.testing.assert_allclose(res.stderr[off], ref[off], rtol=RTOL)
    assert (res.stderr[off] > 0).all()  # no cell collapses to 0
  # A layer against itself gives CKA 1 in every leave-one-out sum: SE exactly 0, only there.
  assert (np.diagonal(intra.stderr) == 0).all()
  # (The cross state's diagonal is float32 rounding apart from its self terms: ~1e-8.)
  np.testing.assert_allclose(intra.stderr, cross.stderr, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(intra.stderr, intra.stderr.T)


@pytest.mark.parametrize("case", list(_adversarial()))
def test_adversarial_layers(case):
  a, b = _adversarial()[case]
  ref = ref_jackknife(ref_terms(a, b))
  cross = cka.result(cka.update(cka.init(1, 1), [a], [b], stacked=True))
  intra = cka.result(cka.update(cka.init(2), [a, b], stacked=True))
  assert ref > 0
  for got in (cross.stderr[0, 0], intra.stderr[0, 1], intra.stderr[1, 0]):
    assert abs(got - ref) <= RTOL * ref, (case, got, ref)
  if case == "cka_above_0.99":
    assert cross.cka[0, 0] > 0.99


def test_merge_groupings_and_devices_bit_identical():
  layers = _chain(2, 3)
  whole = cka.update(cka.init(3, capacity=K), layers, stacked=True)
  parts = [cka.update(cka.init(3), [x[i:j] for x in layers], stacked=True)
           for i, j in ((0, 3), (3, 4), (4, 8))]
  left = cka.merge(cka.merge(parts[0], parts[1]), parts[2])
  right = cka.merge(parts[0], cka.merge(parts[1], parts[2]))
  shuffled = cka.merge(parts[2], cka.merge(parts[0], parts[1]))  # another order
  one_by_one = cka.init(3)
  for i in range(K):
    one_by_one = cka.update(one_by_one, [x[i] for x in layers])
  want = cka.result(whole)
  for state in (left, right, shuffled, one_by_one):
    got = cka.result(state)
    np.testing.assert_array_equal(got.cka, want.cka)
    np.testing.assert_array_equal(got.stderr, want.stderr)
  for f in ("cross", "self_a", "self_b"):  # associativity of the state itself
    np.testing.assert_array_equal(getattr(left, f), getattr(right, f))
  # 1 and 4 devices: the minibatch axis sharded over a mesh.
  for n in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    feats = jax.device_put(layers, sharding.data_sharding(mesh))
    got = cka.result(cka.accumulate(cka.init(3), cka._update_terms(feats, None, True)))
    np.testing.assert_array_equal(got.stderr, want.stderr)
  np.testing.assert_allclose(want.stderr, ref_se(layers, layers), rtol=RTOL, atol=1e-12)


def test_capacity_keeps_shapes_and_grows():
  layers = _chain(3, 2)
  template = cka.init(["a", "b"], capacity=K)
  half = cka.update(template, [x[:4] for x in layers], stacked=True)
  full = cka.update(half, [x[4:] for x in layers], stacked=True)
  shapes = lambda s: [np.shape(v) for v in jax.tree.leaves(s)]
  assert shapes(half) == shapes(full) == shapes(template)
  more = cka.update(full, [x[:2] for x in layers], stacked=True)
  assert np.shape(more.cross) == (K + 2, 2, 2) and int(more.num_minibatches) == K + 2
  assert cka.result(half).num_minibatches == 4
  with pytest.raises(ValueError, match="capacity"):
    cka.init(2, capacity=-1)


def test_mean_type_measure_stderr_is_the_exact_jackknife():
  rng = np.random.default_rng(4)
  ga = rng.normal(size=(K, 2, M, 6)).astype(np.float32)
  gb = rng.normal(size=(K, 3, M, 5)).astype(np.float32)
  gb[:, 0] += 3 * ga[:, 0, :, :5]
  gram = lambda f: np.einsum("kamp,kanp->kamn", f - f.mean(2, keepdims=True),
                             f - f.mean(2, keepdims=True))
  grams_a, grams_b = gram(ga), gram(gb)
  for name in ("procrustes", "mutual_knn"):
    t = measures.terms([name], grams_a, grams_b, stacked=True)[name]
    state = measures.accumulate(measures.init(name, 2, 3), t)
    res = measures.result(state)
    v = np.asarray(t["value"], np.float64)  # [k, A, B] per-minibatch values
    loo = (v.sum(0) - v) / (K - 1)
    ref = np.sqrt((K - 1) / K * ((loo - loo.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(res.stderr, ref, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(res.stderr, v.std(0, ddof=1) / np.sqrt(K), rtol=1e-9, atol=1e-15)
    # Merging in another grouping changes nothing.
    first = measures.accumulate(measures.init(name, 2, 3), jax.tree.map(lambda x: x[:3], t))
    rest = measures.accumulate(measures.init(name, 2, 3), jax.tree.map(lambda x: x[3:], t))
    merged = measures.result(measures.merge(rest, first))
    np.testing.assert_array_equal(merged.value, res.value)
    np.testing.assert_array_equal(merged.stderr, res.stderr)
  # CKA-type measures are cka's jackknife (intra: every off-diagonal cell > 0).
  t = measures.terms(["linear_cka"], grams_a, stacked=True)["linear_cka"]
  res = measures.result(measures.accumulate(measures.init("linear_cka", 2), t))
  assert res.stderr[0, 1] > 0 and res.stderr[0, 1] == res.stderr[1, 0]


def test_same_ratio_in_every_minibatch_gives_zero_only_there():
  layers = _chain(5, 2)
  state = cka.update(cka.init(3, 1), [layers[0], 2 * layers[0], layers[1]], [layers[0]],
                     stacked=True)
  res = cka.result(state)
  # Identical per-minibatch ratios up to float32 rounding of the device terms (~1e-8).
  assert res.stderr[0, 0] < 1e-6 and res.stderr[1, 0] < 1e-6 and res.stderr[2, 0] > 1e-3
  one = cka.result(dataclasses.replace(state, num_minibatches=np.asarray(1, np.int64)))
  assert np.isnan(one.stderr).all()


def ref_max_leave_one_out(h):
  """max_i |CKA_(-i) - CKA| from the per-minibatch HSIC values h: [k, 3]."""
  k = len(h)
  full = h[:, 0].sum() / np.sqrt(h[:, 1].sum() * h[:, 2].sum())
  keep = [np.arange(k) != i for i in range(k)]
  return max(abs(h[s, 0].sum() / np.sqrt(h[s, 1].sum() * h[s, 2].sum()) - full) for s in keep)


def test_max_leave_one_out_change_finds_an_outlying_minibatch():
  layers = _chain(2, 3)
  # One minibatch where the last layer is unrelated to the others: CKA moves when it is left out.
  rng = np.random.default_rng(5)
  layers[2] = layers[2].copy()
  layers[2][3] = rng.normal(size=(M, P)).astype(np.float32) * 5
  res = cka.result(cka.update(cka.init(3, 3), layers, layers, stacked=True))
  for i in range(3):
    for j in range(3):
      ref = ref_max_leave_one_out(ref_terms(layers[i], layers[j]))
      # atol: float32 rounding of per-minibatch ratios near 1 (layer against itself: ref 0).
      np.testing.assert_allclose(res.max_leave_one_out[i, j], ref, rtol=RTOL, atol=3e-7)
  intra = cka.result(cka.update(cka.init(3), layers, stacked=True))
  assert (np.diagonal(intra.max_leave_one_out) == 0).all()
  # The outlier moves the (0, 2) cell by more than its standard error.
  assert res.max_leave_one_out[0, 2] > res.stderr[0, 2]


def test_null_bias_check_is_zero_within_error_where_biased_cka_is_not():
  mean, se = cka.null_bias_check(32, 2048, 1024, num_minibatches=8)
  assert abs(mean) < 4 * se + 1e-3
  # The biased (full-batch) estimator on the same kind of data is far from 0 at p >> m.
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((32, 2048)), rng.standard_normal((32, 1024))
  assert float(cka.linear_cka(x, y, debiased=False)) > 0.5


def test_leave_one_out_grids_match_float64_ratios_without_each_minibatch():
  layers = _chain(2, 3)
  res = cka.result(cka.update(cka.init(3, 3), layers, layers, stacked=True))
  k = res.num_minibatches
  assert res.leave_one_out.shape == (k, 3, 3)
  for i in range(3):
    for j in range(3):
      h = ref_terms(layers[i], layers[j])
      keep = [np.arange(k) != n for n in range(k)]
      ref = [h[s, 0].sum() / np.sqrt(h[s, 1].sum() * h[s, 2].sum()) for s in keep]
      np.testing.assert_allclose(res.leave_one_out[:, i, j], ref, rtol=RTOL, atol=1e-7)
  # The jackknife of a contrast of cells, from these grids, is a contrast's own jackknife.
  w = np.array([[0, 1, -1], [0, 0, 0], [0, 0, 0]], np.float64)
  contrast = np.einsum("kab,ab->k", res.leave_one_out, w)
  assert cka.jackknife_stderr(contrast) > 0
  one_cell = np.zeros((3, 3))
  one_cell[0, 1] = 1.0
  np.testing.assert_allclose(
      cka.jackknife_stderr(np.einsum("kab,ab->k", res.leave_one_out, one_cell)),
      res.stderr[0, 1], rtol=1e-12)
