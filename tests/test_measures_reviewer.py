"""The reviewer's measures (SVCCA, PWCCA, RSA, ridge predictivity, distance correlation, angular
Procrustes) against float64 references written from the papers' definitions (NumPy, SciPy,
scikit-learn; never our code), their invariances, held-out scores, edge cases and the minibatch
path (null, jackknife, intra-model, resume, 1 vs 4 devices)."""
import helpers
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from vit_analysis.similarity import measures

NEW = ("svcca", "pwcca", "rsa", "linear_predictivity", "distance_correlation",
       "procrustes_distance")


def rng(seed):
  return np.random.default_rng(seed)


def centred(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x - x.mean(0, keepdims=True)


# ------------------------------------------------------------------------------------------------
# References from the papers' definitions.


def ref_truncate(x, keep, rtol=1e-6):
  """Raghu et al. 2017's SVD step: the top principal components holding `keep` of the variance."""
  u, s, _ = np.linalg.svd(centred(x), full_matrices=False)
  var = s ** 2
  before = np.cumsum(var) - var
  r = int(np.sum((before < keep * var.sum()) & (var > rtol * var[0])))
  return u[:, :r] * s[:r]


def ref_cca(xr, yr):
  """Canonical correlations and x's canonical variates (QR + SVD, Bjorck and Golub 1973)."""
  qx, _ = np.linalg.qr(xr)
  qy, _ = np.linalg.qr(yr)
  p, rho, _ = np.linalg.svd(qx.T @ qy)
  n = min(xr.shape[1], yr.shape[1])
  return rho[:n], (qx @ p)[:, :n]


def ref_svcca(x, y, keep=0.99):
  rho, _ = ref_cca(ref_truncate(x, keep), ref_truncate(y, keep))
  return rho.mean()


def ref_pwcca_l2(x, y, keep=0.99):
  """The Gram-only variant: weights = the variance of x each canonical variate h_i holds."""
  xr = ref_truncate(x, keep)
  rho, h = ref_cca(xr, ref_truncate(y, keep))
  alpha = np.sum((xr.T @ h) ** 2, axis=0)
  return np.sum(alpha * rho) / alpha.sum()


def ref_pwcca(x, y, keep=0.99):
  """Morcos et al. 2018: CCA from the covariance matrices (Hotelling's definition, not QR), the
  canonical variates h_i = X_r a_i of x scaled to unit norm, alpha_i = sum_j |<h_i, x_j>| over
  the centred neurons x_j of x, normalised; PWCCA = sum_i alpha_i rho_i."""
  xr, yr = ref_truncate(x, keep), ref_truncate(y, keep)
  sxx, syy, sxy = xr.T @ xr, yr.T @ yr, xr.T @ yr

  def inv_sqrt(s):
    w, v = np.linalg.eigh(s)
    return v @ np.diag(w ** -0.5) @ v.T
  a, rho, _ = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))
  n = min(xr.shape[1], yr.shape[1])
  h = xr @ inv_sqrt(sxx) @ a[:, :n]
  h /= np.linalg.norm(h, axis=0)
  alpha = np.abs(h.T @ centred(x)).sum(1)
  alpha /= alpha.sum()
  return np.sum(alpha * rho[:n])


def ref_rsa(x, y, distance="euclidean", compare="spearman"):
  # Correlation distance: 1 - Pearson r of two examples' patterns as given (not column-centred).
  prep = (lambda z: np.asarray(z, np.float64).reshape(len(z), -1)) if distance == "correlation" \
      else centred
  dx = scipy.spatial.distance.pdist(prep(x), distance)
  dy = scipy.spatial.distance.pdist(prep(y), distance)
  f = scipy.stats.spearmanr if compare == "spearman" else scipy.stats.pearsonr
  return f(dx, dy)[0]


