"""Data-parallel training and fine-tuning with optax, resumable through orbax.

One loop trains every model of the package (ViT, ResNet, Mixer, skip-removed ViTs) and
fine-tunes official checkpoints. The train state (step, params, optimizer state) and the input
iterator's position are saved together by an orbax CheckpointManager, and the per-step
randomness is `fold_in(key, step)`, so a run that is killed and restarted with the same workdir
continues from its last checkpoint and ends at the same parameters as an uninterrupted run.
Training that diverges stops at the first non-finite loss, gradient or parameter (a `UserError`
naming the step and the likely cause), before anything of that step is logged or saved, and a
restored train state is checked to fit the module and to be finite before it is reused.
Metrics go to the absl log and to `workdir/metrics.jsonl` (clu's writers import TensorFlow).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from vit_analysis import config_lib
from vit_analysis.input import data as data_lib
from vit_analysis.input import streaming
from vit_analysis.models import describe
from vit_analysis.runtime import compilation, errors, sharding
from vit_analysis.runtime import workdir as workdir_lib


@dataclasses.dataclass
class TrainOutcome:
  """What `train` returns.

  Attributes:
    params: the final (or, when interrupted, current) parameters, replicated on the mesh.
    step: steps done. finished: step == total steps.
    test_accuracy: top-1 on the test source at the end (None if interrupted).
    seconds: wall time of this call.
  """
  params: Any
  step: int
  total_steps: int
  finished: bool
  test_accuracy: float | None
  seconds: float


def effective_config(defaults: ml_collections.ConfigDict | None,
                     overrides: Any = None) -> ml_collections.ConfigDict:
  """`config_lib.train_defaults()` updated by `defaults` then `overrides`; unknown keys → KeyError."""
  merged = config_lib.train_defaults().to_dict()
  for layer, label in ((defaults, "config.train"), (overrides, "model train")):
    layer = {} if layer is None else dict(layer)
    unknown = sorted(set(layer) - set(merged))
    if unknown:
      raise KeyError(f"unknown train keys {unknown} in {label}; known: {sorted(merged)}")
    merged.update(layer)
  if merged["optimizer"] not in ("adamw", "sgd"):
    raise ValueError(f"unknown optimizer {merged['optimizer']!r}; use 'adamw' or 'sgd'")
  return ml_collections.ConfigDict(merged)


def total_steps(cfg: ml_collections.ConfigDict, num_train: int) -> int:
  """num_steps, or num_epochs passes over `num_train` examples."""
  if cfg.num_steps:
    return int(cfg.num_steps)
  return max(1, round(cfg.num_epochs * num_train / cfg.batch_size))


def make_optimizer(cfg: ml_collections.ConfigDict, steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip → AdamW or SGD-momentum (+ decoupled weight decay on kernels only), warmup + cosine.

  Returns:
    (the optimiser, its learning-rate schedule, for logging).
  """
  warmup = min(int(cfg.warmup_steps), max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(steps, warmup + 1), end_value=0.0)
  # Decay only matrices/kernels, not biases, norm scales, position embeddings' 1-D parts.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=cfg.momentum, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  else:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                      optax.sgd(schedule, momentum=cfg.momentum))
  clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
  return optax.chain(*clip, opt), schedule


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by up to ±max_shift pixels, filling with -1 (black).

  images: [b, h, w, c] in [-1, 1].
  """
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   constant_values=-1.0)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _loss(logits, labels, num_classes, label_smoothing):
  onehot = jax.nn.one_hot(labels, num_classes)
  targets = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits, targets).mean()


def _key(seed: int, stream: int) -> jax.Array:
  # RBG keys (XLA's RngBitGenerator) compile several times faster than threefry on XLA:CPU,
  # which dominates the start-up of small models; they are deterministic on a given backend.
  return jax.random.fold_in(jax.random.key(seed, impl="rbg"), stream)


@functools.lru_cache(maxsize=16)
def _cached_train_step(module, cfg_json, num_classes, steps, seed, mesh):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  tx, _ = make_optimizer(cfg, steps)
  return make_train_step(module, tx, cfg, num_classes, _key(seed, 1), mesh)


def make_train_step(module: nn.Module, tx: optax.GradientTransformation,
                    cfg: ml_collections.ConfigDict, num_classes: int, key: jax.Array,
                    mesh: jax.sharding.Mesh):
  """Jitted `(state, batch) -> (state, metrics)`; state = {'step', 'params', 'opt_state'}.

  The randomness of step s (augmentation, dropout) is `fold_in(key, s)`, so a resumed run
  draws exactly what an uninterrupted one would.
  """

  def step_fn(state, batch):
    step_key = jax.random.fold_in(key, state["step"])
    aug_key, dropout_key = jax.random.split(step_key)
    images = batch["image"]
    if cfg.augment_shift:
      images = random_shift(images, jax.random.fold_in(aug_key, 0), int(cfg.augment_shift))
    if cfg.augment_flip:  # left-right, each image with probability 1/2
      flip = jax.random.bernoulli(jax.random.fold_in(aug_key, 1), 0.5, (images.shape[0],))
      images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)

    def loss_fn(params):
      logits, _ = module.apply({"params": params}, images, train=True,
                               rngs={"dropout": dropout_key})
      return _loss(logits, batch["label"], num_classes, cfg.label_smoothing), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    # One fused reduction: the new parameters too, so that nothing non-finite is ever saved.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(
        jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  rep = sharding.replicated(mesh)
  return jax.jit(step_fn, out_shardings=(rep, rep), donate_argnums=0,
                 compiler_options=compilation.compiler_options(cfg.fast_compile))


@functools.lru_cache(maxsize=16)
def _eval_counts(module, fast_compile=False):

  def counts(params, batch):
    logits, _ = module.apply({"params": params}, batch["image"], train=False)
    hit = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
    return hit.sum(), batch["mask"].sum()

  return jax.jit(counts, compiler_options=compilation.compiler_options(fast_compile))


def evaluate(module: nn.Module, params: Any, src, *, image_size: int, batch_size: int,
             mesh: jax.sharding.Mesh, fast_compile: bool = False) -> float:
  """Top-1 accuracy of `module` on every example of `src` (last batch padded and masked).

  Images are normalised the model's way (`models.describe(...).normalization`).
  """
  counts = _eval_counts(module, fast_compile)
  correct = seen = 0
  view = (image_size, describe(module, image_size).normalization)
  batches = streaming.Stream(src, streaming.split(len(src)), views={"image": view}, mesh=mesh,
                             step_size=streaming.round_step(batch_size, mesh),
                             with_labels=True, desc="evaluate")
  for batch in batches:
    c, n = counts(params, {"image": batch.images["image"], "label": batch.labels,
                           "mask": batch.mask > 0})
    correct, seen = correct + int(c), seen + int(n)
  if seen != len(src):
    raise RuntimeError(f"evaluated {seen} examples of {len(src)}")
  return correct / seen


def init_params(module: nn.Module, image_size: int, seed: int) -> Any:
  """Fresh parameters, deterministic in `seed`."""
  return _cached_init(module, image_size)(_key(seed, 0))


@functools.lru_cache(maxsize=16)
def _cached_init(module, image_size):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda k: module.init({"params": k}, images, train=False)["params"],
                 compiler_options=compilation.compiler_options(True))


class _MetricsLog:
  """Appends JSON lines to `path` (process 0 only); on resume drops lines past the restored step."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.enabled = sharding.is_main_process()
    self.lines: list[str] = []
    if self.enabled and workdir_lib.exists(path):
      self.lines = [l + "\n" for l in workdir_lib.read_text(path).splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      workdir_lib.write_text(path, "".join(self.lines))

  def write(self, record: dict[str, Any]) -> None:
    # The whole (small) file is rewritten: an object store has no append, and a reader never
    # sees a half line.
    if self.enabled:
      self.lines.append(json.dumps(record) + "\n")
      workdir_lib.write_text(self.path, "".join(self.lines))


class _FiniteWatch:
  """Stops training at the first step whose loss, gradient or new parameters are not finite.

  A step's flag is read one step late (`check` after the next step is dispatched), so that the
  host does not wait for the device every step; `check` is also called before anything of the
  current step is logged, evaluated or saved, so a non-finite state is never written.
  """

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
               workdir: str):
    self.name, self.cfg, self.schedule, self.workdir = name, cfg, schedule, workdir
    self.pending: tuple[int, dict[str, Any]] | None = None
    self.last_finite: tuple[int, float] | None = None

  def check(self) -> None:
    """Raises `errors.UserError` when the pending step was not finite."""
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if bool(metrics["finite"]):
      self.last_finite = (step, loss)
      return
    what = ("loss" if not math.isfinite(loss) else
            "gradient norm" if not math.isfinite(grad_norm) else "updated parameters")
    last = (f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
            if self.last_finite else "no finite step before it in this run")
    if step == 1:
      cause = ("already at the first step, so the inputs or the initial parameters hold NaN/Inf "
               "(or the model overflows in float32)")
    else:
      cause = (f"the learning rate is most likely too high (peak {self.cfg.learning_rate:g}, "
               f"{float(self.schedule(step - 1)):.3g} at this step): lower train.learning_rate "
               "or raise warmup_steps")
    raise errors.UserError(
        f"training of model {self.name!r} diverged at step {step}: the {what} became non-finite "
        f"({last}); {cause}; nothing of the diverged steps was saved in {self.workdir}.")


