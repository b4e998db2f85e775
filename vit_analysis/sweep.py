r"""Sweeps: one config, many points, each run by `main.run` into its own sub-workdir.

  python -m vit_analysis.sweep --config=configs/cka_intra.py:smoke --workdir=/tmp/fig1
  python -m vit_analysis.sweep --config=configs/cka_intra.py:smoke --workdir=/tmp/seeds \
      --sweep=seed=0,1 --noconfig_sweep
  python -m vit_analysis.sweep --config=configs/cka_intra.py:full,ckpt_dir=$CKPT \
      --workdir=$W/fig1 --dry_run        # one launch command per point, plain and TPU VM

A config declares its sweep the big_vision way, `get_hyper(hyper)` returning e.g.
`hyper.product([hyper.sweep('config.seed', [0, 1]), hyper.sweep('config.x', [...])])`, or with
`sweep(add)` calling `add(**{'cka_intra.repeats': 3})` once per point; either may take the
config's argument text as a second parameter (`get_hyper(hyper, arg)`), since a sweep at `:full`
differs from one at `:smoke`. `--sweep=KEY=V1,V2` adds a one-off grid from the command line
(several `--sweep` flags make a product), multiplied with the config's own sweep unless
`--noconfig_sweep`. A point is a dict of dotted config keys ('config.' prefix optional) to values.

Every point runs into `WORKDIR/<name>`, its name made of the swept values that tell points apart
(`seed=0`, `vit.name=ViT-B_16,seed=1`). Points share trained models (`WORKDIR/models`) unless
the config names a model cache. A point whose every analysis result is saved (for the same
config) is finished and skipped without building its models; an interrupted one resumes, as
`main.run` does. `WORKDIR/sweep.json` indexes the points: their overrides, sub-workdirs and
status. An unknown key (with the closest valid one), an empty sweep, two points of one name or a
value the config rejects is an error before anything runs.
"""
from __future__ import annotations

import copy
import datetime
import difflib
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import time
from typing import Any, Callable, Iterable, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vit_analysis import analyses as analyses_lib
from vit_analysis import config_lib, options
from vit_analysis import main as main_lib
from vit_analysis.runtime import sharding
from vit_analysis.runtime import workdir as workdir_lib

Point = dict[str, Any]

INDEX = workdir_lib.SWEEP
# Status of a point in the index.
PENDING, RUNNING, FINISHED, FAILED = "pending", "running", "finished", "failed"


class Hyper:
  """big_vision's `hyper` helpers: each returns a list of points (dicts of key -> value)."""

  @staticmethod
  def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of `key`."""
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value: Any, length: int = 1) -> list[Point]:
    """`length` points that all set `key` to `value` (zip it with a sweep of that length)."""
    return [{key: value} for _ in range(length)]

  @staticmethod
  def product(sweeps: Sequence[list[Point]]) -> list[Point]:
    """Every combination of one point of each sweep (the first sweep varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*sweeps)]

  @staticmethod
  def zipit(sweeps: Sequence[list[Point]]) -> list[Point]:
    """The i-th points of every sweep merged (the sweeps must have the same length)."""
    lengths = sorted({len(s) for s in sweeps})
    if len(lengths) > 1:
      raise ValueError(f"hyper.zipit of sweeps of different lengths {[len(s) for s in sweeps]}")
    return [_merge(combo) for combo in zip(*sweeps)] if sweeps else [{}]

  @staticmethod
  def chainit(sweeps: Sequence[list[Point]]) -> list[Point]:
    """The points of every sweep, one sweep after another."""
    return [dict(p) for s in sweeps for p in s]

  @staticmethod
  def discrete(values: Iterable[Any]) -> list[Any]:
    return list(values)

  categorical = discrete


def _merge(points: Iterable[Point]) -> Point:
  out: Point = {}
  for p in points:
    for key, value in p.items():
      if key in out:
        raise ValueError(f"sweep key {key!r} is set twice in one point ({out[key]!r}, {value!r})")
      out[key] = value
  return out


def _call(fn: Callable[..., Any], first: Any, arg: str | None) -> Any:
  """`fn(first, arg)` if `fn` takes the config's argument text too, else `fn(first)`."""
  params = list(inspect.signature(fn).parameters.values())
  if len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
    return fn(first, arg)
  return fn(first)


def config_points(module: Any, arg: str | None) -> list[Point] | None:
  """The points a config module declares (`get_hyper` or `sweep`), None if it declares none."""
  if hasattr(module, "get_hyper"):
    return [dict(p) for p in _call(module.get_hyper, Hyper(), arg)]
  if hasattr(module, "sweep"):
    points: list[Point] = []
    _call(module.sweep, lambda **kw: points.append(dict(kw)), arg)
    return points
  return None


