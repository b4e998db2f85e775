"""One pass for many models (cka_zoo) against separate cka_intra / cka_cross passes.

Workload (issue 28): three models of one architecture (ViT-B/16 at 224 px, random weights, the
fine preset: 74 capture points), every intra-model grid and every cross-model grid, the same
images, seed and protocol. "zoo" is `cka_runner.cka_pairs_over_repeats` over the 3 models and the
6 pairs (3 forwards per image); "separate" is 3 `cka_over_repeats` intra runs and 3 cross runs,
as cka_intra + cka_cross run them (3 + 2 x 3 = 9 forwards per image). Both paths compile first
(a warm-up pass of one minibatch, not timed); the timed passes then run one after the other on
the same images, and the largest |difference| of the saved CKA between the two is printed.

Then a projection (arithmetic from FLOPs, not a measurement) of the paper protocol (10,240
examples x 20 repeats, m = 1,024, fine preset) for the six paper models (ViT-B/32, B/16, L/16,
H/14, R50x1, R152x2) on a TPU v3-8: forward FLOPs per image from XLA's cost analysis of each
model's lowered forward, Gram FLOPs 2 m sum(p) per image (p: features per example of each
captured layer), pair terms 2 m A B per image (the contraction of the U-centred Grams), at 40%
of the v3-8's 420 TFLOP/s bf16 peak for the forward and of one-sixth of it for the Grams and
pair terms at gram_precision='highest' (six bf16 passes), as README.md's single-model projection.

Measured (2-core CPU VM, quiet, 1 device, random weights, 16 images, m = 8, fine, the Grams on
the SYRK custom call; two runs): zoo 12.5-12.9 s, separate 37.1-38.5 s (2.97-2.99x; 3x fewer
forwards), max |zoo - separate| CKA 0.0. Projected TPU v3-8, the six paper models (21 grids): zoo 1.45 h, separate
analyses 8.67 h (5.99x).

Usage:
  python benchmarks/zoo_bench.py [--images 16] [--m 8] [--layers fine]
  python benchmarks/zoo_bench.py --smoke   # seconds: three tiny models at 32 px
"""
from __future__ import annotations

import argparse
import fnmatch
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis import models
from vit_analysis.analyses import base
from vit_analysis.input import data as data_lib
from vit_analysis.models import capture
from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka_runner, representations

PAPER = ("ViT-B_32", "ViT-B_16", "ViT-L_16", "ViT-H_14", "R50x1", "R152x2")
PAPER_PROTOCOL = dict(images=10240 * 20, m=1024)
V3_8_BF16 = 420e12  # peak FLOP/s of a TPU v3-8 (8 cores)
EFFICIENCY = 0.4


def _loaded(name: str, size: int, key: str, seed: int) -> base.LoadedModel:
  module = models.create_model(name, 1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), shapes)
  return base.LoadedModel(key, name, module, variables, size)


def measure(name: str, size: int, num_images: int, m: int, layers: str) -> dict[str, float]:
  """Wall seconds of the zoo and of the separate runs over the same images (compiled first)."""
  loaded = {f"m{i}": _loaded(name, size, f"m{i}", i) for i in range(3)}
  sides = {k: representations.model_side(v, layers) for k, v in loaded.items()}
  keys = list(sides)
  pairs = [(k, None) for k in keys] + list(itertools.combinations(keys, 2))
  rng = np.random.default_rng(0)
  source = data_lib.ArraySource(rng.integers(0, 256, (num_images, size, size, 3), np.uint8),
                                np.zeros(num_images, np.int64), 1)
  mesh = sharding.make_mesh()

  def zoo(n):
    return cka_runner.cka_pairs_over_repeats(sides, pairs, source, num_examples=n,
                                             minibatch_size=m, repeats=1, seed=0, mesh=mesh)

  def separate(n):
    return {(a, b): cka_runner.cka_over_repeats(
        sides[a], None if b is None else sides[b], source, num_examples=n, minibatch_size=m,
        repeats=1, seed=0, mesh=mesh) for a, b in pairs}

  for fn in (zoo, separate):  # compile (the step is cached per architecture and pair kind)
    tic = time.perf_counter()
    fn(m)
    print(f"  {fn.__name__}: compile + one minibatch {time.perf_counter() - tic:.1f} s",
          flush=True)
  times, outs = {}, {}
  for fn in (zoo, separate):
    tic = time.perf_counter()
    outs[fn.__name__] = fn(num_images)
    times[fn.__name__] = time.perf_counter() - tic
  diff = max(float(np.abs(outs["zoo"][p].values - outs["separate"][p].values).max())
             for p in pairs)
  return dict(times, diff=diff, layers=len(sides["m0"].names))