def _check_restored(state: Any, path: str) -> None:
  """Refuses a restored train state with non-finite parameters (a poisoned model cache entry)."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
  bad = [jax.tree_util.keystr(k) for k, v in flat if not np.isfinite(np.asarray(v)).all()]
  if bad:
    raise errors.UserError(
        f"the saved model in {path} holds non-finite parameters ({len(bad)} of {len(flat)} "
        f"arrays, e.g. {bad[0]}), so it is not reused: delete the folder {path} and rerun to "
        "train the model again.")


def _format_seconds(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(module: nn.Module, train_config: ml_collections.ConfigDict, *, train_source,
          test_source, image_size: int, mesh: jax.sharding.Mesh, workdir: str, seed: int,
          params: Any = None, name: str = "model",
          interrupt_at_step: int | None = None) -> TrainOutcome:
  """Trains (or resumes, or just restores) `module` in `workdir`.

  Args:
    module: a Flax module with `apply(variables, images, train) -> (logits, out)`.
    train_config: an effective train config (`effective_config`).
    train_source, test_source: data sources (test is evaluated each epoch and at the end).
    image_size: side of the preprocessed images.
    mesh: 1-D data mesh; the global batch is split over its devices.
    workdir: holds `ckpt/` (orbax), `metrics.jsonl` and, once finished, `summary.json`.
    seed: fixes initialisation, data order, augmentation and dropout.
    params: initial parameters (fine-tuning); default a fresh init from `seed`.
    name: label for the log lines.
    interrupt_at_step: test hook that simulates a kill: stop right after this step, with no
      checkpoint beyond the periodic ones.
  Returns:
    TrainOutcome; when `workdir` already holds the final checkpoint, nothing is trained.
  """
  start_time = time.time()
  cfg = train_config
  num_classes = int(train_source.num_classes)
  steps = total_steps(cfg, len(train_source))
  steps_per_epoch = max(1, len(train_source) // cfg.batch_size)
  eval_every = cfg.eval_every_steps or steps_per_epoch
  tx, schedule = make_optimizer(cfg, steps)
  rep = sharding.replicated(mesh)
  new_state = lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}
  fresh = lambda: new_state(init_params(module, image_size, seed) if params is None else params)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  shapes_only = lambda: new_state(params if params is not None else module.init(
      {"params": _key(seed, 0)}, images, train=False)["params"])

  workdir_lib.makedirs(workdir)
  manager = ocp.CheckpointManager(  # orbax (tensorstore) writes gs:// itself
      workdir_lib.absolute(workdir_lib.join(workdir, "ckpt")),
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
  # The training input is grain's shuffled, repeated stream: its iterator position is saved in
  # the orbax train state (analyses walk fixed plans through vit_analysis.input.streaming instead).
  it = data_lib.batches(train_source, cfg.batch_size, seed=seed, shuffle=True, num_epochs=None,
                        image_size=image_size,
                        normalization=describe(module, image_size).normalization)
  latest = manager.latest_step()
  if latest is None:
    state = jax.device_put(fresh(), rep)
  else:  # the restore target's shapes come from eval_shape: restoring compiles nothing
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(shapes_only))
    try:
      restored = manager.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError, OSError) as e:  # another architecture, a torn file
      manager.close()
      raise errors.UserError(
          f"the saved train state in {manager.directory} (step {latest}) does not fit model "
          f"{name!r} or cannot be read ({errors.message(e)[:300]}): delete the folder "
          f"{workdir} and rerun to train the model again.") from e
    state = restored["state"]
    try:
      _check_restored(state, workdir)
    except errors.UserError:
      manager.close()
      raise
    it.set_state(restored["data"])
    logging.info("[%s] resumed from step %d of %d in %s", name, latest, steps, workdir)
  step = int(state["step"])
  summary_path = workdir_lib.join(workdir, "summary.json")
  if step >= steps:  # finished earlier: only restore
    manager.close()
    if workdir_lib.exists(summary_path):
      acc = workdir_lib.read_json(summary_path)["test_accuracy"]
    else:  # e.g. killed between the last save and the summary
      acc = evaluate(module, state["params"], test_source, image_size=image_size,
                     batch_size=cfg.eval_batch_size, mesh=mesh, fast_compile=cfg.fast_compile)
    return TrainOutcome(state["params"], step, steps, True, acc, time.time() - start_time)

  log = _MetricsLog(workdir_lib.join(workdir, "metrics.jsonl"), step)
  train_step = _cached_train_step(module, json.dumps(cfg.to_dict(), sort_keys=True),
                                  num_classes, steps, seed, mesh)

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(it.get_state())))

  def run_eval(step):
    acc = evaluate(module, state["params"], test_source, image_size=image_size,
                   batch_size=cfg.eval_batch_size, mesh=mesh, fast_compile=cfg.fast_compile)
    log.write({"step": step, "epoch": step / steps_per_epoch, "test_accuracy": acc,
               "seconds": time.time() - start_time, "cpu_seconds": time.process_time()})
    logging.info("[%s] step %d (epoch %.2f): test accuracy %.4f", name, step,
                 step / steps_per_epoch, acc)
    return acc

  first_step, tick, tick_step, acc = step, time.time(), step, None
  watch = _FiniteWatch(name, cfg, schedule, workdir)
  while step < steps:
    state, metrics = train_step(state, sharding.shard_batch(next(it), mesh))
    step += 1
    watch.check()  # the previous step's flag: the device is done with it by now
    watch.pending = (step, metrics)
    if (step % cfg.log_every_steps == 0 or step % cfg.checkpoint_every_steps == 0
        or step % eval_every == 0 or step == steps
        or (interrupt_at_step is not None and step >= interrupt_at_step)):
      watch.check()  # this step's, before anything of it is logged, evaluated or saved
    if step % cfg.log_every_steps == 0 or step == steps:
      metrics = jax.tree.map(float, jax.device_get(metrics))
      metrics.pop("finite")
      now = time.time()
      rate = (step - tick_step) * cfg.batch_size / max(now - tick, 1e-9)
      eta = (steps - step) * cfg.batch_size / max(rate, 1e-9)
      tick, tick_step = now, step
      log.write({"step": step, "lr": float(schedule(step - 1)), "examples_per_sec": rate,
                 **{f"train_{k}": v for k, v in metrics.items()}})
      logging.info("[%s] step %d/%d loss %.4f acc %.3f lr %.2e | %.0f ex/s | ETA %s", name, step,
                   steps, metrics["loss"], metrics["accuracy"], float(schedule(step - 1)), rate,
                   _format_seconds(eta))
    if step % cfg.checkpoint_every_steps == 0 and step < steps:
      save(step)
    if interrupt_at_step is not None and step >= interrupt_at_step and step < steps:
      manager.wait_until_finished()
      manager.close()
      return TrainOutcome(state["params"], step, steps, False, None, time.time() - start_time)
    if step % eval_every == 0 or step == steps:
      acc = run_eval(step)
  save(step)
  manager.wait_until_finished()
  manager.close()
  seconds = time.time() - start_time
  if sharding.is_main_process():
    workdir_lib.write_json(summary_path, {"test_accuracy": acc, "steps": steps,
                                          "seconds_last_run": seconds,
                                          "steps_last_run": step - first_step}, indent=None)
  logging.info("[%s] done: %d steps, test accuracy %.4f, %.1f s", name, steps, acc, seconds)
  return TrainOutcome(state["params"], step, steps, True, acc, seconds)
