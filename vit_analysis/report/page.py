r"""One self-contained HTML page per workdir, rebuilt from its saved results alone.

  python -m vit_analysis.report --workdir=runs/demo      # rewrites runs/demo/report.html
  python -m vit_analysis.report --workdir=runs/a --compare=runs/b --out=/tmp/a_vs_b.html
  python -m vit_analysis.report --workdir=runs/sweep/seed=0 --compare=seed=1   # two sweep points

The page opens with the paper's findings checked on this run (`vit_analysis.report.findings`),
then the models, then one section per analysis: interactive figures (hover: full layer names,
value, standard error over minibatches, spread over repeats; zoom and pan), the static PNGs the
analysis wrote, and its metrics. A missing PNG is drawn again from its recipe under
`results/recipes/` and written back to `figures/` (`vit_analysis.plotting.recipes`), so the page
is complete from `results/` alone. `--compare` puts two runs side by side and adds difference
heatmaps for the comparisons both saved with the same layer names.

Nothing here imports JAX or builds a model: the page is made from `results/*.json|npz`,
`models.json`, `config.json` and `timings.json`. The plotly.js bundle is inlined once and the
figures are JSON, so the page makes no network request and opens offline.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from vit_analysis.plotting import recipes
from vit_analysis.report import figures as report_figures
from vit_analysis.report import findings, interactive, reader
from vit_analysis.report import html as report_html
from vit_analysis.runtime import workdir as workdir_lib

# ----------------------------------------------------------------------------------------------
# Loading a workdir: `vit_analysis.report.results` (re-exported here as the public names).

as_result = reader.as_result
load_results = reader.load_results


class Run:
  """One workdir's saved state: results, model summaries, config, timings, checked findings."""

  def __init__(self, workdir: str, results: Sequence[Any] | None = None,
               models: Sequence[Mapping[str, Any]] | None = None,
               config: Mapping[str, Any] | None = None,
               timings: Mapping[str, float] | None = None, label: str = ""):
    self.workdir = workdir
    self.label = label or workdir_lib.basename(workdir) or workdir
    self.results = ([as_result(r) for r in results] if results is not None
                    else load_results(workdir))
    self.models = list(models if models is not None else reader.load_models(workdir))
    self.config = dict(config if config is not None
                       else reader.read_json(workdir_lib.Layout(workdir).config, {}))
    self.timings = dict(timings if timings is not None
                        else reader.read_json(workdir_lib.Layout(workdir).timings, {}))
    fnd = findings
    saved = fnd.SavedRun({r["name"]: r["metrics"] for r in self.results}, self.models,
                         workdir=workdir)
    self.findings = fnd.check(saved)

  @property
  def models_by_key(self) -> dict[str, Mapping[str, Any]]:
    return {m["key"]: m for m in self.models if "key" in m}


# ----------------------------------------------------------------------------------------------
# HTML pieces.


class _Ids:

  def __init__(self):
    self.n = 0

  def __call__(self) -> str:
    self.n += 1
    return f"fig-{self.n}"


def _figures_html(run: Run, result: Mapping[str, Any], ids: _Ids) -> str:
  parts = []
  for caption, fig in report_figures.figures(run.workdir, result, run.models_by_key):
    parts.append(f"<h3>{html.escape(caption)}</h3>" + interactive.figure_div(fig, ids()))
  return "".join(parts)


def _png_tag(relpath: str, png: bytes) -> str:
  data = base64.b64encode(png).decode("ascii")
  alt = html.escape(workdir_lib.basename(relpath))
  return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def _image_tag(workdir: str, relpath: str) -> str | None:
  """The PNG `relpath` of the run inlined as an <img>, or None when the file is absent."""
  path = workdir_lib.join(workdir, relpath)
  if not relpath.lower().endswith(".png"):
    raise ValueError(f"report figures must be PNG files, got {relpath!r}")
  if not workdir_lib.exists(path):
    return None
  return _png_tag(relpath, workdir_lib.read_bytes(path))


def _redrawn_tag(workdir: str, relpath: str) -> tuple[str | None, str]:
  """A missing `figures/<name>.png` drawn again from `results/recipes/<name>` and written back
  (every format the analysis wrote): (its <img>, '') or (None or the <img>, what went wrong)."""
  folder, name = posixpath.split(relpath.replace(os.sep, "/"))
  if folder != workdir_lib.FIGURES:
    return None, "not under figures/, so it has no recipe"
  name = name[:-len(".png")]
  try:
    files = recipes.redraw(workdir, name)
  except recipes.RecipeError as e:
    return None, str(e)
  if "png" not in files:
    return None, f"its recipe writes {sorted(files)}, no PNG"
  tag = _png_tag(relpath, files["png"])
  try:
    written = recipes.write_figure(workdir, name, files)
  except OSError as e:  # a read-only workdir: the page still shows the figure
    return tag, f"redrawn from its recipe but not written back ({e})"
  logging.info("report: redrew %s from its recipe", ", ".join(written))
  return tag, ""


