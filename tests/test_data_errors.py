"""Bad data at the loaders: images too large to decode, one-class data sets, ambiguous file
pairs, and segmentation masks whose values do not say which class they are. Each is a one-line
ValueError naming the file (and the value or size), or a file skipped with data.skip_bad.
(The same cases through the trainer's command line: test_bad_data.py.)"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import base
from jaxvision.data import load_source
from jaxvision.data.decode import EncodedImage, allow_pixels, decode, decode_crop_resize, probe
from jaxvision.data.segfolder import MaskSource, declared_values, read_mask


def data_config(**overrides):
  c = base.get_config().data
  c.workers = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def huge_png(path, width=20000, height=20000) -> None:
  """A 1-bit PNG whose header says width x height; only its first row of pixels is stored
  (every check here reads the header only, as the loaders do before decoding)."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  pixels = zlib.compress(bytes(1 + (width + 7) // 8))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def save(path, array) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def make_folder(root, classes=("cat", "dog"), per_class=3, size=8):
  for c, name in enumerate(classes):
    for i in range(per_class):
      save(root / name / f"{i}.png", np.full((size, size, 3), 40 * c + 10 * i, np.uint8))


# --- images too large to decode -----------------------------------------------------------------


def test_a_decompression_bomb_is_one_line_naming_the_file_and_size(tmp_path):
  huge_png(tmp_path / "huge.png")
  with pytest.raises(ValueError) as error:
    probe(str(tmp_path / "huge.png"))
  message = str(error.value)
  assert f"image {tmp_path / 'huge.png'} has 400,000,000 pixels" in message
  assert "data.max_image_pixels" in message and "\n" not in message
  with pytest.raises(ValueError, match="has 400,000,000 pixels"):  # encoded bytes, too
    decode(EncodedImage(data=(tmp_path / "huge.png").read_bytes()))


def test_the_pixel_limit_is_checked_before_decoding_everywhere(tmp_path):
  save(tmp_path / "a.png", np.zeros((10, 12, 3), np.uint8))
  path = str(tmp_path / "a.png")
  assert probe(path, max_pixels=120).width == 12  # at the limit: fine
  expected = f"image {path} is 12x10 \\(120 pixels\\), over the limit of 119"
  with pytest.raises(ValueError, match=expected):
    probe(path, max_pixels=119)
  item = EncodedImage(path, max_pixels=119)
  with pytest.raises(ValueError, match=expected):
    decode(item)
  with pytest.raises(ValueError, match=expected):  # the on-the-fly decode of large folders
    decode_crop_resize(item, lambda w, h: (0, 0, w, h), 4)


def test_a_limit_above_pils_lets_pil_open_the_image(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
  huge_png(tmp_path / "huge.png")
  allow_pixels(10)  # never lowers PIL's limit
  assert Image.MAX_IMAGE_PIXELS == 89478485
  allow_pixels(400_000_000)
  header = probe(str(tmp_path / "huge.png"), max_pixels=400_000_000)
  assert (header.width, header.height) == (20000, 20000)


@pytest.mark.parametrize("cache_mb", [4096, 0])  # decoded in memory / decoded on the fly
def test_folder_names_or_skips_an_image_over_the_limit(tmp_path, cache_mb):
  make_folder(tmp_path)
  huge_png(tmp_path / "dog" / "huge.png")
  with pytest.raises(ValueError, match=f"image {tmp_path / 'dog' / 'huge.png'} has 400,000,000"):
    load_source(f"folder:{tmp_path}", "train", data_config=data_config(cache_mb=cache_mb))
  source = load_source(f"folder:{tmp_path}", "train",
                       data_config=data_config(cache_mb=cache_mb, skip_bad=True))
  assert source.skipped == [str(tmp_path / "dog" / "huge.png")] and len(source) == 6
  # A limit of the run's own: the 8x8 images are 64 pixels.
  os.remove(tmp_path / "dog" / "huge.png")
  with pytest.raises(ValueError, match=r"is 8x8 \(64 pixels\), over the limit of 63"):
    load_source(f"folder:{tmp_path}", "train",
                data_config=data_config(cache_mb=cache_mb, skip_bad=False, max_image_pixels=63))


def test_segfolder_names_or_skips_an_image_over_the_limit(tmp_path):
  write_masks(tmp_path, [np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)] * 2)
  huge_png(tmp_path / "image" / "9.png")
  save(tmp_path / "label" / "9.png", np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match=f"image {tmp_path / 'image' / '9.png'} has 400,000,000"):
    load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())
  source = load_source(f"segfolder:{tmp_path}", "train", data_config=data_config(skip_bad=True))
  assert source.skipped == [str(tmp_path / "image" / "9.png")] and len(source) == 4


