"""A checked, loaded model from a `config.models` entry.

`ModelBuilder.build` is the one way to build a model: it checks the entry, creates the module
(registry name or a user's `module='package.path:Name'`), loads its checkpoint by kind (official
or big_vision npz, timm safetensors, flax msgpack, a user `load_fn`, or a synthetic spec written
on first use), then trains through `models.train` (entries with a `train` sub-config) or
evaluates it. Trained models live under `config.model_cache` (default `<workdir>/models`) in a
folder named by `model_hash`, a content hash of what determines their parameters, so a rerun
resumes or reuses them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vit_analysis import config_lib
from vit_analysis.input import data as data_lib
from vit_analysis.models import ModelInfo, checkpoints, create_model, describe
from vit_analysis.models import train as train_lib
from vit_analysis.runtime import sharding
from vit_analysis.runtime import workdir as workdir_lib


@dataclasses.dataclass
class LoadedModel:
  """A model ready for analysis.

  Attributes:
    key: the model's key in `config.models` (e.g. 'vit', 'resnet').
    name: its registry name (e.g. 'ViT-Ti_4', 'R26x1-small', 'ViT-B_32').
    module: the Flax module; `module.apply(variables, images, train=False) -> (logits, out)`.
    variables: `{'params': ...}`.
    image_size: side in pixels of the square images the model takes.
    test_accuracy: top-1 accuracy on the test split, if it was measured.
    fingerprint: what determines the parameters (content hash or checkpoint path); partial
      results of another model are never resumed.
  """
  key: str
  name: str
  module: nn.Module
  variables: Any
  image_size: int
  test_accuracy: float | None = None
  fingerprint: str = ""

  @property
  def info(self) -> ModelInfo:
    """The model's facts at its image size (family, CLS, grid, ...): `models.describe`."""
    return describe(self.module, self.image_size)


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


