"""Pre-training data scale (Fig 12) and fine-tuning (Fig G.1): per-block CKA with a reference model.

Fig 12: the reference is a model trained on all of the training data; copies of it are trained
through the same training loop on nested, class-balanced fractions of that data (paper: 3 %, 10 %,
30 % of JFT; default the same number of steps as the full run). At each block index, CKA between the
subset model's block output and the reference's same block. The paper finds low blocks similar even
at 3 % and the upper blocks falling off, more so for larger models.

Fig G.1: the same block-wise CKA between a model before and after fine-tuning on a task (a new
head; all other parameters start from the model), measured on the task's images at the model's
resolution (paper.md §6 row 23). The paper finds natural-image tasks changing the representation
little, and the first 4-5 blocks preserved on every task.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax
import jax
import ml_collections
import numpy as np

from vit_analysis import data as data_lib
from vit_analysis import sharding
from vit_analysis.analyses import base
from vit_analysis.analyses import similarity


class IndexedSource:
  """A view of `source` restricted to `indices`, with optional image and label maps."""

  def __init__(self, source: Any, indices: np.ndarray | None = None,
               image_fn: Callable[[np.ndarray], np.ndarray] | None = None,
               label_fn: Callable[[int], int] | None = None, num_classes: int | None = None):
    self.source = source
    self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    self.image_fn, self.label_fn = image_fn, label_fn
    self.num_classes = source.num_classes if num_classes is None else num_classes

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self.source[int(self.indices[int(i)])]
    image = ex["image"] if self.image_fn is None else self.image_fn(ex["image"])
    label = ex["label"] if self.label_fn is None else self.label_fn(ex["label"])
    return {"image": image, "label": int(label)}


def nested_subsets(labels: np.ndarray, fractions: list[float],
                   seed: int) -> dict[float, np.ndarray]:
  """Nested class-balanced subsets: each class's examples in one fixed random order, and the
  fraction f keeps the first round(f * n_c) (at least 1) of class c; smaller fractions are
  prefixes of larger ones."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  orders = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
  out = {}
  for f in fractions:
    if not 0 < f <= 1:
      raise ValueError(f"data fractions must be in (0, 1], got {f}")
    out[f] = np.sort(np.concatenate([o[:max(1, int(round(f * len(o))))] for o in orders.values()]))
  return out


def _labels(source: Any) -> np.ndarray:
  if hasattr(source, "labels"):
    return np.asarray(source.labels)
  return np.asarray([source[i]["label"] for i in range(len(source))])


# Offline fine-tuning tasks built from the embedded digits (stand-ins for the paper's datasets).
_DIGIT_TASKS = {
    "same": (None, None, None),
    "inverted": (lambda im: 255 - im, None, None),
    "parity": (None, lambda y: y % 2, 2),
}


def task_sources(task: Any, ctx: base.Context) -> dict[str, Any]:
  """{'train', 'test'} sources of a fine-tuning task: `task.data` is 'digits:<same|inverted|parity>'
  (built on ctx.sources) or a data name for `data.get_source` ('tfds:cifar10', ...)."""
  data = task.data
  if data.startswith("digits:"):
    kind = data.split(":", 1)[1]
    if kind not in _DIGIT_TASKS:
      raise KeyError(f"unknown digits task {kind!r}; known: {sorted(_DIGIT_TASKS)}")
    image_fn, label_fn, num_classes = _DIGIT_TASKS[kind]
    return {s: IndexedSource(ctx.sources[s], image_fn=image_fn, label_fn=label_fn,
                             num_classes=num_classes) for s in ("train", "test")}
  cfg = ml_collections.ConfigDict(dict(name=data, data_dir=task.get("data_dir", "")))
  return {"train": data_lib.get_source(cfg, task.get("train_split", "train")),
          "test": data_lib.get_source(cfg, task.get("test_split", "test"))}


def _train(config: Any, ctx: base.Context, ref_key: str, tag: str, train_source: Any,
           test_source: Any, init_from: base.LoadedModel | None = None) -> base.LoadedModel:
  """Trains a copy of model `ref_key` (new head when fine-tuning) in workdir/dataset_scale/tag."""
  from vit_analysis import train as train_lib  # pylint: disable=g-import-not-at-top
  sub = config.dataset_scale
  entry = config.models[ref_key]
  ref = ctx.models[ref_key]
  # The reference's architecture (overrides, resolution) with a head for this data.
  module = ref.module.clone(num_classes=int(train_source.num_classes))
  cfg = train_lib.effective_config(config.get("train", None), entry.get("train", None))
  extra = dict(sub.get("finetune_train" if init_from else "subset_train", None) or {})
  if not init_from and sub.get("same_steps", True) and not extra.get("num_steps"):
    # Same optimisation budget as the reference (the subset is revisited more often).
    extra["num_steps"] = train_lib.total_steps(cfg, len(ctx.sources["train"]))
  cfg = train_lib.effective_config(cfg, extra)
  params = None
  if init_from is not None:  # every parameter but the (re-shaped) head starts from the model
    fresh = flax.traverse_util.flatten_dict(
        train_lib.init_params(module, ref.image_size, int(config.seed)), sep="/")
    old = flax.traverse_util.flatten_dict(jax.device_get(init_from.variables["params"]), sep="/")
    params = flax.traverse_util.unflatten_dict(
        {k: old[k] if k in old and old[k].shape == v.shape and not k.startswith("head/") else v
         for k, v in fresh.items()}, sep="/")
  outcome = train_lib.train(module, cfg, train_source=train_source, test_source=test_source,
                            image_size=ref.image_size, mesh=ctx.mesh,
                            workdir=os.path.join(ctx.workdir, "dataset_scale", tag),
                            seed=int(config.seed), params=params, name=tag)
  return base.LoadedModel(key=tag, name=ref.name, module=module,
                          variables={"params": jax.device_get(outcome.params)},
                          image_size=ref.image_size, test_accuracy=outcome.test_accuracy)