def test_a_mask_over_the_limit_is_named(tmp_path):
  save(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
  with pytest.raises(ValueError, match=f"mask {tmp_path / 'm.png'} is 12x10 \\(120 pixels\\)"):
    read_mask(str(tmp_path / "m.png"), max_pixels=100)


# --- one class ------------------------------------------------------------------------------


def test_a_one_class_folder_is_an_error(tmp_path):
  make_folder(tmp_path, classes=("cat",))
  expected = f"classification needs at least 2 classes; folder:{tmp_path} has one, 'cat'"
  with pytest.raises(ValueError, match=expected):
    load_source(f"folder:{tmp_path}", "train", data_config=data_config())
  # The split layout: the classes are train/'s.
  make_folder(tmp_path / "split" / "train", classes=("cat",))
  make_folder(tmp_path / "split" / "val", classes=("cat",))
  with pytest.raises(ValueError, match="folder:.*split has one, 'cat'"):
    load_source(f"folder:{tmp_path / 'split'}", "val", data_config=data_config())


@pytest.mark.parametrize("value", [0, 255, 1])
def test_masks_of_one_value_are_an_error(tmp_path, value):
  write_masks(tmp_path, [np.full((4, 4), value, np.uint8)] * 3)
  expected = (f"segmentation needs at least 2 classes; the masks of segfolder:{tmp_path} hold "
              f"one value, {value} \\(e.g. .*label/0.png\\)")
  with pytest.raises(ValueError, match=expected):
    load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())
  with pytest.raises(ValueError, match="needs at least 2 classes"):  # declared, but one is used
    load_source(f"segfolder:{tmp_path}", "train",
                data_config=data_config(mask_values=(value, value + 1)))


# --- ambiguous pairs ----------------------------------------------------------------------------


@pytest.mark.parametrize("folder,first,second", [("image", "3.jpg", "3.png"),
                                                  ("label", "3.png", "3.tif")])
def test_two_files_of_one_stem_are_an_error_naming_both(tmp_path, folder, first, second):
  masks = [np.eye(4, dtype=np.uint8) * 255] * 4
  write_masks(tmp_path, masks)
  save(tmp_path / folder / ("3.jpg" if folder == "image" else "3.tif"), masks[0])
  what = "image" if folder == "image" else "mask"
  expected = f"two {what}s named 3: {tmp_path / folder / first} and {tmp_path / folder / second}"
  with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
    load_source(f"segfolder:{tmp_path}", "train", data_config=data_config())


# --- what a mask value means ----------------------------------------------------------------


def write_masks(root, masks) -> None:
  """image/i.png (the mask's values, as a gray image) and label/i.png for each mask (.tif for
  32-bit masks, which PNG cannot hold)."""
  for i, mask in enumerate(masks):
    save(root / "image" / f"{i}.png", (mask.astype(np.int64) % 256).astype(np.uint8))
    save(root / "label" / f"{i}.{'tif' if mask.dtype == np.int32 else 'png'}", mask)


def seg(root, **data) -> MaskSource:
  return load_source(f"segfolder:{root}", "train", data_config=data_config(**data))


def three_class_masks(patch: int | None = None) -> list[np.ndarray]:
  masks = [np.tile(np.arange(3, dtype=np.uint8), (4, 2)) for _ in range(3)]  # 0, 1, 2 stripes
  if patch is not None:
    masks[1][1:3, 1:3] = patch
  return masks