def ref_dcor2(x, y, debiased=False):
  """Szekely et al. 2007 (V-statistic) and Szekely and Rizzo 2014 (U-centred, bias-corrected)."""
  def centre(d):
    n = len(d)
    if not debiased:
      return d - d.mean(0) - d.mean(1)[:, None] + d.mean()
    a = d - d.sum(0) / (n - 2) - d.sum(1)[:, None] / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(a, 0)
    return a
  a = centre(scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(centred(x))))
  b = centre(scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(centred(y))))
  return np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))


def ref_procrustes(x, y):
  x, y = centred(x), centred(y)
  return np.linalg.svd(x.T @ y, compute_uv=False).sum() / (np.linalg.norm(x) * np.linalg.norm(y))


def folds(m, k=2):
  i = np.arange(m)
  return [(i[i % k != f], i[i % k == f]) for f in range(k)]


def ref_ridge_r2(x, y, alpha, k=2):
  """sklearn Ridge with an intercept on k - 1 folds, variance-weighted R^2 on the held-out one."""
  import sklearn.linear_model  # pylint: disable=g-import-not-at-top
  import sklearn.metrics  # pylint: disable=g-import-not-at-top
  x, y = centred(x), centred(y)
  out = []
  for tr, te in folds(len(x), k):
    lam = alpha * np.sum(centred(x[tr]) ** 2) / len(tr)
    fit = sklearn.linear_model.Ridge(alpha=lam, fit_intercept=True, solver="svd").fit(x[tr], y[tr])
    out.append(sklearn.metrics.r2_score(y[te], fit.predict(x[te]),
                                        multioutput="variance_weighted"))
  return np.mean(out)


def ref_ridge_cv(x, y, alphas, k=2):
  """The same with lambda chosen per fold by brute-force leave-one-out on the training rows."""
  import sklearn.linear_model  # pylint: disable=g-import-not-at-top
  import sklearn.metrics  # pylint: disable=g-import-not-at-top
  x, y = centred(x), centred(y)
  out = []
  for tr, te in folds(len(x), k):
    xt, yt = centred(x[tr]), centred(y[tr])  # centred once on the training mean
    scale = np.sum(xt ** 2) / len(tr)
    sse = []
    for a in alphas:
      err = 0.0
      for i in range(len(tr)):
        rest = np.arange(len(tr)) != i
        f = sklearn.linear_model.Ridge(alpha=a * scale, fit_intercept=False,
                                       solver="svd").fit(xt[rest], yt[rest])
        err += np.sum((yt[i] - f.predict(xt[i:i + 1])[0]) ** 2)
      sse.append(err)
    best = alphas[int(np.argmin(sse))]
    fit = sklearn.linear_model.Ridge(alpha=best * scale, fit_intercept=True,
                                     solver="svd").fit(x[tr], y[tr])
    out.append(sklearn.metrics.r2_score(y[te], fit.predict(x[te]),
                                        multioutput="variance_weighted"))
  return np.mean(out)


def ref_heldout_procrustes(x, y, k=2, rtol=1e-6):
  """The rotation fitted on k - 1 folds (polar factor on the non-zero singular values), scored on
  the held-out fold's features (centred over all examples)."""
  x, y = centred(x), centred(y)
  out = []
  for tr, te in folds(len(x), k):
    u, s, vt = np.linalg.svd(x[tr].T @ y[tr], full_matrices=False)
    q = u[:, s > rtol * s[0]] @ vt[s > rtol * s[0]]
    out.append(np.sum(q * (x[te].T @ y[te])) / (np.linalg.norm(x[te]) * np.linalg.norm(y[te])))
  return np.mean(out)


