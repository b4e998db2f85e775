"""What every analysis receives and returns.

An analysis is a function `run(config, ctx) -> AnalysisResult`. `config` is the whole experiment
ConfigDict; `ctx` holds what the entry point prepared: the workdir, the models (trained, restored
or loaded from official checkpoints), the raw data sources, the device mesh and the analysis'
merged sub-config `ctx.sub`. The analysis writes arrays under `results/` and figures under
`figures/` through `ctx` (process 0 only) and returns a summary; `main.run` saves it as
`results/<name>.json` and the report renders it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from vit_analysis import plotting
from vit_analysis.models import ModelInfo, describe
from vit_analysis.runtime import compilation, resume


@dataclasses.dataclass
class LoadedModel:
  """A model ready for analysis.

  Attributes:
    key: the model's key in `config.models` (e.g. 'vit', 'resnet').
    name: its registry name (e.g. 'ViT-Ti_4', 'R26x1-small', 'ViT-B_32').
    module: the Flax module; `module.apply(variables, images, train=False) -> (logits, out)`.
    variables: `{'params': ...}`.
    image_size: side in pixels of the square images the model takes.
    test_accuracy: top-1 accuracy on the test split, if it was measured.
    fingerprint: what determines the parameters (content hash or checkpoint path); partial
      results of another model are never resumed.
  """
  key: str
  name: str
  module: nn.Module
  variables: Any
  image_size: int
  test_accuracy: float | None = None
  fingerprint: str = ""

  @property
  def info(self) -> ModelInfo:
    """The model's facts at its image size (family, CLS, grid, ...): `models.describe`."""
    return describe(self.module, self.image_size)


