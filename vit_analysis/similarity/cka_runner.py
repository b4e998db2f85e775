"""The CKA driver shared by every CKA-family analysis: the step, the repeat loop, the results.

Protocol (docs/method.md#minibatch-cka): draw N examples without replacement, split them into N/m
minibatches of m, sum the per-minibatch unbiased HSIC terms of every layer pair over the
minibatches, divide once; do it R times with a fresh sample and report the mean and spread of the
R CKA values per cell. Both sides see the same images in the same minibatches, each with its own
preprocessing and resolution.

Everything per minibatch happens inside one jitted step: the forward pass captures only the
selected layers, the Grams and HSIC terms are computed where the activations live, and only the
small per-minibatch terms leave the device (vit_analysis.similarity.cka holds all of the maths). A step
carries `[minibatches, m, h, w, c]` images with the minibatch axis sharded over the device mesh.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from vit_analysis import config_lib
from vit_analysis.input import streaming
from vit_analysis.runtime import jit_cache, sharding
from vit_analysis.runtime import resume as resume_lib
from vit_analysis.runtime import workdir as workdir_lib
from vit_analysis.similarity import cka, significance
from vit_analysis.similarity import measures as measures_lib
from vit_analysis.similarity.representations import Side

_STEPS: jit_cache.JitCache[Callable[..., Any]] = jit_cache.JitCache()


@dataclasses.dataclass
class RepeatedCKA:
  """CKA matrices (and other measures) of R independent samples.

  Attributes:
    names_a, names_b: row and column names.
    values: [R, A, B] linear CKA per repeat.
    stderr: [R, A, B] jackknife standard error over the minibatches of each repeat.
    num_examples, minibatch_size: per repeat.
    examples_counted: [R] examples the accumulator actually summed per repeat (= num_examples
      unless a step was lost or counted twice, e.g. across an interruption).
    measures: {measure: {'values', 'stderr'[, 'null_mean', 'null_std']: [R, A, B][,
      'null_values': [P, A, B]]}} of the other similarity measures
      (`vit_analysis.similarity.measures`).
    null: {'null_mean', 'null_std': [R, A, B], 'null_values': [P, A, B]} of linear CKA under the
      shuffle null, or None. `null_values[p]` is the mean over repeats of permutation p's value:
      a draw of the null of the mean over repeats, which the p-values compare the mean with
      (docs/method.md#significance).
    max_leave_one_out: [R, A, B] the largest change of linear CKA when one minibatch of the repeat
      is left out (docs/method.md#cka-pitfalls), or None.
    leave_one_out: [R, k, A, B] linear CKA of each repeat without its minibatch i, or None (runs
      saved before it was kept): the exact jackknife of any statistic of the grid
      (`linear_estimate`).
  """
  names_a: list[str]
  names_b: list[str]
  values: np.ndarray
  stderr: np.ndarray
  num_examples: int
  minibatch_size: int
  examples_counted: np.ndarray | None = None
  measures: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  null: dict[str, np.ndarray] | None = None
  max_leave_one_out: np.ndarray | None = None
  leave_one_out: np.ndarray | None = None

  @property
  def mean(self) -> np.ndarray:
    return self.values.mean(0)

  @property
  def std(self) -> np.ndarray:
    return _spread(self.values)

  def arrays(self) -> dict[str, np.ndarray]:
    """Every saved array: linear CKA as values/stderr/mean/std (+ cka_null_{mean,std,z,p,values}),
    each other measure as <measure>_{values,stderr,mean,std} (+ _null_{mean,std,z,p,values})."""
    out = dict(values=self.values, stderr=self.stderr, mean=self.mean, std=self.std)
    if self.max_leave_one_out is not None:
      out["max_leave_one_out"] = self.max_leave_one_out
    if self.leave_one_out is not None:
      out["leave_one_out"] = self.leave_one_out
    groups = [("cka", dict(values=self.values, **(self.null or {})))] if self.null else []
    for name, v in self.measures.items():
      out.update({f"{name}_values": v["values"], f"{name}_stderr": v["stderr"].mean(0),
                  f"{name}_mean": v["values"].mean(0), f"{name}_std": _spread(v["values"])})
      if "null_mean" in v:
        groups.append((name, v))
    for name, v in groups:
      mean, null_mean, null_std = v["values"].mean(0), v["null_mean"].mean(0), v["null_std"].mean(0)
      with np.errstate(divide="ignore", invalid="ignore"):
        z = (mean - null_mean) / null_std
      out.update({f"{name}_null_mean": null_mean, f"{name}_null_std": null_std,
                  f"{name}_null_z": z})
      if "null_values" in v:
        out[f"{name}_null_values"] = v["null_values"]
        # Distances (measures_lib.higher_is_similar False) are similar in the lower tail.
        sign = 1.0 if name == "cka" or measures_lib.higher_is_similar(name) else -1.0
        out[f"{name}_null_p"] = significance.permutation_p_values(sign * mean,
                                                                  sign * v["null_values"])
    return out

  def save(self, path_without_ext: str, **extra: Any) -> None:
    """Writes `.npz` (arrays) and `.json` (names, mean, std, settings) for redrawing.

    Each file is one write of `runtime.workdir` (local or `gs://`); the `.json`, written last,
    marks the pair complete (`vit_analysis.results` reads only stems that have it).
    """
    counted = (np.full(len(self.values), self.num_examples) if self.examples_counted is None
               else np.asarray(self.examples_counted))
    workdir_lib.save_npz(path_without_ext + ".npz", names_a=np.asarray(self.names_a),
                         names_b=np.asarray(self.names_b), examples_counted=counted,
                         **self.arrays(), **extra)
    workdir_lib.write_json(path_without_ext + ".json", dict(
        names_a=self.names_a, names_b=self.names_b, mean=self.mean.tolist(),
        std=self.std.tolist(), repeats=len(self.values), num_examples=self.num_examples,
        minibatch_size=self.minibatch_size, examples_counted=counted.tolist(),
        measures=sorted(self.measures), null=self.null is not None), indent=None)

  @classmethod
  def load(cls, path_without_ext: str) -> "RepeatedCKA":
    z = workdir_lib.load_npz(path_without_ext + ".npz")
    meta = json.loads(workdir_lib.read_text(path_without_ext + ".json"))
    measures = {}
    for name in meta.get("measures", []):
      measures[name] = {"values": z[f"{name}_values"],
                        "stderr": np.broadcast_to(z[f"{name}_stderr"], z[f"{name}_values"].shape)}
      if f"{name}_null_mean" in z:
        measures[name].update(null_mean=np.broadcast_to(z[f"{name}_null_mean"],
                                                        z[f"{name}_values"].shape),
                              null_std=np.broadcast_to(z[f"{name}_null_std"],
                                                       z[f"{name}_values"].shape),
                              null_values=z[f"{name}_null_values"])
    null = None
    if meta.get("null"):
      null = {k: np.broadcast_to(z[f"cka_{k}"], z["values"].shape)
              for k in ("null_mean", "null_std")}
      null["null_values"] = z["cka_null_values"]
    return cls(list(z["names_a"]), list(z["names_b"]), z["values"], z["stderr"],
               meta["num_examples"], meta["minibatch_size"], z.get("examples_counted"),
               measures, null, z.get("max_leave_one_out"), z.get("leave_one_out"))


def _spread(values: np.ndarray) -> np.ndarray:
  """Standard deviation over repeats (axis 0), 0 with one repeat."""
  return values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])


def linear_estimate(terms: Sequence[tuple[RepeatedCKA, np.ndarray]]) -> dict[str, Any]:
  """A linear statistic of CKA grids, S = sum_t sum_ab w_t[a, b] CKA_t[a, b], with its error.

  The comparisons are paired: every CKA analysis draws repeat r's images, and minibatch i of
  it, from the same seed and protocol (`streaming.cka_plan`), so S is formed within each repeat
  and, with one repeat, within each leave-one-minibatch-out grid
  (docs/method.md#error-bars-of-cka-statistics).

  Args:
    terms: (comparison, weights [A, B]) pairs, all with the same repeats R and minibatches k;
      cells of weight 0 may be NaN.

  Returns:
    {'value': S of the mean grids (the mean over repeats of S),
     'stderr': R >= 2: the standard deviation of the R per-repeat S (ddof=1) / sqrt(R);
       R = 1: the exact jackknife over the k minibatches of S_(-i) = sum_t sum_ab w_t CKA_t,(-i)
       (NaN with one minibatch, or for comparisons saved without their leave-one-out grids),
     'over': what the error is over, e.g. 'over 20 repeats'}.
  """
  if not terms:
    raise ValueError("linear_estimate needs at least one (comparison, weights) term")
  repeats = {len(rep.values) for rep, _ in terms}
  minibatches = {rep.num_examples // rep.minibatch_size for rep, _ in terms}
  if len(repeats) != 1 or len(minibatches) != 1:
    raise ValueError(f"the comparisons differ in repeats {sorted(repeats)} or minibatches "
                     f"{sorted(minibatches)}: they are not paired")
  (r,), (k,) = repeats, minibatches
  per_repeat, loo = np.zeros(r), np.zeros(k)
  for rep, w in terms:
    w = np.asarray(w, np.float64)
    values = np.asarray(rep.values, np.float64)
    if w.shape != values.shape[1:]:
      raise ValueError(f"weights of shape {w.shape} for a grid of shape {values.shape[1:]}")
    used = w != 0  # NaN cells (e.g. constant input patches) carry weight 0
    per_repeat += (np.where(used, values, 0.0) * w).sum((1, 2))
    if r == 1 and k >= 2:
      if rep.leave_one_out is None:
        loo = None
      elif loo is not None:
        loo += (np.where(used, np.asarray(rep.leave_one_out[0], np.float64), 0.0) * w).sum((1, 2))
  value = float(per_repeat.mean())
  if r >= 2:
    return dict(value=value, stderr=float(per_repeat.std(ddof=1) / math.sqrt(r)),
                over=f"over {r} repeats")
  if k < 2:
    return dict(value=value, stderr=float("nan"), over="one repeat of one minibatch: no spread")
  if loo is None:
    return dict(value=value, stderr=float("nan"),
                over="one repeat saved without its leave-one-minibatch-out grids: no spread")
  return dict(value=value, stderr=float(cka.jackknife_stderr(loo)),
              over=f"jackknife over {k} minibatches")


Pair = tuple[str, "str | None"]  # (row side, column side); column None: intra-model


def make_step(sides: Mapping[str, Side], pairs: Sequence[Pair], *,
              gram_precision: str = "highest",
              extra_measures: tuple[tuple[str, tuple], ...] = (),
              mesh: jax.sharding.Mesh | None = None) -> Callable[..., Any]:
  """The jitted per-step function: images of `s` minibatches -> per-minibatch terms of every pair.

  Each side is forwarded once and its centred Grams computed once per minibatch; every pair's
  HSIC terms (and extra measures) come from those Grams (docs/method.md#one-pass-for-many-models).
  Cached per (feature functions, names, pairs, options), so repeated comparisons of one
  architecture compile once.

  Args:
    sides: {key: Side} in a fixed order.
    pairs: (key_a, key_b) pairs of side keys; `key_b=None` is the intra-model comparison of
      `key_a` (each Gram used once).
    gram_precision: the Grams' matmul precision on GPU/TPU (`cka.minibatch_terms`).
    extra_measures: ((measure, sorted options), ...) of `vit_analysis.similarity.measures` computed from the
      same centred Grams in the same step (empty: linear CKA alone, the paper's path); those that
      `measures.needs` features (PWCCA) or `pattern_moments` (correlation RSA) get them too.
    mesh: the device mesh (needed with `extra_measures`: they run per device, see below).

  Returns:
    `step(variables, images, mask, perms) -> [(cka.HSICTerms, {measure: terms})] per pair`
    ([s, ...] leaves, a few kB), `variables` and `images` tuples in the order of `sides` (images
    `[s, m, h, w, 3]` sharded on axis 0), `mask: [s]` (0 for padding minibatches), `perms:
    [P, m]` null permutations or None.
  """
  if extra_measures and mesh is None:
    raise ValueError("make_step: extra measures need the mesh")
  keys = tuple(sides)
  index = tuple((keys.index(a), None if b is None else keys.index(b)) for a, b in pairs)
  key = (tuple((sides[k].features, sides[k].names) for k in keys), index, gram_precision,
         extra_measures, mesh)
  return _STEPS.get(key, lambda: _make_step([sides[k] for k in keys], index, gram_precision,
                                            extra_measures, mesh))


def _make_step(sides: Sequence[Side], pairs: Sequence[tuple[int, int | None]],
               gram_precision: str, extra_measures: tuple[tuple[str, tuple], ...],
               mesh: jax.sharding.Mesh | None) -> Callable[..., Any]:

  def features(side, variables, images):
    s, m = images.shape[:2]
    feats = side.features(variables, images.reshape((s * m,) + images.shape[2:]))
    missing = [n for n in side.names if n not in feats]
    if missing:
      raise KeyError(f"feature function did not return {missing}")
    return [feats[n].reshape((s, m) + feats[n].shape[1:]) for n in side.names]

  def grams(feats):  # [s, A, m, m]: each minibatch's Grams where it lives
    return jax.vmap(lambda *xs: cka.centred_grams(list(xs), gram_precision=gram_precision))(
        *feats)

  def step(variables, images, mask, perms):
    feats = [features(side, v, x) for side, v, x in zip(sides, variables, images)]
    if len(pairs) == 1 and not extra_measures:  # one comparison: the fused single-pair path
      a, b = pairs[0]
      return [(cka.minibatch_terms(feats[a], None if b is None else feats[b], mask=mask,
                                   gram_precision=gram_precision), {})]
    g = [grams(f) for f in feats]  # every side's Grams once, shared by all its pairs
    # RSA's correlation distance: each side's per-example moments once ([s, A, 3, m], O(m p)).
    mom = [jax.vmap(lambda *xs: measures_lib.pattern_moments(xs))(*f) if "moments" in need
           else None for f in feats]
    count = jnp.where(mask > 0, feats[0][0].shape[1], 0).astype(jnp.int32)
    out = []
    for a, b in pairs:
      ga, gb = g[a], None if b is None else g[b]
      cross, sa, sb, ca, cb = jax.vmap(cka.terms_from_grams)(ga, gb)
      extra = {}
      if extra_measures:  # PWCCA's L1 weights read side a's features (docs/method.md)
        extra = measure_terms(ga, gb, perms, feats[a] if "features" in need else None,
                              mom[a], None if b is None else mom[b])
      out.append((cka.HSICTerms(cross, sa, sb, ca, cb, count), extra))
    return out

  spec = {n: dict(o) for n, o in extra_measures}
  need = {k for n, o in spec.items() for k in measures_lib.needs(n, **o)}

  def measure_terms(ga, gb, perms, fa, ma, mb):
    # Per device (shard_map): the partitioner would all-gather the Grams around the measures'
    # eigh / sort custom calls, and XLA:CPU can deadlock on collectives between asynchronously
    # dispatched steps. Each minibatch is whole on its device, so nothing is exchanged.
    sharded = {"ga": ga, "gb": gb, "fa": fa, "ma": ma, "mb": mb}
    sharded = {k: v for k, v in sharded.items() if v is not None}
    args, specs = [sharded], [jax.tree.map(lambda _: P(sharding.DATA_AXIS), sharded)]
    if perms is not None:
      args.append(perms)
      specs.append(P())

    def local(xs, p=None):
      return measures_lib.terms(spec, xs["ga"], xs.get("gb"), perms=p, feats_a=xs.get("fa"),
                                moments_a=xs.get("ma"), moments_b=xs.get("mb"), stacked=True)

    # check_vma off: the measures' loops start from unsharded constants (a bisection's bounds).
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs),
                         out_specs=P(sharding.DATA_AXIS), check_vma=False)(*args)

  return jax.jit(step)


@dataclasses.dataclass
class MemoryPlan:
  """What one step holds per device at minibatch size m (from `jax.eval_shape`, no compute).

  Attributes:
    minibatch_size: m.
    minibatches_per_device: minibatches of a step on each device.
    weights: {side: bytes} of its variables (replicated on every device).
    captured: {side: bytes} of its captured features per minibatch if all were kept.
    largest_layer: {side: bytes} of its largest captured feature per minibatch.
    grams: {side: bytes} of its [A, m, m] float32 centred Grams per minibatch.
  """
  minibatch_size: int
  minibatches_per_device: int
  weights: dict[str, int]
  captured: dict[str, int]
  largest_layer: dict[str, int]
  grams: dict[str, int]

  def total(self, m: int | None = None) -> int:
    """Planned peak bytes per device at minibatch size m (default: the plan's).

    The weights of every side, and per minibatch the Grams of every side (all kept: every pair
    reads them) plus the largest captured feature (XLA frees each activation after its Gram).
    Feature bytes scale with m, Gram bytes with m^2.
    """
    m = self.minibatch_size if m is None else m
    r = m / self.minibatch_size
    per_minibatch = (sum(self.grams.values()) * r * r + max(self.largest_layer.values()) * r)
    return int(sum(self.weights.values()) + self.minibatches_per_device * per_minibatch)

  def largest_fitting_m(self, limit_bytes: float) -> int:
    """The largest m (>= 4) whose planned peak fits in `limit_bytes`, 0 if none does."""
    lo, hi = 3, 4
    while self.total(hi) <= limit_bytes and hi < 2**24:
      lo, hi = hi, hi * 2
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if self.total(mid) <= limit_bytes else (lo, mid)
    return lo if lo >= 4 else 0

  def describe(self) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # pylint: disable=unnecessary-lambda-assignment
    sides = "; ".join(f"{k}: weights {mib(self.weights[k])}, captured features "
                      f"{mib(self.captured[k])} (largest {mib(self.largest_layer[k])}), Grams "
                      f"{mib(self.grams[k])}" for k in self.grams)
    return (f"memory plan per device at m = {self.minibatch_size} "
            f"({self.minibatches_per_device} minibatch(es) per device): {sides}; planned peak "
            f"{mib(self.total())} (weights + Grams of every side + the largest captured feature)")

  def check(self, limit_gb: float) -> None:
    """Raises MemoryError naming the plan and the largest m that fits if it exceeds `limit_gb`."""
    limit = limit_gb * 1e9
    if self.total() > limit:
      best = self.largest_fitting_m(limit)
      raise MemoryError(
          f"{self.describe()} does not fit the {limit_gb:g} GB per device; the largest "
          f"minibatch size that fits is m = {best}" + (
              "" if best else " (none: the weights alone do not fit)"))


def memory_plan(sides: Mapping[str, Side], minibatch_size: int,
                minibatches_per_device: int = 1) -> MemoryPlan:
  """The per-device memory plan of a pass over `sides` at minibatch size m (`MemoryPlan`)."""
  weights, captured, largest, grams = {}, {}, {}, {}
  for key, side in sides.items():
    images = jax.ShapeDtypeStruct((minibatch_size, side.image_size, side.image_size, 3),
                                  jnp.float32)
    shapes = jax.eval_shape(side.features, side.variables, images)
    sizes = [int(np.prod(shapes[n].shape)) * np.dtype(shapes[n].dtype).itemsize
             for n in side.names]
    weights[key] = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(side.variables))
    captured[key], largest[key] = sum(sizes), max(sizes)
    grams[key] = len(side.names) * minibatch_size**2 * 4
  return MemoryPlan(minibatch_size, minibatches_per_device, weights, captured, largest, grams)


def device_memory_gb(memory_limit_gb: float = 0.0) -> float:
  """Memory per device to plan against: `memory_limit_gb` if > 0, else the first device's
  `memory_stats()['bytes_limit']` where the backend reports it, else the host's available RAM."""
  if memory_limit_gb > 0:
    return float(memory_limit_gb)
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without memory stats
    stats = {}
  if stats.get("bytes_limit"):
    return stats["bytes_limit"] / 1e9
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 1e9


class _MeasureSums:
  """Host float64 sums of the extra measures of one repeat (`vit_analysis.similarity.measures`)."""

  def __init__(self, spec: tuple[tuple[str, tuple], ...], names_a, names_b, num_perms: int,
               capacity: int = 0):
    self.spec, self.num_perms, self.capacity = spec, num_perms, capacity
    self.names_a, self.names_b = tuple(names_a), None if names_b is None else tuple(names_b)

  def empty(self) -> dict[str, Any]:
    return {n: measures_lib.init(n, self.names_a, self.names_b, num_perms=self.num_perms,
                                 capacity=self.capacity, **dict(o)) for n, o in self.spec}

  @staticmethod
  def add(states: dict[str, Any], terms: dict[str, Any], mask: Any) -> dict[str, Any]:
    return {n: measures_lib.accumulate(st, terms[n], mask=mask) for n, st in states.items()}

  @staticmethod
  def results(states: dict[str, Any]) -> dict[str, Any]:
    return {n: measures_lib.result(st) for n, st in states.items()}


def cka_over_repeats(side_a: Side, side_b: Side | None, source: Any, **kwargs: Any
                     ) -> RepeatedCKA:
  """Minibatch CKA between every feature of `side_a` and of `side_b` (None: `side_a` with itself).

  The one-pair case of `cka_pairs_over_repeats`.

  Args:
    side_a, side_b: the two representations; `side_b=None` is intra-model (each Gram once).
    source: random-access raw data (`src[i]['image']` uint8).
    **kwargs: the protocol of `cka_pairs_over_repeats` (num_examples, minibatch_size, repeats,
      seed, mesh, ...).

  Returns:
    RepeatedCKA with `values: [R, A, B]` (linear CKA) and `measures` for the others.
  """
  sides = {"a": side_a} if side_b is None else {"a": side_a, "b": side_b}
  pair = ("a", None if side_b is None else "b")
  return cka_pairs_over_repeats(sides, [pair], source, **kwargs)[pair]


def cka_pairs_over_repeats(sides: Mapping[str, Side], pairs: Sequence[Pair], source: Any, *,
                           num_examples: int, minibatch_size: int, repeats: int, seed: int,
                           mesh: jax.sharding.Mesh, minibatches_per_step: int = 0,
                           desc: str = "cka", resume: resume_lib.Checkpointer | None = None,
                           measures: Sequence[str] = ("linear_cka",),
                           measure_options: Mapping[str, Mapping[str, Any]] | None = None,
                           null_permutations: int = 0, gram_precision: str = "highest",
                           memory_limit_gb: float = 0.0) -> dict[Pair, RepeatedCKA]:
  """Minibatch CKA of every requested pair of sides from one pass: each side forwarded once.

  Every minibatch is forwarded through each side once and each side's centred Grams are computed
  once; every pair (intra-model `(a, None)` and cross-model `(a, b)`) takes its HSIC terms and
  measures from those Grams (docs/method.md#one-pass-for-many-models). Each pair's result is
  the one `cka_over_repeats` gives for that pair alone on the same images and seed.

  Args:
    sides: {key: Side}; each side is forwarded once per minibatch.
    pairs: (key_a, key_b) pairs of `sides` keys; `key_b=None` is intra-model (each Gram once).
    source: random-access raw data (`src[i]['image']` uint8).
    num_examples: N examples per repeat, drawn without replacement (multiple of `minibatch_size`).
    minibatch_size: m (>= 4 for unbiased HSIC).
    repeats: R independent samples (`streaming.cka_plan`).
    seed: sampling seed (and the null permutations' seed).
    mesh: 1-D device mesh; the minibatch axis of a step is split over it.
    minibatches_per_step: s; 0 = one minibatch per device. Rounded up to a multiple of the
      device count; a short last step is padded and masked.
    desc: name used in progress logs.
    resume: optional `resume.Checkpointer`: the finished repeats, the running accumulators and
      the stream position are saved every `resume.every_s` seconds, and a rerun continues from
      them with bit-identical results.
    measures: similarity measures computed from the same forward pass and Grams
      (`vit_analysis.similarity.measures.MEASURES`); linear CKA, the paper's, is always computed.
    measure_options: {measure: options} (e.g. {'mutual_knn': {'k': 5}}).
    null_permutations: P > 0 also scores side b with its examples shuffled within each minibatch
      by P fixed permutations, giving every cell of every measure a null mean, std and z-score.
    gram_precision: matmul precision of the Grams on GPU/TPU (ignored on CPU).
    memory_limit_gb: > 0: check the memory plan (`memory_plan`) against this many GB per device
      and refuse a plan that does not fit before the pass; 0: no check.

  Returns:
    {pair: RepeatedCKA with `values: [R, A, B]` (linear CKA) and `measures` for the others}.
  """
  if minibatch_size < 4:
    raise ValueError(f"minibatch_size must be >= 4 for unbiased HSIC, got {minibatch_size}")
  if num_examples % minibatch_size or num_examples <= 0:
    raise ValueError(f"num_examples {num_examples} must be a positive multiple of "
                     f"minibatch_size {minibatch_size}")
  if num_examples > len(source):
    raise ValueError(f"num_examples {num_examples} > {len(source)} examples in the source")
  pairs = [(a, b) for a, b in pairs]
  unknown_sides = [k for p in pairs for k in p if k is not None and k not in sides]
  if unknown_sides or not pairs or len(set(pairs)) != len(pairs):
    raise ValueError(f"pairs {pairs} must be distinct pairs of side keys {list(sides)}")
  requested = tuple(dict.fromkeys(measures))
  unknown = [n for n in requested if n not in measures_lib.MEASURES]
  if unknown:
    raise ValueError(f"unknown measures {unknown}; known: {list(measures_lib.MEASURES)}")
  options = {n: measures_lib.resolve_options(n, **dict((measure_options or {}).get(n, {})))
             for n in measures_lib.MEASURES}
  extra_names = [n for n in requested if n != "linear_cka"]
  if null_permutations:  # linear CKA's null comes from the measures' (identical) linear_cka
    extra_names = ["linear_cka"] + extra_names
  spec = tuple((n, tuple(sorted(options[n].items()))) for n in extra_names)
  s = streaming.round_step(max(minibatches_per_step, 1), mesh)
  m = minibatch_size
  # Only the sides some pair reads are forwarded.
  used = [k for k in sides if any(k in p for p in pairs)]
  sides = {k: sides[k] for k in used}
  if memory_limit_gb:
    plan = memory_plan(sides, m, minibatches_per_device=max(s // mesh.size, 1))
    logging.info("%s: %s", desc, plan.describe())
    plan.check(memory_limit_gb)
  step = make_step(sides, pairs, gram_precision=gram_precision, extra_measures=spec, mesh=mesh)
  variables = tuple(sharding.replicate(side.variables, mesh) for side in sides.values())
  perms = None
  if null_permutations:
    perms = sharding.replicate(measures_lib.null_permutations(seed, null_permutations, m), mesh)
  # One view per distinct (resolution, normalisation): each image is preprocessed once per view.
  views: dict[str, Any] = {}
  view_of: dict[str, str] = {}
  for key, side in sides.items():
    view = (side.image_size, side.normalization)
    name = next((n for n, v in views.items() if v == view), "abcdefghijklmnopqrstuvwxyz"[
        len(views)] if len(views) < 26 else f"v{len(views)}")
    views[name], view_of[key] = view, name
  sample = streaming.cka_plan(len(source), num_examples, m, repeats, seed)  # [R, k, m]
  k = num_examples // m
  steps_per_repeat = -(-k // s)
  names = {(a, b): (tuple(sides[a].names), None if b is None else tuple(sides[b].names))
           for a, b in pairs}
  sums = {p: _MeasureSums(spec, *names[p], null_permutations, capacity=k) for p in pairs}
  tags = {p: f"p{i}" for i, p in enumerate(pairs)}  # checkpoint keys
  # capacity=k: a repeat's k minibatches fit, so a checkpointed state has the template's shapes.
  empty = {tags[p]: {"cka": cka.init(*names[p], capacity=k), "measures": sums[p].empty()}
           for p in pairs}
  fields = ("values", "stderr", "null_mean", "null_std")

  def zeros(p):
    na, nb = names[p]
    shape = (repeats, len(na), len(na if nb is None else nb))
    return {"cka": {**{f: np.zeros(shape) for f in (*fields[:2], "max_leave_one_out")},
                    "leave_one_out": np.zeros((repeats, k) + shape[1:])},
            "counted": np.zeros((repeats,), np.int64),
            "measures": {n: {**{f: np.zeros(shape) for f in fields},
                             "null_values": np.zeros((null_permutations,) + shape[1:])}
                         for n, _ in spec}}

  out = {tags[p]: zeros(p) for p in pairs}
  state, position = empty, 0
  plan_id = streaming.plan_fingerprint(sample.reshape(-1), s * m, views) + repr(
      (spec, null_permutations, gram_precision))
  if len(pairs) > 1:
    plan_id += repr([(view_of[a], b and view_of[b]) for a, b in pairs])
  if resume is not None:
    restored = resume.restore(like={"state": empty, "out": out})
    if restored is not None:
      saved, position, extra = restored
      if extra.get("plan") != plan_id:
        raise resume_lib.CheckpointError(
            f"{resume.path} holds CKA sums of another plan (examples, minibatches, measures or "
            "preprocessing); delete it to start again")
      state, out = saved["state"], saved["out"]
      logging.info("%s: resuming at repeat %d, step %d of %d", desc,
                   position // steps_per_repeat + 1, position % steps_per_repeat,
                   steps_per_repeat)

  def add(state, terms, mask):
    new = {}
    for p, (hsic, extra) in zip(pairs, terms):
      st = state[tags[p]]
      new[tags[p]] = {"cka": cka.accumulate(st["cka"], hsic),
                      "measures": sums[p].add(st["measures"], extra, mask) if spec else {}}
    return new

  t0, done = time.time(), 0
  # Where the time goes: waiting for decoded images, the device (dispatching a step, and waiting
  # for its results once the host has nothing else to do), and the host's float64 accumulation.
  split = {"input": 0.0, "device": 0.0, "host": 0.0}

  def timed_add(state, pending):
    tic = time.perf_counter()
    jax.block_until_ready(pending[0])
    tac = time.perf_counter()
    state = add(state, *pending)
    split["device"] += tac - tic
    split["host"] += time.perf_counter() - tac
    return state

  for r in range(position // steps_per_repeat, repeats):
    start = position - r * steps_per_repeat if r == position // steps_per_repeat else 0
    if start == 0:
      state = empty
    stream = streaming.Stream(source, sample[r].reshape(-1), views=views, mesh=mesh,
                              step_size=s * m, group=m, start_step=start,
                              desc=f"{desc} repeat {r + 1}/{repeats}")
    pending = None
    batches = iter(stream)
    while True:
      tic = time.perf_counter()
      batch = next(batches, None)
      split["input"] += time.perf_counter() - tic
      if batch is None:
        break
      images = tuple(batch.images[view_of[key]] for key in sides)
      # Dispatch is asynchronous: the device computes this step while the host adds the
      # previous step's terms (and the workers decode the next steps).
      tic = time.perf_counter()  # dispatch (all of the step where it runs synchronously)
      terms = step(variables, images, batch.mask, perms)
      split["device"] += time.perf_counter() - tic
      if pending is not None:
        state = timed_add(state, pending)
        if resume is not None:  # `state` holds every step before this one
          resume.maybe_save({"state": state, "out": out}, r * steps_per_repeat + batch.step,
                            {"plan": plan_id})
      pending = (terms, batch.mask)
      done += batch.num_real
    state = timed_add(state, pending)
    if resume is not None:  # `out` gets this repeat's row in place: an interrupt saves it as was
      resume.freeze()
    for p in pairs:
      o, st = out[tags[p]], state[tags[p]]
      res = cka.result(st["cka"])
      o["cka"]["values"][r], o["cka"]["stderr"][r] = res.cka, res.stderr
      o["cka"]["max_leave_one_out"][r] = res.max_leave_one_out
      o["cka"]["leave_one_out"][r] = res.leave_one_out
      o["counted"][r] = int(res.num_examples)
      for name, result in sums[p].results(st["measures"]).items():
        om = o["measures"][name]
        om["values"][r], om["stderr"][r] = result.value, result.stderr
        if result.null_mean is not None:
          om["null_mean"][r], om["null_std"][r] = result.null_mean, result.null_std
          om["null_values"] += result.null / repeats
    if resume is not None:
      resume.maybe_save({"state": empty, "out": out}, (r + 1) * steps_per_repeat,
                        {"plan": plan_id})
    elapsed = time.time() - t0
    logging.info("%s: repeat %d/%d, %d examples, %.1f examples/s; time waiting for input "
                 "%.1f s, for the device %.1f s, host accumulation %.1f s", desc, r + 1, repeats,
                 num_examples, done / max(elapsed, 1e-9), split["input"], split["device"],
                 split["host"])
  reps = {}
  for p in pairs:
    o = out[tags[p]]
    extra = {n: dict(v) for n, v in o["measures"].items()}
    null = extra.pop("linear_cka") if null_permutations else None  # its values are the main CKA
    if not null_permutations:
      extra = {n: {f: v[f] for f in fields[:2]} for n, v in extra.items()}
    na, nb = names[p]
    reps[p] = RepeatedCKA(
        list(na), list(na if nb is None else nb), o["cka"]["values"], o["cka"]["stderr"],
        num_examples, minibatch_size, o["counted"], extra,
        None if null is None else {f: null[f] for f in (*fields[2:], "null_values")},
        o["cka"]["max_leave_one_out"], o["cka"]["leave_one_out"])
  return reps


def protocol_config() -> ml_collections.ConfigDict:
  """The sampling options every CKA-family analysis takes, with the paper's defaults.

  10,240 examples drawn without replacement, in minibatches of 1,024, 20 repeats
  (docs/method.md#minibatch-cka); the examples come from the `split` source.
  """
  return ml_collections.ConfigDict(dict(
      split="test",
      num_examples=10240,
      minibatch_size=1024,
      repeats=20,
      minibatches_per_step=0,   # 0: one minibatch per device per step
      checkpoint_every_s=60.0,  # partial accumulators saved this often (resumable)
      fast_compile=None,        # None: config.train.fast_compile
      # Similarity measures from the same Grams (docs/method.md#other-similarity-measures):
      measures=("linear_cka",),  # + any of similarity.measures.MEASURES
      measure_options={},       # measure -> options, e.g. {'mutual_knn': {'k': 5}}
      null_permutations=0,      # P > 0: shuffle null (mean, std, z) on every cell
      gram_precision="highest",  # GPU/TPU Gram matmuls: 'highest' | 'high' | 'default'
  ))


def protocol(sub: Any) -> dict[str, Any]:
  """The keyword arguments of `cka_over_repeats` from a merged sub-config."""
  options = {n: dict(o) for n, o in dict(sub.get("measure_options", None) or {}).items()}
  return dict(num_examples=int(sub.num_examples), minibatch_size=int(sub.minibatch_size),
              repeats=int(sub.repeats), minibatches_per_step=int(sub.minibatches_per_step),
              measures=config_lib.names(sub.get("measures", ("linear_cka",))),
              measure_options=options, null_permutations=int(sub.get("null_permutations", 0)),
              gram_precision=str(sub.get("gram_precision", "highest")))
