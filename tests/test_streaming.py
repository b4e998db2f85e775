"""streaming: plans, the Stream (padding, masks, views, workers, devices), sums, resume."""
import collections
import logging
import os
import sys
import threading

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.input import data, streaming
from vit_analysis.runtime import progress, resume, sharding

TIMM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class CountingSource:
  """Images of varying size whose pixel (0, 0, 0) is the example index; counts every read."""

  def __init__(self, n, fail_at=None):
    rng = np.random.default_rng(0)
    self.images = [rng.integers(0, 256, (5 + i % 3, 7 - i % 2, 3), dtype=np.uint8)
                   for i in range(n)]
    for i, im in enumerate(self.images):
      im[0, 0, 0] = i
    self.num_classes, self.reads, self.fail_at = 3, collections.Counter(), fail_at
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    with self._lock:
      self.reads[int(i)] += 1
    if self.fail_at is not None and int(i) == self.fail_at:
      raise OSError("disk on fire")
    return {"image": self.images[int(i)], "label": int(i) % 3}


def _stream_threads():
  return [t for t in threading.enumerate() if t.name.startswith("vit_analysis-stream")]


def test_plans_equal_the_existing_samplers():
  plan = streaming.cka_plan(100, 40, 10, 3, seed=5)
  assert plan.shape == (3, 4, 10)
  np.testing.assert_array_equal(plan.reshape(-1, 10), data.cka_minibatch_indices(100, 40, 10, 3, 5))
  np.testing.assert_array_equal(streaming.sample(50, 7, seed=3),
                                np.random.default_rng(3).permutation(50)[:7])
  np.testing.assert_array_equal(streaming.first(9, 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(streaming.split(5), np.arange(5))
  for bad in (lambda: streaming.sample(5, 6, 0), lambda: streaming.first(5, 0),
              lambda: streaming.split(0)):
    with pytest.raises(ValueError, match="num_source"):
      bad()


def test_round_step():
  mesh4, mesh1 = sharding.make_mesh(), sharding.make_mesh(jax.devices()[:1])
  assert [streaming.round_step(r, mesh4) for r in (0, 1, 4, 5, 64)] == [4, 4, 4, 8, 64]
  assert [streaming.round_step(r, mesh1) for r in (1, 5)] == [1, 5]
  assert streaming.round_step(3, None) == 3


def test_stream_yields_the_plan_with_views_padding_and_mask():
  src = CountingSource(23)
  plan = streaming.sample(23, 10, seed=1)
  views = {"vit": (4, "minus_one_one"), "timm": (6, TIMM)}
  st = streaming.Stream(src, plan, views=views, mesh=sharding.make_mesh(), step_size=4,
                        with_labels=True, workers=2)
  assert len(st) == 3
  steps = list(st)
  assert [s.step for s in steps] == [0, 1, 2] and [s.num_real for s in steps] == [4, 4, 2]
  for s in steps:
    real = plan[4 * s.step:4 * s.step + 4]
    want = np.concatenate([real, np.repeat(real[:1], 4 - len(real))])
    np.testing.assert_array_equal(s.indices, want)
    np.testing.assert_array_equal(np.asarray(s.mask), np.arange(4) < len(real))
    np.testing.assert_array_equal(np.asarray(s.labels), want % 3)
    assert s.images["vit"].shape == (4, 4, 4, 3) and s.images["timm"].shape == (4, 6, 6, 3)
    assert s.images["vit"].sharding.spec == jax.sharding.PartitionSpec("data")
    for name, (size, norm) in views.items():
      ref = np.stack([data.preprocess_image(src.images[i], size, norm) for i in want])
      np.testing.assert_array_equal(np.asarray(s.images[name]), ref)
  # Each real example decoded once for both views; the padding example once more.
  assert sum(src.reads.values()) == 12 and set(src.reads) == set(plan)
  assert st.stats["num_images"] == 10
  assert not _stream_threads()


def test_groups_are_minibatches_and_padding_repeats_the_first_group():
  src = CountingSource(30)
  plan = streaming.cka_plan(30, 18, 3, 1, seed=0).reshape(-1)  # 6 minibatches of 3
  st = streaming.Stream(src, plan, views={"a": (5, "minus_one_one")}, mesh=sharding.make_mesh(),
                        step_size=12, group=3)
  steps = list(st)
  assert len(steps) == 2 and [s.num_real for s in steps] == [12, 6]
  last = steps[1]
  assert last.images["a"].shape == (4, 3, 5, 5, 3)
  np.testing.assert_array_equal(np.asarray(last.mask), [1, 1, 0, 0])
  groups = last.indices.reshape(4, 3)
  np.testing.assert_array_equal(groups[:2], plan[12:].reshape(2, 3))
  np.testing.assert_array_equal(groups[2], groups[0])
  np.testing.assert_array_equal(groups[3], groups[0])
  got = np.asarray(last.images["a"])[1, 2]
  np.testing.assert_array_equal(got, data.preprocess_image(src.images[plan[17]], 5))
  with pytest.raises(ValueError, match="whole groups"):
    streaming.Stream(src, plan[:17], views={"a": (5, "minus_one_one")}, mesh=None,
                     step_size=12, group=3)


def test_start_step_skips_without_decoding():
  src = CountingSource(20)
  plan = streaming.split(20)
  full = [np.asarray(s.images["a"]) for s in streaming.Stream(
      src, plan, views={"a": (3, "minus_one_one")}, mesh=sharding.make_mesh(), step_size=8)]
  src.reads.clear()
  st = streaming.Stream(src, plan, views={"a": (3, "minus_one_one")}, mesh=sharding.make_mesh(),
                        step_size=8, start_step=1)
  rest = list(st)
  assert [s.step for s in rest] == [1, 2]
  assert min(src.reads) == 8  # steps before start_step are never read
  for a, b in zip(full[1:], rest):
    np.testing.assert_array_equal(a, np.asarray(b.images["a"]))
  assert st.stats["num_images"] == 20  # the skipped steps count as done, not in the rate
  assert list(streaming.Stream(src, plan, views={"a": (3, "minus_one_one")}, mesh=None,
                               step_size=8, start_step=3)) == []


def test_same_result_for_workers_and_devices():
  src = CountingSource(17)
  plan = streaming.sample(17, 17, seed=2)
  results = []
  for workers, devices in ((1, 4), (2, 4), (3, 1), (2, None)):
    mesh = None if devices is None else sharding.make_mesh(jax.devices()[:devices])
    st = streaming.Stream(src, plan, views={"a": (4, TIMM)}, mesh=mesh, step_size=8,
                          workers=workers, prefetch=1 + workers % 2)
    results.append(np.concatenate([np.asarray(s.images["a"]) for s in st]))
  for r in results[1:]:
    np.testing.assert_array_equal(r, results[0])


def test_worker_errors_propagate_and_early_stop_leaves_no_threads():
  src = CountingSource(20, fail_at=13)
  st = streaming.Stream(src, streaming.split(20), views={"a": (3, "minus_one_one")},
                        mesh=sharding.make_mesh(), step_size=4, workers=2)
  seen = []
  with pytest.raises(streaming.ExampleError, match=r"example 13 \(plan position 13, step 3\)"
                     r".*OSError: disk on fire") as info:
    for s in st:
      seen.append(s.step)
  assert info.value.index == 13 and seen == [0, 1, 2]
  assert isinstance(info.value.__cause__, OSError)
  assert not _stream_threads()
  ok = CountingSource(40)
  it = iter(streaming.Stream(ok, streaming.split(40), views={"a": (3, "minus_one_one")},
                             mesh=None, step_size=4, workers=2, prefetch=2))
  next(it)
  it.close()  # the consumer stops early
  assert not _stream_threads()
  assert max(ok.reads) < 16  # decoding ran at most `prefetch` steps ahead


def test_bad_arguments_are_named():
  src = CountingSource(8)
  mesh = sharding.make_mesh()
  view = {"a": (3, "minus_one_one")}
  with pytest.raises(ValueError, match="4 devices"):
    streaming.Stream(src, streaming.split(8), views=view, mesh=mesh, step_size=6)
  with pytest.raises(ValueError, match="index 9 .*outside"):
    streaming.Stream(src, np.array([0, 9]), views=view, mesh=mesh, step_size=4)
  with pytest.raises(ValueError, match="normalization"):
    streaming.Stream(src, streaming.split(8), views={"a": (3, "imagenet")}, mesh=mesh,
                     step_size=4)
  with pytest.raises(ValueError, match="start_step"):
    streaming.Stream(src, streaming.split(8), views=view, mesh=mesh, step_size=4, start_step=3)


def _pixel_mean_step(variables, images, mask):
  per_image = images.mean(axis=(1, 2, 3)) * variables["scale"]
  return {"sum": jnp.sum(per_image * mask), "count": jnp.sum(mask)}


def test_stream_sums_equals_numpy():
  src = CountingSource(30)
  plan = streaming.sample(30, 13, seed=4)
  sums, stats = streaming.stream_sums(_pixel_mean_step, {"scale": jnp.float32(2.0)}, src, plan,
                                      step_size=8, image_size=6, normalization=TIMM,
                                      mesh=sharding.make_mesh(), desc="test")
  ref = sum(2.0 * data.preprocess_image(src.images[i], 6, TIMM).astype(np.float64).mean()
            for i in plan)
  np.testing.assert_allclose(sums["sum"], ref, rtol=1e-5)
  assert sums["count"] == 13 and stats["num_images"] == 13
  assert set(stats) == {"num_images", "seconds", "examples_per_s", "first_batch_seconds"}


def test_stream_sums_resumes_bit_identically(tmp_path):
  src = CountingSource(40)
  plan = streaming.sample(40, 37, seed=0)
  kwargs = {"step_size": 4, "image_size": 5, "mesh": sharding.make_mesh(), "desc": "resume test"}
  variables = {"scale": jnp.float32(1.0)}
  want, _ = streaming.stream_sums(_pixel_mean_step, variables, src, plan, **kwargs)
  # Interrupted run: saves after every step (every_s=0), then example plan[22] (step 5) fails.
  ck = resume.Checkpointer(str(tmp_path), every_s=0.0, fingerprint="pixel-mean")
  broken = CountingSource(40, fail_at=int(plan[22]))
  with pytest.raises(streaming.ExampleError):
    streaming.stream_sums(_pixel_mean_step, variables, broken, plan, resume=ck, **kwargs)
  saved_position = ck.restore()[1]
  assert 1 <= saved_position <= 5
  src.reads.clear()
  ck = resume.Checkpointer(str(tmp_path), every_s=1e9, fingerprint="pixel-mean")
  got, stats = streaming.stream_sums(_pixel_mean_step, variables, src, plan, resume=ck, **kwargs)
  assert set(src.reads) == set(plan[4 * saved_position:])  # restarts at the saved step
  assert sum(src.reads.values()) == 37 - 4 * saved_position + 3  # + the last step's padding
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])  # bit-identical
  assert got["count"] == 37 and stats["num_images"] == 37  # nothing counted twice or skipped
  # Finished: a rerun restores the final sums without decoding anything.
  src.reads.clear()
  again, _ = streaming.stream_sums(_pixel_mean_step, variables, src, plan, resume=ck, **kwargs)
  assert not src.reads
  np.testing.assert_array_equal(again["sum"], want["sum"])
  with pytest.raises(resume.CheckpointError, match="plan"):
    streaming.stream_sums(_pixel_mean_step, variables, src, plan[:-1], resume=ck, **kwargs)


