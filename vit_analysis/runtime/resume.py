"""Partial accumulators and a stream position, saved atomically so that a rerun resumes.

A checkpoint is one `.npz` file, `<directory>/state.npz`: the leaves of the state pytree (float64
CKA sums, running attention-distance sums, ...), their tree paths, the position (e.g. the next
global step) and a small JSON `extra`, with the caller's fingerprint (a hash of the config and
model) so that a rerun with another setting never continues someone else's sums. The file is
built in memory and written by `runtime.workdir.write_bytes` (local: a temporary file, fsynced,
`os.replace`d; `gs://`: one object upload): a crash at any point leaves either the old checkpoint
or the new one, never a mixture. Only
process 0 writes; every process reads the same file, and with several processes the restored
position is checked to be equal on all of them.

Between two periodic saves a checkpointer remembers the newest state it was offered (a
reference, no copy); `save_unsaved()` writes every such state at once. `main.run` calls it when
an analysis ends early (Ctrl-C, SIGTERM, a corrupt input file), so a rerun loses no finished
step, however long `checkpoint_every_s` is. A caller that changes a remembered state in place
calls `freeze()` first (or changes only what a resumed run rewrites identically).
"""
from __future__ import annotations

import io
import json
import copy
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vit_analysis.runtime import errors, workdir

FILENAME = "state.npz"
_FORMAT = 1
# Checkpointers holding a state newer than their file, by path (`save_unsaved`).
_UNSAVED: dict[str, "Checkpointer"] = {}