def ref_heldout_cca(x, y, keep, weighted, k=2, rtol=1e-6, weights="l1"):
  """CCA fitted on the training rows of the truncated features, correlations of the test rows'
  variates (PWCCA: weights = sum_j |<h_i, x_j>| of the training variates h_i against the training
  rows of x's centred neurons, or with 'l2' the training variance of x along each variate)."""
  xr, yr = ref_truncate(x, keep), ref_truncate(y, keep)
  out = []
  for tr, te in folds(len(x), k):
    def fit(z):
      u, s, vt = np.linalg.svd(z[tr], full_matrices=False)
      keep_ = s > rtol * s[0]
      return u[:, keep_], vt[keep_].T / s[keep_]
    qx, wx = fit(xr)
    qy, wy = fit(yr)
    p, _, rt = np.linalg.svd(qx.T @ qy, full_matrices=False)
    n = min(qx.shape[1], qy.shape[1])
    ha, hb = xr[te] @ wx @ p[:, :n], yr[te] @ wy @ rt.T[:, :n]
    corr = np.array([np.corrcoef(ha[:, i], hb[:, i])[0, 1] for i in range(n)])
    if not weighted:
      out.append(corr.mean())
    elif weights == "l2":
      alpha = np.sum((xr[tr].T @ (qx @ p[:, :n])) ** 2, axis=0)
      out.append(np.sum(alpha * corr) / alpha.sum())
    else:
      alpha = np.abs((qx @ p[:, :n]).T @ centred(x)[tr]).sum(1)
      out.append(np.sum(alpha * corr) / alpha.sum())
  return np.mean(out)


REF = {"svcca": ref_svcca, "pwcca": ref_pwcca, "rsa": ref_rsa,
       "linear_predictivity": lambda x, y: ref_ridge_r2(x, y, 0.1),
       "distance_correlation": lambda x, y: ref_dcor2(x, y, debiased=True),
       "procrustes_distance": lambda x, y: np.arccos(min(ref_procrustes(x, y), 1.0))}
# Options of the minibatch path in the parametrised tests (a fixed ridge alpha: sklearn's).
OPTS = {"linear_predictivity": {"alphas": (0.1,)}, "distance_correlation": {"debiased": True}}


def data(seed, m=32, p1=8, p2=12, noise=0.7):
  """Related features with decaying spectra (truncation is not trivial)."""
  r = rng(seed)
  common = r.normal(size=(m, 5))
  x = common @ r.normal(size=(5, p1)) + noise * r.normal(size=(m, p1)) * np.linspace(1, .1, p1)
  y = common @ r.normal(size=(5, p2)) + noise * r.normal(size=(m, p2)) + 2.0
  return x, y


grams = helpers.measure_grams


def run(measure, feats_a, feats_b=None, perms=None, **options):
  """`measure` over minibatches ([minibatch][layer] feature lists) -> MeasureResult, with the
  features and pattern moments the analyses' step passes where the measure needs them."""
  a = len(feats_a[0])
  b = None if feats_b is None else len(feats_b[0])
  state = measures.init(measure, a, b, num_perms=0 if perms is None else len(perms), **options)
  for i, fa in enumerate(feats_a):
    fa = [np.asarray(f, np.float32) for f in fa]
    fb = None if feats_b is None else [np.asarray(f, np.float32) for f in feats_b[i]]
    state = measures.accumulate(state, measures.minibatch_terms(
        measure, grams(fa), None if fb is None else grams(fb), perms=perms, feats_a=fa,
        moments_a=measures.pattern_moments(fa),
        moments_b=None if fb is None else measures.pattern_moments(fb), **options))
  return measures.result(state)


# ------------------------------------------------------------------------------------------------
# Full batch against the references.