def test_progress_rate_excludes_first_update(caplog):
  now = [0.0]
  p = progress.Progress(100, "demo", clock=lambda: now[0], every_s=10)
  with caplog.at_level(logging.INFO):
    now[0] = 30.0  # compilation
    p.update(10)
    now[0] = 35.0
    p.update(20)
    assert "demo: 30/100 images, 4.0 images/s, ETA 18 s" in p.line()
    now[0] = 45.0
    p.update(40)
    stats = p.close()
  assert stats == {"num_images": 70.0, "seconds": 45.0, "examples_per_s": 4.0,
                   "first_batch_seconds": 30.0}
  lines = [r.getMessage() for r in caplog.records if "demo" in r.getMessage()]
  assert len(lines) == 3  # t=30 (>= 10 s since start), t=45, and the final line
  assert p.close() == stats  # idempotent, logs once


# ---------------------------------------------------------------------------------------------
# Two processes (jax.distributed, gloo): each decodes its own rows; the global arrays, the sums
# and the checkpoint (written by process 0 only) match one process with 4 devices.

_MP_PLAN = {"num_examples": 24, "minibatch_size": 4, "step_size": 16}


def _mp_pixel_step(variables, images, mask):
  del variables
  return {"sq": jnp.sum((images ** 2).mean((1, 2, 3)) * mask), "n": jnp.sum(mask)}


