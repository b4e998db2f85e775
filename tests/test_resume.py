"""resume.Checkpointer: round trips, fingerprints, atomic writes, corrupt files, throttling."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from vit_analysis.runtime import resume
from vit_analysis.similarity import cka


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _nested():
  return {"a": np.arange(3.0), "b": [np.ones((2, 2), np.float32), {"c": np.int64(5)}],
          "d": 3.5, "e": (np.zeros(0, np.int32), np.array(7, np.uint8))}


def _assert_same(x, y):
  assert type(x) is type(y) or (np.isscalar(x) and np.isscalar(y)), (type(x), type(y))
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_nested_with_and_without_template(tmp_path):
  ck = resume.Checkpointer(str(tmp_path / "ck"), fingerprint="cfg1")
  assert ck.restore() is None
  state = _nested()
  assert ck.maybe_save(state, 17, {"plan": "abc", "n": 3}, force=True)
  got, position, extra = ck.restore(like=_nested())
  assert position == 17 and extra == {"plan": "abc", "n": 3}
  assert isinstance(got["e"], tuple) and isinstance(got["d"], float)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    _assert_same(x, y)
  # Without a template: nested dicts and lists with the same leaves.
  plain, _, _ = ck.restore()
  np.testing.assert_array_equal(plain["b"][0], state["b"][0])
  assert plain["b"][1]["c"] == 5 and plain["d"] == 3.5 and isinstance(plain["e"], list)
  assert plain["e"][1].dtype == np.uint8
  ck.clear()
  assert ck.restore() is None


def test_round_trip_cka_state(tmp_path):
  names_a, names_b = ("x", "y", "z"), ("p", "q")
  rng = np.random.default_rng(0)
  template = cka.init(names_a, names_b, capacity=5)  # room for 5 minibatches, 4 used
  state = dataclasses.replace(
      template, cross=rng.normal(size=(5, 3, 2)), self_a=rng.normal(size=(5, 3)),
      num_minibatches=np.asarray(4, np.int64), num_examples=np.asarray(64, np.int64))
  ck = resume.Checkpointer(str(tmp_path), fingerprint="m")
  ck.maybe_save(state, 3, force=True)
  got, position, _ = ck.restore(like=cka.init(names_a, names_b, capacity=5))
  assert isinstance(got, cka.CKAState) and position == 3
  assert (got.names_a, got.names_b, got.intra) == (names_a, names_b, state.intra)
  for f in dataclasses.fields(cka.CKAState):
    if f.name not in ("names_a", "names_b", "intra"):
      _assert_same(getattr(got, f.name), getattr(state, f.name))
  # A template of another shape is refused, not silently reshaped.
  with pytest.raises(resume.CheckpointError, match="shape"):
    ck.restore(like=cka.init(("x",), names_b, capacity=5))


def test_fingerprint_mismatch_names_both(tmp_path):
  resume.Checkpointer(str(tmp_path), fingerprint="vit_b16-abc").maybe_save({"s": 1.0}, 1,
                                                                           force=True)
  with pytest.raises(resume.CheckpointError, match="vit_b16-abc.*r50-def"):
    resume.Checkpointer(str(tmp_path), fingerprint="r50-def").restore()


def test_crash_between_write_and_rename_keeps_old_file(tmp_path, monkeypatch):
  ck = resume.Checkpointer(str(tmp_path), fingerprint="f")
  ck.maybe_save({"s": np.arange(4)}, 1, force=True)

  def crash(*args):
    raise OSError("simulated crash before rename")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="simulated"):
    ck.maybe_save({"s": np.arange(4) * 10}, 2, force=True)
  monkeypatch.undo()
  state, position, _ = ck.restore()
  assert position == 1
  np.testing.assert_array_equal(state["s"], np.arange(4))
  assert os.listdir(tmp_path) == [resume.FILENAME]  # no temporary file left behind


def test_truncated_or_garbage_file_is_refused(tmp_path):
  ck = resume.Checkpointer(str(tmp_path))
  ck.maybe_save({"s": np.arange(1000.0)}, 5, force=True)
  with open(ck.path, "rb") as f:
    blob = f.read()
  with open(ck.path, "wb") as f:
    f.write(blob[:len(blob) // 2])
  with pytest.raises(resume.CheckpointError, match="unreadable or truncated"):
    ck.restore()
  with open(ck.path, "wb") as f:
    f.write(b"not a checkpoint")
  with pytest.raises(resume.CheckpointError, match="unreadable"):
    ck.restore()


def test_every_s_throttles_with_an_injected_clock(tmp_path):
  clock = FakeClock()
  ck = resume.Checkpointer(str(tmp_path), every_s=60.0, clock=clock)
  assert not ck.maybe_save({"s": 1.0}, 1)  # nothing saved right after construction
  assert not os.path.exists(ck.path)
  clock.now += 59.9
  assert not ck.maybe_save({"s": 1.0}, 2)
  clock.now += 0.2
  assert ck.maybe_save({"s": 2.0}, 3)
  assert ck.restore()[1] == 3
  assert not ck.maybe_save({"s": 3.0}, 4)  # the clock restarts at every save (and restore)
  assert ck.maybe_save({"s": 3.0}, 4, force=True)
  clock.now += 61
  assert ck.maybe_save({"s": 4.0}, 5)
  assert ck.restore()[1] == 5


def test_non_numeric_leaf_is_refused(tmp_path):
  with pytest.raises(TypeError, match="not numeric"):
    resume.Checkpointer(str(tmp_path)).maybe_save({"s": np.array([object()])}, 1, force=True)


def test_unsaved_state_is_written_when_a_run_ends_early(tmp_path):
  """Between periodic saves the newest state is remembered; `save_unsaved` writes it (what
  `main.run` does on Ctrl-C or a corrupt file), `freeze` protects it from in-place changes."""
  clock = FakeClock()
  a = resume.Checkpointer(str(tmp_path / "a"), every_s=60.0, fingerprint="f", clock=clock)
  b = resume.Checkpointer(str(tmp_path / "b"), every_s=60.0, fingerprint="f", clock=clock)
  out = {"rows": np.zeros(3)}
  assert not a.maybe_save({"out": out}, 1) and not b.maybe_save({"out": out}, 4)
  assert not os.path.exists(a.path)  # throttled: remembered only
  assert a.maybe_save({"out": out}, 2, force=True) and os.path.exists(a.path)
  a.maybe_save({"out": out}, 3, {"plan": "p"})
  a.freeze()
  out["rows"][0] = 9.0  # e.g. a repeat's results filled in after the last remembered step
  b.clear()  # a finished part: nothing of it is saved any more
  assert resume.save_unsaved() == [a.path]
  state, position, extra = a.restore()
  assert position == 3 and extra == {"plan": "p"}
  np.testing.assert_array_equal(state["out"]["rows"], [0.0, 0.0, 0.0])
  assert not os.path.exists(b.path) and resume.save_unsaved() == []
  a.maybe_save({"out": out}, 4)
  resume.forget_unsaved()  # the analysis finished
  assert resume.save_unsaved() == [] and a.restore()[1] == 3