def _paper_flops(name: str, size: int, m: int) -> tuple[float, float, int]:
  """(forward FLOPs per image, Gram FLOPs per image, captured layers) of `name` at `size` px."""
  module = models.create_model(name, 21843)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  cost = jax.jit(lambda v, im: module.apply(v, im)[0]).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  names = capture.layer_names(module, (size, size, 3))
  layers = _fine_layers(names, "resnet" if name.startswith("R") else "vit")
  plan = capture.plan_bytes(module, (size, size, 3), 1, layers)
  features = sum(plan.values()) / 4  # float32 features per example
  return float(cost["flops"]), 2.0 * m * features, len(layers)


def _fine_layers(names, family):
  patterns = [p for p in representations.PRESETS[family]["fine"]
              if any(fnmatch.fnmatchcase(n, p) for n in names)]
  return capture.select(names, patterns)


def project(names, size: int, m: int, images: int) -> dict[str, float]:
  """Projected seconds of the zoo and of the separate analyses on a TPU v3-8 (from FLOPs)."""
  fwd, gram, layers = {}, {}, {}
  for n in names:
    fwd[n], gram[n], layers[n] = _paper_flops(n, 224 if size == 0 else size, m)
    print(f"  {n}: {fwd[n] / 1e9:.1f} GFLOP forward, {gram[n] / 1e9:.1f} GFLOP Grams per "
          f"image, {layers[n]} layers", flush=True)
  pairs = [(a, a) for a in names] + list(itertools.combinations(names, 2))
  terms = sum(2.0 * m * layers[a] * layers[b] for a, b in pairs)  # per image
  fast, slow = EFFICIENCY * V3_8_BF16, EFFICIENCY * V3_8_BF16 / 6
  zoo = images * (sum(fwd.values()) / fast + (sum(gram.values()) + terms) / slow)
  separate = images * sum(
      (fwd[a] + (0 if a == b else fwd[b])) / fast
      + (gram[a] + (0 if a == b else gram[b])) / slow for a, b in pairs) + images * terms / slow
  return dict(zoo=zoo, separate=separate, pairs=len(pairs))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="ViT-B_16")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--m", type=int, default=8)
  parser.add_argument("--layers", default="fine")
  parser.add_argument("--smoke", action="store_true", help="tiny models, seconds")
  args = parser.parse_args()
  model, size, images, m, paper, psize = args.model, args.size, args.images, args.m, PAPER, 0
  if args.smoke:
    model, size, images, m, paper, psize = "ViT-smoke_8", 32, 16, 8, ("ViT-smoke_8", "R-smoke"), 32
  print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
  r = measure(model, size, images, m, args.layers)
  print(f"\n3 x {model} at {size} px, {r['layers']} layers each, {images} images, m = {m}, "
        f"1 repeat: 3 intra + 3 cross grids")
  print(f"zoo (one pass, 3 forwards/image)             {r['zoo']:8.2f} s")
  print(f"separate (3 intra + 3 cross, 9 forwards/image) {r['separate']:6.2f} s")
  print(f"speed-up {r['separate'] / r['zoo']:.2f}x; max |zoo - separate| CKA {r['diff']:.1e}")
  images_p, m_p = PAPER_PROTOCOL["images"], PAPER_PROTOCOL["m"]
  print(f"\nprojected TPU v3-8 time of the paper protocol ({images_p:,} images, m = {m_p}, fine "
        f"preset; arithmetic from FLOPs, not a measurement):", flush=True)
  p = project(paper, psize, m_p, images_p)
  print(f"projected TPU v3-8: zoo of {len(paper)} models ({p['pairs']} grids) "
        f"{p['zoo'] / 3600:.2f} h; separate analyses {p['separate'] / 3600:.2f} h "
        f"({p['separate'] / p['zoo']:.2f}x)")


if __name__ == "__main__":
  main()