@pytest.mark.parametrize("p1,p2", [(8, 12), (60, 45)])  # narrower and wider than n = 32
def test_full_batch_against_references(p1, p2):
  x, y = data(p1, 32, p1, p2)
  tol = 2e-5 if p1 < 32 else 1e-4  # float32 Grams
  for keep in (0.99, 0.8):
    assert measures.svcca(x, y, keep) == pytest.approx(ref_svcca(x, y, keep), abs=tol)
    # p > n: r_x + r_y > n - 1, so several canonical correlations are exactly 1 and their
    # variates any orthonormal basis of the shared subspace; the L1 weights depend on that basis
    # (the L2 weights do not), so float32 and float64 may pick different ones.
    assert measures.pwcca(x, y, keep) == pytest.approx(ref_pwcca(x, y, keep),
                                                       abs=tol if p1 < 32 else 2e-3)
    assert measures.pwcca(x, y, keep, weights="l2") == pytest.approx(
        ref_pwcca_l2(x, y, keep), abs=tol)
  for distance in ("euclidean", "cosine", "correlation"):
    for compare in ("spearman", "pearson"):
      assert measures.rsa(x, y, distance, compare) == pytest.approx(
          ref_rsa(x, y, distance, compare), abs=2e-5)
  for debiased in (False, True):
    assert measures.distance_correlation(x, y, debiased) == pytest.approx(
        ref_dcor2(x, y, debiased), abs=2e-5)
  assert measures.procrustes_distance(x, y) == pytest.approx(
      np.arccos(ref_procrustes(x, y)), abs=2e-5)
  for alpha in (0.01, 1.0):
    assert measures.linear_predictivity(x, y, alphas=alpha) == pytest.approx(
        ref_ridge_r2(x, y, alpha), abs=1e-4)
  assert measures.linear_predictivity(x, y, alphas=1.0, folds=4) == pytest.approx(
      ref_ridge_r2(x, y, 1.0, k=4), abs=1e-4)


def test_ridge_lambda_by_leave_one_out_matches_brute_force():
  x, y = data(5, 24, 10, 6, noise=1.5)
  alphas = (1e-3, 1e-1, 10.0)
  assert measures.linear_predictivity(x, y, alphas=alphas) == pytest.approx(
      ref_ridge_cv(x, y, alphas), abs=1e-4)
  # In-sample (heldout='none') R^2 is higher than held-out: the fit is scored on its own rows.
  assert measures.linear_predictivity(x, y, heldout="none") > measures.linear_predictivity(x, y)


@pytest.mark.parametrize("m,p", [(32, 10), (64, 50)])
def test_heldout_against_references(m, p):
  # The CCA fit is unique when the kept directions of both sides fit in the training rows
  # (r_x + r_y <= t; here r <= 5 of t = m / 2): no training correlation is forced to 1.
  x, y = data(p + 1, m, p, p)
  assert measures.procrustes(x, y, heldout="kfold") == pytest.approx(
      ref_heldout_procrustes(x, y), abs=1e-4)
  assert measures.procrustes_distance(x, y, heldout="kfold") == pytest.approx(
      np.arccos(ref_heldout_procrustes(x, y)), abs=2e-4)
  for keep in (0.7, 0.9):
    assert measures.svcca(x, y, keep, heldout="kfold") == pytest.approx(
        ref_heldout_cca(x, y, keep, False), abs=2e-4)
    assert measures.pwcca(x, y, keep, heldout="kfold") == pytest.approx(
        ref_heldout_cca(x, y, keep, True), abs=2e-4)
    assert measures.pwcca(x, y, keep, heldout="kfold", weights="l2") == pytest.approx(
        ref_heldout_cca(x, y, keep, True, weights="l2"), abs=2e-4)


# ------------------------------------------------------------------------------------------------
# Invariances.


def _transforms(x, r):
  q, _ = np.linalg.qr(r.normal(size=(x.shape[1], x.shape[1])))
  return {"orthogonal": x @ q, "scale": 3.7 * x, "translation": x + r.normal(size=x.shape[1]) * 9,
          "permutation": x[:, r.permutation(x.shape[1])]}