@dataclasses.dataclass
class Context:
  """What the entry point hands to every analysis, and the analyses' shared epilogue.

  `main.run` builds one Context per experiment and gives each analysis `ctx.for_analysis(name,
  sub)`, which carries that analysis' merged sub-config. Analyses look models up with
  `ctx.model(key)`, write figures with `ctx.save_figure` and arrays with `ctx.save_arrays` (both
  on process 0 only); `main.run` alone writes the `AnalysisResult`.

  Attributes:
    workdir: the run's directory; results go to `workdir/results`, figures to `workdir/figures`.
    models: LoadedModel per config key, in config order.
    sources: raw data sources per split name ('train', 'test'); see `vit_analysis.input.data`.
    mesh: the 1-D device mesh (`vit_analysis.runtime.sharding.make_mesh`).
    train_fn: trains a model from a model sub-config (used by analyses that need extra trained
      models: skip removal, dataset scale); signature `train_fn(model_key, model_config) ->
      LoadedModel`, cached by content hash like every configured model. None where training
      is unavailable.
    config: the whole experiment config.
    name: the running analysis' name ('' outside an analysis).
    sub: the running analysis' sub-config, its `default_config()` updated by the config's.
  """
  workdir: str
  models: dict[str, LoadedModel]
  sources: dict[str, Any]
  mesh: jax.sharding.Mesh
  train_fn: Callable[..., LoadedModel] | None = None
  config: Any = None
  name: str = ""
  sub: Any = None

  def for_analysis(self, name: str, sub: Any) -> "Context":
    """This context for analysis `name` with its merged sub-config `sub`."""
    return dataclasses.replace(self, name=name, sub=sub)

  def path(self, *parts: str) -> str:
    """`workdir/parts...`, creating the parent folder."""
    p = os.path.join(self.workdir, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  @property
  def is_main(self) -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0)) if self.config is not None else 0

  @property
  def fast_compile(self) -> bool:
    """The analysis' `fast_compile` (see `vit_analysis.runtime.compilation.fast_compile`)."""
    return compilation.fast_compile(self.config, self.sub)

  def model(self, key: str) -> LoadedModel:
    """The model of `config.models[key]`.

    Raises:
      KeyError: naming the analysis, the unknown key, the closest and all known keys.
    """
    if key not in self.models:
      close = difflib.get_close_matches(str(key), list(self.models), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise KeyError(f"{self.name or 'analysis'}: unknown model key {key!r}{hint} "
                     f"known: {list(self.models)}")
    return self.models[key]

  def model_keys(self, keys: Any = None, *, where: Callable[[LoadedModel], bool] | None = None,
                 what: str = "model") -> list[str]:
    """`keys` checked against the models, or (empty) every model for which `where` holds.

    Raises:
      KeyError: for an unknown key. ValueError: when no model qualifies.
    """
    keys = list(keys or ())
    for key in keys:
      self.model(key)
    if not keys:
      keys = [k for k, m in self.models.items() if where is None or where(m)]
    if not keys:
      raise ValueError(f"{self.name}: needs a {what}; models are "
                       f"{[f'{k} ({m.name})' for k, m in self.models.items()]}")
    return keys

  def checkpointer(self, tag: str) -> resume.Checkpointer:
    """Where the running analysis keeps the partial state of its part `tag` between runs.

    Saved under `workdir/partial/<analysis>/<tag>` every `checkpoint_every_s` seconds; the
    fingerprint covers the analysis' sub-config, the seed and every model's fingerprint, so a
    changed run never resumes another's partial sums.
    """
    every = self.sub.get("checkpoint_every_s", 60.0) if self.sub is not None else 60.0
    sub = self.sub.to_json_best_effort(sort_keys=True) if self.sub is not None else ""
    content = json.dumps([self.name, tag, sub, self.seed,
                          sorted((k, m.name, m.fingerprint) for k, m in self.models.items())])
    return resume.Checkpointer(os.path.join(self.workdir, "partial", self.name, tag),
                               every_s=float(every),
                               fingerprint=hashlib.sha256(content.encode()).hexdigest()[:16])

  def results_stem(self, name: str) -> str:
    """`workdir/results/<name>` (no extension), its folder created."""
    return self.path("results", name)

  def save_arrays(self, name: str, **arrays: Any) -> str:
    """Writes `results/<name>.npz` atomically on process 0; returns its workdir-relative path."""
    rel = os.path.join("results", f"{name}.npz")
    if self.is_main:
      path = self.path(rel)
      tmp = path + ".tmp.npz"
      np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
      os.replace(tmp, path)
    return rel

  def save_figure(self, figure: Any, name: str) -> str:
    """Writes `figures/<name>.<fmt>` for the analysis' `figure_formats` (process 0 only).

    Args:
      figure: a matplotlib Figure, or a function of no arguments returning one (called on
        process 0 only, so other processes neither draw nor read result files).
      name: file name without extension.

    Returns:
      The first format's path relative to the workdir (the same on every process).
    """
    formats = tuple((self.sub.get("figure_formats", None) if self.sub is not None else None)
                    or ("png", "pdf"))
    rel = os.path.join("figures", f"{name}.{formats[0]}")
    if self.is_main:
      fig = figure() if callable(figure) else figure
      plotting.save_figure(fig, self.path("figures", name), formats)
    elif not callable(figure):
      plt.close(figure)
    return rel


def image_sample_config(num_images: int, batch_size: int, **options: Any) -> ml_collections.ConfigDict:
  """The options of every analysis that streams a seeded sample of images, plus its `options`.

  split, num_images, batch_size, seed (of the sample), models (keys, tuple or comma-separated;
  empty = every model the analysis applies to), figure_formats, fast_compile (None:
  config.train.fast_compile) and checkpoint_every_s (partial sums saved this often).
  """
  config = ml_collections.ConfigDict(dict(
      split="test", num_images=num_images, batch_size=batch_size, seed=0, models=(),
      figure_formats=("png", "pdf"), fast_compile=None, checkpoint_every_s=60.0))
  config.update(options)
  return config


@dataclasses.dataclass
class AnalysisResult:
  """Summary of one analysis for the report.

  Attributes:
    name: the analysis' registry name (e.g. 'cka_intra').
    title: one line, e.g. 'Intra-model CKA (Fig. 1)'.
    caption: two sentences: what the figure shows, and what the paper found.
    figures: PNG paths relative to the workdir, in display order.
    metrics: JSON-serialisable numbers (with their error bars), shown as a table.
    seconds: wall time of the analysis.
  """
  name: str
  title: str
  caption: str
  figures: list[str]
  metrics: dict[str, Any]
  seconds: float = 0.0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, default=_json_default)

  @classmethod
  def from_json(cls, text: str) -> "AnalysisResult":
    return cls(**json.loads(text))


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x)}")


def save_result(ctx: Context, result: AnalysisResult) -> str:
  """Writes `results/<name>.json` atomically (temp file + rename); returns its path."""
  path = ctx.path("results", f"{result.name}.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(result.to_json())
  os.replace(tmp, path)
  return path
