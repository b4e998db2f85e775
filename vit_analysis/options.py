"""Validating an experiment config against every analysis' options, one line per problem.

`validate_config` checks the structure (top-level, data, model, train and analysis keys) and
`check_files` every path the config names, both before anything is built or trained, so that a
typo costs seconds, not a training run. `analysis_config` is what each analysis receives as its
`cfg`: its `default_config()` updated by the experiment's `config.<name>`.
"""
from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterable

import ml_collections
from etils import epath

from vit_analysis import analyses as analyses_lib
from vit_analysis import config_lib
from vit_analysis.models import build

DATA_KEYS = ("name", "image_size", "train_split", "test_split", "data_dir", "channels")


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
    if key not in DATA_KEYS:
      raise KeyError(f"unknown config key 'data.{key}'{_close(key, DATA_KEYS)}; allowed: "
                     f"{list(DATA_KEYS)}")
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
    build.validate_model_entry(key, entry, config.get("train"))


def analysis_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The analysis' `default_config()` updated with `config[name]`: the `cfg` it runs with.

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


def check_files(config: ml_collections.ConfigDict) -> None:
  """Checks every file and folder the config names, before any model is built or trained.

  Raises:
    FileNotFoundError: naming the config key, the path, and what the file should be.
  """
  problems = build.missing_checkpoints(config.models)
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


def override_problem(argv: list[str]) -> str | None:
  """One line naming the first `--config.a.b=v` override of `argv` whose key the config lacks.

  config_flags refuses such an override while absl parses the `--config` flag, before any of
  our code runs and before the flag holds the config, with a long traceback; the command line
  loads the config file again here and prints this line instead.

  Returns:
    the bad key, its closest match and the keys valid at that level, or None when every
    override names an existing key or the config file cannot be loaded.
  """
  specs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  try:
    path, _, arg = specs[-1].partition(":")
    spec = importlib.util.spec_from_file_location("_vit_analysis_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except (IndexError, OSError, ImportError, SyntaxError, AttributeError, TypeError, ValueError,
          KeyError):
    return None  # config_flags' own message then
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, done = config, []
    for part in path.split("."):
      if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
        node, done = node[part], done + [part]
        continue
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        return (f"--config.{path}: config.{'.'.join(done)} is a value "
                f"({type(node).__name__}), it has no key {part!r}")
      where = f"config.{'.'.join(done)}" if done else "the config"
      hint = ""
      if not done and part in analyses_lib.NAMES:
        hint = (f" ({part!r} is an analysis this config does not run; its configs/{part}.py "
                "does, or a config that lists it in analyses)")
      return (f"--config.{path}: unknown config key {path!r}{_close(part, node)}{hint}; "
              f"{where} has: {sorted(node)}")
  return None


def _close(word: str, choices: Iterable) -> str:
  close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""
