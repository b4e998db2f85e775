"""Validating an experiment config against every analysis' options, one line per problem.

`validate_config` checks the structure (top-level, data, model, train and analysis keys) and
`check_files` every path the config names and the data (`input.data.check_data`: a folder's
listing and a decoded sample, a TFDS split's ArrayRecord shards), both before anything is built
or trained, so that a typo costs seconds, not a training run; `main.run` gathers the problems of
both (and of the workdir) into one message (`runtime.errors.raise_all`). `analysis_config` is
what each analysis receives as its `cfg`: its `default_config()` updated by the experiment's
`config.<name>`. `config_argument_problem` turns a bad `--config=FILE:ARG` into one line.
"""
from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterable

import ml_collections
from etils import epath

from vit_analysis import analyses as analyses_lib
from vit_analysis import config_lib
from vit_analysis.input import data as data_lib
from vit_analysis.models import build
from vit_analysis.runtime import errors

DATA_KEYS = ("name", "image_size", "train_split", "test_split", "data_dir", "channels",
             "check_decode", "skip_corrupt")
# Data keys that change neither the models nor the results of a run that finishes (what is
# checked before it, whether a corrupt file stops it), left out of model hashes and config.json.
RUN_ONLY_DATA_KEYS = ("check_decode", "skip_corrupt")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the structure of an experiment config before anything runs.

  Raises:
    KeyError: naming an unknown top-level, data, model, train or analysis sub-config key, or an
      unknown analysis.
    ValueError: for a malformed value (e.g. `analyses` not a sequence of names).
    errors.Problems: for several problems, one line each.
  """
  errors.raise_all(config_problems(config))


def config_problems(config: ml_collections.ConfigDict) -> list[Exception]:
  """Every problem `validate_config` finds, one exception each (KeyError or ValueError)."""
  problems: list[Exception] = []

  def check(fn, *args) -> None:
    try:
      fn(*args)
    except (KeyError, ValueError) as e:
      problems.append(e)

  allowed = set(config_lib.TOP_LEVEL_KEYS) | set(analyses_lib.NAMES)
  for key in config:
    if key not in allowed:
      problems.append(KeyError(
          f"unknown config key {key!r}{_close(key, allowed)}; allowed: "
          f"{sorted(config_lib.TOP_LEVEL_KEYS)} or an analysis name {list(analyses_lib.NAMES)}"))
  for key in ("data", "models"):
    if key not in config:
      problems.append(KeyError(f"config has no {key!r}"))
  for key in config.get("data", None) or {}:
    if key not in DATA_KEYS:
      problems.append(KeyError(f"unknown config key 'data.{key}'{_close(key, DATA_KEYS)}; "
                               f"allowed: {list(DATA_KEYS)}"))
  if "data" in config:
    mode = config.data.get("check_decode", "sample")
    if mode not in data_lib.CHECK_DECODE:
      problems.append(ValueError(f"data.check_decode = {mode!r}; valid: "
                                 f"{', '.join(map(repr, data_lib.CHECK_DECODE))}"))
    if not isinstance(config.data.get("skip_corrupt", False), bool):
      problems.append(ValueError(f"data.skip_corrupt must be True or False, got "
                                 f"{config.data.skip_corrupt!r}"))
  names = config.get("analyses", ())
  if isinstance(names, str) or not all(isinstance(n, str) for n in names):
    problems.append(ValueError(f"config.analyses must be a tuple of analysis names, got "
                               f"{names!r}"))
    names = ()
  for name in names:
    check(analyses_lib.get, name)  # KeyError naming it (with close matches) when unknown
  for name in analyses_lib.NAMES:
    if name in config:
      check(analysis_config, config, name)  # KeyError naming an unknown option
  if config.get("distributed", "auto") not in ("auto", "yes", "no"):
    problems.append(ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got "
                               f"{config.distributed!r}"))
  for key, entry in (config.get("models", None) or {}).items():
    check(build.validate_model_entry, key, entry, config.get("train"))
  return problems


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
  """Checks every file and folder the config names, and its data, before any model is built.

  Raises:
    FileNotFoundError: naming the config key, the path, and what the file should be.
    ValueError: for data that is there but unusable (an undecodable image, no ArrayRecord).
    errors.Problems: for several problems, one line each.
  """
  errors.raise_all(file_problems(config))


def file_problems(config: ml_collections.ConfigDict) -> list[Exception]:
  """Every problem `check_files` finds: missing checkpoints, checkpoints whose contents do not
  fit their models (`build.checkpoint_problems`: format, keys, shapes; from the files' headers),
  then the data's (`check_data`)."""
  problems: list[Exception] = [FileNotFoundError(p) for p in build.missing_checkpoints(
      config.get("models", None) or {})]
  if config.get("data", None) is not None:  # the models' image size and class count are there
    problems.extend(build.checkpoint_problems(config))
    problems.extend(data_lib.check_data(config.data))
  return problems


def without_run_only_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` without `RUN_ONLY_DATA_KEYS`: what the model hashes see."""
  copy = ml_collections.ConfigDict(config.to_dict())
  for key in RUN_ONLY_DATA_KEYS:
    if key in copy.get("data", {}):
      del copy.data[key]
  return copy


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `FILE[:ARG]` as `--config` loads it (`get_config(ARG)`)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_vit_analysis_config", path)
  if module_spec is None:
    raise ImportError(f"cannot load {path!r} as a Python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_argument_problem(argv: list[str]) -> str | None:
  """One line for a `--config=FILE:ARG` whose argument the config refuses, else None.

  config_flags calls `get_config(ARG)` while absl parses the flag, and prints the config's
  ValueError (`config_lib.parse_arg`: the bad argument, its closest match, the valid ones) inside
  a traceback; the command line loads the file first and prints this line instead. A file that
  does not exist or does not load is left to config_flags and the run's own message.
  """
  specs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not specs or ":" not in specs[-1]:
    return None
  path = specs[-1].partition(":")[0]
  if not epath.Path(path).is_file():
    return None
  try:
    load_config_file(specs[-1])
  except (ValueError, KeyError, TypeError) as e:
    return f"--config={specs[-1]}: {errors.message(e)}"
  except (OSError, ImportError, SyntaxError, AttributeError):
    return None
  return None


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
    config = load_config_file(specs[-1])
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
