r"""Few-shot probes for all layers x all regularisers: one compiled call vs a scikit-learn loop.

Both sides get the same cached features (float32 [L, n, d]) and do the same work: z-score with
the fitting set's statistics, append the bias feature 100, ridge onto {-1, +1} targets for every
l2 in the grid, pick l2 on held-out examples, report test accuracy. Ours: `probing.fewshot_all`
(one eigendecomposition per layer serves the whole grid, layers vmapped) + `predict_all`.
Peer: a Python loop over layers and l2 values of `sklearn.linear_model.RidgeClassifier`
(each fit solves its own system). The two must agree on every test accuracy.

  python benchmarks/probe_bench.py                      # CPU sizes (digits-like + larger)
  python benchmarks/probe_bench.py --layers=12 --dim=768 --classes=1000 --shots=10   # ImageNet
  python benchmarks/probe_bench.py --smoke   # seconds (tests/test_benchmarks.py): 2 layers, d=8
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import RidgeClassifier

from vit_analysis.probing import probes as probing


def make_features(layers, classes, per_class, dim, seed=0):
  """Layer l: class means scaled by (l+1)/layers plus unit noise, so accuracy grows with depth."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(classes), per_class)
  means = rng.normal(size=(classes, dim))
  feats = np.stack([means[labels] * (l + 1) / layers * 0.3 + rng.normal(size=(len(labels), dim))
                    for l in range(layers)]).astype(np.float32) + 5.0
  return feats, labels


def ours(feats, labels, fit, val, test, grid, classes):
  """(test accuracy [L], chosen l2 [L], seconds of this call) of the public probe functions.

  The first call of a shape includes compilation (the functions keep their jitted programs).
  """
  args = (jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(fit[None]), jnp.asarray(val[None]),
          jnp.asarray(grid, jnp.float32))
  test_feats = jnp.asarray(feats[:, test])
  jax.block_until_ready((args, test_feats))
  t0 = time.perf_counter()
  _, best, probes = probing.fewshot_all(*args, num_classes=classes)
  preds = probing.predict_all(probes, test_feats)
  preds = np.asarray(jax.block_until_ready(preds))[0]
  t_run = time.perf_counter() - t0
  return (preds == labels[test]).mean(-1), np.asarray(grid)[np.asarray(best)[0]], t_run


def sklearn_loop(feats, labels, fit, val, test, grid):
  t0 = time.perf_counter()
  accs, chosen = [], []
  for x in feats.astype(np.float64):
    mu, sd = x[fit].mean(0), x[fit].std(0) + probing.STD_EPS
    aug = lambda z, mu=mu, sd=sd: np.concatenate(
        [(z - mu) / sd, np.full((len(z), 1), probing.BIAS_CONSTANT)], 1)
    xf, xv, xt = aug(x[fit]), aug(x[val]), aug(x[test])
    best, best_acc, best_clf = None, -1.0, None
    for l2 in grid:
      clf = RidgeClassifier(alpha=l2, fit_intercept=False).fit(xf, labels[fit])
      a = clf.score(xv, labels[val])
      if a >= best_acc:  # ties -> the larger l2, as probing.ridge_select.
        best, best_acc, best_clf = l2, a, clf
    accs.append(best_clf.score(xt, labels[test]))
    chosen.append(best)
  return np.array(accs), np.array(chosen), time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, nargs="*", default=[12])
  p.add_argument("--dim", type=int, nargs="*", default=[128, 384])
  p.add_argument("--classes", type=int, default=100)
  p.add_argument("--shots", type=int, default=10)
  p.add_argument("--holdout", type=int, default=10)
  p.add_argument("--test_per_class", type=int, default=20)
  p.add_argument("--smoke", action="store_true",
                 help="seconds: 2 layers, d = 8, 5 classes, 2-shot, 2 held out, 2 test per class")
  a = p.parse_args()
  if a.smoke:
    a.layers, a.dim, a.classes, a.shots, a.holdout, a.test_per_class = [2], [8], 5, 2, 2, 2
  grid = 2.0 ** np.arange(-10, 21)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {len(grid)} l2 values; "
        f"{a.classes} classes, {a.shots}-shot, {a.holdout} held out per class")
  print(f"{'L':>3} {'d':>5} {'n_fit':>6} | {'ours run s':>10} {'(1st call s)':>12} | "
        f"{'sklearn s':>9} | {'ratio':>6} | max |acc diff|")
  for layers in a.layers:
    for dim in a.dim:
      per_class = a.shots + a.holdout + a.test_per_class
      feats, labels = make_features(layers, a.classes, per_class, dim)
      fit, val = probing.fewshot_split(labels, a.classes, a.shots, a.holdout, seed=0)
      test = np.setdiff1d(np.arange(len(labels)), np.concatenate([fit, val]))
      acc, l2, t_first = ours(feats, labels, fit, val, test, grid, a.classes)  # + compile
      _, _, t_run = ours(feats, labels, fit, val, test, grid, a.classes)
      ref, ref_l2, t_sk = sklearn_loop(feats, labels, fit, val, test, grid)
      print(f"{layers:>3} {dim:>5} {len(fit):>6} | {t_run:>10.3f} {t_first:>12.2f} | "
            f"{t_sk:>9.2f} | {t_sk / t_run:>5.1f}x | {np.abs(acc - ref).max():.4f} "
            f"(l2 agree {np.mean(l2 == ref_l2):.0%}); acc by layer {np.round(acc, 2).tolist()}")


if __name__ == "__main__":
  main()
