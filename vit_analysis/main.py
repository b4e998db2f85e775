r"""Entry point: builds the data and the models of a config, then runs its analyses in order.

  python -m vit_analysis.main --config=configs/train_digits.py --workdir=/tmp/digits
  python -m vit_analysis.main --config=configs/train_digits.py:smoke --workdir=/tmp/s \
      --config.train.batch_size=64

All logic lives in `run(config, workdir)`, which Colab calls directly. For each entry of
`config.models` it loads the official checkpoint (if any), then trains through
`vit_analysis.train` (if the entry has a `train` sub-config) or restores the cached result: trained
models live under `config.model_cache` (default `<workdir>/models`) in a folder named by a
content hash of what determines their parameters, so re-running resumes or reuses them. Each
analysis in `config.analyses` is looked up by name (`vit_analysis.analyses.get`), run, and its
summary saved; `vit_analysis.report` then writes `report.html`. Only process 0 writes files.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vit_analysis import analyses as analyses_lib
from vit_analysis import config_lib, sharding
from vit_analysis import data as data_lib
from vit_analysis import train as train_lib
from vit_analysis.analyses import base
from vit_analysis.models import create_model

# Keys that change neither the models nor the results: ignored when comparing configs.
_NON_RESULT_KEYS = ("overwrite", "model_cache", "distributed", "description")
_DATA_KEYS = ("name", "image_size", "train_split", "test_split", "data_dir", "channels")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the structure of an experiment config before anything runs.

  Raises:
    KeyError: naming an unknown top-level, data, model or train key, or an unknown analysis.
    ValueError: for a malformed value (e.g. `analyses` not a sequence of names).
  """
  allowed = set(config_lib.TOP_LEVEL_KEYS) | set(analyses_lib.NAMES)
  for key in config:
    if key not in allowed:
      raise KeyError(f"unknown config key {key!r}; allowed: {sorted(config_lib.TOP_LEVEL_KEYS)}"
                     f" or an analysis name {list(analyses_lib.NAMES)}")
  for key in ("data", "models"):
    if key not in config:
      raise KeyError(f"config has no {key!r}")
  for key in config.data:
    if key not in _DATA_KEYS:
      raise KeyError(f"unknown config key 'data.{key}'; allowed: {list(_DATA_KEYS)}")
  names = config.get("analyses", ())
  if isinstance(names, str) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"config.analyses must be a tuple of analysis names, got {names!r}")
  for name in names:
    analyses_lib.get(name)  # KeyError naming it (with close matches) when unknown
  if config.get("distributed", "auto") not in ("auto", "yes", "no"):
    raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got "
                     f"{config.distributed!r}")
  for key, entry in config.models.items():
    validate_model_entry(key, entry, config.get("train"))


def validate_model_entry(key: str, entry: Any, train_defaults: Any = None) -> None:
  """Checks one `config.models[key]` entry (keys, name, train keys).

  An entry with neither a checkpoint nor a train config is a randomly initialised model.

  Raises:
    KeyError: naming an unknown key of the entry or of its train sub-config, or a missing name.
  """
  entry = dict(entry)
  unknown = sorted(set(entry) - set(config_lib.MODEL_KEYS))
  if unknown:
    raise KeyError(f"unknown config key(s) {[f'models.{key}.{u}' for u in unknown]}; "
                   f"allowed: {list(config_lib.MODEL_KEYS)}")
  if not entry.get("name"):
    raise KeyError(f"config.models.{key} has no 'name'")
  if entry.get("train") is not None:
    train_lib.effective_config(train_defaults, entry["train"])