@pytest.mark.parametrize("measure", NEW)
def test_invariances(measure):
  x, y = data(20, 32, 8, 12)
  r = rng(21)
  f = getattr(measures, measure)
  base = f(x, y)
  for name, xt in _transforms(x, r).items():
    if measure == "pwcca" and name == "orthogonal":
      # Morcos et al.'s L1 weights sum |<h_i, x_j>| over x's neurons: a rotation of the neurons
      # changes them (the L2 variant's variance weights do not).
      assert abs(f(xt, y) - base) > 1e-4
      assert f(xt, y, weights="l2") == pytest.approx(f(x, y, weights="l2"), abs=5e-5)
      continue
    assert f(xt, y) == pytest.approx(base, abs=5e-5), name
    if measure not in ("pwcca", "linear_predictivity"):  # symmetric in its arguments
      assert f(y, xt) == pytest.approx(base, abs=5e-5), name
  for name, yt in _transforms(y, r).items():
    assert f(x, yt) == pytest.approx(base, abs=5e-5), name


def test_cca_invariant_to_invertible_maps_and_others_are_not():
  x, y = data(22, 40, 8, 12)
  r = rng(23)
  q1, _ = np.linalg.qr(r.normal(size=(8, 8)))
  q2, _ = np.linalg.qr(r.normal(size=(8, 8)))
  g = q1 @ np.diag(np.exp(r.uniform(-1, 1, size=8))) @ q2  # invertible, not orthogonal
  h = r.normal(size=(12, 12))
  # Without truncation (keep=1) the canonical correlations see only the column spaces.
  assert measures.svcca(x @ g, y @ h, keep=1.0) == pytest.approx(
      measures.svcca(x, y, keep=1.0), abs=5e-5)
  # PWCCA's weights come from x alone: invariant to invertible maps of y only.
  assert measures.pwcca(x, y @ h, keep=1.0) == pytest.approx(
      measures.pwcca(x, y, keep=1.0), abs=5e-5)
  assert abs(measures.pwcca(x @ g, y, keep=1.0) - measures.pwcca(x, y, keep=1.0)) > 1e-3
  for f in (measures.procrustes_distance, measures.rsa, measures.distance_correlation):
    assert abs(f(x @ g, y) - f(x, y)) > 1e-3, f


# ------------------------------------------------------------------------------------------------
# Edge cases: p >> m, constant and rank-deficient layers, bad options.


def test_more_features_than_examples_heldout_near_chance():
  """Independent random features, p = 400 >> m = 64: in-sample CCA saturates (each truncated side
  spans nearly all of the m - 1 dimensions, so their column spaces intersect), held-out scores
  sit at their chance level 0, truncation to few directions is far below 1."""
  r = rng(30)
  x, y = r.normal(size=(64, 400)), r.normal(size=(64, 400))
  assert measures.svcca(x, y) > 0.95  # the documented bias
  for f in (measures.svcca, measures.pwcca, measures.procrustes):
    assert abs(f(x, y, heldout="kfold")) < 0.1, f
  assert measures.procrustes_distance(x, y, heldout="kfold") == pytest.approx(np.pi / 2, abs=0.1)
  assert measures.linear_predictivity(x, y) < 0.05  # R^2 chance level: <= 0
  assert measures.linear_predictivity(x, y, heldout="none") > 0.5  # in-sample: overfits
  assert measures.svcca(x, y, keep=0.3) < 0.6
  # A shared low-dimensional signal is still found held out (truncation keeps its directions).
  latent = r.normal(size=(64, 4))
  u = latent @ r.normal(size=(4, 400)) + 0.3 * r.normal(size=(64, 400))
  v = latent @ r.normal(size=(4, 300)) + 0.3 * r.normal(size=(64, 300))
  assert measures.svcca(u, v, keep=0.9, heldout="kfold") > 0.8
  assert measures.procrustes(u, v, heldout="kfold") > 0.5
  assert measures.linear_predictivity(u, v) > 0.5


@pytest.mark.parametrize("measure", NEW)
def test_constant_layer_named(measure):
  r = rng(31)
  m = 16
  a = [r.normal(size=(m, 5)), np.ones((m, 7))]
  b = [r.normal(size=(m, 6))]
  state = measures.init(measure, ["p", "q"], ["r"], **OPTS.get(measure, {}))
  with pytest.raises(ValueError, match=r"constant.*'q'"):
    measures.result(measures.accumulate(state, measures.minibatch_terms(
        measure, grams(a), grams(b), feats_a=a, **OPTS.get(measure, {}))))
  with pytest.raises(ValueError, match="constant"):
    getattr(measures, measure)(b[0], a[1])


