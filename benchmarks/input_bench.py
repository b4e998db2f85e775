"""Host input at 224 px: a main-thread loop, the Stream with 1 and 2 workers, a CKA step.

Workload: ImageNet-like JPEGs written by this script (500x375 crops and resizes of
scikit-image's photographs astronaut, coffee, chelsea and rocket, flipped and shifted so that no
two files are equal, quality 90) in a temporary folder with 4 class subfolders, read through
`data.FolderSource`. Measured in one run, each as the median of `--reps` repetitions:

* decode only: `FolderSource[i]` (file read + PIL decode), main thread;
* main thread: decode + `data.preprocess_image` (OpenCV bilinear resize, [-1, 1]), image by
  image in the main thread (what a plain loop without the Stream does);
* `streaming.Stream` at 224 px, 1 and 2 worker threads, ending on host NumPy (no mesh) and on
  the device (a mesh of this machine's devices; the images are `block_until_ready`);
* the ViT-B/16 fine-preset CKA step (capture of every fine layer + `cka.minibatch_terms`, one
  minibatch of m images, random weights, 224 px) on this machine, in images/s, beside them.

Then the arithmetic for a TPU-VM host: how many decode workers keep up with N images/s of device
throughput, from the measured per-worker rate.

Usage:
  python benchmarks/input_bench.py [--images 384] [--reps 3] [--m 8] [--quick | --smoke]

`--quick`: 32 images, 1 repetition, ViT-Ti/16 instead of ViT-B/16. `--smoke` (seconds; run by
tests/test_benchmarks.py so that the script cannot rot): 8 small JPEGs, 32 px, 1 repetition, the
smoke ViT; every path is still measured and printed.

Measured 2026-12-07 on this project's 2-core CPU VM, quiet (384 JPEGs, median of 3; two runs):
  decode only (file + PIL), main thread       1239-1298 images/s   0.77-0.81 CPU ms/image
  decode + preprocess_image, main thread        550-564 images/s   2.35-2.37 CPU ms/image
  Stream, 1 worker, to device                   637-834 images/s   1.76-2.24 CPU ms/image
  Stream, 2 workers, to device                1189-1412 images/s   1.35-1.58 CPU ms/image
  ViT-B_16 fine-preset CKA step (74 layers, m=8): 3.3-4.2 images/s on this CPU (compile 3-4 s)
One core runs 1000 / 2.24 = 450 images/s of the Stream (570 in the faster run), so a TPU-VM host
needs ceil(N / 450) worker threads (+1 core for the main thread) for N images/s of device
throughput: 6 for 2,500/s, 12 for 5,000/s. (On 2026-12-01, with 5 other jobs sharing the
machine, the Stream gave 215-239/s.)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_images(root: str, num_images: int, size: tuple[int, int] = (500, 375),
                 quality: int = 90) -> list[str]:
  """Writes `num_images` JPEGs of `size` (w, h) into `root/<photo>/<k>.jpg`; returns the paths."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = size
  paths = []
  for k in range(num_images):
    name = PHOTOS[k % len(PHOTOS)]
    photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    variant = k // len(PHOTOS)
    scale = max(w / photo.width, h / photo.height) * (1 + 0.03 * (variant % 5))
    photo = photo.resize((math.ceil(photo.width * scale), math.ceil(photo.height * scale)),
                         Image.BILINEAR)
    dx = (variant * 7) % (photo.width - w + 1)
    dy = (variant * 5) % (photo.height - h + 1)
    photo = photo.crop((dx, dy, dx + w, dy + h))
    if variant % 2:
      photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    path = os.path.join(root, name, f"{k:05d}.jpg")
    photo.save(path, "JPEG", quality=quality)
    paths.append(path)
  return paths


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of all threads of this process) of `fn()`."""
  c, t = time.process_time(), time.perf_counter()
  fn()
  return time.perf_counter() - t, time.process_time() - c


def _median_rate(fn, n: int, reps: int) -> float:
  return statistics.median(n / _timed(fn)[0] for _ in range(reps))


def input_rates(root: str, *, image_size: int = 224, workers: tuple[int, ...] = (1, 2),
                reps: int = 3, old_images: int | None = None, step_size: int = 32
                ) -> dict[str, tuple[float, float]]:
  """Images/s and CPU ms per image of each input path over the folder `root`.

  Repetitions go round all paths in turn (so a change of load on a shared machine hits every
  path alike); each figure is the median over repetitions.

  Returns:
    {path: (images/s wall, CPU ms/image)}, paths 'decode', 'old_path', 'stream_host_w{k}',
    'stream_device_w{k}'.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from vit_analysis.input import (
    data,
    streaming,  # pylint: disable=g-import-not-at-top
  )
  from vit_analysis.runtime import sharding
  src = data.FolderSource(root)
  n = len(src)
  old_n = min(n, old_images or n)
  views = {"image": (image_size, "minus_one_one")}
  mesh = sharding.make_mesh()
  step = -(-step_size // mesh.devices.size) * mesh.devices.size

  def decode():
    for i in range(n):
      src[i]

  def old_path():  # as the analyses' old host step: per image, main thread
    out = [data.preprocess_image(src[i]["image"], image_size) for i in range(old_n)]
    return np.stack(out)

  def stream(w, to_device):
    def run():
      for s in streaming.Stream(src, streaming.split(n), views=views,
                                mesh=mesh if to_device else None, step_size=step, workers=w):
        if to_device:
          jax.block_until_ready(s.images["image"])
    return run

  paths = {"decode": (decode, n), "old_path": (old_path, old_n)}
  for w in workers:
    paths[f"stream_host_w{w}"] = (stream(w, False), n)
    paths[f"stream_device_w{w}"] = (stream(w, True), n)
  stream(max(workers), True)()  # warm-up: page cache, thread start, first transfers
  times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
  for _ in range(reps):
    for k, (fn, _) in paths.items():
      times[k].append(_timed(fn))
  return {k: (statistics.median(paths[k][1] / wall for wall, _ in v),
              statistics.median(1000 * cpu / paths[k][1] for _, cpu in v))
          for k, v in times.items()}


def cka_step_rate(model_name: str, m: int, image_size: int, reps: int) -> tuple[float, int, float]:
  """Images/s of one fine-preset CKA step (one minibatch of m) of `model_name` at random weights.

  Returns:
    (images/s, number of captured layers, compile seconds).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from vit_analysis import models
  from vit_analysis.models import capture
  from vit_analysis.models.build import LoadedModel
  from vit_analysis.similarity import cka, representations
  # pylint: enable=g-import-not-at-top
  module = models.create_model(model_name, num_classes=1000, image_size=image_size)
  shape = (image_size, image_size, 3)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1,) + shape), train=False))(
      jax.random.key(0))
  names = representations.resolve_layers(
      LoadedModel("bench", model_name, module, variables, image_size), "fine")
  fn = capture.make_capture_fn(module, names)

  @jax.jit
  def step(variables, images):
    feats = fn(variables, images)
    return cka.minibatch_terms([feats[n][None] for n in names])

  images = jax.random.uniform(jax.random.key(1), (m,) + shape, minval=-1, maxval=1)
  t = time.perf_counter()
  jax.block_until_ready(step(variables, images))
  compile_s = time.perf_counter() - t
  rate = _median_rate(lambda: jax.block_until_ready(step(variables, images)), m, reps)
  return rate, len(names), compile_s


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=384)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--m", type=int, default=8, help="CKA minibatch size on this CPU")
  parser.add_argument("--model", default="ViT-B_16")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="seconds: 8 JPEGs of 64x48, 32 px, 1 repetition, ViT-smoke_8")
  args = parser.parse_args()
  size, jpeg, step_size = 224, (500, 375), 32
  if args.quick:
    args.images, args.reps, args.m, args.model = 32, 1, 4, "ViT-Ti_16"
  if args.smoke:
    args.images, args.reps, args.m, args.model = 8, 1, 4, "ViT-smoke_8"
    size, jpeg, step_size = 32, (64, 48), 4
  with tempfile.TemporaryDirectory() as root:
    write_images(root, args.images, size=jpeg)
    rates = input_rates(root, image_size=size, reps=args.reps, step_size=step_size,
                        old_images=max(32, args.images // 3))
  cores = os.cpu_count()
  print(f"input at {size} px, {args.images} JPEGs of {jpeg[0]}x{jpeg[1]} (q90), {cores} cores, "
        f"median of {args.reps} (wall images/s; CPU ms per image, all threads):")
  labels = {"decode": "decode only (file + PIL), main thread",
            "old_path": "decode + preprocess_image, main thread"}
  for w in (1, 2):
    for where in ("host", "device"):
      labels[f"stream_{where}_w{w}"] = (f"Stream, {w} worker{'s' if w > 1 else ''}, to "
                                        f"{'host NumPy' if where == 'host' else 'device'}")
  for k, label in labels.items():
    print(f"  {label:<48s} {rates[k][0]:8.1f} images/s   {rates[k][1]:5.2f} CPU ms/image")
  print(f"  speed-up, Stream 2 workers to device vs the main-thread loop: "
        f"{rates['stream_device_w2'][0] / rates['old_path'][0]:.2f}x wall, "
        f"{rates['old_path'][1] / rates['stream_device_w2'][1]:.2f}x CPU")
  rate, layers, compile_s = cka_step_rate(args.model, args.m, size, args.reps)
  print(f"  {args.model} fine-preset CKA step ({layers} layers, m={args.m}, random weights) "
        f"on this CPU: {rate:.1f} images/s (compile {compile_s:.0f} s)")
  # One worker thread keeps one core busy; its rate on an idle core is 1000 / (CPU ms/image).
  cpu_ms = rates["stream_device_w1"][1]
  per_worker = 1000 / cpu_ms
  print(f"per-worker rate: {per_worker:.0f} images/s per core (1000 / {cpu_ms:.2f} CPU ms per "
        f"image; measured wall with 1 worker: {rates['stream_device_w1'][0]:.0f}/s). A TPU-VM "
        "host needs ceil(N / per-worker rate) workers, + 1 core for the main thread, for N "
        "images/s of device throughput:")
  for n in (1000, 2500, 5000, 10000):
    print(f"  N = {n:5d} images/s -> {math.ceil(n / per_worker):3d} workers")


if __name__ == "__main__":
  main()
