"""Instance masks: pasting equal to torchvision's paste_masks_in_image (goldens), COCO polygon /
RLE masks through the coco: reader and the detection transform (a mask must stay on its object's
pixels), bad segmentations, drawing, and the ISBI cell-instance script on a generated label."""

from __future__ import annotations

import json
import os
import pathlib
import re

import chex
import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from configs import base
from jaxvision.data import create_input, load_source
from jaxvision.data.detection_transform import detection_transform
from jaxvision.data.make_cell_instances import cell_regions, make_cell_instances
from jaxvision.detection.draw import draw_detections, save_detections
from jaxvision.detection.masks import paste_mask_probs, paste_masks, paste_masks_numpy

GOLDEN = pathlib.Path(__file__).resolve().parent / "parity" / "goldens" / "paste_masks.npz"


# --- Pasting -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def goldens():
  with np.load(GOLDEN) as f:
    return {k: f[k] for k in f.files}


def test_paste_equals_torchvision(goldens):
  """Every case (masks 28, 14, 7; boxes inside, across the border, tiny, empty, outside): the
  probabilities within float32 rounding, and not one pixel differs after thresholding."""
  worst, flipped = 0.0, 0
  for case in goldens["cases"]:
    probs, boxes = goldens[f"{case}_mask_probs"], goldens[f"{case}_boxes"]
    expected, hw = goldens[f"{case}_pasted"], tuple(int(v) for v in goldens[f"{case}_image_hw"])
    # Two images of the batch: the case's boxes, and the same boxes in reverse order.
    batch_probs = np.stack([probs, probs[::-1]])
    batch_boxes = np.stack([boxes, boxes[::-1]])
    ours = np.asarray(jax.jit(paste_mask_probs, static_argnums=2)(batch_probs, batch_boxes, hw))
    chex.assert_shape(ours, (2, len(boxes)) + hw)
    host = paste_masks_numpy(probs, boxes, hw, threshold=None)
    for got in (ours[0], ours[1, ::-1], host):
      np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=str(case))
      worst = max(worst, float(np.abs(got - expected).max()))
      flipped += int(((got > 0.5) != (expected > 0.5)).sum())
    bits = np.asarray(paste_masks(batch_probs, batch_boxes, hw))[0]
    np.testing.assert_array_equal(bits, expected > 0.5)
    np.testing.assert_array_equal(paste_masks_numpy(probs, boxes, hw), expected > 0.5)
    assert (expected[4:8] > 0).sum() < (expected[:4] > 0).sum()  # the tiny / empty boxes
  assert flipped == 0
  print(f"paste_masks vs torchvision: max |probability difference| {worst:.3g}, "
        f"{flipped} pixels differ after thresholding at 0.5")


def test_paste_valid_flags_and_shape_errors(goldens):
  probs, boxes = goldens["m7_mask_probs"][None], goldens["m7_boxes"][None]
  valid = np.arange(boxes.shape[1])[None] % 2 == 0
  masks = np.asarray(paste_masks(probs, boxes, (25, 31), valid=valid))
  assert not masks[0, 1::2].any() and masks[0, ::2].any()
  with pytest.raises(ValueError, match=r"boxes \(1, 12, 3\) must be \(1, 12, 4\)"):
    paste_masks(probs, boxes[..., :3], (25, 31))
  with pytest.raises(ValueError, match=r"image_hw=\(0, 31\)"):
    paste_masks(probs, boxes, (0, 31))


# --- Masks in the data -----------------------------------------------------------------------


def data_config(**overrides):
  c = base.get_config().data
  c.workers = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def ellipse(h, w, cy, cx, ry, rx):
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def rle_of(mask, compressed=True):
  """COCO RLE of a bool mask: compressed (counts a string) or uncompressed (a list)."""
  if compressed:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": encoded["counts"].decode("ascii")}
  flat = mask.T.reshape(-1)  # runs go down the columns
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
  return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


