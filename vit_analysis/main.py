r"""Entry point: builds the data and the models of a config, then runs its analyses in order.

  python -m vit_analysis.main --config=configs/train_digits.py --workdir=/tmp/digits
  python -m vit_analysis.main --config=configs/train_digits.py:smoke --workdir=/tmp/s \
      --config.train.batch_size=64

All logic lives in `run(config, workdir)`, which Colab calls directly. For each entry of
`config.models` it loads the official checkpoint (if any), then trains through
`vit_analysis.models.train` (if the entry has a `train` sub-config) or restores the cached result: trained
models live under `config.model_cache` (default `<workdir>/models`) in a folder named by a
content hash of what determines their parameters, so re-running resumes or reuses them. Each
analysis in `config.analyses` is looked up by name (`vit_analysis.analyses.get`), run, and its
summary saved; `vit_analysis.report` then writes `report.html`. Only process 0 writes files.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import shutil
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from vit_analysis import analyses as analyses_lib
from vit_analysis import config_lib
from vit_analysis.analyses import base
from vit_analysis.input import data as data_lib
from vit_analysis.models import checkpoints, create_model, describe
from vit_analysis.models import train as train_lib
from vit_analysis.report import page as report
from vit_analysis.runtime import sharding

# Keys that change neither the models nor the results: ignored when comparing configs.
_NON_RESULT_KEYS = ("overwrite", "model_cache", "distributed", "description")
_DATA_KEYS = ("name", "image_size", "train_split", "test_split", "data_dir", "channels")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the structure of an experiment config before anything runs.

  Raises:
    KeyError: naming an unknown top-level, data, model, train or analysis sub-config key, or an
      unknown analysis.
    ValueError: for a malformed value (e.g. `analyses` not a sequence of names).
  """
  allowed = set(config_lib.TOP_LEVEL_KEYS) | set(analyses_lib.NAMES)
  for key in config:
    if key not in allowed:
      raise KeyError(f"unknown config key {key!r}{_close(key, allowed)}; allowed: "
                     f"{sorted(config_lib.TOP_LEVEL_KEYS)} or an analysis name "
                     f"{list(analyses_lib.NAMES)}")
  for key in ("data", "models"):
    if key not in config:
      raise KeyError(f"config has no {key!r}")
  for key in config.data:
    if key not in _DATA_KEYS:
      raise KeyError(f"unknown config key 'data.{key}'{_close(key, _DATA_KEYS)}; allowed: "
                     f"{list(_DATA_KEYS)}")
  names = config.get("analyses", ())
  if isinstance(names, str) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"config.analyses must be a tuple of analysis names, got {names!r}")
  for name in names:
    analyses_lib.get(name)  # KeyError naming it (with close matches) when unknown
  for name in analyses_lib.NAMES:
    if name in config:
      analysis_config(config, name)  # KeyError naming an unknown option
  if config.get("distributed", "auto") not in ("auto", "yes", "no"):
    raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got "
                     f"{config.distributed!r}")
  for key, entry in config.models.items():
    validate_model_entry(key, entry, config.get("train"))