def test_binary_masks_are_two_classes(tmp_path):
  masks = [np.eye(4, dtype=np.uint8) * 255, 255 - np.eye(4, dtype=np.uint8) * 255]
  write_masks(tmp_path, masks)
  source = seg(tmp_path)
  assert source.num_classes == 2 and source.mask_values == (0, 255)
  np.testing.assert_array_equal(source.labels, np.stack(masks) // 255)
  source.check_num_classes(0)
  source.check_num_classes(2)
  with pytest.raises(ValueError, match=r"mask .*label/0.png has value 255: .*binary.*"
                     r"config.num_classes=3"):
    source.check_num_classes(3)


def test_class_index_masks_are_as_many_classes_as_values(tmp_path):
  write_masks(tmp_path, three_class_masks())
  source = seg(tmp_path)
  assert source.num_classes == 3 and source.mask_values == (0, 1, 2)
  np.testing.assert_array_equal(source.labels[0], three_class_masks()[0])
  source.check_num_classes(0)
  source.check_num_classes(5)  # classes the data does not show are the run's business
  with pytest.raises(ValueError, match=r"label 2 out of range for 2 classes in .*label/0.png"):
    source.check_num_classes(2)


def test_a_255_patch_among_class_indices_is_named_not_a_256_class_model(tmp_path):
  write_masks(tmp_path, three_class_masks(patch=255))
  source = seg(tmp_path)
  mask = str(tmp_path / "label" / "1.png")
  with pytest.raises(ValueError) as error:
    source.check_num_classes(0)
  message = str(error.value)
  assert f"mask {mask} has value 255 but no mask has 3" in message, message
  assert "data.mask_values=(0, 1, 2, 255)" in message and "'ignore' label" in message
  assert "not supported yet" in message and "\n" not in message
  with pytest.raises(ValueError, match=f"label 255 out of range for 3 classes in {mask} "
                     r"\(config.num_classes=3\); 255 looks like an 'ignore' label"):
    source.check_num_classes(3)
  source.check_num_classes(256)  # said explicitly: 255 is a class index
  declared = seg(tmp_path, mask_values=(0, 1, 2, 255))
  assert declared.num_classes == 4 and int(declared.labels[1, 1, 1]) == 3
  declared.check_num_classes(0)


def test_sixteen_bit_masks_of_0_and_1000_are_named(tmp_path):
  masks = [np.where(np.eye(4, dtype=bool), 1000, 0).astype(np.uint16) for _ in range(2)]
  write_masks(tmp_path, masks)
  source = seg(tmp_path)
  with pytest.raises(ValueError, match=r"mask .*label/0.png has value 1000 but no mask has 1: "
                     r".*\{0, 1000\}.*data.mask_values=\(0, 1000\)"):
    source.check_num_classes(0)
  declared = seg(tmp_path, mask_values=(0, 1000))
  assert declared.num_classes == 2
  np.testing.assert_array_equal(declared.labels[0], np.eye(4, dtype=np.int32))


def test_declared_values_map_in_class_order_and_others_are_named(tmp_path):
  masks = [np.array([[0, 128], [255, 0]], np.uint8), np.array([[255, 255], [128, 0]], np.uint8)]
  write_masks(tmp_path, masks)
  source = seg(tmp_path, mask_values=(255, 0, 128))  # any order: value v_k is class k
  np.testing.assert_array_equal(source.labels, [[[1, 2], [0, 1]], [[0, 0], [2, 1]]])
  assert source.num_classes == 3
  source.check_num_classes(3)
  with pytest.raises(ValueError, match=r"config.num_classes=4 but data.mask_values=\(255, 0, 128\)"
                     " lists 3 classes"):
    source.check_num_classes(4)
  with pytest.raises(ValueError, match=r"mask .*label/0.png has value 128, which "
                     r"data.mask_values=\(0, 255\) does not list"):
    seg(tmp_path, mask_values=(0, 255))


def test_the_decision_holds_for_every_slice_of_the_data(tmp_path):
  """The values are read over the whole data set: a slice without the 255 patch is checked the
  same, and the slices keep what the masks hold."""
  write_masks(tmp_path, three_class_masks(patch=255))
  part = load_source(f"segfolder:{tmp_path}", "train[:1]+train[2:]", data_config=data_config())
  assert isinstance(part, MaskSource) and len(part) == 2 and part.mask_values == (0, 1, 2, 255)
  with pytest.raises(ValueError, match=r"label/1.png has value 255"):
    part.check_num_classes(0)


@pytest.mark.parametrize("declared,expected", [
    ((0, 0), r"data.mask_values=\(0, 0\) lists 0 twice"),
    ((1,), r"data.mask_values=\(1,\) lists one class"),
    ((0, 0.5), r"data.mask_values=\(0, 0.5\): mask values are integers"),
])
def test_a_bad_declaration_names_the_key(declared, expected):
  with pytest.raises(ValueError, match=expected):
    declared_values(declared)
  assert declared_values([0, 255.0]) == (0, 255)  # config.json gives lists


def test_negative_and_fractional_mask_values_are_named(tmp_path):
  write_masks(tmp_path, [np.array([[0, -1], [1, 1]], np.int32), np.eye(2, dtype=np.int32)])
  with pytest.raises(ValueError, match=r"mask .*label/0.tif has value -1; class indices are >= 0"):
    seg(tmp_path)
  save(tmp_path / "f.tif", np.array([[0, 0.5], [1, 1]], np.float32))
  with pytest.raises(ValueError, match=r"mask .*f.tif has value 0.5; expected integer"):
    read_mask(str(tmp_path / "f.tif"))
  save(tmp_path / "g.tif", np.array([[0, 2], [1, 1]], np.float32))
  np.testing.assert_array_equal(read_mask(str(tmp_path / "g.tif")), [[0, 2], [1, 1]])