def cli_points(specs: Sequence[str]) -> list[Point] | None:
  """The product of `--sweep=KEY=V1,V2,...` flags (values parsed as in config arguments)."""
  if not specs:
    return None
  sweeps = []
  for spec in specs:
    key, sep, values = spec.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--sweep={spec!r} is not KEY=V1,V2,...")
    sweeps.append(Hyper.sweep(key.strip(), [config_lib.parse_arg(f"v={v}", ("v",)).v
                                            for v in config_lib.names(values)]))
  return Hyper.product(sweeps)


def _strip(key: str) -> str:
  return key[len("config."):] if key.startswith("config.") else key


def _config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted key of `config` (nested ConfigDicts and dicts included)."""
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      keys += _config_keys(v, f"{prefix}{k}.")
  return keys


def _coerce(current: Any, value: Any) -> Any:
  """`value` in the type of the field it replaces, where the command line gives text."""
  if isinstance(current, (tuple, list)) and isinstance(value, str):
    return tuple(config_lib.names(value))  # as config_flags reads 'vit,resnet' for a tuple
  if isinstance(value, list):
    return tuple(value)
  if isinstance(current, str) and not isinstance(value, str) and value is not None:
    return str(value)
  return value


def apply(config: ml_collections.ConfigDict, overrides: Point) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key `overrides` set.

  A key an analysis takes but the config's sub-config does not list yet is added (as
  `main.analysis_config` would merge it).

  Raises:
    KeyError: for a key the config does not have, naming the closest one.
    TypeError: for a value of the wrong type.
  """
  config = copy.deepcopy(config)
  known = _config_keys(config)
  for raw_key, value in overrides.items():
    key = _strip(raw_key)
    parent_key, _, leaf = key.rpartition(".")
    parent = config
    for part in filter(None, parent_key.split(".")):
      parent = parent[part] if part in parent else None
      if parent is None or not isinstance(parent, (ml_collections.ConfigDict, dict)):
        parent = None
        break
    analysis = key.split(".")[0]
    takes = (analysis in analyses_lib.NAMES and parent is not None and parent_key == analysis
             and leaf in analyses_lib.default_config(analysis))
    if parent is None or (leaf not in parent and not takes):
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise KeyError(f"unknown sweep key {raw_key!r}{hint}; the config has no such key")
    try:
      if isinstance(parent, ml_collections.ConfigDict):
        with parent.unlocked():
          parent[leaf] = _coerce(parent.get(leaf, None), value)
      else:
        parent[leaf] = _coerce(parent.get(leaf, None), value)
    except (TypeError, ValueError) as e:
      raise TypeError(f"sweep key {key}={value!r}: the config's {key} is "
                      f"{parent.get(leaf, None)!r} ({e})") from e
  return config


def _short(value: Any) -> str:
  """A value as it reads in a folder name: safe characters only."""
  if isinstance(value, (tuple, list)):
    text = "+".join(_short(v) for v in value) or "none"
  elif isinstance(value, (dict, ml_collections.ConfigDict)):
    text = "+".join(f"{k}-{_short(v)}" for k, v in dict(value).items()) or "none"
  else:
    text = str(value)
    if "/" in text:  # a path: its file name says what it is
      text = text.rstrip("/").rsplit("/", 1)[-1]
  return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


_MISSING = object()


def point_names(points: Sequence[Point]) -> list[str]:
  """Readable, path-safe names from the values that tell the points apart.

  Keys whose value is the same everywhere are left out, and so is a key whose value follows
  from the other named keys that each point sets (a checkpoint zipped with its model name, an
  option fixed per group of points); keys set by more points, then keys declared later, are
  dropped first, and every point keeps a key it sets. Each named key appears by its shortest
  dotted suffix that no other named key shares ('seed', 'vit.name'). A point that sets none of
  them is 'default'.
  """
  keys = list(dict.fromkeys(_strip(k) for p in points for k in p))
  values = {k: [next((v for kk, v in p.items() if _strip(kk) == k), _MISSING) for p in points]
            for k in keys}
  text = lambda v: json.dumps(v, sort_keys=True, default=repr) if v is not _MISSING else "\0"
  named = [k for k in keys if len({text(v) for v in values[k]}) > 1] or keys
  present = lambda k: sum(v is not _MISSING for v in values[k])
  for k in sorted(named, key=lambda k: (-present(k), -keys.index(k))):
    rest = [n for n in named if n != k]
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    follows = len(points) > 1
    for i in range(len(points)):
      tag = tuple((n, text(values[n][i])) for n in rest if values[n][i] is not _MISSING)
      if (not tag and values[k][i] is not _MISSING) or seen.setdefault(
          tag, text(values[k][i])) != text(values[k][i]):
        follows = False
        break
    if follows:
      named = rest
  labels = {}
  for k in named:
    parts = k.split(".")
    # A model entry's key reads with its model ('vit.name', not 'name').
    for n in range(2 if k.startswith("models.") else 1, len(parts) + 1):
      label = ".".join(parts[-n:])
      if not any(o != k and (o == label or o.endswith("." + label)) for o in named):
        break
    labels[k] = label
  names = []
  for i in range(len(points)):
    parts = [f"{labels[k]}={_short(values[k][i])}" for k in named if values[k][i] is not _MISSING]
    name = ",".join(parts) or "default"
    if len(name) > 120:  # folder names stay well under file-system limits
      name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    names.append(name)
  return names