def analysis_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The analysis' `default_config()` updated with `config[name]`: what `ctx.sub` holds.

  Dict-valued options are replaced, not merged, so a config can drop a default entry.

  Raises:
    KeyError: for an option the analysis does not have (with the closest one).
  """
  merged = analyses_lib.default_config(name)
  given = config.get(name, None)
  for key in (given or {}):
    if key not in merged:
      raise KeyError(f"unknown config key '{name}.{key}'{_close(key, merged)}; "
                     f"{name} options: {sorted(merged)}")
    with merged.unlocked():
      merged[key] = given[key]
  return merged


def _close(word: str, choices) -> str:
  close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_files(config: ml_collections.ConfigDict) -> None:
  """Checks every file and folder the config names, before any model is built or trained.

  Raises:
    FileNotFoundError: naming the config key, the path, and what the file should be.
  """
  problems = []
  for key, entry in config.models.items():
    path = entry.get("checkpoint", "")
    if path and not path.startswith(config_lib.SYNTHETIC_CHECKPOINT) and not epath.Path(
        path).exists():
      problems.append(f"models.{key}.checkpoint = {path!r} does not exist; it should be the "
                      f"official-format checkpoint of {entry.name} (a vit_jax / BiT / Mixer "
                      "npz, a big_vision npz or a timm .safetensors file; see README, 'Reproduce "
                      "the paper')")
  name = config.data.name
  if name.startswith("folder:") and not epath.Path(name[len("folder:"):]).is_dir():
    problems.append(f"data.name = {name!r}: the folder does not exist; it should hold one "
                    "subfolder of images per class (e.g. ImageNet val as <synset>/*.JPEG)")
  data_dir = config.data.get("data_dir", "")
  if data_dir and not epath.Path(data_dir).is_dir():
    problems.append(f"data.data_dir = {data_dir!r} does not exist; it should be the TFDS data "
                    "folder that holds the prepared dataset (see README, TPU section)")
  if problems:
    raise FileNotFoundError("; ".join(problems))


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


def model_hash(config: ml_collections.ConfigDict, entry: Any, extra: str = "") -> str:
  """Content hash of everything that determines a model's parameters and test accuracy.

  `extra` names anything else that does (another training set, the model it starts from).
  """
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
  for key in ("module", "module_kwargs", "load_fn"):  # only when set: older hashes stay valid
    if entry.get(key):
      content["model"][key] = _plain(entry[key])
  if extra:
    content["extra"] = extra
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

  def build(self, key: str, entry: Any, *, sources: dict[str, Any] | None = None,
            data_tag: str = "", init_from: base.LoadedModel | None = None) -> base.LoadedModel:
    """The model of a `config.models[key]`-style entry (ConfigDict or dict); also `train_fn`.

    Args:
      key: the model's key (for logs, models.json and the report).
      entry: name, num_classes, checkpoint, overrides, train (see `config_lib.MODEL_KEYS`).
      sources: {'train', 'test'} to train and evaluate on instead of the config's data.
      data_tag: what distinguishes `sources` (part of the cache hash); required with `sources`.
      init_from: a model whose parameters (all but a re-shaped head) the training starts from.
    """
    if not isinstance(entry, ml_collections.ConfigDict):
      entry = ml_collections.ConfigDict(dict(entry))
    validate_model_entry(key, entry, self.config.get("train"))
    return self.build_checked(key, entry, sources=sources, data_tag=data_tag,
                              init_from=init_from)

  def build_checked(self, key: str, entry: ml_collections.ConfigDict, *,
                    sources: dict[str, Any] | None = None, data_tag: str = "",
                    init_from: base.LoadedModel | None = None) -> base.LoadedModel:
    """`build` for an entry already checked by `validate_model_entry` (the config's models)."""
    if sources is not None and not data_tag:
      raise ValueError(f"model {key!r}: other training data needs a data_tag for the cache hash")
    sources = sources or self.sources
    t0 = time.time()
    overrides = dict(_plain(entry.get("overrides")) or {})
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    image_size = int(overrides.get("image_size", self.image_size))
    num_classes = entry.get("num_classes") or sources["test"].num_classes
    if entry.get("module"):
      module = _import(entry.module, "module")(**dict(_plain(entry.get("module_kwargs")) or {}))
    else:
      module = create_model(entry.name, num_classes, **overrides)
    if getattr(module, "image_size", image_size) != image_size:
      module = module.clone(image_size=image_size)
    params, origin = None, "random init"
    if entry.get("checkpoint"):
      options = dict(_plain(entry.get("checkpoint_options")) or {})
      params = self._load_checkpoint(entry.checkpoint, module, image_size, options,
                                     entry.get("load_fn", ""))
      origin = f"checkpoint {entry.checkpoint}"
    if init_from is not None:
      params = _transfer(train_lib.init_params(module, image_size, self.seed),
                         init_from.variables["params"])
      origin = f"{init_from.key}"
    extra = " ".join(filter(None, [data_tag, init_from.fingerprint if init_from else ""]))
    fingerprint = model_hash(self.config, entry, extra)
    if entry.get("train") is not None:
      cfg = train_lib.effective_config(self.config.get("train"), entry.train)
      folder = os.path.join(self.cache, f"{entry.name}-{fingerprint}")
      outcome = train_lib.train(
          module, cfg, train_source=sources["train"], test_source=sources["test"],
          image_size=image_size, mesh=self.mesh, workdir=folder, seed=self.seed, params=params,
          name=key)
      params, accuracy = outcome.params, outcome.test_accuracy
      origin = ("fine-tuned " if params is not None and (entry.get("checkpoint") or init_from)
                else "trained ") + folder
    else:
      if params is None:
        logging.warning("model %r has neither a checkpoint nor a train config: random init", key)
        params = train_lib.init_params(module, image_size, self.seed)
      params = sharding.replicate(params, self.mesh)
      accuracy = None
      if describe(module, image_size).family != "other":  # a user module's head is its own
        accuracy = train_lib.evaluate(module, params, sources["test"], image_size=image_size,
                                      batch_size=self._eval_batch_size(), mesh=self.mesh)
    logging.info("model %s (%s): test accuracy %s (%s)", key, entry.name,
                 "n/a" if accuracy is None else f"{accuracy:.4f}", origin)
    info = describe(module, image_size)
    self.summaries.append({
        "key": key, "name": entry.name, "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "image_size": image_size, "test_accuracy": accuracy, "train_seconds": time.time() - t0,
        "source": origin, "family": info.family, "has_cls": info.has_cls,
        "classifier": "token" if info.has_cls else "gap", "patch_size": info.patch_size,
        "num_prefix_tokens": info.num_prefix_tokens})
    return base.LoadedModel(key=key, name=entry.name, module=module,
                            variables={"params": params}, image_size=image_size,
                            test_accuracy=accuracy, fingerprint=fingerprint)

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))

  def _eval_batch_size(self) -> int:
    return int(train_lib.effective_config(self.config.get("train")).eval_batch_size)

  def _load_checkpoint(self, path: str, module, image_size: int, options: dict[str, Any],
                       load_fn: str = ""):
    """Parameters from a checkpoint file, by its kind: a user function, timm safetensors, a
    flax msgpack file, or an official / big_vision npz."""
    if load_fn:
      return _import(load_fn, "load_fn")(path, module)
    if describe(module, image_size).family == "other":
      return _user_params(path, module, image_size)
    if path.startswith(config_lib.SYNTHETIC_CHECKPOINT):
      path = _write_synthetic(path, os.path.join(self.cache, "synthetic"))
    if path.endswith(".safetensors"):
      return checkpoints.load_safetensors(path, module, image_size=image_size,
                                          **options)["params"]
    if path.endswith(".msgpack"):
      return checkpoints.load_msgpack(path, module, image_size=image_size, **options)["params"]
    return checkpoints.load_npz(path, module, image_size=image_size, **options)["params"]

  def write_summaries(self, path: str) -> None:
    with open(path + ".tmp", "w") as f:
      json.dump(self.summaries, f, indent=1)
    os.replace(path + ".tmp", path)


