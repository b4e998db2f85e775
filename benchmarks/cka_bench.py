"""Minibatch CKA against the bare Gram GEMMs it cannot avoid, and against other CKA libraries.

Workload (issue 14): a ViT-like model (12 layers of 65 tokens x 192) against a ResNet-like model
(16 layers: 4 each of 32x32x32, 16x16x64, 8x8x128, 4x4x256 activations), float32, minibatches of
m = 128 and 256 examples, 10 minibatches (at m = 1,024 one minibatch: 16x the FLOPs each).

Table 1, engine vs XLA: "ours" is the public convenience path `cka.minibatch_cka` over the k
(feats_a, feats_b) pairs (validation, centred symmetric Grams, U-centring, all-pairs HSIC, float64
host sums, result), cross-model and intra-model (28 x 28); the floor is XLA's bare full Grams
`x @ x.T` of every layer, one jitted program per minibatch. Ratios below 1 are the symmetric
Grams: only the row blocks on and below the diagonal are multiplied.

Table 2 (--peers; needs `pip install -e ".[bench]"`): the same arrays through cka-pytorch (one
epoch, and its default of 10), torch-cka, and NumPy's `x @ x.T` (OpenBLAS SYRK: one triangle, half
the FLOPs) Grams alone, with the max |CKA - float64 reference| of each. "ours: centred Grams alone"
is `cka.centred_grams` of every layer (centring and the symmetric Grams, no HSIC; on CPU the SYRK
custom call of vit_analysis/similarity/cpu_gram.py), printed beside the same Grams on XLA's GEMM
(the fallback path), so the Gram's cost stands beside NumPy's SYRK and cka-pytorch's one epoch:
wall and CPU time, and the median per-repetition ratios to each ("vs SYRK", "vs 1 epoch";
CPU-time ratios in parentheses). The last line gives the custom call's own cost per layer.
torch-cka recomputes every layer-b Gram for every layer a (12x the Gram work), so it runs on fewer
minibatches and its time is scaled to k.

Usage:
  python benchmarks/cka_bench.py [--m 128 256 1024] [--minibatches 10] [--reps 5] [--quick]
      [--peers] [--smoke]
  # seconds (tests/test_benchmarks.py): m = 8, one minibatch, one repetition, the same layers,
  # both tables (the installed peers run, the others print as unavailable):
  python benchmarks/cka_bench.py --smoke
  # OpenBLAS at its native kernel (this machine's environment may pin an old one):
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cka_bench.py --peers
  # one thread each for OpenBLAS and torch (XLA still runs independent layers side by side):
  OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \
      intra_op_parallelism_threads=1" python benchmarks/cka_bench.py --peers

Method: the contenders alternate within each repetition, so load changes on a shared machine hit
all alike, and each timed run follows an untimed one of the same contender (threads the previous
one left spinning would slow it); the printed times are medians over repetitions and each ratio
is the median of the per-repetition ratios. CPU time (all threads of this process) is printed
too: on a machine shared with other jobs it is steadier than wall time. Every minibatch holds the
same feature arrays: their values do not change the arithmetic, and at m = 256 one minibatch
already takes 400 MB.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis.similarity import cka, cpu_gram

VIT = [(65, 192)] * 12
RESNET = [(32, 32, 32)] * 4 + [(16, 16, 64)] * 4 + [(8, 8, 128)] * 4 + [(4, 4, 256)] * 4


def make_features(m: int, shapes, seed: int) -> list[jax.Array]:
  """float32 [m, *shape] activations: a signal shared by every layer of both models (a 16-dim
  latent of the examples, weighted differently per layer, so CKA values spread as between real
  layers), noise, and per-feature offsets (like post-ReLU/residual maps)."""
  z = jax.random.normal(jax.random.key(1234), (m, 16))
  keys = jax.random.split(jax.random.key(seed), len(shapes))

  @functools.partial(jax.jit, static_argnums=1)
  def make(key, shape):
    kw, kn, ko, ks = jax.random.split(key, 4)
    p = int(np.prod(shape))
    # Each layer weights the latent's dimensions differently (random scales with a long tail).
    w = jax.random.normal(kw, (16, p)) * (4 * jax.random.uniform(ks, (16, 1)) ** 4)
    x = z @ w + jax.random.normal(kn, (m, p)) + jax.random.uniform(ko, (p,), maxval=4.0)
    return x.reshape((m,) + shape)

  return [make(k, s) for k, s in zip(keys, shapes)]


@jax.jit
def bare_grams(feats):
  return [jnp.dot(x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1).T) for x in feats]


def timed(fn, *args):
  """(result, wall seconds, CPU seconds of all threads of this process)."""
  c, t = time.process_time(), time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - t, time.process_time() - c


def minibatches_for(m: int, minibatches: int) -> int:
  """k for size m: the given count up to m = 256, then scaled by (256/m)^2 (same FLOPs)."""
  return max(1, round(minibatches * min(1.0, (256 / m) ** 2)))


def gflop(m: int, k: int) -> float:
  return 2 * m * m * sum(int(np.prod(s)) for s in VIT + RESNET) * k / 1e9


def bench_engine(m: int, k: int, reps: int) -> None:
  """Table 1: ours (cross, intra) vs XLA's bare full-Gram GEMMs, interleaved per repetition."""
  vit, resnet = make_features(m, VIT, 0), make_features(m, RESNET, 1)
  feats = vit + resnet
  runs = {
      "xla": lambda: [jax.block_until_ready(bare_grams(feats)) for _ in range(k)],
      "cross": lambda: cka.minibatch_cka([(vit, resnet)] * k),
      "intra": lambda: cka.minibatch_cka([(feats, None)] * k),
  }
  for run in runs.values():  # compile
    run()
  wall = {name: [] for name in runs}
  cpu = {name: [] for name in runs}
  for _ in range(reps):
    for name, run in runs.items():
      _, w, c = timed(run)
      wall[name].append(w)
      cpu[name].append(c)
  med = lambda v: float(np.median(v))
  ratio = lambda t, name: med(np.asarray(t[name]) / np.asarray(t["xla"]))
  print(f"\nm={m}, k={k} minibatches, {len(VIT)} ViT x {len(RESNET)} ResNet layers, "
        f"{gflop(m, k):.0f} GFLOP of full Grams; backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s); medians of {reps} interleaved repetitions")
  print(f"  {'':28s} {'wall s':>8s} {'cpu s':>8s}   {'ours/XLA wall':>13s} {'(cpu)':>7s}")
  print(f"  {'XLA bare full Grams x@x.T':28s} {med(wall['xla']):8.3f} {med(cpu['xla']):8.3f}")
  for name, label in (("cross", "ours cross ViT x ResNet"), ("intra", "ours intra (28 x 28)")):
    print(f"  {label:28s} {med(wall[name]):8.3f} {med(cpu[name]):8.3f}   "
          f"{ratio(wall, name):12.3f}x {ratio(cpu, name):6.3f}x")


