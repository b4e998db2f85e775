"""Minibatch CKA vs the bare Gram GEMMs it cannot avoid, measured side by side in one run.

Workload (issue 4): a ViT-like model (12 layers of 65 tokens x 192) against a ResNet-like model
(16 layers: 4 each of 32x32x32, 16x16x64, 8x8x128, 4x4x256 activations), minibatches of m = 128
and 256 examples, 10 minibatches. "Ours" is the full public path per minibatch:
`cka.update(state, vit_feats, resnet_feats)` (validation, centred Grams, U-centring, all-pairs
HSIC, float64 host accumulation) and `cka.result` at the end. The floor is `x @ x.T` per layer in
float32 (one jitted XLA program per minibatch, and NumPy), the least any Gram-based CKA computes.

Usage:
  python benchmarks/cka_bench.py [--m 128 256] [--minibatches 10] [--reps 3] [--numpy_reps 1]

Floor and ours alternate minibatch by minibatch, so load changes on a shared machine hit both
alike; times are means per 10-minibatch run. CPU-time ratios (all threads of this process) are
printed too: on a machine shared with other jobs they are steadier than wall time. The same feature arrays are fed for every
minibatch: their values do not change the arithmetic, and at m = 256 they already take 400 MB.
"""
from __future__ import annotations

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis import cka

VIT = [(65, 192)] * 12
RESNET = [(32, 32, 32)] * 4 + [(16, 16, 64)] * 4 + [(8, 8, 128)] * 4 + [(4, 4, 256)] * 4


def make_features(m: int, shapes, seed: int) -> list[jax.Array]:
  """float32 [m, *shape] activations with per-feature offsets (like post-ReLU/residual maps)."""
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  make = jax.jit(lambda k, s: jax.random.normal(k, s) + jax.random.uniform(k, s[1:], maxval=4.0),
                 static_argnums=1)
  return [make(k, (m,) + s) for k, s in zip(keys, shapes)]


@jax.jit
def bare_grams(feats):
  return [jnp.dot(x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1).T) for x in feats]


class Clock:
  """Accumulated wall and CPU seconds (all threads of this process) of timed calls."""

  def __init__(self):
    self.wall = self.cpu = 0.0

  def __call__(self, fn, *args):
    c, t = time.process_time(), time.perf_counter()
    out = fn(*args)
    self.wall += time.perf_counter() - t
    self.cpu += time.process_time() - c
    return out


def bench(m: int, minibatches: int, reps: int, numpy_reps: int) -> None:
  vit, resnet = make_features(m, VIT, 0), make_features(m, RESNET, 1)
  feats = vit + resnet
  floor = lambda: jax.block_until_ready(bare_grams(feats))
  # Compile everything first.
  floor()
  cka.result(cka.update(cka.init(len(vit), len(resnet)), vit, resnet))
  cka.result(cka.update(cka.init(len(feats)), feats))
  clocks = {k: Clock() for k in ("xla", "cross", "intra")}
  for _ in range(reps):
    cross, intra = cka.init(len(vit), len(resnet)), cka.init(len(feats))
    # Interleaved per minibatch, so load changes on a shared machine hit all three alike.
    for _ in range(minibatches):
      clocks["xla"](floor)
      cross = clocks["cross"](cka.update, cross, vit, resnet)
      intra = clocks["intra"](cka.update, intra, feats)
    clocks["cross"](cka.result, cross)
    clocks["intra"](cka.result, intra)
  host = [np.asarray(x).reshape(m, -1) for x in feats]
  numpy_clock = Clock()
  for _ in range(numpy_reps * minibatches):
    numpy_clock(lambda: [x @ x.T for x in host])
  per_run = lambda c: (c.wall / reps, c.cpu / reps)
  xla, np_t = per_run(clocks["xla"]), (numpy_clock.wall / max(numpy_reps, 1),
                                      numpy_clock.cpu / max(numpy_reps, 1))
  gflop = 2 * m * m * sum(int(np.prod(s)) for s in VIT + RESNET) * minibatches / 1e9
  print(f"\nm={m}, {minibatches} minibatches, {len(VIT)} ViT x {len(RESNET)} ResNet layers, "
        f"{gflop:.0f} GFLOP of Grams; backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s); mean of {reps} interleaved runs")
  print(f"  floor XLA   x@x.T      {xla[0]:7.3f} s  (cpu {xla[1]:7.3f} s)")
  if numpy_reps:
    print(f"  floor NumPy x@x.T      {np_t[0]:7.3f} s  (cpu {np_t[1]:7.3f} s)")
  for name, label in (("cross", "ours cross ViTxResNet"), ("intra", "ours intra (28x28)   ")):
    w, c = per_run(clocks[name])
    vs_numpy = f", vs NumPy {w / np_t[0]:.3f}x" if numpy_reps else ""
    print(f"  {label}  {w:7.3f} s  (cpu {c:7.3f} s)   ratio vs XLA {w / xla[0]:.3f}x "
          f"(cpu {c / xla[1]:.3f}x){vs_numpy}")
  peers(m, minibatches)


def peers(m: int, minibatches: int) -> None:
  """Optional side-by-side lines (extra 'bench': torch, torch-cka, cka-pytorch)."""
  for module in ("torch_cka", "cka_pytorch"):
    try:
      importlib.import_module(module)
    except ImportError:
      print(f"  peer {module}: not installed (pip install -e '.[bench]'), skipped")
      continue
    print(f"  peer {module}: installed; its API takes torch models and dataloaders, "
          f"not captured activations -- not wired up in this script (m={m}, k={minibatches})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", type=int, nargs="+", default=[128, 256])
  parser.add_argument("--minibatches", type=int, default=10)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--numpy_reps", type=int, default=1)
  args = parser.parse_args()
  for m in args.m:
    bench(m, args.minibatches, args.reps, args.numpy_reps)


if __name__ == "__main__":
  main()
