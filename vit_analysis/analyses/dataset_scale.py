"""Pre-training data scale (Fig 12) and fine-tuning (Fig G.1): per-block CKA with a reference model.

Fig 12: the reference is a model trained on all of the training data; copies of it are trained
through the same training loop on nested, class-balanced fractions of that data (paper: 3 %, 10 %,
30 % of JFT; default the same number of steps as the full run). At each block index, CKA between the
subset model's block output and the reference's same block. The paper finds low blocks similar even
at 3 % and the upper blocks falling off, more so for larger models.

Fig G.1: the same block-wise CKA between a model before and after fine-tuning on a task (a new
head; all other parameters start from the model), measured on the task's images at the model's
resolution (docs/method.md#dataset-scale-and-fine-tuning). The paper finds natural-image tasks changing the representation
little, and the first 4-5 blocks preserved on every task.

Each block's CKA is saved with its standard error (`block_cka_stderr`: over repeats, or the exact
leave-one-minibatch-out jackknife of that cell with one repeat; `block_cka_over` says which,
docs/method.md#error-bars-of-cka-statistics).
"""
from __future__ import annotations

import json
from typing import Any, Callable

import ml_collections
import numpy as np

from vit_analysis.analyses import base
from vit_analysis.input import data as data_lib
from vit_analysis.models import layers as layers_lib
from vit_analysis.models import train as train_lib
from vit_analysis.plotting import similarity as plots
from vit_analysis.similarity import cka_runner, representations


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


def _train(ctx: base.Context, cfg: ml_collections.ConfigDict, ref_key: str, tag: str,
           sources: dict[str, Any], data_tag: str,
           init_from: base.LoadedModel | None = None) -> base.LoadedModel:
  """A copy of model `ref_key` (its architecture and resolution, a head for this data) trained
  through `ctx.train_fn`, so it is cached and content-hashed like every configured model.

  Subset models start from scratch (by default with the reference's number of steps); fine-tuned
  models start from `init_from` (every parameter but the re-shaped head).
  """
  if ctx.train_fn is None:
    raise ValueError("dataset_scale trains models, but this context has no train_fn")
  entry = ctx.model_entry(ref_key)
  extra = dict(cfg.finetune_train if init_from is not None else cfg.subset_train)
  if init_from is None and cfg.same_steps and not extra.get("num_steps"):
    # Same optimisation budget as the reference (the subset is revisited more often).
    train = train_lib.effective_config(ctx.train_defaults, entry.get("train", None))
    extra["num_steps"] = train_lib.total_steps(train, len(ctx.sources["train"]))
  entry.train = ml_collections.ConfigDict(dict(entry.get("train", None) or {}, **extra))
  entry.num_classes = int(sources["train"].num_classes)
  entry.checkpoint = ""
  entry.checkpoint_options = {}
  return ctx.train_fn(tag, entry, sources=sources, data_tag=data_tag, init_from=init_from)


def blockwise_cka(model_a: base.LoadedModel, model_b: base.LoadedModel, source: Any,
                  ctx: base.Context, cfg: ml_collections.ConfigDict, layers: Any,
                  desc: str) -> cka_runner.RepeatedCKA:
  """CKA of every captured layer of `model_a` with every one of `model_b` (same architecture)."""
  side_a = representations.model_side(model_a, layers, cfg.tokens)
  side_b = representations.model_side(model_b, layers, cfg.tokens)
  if side_a.names != side_b.names:
    raise ValueError(f"{desc}: the two models capture different layers")
  return cka_runner.cka_over_repeats(side_a, side_b, source, seed=ctx.seed, mesh=ctx.mesh,
                                     desc=desc, resume=ctx.checkpointer(desc.split("/")[-1]),
                                     **cka_runner.protocol(cfg))


def block_estimates(rep: cka_runner.RepeatedCKA) -> dict[str, Any]:
  """Per-block CKA (the diagonal of a block-by-block comparison) with standard errors.

  Returns:
    {'block_cka': [L] diagonal of the mean grid, 'block_cka_stderr': [L] its standard errors
     (`cka_runner.linear_estimate` of each diagonal cell: over repeats, or with one repeat the
     cell's own jackknife error, exact for a single cell), 'block_cka_over': what they are over}.
  """
  size = min(np.shape(rep.values)[1:])
  out = []
  for i in range(size):
    w = np.zeros(np.shape(rep.values)[1:])
    w[i, i] = 1.0
    out.append(cka_runner.linear_estimate([(rep, w)]))
  return dict(block_cka=np.diag(rep.mean).tolist(),
              block_cka_stderr=[e["stderr"] for e in out],
              block_cka_over=out[0]["over"] if out else "")