# ---------------------------------------------------------------------------------------------
# Peers (--peers): the same arrays through other CKA implementations.


def reference_cka(vit_np, resnet_np) -> np.ndarray:
  """float64 minibatch CKA of one minibatch (all k minibatches are the same), from U-centring."""

  def u_gram(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(0)
    k = x @ x.T
    np.fill_diagonal(k, 0)
    n = len(k)
    s = k.sum(0)
    mean = s / (n - 2) - s.sum() / (2 * (n - 1) * (n - 2))
    u = k - mean[:, None] - mean[None, :]
    np.fill_diagonal(u, 0)
    return u.ravel()

  ua = np.stack([u_gram(x) for x in vit_np])
  ub = np.stack([u_gram(y) for y in resnet_np])
  return (ua @ ub.T) / np.sqrt(np.outer((ua * ua).sum(1), (ub * ub).sum(1)))


def _replay_model(torch, feats):
  """A torch module whose submodules `layers.i` output the given activations (hooked by peers)."""

  class Emit(torch.nn.Module):

    def __init__(self, f):
      super().__init__()
      self.f = f

    def forward(self, x):
      del x
      return self.f

  class Replay(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.layers = torch.nn.ModuleList([Emit(f) for f in feats])

    def forward(self, x):
      for layer in self.layers:
        layer(x)
      return x

  return Replay(), [f"layers.{i}" for i in range(len(feats))]


def _peer_runs(vit_np, resnet_np, k: int, torch_cka_minibatches: int):
  """{name: (callable returning CKA [A, B] or None, minibatches it covers, reps)}; or reasons."""
  runs, unavailable = {}, {}
  try:
    torch = importlib.import_module("torch")
  except ImportError as e:
    for name in ("cka-pytorch, 1 epoch", "cka-pytorch, default 10 epochs", "torch-cka"):
      unavailable[name] = f"torch not installed ({e})"
    return runs, unavailable, None
  tv = [torch.from_numpy(x) for x in vit_np]
  tr = [torch.from_numpy(y) for y in resnet_np]
  try:
    cka_pytorch = importlib.import_module("cka_pytorch.cka")

    def run_cka_pytorch(epochs):
      m1, l1 = _replay_model(torch, tv)
      m2, l2 = _replay_model(torch, tr)
      calc = cka_pytorch.CKACalculator(m1, m2, model1_layers=l1, model2_layers=l2,
                                       device=torch.device("cpu"), verbose=False)
      loader = [(torch.zeros(1), torch.zeros(1))] * k
      return calc.calculate_cka_matrix(loader, num_epochs=epochs).numpy()

    runs["cka-pytorch, 1 epoch"] = (lambda: run_cka_pytorch(1), k, None)
    runs["cka-pytorch, default 10 epochs"] = (lambda: run_cka_pytorch(10), k, 1)
  except ImportError as e:
    unavailable["cka-pytorch, 1 epoch"] = unavailable["cka-pytorch, default 10 epochs"] = str(e)
  try:
    torch_cka = importlib.import_module("torch_cka")

    def run_torch_cka():
      m1, l1 = _replay_model(torch, tv)
      m2, l2 = _replay_model(torch, tr)
      calc = torch_cka.CKA(m1, m2, model1_name="vit", model2_name="resnet", model1_layers=l1,
                           model2_layers=l2, device="cpu")
      data = torch.utils.data.TensorDataset(torch.zeros(torch_cka_minibatches, 1))
      with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its tqdm bar
        calc.compare(torch.utils.data.DataLoader(data, batch_size=1))
      return calc.export()["CKA"].numpy()

    runs["torch-cka"] = (run_torch_cka, torch_cka_minibatches, 1)
  except ImportError as e:
    unavailable["torch-cka"] = str(e)
  return runs, unavailable, torch


SYRK = "NumPy x @ x.T Grams alone (SYRK)"
XLA_GRAMS = "ours: Grams on XLA's GEMM (no SYRK)"
EPOCH = "cka-pytorch, 1 epoch"


def blas_info() -> str:
  try:
    from threadpoolctl import threadpool_info  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "threadpoolctl not installed"
  env = {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
  infos = [f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} "
           f"threads={i.get('num_threads')} ({os.path.basename(i.get('filepath', ''))})"
           for i in threadpool_info() if i.get("user_api") == "blas"]
  return f"{'; '.join(infos) or 'no BLAS found'}; env {env}"


def bench_peers(m: int, k: int, reps: int, torch_cka_minibatches: int) -> None:
  """Table 2: time, CPU time and max |dCKA| against float64 for every implementation, and the
  cost of our centred Grams alone beside NumPy's SYRK Grams and cka-pytorch's one epoch."""
  vit, resnet = make_features(m, VIT, 0), make_features(m, RESNET, 1)
  vit_np = [np.asarray(x) for x in vit]  # views of the same buffers on CPU
  resnet_np = [np.asarray(y) for y in resnet]
  ref = reference_cka(vit_np, resnet_np)
  host = [x.reshape(m, -1) for x in vit_np + resnet_np]
  ours = lambda: cka.minibatch_cka([(vit, resnet)] * k)
  # Our Grams alone: every layer's centred Gram (what `minibatch_terms` computes before HSIC);
  # on CPU the SYRK custom call, beside XLA's GEMM path that it replaced (row blocks).
  grams = lambda: [jax.block_until_ready(cka.centred_grams(vit + resnet)) for _ in range(k)]
  xla_grams = lambda: [jax.block_until_ready(_xla_grams(vit + resnet)) for _ in range(k)]
  syrk = lambda: [[x @ x.T for x in host] for _ in range(k)]
  runs, unavailable, torch = _peer_runs(vit_np, resnet_np, k, torch_cka_minibatches)
  contenders = {"ours: cka.minibatch_cka": (ours, k, None),
                "ours: centred Grams alone": (grams, k, None),
                XLA_GRAMS: (xla_grams, k, None),
                SYRK: (syrk, k, None), **runs}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # peers warn about read-only arrays, unnamed models
    outs = {name: run() for name, (run, _, _) in contenders.items()
            if name not in ("cka-pytorch, default 10 epochs", "torch-cka")}  # compile / warm up
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for rep in range(reps):
      for name, (run, _, only) in contenders.items():
        if only is not None and rep >= only:
          continue
        if only is None:
          # An untimed run first: threads the previous contender left spinning (OpenBLAS's
          # wait ~0.1 s before they sleep, XLA's pool) would otherwise slow this one.
          run()
        outs[name], w, c = timed(run)
        wall[name].append(w)
        cpu[name].append(c)
  print(f"\nm={m}, k={k} minibatches, {len(VIT)} ViT x {len(RESNET)} ResNet layers, float32, "
        f"{gflop(m, k):.0f} GFLOP of full Grams; medians of {reps} interleaved repetitions "
        f"(fewer where noted); backend {jax.default_backend()}")
  print(f"  BLAS: {blas_info()}")
  if torch is not None:
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")
  # Times scaled to k minibatches; a ratio is the median of the per-repetition ratios.
  scaled = lambda t, name: np.asarray(t[name]) * k / contenders[name][1]

  def ratio(t, name, base):
    if base not in t or not t[base]:
      return "-"
    n = min(len(t[name]), len(t[base]))
    return f"{np.median(scaled(t, name)[:n] / scaled(t, base)[:n]):.2f}x"

  print(f"  {'implementation':34s} {'wall s':>7s} {'cpu s':>7s}   {'vs ours':>7s} "
        f"{'vs SYRK (cpu)':>14s} {'vs 1 epoch (cpu)':>17s} {'max |dCKA|':>10s}")
  for name, (_, covers, only) in contenders.items():
    note = []
    if covers != k:
      note.append(f"{covers} of {k} minibatches, time x{k / covers:g}")
    if only is not None:
      note.append(f"{min(only, reps)} rep")
    out = outs[name]
    dev = ("-" if name in (SYRK, "ours: centred Grams alone", XLA_GRAMS)
           else f"{np.abs(np.asarray(out) - ref).max():.1e}")
    vs_syrk = f"{ratio(wall, name, SYRK)} ({ratio(cpu, name, SYRK)})"
    vs_epoch = f"{ratio(wall, name, EPOCH)} ({ratio(cpu, name, EPOCH)})"
    print(f"  {name:34s} {np.median(scaled(wall, name)):7.3f} {np.median(scaled(cpu, name)):7.3f}"
          f"   {ratio(wall, name, 'ours: cka.minibatch_cka'):>7s} {vs_syrk:>14s} "
          f"{vs_epoch:>17s} {dev:>10s}" + (f"   ({', '.join(note)})" if note else ""))
  for name, why in unavailable.items():
    print(f"  {name:34s} {'unavailable':>7s}   ({why}; pip install -e '.[bench]')")
  print(f"  Gram path on CPU: {'SYRK custom call' if cpu_gram.available() else 'XLA GEMM'}; "
        f"{call_overhead(m)}")


def _xla_grams(feats):
  return jnp.stack([cka._xla_centred_gram(x.reshape(x.shape[0], -1), jax.lax.Precision.HIGHEST)
                    for x in feats])


_xla_grams = jax.jit(_xla_grams)


def call_overhead(m: int, layers: int = 28, reps: int = 200) -> str:
  """Per-layer cost of the SYRK custom call itself: one jitted program of `layers` Grams of
  [m, 8] features (centring and SYRK next to nothing), against the same program on XLA's GEMM."""
  if not cpu_gram.available():
    return "custom call overhead not measured (handler unavailable)"
  xs = [jnp.ones((m, 8), jnp.float32) + i for i in range(layers)]
  progs = {"syrk": jax.jit(lambda v: [cpu_gram.centred_grams(x) for x in v]),
           "xla": jax.jit(lambda v: [cka._xla_centred_gram(x, jax.lax.Precision.HIGHEST)
                                     for x in v])}
  per_layer = {}
  for name, prog in progs.items():
    jax.block_until_ready(prog(xs))
    t = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(prog(xs))
    per_layer[name] = (time.perf_counter() - t) / reps / layers * 1e6
  return (f"a [{m}, 8] layer's Gram costs {per_layer['syrk']:.0f} us through the custom call, "
          f"{per_layer['xla']:.0f} us on XLA's GEMM (per layer, {layers} in one program)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", type=int, nargs="+", default=None,
                      help="minibatch sizes (default 128 256 1024; with --peers 128 256)")
  parser.add_argument("--minibatches", type=int, default=10)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="m = 128 and 256, 3 minibatches, 3 repetitions (about a minute)")
  parser.add_argument("--peers", action="store_true",
                      help="table 2: cka-pytorch, torch-cka, NumPy SYRK (extra 'bench')")
  parser.add_argument("--torch_cka_minibatches", type=int, default=1)
  parser.add_argument("--smoke", action="store_true",
                      help="seconds: m = 8, 1 minibatch, 1 repetition, tables 1 and 2")
  args = parser.parse_args()
  if args.smoke:
    args.m, args.minibatches, args.reps = [8], 1, 1
  if args.quick:
    args.minibatches, args.reps = 3, 3
    args.m = args.m or [128, 256]
  ms = args.m or ([128, 256] if args.peers else [128, 256, 1024])
  for m in ms:
    k = minibatches_for(m, args.minibatches)
    if args.peers or args.smoke:
      bench_peers(m, k, args.reps, min(args.torch_cka_minibatches, k))
    if not args.peers or args.smoke:
      bench_engine(m, k, args.reps)


if __name__ == "__main__":
  main()
