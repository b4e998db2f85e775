"""Dataset scale / fine-tuning: nested subsets, task views, per-block CKA against the reference.

Training itself is replaced by a fake with a known effect (noise added to the parameters of the
upper block only, more for smaller data fractions), so the expected CKA pattern is known: block 0
identical (CKA 1), block 1 lower the smaller the fraction, a 100 % copy identical everywhere. The
real training path runs in the `configs/dataset_scale.py:smoke` end-to-end run.
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import run_analysis

from vit_analysis import models
from vit_analysis.analyses import base, dataset_scale
from vit_analysis.input import data as data_lib
from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka_runner


def test_nested_class_balanced_subsets():
  labels = np.repeat(np.arange(4), [10, 20, 30, 40])
  subsets = dataset_scale.nested_subsets(labels, [0.1, 0.5, 1.0], seed=3)
  assert [len(subsets[f]) for f in (0.1, 0.5, 1.0)] == [1 + 2 + 3 + 4, 5 + 10 + 15 + 20, 100]
  assert set(subsets[0.1]) <= set(subsets[0.5]) <= set(subsets[1.0])
  np.testing.assert_array_equal(np.bincount(labels[subsets[0.5]]), [5, 10, 15, 20])
  with pytest.raises(ValueError):
    dataset_scale.nested_subsets(labels, [0.0], seed=0)


def test_task_views():
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  src = data_lib.ArraySource(images, np.array([3, 8]), 10)
  ctx = base.Context("/tmp", {}, {"train": src, "test": src}, None)
  task = ml_collections.ConfigDict(dict(data="digits:parity"))
  parity = dataset_scale.task_sources(task, ctx)["train"]
  assert parity.num_classes == 2 and [parity[i]["label"] for i in range(2)] == [1, 0]
  task.data = "digits:inverted"
  inv = dataset_scale.task_sources(task, ctx)["test"]
  np.testing.assert_array_equal(inv[1]["image"], 255 - images[1])
  view = dataset_scale.IndexedSource(src, np.array([1]))
  assert len(view) == 1 and view[0]["label"] == 8
  with pytest.raises(KeyError):
    dataset_scale.task_sources(ml_collections.ConfigDict(dict(data="digits:rotated")), ctx)


def _perturbed(ref, noise, seed):
  """Copy of `ref` with Gaussian noise * `noise` on every parameter of encoder block 1."""
  flat = flax.traverse_util.flatten_dict(ref.variables["params"], sep="/")
  rng = np.random.default_rng(seed)
  flat = {k: v + noise * rng.normal(size=v.shape).astype(v.dtype) * np.std(v)
          if "encoderblock_1/" in k else v for k, v in flat.items()}
  return base.LoadedModel(ref.key, ref.name, ref.module,
                          {"params": flax.traverse_util.unflatten_dict(flat, sep="/")},
                          ref.image_size, test_accuracy=0.5)


def test_block_estimates_against_numpy():
  from test_skip_removal import synthetic_comparison
  rep, ref = synthetic_comparison(np.random.default_rng(4), k=6, a=3, b=3)
  est = dataset_scale.block_estimates(rep)
  # One repeat: each block's own leave-one-minibatch-out jackknife error, exact.
  np.testing.assert_allclose(est["block_cka"], np.diag(ref["cka"]), rtol=1e-12)
  np.testing.assert_allclose(est["block_cka_stderr"], np.diag(ref["se"]), rtol=1e-9)
  assert est["block_cka_over"] == "jackknife over 6 minibatches"
  values = np.random.default_rng(5).uniform(0, 1, (4, 3, 3))
  est = dataset_scale.block_estimates(cka_runner.RepeatedCKA(
      list("abc"), list("abc"), values, np.zeros_like(values), 32, 8))
  diag = values[:, np.arange(3), np.arange(3)]
  np.testing.assert_allclose(est["block_cka_stderr"], diag.std(0, ddof=1) / 2, rtol=1e-12)
  assert est["block_cka_over"] == "over 4 repeats"


def test_blockwise_cka_curves_and_figures(tmp_path):
  module = models.create_model("ViT-smoke_8", 10)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(
      max(np.prod(s.shape[:-1]), 1))).astype(s.dtype), shapes)
  ref = base.LoadedModel("vit", "ViT-smoke_8", module, variables, 32)
  rng = np.random.default_rng(1)
  train = data_lib.ArraySource(rng.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8),
                               np.arange(80) % 10, 10)
  calls = []

  def fake_train(key, entry, *, sources, data_tag, init_from=None):  # main's train_fn stand-in
    calls.append((key, len(sources["train"]), init_from is not None, entry.num_classes))
    assert data_tag and entry.checkpoint == ""
    fraction = len(sources["train"]) / len(train)
    return _perturbed(ref, 0.0 if init_from is None and fraction == 1 else 3.0, seed=len(calls))

  ctx = base.Context(str(tmp_path), {"vit": ref}, {"train": train, "test": train},
                     sharding.make_mesh(), train_fn=fake_train)
  config = ml_collections.ConfigDict(dict(
      seed=0, models=dict(vit=dict(name="ViT-smoke_8")),
      dataset_scale=dict(reference="vit", fractions=(0.25, 1.0), layers="blocks",
                         finetune={"parity": dict(data="digits:parity")},
                         num_examples=32, minibatch_size=8, repeats=2)))
  result = run_analysis("dataset_scale", config, ctx)
  assert calls == [("vit_frac0.25", 20, False, 10), ("vit_frac1", 80, False, 10),
                   ("vit_ft_parity", 80, True, 2)]
  small, full = (result.metrics[t]["block_cka"] for t in ("vit_frac0.25", "vit_frac1"))
  np.testing.assert_allclose(full, [1.0, 1.0], atol=1e-5)     # identical copy
  assert small[0] == pytest.approx(1.0, abs=1e-5)             # block 0 untouched
  assert small[1] < 0.95                                      # block 1 perturbed
  tuned = result.metrics["vit_ft_parity"]["block_cka"]
  assert tuned[0] == pytest.approx(1.0, abs=1e-5) and tuned[1] < 0.95
  assert len(result.figures) == 2
  for fig in result.figures:
    assert os.path.exists(os.path.join(str(tmp_path), fig))
  with open(os.path.join(str(tmp_path), "results", "dataset_scale.json")) as f:
    assert json.load(f)["metrics"]["vit_frac1"]["train_examples"] == 80
  # Per-block errors over the 2 repeats, from the saved per-repeat grids.
  saved = np.load(os.path.join(str(tmp_path), "results",
                               "dataset_scale_data_fraction_25pct.npz"))["values"]
  diag = saved[:, np.arange(2), np.arange(2)]
  m = result.metrics["vit_frac0.25"]
  np.testing.assert_allclose(m["block_cka_stderr"], diag.std(0, ddof=1) / np.sqrt(2),
                             rtol=1e-9, atol=1e-12)
  assert m["block_cka_over"] == "over 2 repeats" and m["block_cka_stderr"][1] > 0
  assert m["num_test"] == result.metrics["vit_ft_parity"]["num_test"] == 80  # accuracy's images