def _import(spec: str, what: str) -> Any:
  """The object named 'package.path:Name'.

  Raises:
    ValueError: naming the config key and what is wrong with the spec.
  """
  path, sep, name = spec.partition(":")
  if not sep or not path or not name:
    raise ValueError(f"{what} must be 'package.path:Name', got {spec!r}")
  try:
    return getattr(importlib.import_module(path), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{what} {spec!r} cannot be imported: {e}") from e


def _user_params(path: str, module: Any, image_size: int) -> Any:
  """A user module's params from a flax msgpack file, checked against the module's own tree.

  Raises:
    ValueError: naming every parameter whose path or shape differs.
  """
  if not path.endswith(".msgpack"):
    raise ValueError(f"checkpoint {path!r} of a user module must be a flax msgpack params file "
                     "(flax.serialization.msgpack_serialize(params)); other formats need "
                     "load_fn='package.path:function'")
  params = flax.serialization.msgpack_restore(epath.Path(path).read_bytes())
  params = params.get("params", params)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  init = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)["params"]
  want = flax.traverse_util.flatten_dict(init, sep="/")
  have = flax.traverse_util.flatten_dict(params, sep="/")
  problems = [f"missing {k} {v.shape}" for k, v in want.items() if k not in have]
  problems += [f"unexpected {k}" for k in have if k not in want]
  problems += [f"{k}: {np.shape(have[k])} in the file, {v.shape} in the module"
               for k, v in want.items() if k in have and np.shape(have[k]) != v.shape]
  if problems:
    raise ValueError(f"checkpoint {path!r} does not fit {type(module).__name__}: "
                     + "; ".join(problems))
  return params