def default_config() -> ml_collections.ConfigDict:
  """Every option of the data-scale / fine-tuning analysis, with the paper's defaults."""
  c = cka_runner.protocol_config()
  c.reference = "vit"            # key in config.models: the model trained on all the data
  c.fractions = (0.03, 0.1, 0.3)  # nested class-balanced subsets of the training split
  c.same_steps = True            # subset models get the reference's number of steps
  c.subset_train = {}            # train-config overrides for the subset models
  c.finetune = {}                # label -> task; 'digits:<same|inverted|parity>' or a data name
  c.finetune_train = {}          # train-config overrides for the fine-tuned models
  c.layers = "blocks"            # per-block CKA (the diagonal of the block-by-block matrix)
  c.tokens = "all"
  c.figure_formats = ("png", "pdf")
  return c


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Trains the subset and fine-tuned models (cached) and compares them block by block."""
  ref_key = cfg.reference
  ref = ctx.model(ref_key)
  layers = representations.layer_spec(cfg.layers)
  figures, metrics = [], {}
  panels = {}
  fractions = [float(f) for f in cfg.fractions]
  if fractions:
    subsets = nested_subsets(_labels(ctx.sources["train"]), fractions, ctx.seed)
    curves = {}
    for f in fractions:
      tag = f"{ref_key}_frac{f:g}"
      sources = {"train": IndexedSource(ctx.sources["train"], subsets[f]),
                 "test": ctx.sources["test"]}
      model = _train(ctx, cfg, ref_key, tag, sources, f"subset fraction={f:g} seed={ctx.seed}")
      rep = blockwise_cka(ref, model, ctx.sources[cfg.split], ctx, cfg, layers,
                          f"dataset_scale/{tag}")
      curves[f"{100 * f:g}%"] = rep
      metrics[tag] = dict(fraction=f, train_examples=int(len(subsets[f])),
                          test_accuracy=model.test_accuracy, num_test=len(sources["test"]),
                          **block_estimates(rep))
    panels["data_fraction"] = (curves, f"{ref.name}: subset model vs 100% model")
  tasks = dict(cfg.finetune or {})
  if tasks:
    curves = {}
    for label, task in tasks.items():
      sources = task_sources(task, ctx)
      tag = f"{ref_key}_ft_{label}"
      task_json = json.dumps(dict(task), sort_keys=True, default=str)
      model = _train(ctx, cfg, ref_key, tag, sources, f"finetune {task_json}", init_from=ref)
      rep = blockwise_cka(ref, model, sources["test"], ctx, cfg, layers, f"dataset_scale/{tag}")
      curves[label] = rep
      metrics[tag] = dict(task=task["data"], test_accuracy=model.test_accuracy,
                          num_test=len(sources["test"]), **block_estimates(rep))
    panels["finetune"] = (curves, f"{ref.name}: before vs after fine-tuning")
  for panel, (curves, title) in panels.items():
    stems = {label: ctx.results_stem(f"dataset_scale_{panel}_{label.replace('%', 'pct')}")
             for label in curves}
    if ctx.is_main:
      for label, rep in curves.items():
        rep.save(stems[label], label=label)
    figures.append(ctx.save_figure(f"dataset_scale_{panel}", plots.per_block_lines,
                                   **curves_args(curves, title)))
  return base.AnalysisResult(
      name="dataset_scale", title="Data scale and fine-tuning (Figs 12, G.1)",
      caption="Per-block CKA of models trained on data subsets (or fine-tuned) with the reference "
              "model at the same block. The paper finds low blocks similar even at 3% of the "
              "data and after fine-tuning, with the upper blocks diverging.",
      figures=figures, metrics=metrics)


def curves_args(reps: dict[str, cka_runner.RepeatedCKA], title: str) -> dict[str, Any]:
  """The arguments of `plotting.similarity.per_block_lines`: each model's per-block CKA with the
  reference (the diagonal), its spread over repeats, the blocks' labels."""
  names = next(iter(reps.values())).names_a if reps else []
  return dict(curves={label: np.diag(r.mean) for label, r in reps.items()},
              block_labels=[layers_lib.parse(n).group for n in names], title=title,
              errors={label: np.diag(r.std) for label, r in reps.items() if len(r.values) > 1})
