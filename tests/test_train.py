"""Training loop: maths of the pieces, kill-and-resume equality, restore of a finished run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis import config_lib
from vit_analysis.input import data
from vit_analysis.models import create_model, train
from vit_analysis.runtime import sharding


def test_effective_config_merges_and_rejects_unknown_keys():
  cfg = train.effective_config(config_lib.train_defaults(), {"learning_rate": 0.5})
  assert cfg.learning_rate == 0.5 and cfg.batch_size == 128
  with pytest.raises(KeyError, match="learning_rat"):
    train.effective_config(None, {"learning_rat": 0.1})
  with pytest.raises(ValueError, match="adam"):
    train.effective_config(None, {"optimizer": "adam"})
  assert train.total_steps(cfg, 1000) == round(10 * 1000 / 128)


def test_schedule_warmup_cosine_and_sgd_weight_decay():
  cfg = train.effective_config(None, {"learning_rate": 2.0, "warmup_steps": 4, "optimizer": "sgd",
                                          "momentum": 0.0, "weight_decay": 0.1, "grad_clip_norm": 0})
  tx, schedule = train.make_optimizer(cfg, 20)
  for s in (0, 2, 4, 10, 19, 20):
    ref = 2.0 * s / 4 if s < 4 else 2.0 * 0.5 * (1 + np.cos(np.pi * (s - 4) / 16))
    np.testing.assert_allclose(float(schedule(s)), ref, rtol=1e-6, atol=1e-7)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  grads = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}
  state = tx.init(params)
  for _ in range(3):  # advance to step 3, lr = 1.5
    _, state = tx.update(grads, state, params)
  updates, _ = tx.update(grads, state, params)
  # SGD: -lr * (g + wd * p) for kernels, -lr * g for biases (decay mask: ndim > 1).
  np.testing.assert_allclose(updates["kernel"], -1.5 * (3.0 + 0.1), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], -1.5 * 3.0, rtol=1e-6)


def test_label_smoothing_loss_and_random_shift():
  logits = jnp.asarray([[2.0, 0.5, -1.0], [0.0, 0.1, 0.3]])
  labels = jnp.asarray([0, 2])
  lg = np.asarray(logits, np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  target = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[[0, 2]]
  np.testing.assert_allclose(train._loss(logits, labels, 3, 0.1), -(target * logp).sum(-1).mean(),
                             rtol=1e-6)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 6, 6, 1)), jnp.float32)
  shifted = np.asarray(train.random_shift(images, jax.random.key(0), 2))
  for x, y in zip(np.asarray(images), shifted):
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)), constant_values=-1)
    assert any(np.array_equal(padded[i:i + 6, j:j + 6], y) for i in range(5) for j in range(5))


def _small_sources():
  full = data.digits_source("train")
  test = data.digits_source("test")
  train_src = data.ArraySource(full.images[:96], full.labels[:96], 10)
  test_src = data.ArraySource(test.images[:40], test.labels[:40], 10)
  return train_src, test_src


def test_kill_and_resume_ends_at_same_params(tmp_path):
  train_src, test_src = _small_sources()
  # Dropout exercises the per-step rng; skip removal trains through the same loop.
  module = create_model("ViT-smoke_8", 10, dropout_rate=0.1, skip_removed=(0,))
  cfg = train.effective_config(config_lib.train_defaults(smoke=True), {
      "num_steps": 8, "checkpoint_every_steps": 3, "augment_shift": 1, "eval_batch_size": 40})
  mesh = sharding.make_mesh()
  kwargs = {"train_source": train_src, "test_source": test_src, "image_size": 32, "mesh": mesh, "seed": 3}
  # 96 examples / batch 32: 3 steps per epoch, so the run crosses two epoch boundaries.
  full = train.train(module, cfg, workdir=str(tmp_path / "a"), **kwargs)
  assert full.finished and full.step == 8 and 0 <= full.test_accuracy <= 1
  killed = train.train(module, cfg, workdir=str(tmp_path / "b"), interrupt_at_step=7, **kwargs)
  assert not killed.finished and killed.step == 7
  resumed = train.train(module, cfg, workdir=str(tmp_path / "b"), **kwargs)  # from step 6
  assert resumed.finished and resumed.step == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
               jax.device_get(resumed.params))
  assert resumed.test_accuracy == full.test_accuracy
  # Evaluations at epoch ends (steps 3, 6) and the end; resumed log has each step once.
  with open(tmp_path / "b" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  evals = [l["step"] for l in lines if "test_accuracy" in l]
  assert evals == [3, 6, 8]
  # A finished workdir only restores.
  again = train.train(module, cfg, workdir=str(tmp_path / "a"), **kwargs)
  assert again.finished and again.test_accuracy == full.test_accuracy
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
               jax.device_get(again.params))
  # The reported accuracy is an independent argmax count on the test images.
  x = data.preprocess(test_src.images, 32)
  logits, out = module.apply({"params": full.params}, x, train=False)
  np.testing.assert_array_equal(out["block00/+sa"], out["block00/sa"])  # no skip in block 0
  assert not np.array_equal(out["block01/+sa"], out["block01/sa"])
  np.testing.assert_allclose(full.test_accuracy,
                             np.mean(np.argmax(np.asarray(logits), -1) == test_src.labels))