def model_hash(config: ml_collections.ConfigDict, entry: Any) -> str:
  """Content hash of everything that determines a model's parameters and test accuracy."""
  entry = dict(entry)
  train = entry.get("train")
  content = {
      "model": {k: _plain(entry.get(k)) for k in ("name", "num_classes", "checkpoint",
                                                  "checkpoint_options", "overrides")},
      "train": None if train is None else train_lib.effective_config(
          config.get("train"), train).to_dict(),
      "data": _plain(config.data),
      "seed": config.get("seed", 0),
  }
  text = json.dumps(content, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(x: Any) -> Any:
  if isinstance(x, ml_collections.ConfigDict):
    return json.loads(x.to_json_best_effort(sort_keys=True))
  if isinstance(x, (tuple, list)):
    return [_plain(v) for v in x]
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  return x


class ModelBuilder:
  """Builds `LoadedModel`s: official checkpoint → (train | restore from the cache) → accuracy.

  Attributes:
    sources: {'train': source, 'test': source} of `config.data`.
    summaries: one dict per built model, for models.json and the report.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh):
    self.config, self.mesh = config, mesh
    self.cache = config.get("model_cache", "") or os.path.join(workdir, "models")
    self.image_size = int(config.data.image_size)
    self.sources = {
        "train": data_lib.get_source(config.data, config.data.get("train_split", "train")),
        "test": data_lib.get_source(config.data, config.data.get("test_split", "test")),
    }
    self.summaries: list[dict[str, Any]] = []

  def build(self, key: str, entry: Any) -> base.LoadedModel:
    """The model of `config.models[key]`-style `entry` (ConfigDict or dict); also `train_fn`."""
    if not isinstance(entry, ml_collections.ConfigDict):
      entry = ml_collections.ConfigDict(dict(entry))
    validate_model_entry(key, entry, self.config.get("train"))
    t0 = time.time()
    overrides = dict(_plain(entry.get("overrides")) or {})
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    image_size = int(overrides.get("image_size", self.image_size))
    num_classes = entry.get("num_classes") or self.sources["test"].num_classes
    module = create_model(entry.name, num_classes, **overrides)
    if getattr(module, "image_size", image_size) != image_size:
      module = module.clone(image_size=image_size)
    params, source = None, "random init"
    if entry.get("checkpoint"):
      options = dict(_plain(entry.get("checkpoint_options")) or {})
      params = self._load_checkpoint(entry.checkpoint, module, image_size, options)
      source = f"checkpoint {entry.checkpoint}"
    seed = int(self.config.get("seed", 0))
    if entry.get("train") is not None:
      cfg = train_lib.effective_config(self.config.get("train"), entry.train)
      folder = os.path.join(self.cache, f"{entry.name}-{model_hash(self.config, entry)}")
      outcome = train_lib.train(
          module, cfg, train_source=self.sources["train"], test_source=self.sources["test"],
          image_size=image_size, mesh=self.mesh, workdir=folder, seed=seed, params=params,
          name=key)
      params, accuracy = outcome.params, outcome.test_accuracy
      source = ("fine-tuned " if entry.get("checkpoint") else "trained ") + folder
    else:
      if params is None:
        logging.warning("model %r has neither a checkpoint nor a train config: random init", key)
        params = train_lib.init_params(module, image_size, seed)
      params = sharding.replicate(params, self.mesh)
      accuracy = train_lib.evaluate(module, params, self.sources["test"], image_size=image_size,
                                    batch_size=self._eval_batch_size(), mesh=self.mesh)
    logging.info("model %s (%s): test accuracy %.4f (%s)", key, entry.name, accuracy, source)
    self.summaries.append({
        "key": key, "name": entry.name, "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "image_size": image_size, "test_accuracy": accuracy, "train_seconds": time.time() - t0,
        "source": source})
    return base.LoadedModel(key=key, name=entry.name, module=module,
                            variables={"params": params}, image_size=image_size,
                            test_accuracy=accuracy)

  def _eval_batch_size(self) -> int:
    return int(train_lib.effective_config(self.config.get("train")).eval_batch_size)

  def _load_checkpoint(self, path: str, module, image_size: int, options: dict[str, Any]):
    from vit_analysis import checkpoints  # pylint: disable=g-import-not-at-top
    return checkpoints.load_npz(path, module, image_size=image_size, **options)["params"]

  def write_summaries(self, path: str) -> None:
    with open(path + ".tmp", "w") as f:
      json.dump(self.summaries, f, indent=1)
    os.replace(path + ".tmp", path)


def _result_view(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  return {k: v for k, v in d.items() if k not in _NON_RESULT_KEYS}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stores config.json in `workdir`; refuses a workdir that holds a different config.

  Raises:
    ValueError: naming the top-level keys that differ, unless `config.overwrite` is True.
  """
  path = os.path.join(workdir, "config.json")
  view = _result_view(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != view:
      differ = sorted(k for k in set(old) | set(view) if old.get(k) != view.get(k))
      if not config.get("overwrite", False):
        raise ValueError(
            f"workdir {workdir!r} holds results of a different config (keys {differ} differ); "
            "use another --workdir or set --config.overwrite=True")
      logging.warning("overwriting results of a different config in %s (keys %s)", workdir,
                      differ)
  if sharding.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(view, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[base.AnalysisResult]:
  """Runs the experiment `config` in `workdir`; returns the analyses' results in order."""
  start = time.time()
  validate_config(config)
  sharding.maybe_initialize_distributed(
      {"auto": None, "yes": True, "no": False}[config.get("distributed", "auto")])
  check_workdir(config, workdir)
  mesh = sharding.make_mesh()
  builder = ModelBuilder(config, workdir, mesh)
  models, timings = {}, {}
  for key, entry in config.models.items():
    t0 = time.time()
    models[key] = builder.build(key, entry)
    timings[f"model: {key}"] = time.time() - t0
  ctx = base.Context(workdir=workdir, models=models, sources=builder.sources, mesh=mesh,
                     train_fn=builder.build)
  results = []
  for name in config.get("analyses", ()):
    t0 = time.time()
    logging.info("analysis %s ...", name)
    result = analyses_lib.get(name)(config, ctx)
    if not result.seconds:
      result.seconds = time.time() - t0
    logging.info("analysis %s done in %.1f s: %s", name, result.seconds, result.metrics)
    if sharding.is_main_process():
      base.save_result(ctx, result)
    results.append(result)
  timings["total"] = time.time() - start
  if sharding.is_main_process():
    builder.write_summaries(os.path.join(workdir, "models.json"))
    _maybe_write_report(workdir, config, results, builder.summaries, timings)
  return results


def _maybe_write_report(workdir, config, results, summaries, timings) -> str | None:
  try:
    from vit_analysis import report  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "vit_analysis.report":
      raise
    return None
  path = report.write_report(workdir, config, results, summaries, timings=timings)
  logging.info("report: %s", path)
  return path


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/NAME.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, results, figures, report.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache folder ('' = off).")


class _QuietOrbax:
  """Drops orbax's INFO chatter (several lines per checkpoint) from the console log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _COMPILATION_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
  results = run(_CONFIG.value, _WORKDIR.value)
  for r in results:
    logging.info("%s: %s", r.name, r.metrics)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
