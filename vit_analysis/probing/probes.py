"""Linear probes on frozen features: pooling, few-shot closed-form ridge, full logistic regression.

Maths follow big_vision's `fewshot_lsr` evaluator (docs/method.md#linear-probes): features are z-scored with the
fitting set's mean and std (+1e-5), a constant bias feature of 100 is appended (so the bias is almost
unregularised), and ridge regression onto {-1, +1} one-vs-all targets is solved in closed form. One
eigendecomposition serves the whole regulariser grid:

  primal (n >= d):  W(l) = (XᵀX + l I)⁻¹ XᵀY = Q diag(1/(e + l)) Qᵀ XᵀY,   XᵀX = Q diag(e) Qᵀ
  dual   (d >  n):  W(l) = Xᵀ (XXᵀ + l I)⁻¹ Y = (XᵀQ) diag(1/(e + l)) QᵀY,  XXᵀ = Q diag(e) Qᵀ

so every W(l) is `lhs · diag(1/(e + l)) · rhs` with lhs/rhs computed once. Every function here works
on one layer; `jax.vmap` stacks layers of equal width (and seeds, and regularisers) into one call.

A fitted probe is `(mean [1, d], std [1, d], w [d, C], b [1, C])` with scores ((x - mean)/std) w + b,
whatever trained it, so prediction is shared (and can run inside the feature-extraction jit).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from vit_analysis.input import streaming
from vit_analysis.models import capture
from vit_analysis.runtime import jit_cache, sharding

BIAS_CONSTANT = 100.0  # big_vision: large, so the bias weight is effectively unregularised.
STD_EPS = 1e-5
HIGHEST = jax.lax.Precision.HIGHEST  # No TF32/bf16 passes in Grams: eigenvalues span ~10 decades.

_JITS = jit_cache.JitCache()


def _jit(fn, fast: bool, **kwargs):
  """`jax.jit(fn, **kwargs)`, with fast XLA:CPU compilation when asked; cached per (fn, fast)."""
  return _JITS.jit(fn, fast=fast, **kwargs)


# ------------------------------------------------------------------------------------------------
# Pooling: one layer's activation -> probe features.

# aggregated: [b, d]; per-token: [b, tokens, d] (one probe per position).
AGGREGATED = ("cls", "first", "mean", "mean_no_cls", "token", "gap", "s2d", "identity")
PER_TOKEN = ("tokens", "s2d_tokens")
METHODS = AGGREGATED + PER_TOKEN


@dataclasses.dataclass(frozen=True)
class Pooling:
  """How to turn one activation into probe features.

  Attributes:
    method: 'cls'/'first' (token 0 of [b, T, d]; 'cls' is for models with a CLS token), 'mean'
      (all tokens), 'mean_no_cls' (tokens 1:), 'token' (position `token`), 'tokens' (every
      position: one probe each); ResNet maps [b, h, w, c]: 'gap' (spatial mean), 's2d' (Appendix
      A: space-to-depth by `block`, average-pool to `grid`, then mean over positions), 's2d_tokens'
      (same, one probe per grid cell), 'token'/'tokens' (single / every spatial location);
      'identity' for [b, d] (e.g. pre_logits).
    token: position for 'token' (row-major over h, w for maps).
    block: space-to-depth block size s (1 = none).
    grid: (gh, gw) to average-pool maps to before 's2d'/'s2d_tokens'; None keeps the map's grid.
  """
  method: str
  token: int = 0
  block: int = 1
  grid: tuple[int, int] | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown pooling {self.method!r}; known: {METHODS}")

  @property
  def per_token(self) -> bool:
    return self.method in PER_TOKEN


def resnet_pooling(shape: tuple[int, ...], final_shape: tuple[int, ...],
                   per_token: bool = False) -> Pooling:
  """Appendix A pooling of a [b, h, w, c] map given the final stage's [b, gh, gw, c_final].

  Picks the largest power-of-two s with c·s² <= c_final such that s divides h and w and the
  space-to-depth map (h/s, w/s) is a multiple of the final grid, then average-pools to that grid.
  """
  (_, h, w, c), (_, gh, gw, c_final) = shape, final_shape
  if h % gh or w % gw:
    raise ValueError(f"map {shape} cannot be average-pooled to the final grid {final_shape}")
  s = 1
  while (c * (2 * s) ** 2 <= c_final and (h // gh) % (2 * s) == 0 and (w // gw) % (2 * s) == 0):
    s *= 2
  return Pooling("s2d_tokens" if per_token else "s2d", block=s, grid=(gh, gw))


def _space_to_depth(x: jax.Array, s: int) -> jax.Array:
  """[b, h, w, c] -> [b, h/s, w/s, s·s·c]: each s×s patch becomes channels."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // s, w // s, s * s * c)