def blockwise_cka(model_a: base.LoadedModel, model_b: base.LoadedModel, source: Any,
                  config: Any, layers: Any, mesh: jax.sharding.Mesh,
                  desc: str) -> similarity.RepeatedCKA:
  """CKA of every captured layer of `model_a` with every one of `model_b` (same architecture)."""
  sub = config.dataset_scale
  side_a = similarity.model_side(model_a, layers, sub.get("tokens", "all"))
  side_b = similarity.model_side(model_b, layers, sub.get("tokens", "all"))
  if side_a.names != side_b.names:
    raise ValueError(f"{desc}: the two models capture different layers")
  return similarity.cka_over_repeats(side_a, side_b, source, seed=int(config.seed),
                                     mesh=mesh, desc=desc,
                                     **similarity.protocol(sub))


def run(config: Any, ctx: base.Context) -> base.AnalysisResult:
  """Trains the subset and fine-tuned models (cached in the workdir) and compares them by block."""
  t0 = time.time()
  sub = config.dataset_scale
  ref_key = sub.get("reference", "vit")
  ref = ctx.models[ref_key]
  layers = sub.get("layers", "blocks")
  layers = layers if isinstance(layers, str) else tuple(layers)
  figures, metrics = [], {}
  panels = {}
  fractions = [float(f) for f in sub.get("fractions", ())]
  if fractions:
    subsets = nested_subsets(_labels(ctx.sources["train"]), fractions, int(config.seed))
    curves = {}
    for f in fractions:
      tag = f"{ref_key}_frac{f:g}"
      model = _train(config, ctx, ref_key, tag, IndexedSource(ctx.sources["train"], subsets[f]),
                     ctx.sources["test"])
      rep = blockwise_cka(ref, model, ctx.sources[sub.get("split", "test")], config, layers,
                          ctx.mesh, f"dataset_scale/{tag}")
      curves[f"{100 * f:g}%"] = rep
      metrics[tag] = dict(fraction=f, train_examples=int(len(subsets[f])),
                          test_accuracy=model.test_accuracy,
                          block_cka=np.diag(rep.mean).tolist())
    panels["data_fraction"] = (curves, f"{ref.name}: subset model vs 100% model")
  tasks = dict(sub.get("finetune", None) or {})
  if tasks:
    curves = {}
    for label, task in tasks.items():
      sources = task_sources(task, ctx)
      tag = f"{ref_key}_ft_{label}"
      model = _train(config, ctx, ref_key, tag, sources["train"], sources["test"], init_from=ref)
      rep = blockwise_cka(ref, model, sources["test"], config, layers, ctx.mesh,
                          f"dataset_scale/{tag}")
      curves[label] = rep
      metrics[tag] = dict(task=task.data, test_accuracy=model.test_accuracy,
                          block_cka=np.diag(rep.mean).tolist())
    panels["finetune"] = (curves, f"{ref.name}: before vs after fine-tuning")
  if sharding.is_main_process():
    for panel, (curves, title) in panels.items():
      stems = {}
      for label, rep in curves.items():
        stems[label] = ctx.path("results", f"dataset_scale_{panel}_{label.replace('%', 'pct')}")
        rep.save(stems[label], label=label)
      png = draw(stems, title, ctx.path("figures", f"dataset_scale_{panel}"))
      figures.append(png[len(ctx.workdir):].lstrip("/"))
  result = base.AnalysisResult(
      name="dataset_scale", title="Data scale and fine-tuning (Figs 12, G.1)",
      caption="Per-block CKA of models trained on data subsets (or fine-tuned) with the reference "
              "model at the same block. The paper finds low blocks similar even at 3% of the "
              "data and after fine-tuning, with the upper blocks diverging.",
      figures=figures, metrics=metrics, seconds=time.time() - t0)
  if sharding.is_main_process():
    base.save_result(ctx, result)
  return result


def draw(stems: dict[str, str], title: str, out_without_ext: str) -> str:
  """Redraws per-block curves from saved results (label -> stem); returns the PNG path."""
  from vit_analysis import plotting  # pylint: disable=g-import-not-at-top
  from vit_analysis.plotting import similarity as plots  # pylint: disable=g-import-not-at-top
  reps = {label: similarity.RepeatedCKA.load(stem) for label, stem in stems.items()}
  curves = {label: np.diag(r.mean) for label, r in reps.items()}
  errors = {label: np.diag(r.std) for label, r in reps.items() if len(r.values) > 1}
  names = next(iter(reps.values())).names_a if reps else []
  labels = [plots.layer_group(n) for n in names]
  fig = plots.per_block_lines(curves, block_labels=labels, title=title, errors=errors)
  return plotting.save_figure(fig, out_without_ext)

