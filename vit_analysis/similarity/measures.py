"""Similarity measures beyond linear CKA from the same minibatch Grams; shuffle nulls.

Ten measures of how alike two representations x: [n, p1], y: [n, p2] of the same n examples are
(features flattened per example, as for CKA):
* `linear_cka`: the paper's measure (cka's HSIC estimators, biased or unbiased per minibatch).
* `rbf_cka`: CKA with Gaussian kernels K_ij = exp(-d2_ij / (2 s2)), d2_ij = |x_i - x_j|^2, and the
  bandwidth s2 = sigma^2 * median(d2) over all n^2 pairs, the zero diagonal included (Kornblith et
  al. 2019's reference code).
* `procrustes`: orthogonal-Procrustes similarity |X^T Y|_* / (|X|_F |Y|_F) of column-centred X, Y
  (nuclear norm over Frobenius norms; in [0, 1]; arccos of it is the angular shape metric of
  Williams et al. 2021). Invariant to rotations and isotropic scaling, not to other linear maps.
* `mutual_knn`: mutual k-nearest-neighbour alignment (Huh et al. 2024): for every example the
  fraction of its k nearest neighbours (cosine similarity of the centred features, itself
  excluded) that the two representations share, averaged over examples.
* `svcca`, `pwcca`: SVD truncation to a variance fraction (the Gram's top eigenvectors U_r), then
  CCA: the canonical correlations are the singular values of U_r,x^T U_r,y; mean (SVCCA) or
  weighted by Morcos et al. 2018's projection weights alpha_i = sum_j |<h_i, x_j>| over side a's
  neurons (PWCCA; needs side a's features, not only its Gram), or with weights='l2' by side a's
  variance along each variate (a Gram-only variant).
* `rsa`: Euclidean, cosine or correlation RDMs, compared by Spearman or Pearson over i < j
  (correlation distance needs each example's feature mean: `pattern_moments`).
* `linear_predictivity`: held-out R^2 of ridge from a to b (kernel ridge on Gram blocks, lambda
  by leave-one-out).
* `distance_correlation`: dCor^2, CKA with the kernel -D (D the Euclidean distances).
* `procrustes_distance`: arccos of `procrustes` (a distance: lower = more similar,
  `higher_is_similar` False, so its null test uses the lower tail).
Procrustes, the CCA family and ridge take heldout='kfold' (folds within each minibatch, fitted on
k - 1 and scored on the other, from Gram sub-blocks). docs/method.md#other-similarity-measures
derives every formula.

Everything but PWCCA's L1 weights and RSA's correlation distance is computable from the
column-centred linear Gram K = C X X^T C of each layer:
  d2_ij = K_ii + K_jj - 2 K_ij;   cos_ij = K_ij / sqrt(K_ii K_jj);
  |X^T Y|_* = |F_x^T F_y|_*  for any factor K_x = F_x F_x^T (X = F_x W with W^T W a projector, and
  the nuclear norm ignores orthonormal factors), here F = U sqrt(S) from eigh(K) once per layer.

Two halves, as in `cka`:
* Full batch: `linear_cka`, `rbf_cka`, `procrustes`, `mutual_knn` on features `(x, y, ...)`, each
  returning a float: one minibatch of the per-minibatch path below (the same code, n = m).
* Minibatch (device, pure jnp, jit/vmap-able): `minibatch_terms(measure, grams_a, grams_b)` maps
  one minibatch's centred Grams [A, m, m], [B, m, m] to a few small arrays; the host keeps them
  per minibatch in float64 (`init` / `accumulate` / `merge` / `result`). CKA-type measures sum
  per-minibatch HSIC terms and divide once (minibatch CKA); Procrustes and kNN average
  per-minibatch values; both get the exact leave-one-minibatch-out jackknife error.
* Shuffle null: with `perms` [P, m] (from `null_permutations`) every minibatch also scores side b
  with its examples permuted (L -> L[pi][:, pi]), giving per cell a null mean, std and z-score.
Agreement between measures (rank statistics, NumPy only) lives in `agreement`.

Use inside the jitted step that builds the Grams (k minibatches, axis 0 possibly sharded):
  perms = jnp.asarray(null_permutations(seed, P, m))          # once, replicated
  ga, gb = <centred Grams [k, A, m, m], [k, B, m, m]>
  out = terms({"rbf_cka": {}, "procrustes": {}}, ga, gb, perms=perms, stacked=True)
and where `needs(...)` says so, also side a's features (`feats_a`, PWCCA) and both sides'
`pattern_moments` [k, A, 3, m] (`moments_a`, `moments_b`, correlation-distance RSA).
and on the host, per measure: state = init(name, names_a, names_b, num_perms=P, **options);
state = accumulate(state, out[name], mask=<[k] valid minibatches>); result(state).

Cost per minibatch (benchmarks/measures_bench.py): RBF, kNN, RSA, distance correlation and their
nulls are O(A B m^2) like linear CKA; Procrustes, its angle, SVCCA and PWCCA are
O((A + B) m^3 + A B m^3) (and P times that with a null), ridge O(A B L m^3) for L alphas; PWCCA's
L1 projection weights add O(m^2 p_a) per pair (B times the FLOPs of side a's Grams): those are
the measures to budget for.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis.similarity import cka

_HIGHEST = jax.lax.Precision.HIGHEST

MEASURES = ("linear_cka", "rbf_cka", "procrustes", "mutual_knn", "svcca", "pwcca", "rsa",
            "linear_predictivity", "distance_correlation", "procrustes_distance")
# Options of the minibatch terms, with defaults. CKA-type measures default to the unbiased
# per-minibatch HSIC_1 (the paper's minibatch CKA); debiased=False uses HSIC_0 per minibatch.
OPTIONS: dict[str, dict[str, Any]] = {
    "linear_cka": {"debiased": True},
    "rbf_cka": {"sigma": 0.5, "debiased": True},
    "procrustes": {"method": "svd", "rank_rtol": 1e-6, "iterations": 30, "max_rank": None,
                   "heldout": "none", "folds": 2},
    "mutual_knn": {"k": 10},
    "svcca": {"keep": 0.99, "rank_rtol": 1e-6, "heldout": "none", "folds": 2},
    "pwcca": {"keep": 0.99, "rank_rtol": 1e-6, "heldout": "none", "folds": 2, "weights": "l1"},
    "rsa": {"distance": "euclidean", "compare": "spearman"},
    "linear_predictivity": {"alphas": (1e-3, 1e-2, 1e-1, 1.0, 10.0), "heldout": "kfold",
                            "folds": 2},
    "distance_correlation": {"debiased": True},
    "procrustes_distance": {"method": "svd", "rank_rtol": 1e-6, "iterations": 30,
                            "max_rank": None, "heldout": "none", "folds": 2},
}
# "ratio": sums of HSIC terms divided once (cka.CKAState); "mean": average of per-minibatch values.
_KIND = {"linear_cka": "ratio", "rbf_cka": "ratio", "procrustes": "mean", "mutual_knn": "mean",
         "svcca": "mean", "pwcca": "mean", "rsa": "mean", "linear_predictivity": "mean",
         "distance_correlation": "ratio", "procrustes_distance": "mean"}
# Measures whose value rises with similarity (the null test's upper tail); distances fall.
_HIGHER_IS_SIMILAR = {name: name != "procrustes_distance" for name in _KIND}
# Asymmetric measures (a's variance weights, a predicts b): intra-model grids are not symmetrised.
_ASYMMETRIC = ("pwcca", "linear_predictivity")
_FITTED = ("procrustes", "procrustes_distance", "svcca", "pwcca", "linear_predictivity")


RSA_DISTANCES = ("euclidean", "cosine", "correlation")


def needs(measure: str, **options: Any) -> tuple[str, ...]:
  """What `minibatch_terms` needs besides the centred Grams, with these options.

  'features': side a's features (`feats_a`: PWCCA's L1 projection weights sum |<h_i, x_j>| over
  side a's neurons, which no Gram holds); 'moments': both sides' `pattern_moments` (RSA with the
  correlation distance: each example's mean over features, which the column-centred Gram lost).
  """
  opts = resolve_options(measure, **options)
  if measure == "pwcca" and opts["weights"] == "l1":
    return ("features",)
  if measure == "rsa" and opts["distance"] == "correlation":
    return ("moments",)
  return ()


def higher_is_similar(measure: str) -> bool:
  """True for similarities, False for distances (`procrustes_distance`): which tail of the shuffle
  null counts as 'more similar than chance'."""
  return _HIGHER_IS_SIMILAR[_check_measure(measure)]


def value_range(measure: str, **options: Any) -> tuple[float, float]:
  """[low, high] of a mean-type measure's per-minibatch values with these options (CKA-type
  measures: cka's [-1, 1]). Held-out scores are correlations on new examples and can be < 0."""
  opts = resolve_options(measure, **options)
  heldout = opts.get("heldout", "none") != "none"
  if measure == "linear_predictivity":
    return (-np.inf, 1.0)
  if measure == "procrustes_distance":
    return (0.0, np.pi if heldout else np.pi / 2)
  if measure == "rsa" or heldout or _KIND[measure] == "ratio":
    return (-1.0, 1.0)
  return (0.0, 1.0)


def _check_measure(name: str) -> str:
  if name not in _KIND:
    close = difflib.get_close_matches(str(name), MEASURES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown measure {name!r}{hint}; known: {MEASURES}")
  return name


def resolve_options(measure: str, **options: Any) -> dict[str, Any]:
  """The measure's minibatch options: defaults from `OPTIONS` updated by `options` (checked)."""
  defaults = OPTIONS[_check_measure(measure)]
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ValueError(f"{measure}: unknown option(s) {unknown}; accepted: {sorted(defaults)}")
  out = {**defaults, **options}
  if measure == "rbf_cka" and not (np.isscalar(out["sigma"]) and float(out["sigma"]) > 0):
    raise ValueError(f"rbf_cka: sigma must be a positive number, got {out['sigma']!r}")
  if measure == "mutual_knn" and not (isinstance(out["k"], (int, np.integer)) and out["k"] >= 1):
    raise ValueError(f"mutual_knn: k must be a positive int, got {out['k']!r}")
  if measure in _FITTED:
    if out["heldout"] not in ("none", "kfold"):
      raise ValueError(f"{measure}: heldout must be 'none' or 'kfold', got {out['heldout']!r}")
    if not (isinstance(out["folds"], (int, np.integer)) and out["folds"] >= 2):
      raise ValueError(f"{measure}: folds must be an int >= 2, got {out['folds']!r}")
  if measure in ("svcca", "pwcca") and not 0 < float(out["keep"]) <= 1:
    raise ValueError(f"{measure}: keep (variance fraction) must be in (0, 1], got {out['keep']!r}")
  if measure in ("svcca", "pwcca") and not 0 <= float(out["rank_rtol"]) < 1:
    raise ValueError(f"{measure}: rank_rtol must be in [0, 1), got {out['rank_rtol']!r}")
  if measure == "pwcca" and out["weights"] not in ("l1", "l2"):
    raise ValueError(f"pwcca: weights must be 'l1' (Morcos et al.'s projection weights, from the "
                     f"features) or 'l2' (side a's variance, Gram only), got {out['weights']!r}")
  if measure == "rsa":
    if out["distance"] not in RSA_DISTANCES:
      raise ValueError(f"rsa: distance must be one of {RSA_DISTANCES}, got {out['distance']!r}")
    if out["compare"] not in ("spearman", "pearson"):
      raise ValueError(f"rsa: compare must be 'spearman' or 'pearson', got {out['compare']!r}")
  if measure == "linear_predictivity":
    a = out["alphas"]
    a = (a,) if np.isscalar(a) else tuple(a)
    if not a or not all(np.isscalar(v) and float(v) > 0 for v in a):
      raise ValueError(f"linear_predictivity: alphas must be positive numbers, got {a!r}")
    out["alphas"] = tuple(float(v) for v in a)
  if measure in ("procrustes", "procrustes_distance"):
    if out["method"] not in ("svd", "newton_schulz"):
      raise ValueError(f"{measure}: method must be 'svd' or 'newton_schulz', got "
                       f"{out['method']!r}")
    if out["heldout"] != "none" and (out["method"] != "svd" or out["max_rank"] is not None):
      raise ValueError(f"{measure}: heldout='kfold' supports method='svd', max_rank=None only")
    if not 0 <= float(out["rank_rtol"]) < 1:
      raise ValueError(f"procrustes: rank_rtol must be in [0, 1), got {out['rank_rtol']!r}")
    r = out["max_rank"]
    if r is not None and not (isinstance(r, (int, np.integer)) and r >= 1):
      raise ValueError(f"procrustes: max_rank must be None or a positive int, got {r!r}")
    if not (isinstance(out["iterations"], (int, np.integer)) and out["iterations"] >= 1):
      raise ValueError(f"procrustes: iterations must be a positive int, got "
                       f"{out['iterations']!r}")
  return out


# ---------------------------------------------------------------------------------------------
# Full batch: features in, float out (host float64, except CKA's HSIC which is cka's).


def _host_features(x: Any, name: str, min_n: int = 4) -> np.ndarray:
  """[n, ...] -> float64 [n, p] as given (not centred); clear errors for bad input."""
  x = np.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{name} must be [n, ...] features (n examples), got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} has unsupported dtype {x.dtype}")
  x = x.reshape(x.shape[0], -1).astype(np.float64)
  if x.shape[0] < min_n or x.shape[1] == 0:
    raise ValueError(f"{name} needs at least {min_n} examples and 1 feature, got {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN/Inf ({np.size(x) - np.isfinite(x).sum()} values)")
  return x


def _check_pair(x: Any, y: Any, min_n: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 [n, p] features of both sides, as given (not centred)."""
  x, y = _host_features(x, "x", min_n), _host_features(y, "y", min_n)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must hold the same examples: {x.shape[0]} vs {y.shape[0]} rows")
  for name, v in (("x", x), ("y", y)):
    if not np.any(v - v.mean(0, keepdims=True)):
      raise ValueError(f"{name} is constant over the examples (similarity undefined)")
  return x, y


def _full_batch(measure: str, x: Any, y: Any, **options: Any) -> float:
  """One minibatch of the per-minibatch path: the n examples' centred Grams (and the features or
  `pattern_moments` where `needs` says so), the measure's `minibatch_terms`, and `result` of a
  state holding that one minibatch."""
  opts = resolve_options(measure, **options)
  x, y = _check_pair(x, y)
  if measure == "mutual_knn" and opts["k"] >= x.shape[0]:
    raise ValueError(f"mutual_knn needs k < n, got k = {opts['k']}, n = {x.shape[0]}")
  # Centred in float64 here (a large offset survives), then float32 Grams as on device.
  xc, yc = (v - v.mean(0, keepdims=True) for v in (x, y))
  grams = [cka.centred_grams([v.astype(np.float32)]) for v in (xc, yc)]
  extra = {}
  if "features" in needs(measure, **opts):
    extra["feats_a"] = [xc.astype(np.float32)]
  if "moments" in needs(measure, **opts):  # from the features as given: their means matter
    extra["moments_a"], extra["moments_b"] = (pattern_moments([v.astype(np.float32)])
                                              for v in (x, y))
  state = accumulate(init(measure, 1, 1, **opts),
                     minibatch_terms(measure, *grams, **extra, **opts))
  return float(result(state).value[0, 0])


def linear_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
               debiased: bool = False) -> float:
  """Full-batch linear CKA: one minibatch of the `linear_cka` terms (the same number as
  `cka.linear_cka`). x: [n, ...], y: [n, ...] (n >= 4); biased HSIC_0 by default."""
  return _full_batch("linear_cka", x, y, debiased=debiased)


def rbf_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, sigma: float = 0.5,
            debiased: bool = False) -> float:
  """Full-batch CKA with Gaussian kernels (bandwidth sigma^2 * median squared distance).

  One minibatch of the `rbf_cka` terms: kernels from the float32 centred Grams (`rbf_kernels`),
  the median over all n^2 squared distances, the zero diagonal included.

  Args:
    x: [n, ...] features (n >= 4), flattened per example.
    y: [n, ...] features of the same examples.
    sigma: bandwidth as a fraction of the median distance (Kornblith et al.'s `threshold`).
    debiased: False: biased HSIC_0 (values in [0, 1]); True: unbiased HSIC_1 in all three terms.

  Returns:
    RBF CKA as a float.
  """
  return _full_batch("rbf_cka", x, y, sigma=sigma, debiased=debiased)


def procrustes(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, **options: Any) -> float:
  """Full-batch orthogonal-Procrustes similarity |X^T Y|_* / (|X|_F |Y|_F), in [0, 1].

  X, Y are the column-centred features. |X^T Y|_* = max over orthogonal Q of tr(Q^T X^T Y), so this
  is the cosine of the angle between X and the best rotation of Y (its arccos: angular shape
  metric). One minibatch of the `procrustes` terms: the singular values of F_x^T F_y for Gram
  factors F (see the module docstring), O(n min(n, p)^2) instead of an SVD of the [p1, p2]
  matrix X^T Y; float32 Grams, components below `rank_rtol` of the largest eigenvalue dropped.

  Args:
    x: [n, ...] features (n >= 4), flattened per example.
    y: [n, ...] features of the same examples.
    **options: `OPTIONS['procrustes']` (method, rank_rtol, iterations, max_rank).
  """
  return _full_batch("procrustes", x, y, **options)


def mutual_knn(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, k: int = 10) -> float:
  """Full-batch mutual k-nearest-neighbour alignment, in [0, 1].

  For example i, N_x(i) are the k examples j != i with the largest cosine similarity of centred
  features; the value is mean_i |N_x(i) & N_y(i)| / k. One minibatch of the `mutual_knn` terms
  (`knn_indicators` on the float32 centred Gram).

  Ties (equal similarities, e.g. duplicate examples) are broken deterministically: the lower example
  index ranks first (`jax.lax.top_k`). An example equal to the mean (zero centred norm) has
  similarity 0 to every other.

  Args:
    x: [n, ...] features (n >= 4), flattened per example.
    y: [n, ...] features of the same examples.
    k: neighbours per example, 1 <= k < n.
  """
  return _full_batch("mutual_knn", x, y, k=k)


def svcca(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, keep: float = 0.99,
          heldout: str = "none", folds: int = 2, rank_rtol: float = 1e-6) -> float:
  """Full-batch SVCCA (Raghu et al. 2017): the mean canonical correlation of the truncated features.

  Each side keeps its top principal directions holding `keep` of its variance (the leading
  eigenvectors U_r of its centred Gram); the canonical correlations of the two truncated
  representations are the singular values of U_r,x^T U_r,y (both orthonormal bases in example
  space), averaged over the first min(r_x, r_y). One minibatch of the `svcca` terms.

  Args:
    x: [n, ...] features (n >= 4), flattened per example.
    y: [n, ...] features of the same examples.
    keep: variance fraction kept per side, in (0, 1].
    heldout: 'none' (in-sample canonical correlations, in [0, 1]) or 'kfold' (directions fitted
      on k - 1 folds, the mean correlation of the held-out fold's variates, in [-1, 1]).
    folds: k for heldout='kfold' (example i in fold i % k).
    rank_rtol: eigenvalues below this fraction of the largest are dropped.
  """
  return _full_batch("svcca", x, y, keep=keep, heldout=heldout, folds=folds,
                     rank_rtol=rank_rtol)


def pwcca(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, keep: float = 0.99,
          heldout: str = "none", folds: int = 2, rank_rtol: float = 1e-6,
          weights: str = "l1") -> float:
  """Full-batch projection-weighted CCA (Morcos et al. 2018); asymmetric (weights from x).

  The canonical correlations rho_i of `svcca`'s truncated representations (i < min(r_x, r_y)),
  weighted by how much side x's neurons project on its canonical variate h_i (unit norm, in
  example space): alpha_i = sum_j |<h_i, x_j>| over the centred neuron columns x_j of x, then
  sum_i alpha_i rho_i / sum_i alpha_i. Morcos et al.'s code takes the side with fewer neurons;
  here it is always x (call pwcca(y, x) for the other). weights='l2' is a Gram-only variant,
  alpha_i = |X^T h_i|_2^2 = h_i^T K_x h_i (x's variance along h_i), invariant to rotations of x's
  neurons where the L1 weights are not (docs/method.md#other-similarity-measures). One minibatch
  of the `pwcca` terms.

  Args:
    x: [n, ...] features (n >= 4), flattened per example; the weighted side.
    y: [n, ...] features of the same examples.
    keep: variance fraction kept per side, in (0, 1] (1: plain CCA of the non-null directions).
    heldout: 'none' or 'kfold' (as `svcca`; the weights then come from the training rows).
    folds: k for heldout='kfold'.
    rank_rtol: eigenvalues below this fraction of the largest are dropped.
    weights: 'l1' (Morcos et al.) or 'l2' (variance, from the Gram only).
  """
  return _full_batch("pwcca", x, y, keep=keep, heldout=heldout, folds=folds,
                     rank_rtol=rank_rtol, weights=weights)


def rsa(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, distance: str = "euclidean",
        compare: str = "spearman") -> float:
  """Full-batch representational similarity analysis (Kriegeskorte et al. 2008), in [-1, 1].

  RDMs over the n examples: Euclidean (sqrt(K_ii + K_jj - 2 K_ij)) or cosine
  (1 - K_ij / sqrt(K_ii K_jj)) distance of the column-centred features, or correlation distance
  1 - corr(x_i, x_j) of the activation patterns as given (each example's features centred on
  their own mean, from the Gram and `pattern_moments`); compared over the n(n-1)/2 pairs i < j by
  Spearman's rho (average ranks for ties) or Pearson's r. One minibatch of the `rsa` terms.

  Args:
    x: [n, ...] features (n >= 4), flattened per example.
    y: [n, ...] features of the same examples.
    distance: 'euclidean', 'cosine' or 'correlation'.
    compare: 'spearman' or 'pearson'.
  """
  return _full_batch("rsa", x, y, distance=distance, compare=compare)


def linear_predictivity(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
                        alphas: float | Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
                        heldout: str = "kfold", folds: int = 2) -> float:
  """Full-batch ridge predictivity of y from x: held-out R^2, in (-inf, 1]; asymmetric.

  Per fold, ridge with intercept on the other folds (kernel ridge with the training-centred linear
  Gram), lambda = alpha * tr(K_TT) / t chosen from `alphas` by leave-one-out on the training rows,
  then R^2 = 1 - |Y_S - Yhat_S|_F^2 / |Y_S - mean(Y_S)|_F^2 on the test fold (sklearn's
  multioutput='variance_weighted'), averaged over folds. heldout='none': in-sample R^2 of the fit
  on all n. One minibatch of the `linear_predictivity` terms.
  """
  return _full_batch("linear_predictivity", x, y, alphas=alphas, heldout=heldout, folds=folds)


def distance_correlation(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
                         debiased: bool = False) -> float:
  """Full-batch squared distance correlation dCor^2 (Szekely et al. 2007), in [0, 1].

  dCov^2(X, Y) / sqrt(dCov^2(X, X) dCov^2(Y, Y)) from the doubly centred Euclidean distance
  matrices; debiased=True uses the U-centred (bias-corrected, Szekely and Rizzo 2014) estimator,
  which can be slightly negative. The `distance_correlation` terms are CKA's with the kernel -D.
  """
  return _full_batch("distance_correlation", x, y, debiased=debiased)


def procrustes_distance(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
                        **options: Any) -> float:
  """Full-batch angular Procrustes distance arccos(`procrustes`) (Williams et al. 2021).

  In [0, pi/2] radians; 0 for representations equal up to rotation and scale, LOWER means more
  similar (its null test uses the lower tail). Options as `procrustes` (heldout='kfold': the angle
  of the held-out score, in [0, pi]).
  """
  return _full_batch("procrustes_distance", x, y, **options)


# ---------------------------------------------------------------------------------------------
# Device half: per-minibatch terms from centred Grams (pure jnp; jit, vmap and shard as cka's).


def null_permutations(key_or_seed: int | jax.Array, num: int, m: int) -> np.ndarray:
  """P fixed permutations of a minibatch's m examples: [num, m] int32, identical everywhere.

  Drawn with NumPy's PCG64 from an int seed (or from a JAX key, threefry, also
  platform-independent), so every host and device builds the same array; pass it to the jitted
  step as a replicated argument. Row p is applied to side b as L -> L[pi_p][:, pi_p].
  """
  if num < 1 or m < 2:
    raise ValueError(f"need num >= 1 permutations of m >= 2 examples, got num={num}, m={m}")
  if isinstance(key_or_seed, (int, np.integer)):
    rng = np.random.Generator(np.random.PCG64(int(key_or_seed)))
    return np.stack([rng.permutation(m) for _ in range(num)]).astype(np.int32)
  keys = jax.random.split(key_or_seed, num)
  return np.asarray(jax.vmap(lambda k: jax.random.permutation(k, m))(keys), np.int32)


def _self_terms(grams: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unbiased self-HSIC [A] and its scale tr(K)^2/(m(m-3)) [A]: NaN and constant-layer checks."""
  m = grams.shape[-1]
  u = jax.vmap(cka.u_centre)(grams)
  tr = jnp.trace(grams, axis1=-2, axis2=-1)
  return jnp.sum(u * u, axis=(-2, -1)) / (m * (m - 3)), tr * tr / (m * (m - 3))


def _pair_products(ca: jax.Array, cb: jax.Array, perms: jax.Array | None) -> tuple:
  """<ca_a, cb_b> [A, B] and, for each permutation pi, <ca_a, cb_b[pi][:, pi]> [P, A, B]."""
  dot = lambda u, v: jnp.einsum("aij,bij->ab", u, v, precision=_HIGHEST)
  null = None
  if perms is not None:
    # lax.map: one permuted copy of side b at a time ([B, m, m]), not P of them.
    null = jax.lax.map(lambda p: dot(ca, cb[:, p][:, :, p]), perms)
  return dot(ca, cb), null


def _check_grams(grams_a, grams_b, perms) -> tuple[int, int]:
  ga = jnp.shape(grams_a)
  if len(ga) != 3 or ga[1] != ga[2]:
    raise ValueError(f"grams_a must be [A, m, m] centred Grams, got shape {ga}")
  m = ga[1]
  if grams_b is not None and (len(jnp.shape(grams_b)) != 3 or jnp.shape(grams_b)[1:] != (m, m)):
    raise ValueError(f"grams_b must be [B, {m}, {m}] (same examples as grams_a), got "
                     f"{jnp.shape(grams_b)}")
  if m < 4:
    raise ValueError(f"minibatch measures need m >= 4 examples, got m = {m}")
  if perms is not None and (jnp.ndim(perms) != 2 or jnp.shape(perms)[1] != m
                            or not jnp.issubdtype(jnp.result_type(perms), jnp.integer)):
    raise ValueError(f"perms must be [P, {m}] integer permutations, got {jnp.shape(perms)} "
                     f"{jnp.result_type(perms)}")
  return ga[0], m


def _ratio_terms(kern_a, kern_b, perms, debiased: bool) -> dict[str, jax.Array]:
  """HSIC terms of one minibatch's kernels (cka's estimators); kern_b None: intra-model."""
  m = kern_a.shape[-1]
  if debiased:
    centre, norm = cka.u_centre, m * (m - 3)
  else:
    centre, norm = cka.double_centre, (m - 1) ** 2
  ca = jax.vmap(centre)(kern_a)
  cb = ca if kern_b is None else jax.vmap(centre)(kern_b)
  cross, null = _pair_products(ca, cb, perms)
  tr_a = jnp.trace(kern_a, axis1=-2, axis2=-1)
  tr_b = tr_a if kern_b is None else jnp.trace(kern_b, axis1=-2, axis2=-1)
  self_a = jnp.sum(ca * ca, axis=(-2, -1))
  self_b = self_a if kern_b is None else jnp.sum(cb * cb, axis=(-2, -1))
  out = {"cross": cross / norm, "self_a": self_a / norm, "self_b": self_b / norm,
         "scale_a": tr_a * tr_a / norm, "scale_b": tr_b * tr_b / norm,
         "count": jnp.asarray(m, jnp.int32)}
  if null is not None:
    out["null_cross"] = null / norm
  return out


def _order_statistic(v: jax.Array, k: int) -> jax.Array:
  """The k-th smallest (0-based) of v [n] >= 0, exactly, without sorting.

  For non-negative float32 the int32 bit patterns are ordered like the values, so a bisection over
  bit patterns (31 halvings of [0, 2^31)) finds the smallest pattern b with #{v <= b} > k, which is
  the k-th order statistic itself. Each step is one vectorised count over v: O(32 n), where
  XLA:CPU's comparison sort of the m^2 distances measured ~20x slower.
  """
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid) > k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
  lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.int32(0), jnp.max(bits)))
  return jax.lax.bitcast_convert_type(lo, v.dtype)


