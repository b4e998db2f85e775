"""The one way to walk images: index plans, per-host slices, parallel decode, prefetch, sharding.

An analysis says WHICH examples it wants as a flat array of source indices (a *plan*: `cka_plan`,
`sample`, `first`, `split`), and HOW each model wants them (*views*: side and normalisation).
`Stream` cuts the plan into global steps of `step_size` examples; each process decodes only the
rows of each step that its devices hold (`sharding.host_rows`), in worker threads that run ahead
of the device by `prefetch` steps, decodes every image once and preprocesses it once per view,
and yields global arrays split over the mesh's `data` axis, with a mask for the padding of a
short last step. The order of examples, the composition of every step and the padding depend
only on the plan and `step_size`, never on the number of processes, devices or workers, so
results are the same on 1 CPU, 4 simulated devices or a pod slice, and a resumed run
(`start_step`) sees exactly the steps that an uninterrupted one would have seen next.

Throughput (benchmarks/input_bench.py, 500x375 JPEGs to 224 px): a worker spends ~1.0 ms of
CPU per image in PIL's JPEG decode and ~0.2 ms in the float32 conversion, OpenCV resize and
normalisation, all with the GIL released; what holds the GIL (PIL's header parsing, the
futures, this module's bookkeeping) is ~50 us per image, so the threads of one process scale to
well over 10,000 images/s before the GIL binds, and processes are not needed.

`stream_sums` sums a jitted per-step statistic over a stream (attention distances, receptive
fields, skip norms), optionally saving its running sums with a `resume.Checkpointer`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_analysis.input import data
from vit_analysis.runtime import errors
from vit_analysis.runtime import progress as progress_lib
from vit_analysis.runtime import resume as resume_lib
from vit_analysis.runtime import sharding

View = tuple[int, Any]  # (image side, normalisation: 'minus_one_one' or (mean, std) in [0, 1])


# ---------------------------------------------------------------------------------------------
# Index plans: pure NumPy, deterministic, the same on every process.


def cka_plan(num_source: int, num_examples: int, minibatch_size: int, repeats: int,
             seed: int) -> np.ndarray:
  """The minibatch-CKA protocol: N examples without replacement, cut into minibatches, R times.

  Equal to `data.cka_minibatch_indices(...)` reshaped, so CKA numbers do not change.

  Returns:
    int64 [repeats, k, minibatch_size], k = num_examples // minibatch_size; row r is repeat r.
  """
  rows = data.cka_minibatch_indices(num_source, num_examples, minibatch_size, repeats, seed)
  return rows.reshape(repeats, num_examples // minibatch_size, minibatch_size)


def sample(num_source: int, n: int, seed: int) -> np.ndarray:
  """`n` distinct indices: the first `n` of a seeded permutation of the source. int64 [n]."""
  if not 0 < n <= num_source:
    raise ValueError(f"sample of n={n} must be in [1, num_source={num_source}]")
  return np.random.default_rng(seed).permutation(num_source)[:n].astype(np.int64)


def first(num_source: int, n: int) -> np.ndarray:
  """The first `n` examples in source order. int64 [n]."""
  if not 0 < n <= num_source:
    raise ValueError(f"first n={n} must be in [1, num_source={num_source}]")
  return np.arange(n, dtype=np.int64)


def split(num_source: int) -> np.ndarray:
  """Every example of the source in order (a whole split). int64 [num_source]."""
  if num_source <= 0:
    raise ValueError(f"the source is empty (num_source={num_source})")
  return np.arange(num_source, dtype=np.int64)


def round_step(rows: int, mesh: jax.sharding.Mesh | None) -> int:
  """`rows` (examples, or minibatches when group > 1) per step, rounded up to split evenly.

  The multiple is the mesh's device count (and the process count), so that every device and
  process gets the same number of rows: `stream_sums(step_size=round_step(min(batch, n), mesh))`
  and, for CKA, `step_size = round_step(minibatches_per_step, mesh) * m` reproduce the step sizes
  the analyses used before the stream.
  """
  per = max(mesh.devices.size if mesh is not None else 1, jax.process_count())
  rows = max(1, int(rows))
  return -(-rows // per) * per


def plan_fingerprint(indices: np.ndarray, step_size: int, views: Mapping[str, View]) -> str:
  """A short hash of what a stream computes over (plan, step size, views): resume checks it."""
  h = hashlib.sha256(np.ascontiguousarray(np.asarray(indices, np.int64)).tobytes())
  h.update(repr((int(step_size), sorted((k, _view_key(v)) for k, v in views.items()))).encode())
  return h.hexdigest()[:16]


def _view_key(view: View) -> tuple[int, Any]:
  size, norm = view
  if isinstance(norm, str):
    return int(size), norm
  return int(size), tuple(tuple(float(x) for x in np.ravel(v)) for v in norm)


# ---------------------------------------------------------------------------------------------
# The stream.


class ExampleError(RuntimeError):
  """Loading or preprocessing one example failed in a worker; `index` is its source index.

  A `UserError` of the source (`data.CorruptImageError`) is not wrapped: it already names the
  file, its index and what to do.
  """

  def __init__(self, message: str, index: int):
    super().__init__(message)
    self.index = index


@dataclasses.dataclass
class StreamStep:
  """One global step.

  Attributes:
    step: global step index (0-based, over the whole plan).
    images: {view: [step_size, s, s, 3] float32}, or [step_size // group, group, s, s, 3] when
      group > 1; split over the mesh's first axis (a jax.Array), or this process's rows as
      NumPy when the stream has no mesh.
    mask: [step_size // group] float32, 1 for real examples (minibatches), 0 for padding.
    num_real: real examples in this step, over all processes.
    indices: int64 [step_size] the global step's source indices (padding included), host NumPy.
    labels: int32, shaped like the leading axes of `images`, when the stream has `with_labels`.
  """
  step: int
  images: dict[str, Any]
  mask: Any
  num_real: int
  indices: np.ndarray
  labels: Any = None


def _aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
  """An uninitialised float32 array whose data starts on an `align`-byte boundary.

  XLA:CPU adopts 64-byte-aligned host memory without copying (measured: `device_put` of a
  [32, 224, 224, 3] step 0.3 CPU ms per image from `np.empty`'s 16-byte alignment, 0.005 ms
  aligned); a fresh buffer per step is never written after it is handed over, so sharing it is
  safe. Accelerators copy either way.
  """
  nbytes = int(np.prod(shape)) * 4
  raw = np.empty(nbytes + align, np.uint8)
  offset = (-raw.ctypes.data) % align
  return raw[offset:offset + nbytes].view(np.float32).reshape(shape)


def default_workers() -> int:
  """One decode thread per host core, at most 32 (PIL and OpenCV release the GIL)."""
  return max(1, min(32, os.cpu_count() or 1))


class Stream:
  """Iterates over `source[indices]` in global steps of `step_size`, decoded in worker threads.

  Args:
    source: random access, `source[i] -> {'image': uint8 [h, w, c], 'label': int}`.
    indices: int [n] flat global plan (e.g. `cka_plan(...).reshape(-1)`).
    views: {name: (image_size, normalization)}; each image is decoded once and preprocessed once
      per view (`data.preprocess_image`).
    mesh: the device mesh; None yields this process's rows as host NumPy (no device transfer).
    step_size: examples per global step (all processes together). A short last step is padded
      by repeating its first example (its first group when group > 1), with mask 0.
    group: examples per row of the yielded arrays (CKA: the minibatch size m). `step_size` and,
      when group > 1, the plan's length must be multiples of it, so that a row is all real or
      all padding.
    start_step: the first step to yield (resume); earlier steps are not decoded.
    workers: decode threads (default `default_workers()`).
    prefetch: steps decoded ahead of the one the caller holds (host memory: about
      (prefetch + 1) steps of float32 images per view).
    desc: the progress line's name (absl INFO every ~10 s).
    with_labels: also yield labels.

  Raises:
    ValueError: for an empty or out-of-range plan, a bad view, or a `step_size` that does not
      split over `group`, the processes and the mesh's devices.
  """

  def __init__(self, source: Any, indices: np.ndarray, *, views: Mapping[str, View],
               mesh: jax.sharding.Mesh | None, step_size: int, group: int = 1,
               start_step: int = 0, workers: int | None = None, prefetch: int = 2,
               desc: str = "", with_labels: bool = False):
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(f"indices must be a non-empty 1-D integer array, got {indices.dtype} "
                       f"{indices.shape}")
    num_source = len(source)
    bad = np.flatnonzero((indices < 0) | (indices >= num_source))
    if bad.size:
      raise ValueError(f"index {int(indices[bad[0]])} (plan position {int(bad[0])}) is outside "
                       f"the source of {num_source} examples")
    if not views:
      raise ValueError("views must name at least one (image_size, normalization)")
    self.views: dict[str, View] = {}
    for name, view in views.items():
      try:
        size, norm = view
      except (TypeError, ValueError) as e:
        raise ValueError(f"view {name!r} must be (image_size, normalization), got {view!r}") from e
      if int(size) != size or size <= 0:
        raise ValueError(f"view {name!r}: image_size must be a positive int, got {size!r}")
      data.normalize(np.zeros((1, 1, 3), np.float32), norm)  # validates the normalisation
      self.views[name] = (int(size), norm)
    step_size, group = int(step_size), int(group)
    if step_size <= 0 or group <= 0 or step_size % group:
      raise ValueError(f"step_size {step_size} must be a positive multiple of group {group}")
    if group > 1 and len(indices) % group:
      raise ValueError(f"the plan's {len(indices)} examples are not whole groups of {group}")
    rows = step_size // group
    procs = jax.process_count()
    if rows % procs:
      raise ValueError(f"step_size {step_size} (= {rows} rows of {group}) does not split over "
                       f"{procs} processes")
    if mesh is not None:
      if rows % mesh.devices.size:
        raise ValueError(f"step_size {step_size} (= {rows} rows of {group}) does not split over "
                         f"the {mesh.devices.size} devices of the mesh")
      host = sharding.host_rows(mesh, rows)
    else:
      per = rows // procs
      host = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    self.num_steps = -(-len(indices) // step_size)
    if not 0 <= start_step <= self.num_steps:
      raise ValueError(f"start_step {start_step} is outside [0, {self.num_steps}]")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1 or prefetch < 1:
      raise ValueError(f"workers ({workers}) and prefetch ({prefetch}) must be >= 1")
    self.source, self.indices, self.mesh = source, indices.astype(np.int64), mesh
    self.step_size, self.group, self.rows, self.host_rows = step_size, group, rows, host
    self.start_step, self.workers, self.prefetch = int(start_step), workers, int(prefetch)
    self.desc, self.with_labels = desc, with_labels
    self.stats: dict[str, float] | None = None

  def __len__(self) -> int:
    return self.num_steps

  @property
  def num_examples(self) -> int:
    return len(self.indices)

  def num_real(self, step: int) -> int:
    """Real examples in global step `step`."""
    return int(min(self.step_size, self.num_examples - step * self.step_size))

  def step_indices(self, step: int) -> np.ndarray:
    """int64 [step_size]: the source indices of global step `step`, padding included."""
    real = self.indices[step * self.step_size:(step + 1) * self.step_size]
    if len(real) == self.step_size:
      return real
    pad = np.resize(real[:self.group], self.step_size - len(real))  # the first group, repeated
    return np.concatenate([real, pad])

  def __iter__(self) -> Iterator[StreamStep]:
    return self._generate()

  # -- workers --------------------------------------------------------------------------------

  def _load(self, buffers: dict[str, np.ndarray], labels: np.ndarray | None, row: int,
            index: int, position: int, step: int) -> None:
    try:
      ex = self.source[int(index)]
      image = np.asarray(ex["image"])
      if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a uint8 [h, w, 1|3|4] image, got {image.dtype} "
                         f"{image.shape}")
      x = image[..., :3].astype(np.float32)  # decoded and converted once for every view
      if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
      for name, (size, norm) in self.views.items():
        y = x if x.shape[:2] == (size, size) else data.resize_image(x, size)
        data.normalize(y, norm, out=buffers[name][row])
      if labels is not None:
        labels[row] = int(ex["label"])
    except errors.UserError:  # e.g. a corrupt image file: it names the file and what to do
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ExampleError(f"{self.desc or 'stream'}: example {int(index)} (plan position "
                         f"{position}, step {step}) failed: {type(e).__name__}: {e}",
                         int(index)) from e

  def _submit(self, pool: concurrent.futures.Executor, step: int):
    idx = self.step_indices(step)
    lo, hi = self.host_rows.start * self.group, self.host_rows.stop * self.group
    mine = idx[lo:hi]
    buffers = {name: _aligned_empty((len(mine), size, size, 3))
               for name, (size, _) in self.views.items()}
    labels = np.empty(len(mine), np.int32) if self.with_labels else None
    futures = [pool.submit(self._load, buffers, labels, row, i,
                           step * self.step_size + lo + row, step)
               for row, i in enumerate(mine)]
    return step, idx, futures, buffers, labels

  def _assemble(self, step: int, idx: np.ndarray, buffers: dict[str, np.ndarray],
                labels: np.ndarray | None) -> StreamStep:
    num_real = self.num_real(step)
    mask = (np.arange(self.rows) < num_real // self.group).astype(np.float32)[self.host_rows]
    lead = (-1,) if self.group == 1 else (-1, self.group)
    images = {name: b.reshape(lead + b.shape[1:]) for name, b in buffers.items()}
    if labels is not None:
      labels = labels.reshape(lead)
    if self.mesh is not None:
      put = lambda x: sharding.global_array(x, self.mesh, self.rows)
      images = {name: put(x) for name, x in images.items()}
      mask = put(mask)
      labels = None if labels is None else put(labels)
    return StreamStep(step=step, images=images, mask=mask, num_real=num_real, indices=idx,
                      labels=labels)

  def _generate(self) -> Iterator[StreamStep]:
    done_before = min(self.start_step * self.step_size, self.num_examples)
    prog = progress_lib.Progress(self.num_examples, self.desc or "stream", initial=done_before)
    pool = concurrent.futures.ThreadPoolExecutor(self.workers,
                                                 thread_name_prefix="vit_analysis-stream")
    pending: collections.deque = collections.deque()
    next_submit = self.start_step
    try:
      for step in range(self.start_step, self.num_steps):
        while next_submit < self.num_steps and next_submit <= step + self.prefetch:
          pending.append(self._submit(pool, next_submit))
          next_submit += 1
        _, idx, futures, buffers, labels = pending.popleft()
        progress_lib.at(f"{self.desc or 'stream'}, step {step + 1}/{self.num_steps}")
        for f in futures:
          f.result()  # re-raises a worker's ExampleError here, in the caller's thread
        yield self._assemble(step, idx, buffers, labels)
        prog.update(self.num_real(step))
      progress_lib.at("")  # finished: an interrupt from here on is not inside this stream
    finally:
      for _, _, futures, _, _ in pending:
        for f in futures:
          f.cancel()
      pool.shutdown(wait=True, cancel_futures=True)
      self.stats = prog.close()


# ---------------------------------------------------------------------------------------------
# Summing a per-step statistic over a stream (resumable).


def stream_sums(step_fn: Callable[..., Any], variables: Any, source: Any, indices: np.ndarray, *,
                step_size: int, image_size: int, normalization: Any = "minus_one_one",
                mesh: jax.sharding.Mesh, desc: str = "",
                compiler_options: dict[str, Any] | None = None,
                resume: resume_lib.Checkpointer | None = None,
                workers: int | None = None) -> tuple[Any, dict[str, float]]:
  """Sums `step_fn(variables, images, mask)` over `source[indices]` streamed in global steps.

  `step_fn` is jitted here (with `compiler_options`, e.g. XLA:CPU level 0) and must return
  per-step SUMS weighted by `mask` ([step_size] float32, 0 on padding); the running sums stay on
  device (replicated) and are added in step order, so the result does not depend on processes,
  devices or workers. With `resume`, the sums and the next step are saved every
  `resume.every_s` seconds and at the end; a rerun restores them and continues with the next
  step, giving bit-identical sums (the same float32 additions in the same order).

  Args:
    step_fn: `(variables, images [step_size, s, s, 3], mask [step_size]) -> pytree of sums`.
    variables: replicated on the mesh.
    source, indices: what to stream (a plan, e.g. `sample(len(source), n, seed)`).
    step_size: global examples per step (a multiple of the mesh's device count).
    image_size, normalization: the one view.
    mesh: the device mesh.
    desc: progress name.
    compiler_options: passed to `jax.jit`.
    resume: a `resume.Checkpointer`, or None.
    workers: decode threads (default `default_workers()`).

  Returns:
    (host NumPy pytree of the sums, {'num_images', 'seconds', 'examples_per_s',
    'first_batch_seconds'}); `num_images` counts restored steps too.

  Raises:
    resume.CheckpointError: if the saved sums belong to another plan (indices, step size, view).
  """
  views = {"image": (image_size, normalization)}
  stream = Stream(source, indices, views=views, mesh=mesh, step_size=step_size, desc=desc,
                  workers=workers)
  fn = jax.jit(step_fn, compiler_options=compiler_options,
               out_shardings=sharding.replicated(mesh))  # sums readable on every process
  params = sharding.replicate(variables, mesh)
  plan = plan_fingerprint(stream.indices, step_size, views)
  total, start = None, 0
  if resume is not None:
    like = None
    if resume_lib.workdir.exists(resume.path):  # the sums' structure, without computing
      spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32,
                                                sharding=sharding.data_sharding(mesh))
      like = jax.eval_shape(fn, params, spec((step_size, image_size, image_size, 3)),
                            spec((step_size,)))
    restored = resume.restore(like=like)
    if restored is not None:
      saved, start, extra = restored
      if extra.get("plan") != plan:
        raise resume_lib.CheckpointError(
            f"{resume.path} holds sums for plan {extra.get('plan')!r}, this stream is plan "
            f"{plan!r} (other indices, step size or preprocessing)")
      if start > 0:
        total = jax.device_put(saved, sharding.replicated(mesh))
  if start >= len(stream):  # finished before: nothing to recompute
    n = float(stream.num_examples)
    return jax.tree.map(np.asarray, jax.device_get(total)), {
        "num_images": n, "seconds": 0.0, "examples_per_s": 0.0, "first_batch_seconds": 0.0}
  stream = Stream(source, indices, views=views, mesh=mesh, step_size=step_size, desc=desc,
                  workers=workers, start_step=start)
  with contextlib.closing(iter(stream)) as steps:  # stops the workers at once on an error
    for batch in steps:
      sums = fn(params, batch.images["image"], batch.mask)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
      last = batch.step == len(stream) - 1
      if batch.step == start or last:  # time the compiling first step and the true end
        jax.block_until_ready(total)
      if resume is not None:
        resume.maybe_save(total, batch.step + 1, {"plan": plan}, force=last)
  total = jax.tree.map(np.asarray, jax.device_get(total))
  return total, dict(stream.stats)


# ---------------------------------------------------------------------------------------------
# A bounded set of images on every process.


def host_images(source: Any, indices: np.ndarray, image_size: int,
                normalization: Any = "minus_one_one", workers: int | None = None) -> np.ndarray:
  """Every image of `source[indices]`, preprocessed, as host float32 [n, s, s, 3].

  Every process decodes all of them (in worker threads), so that host-side decisions taken
  from them (e.g. which input patches are constant) agree across processes. For a bounded
  number of images only; loops over many images use `Stream`.
  """
  indices = np.asarray(indices, np.int64)
  out = np.empty((len(indices), image_size, image_size, 3), np.float32)

  def load(row: int) -> None:
    out[row] = data.preprocess_image(np.asarray(source[int(indices[row])]["image"]), image_size,
                                     normalization)

  with concurrent.futures.ThreadPoolExecutor(workers or default_workers()) as pool:
    list(pool.map(load, range(len(indices))))
  return out
