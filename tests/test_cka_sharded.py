"""Minibatch CKA (and every other measure) is the same on 1, 2 and 4 devices and on 2 processes
(docs/method.md#the-minibatch-estimator).

conftest.py gives this process 4 simulated CPU devices; meshes over the first 1, 2 and 4 of them
are three device counts without a subprocess each. The 2-process run (jax.distributed, gloo CPU
collectives) needs subprocesses: tests/cka_distributed_worker.py.
"""
import functools
import os
import re
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from cka_distributed_worker import MEASURE_OPTIONS, make_features, measure_results
from test_cka import ref_minibatch_cka

from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka, measures

TOL = 1e-6


def _reference():
  feats_a, feats_b = make_features()
  cells = [[ref_minibatch_cka(list(x.astype(np.float64)), list(y.astype(np.float64)))[0]
            for y in feats_b] for x in feats_a]
  return np.array(cells)


def test_same_result_on_1_2_4_devices_without_collectives():
  feats_a, feats_b = make_features()
  ref = _reference()
  assert len(jax.devices()) == 4
  results = []
  for n in (1, 2, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    fa, fb = jax.device_put((feats_a, feats_b), sharding.data_sharding(mesh))
    # `update` in two visible halves: the jitted device step, then the float64 host sums.
    compiled = cka._update_terms.lower(fa, fb, True).compile()
    # Each minibatch's terms stay on its device: the step has no cross-device communication.
    assert not re.search(r"all-gather|all-reduce|collective-permute|all-to-all",
                         compiled.as_text())
    terms = compiled(fa, fb)
    assert terms.cross.sharding.is_equivalent_to(sharding.data_sharding(mesh), 3)
    res = cka.result(cka.accumulate(cka.init(["a0", "a1"], ["b0"]), terms))
    np.testing.assert_allclose(res.cka, ref, rtol=0, atol=TOL)
    results.append(res.cka)
  # Features computed inside the user's own jit (activations never leave the device), here
  # through shard_map (each device sees its [k_local, m, ...] block); intra-model with a mask.
  # pmap users get terms with an extra leading axis, which `accumulate` flattens the same way.
  spec = jax.sharding.PartitionSpec(sharding.DATA_AXIS)
  step = jax.jit(jax.shard_map(
      lambda x, w, mask: cka.minibatch_terms([x, jnp.tanh(x @ w - 100.0)], mask=mask),
      mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec(), spec), out_specs=spec))
  mask = np.array([1, 1, 1, 0], np.float32)
  intra = cka.result_from_terms([step(fa[0], np.eye(6, dtype=np.float32), mask)], valid=3)
  feats = [feats_a[0][:3], np.tanh(feats_a[0][:3] - np.float32(100))]
  np.testing.assert_allclose(
      intra.cka[0, 1], ref_minibatch_cka(*(list(v.astype(np.float64)) for v in feats))[0],
      rtol=0, atol=TOL)
  # Bit for bit the same on 1, 2 and 4 devices, and as `update` without a mesh, one minibatch per
  # call (each minibatch's terms are computed by the same kernels wherever it lives).
  for other in results[1:]:
    np.testing.assert_array_equal(other, results[0])
  per = cka.init(["a0", "a1"], ["b0"])
  for i in range(len(feats_b[0])):
    per = cka.update(per, [x[i] for x in feats_a], [y[i] for y in feats_b])
  np.testing.assert_array_equal(cka.result(per).cka, results[0])


@functools.lru_cache(maxsize=None)
def _four_device_measures():
  return measure_results(sharding.make_mesh(jax.devices()))


def test_every_measure_through_the_step_on_4_devices():
  """The analyses' step (cka_runner.make_step) with every measure and a null on 4 devices: the
  measures that read features or pattern moments match the full-batch functions per minibatch
  (side a's features, not b's, reach PWCCA). 1 vs 4 devices through a whole analysis:
  test_measures_reviewer.py::test_every_measure_from_the_same_pass_on_1_and_4_devices."""
  four = _four_device_measures()
  assert len(four) == 3 * 2 * len(measures.MEASURES)
  feats_a, feats_b = make_features()
  for name in ("pwcca", "rsa", "svcca"):
    f, opts = getattr(measures, name), MEASURE_OPTIONS.get(name, {})
    want = [np.mean([f(x[i], feats_b[0][i], **opts) for i in range(len(x))]) for x in feats_a]
    np.testing.assert_allclose(four[f"ab/{name}/value"][:, 0], want, rtol=0, atol=2e-5)
  # Intra-model: PWCCA weighted by the row layer (asymmetric), RSA symmetric.
  x, y = feats_a[0], feats_a[1]
  want = np.mean([measures.pwcca(y[i], x[i], **MEASURE_OPTIONS["pwcca"]) for i in range(len(x))])
  np.testing.assert_allclose(four["a/pwcca/value"][1, 0], want, rtol=0, atol=2e-5)
  assert four["a/pwcca/null"].shape == (2, 2, 2)


def test_two_processes_jax_distributed(tmp_path):
  ref = _reference()
  here = os.path.dirname(os.path.abspath(__file__))
  prefix = str(tmp_path / "out")
  port = helpers.free_port()
  helpers.run_processes([[sys.executable, os.path.join(here, "cka_distributed_worker.py"),
                          str(port), str(i), prefix] for i in range(2)],
                        what="distributed workers")
  outs = [np.load(f"{prefix}{i}.npz") for i in range(2)]
  for out in outs:
    assert int(out["num_minibatches"]) == 4
    np.testing.assert_allclose(out["cka"], ref, rtol=0, atol=TOL)
  np.testing.assert_array_equal(outs[0]["cka"], outs[1]["cka"])
  np.testing.assert_array_equal(outs[0]["stderr"], outs[1]["stderr"])
  # Every other measure and its null through the analyses' step: both processes hold the same
  # numbers, those of 1 process x 4 devices.
  four = _four_device_measures()
  for key, v in four.items():
    np.testing.assert_array_equal(outs[0][key], outs[1][key], err_msg=key)
    np.testing.assert_allclose(outs[0][key], v, rtol=1e-6, atol=1e-7, err_msg=key)