def missing_checkpoints(models: Any) -> list[str]:
  """One line per `models.<key>.checkpoint` that names no existing file (synthetic specs exist)."""
  problems = []
  for key, entry in models.items():
    path = entry.get("checkpoint", "")
    if path and not path.startswith(config_lib.SYNTHETIC_CHECKPOINT) and not epath.Path(
        path).exists():
      problems.append(f"models.{key}.checkpoint = {path!r} does not exist; it should be the "
                      f"official-format checkpoint of {entry.name} (a vit_jax / BiT / Mixer "
                      "npz, a big_vision npz or a timm .safetensors file; see README, 'Reproduce "
                      "the paper')")
  return problems


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

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.cache = config.get("model_cache", "") or workdir_lib.Layout(workdir).models
    self.image_size = int(config.data.image_size)
    self.sources = {
        "train": data_lib.get_source(config.data, config.data.get("train_split", "train")),
        "test": data_lib.get_source(config.data, config.data.get("test_split", "test")),
    }
    self.summaries: list[dict[str, Any]] = []

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))

  def build(self, key: str, entry: Any, *, sources: dict[str, Any] | None = None,
            data_tag: str = "", init_from: LoadedModel | None = None) -> LoadedModel:
    """The model of a `config.models[key]`-style entry (ConfigDict or dict); also `train_fn`.

    Args:
      key: the model's key (for logs, models.json and the report).
      entry: name, num_classes, checkpoint, overrides, train (see `config_lib.MODEL_KEYS`).
      sources: {'train', 'test'} to train and evaluate on instead of the config's data.
      data_tag: what distinguishes `sources` (part of the cache hash); required with `sources`.
      init_from: a model whose parameters (all but a re-shaped head) the training starts from.

    Raises:
      KeyError: for an unknown key of the entry (`validate_model_entry`).
      ValueError: for `sources` without a `data_tag`, or a checkpoint that does not fit.
    """
    if not isinstance(entry, ml_collections.ConfigDict):
      entry = ml_collections.ConfigDict(dict(entry))
    # Cheap, and also what entries made up by analyses (skip removal, dataset scale) need.
    validate_model_entry(key, entry, self.config.get("train"))
    if sources is not None and not data_tag:
      raise ValueError(f"model {key!r}: other training data needs a data_tag for the cache hash")
    sources = sources or self.sources
    t0 = time.time()
    num_classes = entry.get("num_classes") or sources["test"].num_classes
    module, image_size = _create_module(entry, num_classes, self.image_size)
    info = describe(module, image_size)
    params, origin = None, "random init"
    if entry.get("checkpoint"):
      options = dict(_plain(entry.get("checkpoint_options")) or {})
      params = self._load_checkpoint(entry.checkpoint, module, info, image_size, options,
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
      folder = workdir_lib.join(self.cache, f"{entry.name}-{fingerprint}")
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
      if info.family != "other":  # a user module's head is its own
        accuracy = train_lib.evaluate(module, params, sources["test"], image_size=image_size,
                                      batch_size=self._eval_batch_size(), mesh=self.mesh)
    logging.info("model %s (%s): test accuracy %s (%s)", key, entry.name,
                 "n/a" if accuracy is None else f"{accuracy:.4f}", origin)
    self.summaries.append({
        "key": key, "name": entry.name, "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "image_size": image_size, "test_accuracy": accuracy,
        # Accuracy is over the whole test split: its binomial error needs the count.
        "num_test": None if accuracy is None else len(sources["test"]),
        "train_seconds": time.time() - t0,
        "source": origin, "family": info.family, "has_cls": info.has_cls,
        "classifier": "token" if info.has_cls else "gap", "patch_size": info.patch_size,
        "num_prefix_tokens": info.num_prefix_tokens})
    return LoadedModel(key=key, name=entry.name, module=module, variables={"params": params},
                       image_size=image_size, test_accuracy=accuracy, fingerprint=fingerprint)

  def _eval_batch_size(self) -> int:
    return int(train_lib.effective_config(self.config.get("train")).eval_batch_size)

  def _load_checkpoint(self, path: str, module: nn.Module, info: ModelInfo, image_size: int,
                       options: dict[str, Any], load_fn: str = "") -> Any:
    """Parameters from a checkpoint file, by its kind: a user function, timm safetensors, a
    flax msgpack file, or an official / big_vision npz."""
    if load_fn:
      return _import(load_fn, "load_fn")(path, module)
    if info.family == "other":
      return _user_params(path, module, image_size)
    if path.startswith(config_lib.SYNTHETIC_CHECKPOINT):
      path = _write_synthetic(path, workdir_lib.join(self.cache, "synthetic"))
    return checkpoints.load_file(path, module, image_size=image_size, **options)["params"]

  def write_summaries(self, path: str) -> None:
    """Writes the built models' summaries to `path` (JSON) atomically."""
    workdir_lib.write_json(path, self.summaries)


def _create_module(entry: Any, num_classes: int, default_image_size: int
                   ) -> tuple[nn.Module, int]:
  """(the entry's module at its image size, that size): registry name or a user's module."""
  overrides = dict(_plain(entry.get("overrides")) or {})
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  image_size = int(overrides.get("image_size", default_image_size))
  if entry.get("module"):
    module = _import(entry.module, "module")(**dict(_plain(entry.get("module_kwargs")) or {}))
  else:
    module = create_model(entry.name, num_classes, **overrides)
  if getattr(module, "image_size", image_size) != image_size:
    module = module.clone(image_size=image_size)
  return module, image_size


def checkpoint_problems(config: ml_collections.ConfigDict) -> list[Exception]:
  """One ValueError per `models.<key>.checkpoint` whose contents `ModelBuilder.build` would refuse.

  Each file is checked as its loader reads it (`checkpoints.check_file`: format, keys and shapes
  against the entry's model with its `checkpoint_options`, every mismatch at once) from its
  headers, so a multi-GB checkpoint costs milliseconds and no memory; msgpack files (official
  layouts or a user module's params, `_user_params`) have no header and are read whole. Not
  checked here, and left to `build`: missing files (`missing_checkpoints`), synthetic specs
  (written by the run itself), `load_fn` checkpoints (a user function that can only be checked
  by running it, loading the weights), and an entry whose module cannot be created (a bad
  option, a module that does not import, data that does not load for its class count:
  `data.check_data` reports that).
  """
  problems: list[Exception] = []
  test_source: list[Any] = []  # built once, and only when an entry takes its class count

  def num_classes(entry: Any) -> int:
    if entry.get("num_classes"):
      return entry.num_classes
    if not test_source:
      test_source.append(data_lib.get_source(config.data, config.data.get("test_split", "test")))
    return test_source[0].num_classes

  for key, entry in (config.get("models", None) or {}).items():
    path = entry.get("checkpoint", "")
    if (not path or path.startswith(config_lib.SYNTHETIC_CHECKPOINT) or entry.get("load_fn")
        or not epath.Path(path).exists()):
      continue
    try:
      module, image_size = _create_module(entry, num_classes(entry), config.data.image_size)
      family = describe(module, image_size).family
    except Exception:  # pylint: disable=broad-exception-caught
      # Whatever creating a model or a data source raises (TFDS, a user's module): `build`
      # reports it with its context; what is checked here is the files.
      continue
    options = dict(_plain(entry.get("checkpoint_options")) or {})
    try:
      if family == "other":  # the same dispatch as `_load_checkpoint`
        _user_params(path, module, image_size)
      else:
        checkpoints.check_file(path, module, image_size=image_size, **options)
    except (ValueError, TypeError, OSError) as e:
      problems.append(ValueError(f"models.{key}.checkpoint = {path!r}: {e}"))
  return problems


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


def _user_params(path: str, module: nn.Module, image_size: int) -> Any:
  """A user module's params from a flax msgpack file, checked against the module's own tree.

  Raises:
    ValueError: naming every parameter whose path or shape differs.
  """
  if not path.endswith(".msgpack"):
    raise ValueError(f"checkpoint {path!r} of a user module must be a flax msgpack params file "
                     "(flax.serialization.msgpack_serialize(params)); other formats need "
                     "load_fn='package.path:function'")
  have = checkpoints.read_msgpack(path)  # flat {'/'-joined key: array}, 'params' unwrapped
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  init = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)["params"]
  want = flax.traverse_util.flatten_dict(init, sep="/")
  problems = [f"missing {k} {v.shape}" for k, v in want.items() if k not in have]
  problems += [f"unexpected {k}" for k in have if k not in want]
  problems += [f"{k}: {np.shape(have[k])} in the file, {v.shape} in the module"
               for k, v in want.items() if k in have and np.shape(have[k]) != v.shape]
  if problems:
    raise ValueError(f"checkpoint {path!r} does not fit {type(module).__name__}: "
                     + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(have, sep="/")


def _write_synthetic(spec: str, folder: str) -> str:
  """Materialises a `config_lib.synthetic_checkpoint` spec as an official-format npz.

  Random weights (seeded, 0.02 scale) of the named architecture, written once into `folder`
  (process 0; the others wait for the file); smoke runs use it to exercise what loading an
  upstream checkpoint does (head replacement, pre_logits drop, position-embedding resize).
  """
  name, options = config_lib.parse_synthetic_checkpoint(spec)
  digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
  path = workdir_lib.join(folder, f"{name}-{digest}.npz")
  if sharding.is_main_process() and not workdir_lib.exists(path):
    num_classes = int(options.pop("num_classes", 1000))
    model = create_model(name, num_classes, **options)
    rng = np.random.default_rng(0)
    flat = {k: (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
            for k, s in checkpoints.param_shapes(model).items()}
    workdir_lib.save_npz(path, **flat)  # the official flat '/'-keyed layout, one write
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