def _mp_compute(ckdir):
  """(CKA-style stream image sums [steps*4, 4], stream_sums, checkpoint position)."""
  from jax.experimental import multihost_utils
  mesh = sharding.make_mesh()
  src = data.digits_source("test")
  plan = streaming.cka_plan(len(src), _MP_PLAN["num_examples"], _MP_PLAN["minibatch_size"], 1,
                            seed=0).reshape(-1)
  rows = []
  for s in streaming.Stream(src, plan, views={"a": (36, "minus_one_one")}, mesh=mesh,
                            step_size=_MP_PLAN["step_size"], group=_MP_PLAN["minibatch_size"]):
    x = s.images["a"]
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    rows.append(np.asarray(x, np.float64).sum((2, 3, 4)))
  ck = resume.Checkpointer(ckdir, every_s=0.0, fingerprint="mp")
  sums, _ = streaming.stream_sums(_mp_pixel_step, {}, src, streaming.sample(len(src), 21, 1),
                                  step_size=8, image_size=40, mesh=mesh, resume=ck)
  return np.concatenate(rows), sums, ck.restore()[1]


def _mp_worker(port, process_id, out, ckdir):
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  assert jax.process_count() == 2 and jax.device_count() == 4
  rows, sums, position = _mp_compute(ckdir)
  np.savez(f"{out}{process_id}.npz", rows=rows, position=position, **sums)
  jax.distributed.shutdown()