def _write_synthetic(spec: str, folder: str) -> str:
  """Materialises a `config_lib.synthetic_checkpoint` spec as an official-format npz.

  Random weights (seeded, 0.02 scale) of the named architecture, written once into `folder`
  (process 0; the others wait for the file); smoke runs use it to exercise what loading an
  upstream checkpoint does (head replacement, pre_logits drop, position-embedding resize).
  """
  name, options = config_lib.parse_synthetic_checkpoint(spec)
  digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
  path = os.path.join(folder, f"{name}-{digest}.npz")
  if sharding.is_main_process() and not os.path.exists(path):
    num_classes = int(options.pop("num_classes", 1000))
    model = create_model(name, num_classes, **options)
    rng = np.random.default_rng(0)
    flat = {k: (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
            for k, s in checkpoints.param_shapes(model).items()}
    os.makedirs(folder, exist_ok=True)
    checkpoints.save_npz(flax.traverse_util.unflatten_dict(flat, sep="/"), path)
  if jax.process_count() > 1:  # the others read the file only once process 0 has written it
    multihost_utils.sync_global_devices(f"synthetic checkpoint {path}")
  return path


def _transfer(fresh: Any, old: Any) -> Any:
  """`fresh` parameters with every leaf of `old` of the same path and shape, except the head."""
  fresh = flax.traverse_util.flatten_dict(jax.device_get(fresh), sep="/")
  old = flax.traverse_util.flatten_dict(jax.device_get(old), sep="/")
  return flax.traverse_util.unflatten_dict(
      {k: old[k] if k in old and old[k].shape == v.shape and not k.startswith("head/") else v
       for k, v in fresh.items()}, sep="/")


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
      if sharding.is_main_process():  # none of the other config's results may be reused
        for folder in ("results", "partial", "figures"):
          shutil.rmtree(os.path.join(workdir, folder), ignore_errors=True)
  if sharding.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(view, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def run_analysis(config: ml_collections.ConfigDict, ctx: base.Context,
                 name: str) -> base.AnalysisResult:
  """Runs analysis `name` with its merged sub-config and saves its result (process 0).

  Its partial state (`workdir/partial/<name>`) is removed once the result is saved.
  """
  t0 = time.time()
  logging.info("analysis %s ...", name)
  result = analyses_lib.get(name)(config, ctx.for_analysis(name, analysis_config(config, name)))
  result.seconds = time.time() - t0
  logging.info("analysis %s done in %.1f s: %s", name, result.seconds, result.metrics)
  if sharding.is_main_process():
    base.save_result(ctx, result)
    shutil.rmtree(os.path.join(ctx.workdir, "partial", name), ignore_errors=True)
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> list[base.AnalysisResult]:
  """Runs the experiment `config` in `workdir`; returns the analyses' results in order.

  A rerun in the same workdir reuses trained models, skips analyses whose results are saved and
  resumes interrupted ones from their partial state (`workdir/partial`).
  """
  start = time.time()
  validate_config(config)
  check_files(config)
  sharding.maybe_initialize_distributed(
      {"auto": None, "yes": True, "no": False}[config.get("distributed", "auto")])
  check_workdir(config, workdir)
  mesh = sharding.make_mesh()
  builder = ModelBuilder(config, workdir, mesh)
  models, timings = {}, {}
  for key, entry in config.models.items():
    t0 = time.time()
    models[key] = builder.build_checked(key, entry)  # validate_config checked every entry
    timings[f"model: {key}"] = time.time() - t0
  ctx = base.Context(workdir=workdir, models=models, sources=builder.sources, mesh=mesh,
                     train_fn=builder.build, config=config)
  # Decided once, before any analysis runs, so that every process skips the same ones.
  # check_workdir guarantees that the same config produced what is saved.
  saved = {name: os.path.join(workdir, "results", f"{name}.json")
           for name in config.get("analyses", ())}
  saved = {name: path for name, path in saved.items() if os.path.exists(path)}
  results = []
  for name in config.get("analyses", ()):
    if name in saved:
      with open(saved[name]) as f:
        result = base.AnalysisResult.from_json(f.read())
      logging.info("analysis %s: finished in an earlier run, not recomputed", name)
      results.append(result)
      continue
    results.append(run_analysis(config, ctx, name))
  timings["total"] = time.time() - start
  if sharding.is_main_process():
    builder.write_summaries(os.path.join(workdir, "models.json"))
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
