r"""Entry point: builds the data and the models of a config, then runs its analyses in order.

  python -m vit_analysis.main --config=configs/train_digits.py --workdir=/tmp/digits
  python -m vit_analysis.main --config=configs/train_digits.py:smoke --workdir=/tmp/s \
      --config.train.batch_size=64

All logic lives in `run(config, workdir)`, which Colab calls directly. It checks the config
(`vit_analysis.options`), builds every entry of `config.models` (`models.build.ModelBuilder`:
checkpoint, then training or the content-hashed model cache), runs each analysis of
`config.analyses` as `run(ctx, cfg)` with its merged sub-config, saves its summary, and has
`vit_analysis.report` write `report.html`. Only process 0 writes files.

The command line ends an expected failure (`runtime.errors`) with one paragraph on stderr and
exit status 1 (2 for a bad override), Ctrl-C / SIGTERM with "interrupted at <stage>; rerun the
same command to resume" and 130 / 143; `--verbosity=1` or VIT_ANALYSIS_TRACEBACK=1 adds tracebacks.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vit_analysis import analyses as analyses_lib
from vit_analysis import options
from vit_analysis.analyses import base
from vit_analysis.models import build
from vit_analysis.report import page as report
from vit_analysis.runtime import errors, sharding
from vit_analysis.runtime import workdir as workdir_lib

# What the run is doing, for the message of an interrupted run ("interrupted at <stage>").
_STAGE = ["start-up"]

# Keys that change neither the models nor the results: ignored when comparing configs.
_NON_RESULT_KEYS = ("overwrite", "model_cache", "distributed", "description")


def _result_view(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  return {k: v for k, v in d.items() if k not in _NON_RESULT_KEYS}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stores config.json in `workdir`; refuses a workdir that holds a different config.

  Raises:
    ValueError: naming the top-level keys that differ, unless `config.overwrite` is True.
    errors.UserError: for a workdir that is not a folder.
  """
  run_dir = workdir_lib.Layout(workdir)
  if workdir_lib.isfile(workdir):
    raise errors.UserError(f"workdir {workdir!r} is a file, not a folder: pass another --workdir "
                           "or move the file away")
  view = _result_view(config)
  old = workdir_lib.read_json(run_dir.config)
  if old is not None and old != view:
    differ = sorted(k for k in set(old) | set(view) if old.get(k) != view.get(k))
    if not config.get("overwrite", False):
      raise ValueError(
          f"workdir {workdir!r} holds results of a different config (keys {differ} differ); "
          "use another --workdir or set --config.overwrite=True")
    logging.warning("overwriting results of a different config in %s (keys %s)", workdir, differ)
    if sharding.is_main_process():  # none of the other config's results may be reused
      for folder in (workdir_lib.RESULTS, workdir_lib.PARTIAL, workdir_lib.FIGURES):
        workdir_lib.rmtree(run_dir.join(folder))
  if sharding.is_main_process():
    workdir_lib.write_json(run_dir.config, view, sort_keys=True)


def run_analysis(config: ml_collections.ConfigDict, ctx: base.Context,
                 name: str) -> base.AnalysisResult:
  """Runs analysis `name` as `run(ctx, cfg)`, `cfg` its merged sub-config, and saves its
  result (process 0).

  Its partial state (`workdir/partial/<name>`) is removed once the result is saved.
  """
  t0 = time.time()
  _STAGE[0] = f"analysis {name}"
  logging.info("analysis %s ...", name)
  cfg = options.analysis_config(config, name)
  result = analyses_lib.get(name)(ctx.for_analysis(name, cfg), cfg)
  result.seconds = time.time() - t0
  logging.info("analysis %s done in %.1f s: %s", name, result.seconds, result.metrics)
  if sharding.is_main_process():
    base.save_result(ctx, result)
    workdir_lib.rmtree(workdir_lib.Layout(ctx.workdir).partial(name))
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> list[base.AnalysisResult]:
  """Runs the experiment `config` in `workdir`; returns the analyses' results in order.

  A rerun in the same workdir reuses trained models, skips analyses whose results are saved and
  resumes interrupted ones from their partial state (`workdir/partial`).
  """
  start = time.time()
  _STAGE[0] = "validation"
  with errors.expected(KeyError, ValueError, FileNotFoundError):  # printed as one paragraph
    options.validate_config(config)
    options.check_files(config)
  sharding.maybe_initialize_distributed(
      {"auto": None, "yes": True, "no": False}[config.get("distributed", "auto")])
  mesh = sharding.make_mesh()
  with errors.expected(KeyError, ValueError, OSError, context="data: "):
    builder = build.ModelBuilder(config, workdir, mesh)
  # Written only now, once options, files, data and workdir are checked.
  with errors.expected(ValueError, OSError):
    check_workdir(config, workdir)
  models, timings = {}, {}
  for key, entry in config.models.items():
    t0 = time.time()
    _STAGE[0] = f"model {key}"
    with errors.expected(KeyError, ValueError, OSError, context=f"model {key!r}: "):
      models[key] = builder.build(key, entry)
    timings[f"model: {key}"] = time.time() - t0
  ctx = base.Context.for_experiment(config, workdir, models, builder.sources, mesh,
                                    train_fn=builder.build)
  # Decided once, before any analysis runs, so that every process skips the same ones.
  # check_workdir guarantees that the same config produced what is saved.
  run_dir = workdir_lib.Layout(workdir)
  saved = {name: run_dir.result(name) for name in config.get("analyses", ())}
  saved = {name: path for name, path in saved.items() if workdir_lib.exists(path)}
  results = []
  for name in config.get("analyses", ()):
    if name in saved:
      result = base.AnalysisResult.from_json(workdir_lib.read_text(saved[name]))
      logging.info("analysis %s: finished in an earlier run, not recomputed", name)
      results.append(result)
      continue
    results.append(run_analysis(config, ctx, name))
  timings["total"] = time.time() - start
  _STAGE[0] = "report"
  if sharding.is_main_process():
    builder.write_summaries(run_dir.models_json)
    path = report.write_report(workdir, config, results, builder.summaries, timings=timings)
    logging.info("report: %s", path)
  return results


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/NAME.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, results, figures, report.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache folder ('' = off).")


class _QuietOrbax:
  """Drops orbax's INFO chatter (several lines per checkpoint) from the console log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config_flags' error for an unknown override as one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    text = options.override_problem(argv) or errors.message(e)
    errors.report(e, f"error: {text}", errors.with_traceback(argv))
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _COMPILATION_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
  errors.raise_on_sigterm()  # a preemption unwinds like Ctrl-C: periodic saves are kept
  try:
    with errors.expected(OSError, context="--config: "):
      list(_CONFIG.value)  # a config file that failed to load raises only when read
    results = run(_CONFIG.value, _WORKDIR.value)
  except BaseException as e:  # pylint: disable=broad-exception-caught
    status = errors.plain_ending(e, _STAGE[0], errors.with_traceback())
    if status is None:
      raise
    sys.exit(status)
  for r in results:
    logging.info("%s: %s", r.name, r.metrics)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)
