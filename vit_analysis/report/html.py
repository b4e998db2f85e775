"""HTML pieces of the report: style, number formatting, tables (findings, models, metrics).

Pure functions from plain values to HTML strings; `vit_analysis.report` assembles the page.
"""
from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1400px;margin:2em auto;
  padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;
  padding-bottom:.2em;margin-top:2em} h3{font-size:1.05em;margin:1.2em 0 .3em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.shown{background:#e6f4e6} td.notshown{background:#fbe9e7}
td.inconclusive{background:#fff8e1;font-style:italic} td.absent{color:#888}
.caption{color:#333;margin:.4em 0 .8em 0}
.figs img{max-width:min(100%,760px);border:1px solid #eee;margin:.3em 0}
.plot{width:100%;min-width:320px}
.runs{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.note{background:#fff8e1;padding:.4em .8em;border-left:3px solid #f0c36d}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
details{margin:.6em 0}
"""

_ERROR_KEYS = ("std", "se", "stderr", "sem")
# Finding.verdict -> (text, CSS class); None: the needed result is absent.
_VERDICT = {"shown": ("shown", "shown"), "not shown": ("not shown", "notshown"),
            "inconclusive": ("inconclusive", "inconclusive"), None: ("not measured", "absent")}


def format_number(x: Any) -> str:
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, int):
    return f"{x:,}"
  if isinstance(x, float):
    if math.isnan(x):  # NaN is shown, never hidden: it marks a bug upstream.
      return "NaN"
    return f"{x:.4g}"
  return html.escape(str(x))


def format_value(value: Any) -> str:
  """A metric value as text: numbers, `mean ± err` dicts, short lists."""
  if isinstance(value, Mapping) and "mean" in value:
    err_key = next((k for k in _ERROR_KEYS if k in value), None)
    if err_key is not None and not isinstance(value["mean"], (list, dict)):
      return f"{format_number(value['mean'])} ± {format_number(value[err_key])} ({err_key})"
  if isinstance(value, (list, tuple)):
    shown = ", ".join(format_value(v) for v in value[:12])
    return f"[{shown}{', …' if len(value) > 12 else ''}]"
  if isinstance(value, Mapping):
    return "{" + ", ".join(f"{html.escape(str(k))}: {format_value(v)}"
                           for k, v in value.items()) + "}"
  return format_number(value)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  rows = []
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    is_error_bar = isinstance(value, Mapping) and "mean" in value and any(
        k in value for k in _ERROR_KEYS)
    if isinstance(value, Mapping) and not is_error_bar:
      rows.extend(flatten_metrics(value, prefix=f"{name} / "))
    else:
      rows.append((name, value))
  return rows


def image_tag(workdir: str, relpath: str) -> str:
  path = relpath if os.path.isabs(relpath) else os.path.join(workdir, relpath)
  if not path.lower().endswith(".png"):
    raise ValueError(f"report figures must be PNG files, got {relpath!r}")
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  alt = html.escape(os.path.basename(relpath))
  return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def cell(text: str, numeric: bool = False, cls: str = "") -> str:
  classes = " ".join(c for c in ("num" if numeric else "", cls) if c)
  return f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>"


def verdict_cell(verdict: str | None) -> str:
  """'shown', 'not shown', 'inconclusive' or None (not measured), each in its own style."""
  text, cls = _VERDICT[verdict]
  return cell(text, cls=cls)


def findings_table(runs: Sequence[Any]) -> str:
  """The findings table: expectation, threshold, then per run the measured value, the verdict and
  the 95% interval it used, after a count of the verdicts per run."""
  keys = []
  per_run = []
  for run in runs:
    rows = {}
    for f in run.findings:
      k = (f.analysis, f.expectation)
      rows[k] = f
      if k not in keys:
        keys.append(k)
    per_run.append(rows)
  header = ["analysis", "expectation", "threshold"]
  for run in runs:
    prefix = f"{run.label}: " if len(runs) > 1 else ""
    header += [f"{prefix}measured", f"{prefix}verdict", f"{prefix}95% interval"]
  rows = []
  for k in keys:
    first = next(r[k] for r in per_run if k in r)
    row = [cell(f"<a href='#{html.escape(k[0])}'>{html.escape(k[0])}</a>"),
           cell(html.escape(k[1])), cell(html.escape(first.threshold))]
    for r in per_run:
      f = r.get(k)
      row += ([cell(html.escape(f.measured)), verdict_cell(f.verdict),
               cell(html.escape(f.interval))] if f else
              [cell("–"), verdict_cell(None), cell("")])
    rows.append(row)
  counts = []
  for run in runs:
    verdicts = [f.verdict for f in run.findings]
    n, m, k = (verdicts.count(v) for v in ("shown", "not shown", "inconclusive"))
    counts.append(f"{html.escape(run.label)}: {n} shown, {m} not shown, {k} inconclusive "
                  f"of {n + m + k}")
  return ("<p class='meta'>" + " · ".join(counts) + "</p>" + table(header, rows)) if keys else (
      "<p class='meta'>no findings to check: no analysis with checks ran</p>")


def models_table(models: Sequence[Mapping[str, Any]]) -> str:
  cols = ["key", "name", "params", "image_size", "test_accuracy", "train_seconds", "source"]
  rows = []
  for m in models:
    row = []
    for col in cols:
      value = m.get(col, "")
      if col == "test_accuracy" and isinstance(value, float):
        row.append(cell(f"{100 * value:.2f}%", numeric=True))
      else:
        row.append(cell(format_value(value) if value != "" else "–",
                         numeric=isinstance(value, (int, float))))
    rows.append(row)
  return table(cols, rows)


def metrics_table(metrics: Mapping[str, Any]) -> str:
  """An analysis' metrics, nested dicts flattened to 'a / b' rows."""
  rows = [[cell(html.escape(k)), cell(format_value(v), numeric=isinstance(v, (int, float)))]
          for k, v in flatten_metrics(metrics)]
  return table(["metric", "value"], rows)


def seconds_table(stage_times: Mapping[str, float]) -> str:
  return table(["stage", "seconds"], [[cell(html.escape(k)), cell(f"{v:.1f}", True)]
                                      for k, v in stage_times.items()])
