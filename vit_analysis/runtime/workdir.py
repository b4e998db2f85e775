"""The run folder: its layout, and the one way to write a file into it.

A workdir is a local folder or a Cloud Storage prefix (`gs://bucket/run`, what a TPU VM pod uses
so that every host sees the same files). It holds:

  config.json           the result-relevant config (`main.check_workdir`)
  models.json           the built models' summaries
  timings.json          seconds per stage, for a rebuilt page
  report.html           the page (`vit_analysis.report`)
  results/<name>.json   an analysis' summary; results/<stem>.npz|json its arrays
  results/recipes/<name>.json|npz
                        how to redraw figure <name>: a `vit_analysis.plotting` function and its
                        arguments (`plotting.recipes`); the page redraws a missing figure
  figures/<name>.png    static figures (and .pdf), redrawn from their recipes when missing
  partial/<analysis>/   partial state of an interrupted analysis (`runtime.resume`)
  models/               the model cache (`config.model_cache`), shared by runs that name it
  sweep.json            a sweep's index of its points (in the sweep's folder)

Every module that reads or writes a run names these paths through `Layout` and writes through
`write_bytes` (or its text / JSON / npz forms), the one way to write so that a reader never sees
half a file:

* on a local disk: a temporary file in the same folder, flushed and fsynced, then `os.replace`d
  over the target (atomic on POSIX);
* on an object store: one upload of the whole object. A Cloud Storage object becomes visible only
  when its upload is finalised, so a reader sees the old object or the new one, never a part;
  there is no atomic rename on an object store (a "rename" is a copy and a delete), so nothing
  here renames for finality. A unit of several files is finalised by the file written last
  (e.g. `results/<analysis>.json` after its arrays and figures), which readers check first.

Paths are strings throughout (as the config and the report show them); `etils.epath` opens
`gs://` through gcsfs (fsspec) when TensorFlow is absent, the same client on a TPU VM and in the
tests (against a local Cloud Storage API server). A `gs://` path is never made absolute with
`os.path.abspath` (that would name a local folder `gs:`). No JAX here: the report imports it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

RESULTS, FIGURES, PARTIAL, MODELS, RECIPES = (
    "results", "figures", "partial", "models", "recipes")
CONFIG, MODELS_JSON, TIMINGS, REPORT, SWEEP = (
    "config.json", "models.json", "timings.json", "report.html", "sweep.json")


def is_remote(path: str | os.PathLike) -> bool:
  """True for an object-store path (`gs://...`, any `scheme://`)."""
  return "://" in os.fspath(path)


def join(root: str | os.PathLike, *parts: str) -> str:
  """`root/parts...` as a string; `gs://` prefixes are kept as they are."""
  root = os.fspath(root)
  if is_remote(root):
    return posixpath.join(root, *parts)
  return os.path.join(root, *parts)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (orbax wants one); a `gs://` path unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def basename(path: str | os.PathLike) -> str:
  """The last part of `path` (a trailing '/' ignored), for local and `gs://` paths alike."""
  return posixpath.basename(os.fspath(path).rstrip("/")) or os.fspath(path)


def parent(path: str) -> str | None:
  """The folder holding `path`; None above the root (`/`, or the bucket of a `gs://` path)."""
  path = os.fspath(path)
  if is_remote(path):
    scheme, rest = path.rstrip("/").split("://", 1)
    return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else None
  path = os.path.abspath(path)
  up = os.path.dirname(path)
  return None if up == path else up


def relpath(path: str, start: str) -> str:
  """`path` relative to `start` (both local, or both under the same `gs://` prefix)."""
  if is_remote(path) or is_remote(start):
    path, start = path.rstrip("/"), start.rstrip("/")
    if path == start:
      return "."
    if not path.startswith(start + "/"):
      raise ValueError(f"{path!r} is not under {start!r}")
    return path[len(start) + 1:]
  return os.path.relpath(path, start)


_FSSPEC_CONFIGURED = [False]


def _epath(path: str | os.PathLike) -> epath.Path:
  path = os.fspath(path)
  if is_remote(path) and not _FSSPEC_CONFIGURED[0]:
    # gcsfs caches folder listings per process; another host's (or process') new object would
    # then read as missing (a resumed position, a finished result). Every check asks the store.
    import fsspec  # pylint: disable=g-import-not-at-top
    for protocol in ("gs", "gcs"):
      fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    _FSSPEC_CONFIGURED[0] = True
  return epath.Path(path)


def exists(path: str | os.PathLike) -> bool:
  return os.path.exists(path) if not is_remote(path) else _epath(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  """A local folder, or a `gs://` prefix that holds at least one object."""
  return os.path.isdir(path) if not is_remote(path) else _epath(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  return os.path.isfile(path) if not is_remote(path) else _epath(path).is_file()


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in folder `path`, sorted ([] when it does not exist)."""
  if not isdir(path):
    return []
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in _epath(path).iterdir())