def _median(d2: jax.Array) -> jax.Array:
  """numpy.median of all entries of d2 [m, m] >= 0 (no -0.0): mean of the two middle ones."""
  v = d2.reshape(-1)
  n = v.shape[0]
  return (_order_statistic(v, (n - 1) // 2) + _order_statistic(v, n // 2)) / 2


def rbf_kernels(grams: jax.Array, sigma: float) -> jax.Array:
  """Gaussian kernels [A, m, m] from centred linear Grams [A, m, m], bandwidth per minibatch.

  d2_ij = K_ii + K_jj - 2 K_ij (clipped at 0, exact zero diagonal); s2 = sigma^2 * median(d2) over
  all m^2 entries. A layer with median 0 (constant, or mostly duplicate examples) gets the kernel
  of ones, whose self-HSIC is 0: the host then refuses it as a constant layer.
  """
  def one(g):
    d = jnp.diagonal(g)
    d2 = d[:, None] + d[None, :] - 2 * g
    # Clip rounding below 0 to +0.0 (never -0.0: the median bisects bit patterns); exact 0 diagonal.
    d2 = jnp.where((d2 > 0) & ~jnp.eye(g.shape[0], dtype=bool), d2, 0.0)
    s2 = sigma ** 2 * _median(d2)
    return jnp.where(s2 > 0, jnp.exp(-d2 / jnp.where(s2 > 0, 2 * s2, 1)), 1.0)
  return jax.vmap(one)(grams)


def _host_lapack() -> bool:
  # XLA:CPU's own eigh / svd kernels were seen to stall forever (no CPU time, no error) inside
  # the Procrustes programs when several simulated devices share two cores; on CPU the same
  # LAPACK routines run through NumPy on the host instead. Accelerators keep their solvers.
  return jax.default_backend() == "cpu"


def _eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of symmetric [..., m, m] matrices."""
  if not _host_lapack():
    return jnp.linalg.eigh(x)
  out = (jax.ShapeDtypeStruct(x.shape[:-1], x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
  return jax.pure_callback(
      lambda a: _nan_where_bad(a, np.linalg.eigh(_finite_or_nan(a))), out, x,
      vmap_method="expand_dims")


def _nan_where_bad(a: np.ndarray, eig: tuple[np.ndarray, np.ndarray]) -> tuple:
  bad = ~np.isfinite(a).all(axis=(-2, -1))
  s, u = (v.astype(a.dtype) for v in eig)
  s[bad], u[bad] = np.nan, np.nan
  return s, u


def _finite_or_nan(a: np.ndarray) -> np.ndarray:
  # NumPy raises on NaN/Inf where XLA's kernels return NaN; NaN results are what the host
  # accumulator's check reports, naming the layer.
  a = np.array(a)
  bad = ~np.isfinite(a).all(axis=(-2, -1))
  a[bad] = 0.0
  return a


def _svdvals(x: jax.Array) -> jax.Array:
  """Singular values of [..., r, r] matrices."""
  if not _host_lapack():
    return jnp.linalg.svd(x, compute_uv=False)
  out = jax.ShapeDtypeStruct(x.shape[:-1], x.dtype)
  def svdvals(a):
    bad = ~np.isfinite(a).all(axis=(-2, -1))
    v = np.linalg.svd(_finite_or_nan(a), compute_uv=False).astype(a.dtype)
    v[bad] = np.nan
    return v

  return jax.pure_callback(svdvals, out, x, vmap_method="expand_dims")


def gram_factors(grams: jax.Array, rank_rtol: float, max_rank: int | None = None) -> jax.Array:
  """Factors F [A, m, r] with F F^T = K (F = U sqrt(S)), eigenvalues <= rank_rtol * max zeroed.

  r = m, or with max_rank the top max_rank components only (F F^T is then the Gram of the
  features' rank-r PCA approximation; the pair cost falls as r^3).

  eigh of a float32 Gram leaves the null directions (at least the centring direction) at
  +-eps*|K| rather than 0; their square roots (~3e-4 sqrt|K|) would add spurious singular values to
  every nuclear norm, so components below the numerical rank are dropped.
  """
  s, u = _eigh(grams)  # ascending
  if max_rank is not None and max_rank < s.shape[-1]:
    s, u = s[:, -max_rank:], u[:, :, -max_rank:]
  s_max = jnp.max(s, axis=-1, keepdims=True)
  root = jnp.where(s > rank_rtol * s_max, jnp.sqrt(jnp.maximum(s, 0)), 0)
  return u * root[:, None, :]


def _nuclear_norms(fa: jax.Array, fb: jax.Array, method: str, iterations: int) -> jax.Array:
  """|F_a^T F_b|_* for every pair: fa [A, m, r], fb [B, m, r] -> [A, B]; one row a at a time.

  'svd': singular values of the [r, r] product (float32-exact). 'newton_schulz': the polar factor
  Q of M by X <- 1.5 X - 0.5 X X^T X from X = M/|M|_F (GEMMs only), and |M|_* = tr(Q^T M). It
  converges for singular values in (0, sqrt(3)); unconverged small ones only lower the trace by
  about sigma_i, so its error is one-sided and weighted by the small singular values.
  """
  def row(f):
    mat = jnp.einsum("mi,bmj->bij", f, fb, precision=_HIGHEST)
    if method == "svd":
      return jnp.sum(_svdvals(mat), axis=-1)
    fro = jnp.sqrt(jnp.sum(mat * mat, axis=(-2, -1), keepdims=True))
    x0 = mat / jnp.where(fro > 0, fro, 1)

    def step(_, x):
      g = jnp.einsum("bki,bkj->bij", x, x, precision=_HIGHEST)
      return 1.5 * x - 0.5 * jnp.einsum("bik,bkj->bij", x, g, precision=_HIGHEST)
    q = jax.lax.fori_loop(0, iterations, step, x0)
    return jnp.sum(q * mat, axis=(-2, -1))
  return jax.lax.map(row, fa)


def _procrustes_heldout_terms(grams_a, grams_b, perms, rank_rtol, folds):
  fa = gram_factors(grams_a, rank_rtol)
  fb = fa if grams_b is None else gram_factors(grams_b, rank_rtol)
  splits = fold_indices(grams_a.shape[-1], folds)
  out = {"value": _heldout_procrustes(fa, fb, splits, rank_rtol)}
  if perms is not None:
    out["null"] = jax.lax.map(lambda p: _heldout_procrustes(fa, fb[:, p], splits, rank_rtol),
                              perms)
  return out


def _procrustes_terms(grams_a, grams_b, perms, method, rank_rtol, iterations, max_rank):
  fa = gram_factors(grams_a, rank_rtol, max_rank)
  fb = fa if grams_b is None else gram_factors(grams_b, rank_rtol, max_rank)
  # |F|_F^2 = tr(K) (of the kept components: with max_rank, Procrustes of the PCA approximations).
  tr_a = jnp.sum(fa * fa, axis=(-2, -1))
  tr_b = tr_a if grams_b is None else jnp.sum(fb * fb, axis=(-2, -1))
  norm = jnp.sqrt(jnp.maximum(tr_a, 0))[:, None] * jnp.sqrt(jnp.maximum(tr_b, 0))[None, :]
  nuc = functools.partial(_nuclear_norms, method=method, iterations=iterations)
  out = {"value": nuc(fa, fb) / norm}
  if perms is not None:  # F_b of L[pi][:, pi] is F_b[pi]: permute the factor's rows.
    out["null"] = jax.lax.map(lambda p: nuc(fa, fb[:, p]), perms) / norm[None]
  return out


def knn_indicators(grams: jax.Array, k: int) -> jax.Array:
  """[A, m, m] 0/1 matrices, I[i, j] = 1 iff j is among the k nearest neighbours of i.

  Neighbours by cosine similarity K_ij / sqrt(K_ii K_jj) of the centred features, i itself
  excluded; `lax.top_k` breaks ties by the lower index (as `mutual_knn`). Zero-norm examples have
  similarity 0 to all.
  """
  m = grams.shape[-1]

  def one(g):
    norm = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
    safe = jnp.where(norm > 0, norm, 1)
    cos = g / (safe[:, None] * safe[None, :])
    cos = jnp.where(jnp.eye(m, dtype=bool), -jnp.inf, cos)
    _, idx = jax.lax.top_k(cos, k)
    return jnp.zeros((m, m), jnp.float32).at[jnp.arange(m)[:, None], idx].set(1.0)
  return jax.vmap(one)(grams)


def _knn_terms(grams_a, grams_b, perms, k):
  m = grams_a.shape[-1]
  if k >= m:
    raise ValueError(f"mutual_knn needs k < m, got k = {k}, m = {m}")
  ia = knn_indicators(grams_a, k)
  ib = ia if grams_b is None else knn_indicators(grams_b, k)
  # sum_i |N_a(i) & N_b(i)| = <I_a, I_b>; the neighbours of L[pi][:, pi] are I_b[pi][:, pi].
  shared, null = _pair_products(ia, ib, perms)
  out = {"value": shared / (m * k)}
  if null is not None:
    out["null"] = null / (m * k)
  return out


# ---------------------------------------------------------------------------------------------
# The reviewer's measures (docs/method.md#other-similarity-measures): CCA family, RSA, ridge
# predictivity, distance correlation, angular Procrustes. All from the centred Grams.


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Full SVD u [..., r, r], s [..., r], vt [..., c, c] of [..., r, c] (host LAPACK on CPU)."""
  if not _host_lapack():
    return jnp.linalg.svd(x, full_matrices=True)
  *lead, r, c = x.shape
  out = (jax.ShapeDtypeStruct((*lead, r, r), x.dtype),
         jax.ShapeDtypeStruct((*lead, min(r, c)), x.dtype),
         jax.ShapeDtypeStruct((*lead, c, c), x.dtype))

  def svd(a):
    bad = ~np.isfinite(a).all(axis=(-2, -1))
    u, s, vt = (v.astype(a.dtype) for v in np.linalg.svd(_finite_or_nan(a), full_matrices=True))
    u[bad], s[bad], vt[bad] = np.nan, np.nan, np.nan
    return u, s, vt
  return jax.pure_callback(svd, out, x, vmap_method="expand_dims")


def fold_indices(m: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, test) example indices of the k folds within a minibatch: example i is in fold i % k.

  The analyses' minibatches are drawn in stream order from a shuffled split, so interleaved folds
  are random folds; they are static (the same in every minibatch and on every device).
  """
  if not (isinstance(folds, (int, np.integer)) and 2 <= folds <= m // 2):
    raise ValueError(f"heldout='kfold' needs 2 <= folds <= m / 2, got folds={folds!r}, m={m}")
  i = np.arange(m)
  return [(i[i % folds != f], i[i % folds == f]) for f in range(folds)]


def cca_bases(grams: jax.Array, keep: float, rank_rtol: float) -> tuple[jax.Array, jax.Array,
                                                                           jax.Array]:
  """SVCCA's truncation from centred Grams: kept eigenvectors, eigenvalues and their number.

  grams: [A, m, m]. Returns u [A, m, m] (columns in descending eigenvalue order, dropped ones
  zero), s [A, m] (eigenvalues, dropped ones zero) and r [A] int. A component is kept while the
  variance before it is below `keep` of the total (the smallest r with >= keep of the variance)
  and its eigenvalue above `rank_rtol` of the largest. The kept columns are an orthonormal basis
  of the column space of the truncated centred features X_r = U_r S_r^1/2 V_r^T (Raghu et al.
  2017's SVD step: the features' top principal components are the Gram's top eigenvectors).
  """
  s, u = _eigh(grams)
  s, u = jnp.maximum(s[..., ::-1], 0), u[..., ::-1]
  before = jnp.cumsum(s, axis=-1) - s
  mask = (before < keep * jnp.sum(s, axis=-1, keepdims=True)) & (s > rank_rtol * s[..., :1])
  return u * mask[:, None, :], s * mask, jnp.sum(mask, axis=-1)


def _first(n_min: jax.Array, size: int) -> jax.Array:
  return (jnp.arange(size) < n_min).astype(jnp.float32)


# Bytes of the [p, c n] product one chunk of PWCCA's L1 weights may hold (c layers of side b).
_L1_CHUNK_BYTES = 1 << 28


def _l1_weights(x: jax.Array, h: jax.Array) -> jax.Array:
  """Morcos et al.'s projection weights: x [t, p] centred neurons, h [B, t, n] unit variates ->
  [B, n] sum_j |<h_i, x_j>| = |X^T h_i|_1.

  The variates of c layers b at a time form one [t, c n] matrix, so X is read once per chunk
  (one GEMM instead of c thin ones; c = 1 when a single [p, n] product already fills
  `_L1_CHUNK_BYTES`), lax.map over the chunks.
  """
  b, t, n = h.shape
  p = x.shape[1]
  c = int(max(1, min(b, _L1_CHUNK_BYTES // max(4 * p * n, 1))))
  pad = -b % c
  hc = jnp.concatenate([h, jnp.zeros((pad, t, n), h.dtype)]) if pad else h
  hc = hc.reshape(-1, c, t, n)
  out = jax.lax.map(lambda hb: jnp.sum(jnp.abs(jnp.einsum(
      "tp,ctn->cpn", x, hb, precision=_HIGHEST)), axis=1), hc)
  return out.reshape(-1, n)[:b]


def _cca_pair(ua, sa, ra, ub, rb, weighted: bool, xa: jax.Array | None = None) -> jax.Array:
  """SVCCA / PWCCA of one layer a against every layer b (ub [B, m, m], rb [B]) -> [B].

  xa: side a's centred features [m, p] for the L1 weights (None: the Gram-only L2 weights)."""
  mat = jnp.einsum("mi,bmj->bij", ua, ub, precision=_HIGHEST)
  n_min = jnp.minimum(ra, rb)  # [B]
  m = ua.shape[0]
  if not weighted:  # canonical correlations: singular values of U_a^T U_b, mean of the first n_min
    rho = _svdvals(mat)
    first = jax.vmap(_first, (0, None))(n_min, m)
    return jnp.sum(rho * first, -1) / jnp.maximum(n_min, 1)
  p, rho, _ = _svd(mat)
  if xa is None:
    # alpha_i = |X^T h_i|^2 = p_i^T S_a p_i for the variate h_i = U_a p_i (side a's variance)
    alpha = jnp.einsum("k,bki->bi", sa, p * p, precision=_HIGHEST)
  else:  # alpha_i = |X^T h_i|_1 with the unit variates h_i = U_a p_i (orthonormal columns)
    alpha = _l1_weights(xa, jnp.einsum("mk,bki->bmi", ua, p, precision=_HIGHEST))
  alpha = alpha * jax.vmap(_first, (0, None))(n_min, m)
  return jnp.sum(alpha * rho, -1) / jnp.sum(alpha, -1)


def _cca_fold_side(u: jax.Array, s: jax.Array, train: np.ndarray, test: np.ndarray, rtol: float):
  """One side's fit on the training rows of its truncated basis u [m, m] (s [m] eigenvalues).

  U_T = Q Sigma V^T (rank tolerance rtol): Q [t, t] (masked) spans the training variates, Z = U_S V
  Sigma^+ [s, t] maps test rows to the same whitened coordinates, Kq = Q^T K_TT Q [t, t] is the
  training variance in them (K_TT of the truncated features), rank [] their number.
  """
  ut, us = u[train], u[test]
  q, sig, vt = _svd(ut)  # q [t, t], sig [t], vt [m, m]
  t = ut.shape[0]
  keep = sig > rtol * jnp.maximum(sig[0], 1e-30)
  inv = jnp.where(keep, 1 / jnp.where(keep, sig, 1), 0)
  q = q * keep[None, :].astype(q.dtype)
  z = jnp.einsum("sm,jm->sj", us, vt[:t], precision=_HIGHEST) * inv[None, :]
  k_tt = jnp.einsum("im,m,jm->ij", ut, s, ut, precision=_HIGHEST)
  kq = jnp.einsum("ti,tu,uj->ij", q, k_tt, q, precision=_HIGHEST)
  return q, z, kq, jnp.sum(keep)


def _test_correlations(ha: jax.Array, hb: jax.Array) -> jax.Array:
  """Correlation over test rows of each column pair: ha, hb [s, n] -> [n] (0 where constant)."""
  ha = ha - ha.mean(0, keepdims=True)
  hb = hb - hb.mean(0, keepdims=True)
  den = jnp.sqrt(jnp.sum(ha * ha, 0) * jnp.sum(hb * hb, 0))
  return jnp.where(den > 0, jnp.sum(ha * hb, 0) / jnp.where(den > 0, den, 1), 0)


def _cca_heldout_pair(fa, fb, weighted: bool, xa_train: jax.Array | None = None) -> jax.Array:
  """Held-out SVCCA / PWCCA of one fold: canonical directions fitted on the training rows, the
  correlations of the test rows' variates along them. fa, fb: `_cca_fold_side` of each side;
  xa_train: side a's centred features' training rows [t, p] for the L1 weights (None: L2)."""
  qa, za, kqa, ra = fa
  qb, zb, _, rb = fb
  p, _, rt = _svd(jnp.einsum("ti,tj->ij", qa, qb, precision=_HIGHEST))
  corr = _test_correlations(za @ p, zb @ rt.T)
  first = _first(jnp.minimum(ra, rb), corr.shape[0])
  if not weighted:
    return jnp.sum(corr * first) / jnp.maximum(jnp.sum(first), 1)
  if xa_train is None:
    alpha = jnp.einsum("ki,kl,li->i", p, kqa, p, precision=_HIGHEST)
  else:  # the training variates Q_a p_i (unit norm) against the training rows of the neurons
    alpha = _l1_weights(xa_train, (qa @ p)[None])[0]
  alpha = alpha * first
  return jnp.sum(alpha * corr) / jnp.sum(alpha)


def centred_features(feats: Sequence[jax.Array]) -> list[jax.Array]:
  """A arrays [m, ...] -> float32 [m, p] with zero column means (PWCCA's neuron columns x_j)."""
  out = []
  for x in feats:
    x = jnp.asarray(x).reshape(jnp.shape(x)[0], -1).astype(jnp.float32)
    out.append(x - jnp.mean(x, axis=0, keepdims=True))
  return out


def _cca_terms(grams_a, grams_b, perms, weighted, keep, rank_rtol, heldout, folds, feats_a=None):
  ua, sa, ra = cca_bases(grams_a, keep, rank_rtol)
  ub, sb, rb = (ua, sa, ra) if grams_b is None else cca_bases(grams_b, keep, rank_rtol)
  m = grams_a.shape[-1]
  # L1 weights: the layers of side a have different widths p, so the rows of the grid are a
  # Python loop over them (one [p, n] product per pair inside) instead of one lax.map.
  xs = None if feats_a is None else centred_features(feats_a)
  if heldout == "none":
    def grid(ub_):
      if xs is None:
        return jax.lax.map(lambda x: _cca_pair(*x, ub_, rb, weighted), (ua, sa, ra))
      return jnp.stack([_cca_pair(ua[i], sa[i], ra[i], ub_, rb, True, x)
                        for i, x in enumerate(xs)])
  else:
    splits = fold_indices(m, folds)
    side = lambda u, s: [jax.vmap(lambda uu, ss: _cca_fold_side(uu, ss, tr, te, rank_rtol))(u, s)
                         for tr, te in splits]
    fit_a = side(ua, sa)

    def grid(ub_):
      fit_b = side(ub_, sb)
      if xs is None:
        per_fold = [jax.lax.map(lambda fa1: jax.vmap(lambda fb1: _cca_heldout_pair(
            fa1, fb1, weighted))(fb), fa) for fa, fb in zip(fit_a, fit_b)]
      else:
        per_fold = [jnp.stack([jax.vmap(lambda fb1, i=i, x=x, tr=tr: _cca_heldout_pair(
            jax.tree.map(lambda v: v[i], fa), fb1, True, x[tr]))(fb) for i, x in enumerate(xs)])
            for (tr, _), fa, fb in zip(splits, fit_a, fit_b)]
      return sum(per_fold) / len(per_fold)
  out = {"value": grid(ub)}
  if perms is not None:  # the basis of L[pi][:, pi] is U_b[pi]: permute its rows
    out["null"] = jax.lax.map(lambda p: grid(ub[:, p]), perms)
  return out


def _heldout_procrustes(fa, fb, splits, rank_rtol) -> jax.Array:
  """Held-out Procrustes of factor rows: the rotation fitted on the training rows (the polar
  factor of F_a,T^T F_b,T on its non-zero singular values), scored on the test rows:
  tr(Q^T F_a,S^T F_b,S) / (|F_a,S| |F_b,S|). fa [A, m, r], fb [B, m, r] -> [A, B]."""
  total = 0.0
  for tr, te in splits:
    na = jnp.sqrt(jnp.sum(fa[:, te] ** 2, axis=(-2, -1)))
    nb = jnp.sqrt(jnp.sum(fb[:, te] ** 2, axis=(-2, -1)))

    def row(f, na_=None):
      fit = jnp.einsum("mi,bmj->bij", f[tr], fb[:, tr], precision=_HIGHEST)
      u, s, vt = _svd(fit)
      keep = (s > rank_rtol * jnp.maximum(s[:, :1], 1e-30)).astype(s.dtype)
      q = jnp.einsum("bik,bk,bkj->bij", u, keep, vt, precision=_HIGHEST)
      cross = jnp.einsum("mi,bmj->bij", f[te], fb[:, te], precision=_HIGHEST)
      return jnp.sum(q * cross, axis=(-2, -1))
    total = total + jax.lax.map(row, fa) / (na[:, None] * nb[None, :])
  return total / len(splits)


def _train_centring(g: jax.Array, train: np.ndarray) -> jax.Array:
  """J G J^T with J = I - 1 w^T, w the training rows' mean weights: the Gram of features centred
  on the training examples' mean (as a ridge fit with an intercept sees them). g [..., m, m]."""
  m = g.shape[-1]
  w = np.zeros(m, np.float32)
  w[train] = 1.0 / len(train)
  gw = jnp.einsum("...ij,j->...i", g, w, precision=_HIGHEST)  # G w
  wgw = jnp.einsum("...i,i->...", gw, w, precision=_HIGHEST)
  return g - gw[..., :, None] - gw[..., None, :] + wgw[..., None, None]


def _ridge_fold_side(k: jax.Array, train: np.ndarray, test: np.ndarray, alphas: tuple):
  """Side a's ridge operators for one fold and every lambda: k [m, m] training-centred Gram.

  lambda = alpha * tr(K_TT) / t (scale-free). H = K_TT (K_TT + lambda I)^-1 [L, t, t] (the
  training hat matrix) and P = K_ST (K_TT + lambda I)^-1 [L, s, t] (the test predictor).
  """
  k_tt, k_st = k[train][:, train], k[test][:, train]
  lam_, v = _eigh(k_tt[None])
  lam_, v = jnp.maximum(lam_[0], 0), v[0]
  lam = jnp.asarray(alphas, jnp.float32)[:, None] * jnp.sum(lam_) / len(train)  # [L, 1]
  inv = 1 / (lam_[None, :] + lam)  # [L, t]
  h = jnp.einsum("ik,lk,jk->lij", v, lam_[None] * inv, v, precision=_HIGHEST)
  g = jnp.einsum("ik,lk,jk->lij", v, inv, v, precision=_HIGHEST)
  p = jnp.einsum("si,lij->lsj", k_st, g, precision=_HIGHEST)
  return h, p


def _ridge_pair(h, p, l, train, test, in_sample: bool) -> jax.Array:
  """R^2 of one fold for one pair: lambda by leave-one-out on the training rows, then
  1 - |Y_S - Yhat_S|^2 / |Y_S - mean_S|^2 from the Gram blocks of L (training-centred)."""
  l_tt, l_st, l_ss = l[train][:, train], l[test][:, train], l[test][:, test]
  t = len(train)
  e = jnp.eye(t, dtype=l.dtype)[None] - h  # [L, t, t] I - H
  res = jnp.einsum("lij,jk,lmk->lim", e, l_tt, e, precision=_HIGHEST)  # (I-H) L (I-H)^T
  d = jnp.diagonal(res, axis1=-2, axis2=-1)
  lev = jnp.diagonal(e, axis1=-2, axis2=-1)
  loo = jnp.sum(d / jnp.maximum(lev, 1e-12) ** 2, -1)  # sum of squared LOO residuals (Rifkin)
  best = jnp.argmin(loo)
  if in_sample:
    sse, sst = jnp.trace(res[best]), jnp.trace(l_tt)
    return 1 - sse / sst
  pb = p[best]
  sse = (jnp.trace(l_ss) - 2 * jnp.sum(pb * l_st)
         + jnp.einsum("sj,jk,sk->", pb, l_tt, pb, precision=_HIGHEST))
  s = len(test)
  sst = jnp.trace(l_ss) - jnp.sum(l_ss) / s
  return 1 - sse / sst


def _ridge_terms(grams_a, grams_b, perms, alphas, heldout, folds):
  m = grams_a.shape[-1]
  gb_all = grams_a if grams_b is None else grams_b
  if heldout == "none":
    splits = [(np.arange(m), np.arange(m))]
  else:
    splits = fold_indices(m, folds)
  fits = []
  for tr, te in splits:
    ka = _train_centring(grams_a, tr)
    fits.append(jax.vmap(lambda k: _ridge_fold_side(k, tr, te, alphas))(ka))

  def grid(gb):
    total = 0.0
    for (tr, te), (h, p) in zip(splits, fits):
      lb = _train_centring(gb, tr)
      total = total + jax.lax.map(lambda hp: jax.vmap(lambda l: _ridge_pair(
          hp[0], hp[1], l, tr, te, heldout == "none"))(lb), (h, p))
    return total / len(splits)
  out = {"value": grid(gb_all)}
  if perms is not None:
    out["null"] = jax.lax.map(lambda p: grid(gb_all[:, p][:, :, p]), perms)
  return out


def _average_ranks(v: jax.Array) -> jax.Array:
  """Ranks 1..n of v [n], ties at their average rank (scipy.stats.rankdata's default)."""
  s = jnp.sort(v)
  lo = jnp.searchsorted(s, v, side="left")
  hi = jnp.searchsorted(s, v, side="right")
  return (lo + hi + 1).astype(jnp.float32) / 2


def pattern_moments(feats: Sequence[jax.Array]) -> jax.Array:
  """What RSA's correlation distance needs besides the column-centred Gram: [A, 3, m] float32.

  With c the column means of X [m, p], X~ = X - 1 c^T (the Gram's features, G = X~ X~^T),
  mu~_i = mean_f X~_if, cbar = mean_f c_f and d = c - cbar 1 (the mean pattern, centred over
  features), example i's pattern centred on its own mean is r_i = x_i - mean(x_i) 1 =
  (x~_i - mu~_i 1) + d, and since <1, d> = 0:
    <r_i, r_j> = G_ij - p mu~_i mu~_j + e_i + e_j + |d|^2,   e_i = <x~_i, d>.
  Rows: u = sqrt(p) mu~, e, and |d|^2 repeated m times (so <r_i, r_j> = G - u u^T + e 1^T + 1 e^T
  + |d|^2). All are small next to the Gram: one more pass over the features, O(m p) per layer.

  Args:
    feats: A arrays [m, ...] of the same m examples, as captured (not centred).

  Returns:
    [A, 3, m] per-example moments, rows (u, e, |d|^2).
  """
  out = []
  for x in feats:
    x = jnp.asarray(x).reshape(jnp.shape(x)[0], -1).astype(jnp.float32)
    m, p = x.shape
    c = jnp.mean(x, axis=0)
    xt = x - c[None]
    d = c - jnp.mean(c)
    e = jnp.einsum("mp,p->m", xt, d, precision=_HIGHEST)
    out.append(jnp.stack([jnp.sqrt(jnp.float32(p)) * jnp.mean(xt, axis=1), e,
                          jnp.full((m,), jnp.sum(d * d), jnp.float32)]))
  return jnp.stack(out)


def _row_centred_gram(g: jax.Array, moments: jax.Array) -> jax.Array:
  """<r_i, r_j> [m, m] of one layer from its centred Gram and `pattern_moments` [3, m]."""
  u, e, dd = moments
  return g - u[:, None] * u[None, :] + e[:, None] + e[None, :] + dd[0]


def rdm_standardised(grams: jax.Array, distance: str, compare: str,
                     moments: jax.Array | None = None) -> jax.Array:
  """[A, m, m] symmetric matrices holding each layer's standardised upper-triangle RDM entries.

  RDM_ij: Euclidean distance sqrt(K_ii + K_jj - 2 K_ij), the cosine distance
  1 - K_ij / sqrt(K_ii K_jj) of the column-centred patterns, or the correlation distance
  1 - R_ij / sqrt(R_ii R_jj) with R the Gram of the patterns centred on their own means (from
  `moments` [A, 3, m], `pattern_moments`; an example with a constant pattern has correlation 0 to
  every other). compare='spearman' replaces the
  m(m-1)/2 entries i < j by their average ranks; the entries are then centred and scaled to unit
  norm, mirrored below the diagonal (zero diagonal), so <R_a, R_b> / 2 is Pearson's r over the
  upper triangle, and the RDM of L[pi][:, pi] is R_b[pi][:, pi].
  """
  m = grams.shape[-1]
  iu = np.triu_indices(m, 1)
  if distance == "correlation":
    if moments is None or jnp.shape(moments) != (grams.shape[0], 3, m):
      raise ValueError(f"rsa with distance='correlation' needs pattern_moments [A, 3, {m}] of "
                       f"every layer, got {None if moments is None else jnp.shape(moments)}")
    grams = jax.vmap(_row_centred_gram)(grams, moments)

  def one(g):
    d = jnp.diagonal(g)
    if distance == "euclidean":
      rdm = jnp.sqrt(jnp.maximum(d[:, None] + d[None, :] - 2 * g, 0))
    else:
      norm = jnp.sqrt(jnp.maximum(d, 0))
      safe = jnp.where(norm > 0, norm, 1)
      rdm = 1 - g / (safe[:, None] * safe[None, :])
    v = rdm[iu]
    if compare == "spearman":
      v = _average_ranks(v)
    v = v - v.mean()
    n = jnp.sqrt(jnp.sum(v * v))
    v = v / jnp.where(n > 0, n, jnp.nan)  # a constant RDM: NaN, refused by the host
    half = jnp.zeros((m, m), jnp.float32).at[iu].set(v)
    return half + half.T
  return jax.vmap(one)(grams)


def _rsa_terms(grams_a, grams_b, perms, distance, compare, moments_a=None, moments_b=None):
  ra = rdm_standardised(grams_a, distance, compare, moments_a)
  rb = ra if grams_b is None else rdm_standardised(grams_b, distance, compare, moments_b)
  value, null = _pair_products(ra, rb, perms)
  out = {"value": value / 2}
  if null is not None:
    out["null"] = null / 2
  return out


def distance_kernels(grams: jax.Array) -> jax.Array:
  """-D [A, m, m]: minus the Euclidean distance matrices of the centred features (from the Gram).

  Double-centring -D gives minus Szekely's doubly centred distance matrix, so HSIC of these
  'kernels' is the distance covariance dCov^2 and their CKA is dCor^2.
  """
  def one(g):
    d = jnp.diagonal(g)
    d2 = d[:, None] + d[None, :] - 2 * g
    return -jnp.sqrt(jnp.where((d2 > 0) & ~jnp.eye(g.shape[0], dtype=bool), d2, 0.0))
  return jax.vmap(one)(grams)


def _dcor_terms(grams_a, grams_b, perms, debiased):
  da = distance_kernels(grams_a)
  db = None if grams_b is None else distance_kernels(grams_b)
  out = _ratio_terms(da, db, perms, debiased)
  # tr(-D) = 0: the constant-layer yardstick is (sum_ij D_ij / m)^2 / norm instead.
  m = grams_a.shape[-1]
  norm = m * (m - 3) if debiased else (m - 1) ** 2
  scale = lambda k: (jnp.sum(k, axis=(-2, -1)) / m) ** 2 / norm
  out["scale_a"] = scale(da)
  out["scale_b"] = out["scale_a"] if db is None else scale(db)
  return out


def minibatch_terms(measure: str, grams_a: jax.Array, grams_b: jax.Array | None = None, *,
                    perms: jax.Array | None = None, feats_a: Sequence[jax.Array] | None = None,
                    moments_a: jax.Array | None = None, moments_b: jax.Array | None = None,
                    **options: Any) -> dict[str, jax.Array]:
  """Per-minibatch terms of one measure from centred linear Grams; pure, call it inside your jit.

  Args:
    measure: one of `MEASURES`.
    grams_a: [A, m, m] column-centred linear Grams C X X^T C of side a (one minibatch).
    grams_b: [B, m, m] of the same examples, or None for intra-model (each Gram used once).
    perms: optional [P, m] int permutations (`null_permutations`) for the shuffle null.
    feats_a: side a's A features [m, ...] (those of the Grams), where `needs` says 'features'
      (PWCCA's L1 weights); ignored otherwise.
    moments_a: [A, 3, m] `pattern_moments` of side a where `needs` says 'moments' (RSA's
      correlation distance); ignored otherwise.
    moments_b: [B, 3, m] of side b (None for intra-model).
    **options: the measure's options (`OPTIONS`; static: they change the program).

  Returns:
    CKA-type measures: {cross [A, B], self_a [A], self_b [B], scale_a [A], scale_b [B], count []}
    (HSIC per minibatch, as `cka.HSICTerms`), plus null_cross [P, A, B] with perms.
    procrustes / mutual_knn: {value [A, B], self_a [A], scale_a [A], self_b [B], scale_b [B],
    count []} (self/scale: NaN and constant-layer checks on the host), plus null [P, A, B].
    vmap over a leading minibatch axis adds it to every leaf; `accumulate` flattens leading axes.
  """
  opts = resolve_options(measure, **options)
  a, m = _check_grams(grams_a, grams_b, perms)
  need = needs(measure, **opts)
  if "features" in need:
    if feats_a is None or len(feats_a) != a or any(
        jnp.ndim(x) < 2 or jnp.shape(x)[0] != m for x in feats_a):
      raise ValueError(f"{measure} with {dict(opts)} needs feats_a: side a's {a} features "
                       f"[{m}, ...] (those of grams_a), got "
                       f"{None if feats_a is None else [jnp.shape(x) for x in feats_a]}")
    feats_a = list(feats_a)
  else:
    feats_a = None
  if "moments" in need:
    b = a if grams_b is None else jnp.shape(grams_b)[0]
    for name, mo, n in (("moments_a", moments_a, a), ("moments_b", moments_b, b)):
      if name == "moments_b" and grams_b is None:
        continue
      if mo is None or jnp.shape(mo) != (n, 3, m):
        raise ValueError(f"{measure} with {dict(opts)} needs {name}: pattern_moments [{n}, 3, "
                         f"{m}], got {None if mo is None else jnp.shape(mo)}")
  else:
    moments_a = moments_b = None
  if grams_b is None:
    moments_b = None
  # Jitted with static options: inside the caller's jit it is inlined; called eagerly (tests,
  # notebooks) it compiles once per shape instead of dispatching op by op.
  return _terms_jit(measure, tuple(sorted(opts.items())), grams_a, grams_b, perms, feats_a,
                    moments_a, moments_b)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _terms_jit(measure, opts, grams_a, grams_b, perms, feats_a=None, moments_a=None,
               moments_b=None):
  opts = dict(opts)
  m = grams_a.shape[-1]
  grams_a = jnp.asarray(grams_a, jnp.float32)
  grams_b = None if grams_b is None else jnp.asarray(grams_b, jnp.float32)
  if measure == "linear_cka":
    return _ratio_terms(grams_a, grams_b, perms, opts["debiased"])
  if measure == "rbf_cka":
    kb = None if grams_b is None else rbf_kernels(grams_b, float(opts["sigma"]))
    return _ratio_terms(rbf_kernels(grams_a, float(opts["sigma"])), kb, perms, opts["debiased"])
  if measure == "distance_correlation":
    return _dcor_terms(grams_a, grams_b, perms, opts["debiased"])
  if measure in ("procrustes", "procrustes_distance"):
    if opts["heldout"] == "none":
      out = _procrustes_terms(grams_a, grams_b, perms, opts["method"], float(opts["rank_rtol"]),
                              int(opts["iterations"]), opts["max_rank"])
    else:
      out = _procrustes_heldout_terms(grams_a, grams_b, perms, float(opts["rank_rtol"]),
                                      int(opts["folds"]))
    if measure == "procrustes_distance":  # Williams et al.'s angle, per minibatch
      out = {k: jnp.arccos(jnp.clip(v, -1.0, 1.0)) for k, v in out.items()}
  elif measure in ("svcca", "pwcca"):
    out = _cca_terms(grams_a, grams_b, perms, measure == "pwcca", float(opts["keep"]),
                     float(opts["rank_rtol"]), opts["heldout"], int(opts["folds"]), feats_a)
  elif measure == "rsa":
    out = _rsa_terms(grams_a, grams_b, perms, opts["distance"], opts["compare"], moments_a,
                     moments_b)
  elif measure == "linear_predictivity":
    out = _ridge_terms(grams_a, grams_b, perms, tuple(opts["alphas"]), opts["heldout"],
                       int(opts["folds"]))
  else:
    out = _knn_terms(grams_a, grams_b, perms, int(opts["k"]))
  sa, ca = _self_terms(grams_a)
  sb, cb = (sa, ca) if grams_b is None else _self_terms(grams_b)
  return {**out, "self_a": sa, "scale_a": ca, "self_b": sb, "scale_b": cb,
          "count": jnp.asarray(m, jnp.int32)}


def terms(measures: Sequence[str] | Mapping[str, Mapping[str, Any]], grams_a: jax.Array,
          grams_b: jax.Array | None = None, *, perms: jax.Array | None = None,
          feats_a: Sequence[jax.Array] | None = None, moments_a: jax.Array | None = None,
          moments_b: jax.Array | None = None,
          stacked: bool = False) -> dict[str, dict[str, jax.Array]]:
  """`minibatch_terms` of several measures from the same Grams: {measure: terms}.

  Args:
    measures: names (default options) or {name: options}.
    grams_a: [A, m, m], or with stacked=True [k, A, m, m] (vmapped over the minibatch axis k,
      which may be sharded: every minibatch stays where it is).
    grams_b: the same for side b, or None (intra-model).
    perms: [P, m] permutations, the same for every minibatch.
    feats_a: side a's A features [m, ...] ([k, m, ...] stacked), for measures that `needs`
      them (PWCCA's L1 weights).
    moments_a: [A, 3, m] ([k, A, 3, m] stacked) `pattern_moments` of side a, where needed.
    moments_b: the same for side b (None: intra-model).
    stacked: whether axis 0 of the Grams (and features, moments) is the minibatch axis.
  """
  specs = ({str(n): {} for n in measures} if not isinstance(measures, Mapping)
           else {str(n): dict(o) for n, o in measures.items()})

  def one(ga, gb, fa, ma, mb):
    return {n: minibatch_terms(n, ga, gb, perms=perms, feats_a=fa, moments_a=ma, moments_b=mb,
                               **o) for n, o in specs.items()}
  args = (grams_a, grams_b, None if feats_a is None else list(feats_a), moments_a, moments_b)
  return jax.vmap(one)(*args) if stacked else one(*args)


# ---------------------------------------------------------------------------------------------
# Host half: float64 accumulation over minibatches (init, accumulate, merge, result).


_STATE_FIELDS = ("hsic", "value", "null", "num_minibatches", "num_examples", "fingerprint")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_STATE_FIELDS),
                   meta_fields=["measure", "options", "names_a", "names_b", "intra"])
@dataclasses.dataclass(frozen=True)
class MeasureState:
  """float64 per-minibatch values of one measure (orbax and `resume` save it as is).

  CKA-type measures keep a `cka.CKAState` of their per-minibatch HSIC terms (the exact jackknife
  error and the constant-layer checks are cka's); Procrustes and kNN keep their per-minibatch
  values, rows as in `cka.CKAState` (`capacity` rows reserved, grown when needed). `null` sums the
  per-permutation null numerators (CKA-type: cross HSIC) or values, [P, A, B] (P = 0 without a
  null): its spread is over permutations, not minibatches, so sums suffice.
  """
  hsic: cka.CKAState | None      # CKA-type only
  value: np.ndarray | None       # [c, A, B] per-minibatch values, row i = minibatch i (mean-type)
  null: np.ndarray               # [P, A, B]
  num_minibatches: np.ndarray    # [] int64
  num_examples: np.ndarray       # [] int64
  fingerprint: np.ndarray        # [] int64 CRC of measure, options and names
  measure: str = ""
  options: tuple = ()
  names_a: tuple[str, ...] = ()
  names_b: tuple[str, ...] = ()
  intra: bool = False


@dataclasses.dataclass(frozen=True)
class MeasureResult:
  """One measure between every layer of side a (rows) and side b (columns), float64."""
  measure: str
  value: np.ndarray              # [A, B]
  stderr: np.ndarray             # [A, B] over minibatches (jackknife for CKA-type); NaN if k < 2
  null: np.ndarray | None        # [P, A, B] null value per permutation (None without a null)
  null_mean: np.ndarray | None   # [A, B]
  null_std: np.ndarray | None    # [A, B] std over the P permutations (ddof = 1)
  z: np.ndarray | None           # [A, B] (value - null_mean) / null_std (inf/NaN if std is 0)
  names_a: tuple[str, ...]
  names_b: tuple[str, ...]
  num_minibatches: int
  num_examples: int
  options: dict[str, Any]


def _layer_names(num: int | Sequence[str]) -> tuple[str, ...]:
  if isinstance(num, (int, np.integer)):
    return tuple(str(i) for i in range(int(num)))
  return tuple(map(str, num))


def _state_fingerprint(measure, options, names_a, names_b, intra, num_perms) -> np.ndarray:
  key = repr((measure, options, names_a, names_b, intra, num_perms)).encode()
  return np.asarray(zlib.crc32(key), np.int64)


def init(measure: str, names_a: int | Sequence[str], names_b: int | Sequence[str] | None = None,
         *, num_perms: int = 0, capacity: int = 0, **options: Any) -> MeasureState:
  """An empty state for one measure.

  Args:
    measure: one of `MEASURES`.
    names_a: number of layers on side a, or their names.
    names_b: the same for side b; None: intra-model (side b is side a).
    num_perms: P, the number of null permutations the terms carry (0: no null).
    capacity: rows reserved for per-minibatch values (a repeat's k: a checkpoint template then
      has the shapes of every state of the repeat; see `cka.init`).
    **options: the measure's options, as given to `minibatch_terms` (stored for the record).
  """
  opts = resolve_options(measure, **options)
  na = _layer_names(names_a)
  intra = names_b is None
  nb = na if intra else _layer_names(names_b)
  if not na or not nb:
    raise ValueError("need at least one layer per side")
  if num_perms < 0:
    raise ValueError(f"num_perms must be >= 0, got {num_perms}")
  a, b = len(na), len(nb)
  z = lambda *s: np.zeros(s, np.float64)
  ratio = _KIND[measure] == "ratio"
  hsic = cka.init(na, None if intra else nb, capacity=capacity) if ratio else None
  options_t = tuple(sorted(opts.items()))
  return MeasureState(hsic, None if ratio else z(capacity, a, b), z(num_perms, a, b), np.asarray(0, np.int64), np.asarray(0, np.int64),
                      _state_fingerprint(measure, options_t, na, nb, intra, num_perms),
                      measure, options_t, na, nb, intra)


def _check_state(state: MeasureState) -> None:
  fp = _state_fingerprint(state.measure, state.options, state.names_a, state.names_b,
                          state.intra, state.null.shape[0])
  if int(state.fingerprint) != int(fp):
    raise ValueError(f"{state.measure} state does not match its measure/options/layer names "
                     "(restored into a template made differently?); restore into init(<the same "
                     "arguments as when saving>)")


def _bad_layers(state, sa, ca, sb, cb, value) -> None:
  """Raises naming the layers with NaN/Inf or constant features (mean-type measures)."""
  na, nb = state.names_a, state.names_b

  def fail(what, bad_a, bad_b):
    if bad_a.any() or bad_b.any():
      raise ValueError(f"{state.measure}: {what}; nothing accumulated. Layers a: "
                       f"{[na[i] for i in np.flatnonzero(bad_a)]}, layers b: "
                       f"{[nb[i] for i in np.flatnonzero(bad_b)]}")
  nonfinite = "non-finite terms (NaN/Inf in the features, or float32 overflow)"
  fail(nonfinite, ~(np.isfinite(sa) & np.isfinite(ca)).all(0),
       ~(np.isfinite(sb) & np.isfinite(cb)).all(0))
  fail("constant layer(s) (similarity undefined)", ~(sa > cka.CONSTANT_RTOL * ca).all(0),
       ~(sb > cka.CONSTANT_RTOL * cb).all(0))
  fail(nonfinite, ~np.isfinite(value).all((0, 2)), ~np.isfinite(value).all((0, 1)))


def accumulate(state: MeasureState, terms_: Mapping[str, Any],
               mask: jax.typing.ArrayLike | None = None) -> MeasureState:
  """Adds the terms of one or more minibatches (from `minibatch_terms`, any leading axes).

  Args:
    state: from `init` with the same measure, layers and P.
    terms_: the measure's terms dict.
    mask: optional, shaped like the leading axes; minibatches with mask 0 (padding) are skipped.

  Raises:
    ValueError: non-finite terms or a constant layer (named), shapes not matching the state.
  """
  _check_state(state)
  t = {k: cka.host(v) for k, v in terms_.items()}
  a, b = len(state.names_a), len(state.names_b)
  p = state.null.shape[0]
  ratio = _KIND[state.measure] == "ratio"
  main = "cross" if ratio else "value"
  null_key = "null_cross" if ratio else "null"
  expected = {main, "self_a", "scale_a", "self_b", "scale_b", "count"}
  expected |= {null_key} if p else set()
  if set(t) != expected:
    raise ValueError(f"{state.measure}: terms have keys {sorted(t)}, expected {sorted(expected)} "
                     "(terms of another measure, or num_perms does not match the terms' perms?)")
  if t[main].shape[-2:] != (a, b) or (p and t[null_key].shape[-3:] != (p, a, b)):
    raise ValueError(f"{state.measure}: terms for a {t[main].shape[-2:]} layer grid "
                     f"(null {t.get(null_key, np.empty(0)).shape}); the state is [{a}, {b}], P={p}")
  count = t["count"].reshape(-1)
  if mask is not None:
    mask = cka.host(mask).reshape(-1)  # a global array under several processes
    if mask.shape != count.shape:
      raise ValueError(f"mask has {mask.size} entries for {count.size} minibatches")
    count = np.where(mask > 0, count, 0)
  valid = count > 0
  null = t[null_key].reshape(-1, p, a, b)[valid] if p else np.zeros((0, p, a, b))
  if not np.isfinite(null).all():
    raise ValueError(f"{state.measure}: non-finite null terms; nothing accumulated")
  if ratio:
    hsic = cka.accumulate(state.hsic, cka.HSICTerms(
        t["cross"], t["self_a"], t["self_b"], t["scale_a"], t["scale_b"], count))
    value = None
  else:
    hsic = None
    v = t["value"].reshape(-1, a, b)[valid]
    _bad_layers(state, t["self_a"].reshape(-1, a)[valid], t["scale_a"].reshape(-1, a)[valid],
                t["self_b"].reshape(-1, b)[valid], t["scale_b"].reshape(-1, b)[valid], v)
    value = cka.append_rows(state.value, int(state.num_minibatches), v)
  return dataclasses.replace(
      state, hsic=hsic, value=value, null=state.null + null.sum(0),
      num_minibatches=state.num_minibatches + int(valid.sum()),
      num_examples=state.num_examples + int(count[valid].sum()))


def merge(s1: MeasureState, s2: MeasureState) -> MeasureState:
  """Combines two states of disjoint minibatches (devices, hosts, resumed runs). Associative."""
  _check_state(s1)
  _check_state(s2)
  if int(s1.fingerprint) != int(s2.fingerprint):
    raise ValueError(f"cannot merge states of different measures/options/layers: {s1.measure} "
                     f"{s1.options} vs {s2.measure} {s2.options}")
  k1, k2 = int(s1.num_minibatches), int(s2.num_minibatches)
  return dataclasses.replace(
      s1, hsic=None if s1.hsic is None else cka.merge(s1.hsic, s2.hsic),
      value=None if s1.value is None else cka.append_rows(s1.value, k1, s2.value[:k2],
                                                             len(s2.value)),
      null=s1.null + s2.null, num_minibatches=s1.num_minibatches + s2.num_minibatches,
      num_examples=s1.num_examples + s2.num_examples)


def result(state: MeasureState) -> MeasureResult:
  """Values [A, B] with a stderr over minibatches, and the null mean/std/z where P > 0.

  CKA-type: sum of cross HSIC / sqrt(sum self_a * sum self_b) (`cka.result`); null value p: the
  same with the permuted cross sums. Mean-type: mean over minibatches, stderr = std / sqrt(k);
  null value p: mean over minibatches of the permuted values.

  Raises:
    ValueError: nothing accumulated; values out of range (naming a cell).
  """
  _check_state(state)
  k = int(state.num_minibatches)
  if k == 0:
    raise ValueError(f"{state.measure}: no minibatches accumulated")
  sym = ((lambda x: (x + np.swapaxes(x, -1, -2)) / 2)
         if state.intra and state.measure not in _ASYMMETRIC else (lambda x: x))
  if state.hsic is not None:
    r = cka.result(state.hsic)
    value, stderr = r.cka, r.stderr
    _, sa, sb = cka.per_minibatch(state.hsic)
    null = state.null / np.sqrt(np.outer(cka.canonical_sum(sa), cka.canonical_sum(sb)))[None]
  else:
    # The mean over minibatches; its jackknife (leave-one-out means (total - v_i) / (k - 1)) is
    # exactly the standard error of the mean, std(v, ddof=1) / sqrt(k), here from deviations.
    per = sym(state.value[:k])
    total = cka.canonical_sum(per)
    value = total / k
    lo, hi = value_range(state.measure, **dict(state.options))
    bad = ~((value >= lo - cka.RANGE_ATOL) & (value <= hi + cka.RANGE_ATOL))
    if bad.any():
      i, j = np.argwhere(bad)[0]
      raise ValueError(f"{state.measure} out of [{lo}, {hi}] (or NaN) at {bad.sum()} cell(s), "
                       f"e.g. ({state.names_a[i]}, {state.names_b[j]}) = {value[i, j]}")
    value = np.clip(value, lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
      stderr = cka.jackknife_stderr((total[None] - per) / (k - 1))
    null = state.null / k
  null_mean = null_std = z = None
  if null.shape[0]:
    null_mean = null.mean(0)
    null_std = null.std(0, ddof=1) if null.shape[0] > 1 else np.full_like(null_mean, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
      z = (value - null_mean) / null_std
  else:
    null = None
  return MeasureResult(state.measure, value, stderr, null, null_mean, null_std, z,
                       state.names_a, state.names_b, k, int(state.num_examples),
                       dict(state.options))


__all__ = ["MEASURES", "MeasureResult", "MeasureState", "OPTIONS", "accumulate", "cca_bases",
           "centred_features", "distance_correlation", "distance_kernels", "fold_indices",
           "gram_factors", "higher_is_similar", "init", "knn_indicators", "linear_cka",
           "linear_predictivity", "merge", "minibatch_terms", "mutual_knn", "needs",
           "null_permutations", "pattern_moments", "procrustes", "procrustes_distance",
           "pwcca", "rbf_cka", "rbf_kernels", "rdm_standardised", "resolve_options",
           "result", "rsa", "svcca", "terms", "value_range"]
