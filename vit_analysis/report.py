"""One self-contained HTML page per workdir: config, models, every figure inline, numbers, timings.

The page has no external resource (no scripts, fonts, stylesheets or image links): figures are
embedded as base64 PNG data URIs, so `report.html` can be mailed, archived or opened offline.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from vit_analysis.analyses.base import AnalysisResult

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
  padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;
  padding-bottom:.2em;margin-top:2em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.caption{color:#333;margin:.4em 0 .8em 0}
.figs img{max-width:min(100%,760px);border:1px solid #eee;margin:.3em 0}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
details{margin:.6em 0}
"""

_ERROR_KEYS = ("std", "se", "stderr", "sem")


def _format_number(x: Any) -> str:
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, int):
    return f"{x:,}"
  if isinstance(x, float):
    if x != x:  # NaN is shown, never hidden: it marks a bug upstream.
      return "NaN"
    return f"{x:.4g}"
  return html.escape(str(x))


def _format_value(value: Any) -> str:
  """A metric value as text: numbers, `mean ± err` dicts, short lists."""
  if isinstance(value, Mapping) and "mean" in value:
    err_key = next((k for k in _ERROR_KEYS if k in value), None)
    if err_key is not None and not isinstance(value["mean"], (list, dict)):
      return f"{_format_number(value['mean'])} ± {_format_number(value[err_key])} ({err_key})"
  if isinstance(value, (list, tuple)):
    shown = ", ".join(_format_value(v) for v in value[:12])
    return f"[{shown}{', …' if len(value) > 12 else ''}]"
  if isinstance(value, Mapping):
    return "{" + ", ".join(f"{html.escape(str(k))}: {_format_value(v)}" for k, v in value.items()) + "}"
  return _format_number(value)


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  rows = []
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    is_error_bar = isinstance(value, Mapping) and "mean" in value and any(
        k in value for k in _ERROR_KEYS)
    if isinstance(value, Mapping) and not is_error_bar:
      rows.extend(_flatten_metrics(value, prefix=f"{name} / "))
    else:
      rows.append((name, value))
  return rows


def _image_tag(workdir: str, relpath: str) -> str:
  path = relpath if os.path.isabs(relpath) else os.path.join(workdir, relpath)
  if not path.lower().endswith(".png"):
    raise ValueError(f"report figures must be PNG files, got {relpath!r}")
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  alt = html.escape(os.path.basename(relpath))
  return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _cell(text: str, numeric: bool = False) -> str:
  return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def render_report(config: Mapping[str, Any], results: Sequence[AnalysisResult],
                  model_summaries: Sequence[Mapping[str, Any]], workdir: str, *,
                  title: str = "vit_analysis report",
                  timings: Mapping[str, float] | None = None) -> str:
  """The report as an HTML string.

  Args:
    config: the run's config as a plain dict (e.g. `config.to_dict()`).
    results: one AnalysisResult per analysis, in run order.
    model_summaries: one dict per model with keys among 'key', 'name', 'params', 'image_size',
      'test_accuracy', 'train_seconds', 'source'.
    workdir: the folder that figure paths are relative to.
    title: page heading.
    timings: stage name -> seconds (training, each analysis, total).
  """
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p class='meta'>Written {now} · workdir <code>{html.escape(workdir)}</code> · "
           f"methods of Raghu et al. (2021), <i>Do Vision Transformers See Like Convolutional "
           f"Neural Networks?</i></p>"]

  toc = ["<a href='#models'>Models</a>"] + [
      f"<a href='#{html.escape(r.name)}'>{html.escape(r.title)}</a>" for r in results] + [
          "<a href='#timings'>Timings</a>", "<a href='#config'>Config</a>"]
  parts.append("<p class='meta'>" + " · ".join(toc) + "</p>")
  parts.append("<h2 id='models'>Models</h2>")
  model_cols = ["key", "name", "params", "image_size", "test_accuracy", "train_seconds", "source"]
  rows = []
  for m in model_summaries:
    row = []
    for col in model_cols:
      value = m.get(col, "")
      if col == "test_accuracy" and isinstance(value, float):
        row.append(_cell(f"{100 * value:.2f}%", numeric=True))
      else:
        row.append(_cell(_format_value(value) if value != "" else "–",
                         numeric=isinstance(value, (int, float))))
    rows.append(row)
  parts.append(_table(model_cols, rows))

  for result in results:
    parts.append(f"<h2 id='{html.escape(result.name)}'>{html.escape(result.title)}</h2>")
    parts.append(f"<p class='caption'>{html.escape(result.caption)}</p>")
    if result.figures:
      parts.append("<div class='figs'>" +
                   "".join(_image_tag(workdir, f) for f in result.figures) + "</div>")
    metric_rows = [[_cell(html.escape(k)), _cell(_format_value(v), numeric=isinstance(v, (int, float)))]
                   for k, v in _flatten_metrics(result.metrics)]
    if metric_rows:
      parts.append(_table(["metric", "value"], metric_rows))
    parts.append(f"<p class='meta'>{result.seconds:.1f} s</p>")

  parts.append("<h2 id='timings'>Timings</h2>")
  stage_times = dict(timings or {})
  for result in results:
    stage_times.setdefault(f"analysis: {result.name}", result.seconds)
  parts.append(_table(["stage", "seconds"], [[_cell(html.escape(k)), _cell(f"{v:.1f}", True)]
                                             for k, v in stage_times.items()]))

  parts.append("<h2 id='config'>Config</h2><details><summary>the run's config</summary><pre>" +
               html.escape(json.dumps(config, indent=2, sort_keys=True, default=str)) +
               "</pre></details>")
  parts.append("</body></html>")
  return "\n".join(parts)


def write_report(workdir: str, config: Mapping[str, Any], results: Sequence[AnalysisResult],
                 model_summaries: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
  """Renders the report and writes `workdir/report.html` atomically; returns its path."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  page = render_report(config, results, model_summaries, workdir, **kwargs)
  path = os.path.join(workdir, "report.html")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(tmp, path)
  return path
