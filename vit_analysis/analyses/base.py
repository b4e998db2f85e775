"""What every analysis receives and returns.

An analysis is a function `run(config, ctx) -> AnalysisResult`. `config` is the whole experiment
ConfigDict (the analysis reads its own sub-config, `config[name]`); `ctx` holds what the entry point
prepared: the workdir, the models (trained, restored or loaded from official checkpoints), the raw
data sources and the device mesh. The analysis writes `results/<name>.npz|json` and
`figures/<name>*.png|pdf` under the workdir (process 0 only) and returns a summary that the report
renders.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np


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
  """
  key: str
  name: str
  module: nn.Module
  variables: Any
  image_size: int
  test_accuracy: float | None = None


@dataclasses.dataclass
class Context:
  """What the entry point hands to every analysis.

  Attributes:
    workdir: the run's directory; results go to `workdir/results`, figures to `workdir/figures`.
    models: LoadedModel per config key, in config order.
    sources: raw data sources per split name ('train', 'test'); see `vit_analysis.data`.
    mesh: the 1-D device mesh (`vit_analysis.sharding.make_mesh`).
    train_fn: trains a model from a model sub-config (used by analyses that need extra trained
      models: skip removal, dataset scale); signature `train_fn(model_key, model_config) ->
      LoadedModel`. None where training is unavailable.
  """
  workdir: str
  models: dict[str, LoadedModel]
  sources: dict[str, Any]
  mesh: jax.sharding.Mesh
  train_fn: Callable[..., LoadedModel] | None = None

  def path(self, *parts: str) -> str:
    """`workdir/parts...`, creating the parent folder."""
    p = os.path.join(self.workdir, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p


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
