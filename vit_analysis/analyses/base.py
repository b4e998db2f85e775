"""What every analysis receives and returns.

An analysis is a function `run(ctx, cfg) -> AnalysisResult`, like a big_vision evaluator: `cfg`
is its own sub-config (its `default_config()` updated by the experiment's `config.<name>`), the
only place it reads options from; `ctx` holds what the entry point prepared: the workdir, the
models (trained, restored or loaded from official checkpoints), the raw data sources, the device
mesh and the few experiment-level facts an analysis may need (seed, model entries, training
defaults). The analysis writes arrays under `results/` and figures under `figures/` through
`ctx` (process 0 only) and returns a summary; `main.run` saves it as `results/<name>.json` and
the report renders it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vit_analysis.models.build import LoadedModel
from vit_analysis.plotting import recipes
from vit_analysis.runtime import compilation, resume
from vit_analysis.runtime import workdir as workdir_lib

__all__ = ["AnalysisResult", "Context", "LoadedModel", "image_sample_config", "save_result"]


@dataclasses.dataclass
class Context:
  """What the entry point hands to every analysis, and the analyses' shared epilogue.

  `main.run` builds one Context per experiment and calls each analysis as
  `run(ctx.for_analysis(name, cfg), cfg)`. Analyses look models up with `ctx.model(key)`, write
  figures with `ctx.save_figure` and arrays with `ctx.save_arrays` (both on process 0 only);
  `main.run` alone writes the `AnalysisResult`. The context keeps the running analysis' `cfg`
  privately, for its epilogue alone: the checkpointer's fingerprint and interval, the figure
  formats and `fast_compile`.

  Attributes:
    workdir: the run's directory; results go to `workdir/results`, figures to `workdir/figures`.
    models: LoadedModel per config key, in config order.
    sources: raw data sources per split name ('train', 'test'); see `vit_analysis.input.data`.
    mesh: the 1-D device mesh (`vit_analysis.runtime.sharding.make_mesh`).
    train_fn: trains a model from a model sub-config (used by analyses that need extra trained
      models: skip removal, dataset scale); signature `train_fn(model_key, model_config) ->
      LoadedModel`, cached by content hash like every configured model
      (`models.build.ModelBuilder.build`). None where training is unavailable.
    seed: the experiment's `config.seed` (CKA example order, subsets, probe splits).
    model_entries: the experiment's `config.models` entries, from which analyses derive extra
      models for `train_fn`.
    train_defaults: the experiment's `config.train` (None: none); the fallback of
      `fast_compile` and what training an extra model starts from.
    name: the running analysis' name ('' outside an analysis).
  """
  workdir: str
  models: dict[str, LoadedModel]
  sources: dict[str, Any]
  mesh: jax.sharding.Mesh
  train_fn: Callable[..., LoadedModel] | None = None
  seed: int = 0
  model_entries: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  train_defaults: Any = None
  name: str = ""
  # The running analysis' sub-config, for the epilogue only (analyses read their `cfg`).
  _cfg: Any = dataclasses.field(default=None, init=False, repr=False)

  @classmethod
  def for_experiment(cls, config: Any, workdir: str, models: dict[str, LoadedModel],
                     sources: dict[str, Any], mesh: jax.sharding.Mesh,
                     train_fn: Callable[..., LoadedModel] | None = None) -> Context:
    """The context of experiment `config`: its seed, model entries and training defaults."""
    return cls(workdir, models, sources, mesh, train_fn, seed=int(config.get("seed", 0)),
               model_entries=config.get("models", None) or {},
               train_defaults=config.get("train", None))

  def for_analysis(self, name: str, cfg: Any) -> Context:
    """This context while analysis `name` runs with its merged sub-config `cfg`."""
    ctx = dataclasses.replace(self, name=name)
    ctx._cfg = cfg  # pylint: disable=protected-access
    return ctx

  @property
  def layout(self) -> workdir_lib.Layout:
    """The run folder's paths (`vit_analysis.runtime.workdir`)."""
    return workdir_lib.Layout(self.workdir)

  def path(self, *parts: str) -> str:
    """`workdir/parts...` (a local parent folder is created; a `gs://` prefix needs none)."""
    p = self.layout.join(*parts)
    workdir_lib.makedirs(os.path.dirname(p))
    return p

  @property
  def is_main(self) -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0

  @property
  def fast_compile(self) -> bool:
    """The running analysis' `fast_compile`: its `cfg.fast_compile`, or if None the training
    defaults' (`vit_analysis.runtime.compilation.fast_compile`)."""
    return compilation.fast_compile({"train": self.train_defaults}, self._cfg)

  def model_entry(self, key: str) -> ml_collections.ConfigDict:
    """A copy of the experiment's `config.models[key]` entry, to derive another model from.

    Raises:
      KeyError: naming the analysis, the unknown key and the known keys.
    """
    if key not in self.model_entries:
      raise KeyError(f"{self.name or 'analysis'}: no model entry {key!r}; known: "
                     f"{list(self.model_entries)}")
    entry = self.model_entries[key]
    return ml_collections.ConfigDict(entry.to_dict() if hasattr(entry, "to_dict") else dict(entry))

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
    every = self._cfg.get("checkpoint_every_s", 60.0) if self._cfg is not None else 60.0
    sub = self._cfg.to_json_best_effort(sort_keys=True) if self._cfg is not None else ""
    content = json.dumps([self.name, tag, sub, self.seed,
                          sorted((k, m.name, m.fingerprint) for k, m in self.models.items())])
    return resume.Checkpointer(self.layout.partial(self.name, tag),
                               every_s=float(every),
                               fingerprint=hashlib.sha256(content.encode()).hexdigest()[:16])

  def results_stem(self, name: str) -> str:
    """`workdir/results/<name>` (no extension), for `RepeatedCKA.save` / `load`."""
    return self.path(workdir_lib.RESULTS, name)

  def save_arrays(self, name: str, **arrays: Any) -> str:
    """Writes `results/<name>.npz` in one write (`runtime.workdir.write_bytes`) on process 0;
    returns its workdir-relative path."""
    rel = os.path.join(workdir_lib.RESULTS, f"{name}.npz")
    if self.is_main:
      workdir_lib.save_npz(self.layout.join(rel), **arrays)
    return rel

  def save_figure(self, name: str, plot: Callable[..., Any], /, **args: Any) -> str:
    """Draws `plot(**args)` as `figures/<name>.<fmt>` for the analysis' `figure_formats`, and
    saves the recipe to redraw it from results/ alone (process 0 only).

    The one way an analysis writes a static figure (`vit_analysis.plotting.recipes`): `plot` is
    a public function of a `vit_analysis.plotting` module and `args` its arguments, saved as
    `results/recipes/<name>.npz|json`; the report redraws a missing figure from them.

    Args:
      name: file name without extension.
      plot: the plotting function (arrays in, a matplotlib Figure out).
      **args: its keyword arguments: arrays, numbers, strings, None, lists, string-keyed dicts.

    Returns:
      The first format's path relative to the workdir (the same on every process).

    Raises:
      vit_analysis.plotting.recipes.RecipeError: `plot` is not a plotting function.
      TypeError: an argument cannot be saved in a recipe.
    """
    formats = tuple((self._cfg.get("figure_formats", None) if self._cfg is not None else None)
                    or ("png", "pdf"))
    recipes.name_of(plot)  # refused on every process alike
    if self.is_main:
      recipes.save(self.workdir, name, plot, args, formats)
    return os.path.join(workdir_lib.FIGURES, f"{name}.{formats[0]}")


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
  """Writes `results/<name>.json` in one write; returns its path.

  Written last, after the analysis' arrays and figures: its presence is what marks the analysis
  finished (`main.run` skips it on a rerun), on a local disk and on `gs://` alike.
  """
  return workdir_lib.write_text(ctx.layout.result(result.name), result.to_json())