def _path_entry(key: Any) -> list[Any]:
  """One element of a tree path as JSON: ['dict', k] | ['seq', i] | ['attr', name] | ['flat', i]."""
  if isinstance(key, jax.tree_util.DictKey):
    return ["dict", key.key if isinstance(key.key, (str, int)) else str(key.key)]
  if isinstance(key, jax.tree_util.SequenceKey):
    return ["seq", key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return ["attr", key.name]
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return ["flat", key.key]
  return ["other", str(key)]


def _flatten(state: Any) -> tuple[list[list[list[Any]]], list[Any]]:
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
  return ([[_path_entry(k) for k in path] for path, _ in leaves_with_paths],
          [leaf for _, leaf in leaves_with_paths])


def _nested(paths: list[list[list[Any]]], leaves: list[Any]) -> Any:
  """Rebuilds nested dicts / lists from paths (attribute and other keys become dict keys)."""
  if len(paths) == 1 and not paths[0]:
    return leaves[0]
  root: dict[Any, Any] = {}
  for path, leaf in zip(paths, leaves):
    node = root
    for i, (_, key) in enumerate(path):
      if i == len(path) - 1:
        node[key] = leaf
      else:
        node = node.setdefault(key, {})

  def lists(node):
    if not isinstance(node, dict):
      return node
    node = {k: lists(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
      return [node[i] for i in range(len(node))]
    return node

  return lists(root)


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint that cannot be used: another fingerprint, a corrupt file, another structure.

  A `UserError` (the command line prints it plainly: deleting the file is the fix) and, as
  before, a ValueError.
  """


class Checkpointer:
  """Saves `(state, position, extra)` every `every_s` seconds; `restore()` reads it back.

  Args:
    directory: where `state.npz` lives (created on the first save).
    every_s: minimum seconds between two saves of `maybe_save`; 0 saves every time.
    fingerprint: the caller's description of what is being computed (config and model hash); a
      checkpoint saved under another fingerprint is refused.
    clock: seconds as a float (injectable for tests).
  """

  def __init__(self, directory: str, *, every_s: float = 60.0, fingerprint: str = "",
               clock: Callable[[], float] = time.monotonic):
    self.directory, self.every_s, self.fingerprint = directory, float(every_s), str(fingerprint)
    self._clock = clock
    self._last_save = clock()
    self._unsaved: tuple[Any, int, dict[str, Any] | None] | None = None

  @property
  def path(self) -> str:
    return workdir.join(self.directory, FILENAME)

  def restore(self, like: Any = None) -> tuple[Any, int, dict[str, Any]] | None:
    """The saved `(state, position, extra)`, or None when nothing was saved.

    Args:
      like: a template pytree of the saved structure (e.g. `cka.init(names)`); the result then has
        its type (dataclasses, named tuples, static fields) and each leaf is checked against the
        template's shape. Without it, the state comes back as nested dicts / lists of arrays
        (attribute names become dict keys).

    With several processes every process must call it (the positions are compared).

    Raises:
      CheckpointError: for another fingerprint (both named), an unreadable or truncated file, a
        structure or shape that does not match `like`, or processes that restored different
        positions (a workdir that not every host sees).
    """
    if not workdir.exists(self.path):
      _check_same_position(-1, self.path)
      return None
    try:
      with np.load(io.BytesIO(workdir.read_bytes(self.path)), allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        leaves = [z[f"leaf_{i:05d}"] for i in range(meta["num_leaves"])]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
      raise CheckpointError(f"checkpoint {self.path} is unreadable or truncated ({e!r}); delete "
                            "it to start again") from e
    if meta.get("format") != _FORMAT:
      raise CheckpointError(f"checkpoint {self.path} has format {meta.get('format')}, "
                            f"expected {_FORMAT}")
    if meta["fingerprint"] != self.fingerprint:
      raise CheckpointError(
          f"checkpoint {self.path} was saved for fingerprint {meta['fingerprint']!r}, but this "
          f"run has fingerprint {self.fingerprint!r} (another config or model); delete the "
          "directory or use another workdir")
    leaves = [leaf[()] if kind == "scalar" else leaf
              for leaf, kind in zip(leaves, meta["kinds"])]
    if like is None:
      state = _nested(meta["paths"], leaves)
    else:
      paths, template = _flatten(like)
      if paths != meta["paths"]:
        raise CheckpointError(f"checkpoint {self.path} holds leaves {meta['paths']}, the template "
                              f"has {paths}")
      for path, saved, want in zip(paths, leaves, template):
        if np.shape(saved) != np.shape(want):
          raise CheckpointError(f"checkpoint {self.path}: leaf {path} has shape "
                                f"{np.shape(saved)}, the template {np.shape(want)}")
      leaves = [type(want)(saved) if isinstance(want, (bool, int, float)) else saved
                for saved, want in zip(leaves, template)]
      state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
    position = int(meta["position"])
    _check_same_position(position, self.path)
    self._last_save = self._clock()
    return state, position, dict(meta["extra"])

  def maybe_save(self, state: Any, position: int, extra: dict[str, Any] | None = None,
                 force: bool = False) -> bool:
    """Saves when `every_s` has passed since the last save (or restore, or construction).

    Every process calls it; only process 0 writes. A throttled save needs no agreement between
    processes (nobody reads the file during the run). A forced save is a barrier: all processes
    must call it at the same point (e.g. the last step), and when it returns every process sees
    the new file, so a `restore()` right after it cannot read the previous one. `state` leaves
    are fetched to the host (`np.asarray`), so replicated device arrays are accepted.

    Returns:
      whether it saved (on process 0) or would have (others).
    """
    now = self._clock()
    if not force and now - self._last_save < self.every_s:
      self._unsaved = (state, position, extra)  # what an interrupt saves (`save_unsaved`)
      _UNSAVED[self.path] = self
      return False
    self._last_save = now
    self._forget()
    if jax.process_index() == 0:
      self._write(state, position, extra)
    if force:
      _barrier(f"resume save {self.path} {position}")
    return True

  def freeze(self) -> None:
    """Copies the remembered unsaved state, before its caller changes it in place.

    E.g. the CKA repeat loop, which fills a repeat's row of its results after the last remembered
    step; an interrupt there must save the results as they were at that step.
    """
    if self._unsaved is not None:
      state, position, extra = self._unsaved
      self._unsaved = (jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else x, state),
                       position, copy.deepcopy(extra))

  def save_unsaved(self) -> bool:
    """Writes the newest state offered to `maybe_save` since the last write (process 0), if any.

    No barrier: it runs while a run ends early, when the processes need not be at the same step.

    Returns:
      whether there was such a state.
    """
    if self._unsaved is None:
      return False
    state, position, extra = self._unsaved
    self._forget()
    if jax.process_index() == 0:
      self._write(state, position, extra)
    return True

  def _forget(self) -> None:
    self._unsaved = None
    if _UNSAVED.get(self.path) is self:
      del _UNSAVED[self.path]

  def _write(self, state: Any, position: int, extra: dict[str, Any] | None) -> None:
    paths, leaves = _flatten(state)
    arrays = [np.asarray(leaf) for leaf in leaves]
    for path, a in zip(paths, arrays):
      if a.dtype == object:
        raise TypeError(f"state leaf {path} is not numeric (dtype object)")
    meta = {"format": _FORMAT, "fingerprint": self.fingerprint, "position": int(position),
            "extra": extra or {}, "paths": paths, "num_leaves": len(arrays),
            "kinds": ["scalar" if isinstance(leaf, (bool, int, float, np.generic)) else "array"
                      for leaf in leaves]}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.asarray(json.dumps(meta)),
             **{f"leaf_{i:05d}": a for i, a in enumerate(arrays)})
    workdir.write_bytes(self.path, buf.getvalue())

  def clear(self) -> None:
    """Deletes the checkpoint (process 0), e.g. once the final result is saved; a barrier."""
    self._forget()
    if jax.process_index() == 0:
      workdir.remove(self.path)
    _barrier(f"resume clear {self.path}")


def save_unsaved() -> list[str]:
  """Writes every checkpointer's unsaved state (`Checkpointer.save_unsaved`); their paths.

  Called when an analysis ends early (an interrupt, a corrupt input, any error), so that the
  rerun continues from the last finished step instead of the last periodic save.
  """
  saved = []
  for path, checkpointer in list(_UNSAVED.items()):
    if checkpointer.save_unsaved():
      saved.append(path)
  return saved


def forget_unsaved() -> None:
  """Drops every remembered unsaved state (an analysis finished: its partial state is moot)."""
  for checkpointer in list(_UNSAVED.values()):
    checkpointer._forget()  # pylint: disable=protected-access


def _check_same_position(position: int, path: str) -> None:
  """Every process must continue from the same step (-1: nothing restored); a collective."""
  if jax.process_count() > 1:
    try:
      multihost_utils.assert_equal(np.int64(position), f"restored position of {path}")
    except AssertionError as e:
      raise CheckpointError(
          f"processes restored different positions from {path} (-1 = no checkpoint): is the "
          "workdir on a filesystem that every host sees?") from e


def _barrier(name: str) -> None:
  """Waits for every process (no-op with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
