"""Cost of each measure's per-minibatch terms relative to linear CKA's, from the same Grams.

Workload: the coarse preset's layer counts, ~26 ViT-B/16 layers (side a) against ~18 ResNet
layers (side b), 468 layer pairs, one minibatch of m = 256 examples (CPU); then m = 1024 for a
handful of layers (2 x 2) to measure how each measure scales with m. Inputs are the centred linear
Grams [A, m, m], [B, m, m] (made once from random full-rank features; their values do not change
the arithmetic), as the analyses will compute them once for all measures. Every measure is one
jitted program `measures.minibatch_terms(name, grams_a, grams_b)`; "linear_cka" is its U-centring
plus the all-pairs HSIC contraction, i.e. what `cka` does per minibatch after the Grams.

The reviewer's measures (SVCCA, PWCCA, RSA, ridge predictivity, distance correlation, the
Procrustes angle; held-out k-fold variants of the fitted ones) are timed the same way. PWCCA's
L1 projection weights (Morcos et al.) also read side a's features, here [m, m + 64] per layer;
RSA's correlation distance reads each layer's `pattern_moments` (both made once, as the step does).

Last, the ViT-B/16 fine-preset step (74 layers at 224 px, random weights, m images, intra-model
74 x 74): the analyses' jitted step (`cka_runner.make_step`: forward, Grams, every pair) with
linear CKA alone and with every measure on (default options, k-NN's k < m), so a user can choose.

Procrustes variants: exact SVD per pair, GEMM-only Newton-Schulz, and both on the top m/4
components of every Gram (`max_rank`: Procrustes of the rank-m/4 PCA approximations, pair cost
/64); their deviation from the full-rank SVD values is printed.

Also printed: the time to build the Grams themselves per ViT-B/16-sized layer (197 tokens x 768
= 151,296 features; 12 such layers in one program, as in a step), which the measures share and which dominates linear CKA end to end, the cost
of the shuffle null (P permutations), and Newton-Schulz Procrustes' deviation from the SVD one.

Scaling to m = 1024 (from the operation counts, checked by the m = 1024 rows): linear CKA, kNN and
the null contractions are O(A B m^2); RBF adds one sort of m^2/2 values per layer; Procrustes is
O((A + B) m^3) for the eigendecompositions plus O(A B m^3) for the pairs (SVD or 30 Newton-Schulz
iterations of two [m, m] GEMMs), so its ratio to linear CKA grows about 4x from m = 256 to 1024.

Usage:
  python benchmarks/measures_bench.py [--m 256] [--big_m 1024] [--reps 3] [--perms 8]
  python benchmarks/measures_bench.py --null_only   # the shuffle-null table alone (~1 min)
  python benchmarks/measures_bench.py --smoke       # seconds, every table (tests/test_benchmarks.py)
  python benchmarks/measures_bench.py --layers_a 4 --layers_b 4 --costs_only  # cost ratios only
  python benchmarks/measures_bench.py --step_only --step_m 8  # the ViT-B/16 step times alone

Known issue (XLA:CPU, jax 0.10.2, 2 shared cores): in three of four runs the process stopped using
CPU inside a Procrustes program (m = 1024 SVD twice; m = 256 Newton-Schulz) after the cheaper ones
had run, and never returned; the same programs run alone finished (m = 1024, 2 x 2: eigh 0.45 s,
SVD 1.0 s, Newton-Schulz 3.4 s). Run under `timeout`.

Times are medians over reps of wall time after one compile run; the machine may be shared, so
read ratios rather than absolute numbers.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis.similarity import cka, measures


def variants(m: int):
  return (("linear_cka", {}), ("rbf_cka", {}), ("mutual_knn", {}),
          ("procrustes", {"method": "svd"}), ("procrustes", {"method": "newton_schulz"}),
          ("procrustes", {"method": "svd", "max_rank": m // 4}),
          ("procrustes", {"method": "newton_schulz", "max_rank": m // 4}),
          ("procrustes", {"heldout": "kfold"}), ("procrustes_distance", {}),
          ("svcca", {}), ("svcca", {"heldout": "kfold"}), ("pwcca", {}),
          ("pwcca", {"heldout": "kfold"}), ("pwcca", {"weights": "l2"}), ("rsa", {}),
          ("rsa", {"compare": "pearson"}), ("rsa", {"distance": "correlation"}),
          ("linear_predictivity", {}), ("distance_correlation", {}))


def make_features(num: int, m: int, seed: int) -> list[jax.Array]:
  """num random full-rank features [m, m + 64] with a decaying spectrum (and an offset)."""
  r = np.random.default_rng(seed)
  p = m + 64
  scale = np.exp(-3.0 * np.arange(p) / p)[None, :].astype(np.float32)
  return [jnp.asarray(r.normal(size=(m, p)).astype(np.float32) * scale + 1.0) for _ in range(num)]


def make_grams(num: int, m: int, seed: int) -> jax.Array:
  """[num, m, m] centred Grams of `make_features`."""
  return jnp.stack([cka.gram_linear(x) for x in make_features(num, m, seed)])


def timed(fn, *args, reps: int) -> tuple[float, object]:
  out = jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), out


def program(name, opts, perms=None, feats_a=None, moments=(None, None)):
  """The measure's terms as one jitted program of the Grams (features and moments, made once by
  the step for every measure that needs them, are closed over)."""
  return jax.jit(lambda ga, gb: measures.minibatch_terms(
      name, ga, gb, perms=perms, feats_a=feats_a, moments_a=moments[0], moments_b=moments[1],
      **opts))


def table(a: int, b: int, m: int, reps: int, perms: int, null_for=("linear_cka", "rbf_cka",
                                                                    "mutual_knn")) -> dict:
  fa, fb = make_features(a, m, 0), make_features(b, m, 1)
  ga, gb = (jnp.stack([cka.gram_linear(x) for x in f]) for f in (fa, fb))
  moments = (measures.pattern_moments(fa), measures.pattern_moments(fb))
  print(f"\n== {a} x {b} layers ({a * b} pairs), m = {m}, median of {reps} reps ==")
  print(f"{'measure':<48}{'s / minibatch':>15}{'x linear_cka':>14}")
  base, out = None, {}
  for name, opts in variants(m):
    label = name + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    sec, terms = timed(program(name, opts, None, fa, moments), ga, gb, reps=reps)
    base = sec if base is None else base
    out[label] = terms
    print(f"{label:<48}{sec:>15.4f}{sec / base:>14.1f}")
  if perms:
    pp = jnp.asarray(measures.null_permutations(0, perms, m))
    for name in null_for:
      sec, _ = timed(program(name, {}, pp), ga, gb, reps=reps)
      print(f"{name + f' + null P={perms}':<48}{sec:>15.4f}{sec / base:>14.1f}")
  value = lambda label: np.asarray(out[f"procrustes ({label})"]["value"], np.float64)
  svd = value("method=svd")
  print(f"Procrustes (SVD, full rank) values {svd.min():.4f}..{svd.max():.4f}; deviations:")
  for label in ("method=newton_schulz", f"method=svd, max_rank={m // 4}",
                f"method=newton_schulz, max_rank={m // 4}"):
    d = value(label) - svd
    print(f"  {label:<36} max |diff| {np.abs(d).max():.2e}, mean diff {d.mean():.2e}")
  return out


def vit_step(model_name: str, m: int, image_size: int, reps: int, steps: int = 3) -> None:
  """Seconds per step of the analyses' intra-model step on `model_name`'s fine preset (random
  weights, one minibatch of m images): linear CKA alone, every measure on (default options), and
  every measure with PWCCA's Gram-only weights (the share of Morcos et al.'s L1 weights); the
  first `steps` of these."""
  # pylint: disable=g-import-not-at-top
  from vit_analysis import models
  from vit_analysis.models.build import LoadedModel
  from vit_analysis.runtime import sharding
  from vit_analysis.similarity import cka_runner, representations
  # pylint: enable=g-import-not-at-top
  module = models.create_model(model_name, num_classes=1000, image_size=image_size)
  shape = (image_size, image_size, 3)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1,) + shape), train=False))(
      jax.random.key(0))
  side = representations.model_side(
      LoadedModel("bench", model_name, module, variables, image_size), "fine")
  mesh = sharding.make_mesh(jax.devices()[:1])
  images = jax.random.uniform(jax.random.key(1), (1, m) + shape, minval=-1, maxval=1)
  mask = jnp.ones((1,))
  opts = {"mutual_knn": {"k": min(10, m - 1)}}

  def spec(**more):
    return tuple((n, tuple(sorted(measures.resolve_options(
        n, **opts.get(n, {}), **more.get(n, {})).items()))) for n in measures.MEASURES)
  a = len(side.names)
  print(f"\n== {model_name} fine preset, {a} layers at {image_size} px ({a * a} pairs, "
        f"intra-model), one minibatch of m = {m}, random weights, median of {reps} reps ==")
  base = None
  runs = (("linear CKA alone", ()), ("every measure on", spec()),
          ("every measure, PWCCA weights='l2'", spec(pwcca={"weights": "l2"})))
  for label, extra in runs[:steps]:
    step = cka_runner.make_step({"a": side}, [("a", None)], extra_measures=extra, mesh=mesh)
    t = time.perf_counter()
    jax.block_until_ready(step((variables,), (images,), mask, None))
    compile_s = time.perf_counter() - t
    sec, _ = timed(step, (variables,), (images,), mask, None, reps=reps)
    base = sec if base is None else base
    print(f"{model_name} fine step, {label:<35} {sec:9.2f} s / step ({sec / base:5.1f}x; "
          f"first call incl. compile {compile_s:.0f} s)")


def gram_cost(m: int, reps: int, p: int = 197 * 768, layers: int = 12) -> None:
  """Seconds per [m, p] -> [m, m] Gram (p = 151,296: one ViT-B/16 token layer), `layers` of them
  in one program as a step computes them (on CPU XLA runs the layers' SYRK calls concurrently)."""
  xs = [jax.random.normal(jax.random.key(i), (m, p)) for i in range(layers)]
  sec, _ = timed(cka.centred_grams, xs, reps=reps)
  what = "one ViT-B/16 token layer" if p == 197 * 768 else "one layer"
  print(f"\nGram of {what} (m = {m}, p = {p:,}; {layers} in one program): {sec / layers:.3f} s; "
        f"44 such layers: {44 * sec / layers:.1f} s per minibatch (shared by all measures)")


def null_demo(m: int = 128, p: int = 512, minibatches: int = 4, perms: int = 32) -> None:
  """The shuffle null of every measure for independent random features (and for X vs X)."""
  r = np.random.default_rng(0)
  xs = [r.normal(size=(m, p)).astype(np.float32) for _ in range(minibatches)]
  ys = [r.normal(size=(m, p)).astype(np.float32) for _ in range(minibatches)]
  pp = jnp.asarray(measures.null_permutations(0, perms, m))
  print(f"\n== shuffle null: independent N(0, 1) features, m = {m}, p = {p}, {minibatches} "
        f"minibatches, P = {perms} ==")
  print(f"{'measure':<26}{'value':>9}{'null mean':>11}{'null std':>10}{'z':>8}{'z (X vs X)':>12}")
  specs = (("linear_cka (biased)", "linear_cka", {"debiased": False}),
           ("linear_cka (unbiased)", "linear_cka", {}),
           ("rbf_cka (biased)", "rbf_cka", {"debiased": False}),
           ("rbf_cka (unbiased)", "rbf_cka", {}),
           ("procrustes", "procrustes", {}), ("mutual_knn (k=10)", "mutual_knn", {}),
           ("procrustes (held out)", "procrustes", {"heldout": "kfold"}),
           ("procrustes_distance", "procrustes_distance", {}),
           ("svcca", "svcca", {}), ("svcca (held out)", "svcca", {"heldout": "kfold"}),
           ("pwcca", "pwcca", {}), ("pwcca (held out)", "pwcca", {"heldout": "kfold"}),
           ("rsa (spearman)", "rsa", {}), ("rsa (pearson)", "rsa", {"compare": "pearson"}),
           ("rsa (correlation dist.)", "rsa", {"distance": "correlation"}),
           ("linear_predictivity", "linear_predictivity", {}),
           ("distance_corr. (biased)", "distance_correlation", {"debiased": False}),
           ("distance_corr. (unbiased)", "distance_correlation", {}))
  for label, name, opts in specs:
    res = []
    for other in (ys, xs):
      state = measures.init(name, 1, 1, num_perms=perms, **opts)
      for x, y in zip(xs, other):
        t = measures.minibatch_terms(name, cka.gram_linear(x)[None], cka.gram_linear(y)[None],
                                     perms=pp, feats_a=[x], moments_a=measures.pattern_moments(
                                         [x]), moments_b=measures.pattern_moments([y]), **opts)
        state = measures.accumulate(state, t)
      res.append(measures.result(state))
    ind, same = res
    print(f"{label:<26}{ind.value[0, 0]:>9.4f}{ind.null_mean[0, 0]:>11.4f}"
          f"{ind.null_std[0, 0]:>10.4f}{ind.z[0, 0]:>8.2f}{same.z[0, 0]:>12.1f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--m", type=int, default=256)
  parser.add_argument("--big_m", type=int, default=1024)
  parser.add_argument("--layers_a", type=int, default=26)
  parser.add_argument("--layers_b", type=int, default=18)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--perms", type=int, default=8)
  parser.add_argument("--null_only", action="store_true", help="only the shuffle-null table")
  parser.add_argument("--costs_only", action="store_true",
                      help="only the cost tables (no Gram timing, no null table)")
  parser.add_argument("--step_model", default="ViT-B_16")
  parser.add_argument("--step_m", type=int, default=8, help="images in the ViT step's minibatch")
  parser.add_argument("--step_only", action="store_true", help="only the ViT step times")
  parser.add_argument("--step_variants", type=int, default=3,
                      help="linear CKA alone, + every measure, + every measure with L2 PWCCA")
  parser.add_argument("--smoke", action="store_true",
                      help="seconds: 2 x 2 layers, m = 16 (no big m), 1 rep, P = 2, small null, "
                           "the step on ViT-smoke_8 at 32 px")
  args = parser.parse_args()
  null_sizes, gram_p, step_size = {}, 197 * 768, 224
  if args.smoke:
    args.m, args.big_m, args.layers_a, args.layers_b, args.reps, args.perms = 16, 0, 2, 2, 1, 2
    null_sizes, gram_p = {"m": 16, "p": 32, "minibatches": 2, "perms": 4}, 1024
    args.step_model, args.step_m, step_size, args.step_variants = "ViT-smoke_8", 4, 32, 2
  if args.null_only:
    null_demo(**null_sizes)
    return
  if args.step_only:
    vit_step(args.step_model, args.step_m, step_size, args.reps, args.step_variants)
    return
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
  table(args.layers_a, args.layers_b, args.m, args.reps, args.perms)
  if args.big_m:
    table(2, 2, args.big_m, args.reps, 0)
    table(2, 2, args.m, args.reps, 0)  # the same small grid at the small m: the m-scaling
  if args.costs_only:
    return
  gram_cost(args.m, args.reps, gram_p)
  null_demo(**null_sizes)
  vit_step(args.step_model, args.step_m, step_size, args.reps, args.step_variants)


if __name__ == "__main__":
  main()
