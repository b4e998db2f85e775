"""One process of the 2-process minibatch-CKA test (tests/test_cka_sharded.py launches two).

Usage: python tests/cka_distributed_worker.py PORT PROCESS_ID OUT_PREFIX
Each process holds 2 simulated CPU devices (4 global), feeds its half of a global step of
[4, m, ...] minibatches, and writes the CKA it computes to OUT_PREFIX{PROCESS_ID}.npz.
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
           num_minibatches=res.num_minibatches)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