def _load_module(path: str) -> Any:
  """The config file `path`; a relative 'configs/...' missing here is read from the checkout
  this package lives in (a notebook's working directory is seldom the repository)."""
  beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  if not os.path.exists(path) and not os.path.isabs(path) and os.path.exists(beside):
    path = beside
  spec = importlib.util.spec_from_file_location(
      f"_sweep_config_{os.path.basename(path)[:-3]}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} cannot be loaded")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Sweep:
  """The checked points of a sweep: names, overrides, configs and sub-workdirs.

  Attributes:
    config_file: 'configs/NAME.py[:arg]' as given.
    workdir: the sweep's folder.
    overrides: command-line `--config.key=value` overrides shared by every point.
    points: [{'name', 'overrides', 'workdir'}] in sweep order.
    configs: the config of each point, validated.
  """

  def __init__(self, config_file: str, workdir: str, *, sweep: Sequence[str] = (),
               overrides: Point | None = None, config_sweep: bool = True):
    self.config_file, self.workdir = config_file, workdir
    path, _, arg = config_file.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    arg = arg or None
    module = _load_module(path)
    self.overrides = dict(overrides or {})
    base = apply(module.get_config(arg), self.overrides)
    if not base.get("model_cache", ""):
      # The points share trained models (model_cache changes no result, main._NON_RESULT_KEYS).
      self.overrides["model_cache"] = workdir_lib.Layout(workdir).models
      base = apply(base, {"model_cache": self.overrides["model_cache"]})
    grids = [g for g in (config_points(module, arg) if config_sweep else None,
                         cli_points(sweep)) if g is not None]
    if not grids:
      raise ValueError(f"{config_file} declares no sweep (get_hyper or sweep); give "
                       "--sweep=KEY=V1,V2,...")
    points = Hyper.product(grids)
    if not points:
      raise ValueError(f"the sweep of {config_file} has no points (an empty sweep in a product?)")
    points = [{_strip(k): v for k, v in p.items()} for p in points]
    names = point_names(points)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f"two or more points are named {dupes}: the sweep repeats a point, or two "
                       "values read the same in a folder name")
    self.configs = []
    for name, point in zip(names, points):
      try:
        config = apply(base, point)
        options.validate_config(config)
      except (KeyError, ValueError, TypeError) as e:
        raise type(e)(f"sweep point {name!r}: {e.args[0] if e.args else e}") from e
      self.configs.append(config)
    self.points = [dict(name=n, overrides=p, workdir=workdir_lib.join(workdir, n))
                   for n, p in zip(names, points)]

  def status(self, i: int) -> str:
    """'finished' where point i's every analysis result is saved for this same config."""
    config, folder = self.configs[i], self.points[i]["workdir"]
    run = workdir_lib.Layout(folder)
    saved = workdir_lib.read_json(run.config)
    if saved is None:
      return PENDING
    if saved != main_lib._result_view(config):  # what main.check_workdir compares
      return PENDING  # main.run will say what differs
    done = all(workdir_lib.exists(run.result(a))
               for a in config.get("analyses", ()))
    return FINISHED if done else RUNNING  # started, not finished: it resumes

  def commands(self) -> list[tuple[str, str, str]]:
    """(name, plain command, TPU VM command) per point."""
    out = []
    for p in self.points:
      args = [f"--config={self.config_file}", f"--workdir={p['workdir']}"]
      args += [f"--config.{k}={_flag_value(v)}" for k, v in {**self.overrides,
                                                             **p["overrides"]}.items()]
      plain = " ".join(["python -m vit_analysis.main"] + [shlex.quote(a) for a in args])
      inner = re.sub(r'(["\\$`])', r"\\\1", plain)
      tpu = ("gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all "
             f'--command="{inner}"')
      out.append((p["name"], plain, tpu))
    return out

  def read_index(self) -> dict[str, Any]:
    """WORKDIR/sweep.json as saved ({} if there is none)."""
    return workdir_lib.read_json(workdir_lib.Layout(self.workdir).sweep, {})

  def write_index(self, entries: list[dict[str, Any]]) -> None:
    """WORKDIR/sweep.json, atomically (process 0)."""
    if not sharding.is_main_process():
      return
    index = dict(config=self.config_file, overrides=_jsonable(self.overrides),
                 keys=list(dict.fromkeys(k for p in self.points for k in p["overrides"])),
                 updated=datetime.datetime.now().isoformat(timespec="seconds"),
                 points=entries)
    workdir_lib.write_json(workdir_lib.Layout(self.workdir).sweep, index)

  def run(self, run_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None
          ) -> list[dict[str, Any]]:
    """Runs every unfinished point in order; returns the index entries.

    A failing point is recorded (status 'failed', its error) and the others still run.

    Raises:
      RuntimeError: naming the failed points, after every point has had its turn.
    """
    run_fn = run_fn or main_lib.run
    before = {e["name"]: e for e in self.read_index().get("points", [])}
    entries = [dict(name=p["name"], workdir=p["name"], overrides=_jsonable(p["overrides"]),
                    status=self.status(i), seconds=before.get(p["name"], {}).get("seconds"),
                    error=None)
               for i, p in enumerate(self.points)]
    self.write_index(entries)
    for i, (entry, config) in enumerate(zip(entries, self.configs)):
      if entry["status"] == FINISHED:
        logging.info("sweep point %s: finished in an earlier run, skipped", entry["name"])
        continue
      logging.info("sweep point %d/%d %s %s", i + 1, len(entries), entry["name"],
                   "(resuming)" if entry["status"] == RUNNING else "")
      entry["status"] = RUNNING
      self.write_index(entries)
      t0 = time.time()
      try:
        run_fn(config, self.points[i]["workdir"])
        entry["status"], entry["error"] = FINISHED, None
      except Exception as e:  # noqa: BLE001 -- one failed point must not stop the sweep
        logging.exception("sweep point %s failed", entry["name"])
        entry["status"], entry["error"] = FAILED, f"{type(e).__name__}: {e}"
      entry["seconds"] = round(time.time() - t0, 1)
      self.write_index(entries)
    failed = [e["name"] for e in entries if e["status"] == FAILED]
    if failed:
      raise RuntimeError(f"sweep points failed: {failed} (errors in {self.workdir}/{INDEX})")
    return entries


