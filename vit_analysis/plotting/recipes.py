"""Figure recipes: every static figure as a plotting function plus its saved arguments.

An analysis draws a static figure with `Context.save_figure(name, plot, **args)`, where `plot`
is a public function of a `vit_analysis.plotting` module (arrays in, a matplotlib Figure out).
Beside the figure files it saves the recipe under the run's results (`Layout.recipe`):

  results/recipes/<name>.npz   the array arguments (no pickles)
  results/recipes/<name>.json  {"plot": "vit_analysis.plotting.<module>:<function>",
                                "args": the other arguments, arrays as {"__array__": key},
                                "formats": ["png", "pdf"]}   (written last)

The figure is drawn from the recipe as saved (encoded, then decoded), so a figure redrawn later
from `results/` alone looks the same: `python -m vit_analysis.report` redraws every missing
`figures/<name>.png` (local or `gs://`) with `redraw` and writes it back with `write_figure`.
Only functions of `vit_analysis.plotting` may be named by a recipe: a results folder is data,
and a recipe naming anything else is refused.
No JAX here (the report imports it).
"""
from __future__ import annotations

import importlib
import inspect
import io
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np

from vit_analysis.runtime import workdir as workdir_lib

PACKAGE = "vit_analysis.plotting"
_NAME = re.compile(r"vit_analysis\.plotting(\.[a-z][a-z0-9_]*)?:[a-z][A-Za-z0-9_]*")
# Public functions of the package that are not figures of arrays (they draw on given Axes).
_NOT_PLOTS = frozenset({"heatmap"})
_ARRAY = "__array__"


class RecipeError(ValueError):
  """A recipe that is missing, malformed, or names a function outside `vit_analysis.plotting`."""