def _avg_pool_to(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  b, h, w, c = x.shape
  gh, gw = grid
  return x.reshape(b, gh, h // gh, gw, w // gw, c).mean(axis=(2, 4))


def pool(x: jax.Array, pooling: Pooling) -> jax.Array:
  """Pools an activation (jit-friendly; shapes are static).

  Args:
    x: [b, T, d] tokens, [b, h, w, c] map, or [b, d] vector.
    pooling: see `Pooling`.

  Returns:
    [b, d'] for aggregated methods, [b, positions, d'] for per-token methods.
  """
  m = pooling.method
  if x.ndim == 2:
    if m != "identity":
      raise ValueError(f"pooling {m!r} needs tokens or a map, got a vector of shape {x.shape}")
    return x
  if m == "identity":
    raise ValueError(f"'identity' pooling needs [b, d], got shape {x.shape}")
  if x.ndim == 4:
    if m in ("s2d", "s2d_tokens"):
      x = _space_to_depth(x, pooling.block) if pooling.block > 1 else x
      x = _avg_pool_to(x, pooling.grid) if pooling.grid is not None else x
      m = "mean" if m == "s2d" else "tokens"
    elif m == "gap":
      m = "mean"
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # row-major positions, like ViT tokens.
  if x.ndim != 3:
    raise ValueError(f"cannot pool an activation of shape {x.shape}")
  if m in ("cls", "first"):
    return x[:, 0]
  if m == "mean":
    return x.mean(axis=1)
  if m == "mean_no_cls":
    return x[:, 1:].mean(axis=1)
  if m == "token":
    if not 0 <= pooling.token < x.shape[1]:
      raise ValueError(f"token {pooling.token} out of range for {x.shape[1]} positions")
    return x[:, pooling.token]
  if m == "tokens":
    return x
  raise ValueError(f"pooling {m!r} does not apply to an activation of shape {x.shape}")


# ------------------------------------------------------------------------------------------------
# Closed-form ridge (big_vision fewshot_lsr), one layer; vmap for many.


class Probe(NamedTuple):
  """A linear probe: scores = ((x - mean) / std) @ w + b.  mean, std: [1, d]; w: [d, C]; b: [1, C]."""
  mean: jax.Array
  std: jax.Array
  w: jax.Array
  b: jax.Array


class RidgeCache(NamedTuple):
  """Everything `ridge_weights` needs for any l: W(l) = lhs · diag(1/(eigs + l)) · rhs."""
  mean: jax.Array  # [1, d]
  std: jax.Array   # [1, d]
  eigs: jax.Array  # [r]
  lhs: jax.Array   # [d + 1, r]
  rhs: jax.Array   # [r, C]


def standardize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Train-set statistics of x: [n, d] -> (mean [1, d], std + 1e-5 [1, d]) (population std)."""
  return x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + STD_EPS


def augment(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """z-scores x: [n, d] and appends the bias feature: -> [n, d + 1]."""
  z = (x - mean) / std
  return jnp.concatenate([z, jnp.full((z.shape[0], 1), BIAS_CONSTANT, z.dtype)], axis=1)


def pm1_targets(labels: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """labels: [n] ints -> [n, C] one-vs-all targets in {-1, +1}."""
  return 2.0 * jax.nn.one_hot(labels, num_classes, dtype=dtype) - 1.0


def ridge_cache(x: jax.Array, labels: jax.Array, num_classes: int) -> RidgeCache:
  """Eigendecomposition shared by every regulariser. x: [n, d], labels: [n]."""
  mean, std = standardize(x)
  xa = augment(x, mean, std)
  y = pm1_targets(labels, num_classes, xa.dtype)
  n, d1 = xa.shape
  if n >= d1:  # primal: (d+1) x (d+1) system.
    eigs, q = jnp.linalg.eigh(jnp.matmul(xa.T, xa, precision=HIGHEST))
    lhs, rhs = q, jnp.matmul(q.T, jnp.matmul(xa.T, y, precision=HIGHEST), precision=HIGHEST)
  else:  # dual: n x n system (few-shot with wide features).
    eigs, q = jnp.linalg.eigh(jnp.matmul(xa, xa.T, precision=HIGHEST))
    lhs, rhs = jnp.matmul(xa.T, q, precision=HIGHEST), jnp.matmul(q.T, y, precision=HIGHEST)
  return RidgeCache(mean, std, eigs, lhs, rhs)


def ridge_weights(cache: RidgeCache, l2: jax.Array) -> jax.Array:
  """W(l2): [d + 1, C] in the augmented feature space (last row multiplies the bias feature)."""
  scale = 1.0 / (cache.eigs + l2)
  return jnp.matmul(cache.lhs * scale[None, :], cache.rhs, precision=HIGHEST)


def ridge_probe(cache: RidgeCache, l2: jax.Array) -> Probe:
  w = ridge_weights(cache, l2)
  return Probe(cache.mean, cache.std, w[:-1], BIAS_CONSTANT * w[-1:])


def scores(probe: Probe, x: jax.Array) -> jax.Array:
  """x: [n, d] -> class scores [n, C]."""
  return jnp.matmul((x - probe.mean) / probe.std, probe.w, precision=HIGHEST) + probe.b


def accuracy(probe: Probe, x: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(scores(probe, x), axis=-1) == labels)


def _select(val_acc: jax.Array) -> jax.Array:
  """Index of the best regulariser; ties go to the strongest one (grids are ascending)."""
  return val_acc.shape[0] - 1 - jnp.argmax(val_acc[::-1])


def ridge_select(x_fit: jax.Array, y_fit: jax.Array, x_val: jax.Array, y_val: jax.Array,
                 l2_grid: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array, Probe]:
  """Fits the ridge probe for every l2 in the grid, keeps the best on held-out data.

  Args:
    x_fit: [n, d], y_fit: [n]; x_val: [m, d], y_val: [m]; l2_grid: [K] ascending.

  Returns:
    (val_acc [K], best index [], probe at the best l2).
  """
  cache = ridge_cache(x_fit, y_fit, num_classes)
  # Validation scores for all l2 through the eigenbasis: x_val W(l) = (x_val lhs) diag(.) rhs.
  proj = jnp.matmul(augment(x_val, cache.mean, cache.std), cache.lhs, precision=HIGHEST)

  def val_acc(l2):
    s = jnp.matmul(proj / (cache.eigs + l2)[None, :], cache.rhs, precision=HIGHEST)
    return jnp.mean(jnp.argmax(s, axis=-1) == y_val)

  acc = jax.lax.map(val_acc, l2_grid)  # sequential over l2: memory of one [m, C] block.
  best = _select(acc)
  return acc, best, ridge_probe(cache, l2_grid[best])


# ------------------------------------------------------------------------------------------------
# Multinomial logistic regression with full-batch L-BFGS (optax), one layer; vmap for many.
#
# Why L-BFGS, full batch: the features are cached and small next to the model, the objective
# (cross-entropy + L2 on z-scored features) is smooth and strongly convex, so a quasi-Newton method
# reaches the optimum in a few hundred deterministic steps with no learning rate or schedule to tune
# per layer and per weight decay, and its optimum is the same problem scikit-learn's lbfgs solver
# solves. Minibatch Adam would add a learning-rate/epoch search whose noise confounds the
# weight-decay selection; it only wins when the features do not fit in memory.


def logistic_fit(x: jax.Array, labels: jax.Array, weight_decay: jax.Array, num_classes: int,
                 num_steps: int = 300, tol: float = 1e-6) -> Probe:
  """Minimises mean CE + (wd/2)·‖w‖² (bias unregularised) on z-scored x: [n, d], labels: [n].

  Equals scikit-learn's `LogisticRegression(C=1/(wd·n))` on the same z-scored features.
  """
  mean, std = standardize(x)
  z = (x - mean) / std

  def loss(params):
    logits = jnp.matmul(z, params["w"], precision=HIGHEST) + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + 0.5 * weight_decay * jnp.sum(jnp.square(params["w"]))

  # Backtracking (Armijo) line search: L-BFGS's unit step is almost always accepted on this
  # problem, and it compiles ~2x faster than the default zoom search (which matters under vmap).
  opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
      max_backtracking_steps=20, store_grad=True))
  value_and_grad = optax.value_and_grad_from_state(loss)
  params = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
            "b": jnp.zeros((1, num_classes), x.dtype)}

  def step(carry, _):
    params, state, done = carry
    value, grad = value_and_grad(params, state=state)
    updates, new_state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    new_params = optax.apply_updates(params, updates)
    # Freeze once converged: L-BFGS curvature pairs degenerate (s·y -> 0) at the optimum.
    done = done | (optax.tree.norm(grad) < tol)  # FREEZE
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(done, o, n), old, new)
    return (keep(params, new_params), keep(state, new_state), done), None

  (params, _, _), _ = jax.lax.scan(step, (params, opt.init(params), jnp.asarray(False)), None,
                                   length=num_steps)
  return Probe(mean, std, params["w"], params["b"])


def logistic_select(x_fit, y_fit, x_val, y_val, wd_grid: jax.Array, num_classes: int,
                    num_steps: int = 300) -> tuple[jax.Array, jax.Array, Probe]:
  """Fits one logistic probe per weight decay (vmapped), keeps the best on held-out data.

  Returns (val_acc [K], best index [], probe at the best weight decay).
  """
  probes = jax.vmap(lambda wd: logistic_fit(x_fit, y_fit, wd, num_classes, num_steps))(wd_grid)
  acc = jax.vmap(lambda p: accuracy(p, x_val, y_val))(probes)
  best = _select(acc)
  return acc, best, jax.tree.map(lambda a: a[best], probes)


# ------------------------------------------------------------------------------------------------
# All layers of equal width, all seeds, all regularisers: one compiled call per width group.


def check_features(feats: np.ndarray | jax.Array, labels: np.ndarray | jax.Array,
                   num_classes: int, what: str = "features") -> None:
  """Raises ValueError on NaN/Inf features, labels outside [0, C), or mismatched shapes.

  Args:
    feats: [..., n, d]; labels: [n].
  """
  feats, labels = np.asarray(feats), np.asarray(labels)
  if feats.ndim < 2 or labels.ndim != 1 or feats.shape[-2] != labels.shape[0]:
    raise ValueError(f"{what}: shape mismatch, need [..., n, d] features and [n] labels, got {feats.shape} and "
                     f"{labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{what}: labels must be integers, got dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  bad = ~np.isfinite(feats)
  if bad.any():
    where = np.argwhere(bad)[0]
    raise ValueError(f"{what}: {int(bad.sum())} non-finite values (NaN/Inf) in features of shape "
                     f"{feats.shape}, first at index {tuple(int(i) for i in where)}")


def fewshot_split(labels: np.ndarray, num_classes: int, shots: int, holdout: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Samples `shots` fitting and `holdout` validation examples per class, without overlap.

  Args:
    labels: [n] labels of the candidate pool (a subset of the training split).

  Returns:
    (fit_idx [C·shots], val_idx [C·holdout]) into `labels`, grouped by class.

  Raises:
    ValueError: if a class has fewer than shots + holdout examples.
  """
  labels = np.asarray(labels)
  if shots < 1 or holdout < 0:
    raise ValueError(f"need shots >= 1 and holdout >= 0, got {shots}, {holdout}")
  rng = np.random.default_rng(seed)
  fit, val = [], []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if idx.size < shots + holdout:
      raise ValueError(f"class {c} has {idx.size} examples, fewer than shots + holdout = "
                       f"{shots} + {holdout}")
    idx = rng.permutation(idx)
    fit.append(idx[:shots])
    val.append(idx[shots:shots + holdout])
  return np.concatenate(fit), np.concatenate(val)


def fewshot_all(feats: jax.Array, labels: jax.Array, fit_idx: jax.Array, val_idx: jax.Array,
                l2_grid: jax.Array, num_classes: int, fast: bool = False
                ) -> tuple[jax.Array, jax.Array, Probe]:
  """Ridge probes for every (seed, layer, l2) of one width group in one call.

  Args:
    feats: [G, n, d] pooled features of G layers (or token positions) on the candidate pool.
    labels: [n]; fit_idx: [S, n_fit], val_idx: [S, n_val] per seed (from `fewshot_split`).
    l2_grid: [K] ascending.

    fast: compile with XLA:CPU optimisation level 0 (smoke runs, tests).

  Returns:
    val_acc [S, G, K], best l2 index [S, G], probes with leading axes [S, G].
  """
  return _jit(_fewshot_all, fast, static_argnames=("num_classes",))(
      feats, labels, fit_idx, val_idx, l2_grid, num_classes=num_classes)


def _fewshot_all(feats, labels, fit_idx, val_idx, l2_grid, num_classes):
  def one(x, fi, vi):
    return ridge_select(x[fi], labels[fi], x[vi], labels[vi], l2_grid, num_classes)
  per_layer = jax.vmap(one, in_axes=(0, None, None))
  return jax.vmap(per_layer, in_axes=(None, 0, 0))(feats, fit_idx, val_idx)


def logistic_all(feats: jax.Array, labels: jax.Array, val_feats: jax.Array, val_labels: jax.Array,
                 wd_grid: jax.Array, num_classes: int, num_steps: int = 300, fast: bool = False
                 ) -> tuple[jax.Array, jax.Array, Probe]:
  """Logistic probes for every (layer, weight decay) of one width group in one call.

  Args:
    feats: [G, n, d], labels [n] (fitting set); val_feats: [G, m, d], val_labels: [m].

  Returns:
    val_acc [G, K], best index [G], probes with leading axis [G].
  """
  return _jit(_logistic_all, fast, static_argnames=("num_classes", "num_steps"))(
      feats, labels, val_feats, val_labels, wd_grid, num_classes=num_classes, num_steps=num_steps)


def _logistic_all(feats, labels, val_feats, val_labels, wd_grid, num_classes, num_steps):
  return jax.vmap(lambda x, xv: logistic_select(x, labels, xv, val_labels, wd_grid, num_classes,
                                                num_steps))(feats, val_feats)


def predict_all(probes: Probe, feats: jax.Array, fast: bool = False) -> jax.Array:
  """Predicted classes of stacked probes.

  Args:
    probes: leading axes [S, G] (or [G]): mean/std [.., 1, d], w [.., d, C], b [.., 1, C].
    feats: [G, n, d].

  Returns:
    [S, G, n] (or [G, n]) argmax class per example.
  """
  return _jit(_predict_all, fast)(probes, feats)


def _predict_all(probes: Probe, feats: jax.Array) -> jax.Array:
  squeeze = probes.w.ndim == 3
  if squeeze:
    probes = jax.tree.map(lambda a: a[None], probes)
  z = (feats[None] - probes.mean) / probes.std  # [S, G, n, d]
  s = jnp.einsum("sgnd,sgdc->sgnc", z, probes.w, precision=HIGHEST) + probes.b
  preds = jnp.argmax(s, axis=-1)
  return preds[0] if squeeze else preds


# ------------------------------------------------------------------------------------------------
# Features of every selected layer in one streamed pass (capture + pooling inside one jit).


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One probe input: a captured layer and how it is pooled. `key` names it in results."""
  layer: str
  pooling: Pooling

  @property
  def key(self) -> str:
    p = self.pooling
    suffix = f"{p.method}{p.token}" if p.method == "token" else p.method
    return f"{self.layer}:{suffix}"


Unit = tuple[str, int | None]  # (spec key, token position or None): one probe per unit.


def make_feature_fn(module: Any, specs: list[FeatureSpec]):
  """(variables, images [b, h, w, 3]) -> {spec.key: [b, d] or [b, positions, d]}, pure (for jit)."""
  layers = sorted({s.layer for s in specs})
  cap = capture.make_capture_fn(module, layers)

  def fn(variables, images):
    out = cap(variables, images)
    return {s.key: pool(out[s.layer], s.pooling) for s in specs}

  return fn


_STEPS = jit_cache.JitCache()


def _feature_step(module: Any, specs: list[FeatureSpec], fast: bool = False):
  """Jitted (variables, images, _) -> features, cached so train and test passes compile once."""
  fn = make_feature_fn(module, specs)
  return _STEPS.jit(lambda v, x, _: fn(v, x), key=(module, tuple(specs)), fast=fast)


def feature_shapes(module: Any, variables: Any, specs: list[FeatureSpec],
                   image_size: int) -> dict[str, tuple]:
  """Per-example pooled shapes {key: (d,) or (positions, d)} from an abstract pass (no FLOPs)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(make_feature_fn(module, specs), variables, images)
  return {k: tuple(v.shape[1:]) for k, v in out.items()}


def group_units(shapes: dict[str, tuple]) -> dict[int, list[Unit]]:
  """Units (one per aggregated feature, one per position of per-token features) by width."""
  groups: dict[int, list[Unit]] = {}
  for key, shape in shapes.items():
    units = [(key, None)] if len(shape) == 1 else [(key, t) for t in range(shape[0])]
    groups.setdefault(shape[-1], []).extend(units)
  return groups


def stack_units(feats: dict[str, Any], units: list[Unit]):
  """{key: [n, d] | [n, positions, d]} -> [G, n, d] for the units of one width group."""
  xp = jnp if any(isinstance(v, jax.Array) for v in feats.values()) else np
  return xp.stack([feats[k] if t is None else feats[k][:, t] for k, t in units])


def stream(module: Any, variables: Any, source: Any, indices: np.ndarray, step_fn, *,
           image_size: int, batch_size: int, mesh: jax.sharding.Mesh, extra: Any = None,
           desc: str = "features", normalization: Any = "minus_one_one", start_step: int = 0):
  """Runs the jitted `step_fn(variables, images, extra)` over `source[indices]`, batch by batch.

  The images come from `streaming.Stream` (one fixed global batch size, the last batch padded;
  decoded in worker threads ahead of the device, sharded over the mesh's data axis); each output
  leaf (leading axis = batch) comes back to the host trimmed to the real examples. Yields (numpy
  outputs, labels [m]) per batch, from batch `start_step` on (a resumed extraction).
  """
  del module  # the step function holds it
  if batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {batch_size} must be divisible by {mesh.devices.size} devices")
  variables = sharding.replicate(variables, mesh)
  extra = sharding.replicate(extra, mesh) if extra is not None else None
  batches = streaming.Stream(source, np.asarray(indices, np.int64),
                             views={"image": (image_size, normalization)}, mesh=mesh,
                             step_size=batch_size, desc=desc, with_labels=True,
                             start_step=start_step)
  for batch in batches:
    out = step_fn(variables, batch.images["image"], extra)
    labels = batch.labels
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
      labels = multihost_utils.process_allgather(labels, tiled=True)
    real = batch.num_real
    yield (jax.tree.map(lambda a, r=real: np.asarray(a)[:r], out),
           np.asarray(labels)[:real].astype(np.int64))


def extract(module, variables, source, indices, specs: list[FeatureSpec], *, image_size: int,
            batch_size: int, mesh, dtype=np.float32, fast: bool = False,
            normalization: Any = "minus_one_one",
            resume: Any = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pooled features of every spec for `source[indices]`, in one pass.

  Host memory is bounded by the planned size, n · Σ_spec prod(shape) · itemsize (preallocated).
  With `resume` (a `resume.Checkpointer`), the features extracted so far and the next batch are
  saved every `resume.every_s` seconds, and a rerun continues from the next batch.

  Returns:
    ({key: [n, d] or [n, positions, d]}, labels [n]).
  """
  shapes = feature_shapes(module, variables, specs, image_size)
  n = len(indices)
  feats = {k: np.zeros((n,) + s, dtype) for k, s in shapes.items()}
  labels = np.zeros(n, np.int64)
  step = 0
  if resume is not None:
    restored = resume.restore(like={"feats": feats, "labels": labels})
    if restored is not None:
      saved, step, _ = restored
      feats, labels = dict(saved["feats"]), np.asarray(saved["labels"])
  start = min(step * batch_size, n)
  for out, lab in stream(module, variables, source, indices, _feature_step(module, specs, fast),
                         image_size=image_size, batch_size=batch_size, mesh=mesh,
                         normalization=normalization, start_step=step):
    for k, v in out.items():
      feats[k][start:start + len(lab)] = v
    labels[start:start + len(lab)] = lab
    start += len(lab)
    step += 1
    if resume is not None:
      resume.maybe_save({"feats": feats, "labels": labels}, step)
  return feats, labels


def evaluate(module, variables, source, indices, specs: list[FeatureSpec],
             groups: dict[int, list[Unit]], probes: dict[int, Probe], *, image_size: int,
             batch_size: int, mesh, fast: bool = False,
             normalization: Any = "minus_one_one") -> dict[int, np.ndarray]:
  """Test accuracy of stacked probes without storing test features (bounded memory).

  Args:
    groups: width -> units; probes: width -> Probe with leading axes [S, G] (G = len(units)).

  Returns:
    width -> accuracy [S, G].
  """
  fn = make_feature_fn(module, specs)

  def step(v, x, probes):
    feats = fn(v, x)
    return {str(d): jnp.moveaxis(_predict_all(probes[str(d)], stack_units(feats, units)), -1, 0)
            for d, units in groups.items()}  # [b, S, G]: batch first so padding is trimmed.

  probes = {str(d): p for d, p in probes.items()}
  correct = {d: 0 for d in groups}
  n = 0
  # `step` is made from (module, specs, groups) alone: one compile per seed loop, not per call.
  key = (module, tuple(specs), tuple((d, tuple(u)) for d, u in groups.items()))
  step_fn = _STEPS.jit(step, key=key, fast=fast)
  for out, labels in stream(module, variables, source, indices, step_fn,
                            image_size=image_size, batch_size=batch_size, mesh=mesh,
                            extra=probes, desc="test", normalization=normalization):
    for d in groups:
      correct[d] = correct[d] + (out[str(d)] == labels[:, None, None]).sum(0)
    n += len(labels)
  return {d: c / n for d, c in correct.items()}