@pytest.mark.parametrize("measure", NEW)
def test_rank_deficient_layers(measure):
  r = rng(32)
  low = r.normal(size=(24, 2)) @ r.normal(size=(2, 30))  # rank 2 in 30 features
  y = low @ r.normal(size=(30, 5)) + 0.5 * r.normal(size=(24, 5))
  f = getattr(measures, measure)
  v = f(low, y, **OPTS.get(measure, {}))
  assert np.isfinite(v)
  if measure not in ("linear_predictivity",):
    assert v == pytest.approx(REF[measure](low, y), abs=1e-4)
  same = f(low, low, **OPTS.get(measure, {}))
  assert same == pytest.approx(0.0 if measure == "procrustes_distance" else 1.0, abs=3e-3)


def test_options_checked():
  x, y = data(33)
  with pytest.raises(ValueError, match="distance must be one of.*correlation"):
    measures.rsa(x, y, distance="cityblock")
  with pytest.raises(ValueError, match="weights must be 'l1'"):
    measures.pwcca(x, y, weights="l3")
  with pytest.raises(ValueError, match="needs feats_a"):
    measures.minibatch_terms("pwcca", grams([x]), grams([y]))
  with pytest.raises(ValueError, match="needs moments_b"):
    measures.minibatch_terms("rsa", grams([x]), grams([y]), distance="correlation",
                             moments_a=measures.pattern_moments([x]))
  with pytest.raises(ValueError, match="compare"):
    measures.rsa(x, y, compare="kendall")
  with pytest.raises(ValueError, match="heldout"):
    measures.svcca(x, y, heldout="loo")
  with pytest.raises(ValueError, match="keep"):
    measures.pwcca(x, y, keep=0.0)
  with pytest.raises(ValueError, match="alphas"):
    measures.linear_predictivity(x, y, alphas=(0.1, -1.0))
  with pytest.raises(ValueError, match="folds"):
    measures.procrustes(x[:6], y[:6], heldout="kfold", folds=4)
  with pytest.raises(ValueError, match="supports method='svd'"):
    measures.procrustes(x, y, heldout="kfold", method="newton_schulz")
  assert measures.higher_is_similar("svcca") and not measures.higher_is_similar(
      "procrustes_distance")


# ------------------------------------------------------------------------------------------------
# The minibatch path: one minibatch = full batch, means and jackknife, null, intra, resume.


# Every measure at its test options, and the options that change what the step computes.
VARIANTS = [(m, OPTS.get(m, {})) for m in NEW] + [
    ("pwcca", {"weights": "l2"}), ("rsa", {"distance": "correlation"}),
    ("rsa", {"distance": "correlation", "compare": "pearson"})]


def ref_of(measure, opts):
  if measure == "pwcca" and opts.get("weights") == "l2":
    return ref_pwcca_l2
  if measure == "rsa" and opts:
    return lambda x, y: ref_rsa(x, y, **opts)
  return REF[measure]


@pytest.mark.parametrize("measure,opts", VARIANTS)
def test_one_minibatch_equals_full_batch_and_null(measure, opts):
  xs = [data(40, 32, 8, 12)[0], data(41, 32, 20, 12)[0]]
  ys = [data(40, 32, 8, 12)[1]]
  perms = measures.null_permutations(0, 3, 32)
  res = run(measure, [xs], [ys], perms=perms, **opts)
  f = getattr(measures, measure)
  full = np.array([[f(x, y, **opts) for y in ys] for x in xs])
  ref_f = ref_of(measure, opts)
  ref = np.array([[ref_f(x, y) for y in ys] for x in xs])
  np.testing.assert_allclose(full, ref, atol=1e-4)
  np.testing.assert_allclose(res.value, full, atol=2e-5)
  want = np.array([[[ref_f(x, ys[0][p])] for x in xs] for p in perms])  # [P, A, 1]
  np.testing.assert_allclose(res.null, want, atol=2e-4)
  np.testing.assert_allclose(res.z, (res.value - res.null_mean) / res.null.std(0, ddof=1))