def resolve(name: str) -> Callable[..., matplotlib.figure.Figure]:
  """The plotting function named `'vit_analysis.plotting.<module>:<function>'`.

  Raises:
    RecipeError: when `name` is not of that form, names a private or non-figure function, or the
      module / function does not exist.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise RecipeError(f"recipe plot {name!r} is not a function of {PACKAGE} (expected "
                      f"'{PACKAGE}.<module>:<function>'); refusing to call it")
  module_name, fn_name = name.split(":")
  if fn_name in _NOT_PLOTS:
    raise RecipeError(f"recipe plot {name!r} is not a figure function of {PACKAGE}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise RecipeError(f"recipe plot {name!r}: no module {module_name} ({e})") from e
  fn = getattr(module, fn_name, None)
  # Defined in that module (not imported into it), so that a name resolves to plotting code only.
  if not inspect.isfunction(fn) or fn.__module__ != module_name:
    raise RecipeError(f"recipe plot {name!r}: {module_name} defines no function {fn_name!r}")
  return fn


def name_of(plot: Callable[..., Any]) -> str:
  """`'<module>:<function>'` of a plotting function, checked by `resolve`.

  Raises:
    RecipeError: for a lambda, a method or a function outside `vit_analysis.plotting`.
  """
  name = f"{getattr(plot, '__module__', '?')}:{getattr(plot, '__name__', repr(plot))}"
  if resolve(name) is not plot:
    raise RecipeError(f"{name} is not a module-level function of {PACKAGE}")
  return name


def encode(args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`args` as JSON-able values plus the arrays they hold.

  Arrays (NumPy, or anything with `__array__` such as a JAX array) become `{"__array__": key}`
  with the array under `key` in the returned dict; tuples become lists; NumPy scalars Python
  numbers; mappings need string keys.

  Raises:
    TypeError: naming the argument (e.g. `values['rsa']`) that is none of these.
  """
  arrays: dict[str, np.ndarray] = {}

  def walk(x: Any, where: str) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
      return x
    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, Mapping):
      bad = [k for k in x if not isinstance(k, str)]
      if bad:
        raise TypeError(f"figure argument {where}: keys must be strings, got {bad[:3]}")
      if set(x) == {_ARRAY}:
        raise TypeError(f"figure argument {where}: the key {_ARRAY!r} is reserved")
      return {k: walk(v, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
      a = np.asarray(x)
      if a.dtype == object:
        raise TypeError(f"figure argument {where}: an object array cannot be saved")
      key = f"a{len(arrays)}"
      arrays[key] = a
      return {_ARRAY: key}
    raise TypeError(f"figure argument {where}: {type(x).__name__} cannot be saved in a recipe "
                    "(arrays, numbers, strings, None, lists and string-keyed dicts can)")

  return {k: walk(v, k) for k, v in args.items()}, arrays


def decode(spec: Any, arrays: Mapping[str, np.ndarray]) -> Any:
  """The arguments of `encode`'s `spec` with its arrays put back.

  Raises:
    RecipeError: naming an array key absent from `arrays`.
  """
  if isinstance(spec, dict):
    if set(spec) == {_ARRAY}:
      if spec[_ARRAY] not in arrays:
        raise RecipeError(f"recipe array {spec[_ARRAY]!r} absent from its .npz")
      return arrays[spec[_ARRAY]]
    return {k: decode(v, arrays) for k, v in spec.items()}
  if isinstance(spec, list):
    return [decode(v, arrays) for v in spec]
  return spec


def draw(plot: Callable[..., Any], args: Mapping[str, Any]) -> matplotlib.figure.Figure:
  """`plot(**args)`, checked to be a Figure."""
  fig = plot(**args)
  if not isinstance(fig, matplotlib.figure.Figure):
    plt.close("all")
    raise RecipeError(f"{plot.__module__}:{plot.__name__} returned {type(fig).__name__}, not a "
                      "matplotlib Figure")
  return fig


def render(fig: matplotlib.figure.Figure, formats: Sequence[str]) -> dict[str, bytes]:
  """`fig` as the bytes of each format (tight bounding box), in memory; closes `fig`."""
  out = {}
  try:
    for fmt in formats:
      buf = io.BytesIO()
      fig.savefig(buf, bbox_inches="tight", format=fmt)
      out[fmt] = buf.getvalue()
  finally:
    plt.close(fig)
  return out


def write_figure(workdir: str, name: str, files: Mapping[str, bytes]) -> list[str]:
  """Writes `figures/<name>.<fmt>` for each rendered format (one write each); the paths."""
  layout = workdir_lib.Layout(workdir)
  return [workdir_lib.write_bytes(layout.figure(name, fmt), data) for fmt, data in files.items()]


def save(workdir: str, name: str, plot: Callable[..., Any], args: Mapping[str, Any],
         formats: Sequence[str] = ("png", "pdf")) -> list[str]:
  """Saves the recipe of figure `name` under `results/recipes/`, then draws it from the recipe
  and writes `figures/<name>.<fmt>`.

  Args:
    workdir: the run folder (local or `gs://`).
    name: the figure's file name without extension.
    plot: a public figure function of a `vit_analysis.plotting` module.
    args: its keyword arguments (arrays, numbers, strings, None, lists, string-keyed dicts).
    formats: the file formats written, the first one named in the analysis' result.

  Returns:
    The written figure paths, one per format.

  Raises:
    RecipeError: `plot` is not a plotting function. TypeError: an argument cannot be saved.
  """
  if not formats:
    raise ValueError(f"figure {name!r}: no figure formats")
  plot_name = name_of(plot)
  spec, arrays = encode(args)
  layout = workdir_lib.Layout(workdir)
  if arrays:
    workdir_lib.save_npz(layout.recipe(name, ".npz"), **arrays)
  workdir_lib.write_json(layout.recipe(name), dict(plot=plot_name, args=spec,
                                                   formats=list(formats)), indent=None)
  # Drawn from the decoded recipe, so that a redraw from results/ alone gives the same figure.
  return write_figure(workdir, name, render(draw(plot, decode(spec, arrays)), formats))


def load(workdir: str, name: str) -> tuple[Callable[..., Any], dict[str, Any], list[str]]:
  """The plotting function, arguments and formats of figure `name`'s saved recipe.

  Raises:
    RecipeError: the recipe is absent, malformed or names a function outside
      `vit_analysis.plotting`.
  """
  layout = workdir_lib.Layout(workdir)
  path = layout.recipe(name)
  try:
    recipe = workdir_lib.read_json(path)
  except ValueError as e:
    raise RecipeError(f"{path}: not JSON ({e})") from e
  if recipe is None:
    raise RecipeError(f"no recipe {path}")
  if not isinstance(recipe, dict) or not isinstance(recipe.get("args"), dict):
    raise RecipeError(f"{path}: expected {{'plot', 'args', 'formats'}}, got {str(recipe)[:80]}")
  formats = recipe.get("formats") or ["png"]
  if not isinstance(formats, list) or not all(isinstance(f, str) and f.isalnum()
                                               for f in formats):
    raise RecipeError(f"{path}: bad formats {formats!r}")
  plot = resolve(recipe.get("plot"))
  npz = layout.recipe(name, ".npz")
  arrays = workdir_lib.load_npz(npz) if workdir_lib.exists(npz) else {}
  return plot, decode(recipe["args"], arrays), formats


def redraw(workdir: str, name: str) -> dict[str, bytes]:
  """Figure `name` drawn again from its saved recipe: {format: file bytes} (not written).

  Raises:
    RecipeError: the recipe is absent, malformed or refused (see `load`), or drawing it failed.
  """
  plot, args, formats = load(workdir, name)
  try:
    return render(draw(plot, args), formats)
  except RecipeError:
    raise
  except Exception as e:  # e.g. a recipe saved by another version of the plotting function
    plt.close("all")
    raise RecipeError(f"recipe {name!r} ({plot.__module__}:{plot.__name__}) failed to draw: "
                      f"{type(e).__name__}: {e}") from e
