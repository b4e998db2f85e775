"""Interactive figures for the report: pure functions from saved result arrays to plotly figures.

Library: plotly (plotly.js, MIT, released every few weeks). One `report.html` must open offline
and be mailed around, so the JavaScript is inlined once per page (`plotly_script()`, ~4.8 MB
minified) and every figure is a small `Plotly.newPlot` call on a JSON spec; nothing is fetched.
Plotly's heatmaps hover, zoom and pan on 150 x 150 grids without a server (Bokeh needs its own
resources per document and a bigger JSON per glyph; Altair/Vega-Lite draws a 150 x 150 grid as
22,500 marks). The Python package is used only for its bundled JavaScript: the builders here
return plain plotly.js figure dicts (`{'data': [...], 'layout': {...}}`), which are fast to build
for large grids and which `plotly.graph_objects.Figure(fig)` validates in the tests.

Numbers are written with 4 significant digits (`to_json`), NaN and Inf as `null` (a gap), so a
pair of 150 x 150 CKA grids with three hover fields each costs ~2 MB of page.

Heatmap rows run bottom-to-top (row 0 at the bottom-left corner), as in the static figures.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from plotly.offline import get_plotlyjs

from vit_analysis.models import layers as layers_lib

SIGNIFICANT_DIGITS = 4
CONFIG = {"displaylogo": False, "responsive": True, "scrollZoom": False,
          "modeBarButtonsToRemove": ["sendDataToCloud"]}
# matplotlib's magma (the static figures' map), which plotly.js does not ship by name.
MAGMA = [[i / 9, c] for i, c in enumerate(
    ["#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668",
     "#feca8d", "#fcfdbf"])]
_FONT = {"family": "-apple-system,Segoe UI,Helvetica,Arial,sans-serif", "size": 11}


# ----------------------------------------------------------------------------------------------
# Serialisation.


def _array_json(a: np.ndarray) -> str:
  if a.dtype.kind in "USO":
    return json.dumps(np.asarray(a, dtype=object).tolist(), default=str)
  if a.dtype.kind == "b":
    flat = np.where(a.ravel(), "true", "false")
  elif a.dtype.kind in "iu":
    flat = a.ravel().astype(str)
  else:
    f = np.asarray(a, np.float64).ravel()
    flat = np.char.mod(f"%.{SIGNIFICANT_DIGITS}g", np.where(np.isfinite(f), f, 0.0))
    flat = np.where(np.isfinite(f), flat, "null")
  flat = flat.tolist()

  def nest(start: int, shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
      return "[" + ",".join(flat[start:start + shape[0]]) + "]"
    step = math.prod(shape[1:])
    return "[" + ",".join(nest(start + i * step, shape[1:]) for i in range(shape[0])) + "]"

  return nest(0, a.shape) if a.ndim else flat[0]


def to_json(obj: Any) -> str:
  """Compact JSON of a figure spec: arrays and floats at 4 significant digits, NaN/Inf -> null."""
  if isinstance(obj, np.ndarray):
    return _array_json(obj)
  if isinstance(obj, (bool, np.bool_)):
    return "true" if obj else "false"
  if isinstance(obj, (int, np.integer)):
    return str(int(obj))
  if isinstance(obj, (float, np.floating)):
    return _array_json(np.asarray(float(obj)))
  if isinstance(obj, Mapping):
    return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in obj.items()) + "}"
  if isinstance(obj, (list, tuple)):
    if obj and all(isinstance(v, (float, int, np.number)) and not isinstance(v, bool)
                   for v in obj):
      return _array_json(np.asarray(obj, np.float64))
    return "[" + ",".join(to_json(v) for v in obj) + "]"
  if obj is None:
    return "null"
  return json.dumps(str(obj))


def plotly_script() -> str:
  """The plotly.js bundle as one inline `<script>` element (include once per page)."""
  return "<script>" + get_plotlyjs() + "</script>"


def figure_div(fig: Mapping[str, Any], div_id: str, *, height: int | None = None) -> str:
  """`fig` as a `<div>` plus the inline script that draws it (needs `plotly_script()` first)."""
  if not div_id.replace("-", "").replace("_", "").isalnum():
    raise ValueError(f"div id must be alphanumeric with - or _, got {div_id!r}")
  height = height or int(fig.get("layout", {}).get("height", 420))
  spec = f"{to_json(fig['data'])},{to_json(fig['layout'])},{to_json(CONFIG)}"
  return (f"<div class='plot' id='{html.escape(div_id)}' style='height:{height}px'></div>"
          f"<script>Plotly.newPlot('{div_id}',{spec});</script>")


# ----------------------------------------------------------------------------------------------
# Heatmaps.


def _ticks(names: Sequence[str], max_labels: int = 24) -> dict[str, Any]:
  """Category ticks: every name when few, else the first layer of each block / unit."""
  names = list(names)
  if len(names) <= max_labels:
    return {"tickvals": names, "ticktext": names}
  groups = [layers_lib.parse(n).group for n in names]
  starts = [i for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
  step = max(1, math.ceil(len(starts) / max_labels))
  starts = starts[::step]
  return {"tickvals": [names[i] for i in starts], "ticktext": [groups[i] for i in starts]}


def _check_fields(z: np.ndarray, fields: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
  out = {}
  for name, value in (fields or {}).items():
    if value is None:
      continue
    value = np.asarray(value, np.float64)
    if value.shape != z.shape:
      raise ValueError(f"hover field {name!r} has shape {value.shape}, the heatmap {z.shape}")
    out[name] = value
  return out


def _scale(name: str | list) -> str | list:
  return MAGMA if name == "magma" else name


def heatmap(z: np.ndarray, *, row_names: Sequence[str], col_names: Sequence[str],
            title: str = "", row_title: str = "", col_title: str = "", value_name: str = "value",
            fields: Mapping[str, np.ndarray | None] | None = None, zmin: float | None = None,
            zmax: float | None = None, colorscale: str | list = "magma", height: int = 560,
            square: bool = False) -> dict[str, Any]:
  """A heatmap `z: [rows, cols]` whose hover shows both full names, the value and `fields`.

  Args:
    z: the cell values; NaN cells are drawn blank.
    row_names, col_names: one full name per row / column (shown on hover; ticks are thinned to
      block boundaries when there are many).
    fields: extra per-cell arrays of z's shape shown on hover in order (e.g. the standard error
      over minibatches, the spread over repeats, a null z-score); None entries are skipped.
    zmin, zmax: fixed colour range (CKA: 0, 1); None = from the data.
    square: equal scale on both axes (intra-model grids).
  """
  z = np.asarray(z, np.float64)
  if z.ndim != 2 or z.shape != (len(row_names), len(col_names)):
    raise ValueError(f"heatmap z has shape {z.shape}, names give "
                     f"({len(row_names)}, {len(col_names)})")
  fields = _check_fields(z, fields)
  # Rows and columns of one model's grid are told apart by position, not by the model's name.
  row_label, col_label = ((f"row ({row_title})", f"column ({col_title})")
                          if row_title == col_title or not (row_title and col_title)
                          else (row_title, col_title))
  hover = [f"{html.escape(row_label)}: %{{y}}", f"{html.escape(col_label)}: %{{x}}",
           f"{html.escape(value_name)}: %{{z:.4~g}}"]
  trace: dict[str, Any] = {"type": "heatmap", "z": z, "x": list(map(str, col_names)),
                           "y": list(map(str, row_names)), "colorscale": _scale(colorscale),
                           "zmin": zmin, "zmax": zmax, "hoverongaps": False,
                           "colorbar": {"thickness": 12}}
  if fields:
    trace["customdata"] = np.stack(list(fields.values()), axis=-1)
    hover += [f"{html.escape(k)}: %{{customdata[{i}]:.3~g}}" for i, k in enumerate(fields)]
  trace["hovertemplate"] = "<br>".join(hover) + "<extra></extra>"
  trace = {k: v for k, v in trace.items() if v is not None}
  layout: dict[str, Any] = {
      "title": {"text": html.escape(title), "font": {"size": 13}}, "height": height,
      "font": _FONT, "margin": {"l": 70, "r": 20, "t": 40, "b": 60},
      "xaxis": {"title": {"text": html.escape(col_title)}, "type": "category",
                "tickangle": -45, "automargin": True, **_ticks(col_names)},
      "yaxis": {"title": {"text": html.escape(row_title)}, "type": "category", "automargin": True,
                **_ticks(row_names)}}
  if square:
    layout["yaxis"]["scaleanchor"] = "x"
  return {"data": [trace], "layout": layout}


def cka_heatmap(mean: np.ndarray, names_a: Sequence[str], names_b: Sequence[str], *,
                stderr: np.ndarray | None = None, spread: np.ndarray | None = None,
                null_z: np.ndarray | None = None,
                extra: Mapping[str, np.ndarray | None] | None = None, title: str = "",
                model_a: str = "", model_b: str = "", measure: str = "CKA",
                value_range: tuple[float | None, float | None] = (0.0, 1.0),
                colorscale: str = "magma") -> dict[str, Any]:
  """A CKA (or other similarity measure) grid of one saved comparison.

  Args:
    mean: [A, B] value over repeats; rows are `names_a` (model_a), columns `names_b`.
    stderr: [A, B] standard error over minibatches (e.g. the mean over repeats of the per-repeat
      jackknife error).
    spread: [A, B] standard deviation over repeats (None for one repeat).
    null_z: [A, B] z-score of the value against a shuffle null, when the run computed one.
    extra: more per-cell hover fields, name -> [A, B].
    value_range: the colour range (None: from the data).
    colorscale: 'magma' (a similarity) or a diverging scale such as 'RdBu' (centred at 0).
  """
  fields = {"stderr (minibatches)": stderr, "std over repeats": spread, "null z": null_z}
  fields.update(extra or {})
  return heatmap(mean, row_names=names_a, col_names=names_b, title=title,
                 row_title=model_a or "rows", col_title=model_b or "columns", value_name=measure,
                 fields=fields, zmin=value_range[0], zmax=value_range[1], colorscale=colorscale,
                 square=list(names_a) == list(names_b))


def difference_heatmap(a: np.ndarray, b: np.ndarray, names_a: Sequence[str],
                       names_b: Sequence[str], *, label_a: str, label_b: str, title: str = "",
                       measure: str = "CKA") -> dict[str, Any]:
  """`a - b` of one comparison in two runs (same rows and columns), both values on hover."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"difference of grids of shapes {a.shape} and {b.shape}")
  d = a - b
  finite = np.abs(d[np.isfinite(d)])
  bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
  return heatmap(d, row_names=names_a, col_names=names_b, title=title, row_title="rows",
                 col_title="columns", value_name=f"{measure} {label_a} - {label_b}",
                 fields={f"{measure} {label_a}": a, f"{measure} {label_b}": b},
                 zmin=-bound, zmax=bound, colorscale="RdBu", square=list(names_a) == list(names_b))