def walk(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk(root)` for local and `gs://` folders: (folder, subfolders, files), top-down."""
  if not is_remote(root):
    yield from os.walk(root)
    return
  names = listdir(root)
  dirs = [n for n in names if isdir(join(root, n))]
  yield root, dirs, [n for n in names if n not in dirs]
  for d in dirs:
    yield from walk(join(root, d))


def read_bytes(path: str | os.PathLike) -> bytes:
  """The whole file. Raises FileNotFoundError when it does not exist."""
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  p = _epath(path)
  if not p.exists():  # gcsfs raises its own errors for a missing object
    raise FileNotFoundError(f"no such file: {os.fspath(path)!r}")
  return p.read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
  """The JSON at `path`, or `default` when the file does not exist."""
  if not exists(path):
    return default
  return json.loads(read_text(path))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of the `.npz` at `path`, read in one request (no pickles)."""
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to `path` so that a reader sees the old file or the new one, never a part.

  Local: a temporary file beside the target (its folder created), fsynced, then `os.replace`d;
  it is removed if anything fails. `gs://`: one upload of the object (visible once finalised).

  Returns:
    `path` as a string.
  """
  path = os.fspath(path)
  if is_remote(path):
    with _epath(path).open("wb") as f:
      f.write(data)
    return path
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from the group
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_text(path: str | os.PathLike, text: str) -> str:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, **kwargs: Any) -> str:
  """`value` as JSON (`json.dumps(value, **kwargs)`, indent 1 by default) through `write_bytes`."""
  kwargs.setdefault("indent", 1)
  return write_text(path, json.dumps(value, **kwargs))


def npz_bytes(**arrays: Any) -> bytes:
  """`np.savez` of `arrays` into memory, for one `write_bytes`."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return buf.getvalue()


def save_npz(path: str | os.PathLike, **arrays: Any) -> str:
  """Writes `arrays` as one `.npz` at `path` through `write_bytes`."""
  return write_bytes(path, npz_bytes(**arrays))


def makedirs(path: str | os.PathLike) -> None:
  """Creates local folder `path`; nothing on an object store (prefixes need no creating)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str | os.PathLike) -> None:
  """Deletes file `path` if it exists."""
  if exists(path):
    if is_remote(path):
      _epath(path).unlink()
    else:
      os.remove(path)


def rmtree(path: str | os.PathLike) -> None:
  """Deletes folder `path` and everything under it, if it exists."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
  elif _epath(path).exists():
    _epath(path).rmtree()


@dataclasses.dataclass(frozen=True)
class Layout:
  """The paths of one run folder `root` (a local folder or a `gs://` prefix)."""
  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", os.fspath(self.root))

  def join(self, *parts: str) -> str:
    return join(self.root, *parts)

  @property
  def config(self) -> str:
    return self.join(CONFIG)

  @property
  def models_json(self) -> str:
    return self.join(MODELS_JSON)

  @property
  def timings(self) -> str:
    return self.join(TIMINGS)

  @property
  def report(self) -> str:
    return self.join(REPORT)

  @property
  def sweep(self) -> str:
    return self.join(SWEEP)

  @property
  def models(self) -> str:
    """The default model cache."""
    return self.join(MODELS)

  @property
  def results_dir(self) -> str:
    return self.join(RESULTS)

  def result(self, name: str, ext: str = ".json") -> str:
    """`results/<name><ext>`: an analysis' summary (.json) or arrays (.npz)."""
    return self.join(RESULTS, name + ext)

  def figure(self, name: str, fmt: str = "png") -> str:
    return self.join(FIGURES, f"{name}.{fmt}")

  def recipe(self, name: str, ext: str = ".json") -> str:
    """`results/recipes/<name><ext>`: how to redraw figure `<name>` (.json: the plotting
    function and its other arguments, written last; .npz: its array arguments)."""
    return self.join(RESULTS, RECIPES, name + ext)

  def partial(self, *parts: str) -> str:
    """`partial/<analysis>/<tag>`: partial state of an interrupted analysis."""
    return self.join(PARTIAL, *parts)

  def rel(self, path: str) -> str:
    """`path` relative to the root (as results name their figures)."""
    return relpath(path, self.root)