def _static_html(run: Run, result: Mapping[str, Any]) -> str:
  pngs = list(result["figures"])
  tags, problems = [], []
  for f in pngs:
    tag = _image_tag(run.workdir, f)
    if tag is None:
      # figures/ may be gone (not copied, deleted): each figure is drawn again from its recipe
      # under results/ (`plotting.recipes`), written back, and inlined.
      tag, problem = _redrawn_tag(run.workdir, f)
      if problem:
        problems.append(f"static figure <code>{html.escape(f)}</code> " +
                        ("" if tag else "absent and not redrawn") + f": {html.escape(problem)}")
    tags.append(tag)
  imgs = "".join(t for t in tags if t)
  out = ""
  if imgs:
    out += (f"<details><summary>static figures ({sum(t is not None for t in tags)} PNG; PDFs "
            f"next to them in figures/)</summary><div class='figs'>{imgs}</div></details>")
  if problems:
    out += ("<p class='note'>" + "; ".join(problems) + ". The interactive figures above are "
            "drawn from results/ and show the same data.</p>")
  if result["metrics"]:
    out += ("<details open><summary>metrics</summary>" +
            report_html.metrics_table(result["metrics"]) + "</details>")
  return out + f"<p class='meta'>{float(result.get('seconds') or 0):.1f} s</p>"


def _section(runs: Sequence[Run], name: str, ids: _Ids) -> str:
  present = [(run, next((r for r in run.results if r["name"] == name), None)) for run in runs]
  first = next(r for _, r in present if r is not None)
  parts = [f"<h2 id='{html.escape(name)}'>{html.escape(first['title'])}</h2>",
           f"<p class='caption'>{html.escape(first['caption'])}</p>"]
  columns = []
  for run, result in present:
    head = f"<h3>{html.escape(run.label)}</h3>" if len(runs) > 1 else ""
    if result is None:
      columns.append(head + "<p class='meta'>not run</p>")
    else:
      columns.append(head + _figures_html(run, result, ids) + _static_html(run, result))
  if len(runs) > 1:
    parts.append("<div class='runs'>" + "".join(f"<div>{c}</div>" for c in columns) + "</div>")
    if all(r is not None for _, r in present):
      figs, notes = report_figures.differences(runs[0].workdir, runs[1].workdir, name,
                                               runs[0].label, runs[1].label)
      for note in notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
      for caption, fig in figs:
        parts.append(f"<h3>difference: {html.escape(caption)}</h3>" +
                     interactive.figure_div(fig, ids()))
  else:
    parts.append(columns[0])
  return "".join(parts)


def _timings_html(run: Run) -> str:
  stage_times = dict(run.timings)
  for result in run.results:
    stage_times.setdefault(f"analysis: {result['name']}", float(result.get("seconds") or 0))
  return report_html.seconds_table(stage_times)


def render_page(runs: Sequence[Run], *, title: str = "vit_analysis report") -> str:
  """The report of one run, or of two runs side by side, as an HTML string."""
  if not 1 <= len(runs) <= 2:
    raise ValueError(f"a report shows one or two runs, got {len(runs)}")
  now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  ids = _Ids()
  dirs = " vs ".join(f"<code>{html.escape(r.workdir)}</code>" for r in runs)
  parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{report_html.CSS}</style>"),
           interactive.plotly_script(), "</head><body>",
           f"<h1>{html.escape(title)}</h1>",
           (f"<p class='meta'>Written {now} · workdir {dirs} · methods of Raghu et al. (2021), "
           f"<i>Do Vision Transformers See Like Convolutional Neural Networks?</i> · hover a "
           f"figure for layer names and error bars; drag to zoom, double-click to reset</p>")]
  names = list(dict.fromkeys(r["name"] for run in runs for r in run.results))
  titles = {r["name"]: r["title"] for run in runs for r in run.results}
  toc = ["<a href='#findings'>Findings</a>", "<a href='#models'>Models</a>"] + [
      f"<a href='#{html.escape(n)}'>{html.escape(titles[n])}</a>" for n in names] + [
          "<a href='#timings'>Timings</a>", "<a href='#config'>Config</a>"]
  parts.append("<p class='meta'>" + " · ".join(toc) + "</p>")
  parts.append("<h2 id='findings'>The paper's findings in this run</h2>" +
               report_html.findings_table(runs))
  parts.append("<h2 id='models'>Models</h2>")
  for run in runs:
    parts.append((f"<h3>{html.escape(run.label)}</h3>" if len(runs) > 1 else "") +
                 report_html.models_table(run.models))
  for name in names:
    parts.append(_section(runs, name, ids))
  parts.append("<h2 id='timings'>Timings</h2>")
  for run in runs:
    parts.append((f"<h3>{html.escape(run.label)}</h3>" if len(runs) > 1 else "") +
                 _timings_html(run))
  parts.append("<h2 id='config'>Config</h2>")
  for run in runs:
    parts.append(f"<details><summary>{html.escape(run.label)}: the run's config</summary><pre>" +
                 html.escape(json.dumps(run.config, indent=2, sort_keys=True, default=str)) +
                 "</pre></details>")
  parts.append("</body></html>")
  return "\n".join(parts)


