r"""Entry point: builds the data and the models of a config, then runs its analyses in order.

  python -m vit_analysis.main --config=configs/train_digits.py --workdir=/tmp/digits
  python -m vit_analysis.main --config=configs/train_digits.py:smoke --workdir=/tmp/s \
      --config.train.batch_size=64

All logic lives in `run(config, workdir)`, which Colab calls directly. It checks the config,
the files it names, the data and the workdir (`vit_analysis.options`, `workdir_problems`) and
reports every problem at once before anything is written, builds every entry of
`config.models` (`models.build.ModelBuilder`: checkpoint, then training or the content-hashed
model cache), runs each analysis of `config.analyses` as `run(ctx, cfg)` with its merged
sub-config, saves its summary, and has `vit_analysis.report` write `report.html`. Only process 0
writes files.

The command line ends an expected failure (`runtime.errors`) with one paragraph on stderr and
exit status 1 (2 for a bad override or config argument), Ctrl-C / SIGTERM with "interrupted at
<stage>; rerun the same command to resume" (the stage of an analysis names its stream's repeat
and step) and 130 / 143; `--verbosity=1` or VIT_ANALYSIS_TRACEBACK=1 adds tracebacks. An
analysis that ends early (an interrupt, a corrupt image, any error) first saves its newest
partial state (`runtime.resume.save_unsaved`), so the rerun loses no finished step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from vit_analysis import analyses as analyses_lib
from vit_analysis import options
from vit_analysis.analyses import base
from vit_analysis.input import data as data_lib
from vit_analysis.models import build
from vit_analysis.report import page as report
from vit_analysis.runtime import errors, resume, sharding
from vit_analysis.runtime import progress as progress_lib
from vit_analysis.runtime import workdir as workdir_lib

# What the run is doing, for the message of an interrupted run ("interrupted at <stage>").
_STAGE = ["start-up"]

# Keys that change neither the models nor the results: ignored when comparing configs.
_NON_RESULT_KEYS = ("overwrite", "model_cache", "distributed", "description")


def _result_view(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(options.without_run_only_keys(config).to_json_best_effort(sort_keys=True))
  return {k: v for k, v in d.items() if k not in _NON_RESULT_KEYS}


def workdir_problems(config: ml_collections.ConfigDict, workdir: str) -> list[Exception]:
  """What keeps `workdir` from holding this run's results; writes nothing.

  A folder or a path that can be created (local: the nearest existing parent is a writable
  folder; `gs://`: a bucket path, checked when written), not holding another config's results
  unless `config.overwrite` is True.

  Returns:
    a UserError for a path that cannot be a folder, a ValueError for another config's results.
  """
  if not workdir:
    return [errors.UserError("no --workdir given: pass the folder for models, results, figures "
                             "and the report")]
  if workdir_lib.isfile(workdir):
    return [errors.UserError(f"workdir {workdir!r} is a file, not a folder: pass another "
                             "--workdir or move the file away")]
  if not workdir_lib.is_remote(workdir):
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
      kind = "a folder" if os.path.isdir(existing) else "a file"
      return [errors.UserError(
          f"workdir {workdir!r} cannot be created or written: {existing!r} is {kind} this user "
          "cannot write into; pass another --workdir")]
  view = _result_view(config)
  old = workdir_lib.read_json(workdir_lib.Layout(workdir).config)
  if old is not None and old != view and not config.get("overwrite", False):
    differ = sorted(k for k in set(old) | set(view) if old.get(k) != view.get(k))
    return [ValueError(
        f"workdir {workdir!r} holds results of a different config (keys {differ} differ); "
        "use another --workdir or set --config.overwrite=True")]
  return []


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stores config.json in `workdir`; refuses a workdir that holds a different config.

  Raises:
    ValueError: naming the top-level keys that differ, unless `config.overwrite` is True.
    errors.UserError: for a workdir that is not a folder or cannot be created.
  """
  errors.raise_all(workdir_problems(config, workdir))
  run_dir = workdir_lib.Layout(workdir)
  view = _result_view(config)
  old = workdir_lib.read_json(run_dir.config)
  if old is not None and old != view:
    differ = sorted(k for k in set(old) | set(view) if old.get(k) != view.get(k))
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

  Its partial state (`workdir/partial/<name>`) is removed once the result is saved. When it ends
  early (an interrupt, a corrupt image, any error) its newest partial state is saved first, with
  the files skipped so far (`data.skip_corrupt`), which the rerun lists again. Skipped files go
  into the result's metrics as `skipped_corrupt_files` ({'count', 'files'}).
  """
  t0 = time.time()
  _STAGE[0] = f"analysis {name}"
  progress_lib.at("")
  resume.forget_unsaved()  # only this analysis' partial state is saved if it ends early
  partial = workdir_lib.Layout(ctx.workdir).partial(name)
  skipped_json = workdir_lib.join(partial, "skipped_files.json")
  data_lib.clear_skipped(workdir_lib.read_json(skipped_json) or {})
  logging.info("analysis %s ...", name)
  cfg = options.analysis_config(config, name)
  try:
    result = analyses_lib.get(name)(ctx.for_analysis(name, cfg), cfg)
  except BaseException:
    saved = resume.save_unsaved()
    if saved:
      logging.warning("analysis %s ended early; saved its partial state: %s", name, saved)
    if sharding.is_main_process() and data_lib.skipped_files():
      workdir_lib.write_json(skipped_json, data_lib.skipped_files())
    raise
  finally:
    resume.forget_unsaved()
  skipped = _skipped_on_all_processes(data_lib.skipped_files())
  if skipped:
    logging.warning("analysis %s skipped %d undecodable files: %s", name, len(skipped),
                    list(skipped))
    result.metrics["skipped_corrupt_files"] = {"count": len(skipped), "files": list(skipped)}
  result.seconds = time.time() - t0
  logging.info("analysis %s done in %.1f s: %s", name, result.seconds, result.metrics)
  if sharding.is_main_process():
    base.save_result(ctx, result)
    workdir_lib.rmtree(partial)
  return result


def _skipped_on_all_processes(files: dict[str, int]) -> dict[str, int]:
  """The union of every process' skipped files (each decodes only its own rows); a collective."""
  if jax.process_count() == 1:
    return files
  blob = np.frombuffer(json.dumps(files).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  union: dict[str, int] = {}
  for size, row in zip(sizes, rows):
    union.update(json.loads(bytes(row[:int(size)]).decode()))
  return dict(sorted(union.items()))


def _stage() -> str:
  """Where the run is, for "interrupted at ...": the stage, and inside an analysis its stream."""
  where = progress_lib.where()
  return f"{_STAGE[0]}, {where}" if where and _STAGE[0].startswith("analysis") else _STAGE[0]


def run(config: ml_collections.ConfigDict, workdir: str) -> list[base.AnalysisResult]:
  """Runs the experiment `config` in `workdir`; returns the analyses' results in order.

  First every check that needs no trained model: the config's keys and options, the checkpoint
  files (each one's format, keys and shapes against its model, from the files' headers), the
  data (`data.check_decode`) and the workdir, all problems reported together; nothing is
  written before they pass. A rerun in the same workdir reuses trained models, skips analyses
  whose results are saved and resumes interrupted ones from their partial state
  (`workdir/partial`).
  """
  start = time.time()
  _STAGE[0] = "validation"
  progress_lib.at("")
  with errors.expected(KeyError, ValueError, FileNotFoundError, OSError):
    problems = options.config_problems(config)
    try:
      problems += options.file_problems(config)
    except (KeyError, ValueError, TypeError, AttributeError):
      if not problems:
        raise
      # a config that is malformed where the files are named: its own problems say why
    problems += workdir_problems(config, workdir)
    errors.raise_all(problems)
  sharding.maybe_initialize_distributed(
      {"auto": None, "yes": True, "no": False}[config.get("distributed", "auto")])
  mesh = sharding.make_mesh()
  with errors.expected(KeyError, ValueError, OSError, context="data: "):
    # Without the run-only data keys: checking or skipping files never retrains a model.
    builder = build.ModelBuilder(options.without_run_only_keys(config), workdir, mesh)
    for source in builder.sources.values():
      if isinstance(source, data_lib.FolderSource):
        source.skip_corrupt = bool(config.data.get("skip_corrupt", False))
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
  """absl's flag parsing, with config_flags' errors for an unknown override or a config
  argument the config refuses (`--config=FILE:ARG`) as one line (exit status 2)."""
  problem = options.config_argument_problem(argv)
  if problem:
    errors.report(ValueError(problem), f"error: {problem}", errors.with_traceback(argv))
    sys.exit(2)
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
    status = errors.plain_ending(e, _stage(), errors.with_traceback())
    if status is None:
      raise
    sys.exit(status)
  for r in results:
    logging.info("%s: %s", r.name, r.metrics)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)