def test_two_processes_decode_their_rows_and_match_one_process(tmp_path):
  port = helpers.free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(streaming.__file__))))] +
      [p for p in [os.environ.get("PYTHONPATH")] if p]))
  ckdir = str(tmp_path / "ck")
  helpers.run_processes([[sys.executable, os.path.abspath(__file__), str(port), str(i),
                          str(tmp_path / "out"), ckdir] for i in range(2)], env=env,
                        what="distributed stream workers")
  assert os.listdir(ckdir) == [resume.FILENAME]  # one writer, no temporary files
  rows, sums, position = _mp_compute(str(tmp_path / "ck_single"))
  for i in range(2):
    out = np.load(f"{tmp_path / 'out'}{i}.npz")
    np.testing.assert_array_equal(out["rows"], rows)  # the same images in the same minibatches
    np.testing.assert_allclose(out["sq"], sums["sq"], rtol=1e-6)  # all-reduce order differs
    assert out["n"] == sums["n"] == 21 and out["position"] == position == 3


if __name__ == "__main__":  # one process of the two-process test
  _mp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])


def test_corrupt_file_is_named_or_skipped_the_same_way_on_any_worker_count(tmp_path):
  """A file that does not decode ends the stream with the source's own error (file, index),
  not an ExampleError; with skip_corrupt the next file takes its place, whatever the workers."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "a")
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(
        tmp_path / "a" / f"{i:02d}.png")
  for i in (4, 11):  # 11: the last file, replaced by the first (wrapping around)
    (tmp_path / "a" / f"{i:02d}.png").write_bytes(b"\x89PNG truncated")
  view = {"a": (5, "minus_one_one")}
  stream = streaming.Stream(data.FolderSource(str(tmp_path)), streaming.split(12), views=view,
                            mesh=None, step_size=4, workers=2, desc="t")
  with pytest.raises(data.CorruptImageError, match=r"04.png' \(example 4 of 12 in its folder"):
    list(stream)
  assert progress.where() == "t, step 2/3"
  got = []
  for workers in (1, 3):
    data.clear_skipped()
    src = data.FolderSource(str(tmp_path), skip_corrupt=True)
    steps = streaming.Stream(src, streaming.split(12), views=view, mesh=None, step_size=4,
                             workers=workers, with_labels=True)
    got.append(np.concatenate([s.images["a"] for s in steps]))
    assert data.skipped_files() == {str(tmp_path / "a" / "04.png"): 4,
                                    str(tmp_path / "a" / "11.png"): 11}
    assert progress.where() == ""  # finished
  np.testing.assert_array_equal(got[0], got[1])
  ok = data.FolderSource(str(tmp_path), skip_corrupt=True)
  np.testing.assert_array_equal(got[0][4], data.preprocess_image(ok[5]["image"], 5))
  np.testing.assert_array_equal(got[0][11], got[0][0])
  data.clear_skipped()
