"""Removing the skip connections of one block (paper Fig 8).

For each chosen block i, a copy of a ViT's model entry with `skip_removed=(i,)` (BOTH residual
adds of block i removed, 0-based; docs/method.md#skip-removal) is trained through the same training loop
as every other model (`ctx.train_fn`, cached by content hash). The analysis reports test accuracy
against the unmodified model and draws each model's intra-model CKA heatmap (the similarity
analysis' minibatch CKA, docs/method.md#minibatch-cka). The paper sees the heatmap split into two blocks, before
and after block i, and about 4% lower accuracy for a middle block.

The split is summarised by `split_contrast`: mean CKA within the two diagonal blocks (layers
before block i, layers from block i on) minus mean CKA across them, computed at the same cut for
the unmodified model. The contrast is linear in the CKA grid (`split_weights`), so its standard
error, and that of its change against the unmodified model, come from
`cka_runner.linear_estimate`: over repeats, or the exact leave-one-minibatch-out jackknife with one
repeat (docs/method.md#error-bars-of-cka-statistics).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vit_analysis.analyses import base
from vit_analysis.models import layers
from vit_analysis.plotting import mechanisms
from vit_analysis.similarity import cka_runner, representations


def split_index(names: Sequence[str], block: int) -> int:
  """Position of the first layer of block `block` (e.g. 'block03/ln0') in `names`.

  Raises:
    KeyError: if no layer belongs to that block.
  """
  for i, n in enumerate(names):
    if layers.parse(n).block == block:
      return i
  raise KeyError(f"no layer of block {block} ({layers.block(block)}*) among "
                 f"{list(names)[:8]}...")


def split_contrast(cka: np.ndarray, cut: int) -> dict[str, float]:
  """Within-block minus across-block mean CKA for a cut of a square matrix before row `cut`.

  Args:
    cka: [L, L] intra-model CKA.
    cut: layers [0, cut) form the first block, [cut, L) the second; 0 < cut < L.

  Returns:
    {'within': mean of the two diagonal blocks (off-diagonal entries only, equally weighted),
     'across': mean of the off-diagonal block, 'contrast': within - across}.
  """
  cka = np.asarray(cka, np.float64)
  size = cka.shape[0]
  if cka.ndim != 2 or cka.shape[1] != size:
    raise ValueError(f"cka must be square, got shape {cka.shape}")
  if not 0 < cut < size:
    raise ValueError(f"cut {cut} must split {size} layers into two non-empty blocks")

  def mean_off_diagonal(m):
    k = m.shape[0]
    return float((m.sum() - np.trace(m)) / (k * k - k)) if k > 1 else float("nan")

  blocks = [mean_off_diagonal(cka[:cut, :cut]), mean_off_diagonal(cka[cut:, cut:])]
  within = float(np.nanmean(blocks)) if not all(np.isnan(blocks)) else float("nan")
  across = float(cka[:cut, cut:].mean())
  return {"within": within, "across": across, "contrast": within - across}


def split_weights(size: int, cut: int) -> np.ndarray:
  """Weights w [L, L] with sum(w * cka) == split_contrast(cka, cut)['contrast'] for every cka.

  Each diagonal block with more than one layer puts 1 / (number of blocks counted) / (k^2 - k)
  on its off-diagonal cells; the across block [:cut, cut:] puts -1 / (cut (L - cut)) on each.
  """
  if not 0 < cut < size:
    raise ValueError(f"cut {cut} must split {size} layers into two non-empty blocks")
  w = np.zeros((size, size))
  blocks = [(lo, hi) for lo, hi in ((0, cut), (cut, size)) if hi - lo > 1]
  if not blocks:
    raise ValueError(f"a cut at {cut} of {size} layers leaves no block of two layers")
  for lo, hi in blocks:
    k = hi - lo
    w[lo:hi, lo:hi] = 1.0 / len(blocks) / (k * k - k)
    w[np.arange(lo, hi), np.arange(lo, hi)] = 0.0
  w[:cut, cut:] = -1.0 / (cut * (size - cut))
  return w


def accuracy_drop_stderr(base: float, modified: float, num_test: int) -> float:
  """Binomial SE of base - modified, two accuracies over the same `num_test` test images.

  sqrt(a (1 - a) / n + b (1 - b) / n): adding the variances ignores the positive correlation of
  two models scored on the same images, so it is conservative (docs/method.md#significance).
  """
  if num_test <= 0:
    return float("nan")
  var = lambda a: max(a * (1 - a), 0.0) / num_test  # noqa: E731
  return float(math.sqrt(var(float(base)) + var(float(modified))))


def removed_entry(entry: Any, block: int) -> ml_collections.ConfigDict:
  """A copy of a `config.models` entry with both residual adds of `block` removed."""
  entry = copy.deepcopy(entry if isinstance(entry, ml_collections.ConfigDict)
                        else ml_collections.ConfigDict(dict(entry)))
  overrides = dict(entry.get("overrides", None) or {})
  previous = tuple(overrides.get("skip_removed", ()) or ())
  overrides["skip_removed"] = tuple(sorted(set(previous) | {int(block)}))
  with entry.unlocked():
    entry.overrides = overrides
  return entry


def default_config() -> ml_collections.ConfigDict:
  """Every option of the skip-removal analysis, with the paper's defaults."""
  c = cka_runner.protocol_config()
  c.base_model = "vit"   # key in config.models (a ViT); copies get skip_removed=(i,)
  c.blocks = (1, 7, 10)  # 0-based blocks whose two residual adds are removed, one model each
  c.layers = "coarse"    # CKA capture points (method.md: coarse for Fig 8)
  c.tokens = "all"
  c.figure_formats = ("png", "pdf")
  return c


def run(ctx: base.Context, cfg: ml_collections.ConfigDict) -> base.AnalysisResult:
  """Trains ViTs without the skips of one block and compares them (Fig 8)."""
  base_key = cfg.base_model
  base_model = ctx.model(base_key)
  info = base_model.info
  if info.family != "vit":
    raise ValueError(f"skip_removal needs a ViT base model, got {base_model.name} "
                     f"({info.family})")
  blocks = [int(b) for b in cfg.blocks]
  bad = [b for b in blocks if not 0 <= b < info.num_blocks]
  if bad:
    raise ValueError(f"blocks {bad} out of range for {base_model.name} "
                     f"({info.num_blocks} blocks)")
  if ctx.train_fn is None:
    raise ValueError("skip_removal trains models: the context has no train_fn")

  models = {base_key: base_model}
  for b in blocks:
    key = f"{base_key}_noskip{b:02d}"
    models[key] = ctx.train_fn(key, removed_entry(ctx.model_entry(base_key), b))

  source = ctx.sources[cfg.split]
  settings = cka_runner.protocol(cfg)
  spec = representations.layer_spec(cfg.layers)
  matrices, reps, metrics, accuracies = {}, {}, {}, {}
  for key, model in models.items():
    side = representations.model_side(model, spec, cfg.tokens)
    rep = cka_runner.cka_over_repeats(side, None, source, seed=ctx.seed, mesh=ctx.mesh,
                                      desc=f"skip_removal/{key}",
                                      resume=ctx.checkpointer(key), **settings)
    matrices[key], reps[key] = rep.mean, rep
    accuracies[key] = model.test_accuracy
    metrics[key] = {"name": model.name, "test_accuracy": model.test_accuracy,
                    "num_test": len(ctx.sources["test"]),
                    "skip_removed": list(getattr(model.module, "skip_removed", ()) or ()),
                    "num_layers": len(rep.names_a)}
    if ctx.is_main:
      rep.save(ctx.results_stem(f"skip_removal_{key}"))
    names = rep.names_a
  for b in blocks:
    cut = split_index(names, b)
    key = f"{base_key}_noskip{b:02d}"
    if cut > 0:
      w = split_weights(len(names), cut)
      own, unmodified = cka_runner.linear_estimate([(reps[key], w)]), cka_runner.linear_estimate([(reps[base_key], w)])
      # The change is paired: both models' repeat r saw the same images.
      change = cka_runner.linear_estimate([(reps[key], w), (reps[base_key], -w)])
      metrics[key]["split"] = dict(split_contrast(matrices[key], cut),
                                   contrast_stderr=own["stderr"], contrast_over=own["over"])
      metrics[key]["split_unmodified"] = dict(
          split_contrast(matrices[base_key], cut), contrast_stderr=unmodified["stderr"],
          contrast_over=unmodified["over"])
      metrics[key]["split_change"] = change
    if accuracies[key] is not None and accuracies[base_key] is not None:
      metrics[key]["accuracy_drop"] = accuracies[base_key] - accuracies[key]
      n = metrics[key]["num_test"]
      metrics[key]["accuracy_drop_stderr"] = accuracy_drop_stderr(
          accuracies[base_key], accuracies[key], n)
      metrics[key]["accuracy_drop_over"] = (
          f"over {n} test images, binomial, the two accuracies taken as independent")
  labels = {k: (f"{k}: unmodified" if k == base_key else f"{k}: block {k[-2:]} skips removed")
            for k in models}
  figures = [ctx.save_figure(
      "skip_removal", mechanisms.skip_removal_heatmaps,
      matrices={labels[k]: m for k, m in matrices.items()},
      accuracies={labels[k]: a for k, a in accuracies.items()})]
  return base.AnalysisResult(
      name="skip_removal", title="Removing the skip connections of one block (Fig 8)",
      caption=("Intra-model CKA of ViTs trained with both residual adds of one block removed, "
               "next to the unmodified model, with test accuracy. The paper finds the heatmap "
               "splits into layers before and after that block, and ~4% lower accuracy when a "
               "middle block loses its skips."),
      figures=figures, metrics=dict(settings, **metrics))