@pytest.mark.parametrize("measure", ["svcca", "rsa", "procrustes_distance"])
def test_several_minibatches_mean_and_exact_jackknife(measure):
  batches = [data(50 + i, 24, 8, 6) for i in range(4)]
  res = run(measure, [[x] for x, _ in batches], [[y] for _, y in batches])
  per = np.array([REF[measure](x, y) for x, y in batches])
  assert res.value[0, 0] == pytest.approx(per.mean(), abs=5e-5)
  assert res.stderr[0, 0] == pytest.approx(per.std(ddof=1) / 2, rel=1e-3)  # std / sqrt(k)


def test_distance_correlation_sums_minibatch_terms():
  """CKA-type: dCov^2 sums over minibatches divided once, with cka's exact jackknife."""
  batches = [data(60 + i, 20, 5, 7) for i in range(3)]
  res = run("distance_correlation", [[x] for x, _ in batches], [[y] for _, y in batches],
            debiased=False)

  def dcov(x, y):
    d = lambda z: scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(centred(z)))
    c = lambda a: a - a.mean(0) - a.mean(1)[:, None] + a.mean()
    return np.sum(c(d(x)) * c(d(y)))
  xy = sum(dcov(x, y) for x, y in batches)
  xx = sum(dcov(x, x) for x, _ in batches)
  yy = sum(dcov(y, y) for _, y in batches)
  assert res.value[0, 0] == pytest.approx(xy / np.sqrt(xx * yy), abs=2e-5)
  assert np.isfinite(res.stderr).all()


@pytest.mark.parametrize("measure,opts", VARIANTS)
def test_intra_model(measure, opts):
  xs = [data(70, 24, 6, 9)[0], data(71, 24, 30, 9)[0], data(72, 24, 12, 9)[1]]
  intra = run(measure, [xs], **opts)
  cross = run(measure, [xs], [xs], **opts)
  np.testing.assert_allclose(intra.value, cross.value, atol=2e-5)
  if measure not in ("pwcca", "linear_predictivity"):
    np.testing.assert_allclose(intra.value, intra.value.T, atol=1e-12)
  if measure == "linear_predictivity":
    # A layer predicts its own held-out rows only within the span of the t = m / 2 training rows:
    # R^2 < 1 when its rank exceeds t (docs/method.md#other-similarity-measures).
    assert np.all(np.diagonal(intra.value) > 0.85), np.diagonal(intra.value)
  else:
    self_value = 0.0 if measure == "procrustes_distance" else 1.0
    np.testing.assert_allclose(np.diagonal(intra.value), self_value, atol=3e-3)


def test_z_and_p_direction_for_a_distance():
  """Related features: similarities sit above their null (z > 0), the distance below (z < 0), and
  the p-value of each counts its own tail."""
  from vit_analysis.similarity import significance  # pylint: disable=g-import-not-at-top
  m = 32
  xs = [[data(80 + i, m, 8, 12)[0]] for i in range(2)]
  ys = [[data(80 + i, m, 8, 12)[1]] for i in range(2)]
  perms = measures.null_permutations(1, 19, m)
  for measure in NEW:
    res = run(measure, xs, ys, perms=perms, **OPTS.get(measure, {}))
    sign = 1 if measures.higher_is_similar(measure) else -1
    assert sign * res.z[0, 0] > 3, (measure, res.z)
    p = significance.permutation_p_values(sign * res.value, sign * res.null)
    assert p[0, 0] == pytest.approx(1 / 20), measure