def render_report(config: Mapping[str, Any], results: Sequence[Any],
                  model_summaries: Sequence[Mapping[str, Any]], workdir: str, *,
                  title: str = "vit_analysis report",
                  timings: Mapping[str, float] | None = None) -> str:
  """The report of results in memory (as `main.run` has them) as an HTML string.

  Args:
    config: the run's config as a plain dict (e.g. `config.to_dict()`).
    results: AnalysisResults (or their JSON dicts), in run order.
    model_summaries: one dict per model with keys among 'key', 'name', 'params', 'image_size',
      'test_accuracy', 'train_seconds', 'source'.
    workdir: the folder that figure paths and `results/` are relative to.
    title: page heading.
    timings: stage name -> seconds (training, each analysis, total).
  """
  run = Run(workdir, results=results, models=model_summaries, config=config,
            timings=timings or {})
  return render_page([run], title=title)


def _write(path: str, text: str) -> str:
  return workdir_lib.write_text(path, text)  # local or gs://, never half a page


def write_report(workdir: str, config: Mapping[str, Any], results: Sequence[Any],
                 model_summaries: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
  """Renders the report and writes `workdir/report.html` atomically; returns its path.

  The timings are also kept in `workdir/timings.json`, so that a rebuilt page shows them.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if kwargs.get("timings"):
    workdir_lib.write_json(workdir_lib.Layout(workdir).timings, dict(kwargs["timings"]))
  page = render_report(config, results, model_summaries, workdir, **kwargs)
  return _write(workdir_lib.Layout(workdir).report, page)


def _is_run(path: str) -> bool:
  return workdir_lib.isdir(workdir_lib.Layout(path).results_dir)


def resolve_compare(workdir: str, compare: str) -> str:
  """The run folder `--compare` names: a workdir, or the name of another point of the sweep
  that `workdir` belongs to (`--workdir=DIR/seed=0 --compare=seed=1`, names as in `DIR/sweep.json`).

  Raises:
    FileNotFoundError: naming the sweep's points when `compare` is neither.
  """
  if _is_run(compare):
    return compare
  sweep_dir = workdir_lib.parent(workdir_lib.absolute(workdir).rstrip("/"))
  index = workdir_lib.read_json(workdir_lib.Layout(sweep_dir).sweep) if sweep_dir else None
  points = {p.get("name"): p.get("workdir", p.get("name")) for p in (index or {}).get("points", [])}
  if compare in points:
    path = workdir_lib.join(sweep_dir, points[compare])
    if _is_run(path):
      return path
  where = (f"; the sweep {sweep_dir} has the points {sorted(points)}" if index else "")
  raise FileNotFoundError(f"--compare={compare!r} is neither a run folder (with results/) nor a "
                          f"point of {workdir!r}'s sweep{where}")


def rebuild(workdir: str, *, compare: str | None = None, out: str | None = None,
            title: str = "vit_analysis report") -> str:
  """Rewrites the page of `workdir` (beside `compare` if given) from saved results alone.

  Returns:
    The written path: `out`, else `workdir/report.html` (one run) or
    `workdir/compare_<label of compare>.html` (two runs).
  """
  runs = [Run(workdir)]
  if compare:
    compare = resolve_compare(workdir, compare)
    runs.append(Run(compare))
    if runs[0].label == runs[1].label:
      runs[0].label, runs[1].label = f"A: {runs[0].label}", f"B: {runs[1].label}"
  if out is None:
    out = workdir_lib.join(workdir, workdir_lib.REPORT if not compare else
                           f"compare_{workdir_lib.basename(compare)}.html")
  return _write(out, render_page(runs, title=title))


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m vit_analysis.report",
      description="Rebuild report.html from a workdir's saved results (no model, no JAX).")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--compare", default=None,
                      help="a second workdir shown side by side, or the name of another point of "
                           "the sweep that --workdir belongs to (e.g. seed=1)")
  parser.add_argument("--out", default=None, help="output path (default: in the workdir)")
  parser.add_argument("--title", default="vit_analysis report")
  args = parser.parse_args(argv)
  path = rebuild(args.workdir, compare=args.compare, out=args.out, title=args.title)
  print(f"{path} ({len(workdir_lib.read_bytes(path)) / 2**20:.1f} MiB)")
  return path

