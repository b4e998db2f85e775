"""Helpers shared by the tests: random parameters without compiling `init`, contexts, analyses,
float64 references, subprocess workers."""
import os
import socket
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_analysis import main, models
from vit_analysis.analyses import base
from vit_analysis.input import data
from vit_analysis.runtime import sharding
from vit_analysis.similarity import cka, measures

# XLA:CPU optimisation level 0: the tests' small programs compile about twice as fast.
FAST = {"xla_backend_optimization_level": 0}


def random_variables(module, size=32, seed=0):
  """Parameters of the right shapes without compiling `init` (slow on a loaded 2-core machine):
  normal / sqrt(fan_in) kernels, unit scales, zero biases."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name or "gamma" in name:
      return np.ones(s.shape, s.dtype)
    if "bias" in name or "beta" in name:
      return np.zeros(s.shape, s.dtype)
    return (rng.normal(size=s.shape) / np.sqrt(max(np.prod(s.shape[:-1]), 1))).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def loaded(module, size, key="m", seed=0, name=None):
  """A LoadedModel of `module` with `random_variables`."""
  return base.LoadedModel(key, name or type(module).__name__, module,
                          random_variables(module, size, seed), size)


def random_source(n=64, size=16, seed=0, num_classes=1):
  """n random uint8 images [size, size, 3] with labels i % num_classes."""
  rng = np.random.default_rng(seed)
  return data.ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                          np.arange(n) % num_classes, num_classes)


def make_context(tmp_path, names, num_images=10, **kwargs):
  """A Context over randomly initialised registry models ({key: name}) and random images."""
  models_ = {}
  for i, (key, name) in enumerate(names.items()):
    models_[key] = loaded(models.create_model(name, 10), 32, key, seed=i, name=name)
  src = random_source(num_images, 32, num_classes=10)
  return base.Context(str(tmp_path), models_, {"test": src, "train": src}, sharding.make_mesh(),
                      **kwargs)


def run_analysis(name, config, ctx):
  """Runs analysis `name` of `config` as `main.run` does (merged sub-config, saved result)."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  ctx = base.Context.for_experiment(config, ctx.workdir, ctx.models, ctx.sources, ctx.mesh,
                                    ctx.train_fn)
  return main.run_analysis(config, ctx, name)


class TinyNet(nn.Module):
  """A user's own Flax module: no `out` dict, logits only (tests of `module=` model entries)."""
  classes: int = 10

  @nn.compact
  def __call__(self, images):
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(images))
    x = nn.relu(nn.Dense(16)(x.mean(axis=(1, 2))))
    return nn.Dense(self.classes, name="head")(x)


def ref_hsic_unbiased(k, l):
  """Unbiased HSIC_1 (Song et al. 2012, eq. 5) of [n, n] Grams, float64, zeroed diagonals."""
  n = len(k)
  k, l = np.array(k, np.float64), np.array(l, np.float64)
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def free_port() -> int:
  """A free TCP port on the loopback interface (a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(commands, *, env=None, timeout=240, what="workers"):
  """Runs the commands (argv lists) at once; fails the test naming `what` on a time-out or a
  non-zero exit, with the end of that process's log."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # each worker sets its own device count
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for c in commands]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{what} timed out")
  for p, log in zip(procs, logs):
    assert p.returncode == 0, f"{what}: {log[-3000:]}"
  return logs


def measure_grams(feats):
  """[A] features [m, ...] -> [A, m, m] centred float32 Grams (what the analyses' step computes)."""
  return jnp.stack([cka.gram_linear(jnp.asarray(f, jnp.float32)) for f in feats])


def run_measure(measure, feats_a, feats_b=None, perms=None, **options):
  """`measure` over minibatches: feats_* are [minibatch][layer] feature lists -> MeasureResult."""
  a = len(feats_a[0])
  b = None if feats_b is None else len(feats_b[0])
  state = measures.init(measure, a, b, num_perms=0 if perms is None else len(perms), **options)
  for i, fa in enumerate(feats_a):
    gb = None if feats_b is None else measure_grams(feats_b[i])
    state = measures.accumulate(state, measures.minibatch_terms(
        measure, measure_grams(fa), gb, perms=perms, **options))
  return measures.result(state)


def skip_unless_ci(reason: str) -> None:
  """Skips a test whose system dependency is missing here; fails instead under CI (`.ci/run` sets
  CI=true and installs Chromium and the Cloud Storage emulator), so CI never passes by skipping."""
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    pytest.fail(f"CI: {reason}")
  pytest.skip(reason)