def _flag_value(value: Any) -> str:
  """A value as `--config.key=` reads it back (config_flags: 'a,b' for a tuple)."""
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value)
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    return repr(dict(value))
  return str(value)


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda v: v.to_dict() if hasattr(v, "to_dict")
                               else repr(v)))


def run(config_file: str, workdir: str, *, sweep: Sequence[str] = (),
        overrides: Point | None = None, config_sweep: bool = True,
        dry_run: bool = False) -> list[dict[str, Any]] | list[tuple[str, str, str]]:
  """The Python form of the command line: the index entries, or with `dry_run` the commands."""
  s = Sweep(config_file, workdir, sweep=sweep, overrides=overrides, config_sweep=config_sweep)
  return s.commands() if dry_run else s.run()


_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "KEY=V1,V2,...: a one-off grid (several flags: their product).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print one launch command per point (plain and TPU VM), run nothing.")
_CONFIG_SWEEP = flags.DEFINE_bool(
    "config_sweep", True, "Include the config's own sweep (get_hyper / sweep); "
    "--noconfig_sweep runs the --sweep grid alone.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_flag = flags.FLAGS["config"]
  s = Sweep(config_flags.get_config_filename(config_flag), flags.FLAGS.workdir,
            sweep=_SWEEP.value, overrides=config_flags.get_override_values(config_flag),
            config_sweep=_CONFIG_SWEEP.value)
  if _DRY_RUN.value:
    for name, plain, tpu in s.commands():
      print(f"# {name}\n{plain}\n{tpu}")
    return
  logging.get_absl_handler().addFilter(main_lib._QuietOrbax())
  if flags.FLAGS.compilation_cache:  # main's flag: every point compiles into the same cache
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", flags.FLAGS.compilation_cache)
  for entry in s.run():
    logging.info("sweep point %s: %s", entry["name"], entry["status"])


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