def test_every_measure_from_the_same_pass_on_1_and_4_devices():
  """cka_runner: every measure with a null, identical on 1 and 4 devices; the distance's
  p-value counts the lower tail."""
  import jax  # pylint: disable=g-import-not-at-top
  from test_similarity import LAYERS, Transforms, _loaded, _side, _source  # pylint: disable=g-import-not-at-top

  from vit_analysis.runtime import sharding  # pylint: disable=g-import-not-at-top
  from vit_analysis.similarity import cka_runner  # pylint: disable=g-import-not-at-top
  side = _side(_loaded(Transforms(), 8), LAYERS)
  common = dict(num_examples=64, minibatch_size=16, repeats=1, seed=1, null_permutations=4,
                measures=("linear_cka",) + NEW, measure_options={"linear_predictivity": {
                    "alphas": (0.01, 1.0)}, "rsa": {"distance": "correlation"}})
  runs = [cka_runner.cka_over_repeats(side, None, _source(), mesh=sharding.make_mesh(devices),
                                      **common).arrays()
          for devices in (jax.devices()[:1], jax.devices())]
  assert set(runs[0]) == set(runs[1])
  for key, v in runs[0].items():
    np.testing.assert_allclose(v, runs[1][key], rtol=1e-5, atol=1e-5, err_msg=key)
  arrays = runs[1]
  i, r, s = LAYERS.index("identity"), LAYERS.index("rotated"), LAYERS.index("scaled")
  for name in NEW:
    assert f"{name}_null_p" in arrays and arrays[f"{name}_stderr"].shape == (4, 4), name
    if name == "linear_predictivity":  # 48 features from 8 training rows: R^2 < 1 even for a copy
      continue
    want = 0.0 if name == "procrustes_distance" else 1.0
    # RSA's correlation distance (1 - Pearson r across features) is not rotation-invariant.
    assert arrays[f"{name}_mean"][i, s if name == "rsa" else r] == pytest.approx(
        want, abs=2e-3), name
  assert arrays["rsa_mean"][i, r] < 0.999
  null, mean = arrays["procrustes_distance_null_values"], arrays["procrustes_distance_mean"]
  np.testing.assert_array_equal(arrays["procrustes_distance_null_p"],
                                (1 + (null <= mean).sum(0)) / 5)
  assert arrays["procrustes_distance_null_p"][i, r] == pytest.approx(1 / 5)


def test_side_by_side_figure_uses_each_measures_range():
  from vit_analysis.plotting import similarity as plots  # pylint: disable=g-import-not-at-top
  v = np.array([[0.2, -0.4], [0.9, 0.1]])
  fig = plots.measure_heatmaps({"linear_cka": v.clip(0), "rsa": v, "procrustes_distance": v.clip(0),
                                "linear_predictivity": v - 1}, row_names=["a", "b"],
                               col_names=["c", "d"])
  clims = [ax.images[0].get_clim() for ax in fig.axes if ax.images]
  assert clims[:3] == [(0.0, 1.0), (-1.0, 1.0), (0.0, np.pi / 2)]
  assert clims[3] == (pytest.approx(-1.4), 1.0)
  assert "lower = more similar" in fig.axes[2].get_title()


def test_pwcca_l1_weights_in_chunks_of_side_b(monkeypatch):
  """The L1 weights of several layers b per GEMM (padded last chunk) equal one at a time."""
  xs = [data(90, 24, 6, 9)[0], data(91, 24, 11, 9)[0], data(92, 24, 12, 9)[1]]
  whole = run("pwcca", [xs], [xs]).value
  monkeypatch.setattr(measures, "_L1_CHUNK_BYTES", 4 * 12 * 24 * 2)  # 2 layers b per chunk
  measures._terms_jit.clear_cache()  # pylint: disable=protected-access
  chunked = run("pwcca", [xs], [xs]).value
  measures._terms_jit.clear_cache()  # pylint: disable=protected-access
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)
  ref = np.array([[ref_pwcca(x, y) for y in xs] for x in xs])
  np.testing.assert_allclose(chunked, ref, atol=1e-4)