def grid_maps(maps: np.ndarray, *, panel_titles: Sequence[str], title: str = "",
              value_name: str = "value", fields: Mapping[str, np.ndarray | None] | None = None,
              marks: Sequence[tuple[int, int] | None] | None = None, zmin: float | None = None,
              zmax: float | None = None, colorscale: str | list = "magma", columns: int = 4,
              hover_prefix: Sequence[str] | None = None) -> dict[str, Any]:
  """Small multiples of spatial grids `maps: [K, g, g]` (localisation, per-token probes).

  Args:
    maps: K grids; cell (r, c) is grid row r (drawn top-down, as the image), column c.
    panel_titles: K titles.
    fields: extra hover fields of shape [K, g, g].
    marks: per panel, an (r, c) cell marked with a cross (the token's own position), or None.
    hover_prefix: per panel, a line shown first on hover (e.g. 'token (2, 1)').
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim != 3:
    raise ValueError(f"grid_maps needs [K, g, g] maps, got shape {maps.shape}")
  k = maps.shape[0]
  if len(panel_titles) != k:
    raise ValueError(f"{k} maps but {len(panel_titles)} panel titles")
  fields = _check_fields(maps, fields)
  cols = min(columns, k)
  rows = -(-k // cols)
  gap = 0.06
  data, layout = [], {"title": {"text": html.escape(title), "font": {"size": 13}},
                      "height": 60 + 240 * rows, "font": _FONT, "annotations": [],
                      "margin": {"l": 40, "r": 20, "t": 60, "b": 30}, "showlegend": False}
  for i in range(k):
    r, c = divmod(i, cols)
    ax = "" if i == 0 else str(i + 1)
    x0 = c / cols + (gap / 2 if c else 0)
    x1 = (c + 1) / cols - gap / 2
    y1 = 1 - r / rows - (0.08 if r else 0)
    y0 = 1 - (r + 1) / rows + 0.08
    prefix = f"{html.escape(hover_prefix[i])}<br>" if hover_prefix else ""
    hover = [prefix + "row %{y}, col %{x}", f"{html.escape(value_name)}: %{{z:.4~g}}"]
    trace = {"type": "heatmap", "z": maps[i], "xaxis": f"x{ax}", "yaxis": f"y{ax}",
             "colorscale": _scale(colorscale),
             "zmin": zmin if zmin is not None else np.nanmin(maps),
             "zmax": zmax if zmax is not None else np.nanmax(maps), "showscale": i == k - 1,
             "hoverongaps": False, "colorbar": {"thickness": 12}}
    if fields:
      trace["customdata"] = np.stack([v[i] for v in fields.values()], axis=-1)
      hover += [f"{html.escape(n)}: %{{customdata[{j}]:.3~g}}" for j, n in enumerate(fields)]
    trace["hovertemplate"] = "<br>".join(hover) + "<extra></extra>"
    data.append(trace)
    if marks and marks[i] is not None:
      data.append({"type": "scatter", "x": [marks[i][1]], "y": [marks[i][0]], "mode": "markers",
                   "marker": {"symbol": "x", "color": "red", "size": 10}, "hoverinfo": "skip",
                   "xaxis": f"x{ax}", "yaxis": f"y{ax}"})
    layout[f"xaxis{ax}"] = {"domain": [x0, x1], "anchor": f"y{ax}", "constrain": "domain"}
    layout[f"yaxis{ax}"] = {"domain": [y0, y1], "anchor": f"x{ax}", "autorange": "reversed",
                            "scaleanchor": f"x{ax}", "constrain": "domain"}
    layout["annotations"].append({"text": html.escape(panel_titles[i]), "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": (x0 + x1) / 2,
                                  "y": y1 + 0.01, "yanchor": "bottom", "font": {"size": 11}})
  return {"data": data, "layout": layout}


def localization_maps(mean: np.ndarray, grid: int, tokens: Sequence[tuple[int, int]], *,
                      stderr: np.ndarray | None = None, spread: np.ndarray | None = None,
                      title: str = "", vmax: float | None = 1.0) -> dict[str, Any]:
  """CKA(token (r, c), input patch (r', c')) maps for the chosen tokens (Figs 9, 10).

  Args:
    mean: [g*g tokens, g*g patches] (row-major positions; NaN for left-out constant patches).
    stderr, spread: same shape, shown on hover.
  """
  mean = np.asarray(mean, np.float64)
  n = grid * grid
  if mean.shape != (n, n):
    raise ValueError(f"localisation matrix has shape {mean.shape}, a {grid}x{grid} grid needs "
                     f"({n}, {n})")
  rows = [r * grid + c for r, c in tokens]
  pick = lambda m: None if m is None else np.asarray(m, np.float64)[rows].reshape(-1, grid, grid)
  return grid_maps(pick(mean), panel_titles=[f"token ({r}, {c})" for r, c in tokens],
                   title=title, value_name="CKA", marks=list(tokens), zmin=0.0, zmax=vmax,
                   fields={"stderr (minibatches)": pick(stderr), "std over repeats": pick(spread)},
                   hover_prefix=[f"token ({r}, {c}) vs input patch" for r, c in tokens])


def token_grids(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], *,
                title: str = "per-token probe accuracy") -> dict[str, Any]:
  """Per-token probe accuracy grids (Fig D.4): rows of (model label, [(layer, [g, g])])."""
  panels = [(label, layer, np.asarray(g, np.float64)) for label, grids in rows
            for layer, g in grids]
  if not panels:
    raise ValueError("token_grids needs at least one grid")
  shapes = {p[2].shape for p in panels}
  if len(shapes) > 1:  # Small multiples need one grid shape: pad smaller grids with NaN.
    side = max(max(s) for s in shapes)
    padded = []
    for label, layer, g in panels:
      full = np.full((side, side), np.nan)
      full[:g.shape[0], :g.shape[1]] = g
      padded.append((label, layer, full))
    panels = padded
  return grid_maps(np.stack([100 * p[2] for p in panels]),
                   panel_titles=[f"{p[0]}: {p[1]}" for p in panels], title=title,
                   value_name="accuracy (%)", colorscale="Viridis", columns=5,
                   hover_prefix=[f"{p[0]} {p[1]}" for p in panels])


# ----------------------------------------------------------------------------------------------
# Line plots.


def lines(series: Sequence[Mapping[str, Any]], *, title: str = "", x_title: str = "",
          y_title: str = "", log_y: bool = False, y_range: Sequence[float] | None = None,
          references: Mapping[str, float] | None = None, mode: str = "lines+markers",
          height: int = 420) -> dict[str, Any]:
  """Line plot; each series is a dict with 'label', 'y', and optional 'x', 'err', 'names'.

  'names' are per-point full names shown on hover (e.g. layer names on a numeric depth axis);
  'err' is drawn as error bars; `references` draws labelled horizontal dashed lines.
  """
  data = []
  for s in series:
    y = np.asarray(s["y"], np.float64)
    x = np.arange(len(y)) if s.get("x") is None else np.asarray(s["x"])
    if x.shape != y.shape:
      raise ValueError(f"series {s['label']!r}: x has shape {x.shape}, y {y.shape}")
    trace: dict[str, Any] = {"type": "scatter", "mode": s.get("mode", mode), "x": x, "y": y,
                             "name": html.escape(str(s["label"]))}
    hover = [html.escape(str(s["label"])), f"{html.escape(x_title or 'x')}: %{{x}}",
             f"{html.escape(y_title or 'y')}: %{{y:.4~g}}"]
    if s.get("names") is not None:
      names = list(map(str, s["names"]))
      if len(names) != len(y):
        raise ValueError(f"series {s['label']!r}: {len(names)} names for {len(y)} points")
      trace["text"] = names
      hover.insert(1, "%{text}")
    if s.get("err") is not None:
      err = np.asarray(s["err"], np.float64)
      if err.shape != y.shape:
        raise ValueError(f"series {s['label']!r}: err has shape {err.shape}, y {y.shape}")
      trace["error_y"] = {"type": "data", "array": err, "visible": True, "thickness": 1}
      hover.append("± %{error_y.array:.3~g}")
    trace["hovertemplate"] = "<br>".join(hover) + "<extra></extra>"
    data.append(trace)
  shapes, annotations = [], []
  for label, value in (references or {}).items():
    shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": value, "y1": value,
                   "line": {"dash": "dash", "color": "#888", "width": 1}})
    annotations.append({"text": html.escape(label), "xref": "paper", "x": 1, "y": value,
                        "xanchor": "right", "yanchor": "bottom", "showarrow": False,
                        "font": {"size": 10, "color": "#666"}})
  xaxis: dict[str, Any] = {"title": {"text": html.escape(x_title)}}
  xs = np.concatenate([np.asarray(t["x"], np.float64).ravel() for t in data]) if data else []
  if len(xs) and np.all(xs == np.round(xs)) and np.ptp(xs) <= 40:
    xaxis["dtick"] = 1  # blocks and layer indices: integer ticks
  yaxis: dict[str, Any] = {"title": {"text": html.escape(y_title)}}
  if log_y:
    yaxis["type"] = "log"
  if y_range is not None:
    yaxis["range"] = list(y_range)
  return {"data": data, "layout": {
      "title": {"text": html.escape(title), "font": {"size": 13}}, "height": height,
      "font": _FONT, "margin": {"l": 60, "r": 20, "t": 40, "b": 50}, "hovermode": "closest",
      "xaxis": xaxis, "yaxis": yaxis, "shapes": shapes,
      "annotations": annotations}}


def attention_distances(distances: Mapping[str, np.ndarray], *,
                        uniform: Mapping[str, float] | None = None,
                        unit: str = "pixels") -> dict[str, Any]:
  """Mean attention distance of every head against block (Figs 3, 4): `label -> [blocks, heads]`.

  One point per head (hover: block, head, distance), the models side by side within a block;
  the dashed lines are the distances of uniform attention (the ceiling).
  """
  series = []
  width = 0.3 if len(distances) > 1 else 0.0
  for i, (label, d) in enumerate(distances.items()):
    d = np.asarray(d, np.float64)
    if d.ndim != 2:
      raise ValueError(f"{label}: distances must be [blocks, heads], got shape {d.shape}")
    blocks, heads = np.meshgrid(np.arange(d.shape[0]), np.arange(d.shape[1]), indexing="ij")
    shift = width * (i / max(len(distances) - 1, 1) - 0.5) if width else 0.0
    series.append({"label": label, "x": blocks.ravel() + shift, "y": d.ravel(),
                   "mode": "markers",
                   "names": [f"block {b}, head {h}" for b, h in zip(blocks.ravel(),
                                                                   heads.ravel())]})
  refs: dict[float, list[str]] = {}
  for k, v in (uniform or {}).items():  # one line per distinct ceiling
    refs.setdefault(round(float(v), 3), []).append(k)
  fig = lines(series, title="mean attention distance per head", x_title="block",
              y_title=f"distance ({unit})", mode="markers",
              references={f"uniform attention: {', '.join(ks)}": v for v, ks in refs.items()})
  fig["layout"]["xaxis"]["dtick"] = 1
  return fig


def depth_lines(curves: Mapping[str, np.ndarray], *,
                names: Mapping[str, Sequence[str]] | None = None,
                errors: Mapping[str, np.ndarray] | None = None, title: str = "",
                y_title: str = "", x_title: str = "block", log_y: bool = False,
                normalise_x: bool = False, y_range: Sequence[float] | None = None,
                x: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
  """One value per layer or block for several curves: skip ratios (Fig 7), probes by layer
  (Figs 11, 13), per-block CKA against a reference (Fig 12).

  Args:
    curves: label -> [layers] values.
    names: label -> full layer names (hover).
    errors: label -> [layers] error bars (std over seeds or repeats).
    normalise_x: x = layer index / (layers - 1) in [0, 1], to overlay models of different depth.
    x: label -> explicit x positions (overrides the layer index; e.g. where a curve holds only
      some of a model's layers).
  """
  series = []
  for label, y in curves.items():
    y = np.asarray(y, np.float64)
    pos = np.arange(len(y), dtype=np.float64)
    if normalise_x and len(y) > 1:
      pos = pos / (len(y) - 1)
    if x is not None and label in x:
      pos = np.asarray(x[label], np.float64)
    series.append({"label": label, "x": pos, "y": y, "err": (errors or {}).get(label),
                   "names": (names or {}).get(label)})
  return lines(series, title=title, x_title="normalised layer" if normalise_x else x_title,
               y_title=y_title, log_y=log_y, y_range=y_range)


def head_subset_lines(subset_distance: np.ndarray, cka: np.ndarray, layer_names: Sequence[str],
                      *, error: np.ndarray | None = None, title: str = "") -> dict[str, Any]:
  """CKA of head subsets (x: the subset's mean attention distance) with each other layer (Fig 5).

  Args:
    subset_distance: [S]; cka, error: [layers, S].
  """
  cka = np.asarray(cka, np.float64)
  if cka.shape != (len(layer_names), len(subset_distance)):
    raise ValueError(f"cka has shape {cka.shape}, expected ({len(layer_names)}, "
                     f"{len(subset_distance)})")
  return lines([{"label": n, "x": np.asarray(subset_distance, np.float64), "y": cka[i],
                 "err": None if error is None else np.asarray(error)[i]}
                for i, n in enumerate(layer_names)],
               title=title, x_title="mean distance of the subset's heads", y_title="CKA")


def zoo_grid(grids: Mapping[tuple[int, int], np.ndarray], model_names: Sequence[str], *,
             title: str = "", height: int = 0) -> dict[str, Any]:
  """Every grid of a CKA zoo as one N x N panel figure (shared [0, 1] colour range).

  Args:
    grids: {(i, j): [A_i, A_j] mean CKA} of model i's layers (rows) against model j's (columns);
      missing panels are left blank.
    model_names: the N model names (row and column labels of the panel grid).
    title: figure title.
    height: pixels (default: 190 per panel row).
  """
  n = len(model_names)
  gap = 0.02
  size = (1.0 - gap * (n - 1)) / n
  data, layout = [], {"title": {"text": html.escape(title), "font": {"size": 13}},
                      "height": height or 120 + 190 * n, "font": _FONT,
                      "margin": {"l": 90, "r": 20, "t": 40, "b": 90}}
  for (i, j), z in sorted(grids.items()):
    k = i * n + j + 1
    z = np.asarray(z, np.float64)
    # Row i from the top, rows of each panel from the bottom (layer 0 at the corner).
    x0, y0 = j * (size + gap), 1.0 - (i + 1) * size - i * gap
    data.append({"type": "heatmap", "z": z, "xaxis": f"x{k}", "yaxis": f"y{k}",
                 "colorscale": "Magma", "zmin": 0.0, "zmax": 1.0, "showscale": not data,
                 "colorbar": {"thickness": 12},
                 "hovertemplate": (f"{html.escape(model_names[i])} layer %{{y}}<br>"
                                   f"{html.escape(model_names[j])} layer %{{x}}<br>"
                                   "CKA: %{z:.4~g}<extra></extra>")})
    layout[f"xaxis{k}"] = {"domain": [x0, x0 + size], "anchor": f"y{k}", "showticklabels": False,
                           "title": {"text": html.escape(model_names[j]) if i == n - 1 else ""}}
    layout[f"yaxis{k}"] = {"domain": [max(y0, 0.0), y0 + size], "anchor": f"x{k}",
                           "showticklabels": False,
                           "title": {"text": html.escape(model_names[i]) if j == 0 else ""}}
  return {"data": data, "layout": layout}
