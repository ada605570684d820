"""Sources by URI on tiny files written by the tests: idx, folder, segfolder, and their errors."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from configs import base
from jaxvision.data import create_input, load_source, parse_uri
from jaxvision.data.idx import read_idx


def data_config(**overrides):
  c = base.get_config().data
  for k, v in overrides.items():
    c[k] = v
  return c


def run_config(dataset, train_split="train", eval_split="", **data):
  c = base.get_config()
  c.dataset, c.train_split, c.eval_split = dataset, train_split, eval_split
  c.batch_size = c.eval_batch_size = 4
  c.data.prefetch = 0
  c.data.workers = 1
  for k, v in data.items():
    c.data[k] = v
  return c


# --- IDX ---------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, gz: bool):
  codes = {np.uint8: 0x08, np.int32: 0x0C}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(
      f">{array.ndim}i", *array.shape
  )
  data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)


def make_idx_dir(tmp_path, gz_train=True, gz_test=False, n_train=12, n_test=7):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n, gz in (("train", n_train, gz_train), ("t10k", n_test, gz_test)):
    images = rng.integers(0, 256, (n, 5, 6), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    arrays[prefix] = (images, labels)
  return arrays


def test_idx_reads_gzipped_and_raw_files_with_split_names_from_prefixes(tmp_path):
  arrays = make_idx_dir(tmp_path, gz_train=True, gz_test=False)
  train = load_source(f"idx:{tmp_path}", "train")
  test = load_source(f"idx:{tmp_path}", "test[2:5]")
  np.testing.assert_array_equal(train.images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(train.labels, arrays["train"][1])
  np.testing.assert_array_equal(test.images[..., 0], arrays["t10k"][0][2:5])
  assert train.images.shape == (12, 5, 6, 1) and train.num_classes == 10
  both = load_source(f"idx:{tmp_path}", "train[:2]+test[:2]")
  assert len(set(both.ids.tolist())) == 4  # ids stay unique across concatenated splits


def test_idx_header_shape_and_type_are_parsed(tmp_path):
  values = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
  write_idx(tmp_path / "x", values, gz=False)
  out = read_idx(str(tmp_path / "x"))
  assert out.dtype == np.int32 and out.shape == (2, 3, 4)
  np.testing.assert_array_equal(out, values)


def test_idx_errors_name_the_file(tmp_path):
  make_idx_dir(tmp_path, gz_train=False, gz_test=False)
  with open(tmp_path / "train-images-idx3-ubyte", "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="train-images-idx3-ubyte: header says shape"):
    load_source(f"idx:{tmp_path}", "train")
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34garbage")
  with pytest.raises(ValueError, match="not an IDX file"):
    load_source(f"idx:{tmp_path}", "train")
  os.remove(tmp_path / "train-images-idx3-ubyte")
  with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte has no matching images"):
    load_source(f"idx:{tmp_path}", "train")


def test_idx_count_mismatch_names_both_files(tmp_path):
  make_idx_dir(tmp_path, gz_train=False)
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
  with pytest.raises(ValueError, match="train-images-idx3-ubyte holds 12 images but .*labels"):
    load_source(f"idx:{tmp_path}", "train")


# --- Dispatcher and split errors ------------------------------------------------------------------


def test_unknown_scheme_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown scheme 'mnist'.*digits, synthetic, tfds, idx"):
    parse_uri("mnist:/data")


@pytest.mark.parametrize("uri", ["idx:{}/nope", "folder:{}/nope", "segfolder:{}/nope"])
def test_missing_directory_is_named(tmp_path, uri):
  with pytest.raises(FileNotFoundError, match="nope: no such directory"):
    load_source(uri.format(tmp_path), "train", data_config=data_config())


def test_a_split_that_selects_nothing_is_an_error(tmp_path):
  make_idx_dir(tmp_path)
  with pytest.raises(ValueError, match=r"split 'test\[7:\]' selects no example"):
    load_source(f"idx:{tmp_path}", "test[7:]")
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    load_source(f"idx:{tmp_path}", "validation")


def test_label_out_of_range_for_configured_classes(tmp_path):
  make_idx_dir(tmp_path)
  config = run_config(f"idx:{tmp_path}")
  config.num_classes = 5
  with pytest.raises(ValueError, match=r"label [5-9] out of range for 5 classes.*num_classes=5"):
    create_input(config, "train", train=True)


# --- folder: ----------------------------------------------------------------------------------


def save_image(path, size=(9, 7), color=(200, 30, 30), mode="RGB", fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  w, h = size
  array = np.zeros((h, w, 3), np.uint8) + np.array(color, np.uint8)
  array[: h // 2, : w // 2] = 255 - array[: h // 2, : w // 2]  # a corner marks orientation
  image = Image.fromarray(array)
  image.convert(mode).save(path, format=fmt)


def make_folder(root, classes=("cat", "dog"), per_class=3):
  for c, name in enumerate(classes):
    for i in range(per_class):
      ext = "png" if i % 2 else "jpg"
      save_image(root / name / f"{i}.{ext}", size=(9 + i, 7 + c), color=(40 * c, 90, 20 * i))


@pytest.mark.parametrize("cache_mb", [4096, 0])  # decoded in memory / decoded on the fly
def test_folder_classes_and_batches(tmp_path, cache_mb):
  make_folder(tmp_path)
  config = run_config(f"folder:{tmp_path}", cache_mb=cache_mb, augment="inception_crop,flip")
  config.image_size = 8
  train = create_input(config, "train", train=True)
  assert train.num_examples == 6 and train.num_classes == 2
  assert (train.source.cache is None) == (cache_mb == 0)
  batch = next(iter(train.train_batches(0)))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
  evaluation = create_input(config, "train[4:]", train=False)
  batches = list(evaluation.eval_batches())
  assert sum(int(b["valid"].sum()) for b in batches) == 2
  np.testing.assert_array_equal(np.sort(train.source.labels), [0, 0, 0, 1, 1, 1])


def test_slices_of_a_class_sorted_folder_hold_every_class(tmp_path):
  """201 images in 3 class folders: both halves of an 80/20 slice have each class in its share,
  identically on every load."""
  for c, (name, n) in enumerate((("a", 60), ("b", 71), ("c", 70))):
    for i in range(n):
      save_image(tmp_path / name / f"{i:03d}.png", size=(4, 4), color=(80 * c, 0, i))
  config = data_config()
  counts = {}
  for split in ("train[:80%]", "train[80%:]"):
    source = load_source(f"folder:{tmp_path}", split, data_config=config)
    counts[split] = np.bincount(source.labels, minlength=3)
  np.testing.assert_array_equal(counts["train[:80%]"] + counts["train[80%:]"], [60, 71, 70])
  np.testing.assert_allclose(counts["train[80%:]"], np.array([60, 71, 70]) * 0.2, atol=1)
  again = load_source(f"folder:{tmp_path}", "train[80%:]", data_config=config)
  first = load_source(f"folder:{tmp_path}", "train[80%:]", data_config=config)
  assert again.names == first.names


def test_folder_split_layout_and_gray_images(tmp_path):
  for split in ("train", "val"):
    for c in ("a", "b"):
      save_image(tmp_path / split / c / "x.png", mode="L")
  train = load_source(f"folder:{tmp_path}", "train", data_config=data_config())
  val = load_source(f"folder:{tmp_path}", "val", data_config=data_config())
  assert len(train) == 2 and len(val) == 2 and train.channels == 1
  assert train.get_batch(np.array([0]))["image"][0].shape == (7, 9, 1)


def test_empty_class_folder_is_named(tmp_path):
  make_folder(tmp_path)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match=f"class folder {tmp_path}/empty has no .jpg/.png images"):
    load_source(f"folder:{tmp_path}", "train", data_config=data_config())


@pytest.mark.parametrize("cache_mb", [4096, 0])
def test_corrupt_image_is_named_or_skipped(tmp_path, cache_mb):
  make_folder(tmp_path)
  bad = tmp_path / "dog" / "broken.png"
  bad.write_bytes(b"this is not a png")
  with pytest.raises(ValueError, match=f"cannot read image {bad}"):
    load_source(f"folder:{tmp_path}", "train", data_config=data_config(cache_mb=cache_mb))
  source = load_source(f"folder:{tmp_path}", "train",
                       data_config=data_config(skip_bad=True, cache_mb=cache_mb))
  assert source.skipped == [str(bad)] and len(source) == 6
  config = run_config(f"folder:{tmp_path}", skip_bad=True, cache_mb=cache_mb)
  assert create_input(config, "train", train=True).skipped == [str(bad)]


def test_truncated_jpeg_found_at_decode_time_is_named(tmp_path):
  make_folder(tmp_path)
  save_image(tmp_path / "cat" / "big.jpg", size=(64, 64))
  data = (tmp_path / "cat" / "big.jpg").read_bytes()
  (tmp_path / "cat" / "big.jpg").write_bytes(data[: len(data) // 2])
  # In memory: found while loading. On the fly: found when the batch is decoded.
  with pytest.raises(ValueError, match="cannot read image .*big.jpg"):
    load_source(f"folder:{tmp_path}", "train", data_config=data_config())
  config = run_config(f"folder:{tmp_path}", cache_mb=0)
  config.batch_size = config.eval_batch_size = 7
  with pytest.raises(ValueError, match="cannot read image .*big.jpg"):
    list(create_input(config, "train", train=False).eval_batches())


# --- segfolder: -------------------------------------------------------------------------------


def make_segfolder(root, n=3, size=(12, 10), binary=True, mask_dir="label"):
  rng = np.random.default_rng(1)
  os.makedirs(root / "image")
  os.makedirs(root / mask_dir)
  masks = []
  for i in range(n):
    mask = rng.integers(0, 2 if binary else 4, size[::-1]).astype(np.uint8)
    image = (mask * 60 + 10).astype(np.uint8)
    Image.fromarray(image).save(root / "image" / f"{i}.png")
    Image.fromarray(mask * 255 if binary else mask).save(root / mask_dir / f"{i}.png")
    masks.append(mask)
  return np.stack(masks)


@pytest.mark.parametrize("binary,mask_dir", [(True, "label"), (False, "mask")])
def test_segfolder_masks(tmp_path, binary, mask_dir):
  masks = make_segfolder(tmp_path, binary=binary, mask_dir=mask_dir)
  source = load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())
  assert source.task == "segmentation"
  assert source.num_classes == (2 if binary else int(masks.max()) + 1)
  np.testing.assert_array_equal(source.labels, masks)
  assert source.images.shape == (3, 10, 12, 1)
  # The image was drawn from the mask: image and mask are paired by name.
  np.testing.assert_array_equal((source.images[..., 0] - 10) // 60, masks)


def test_segfolder_size_mismatch_names_both_files(tmp_path):
  make_segfolder(tmp_path)
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "label" / "1.png")
  culprits = r"image .*image/1.png is 12x10 but mask .*label/1.png is 5x5"
  with pytest.raises(ValueError, match=culprits):
    load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())


def test_segfolder_missing_mask_is_named(tmp_path):
  make_segfolder(tmp_path)
  os.remove(tmp_path / "label" / "2.png")
  with pytest.raises(FileNotFoundError, match=r"image .*image/2.png has no mask"):
    load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())


def test_segfolder_mask_label_out_of_range_names_the_mask(tmp_path):
  make_segfolder(tmp_path, binary=False)
  config = run_config(f"segfolder:{tmp_path}")
  config.num_classes = 2
  with pytest.raises(ValueError, match=r"label [23] out of range for 2 classes in .*label/\d.png"):
    create_input(config, "train", train=True)


def test_segfolder_skip_bad_skips_the_pair(tmp_path):
  make_segfolder(tmp_path)
  (tmp_path / "image" / "0.png").write_bytes(b"junk")
  with pytest.raises(ValueError, match="cannot read image .*image/0.png"):
    load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())
  source = load_source(f"segfolder:{tmp_path}", "train", data_config=data_config(skip_bad=True))
  assert len(source) == 2 and source.skipped == [str(tmp_path / "image" / "0.png")]


def test_synthetic_labels_span_more_classes_than_rows_and_too_many_classes_is_one_line():
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no mean of an empty band
    source = load_source("synthetic:8x8x1:40", "train")
  counts = np.bincount(source.labels, minlength=40)
  assert len(counts) == 40 and (counts > 0).sum() >= 35  # 1,024 images over 40 classes
  assert np.array_equal(source.labels, load_source("synthetic:8x8x1:40", "train").labels)
  with pytest.raises(ValueError, match=r"synthetic:4x4x1:17.*at most H\*W=16 classes"):
    load_source("synthetic:4x4x1:17", "train")
