"""One process of the 2-process minibatch-CKA test (tests/test_cka_sharded.py launches two).

Usage: python tests/cka_distributed_worker.py PORT PROCESS_ID OUT_PREFIX
Each process holds 2 simulated CPU devices (4 global), feeds its half of a global step of
[4, m, ...] minibatches, and writes the CKA it computes, and every other similarity measure with
a null through the analyses' step (`measure_results`), to OUT_PREFIX{PROCESS_ID}.npz.
"""
import sys

import numpy as np

NUM_MINIBATCHES, M = 4, 8


def make_features(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The global step: side a [4, m, 6], [4, m, 2, 3]; side b [4, m, 5] (float32, offset)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(NUM_MINIBATCHES, M, 3))
  a0 = z @ rng.normal(size=(3, 6)) + rng.normal(size=(NUM_MINIBATCHES, M, 6)) + 100.0
  a1 = np.tanh(z @ rng.normal(size=(3, 6))).reshape(NUM_MINIBATCHES, M, 2, 3)
  b0 = z @ rng.normal(size=(3, 5)) + 0.5 * rng.normal(size=(NUM_MINIBATCHES, M, 5))
  return [a0.astype(np.float32), a1.astype(np.float32)], [b0.astype(np.float32)]


# Every similarity measure, with the options that make the step read side a's features (PWCCA's
# L1 weights) and both sides' pattern moments (RSA's correlation distance); sized for m = 8
# (PWCCA keeps few enough directions, r_a + r_b <= m - 1, that no canonical correlation is
# forced to 1: tied variates would make the L1 weights basis-dependent, docs/method.md).
MEASURE_OPTIONS = {"mutual_knn": {"k": 3}, "rsa": {"distance": "correlation"},
                   "pwcca": {"keep": 0.8},
                   "linear_predictivity": {"alphas": (0.1, 10.0)}}
NUM_PERMS = 2


def measure_results(mesh, local: slice = slice(None)) -> dict[str, np.ndarray]:
  """Every measure with a null through `cka_runner.make_step` (the analyses' sharded step) on
  `make_features`' minibatches, cross (a vs b) and intra (a): {f'{pair}/{measure}/{field}'}.

  The 'images' are the features themselves (the sides' feature functions slice them), this
  process feeding minibatches `local` of the global step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_analysis.runtime import sharding  # pylint: disable=g-import-not-at-top
  from vit_analysis.similarity import cka_runner, measures  # pylint: disable=g-import-not-at-top
  from vit_analysis.similarity.representations import Side  # pylint: disable=g-import-not-at-top
  feats_a, feats_b = make_features()
  images_a = np.concatenate([x.reshape(NUM_MINIBATCHES, M, -1) for x in feats_a], -1)
  side_a = Side(lambda v, x: {"a0": x[:, :6], "a1": x[:, 6:].reshape(-1, 2, 3)}, {}, 0,
                ("a0", "a1"))
  side_b = Side(lambda v, x: {"b0": x}, {}, 0, ("b0",))
  opts = {n: measures.resolve_options(n, **MEASURE_OPTIONS.get(n, {})) for n in measures.MEASURES}
  spec = tuple((n, tuple(sorted(o.items()))) for n, o in opts.items())
  pairs = [("a", "b"), ("a", None)]
  step = cka_runner.make_step({"a": side_a, "b": side_b}, pairs, extra_measures=spec, mesh=mesh)
  images = sharding.shard_batch((images_a[local], feats_b[0][local]), mesh)
  perms = sharding.replicate(measures.null_permutations(0, NUM_PERMS, M), mesh)
  out = {}
  for (a, b), (_, terms) in zip(pairs, step(({}, {}), images, np.ones(NUM_MINIBATCHES), perms)):
    names_b = None if b is None else ("b0",)
    for name, o in opts.items():
      state = measures.init(name, ("a0", "a1"), names_b, num_perms=NUM_PERMS, **o)
      res = measures.result(measures.accumulate(state, jax.device_get(terms[name])
                                                if terms[name]["count"].is_fully_addressable
                                                else terms[name]))
      for field in ("value", "stderr", "null"):
        out[f"{a}{b or ''}/{name}/{field}"] = getattr(res, field)
  return out


def main(port: int, process_id: int, out_prefix: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  from vit_analysis.runtime import sharding  # pylint: disable=g-import-not-at-top
  from vit_analysis.similarity import cka
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  mesh = sharding.make_mesh()
  feats_a, feats_b = make_features()
  half = NUM_MINIBATCHES // 2
  local = slice(process_id * half, (process_id + 1) * half)
  fa, fb = sharding.shard_batch(([x[local] for x in feats_a], [y[local] for y in feats_b]), mesh)
  assert fa[0].shape == feats_a[0].shape and not fa[0].is_fully_addressable
  res = cka.result(cka.update(cka.init(["a0", "a1"], ["b0"]), fa, fb, stacked=True))
  np.savez(f"{out_prefix}{process_id}.npz", cka=res.cka, stderr=res.stderr,
           num_minibatches=res.num_minibatches, **measure_results(mesh, local))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