def bbox_of(mask):
  ys, xs = np.nonzero(mask)
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def write_coco_masks(root, extra_annotations=()):
  """Three black images, each object filled at 255 in its own colour channel k (class k): a
  polygon, a compressed RLE, an uncompressed-RLE crowd region; one image without objects.
  Returns the expected masks per image."""
  os.makedirs(root / "train", exist_ok=True)
  os.makedirs(root / "annotations", exist_ok=True)
  sizes = ((40, 60), (50, 34), (30, 30))
  polygon = [6.0, 4.0, 30.0, 6.5, 24.0, 30.0, 8.5, 22.0]
  images, anns, expected = [], [], []
  for i, (h, w) in enumerate(sizes):
    image = np.zeros((h, w, 3), np.uint8)
    masks = []
    if i == 0:
      poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))) > 0
      blob = ellipse(h, w, 26, 44, 10, 12)
      masks = [(poly, [polygon], 0), (blob, rle_of(blob), 1)]
    elif i == 1:
      blob = ellipse(h, w, 20, 16, 14, 9)
      crowd = ellipse(h, w, 42, 26, 6, 6) | ellipse(h, w, 44, 6, 4, 5)
      masks = [(blob, rle_of(blob), 0), (crowd, rle_of(crowd, compressed=False), 2)]
    for k, (mask, seg, channel) in enumerate(masks):
      image[mask, channel] = 255
      anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": channel + 1,
                   "bbox": bbox_of(mask), "area": int(mask.sum()), "segmentation": seg,
                   "iscrowd": int(i == 1 and k == 1)})
    Image.fromarray(image).save(root / "train" / f"im{i}.png")
    images.append({"id": 10 + i, "file_name": f"im{i}.png", "width": w, "height": h})
    expected.append(np.array([m for m, _, _ in masks], bool).reshape(-1, h, w))
  anns += [dict(a, id=1000 + j) for j, a in enumerate(extra_annotations)]
  data = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
  (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
  return expected


def test_coco_reader_decodes_polygons_and_both_rles(tmp_path):
  expected = write_coco_masks(tmp_path)
  source = load_source(f"coco:{tmp_path}", "train", data_config=data_config(masks=True))
  assert source.masks is not None and [len(m) for m in source.masks] == [2, 2, 0]
  for i, want in enumerate(expected):
    got = source.masks[i].decode()
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  assert source.ignore[1].tolist() == [False, True]
  assert expected[0][0].sum() > 300  # the polygon is a real region
  # Without data.masks the reader keeps none, and slicing / caching keep them aligned.
  assert load_source(f"coco:{tmp_path}", "train", data_config=data_config()).masks is None
  half = load_source(f"coco:{tmp_path}", "train[1:]", data_config=data_config(masks=True))
  np.testing.assert_array_equal(half.masks[0].decode(), expected[1])


def image_bytes(channel_image):
  return np.clip(np.round(channel_image * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("augment", ["", "zoom_out,iou_crop,scale_jitter(0.4,2.5),flip", "flip"])
def test_masks_move_exactly_with_the_image(tmp_path, augment):
  """Each object's channel of the transformed image, thresholded at one half, is its mask
  exactly: the same window, resize and flip (the image's own resampling decides the mask)."""
  write_coco_masks(tmp_path)
  source = load_source(f"coco:{tmp_path}", "train", data_config=data_config(masks=True))
  config = data_config(masks=True, augment=augment)
  transform = detection_transform(config, train=bool(augment), image_size=48, max_boxes=5)
  checked = 0
  for seed in range(8 if augment else 1):
    batch = transform(source.get_batch(np.array([0, 1, 2])), np.random.default_rng(seed))
    masks = batch["masks"]
    assert masks.dtype == np.uint8 and masks.shape == (3, 5, 48, 48)
    assert set(np.unique(masks)) <= {0, 1}
    assert not masks[~batch["box_valid"]].any()  # padding boxes have empty masks
    for i in range(3):
      for j in np.nonzero(batch["box_valid"][i])[0]:
        channel = image_bytes(batch["image"][i, ..., batch["classes"][i, j]])
        np.testing.assert_array_equal(masks[i, j], channel >= 128, err_msg=f"{seed} {i} {j}")
        checked += 1
    if not augment:
      assert batch["box_valid"].sum(1).tolist() == [2, 2, 0]
      assert masks[0, 0].sum() > 100
  assert checked >= 4


def test_masks_through_the_pipeline_and_only_when_asked(tmp_path):
  write_coco_masks(tmp_path)
  c = base.get_config()
  c.dataset, c.train_split, c.eval_split = f"coco:{tmp_path}", "train", "train"
  c.image_size, c.batch_size, c.eval_batch_size = 32, 4, 4
  c.data.prefetch, c.data.workers = 0, 1
  batch = next(create_input(c, "train", train=False).eval_batches())
  assert "masks" not in batch  # box-only runs carry no masks
  c.data.masks = True
  batch = next(create_input(c, "train", train=False).eval_batches())
  assert batch["masks"].shape == (4, 100, 32, 32) and batch["masks"].dtype == np.uint8
  assert (batch["masks"].reshape(4, 100, -1).any(-1) == batch["box_valid"]).all()
  plain = {"image": [np.zeros((8, 8, 3), np.uint8)], "boxes": [np.zeros((0, 4), np.float32)],
           "classes": [np.zeros(0, np.int32)], "ignore": [np.zeros(0, bool)],
           "area": [np.zeros(0, np.float32)], "orig_size": np.array([[8, 8]]), "id": np.array([0])}
  with pytest.raises(ValueError, match="data.masks=True, but this dataset has no instance masks"):
    detection_transform(data_config(masks=True), train=False, image_size=16)(
        plain, np.random.default_rng(0))


GOOD_BOX = {"image_id": 10, "category_id": 1, "bbox": [2, 2, 5, 5], "iscrowd": 0}


@pytest.mark.parametrize("segmentation, message", [
    ([[1, 1, 5, 1]], "malformed polygon (needs x, y pairs of at least 3 points, got 4 values)"),
    ([[1, 1, 5, 1, 5]], "malformed polygon"),
    ([], "segmentation is not a list of polygons"),
    ({"size": [30, 60], "counts": [2400]}, "RLE size [30, 60] is not the image's [height, width]"),
    ({"size": [40, 60], "counts": [100, 20]}, "RLE runs cover 120 pixels"),
    ({"size": [40, 60], "counts": "0`"}, "compressed RLE counts are malformed"),
    ({"size": [40, 60], "counts": rle_of(np.ones((40, 50), bool))["counts"]},
     "RLE runs cover 2000 pixels"),
    ({"size": [40, 60], "counts": 7}, "RLE counts are neither a list nor a string"),
    (None, "segmentation is neither polygons nor an RLE"),
])
def test_bad_segmentations(tmp_path, segmentation, message):
  write_coco_masks(tmp_path, extra_annotations=[dict(GOOD_BOX, segmentation=segmentation)])
  path = tmp_path / "annotations" / "instances_train.json"
  with pytest.raises(ValueError, match=re.escape(message)) as err:
    load_source(f"coco:{tmp_path}", "train", data_config=data_config(masks=True))
  assert str(path) in str(err.value) and "annotation 1000" in str(err.value)
  assert "im0.png" in str(err.value) and "\n" not in str(err.value)
  source = load_source(f"coco:{tmp_path}", "train",
                       data_config=data_config(masks=True, skip_bad=True))
  assert len(source.skipped) == 1 and [len(m) for m in source.masks] == [2, 2, 0]
  # The box path does not look at segmentations.
  boxes_only = load_source(f"coco:{tmp_path}", "train", data_config=data_config())
  assert [len(b) for b in boxes_only.boxes] == [3, 2, 0]


# --- Drawing -----------------------------------------------------------------------------------


def test_drawn_mask_changes_exactly_its_pixels(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 200, (60, 70, 3), dtype=np.uint8)
  boxes = [[5, 5, 60, 55], [40, 2, 50, 10]]
  masks = np.zeros((2, 60, 70), bool)
  masks[0] = ellipse(60, 70, 32, 33, 14, 18)  # well inside its box, clear of the label
  masks[1, 3:6, 42:45] = True  # a detection under the threshold: not drawn
  kwargs = dict(scores=[0.9, 0.1], classes=[2, 0], score_threshold=0.5)
  plain = draw_detections(image, boxes, **kwargs)
  filled = draw_detections(image, boxes, masks=masks, **kwargs)
  changed = (plain != filled).any(-1)
  np.testing.assert_array_equal(changed, masks[0])
  assert (filled[masks[0]].astype(int) - image[masks[0]]).any(-1).all()
  path = save_detections(str(tmp_path / "m.png"), image, boxes, masks=masks, **kwargs)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), filled)
  with pytest.raises(ValueError, match=r"masks \(1, 60, 70\) must be \[2, 60, 70\]"):
    draw_detections(image, boxes, masks=masks[:1], **kwargs)


# --- ISBI cell instances ------------------------------------------------------------------------


def write_isbi(root, labels):
  for sub in ("train/image", "train/label"):
    os.makedirs(root / sub, exist_ok=True)
  for n, label in enumerate(labels):
    Image.fromarray(label).save(root / "train" / "label" / f"{n}.png")
    Image.fromarray((label // 2 + 60).astype(np.uint8)).save(root / "train" / "image" / f"{n}.png")


def generated_label(shift):
  """A 48 x 64 label: membranes (0) cut the interior (255) into a top-left cell on the border,
  a cell right of it, two cells meeting only at a corner, and a 4 x 4 speck under 50 px."""
  label = np.full((48, 64), 255, np.uint8)
  label[20 + shift, :] = 0  # a horizontal membrane
  label[:20 + shift, 30] = 0  # splits the top band into two cells
  label[21 + shift:, 40:42] = 0  # a vertical membrane in the bottom band
  label[30:40, 8:20] = 0  # a membrane block with a speck inside
  label[33:37, 12:16] = 255
  # Bottom right: two cells of 80 px that touch only diagonally, at (39, 51) / (40, 52).
  label[21 + shift:, 42:] = 0
  label[30:40, 44:52] = 255
  label[40:48, 52:62] = 255
  return label


def test_make_cell_instances_on_a_generated_label(tmp_path):
  labels = [generated_label(s) for s in (0, 2, -3)]
  write_isbi(tmp_path / "isbi", labels)
  out = tmp_path / "cells"
  counts = make_cell_instances(str(tmp_path / "isbi"), str(out), train_slices=2)
  regions = cell_regions(labels[0])
  # top-left, top-right, the bottom-left band around the block, the two diagonal cells; the
  # 16-pixel speck is dropped.
  assert len(regions) == 5 and counts == {"train": [5, 5], "val": [5]}
  assert regions.sum(0).max() == 1 and 16 not in regions.sum((1, 2))
  assert regions[0][0, 0] and regions[0].sum() == 20 * 30  # a border cell, kept
  data = json.loads((out / "annotations" / "instances_train.json").read_text())
  assert data["categories"] == [{"id": 1, "name": "cell"}]
  assert [a["area"] for a in data["annotations"][:5]] == regions.sum((1, 2)).tolist()
  assert data["annotations"][0]["bbox"] == [0, 0, 30, 20]
  assert sorted(os.listdir(out / "val")) == ["2.png"]
  source = load_source(f"coco:{out}", "val", data_config=data_config(masks=True))
  np.testing.assert_array_equal(source.masks[0].decode(), cell_regions(labels[2]))
  np.testing.assert_array_equal(source.images[0][..., 0], labels[2] // 2 + 60)
  with pytest.raises(ValueError, match="train_slices=3: .* has 3 labelled slices"):
    make_cell_instances(str(tmp_path / "isbi"), str(out), train_slices=3)


def test_make_cell_instances_cuts_tiles_with_their_own_regions(tmp_path):
  labels = [generated_label(s) for s in (0, 2, -3)]
  write_isbi(tmp_path / "isbi", labels)
  out = tmp_path / "tiles"
  counts = make_cell_instances(str(tmp_path / "isbi"), str(out), train_slices=2, tile=16)
  # 48 x 64 slices: 3 x 4 tiles each, whose instances are the regions of the tile's own label.
  want = [len(cell_regions(labels[2][r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]))
          for r in range(3) for c in range(4)]
  assert counts["val"] == want and len(counts["train"]) == 24
  assert sorted(os.listdir(out / "val"))[:2] == ["2_0_0.png", "2_0_1.png"]
  source = load_source(f"coco:{out}", "val", data_config=data_config(masks=True))
  k = sorted(os.listdir(out / "val")).index("2_1_2.png")
  tile = labels[2][16:32, 32:48]
  np.testing.assert_array_equal(source.images[k][..., 0], tile // 2 + 60)
  np.testing.assert_array_equal(source.masks[k].decode(), cell_regions(tile))
  with pytest.raises(ValueError, match="--tile 20 must divide the slices' size 64x48"):
    make_cell_instances(str(tmp_path / "isbi"), str(out), train_slices=2, tile=20)
