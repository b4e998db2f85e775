"""Analyses by name. Each entry is `module:function` with `function(ctx, cfg) -> AnalysisResult`.

`cfg` is the analysis' own sub-config: `default_config(name)` updated by the experiment's
`config.<name>` (`vit_analysis.options.analysis_config`); it is the only place an analysis reads
options from, like a big_vision evaluator's. Modules are imported on first use, so a config that
runs one analysis pays for one import.
"""
from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Callable

import ml_collections

if TYPE_CHECKING:
  from vit_analysis.analyses.base import AnalysisResult, Context, LoadedModel

# name -> "module:function" (relative to this package). Paper figures in the comments.
_REGISTRY: dict[str, str] = {
    "cka_intra": "similarity:run_intra",             # Figs 1, B.1, H.1
    "cka_cross": "similarity:run_cross",             # Figs 2, B.1, G.2, H.2
    "cka_zoo": "zoo:run",                            # Figs 1 and 2 for N models, one pass
    "head_subsets": "head_subsets:run",              # Fig 5
    "localization": "localization:run",              # Figs 9, 10, D.1-D.3
    "dataset_scale": "dataset_scale:run",            # Figs 12, G.1
    "attention_distance": "attention_distance:run",  # Figs 3, 4, C.5, C.6
    "receptive_field": "receptive_field:run",        # Figs 6, C.1-C.4
    "skip_norms": "skip_norms:run",                  # Figs 7, E.1, E.2
    "skip_removal": "skip_removal:run",              # Fig 8
    "probe": "probes:run",                           # Figs 11, 13, D.4, F.1-F.3
}

NAMES = tuple(_REGISTRY)


def _module(name: str):
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, NAMES, n=3, cutoff=0.4)
    raise KeyError(f"unknown analysis {name!r}; did you mean {close}? known: {list(NAMES)}")
  module_name, fn_name = _REGISTRY[name].split(":")
  return importlib.import_module(f"vit_analysis.analyses.{module_name}"), fn_name


def get(name: str) -> Callable[[Context, ml_collections.ConfigDict], AnalysisResult]:
  """The analysis function registered as `name`: `run(ctx, cfg) -> AnalysisResult`.

  Raises:
    KeyError: naming the unknown analysis and the closest known names.
  """
  module, fn_name = _module(name)
  return getattr(module, fn_name)


def default_config(name: str) -> ml_collections.ConfigDict:
  """Every option of analysis `name` with its default: the one place its defaults live.

  Config files start from it and override what differs (`config.cka_intra =
  analyses.default_config('cka_intra')`), so every option can also be set on the command line.
  """
  module, _ = _module(name)
  return module.default_config()


def __getattr__(name: str):
  # `base` imports JAX and Flax; importing it lazily keeps `vit_analysis.report.findings` (and
  # with it the report, which reads only saved results) free of both.
  if name in ("AnalysisResult", "Context", "LoadedModel"):
    from vit_analysis.analyses import base  # pylint: disable=g-import-not-at-top
    return getattr(base, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AnalysisResult", "Context", "LoadedModel", "NAMES", "default_config", "get"]
