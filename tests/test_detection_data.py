"""Detection data: coco / voc / yolo / TFDS readers on tiny files written here, the batch
contract through the input pipeline, box-exact augmentation (a filled rectangle must stay
under its box), bad annotations, the digit-canvas recipe and drawing."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from configs import base
from jaxvision.data import create_input, load_source
from jaxvision.data.detection_transform import detection_transform
from jaxvision.data.make_digit_canvases import make_canvases, make_dataset
from jaxvision.detection.boxes import to_original
from jaxvision.detection.draw import draw_detections, save_detections

CONTRACT = {"image": np.float32, "boxes": np.float32, "classes": np.int32, "box_valid": bool,
            "box_ignore": bool, "id": np.int64, "orig_size": np.int32, "scale": np.float32,
            "offset": np.float32}


def data_config(**overrides):
  c = base.get_config().data
  c.workers = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def run_config(dataset, train_split="train", eval_split="", image_size=64, **data):
  c = base.get_config()
  c.dataset, c.train_split, c.eval_split = dataset, train_split, eval_split
  c.image_size, c.batch_size, c.eval_batch_size = image_size, 4, 4
  c.data.prefetch, c.data.workers = 0, 1
  for k, v in data.items():
    c.data[k] = v
  return c


def check_contract(batch, b, m, s, c):
  assert set(batch) >= set(CONTRACT)
  for key, dtype in CONTRACT.items():
    assert batch[key].dtype == dtype, key
  assert batch["image"].shape == (b, s, s, c)
  assert batch["boxes"].shape == (b, m, 4) and batch["classes"].shape == (b, m)
  assert batch["box_valid"].shape == batch["box_ignore"].shape == (b, m)
  assert batch["orig_size"].shape == batch["scale"].shape == batch["offset"].shape == (b, 2)


# --- Writing tiny datasets ---------------------------------------------------------------------


def rect_image(h, w, boxes, rng, channels=3):
  """A dark noisy image with each (integer) box filled bright."""
  image = rng.integers(0, 40, (h, w, channels), dtype=np.uint8)
  for x1, y1, x2, y2 in np.asarray(boxes, int):
    image[y1:y2, x1:x2] = 255
  return image


def write_coco(root, split="train", sizes=((40, 60), (50, 30), (32, 32), (45, 45)),
               extra_annotations=(), drop_file=None):
  """Images with 1-2 boxes each (image 2 without any), categories 3, 7, 11, a crowd box."""
  rng = np.random.default_rng(0)
  os.makedirs(root / split, exist_ok=True)
  os.makedirs(root / "annotations", exist_ok=True)
  images, anns = [], []
  cats = [3, 7, 11]
  for i, (h, w) in enumerate(sizes):
    boxes = [] if i == 2 else [(2 + i, 3, 2 + i + w // 3, 3 + h // 2)]
    if i == 1:
      boxes.append((w // 2, h // 2, w - 1, h - 2))
    name = f"img{i}.png"
    if name != drop_file:
      Image.fromarray(rect_image(h, w, boxes, rng)).save(root / split / name)
    images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
    for k, (x1, y1, x2, y2) in enumerate(boxes):
      anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cats[(i + k) % 3],
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1) * 0.9,
                   "iscrowd": int(i == 1 and k == 1)})
  anns += [dict(a, id=1000 + j) for j, a in enumerate(extra_annotations)]
  data = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"cat{c}"} for c in cats]}
  (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
  return data


def test_coco_reader_batch_contract_and_slicing(tmp_path):
  data = write_coco(tmp_path)
  source = load_source(f"coco:{tmp_path}", "train", data_config=data_config())
  assert len(source) == 4 and source.task == "detection" and source.num_classes == 3
  assert source.category_ids == (3, 7, 11) and source.class_names == ("cat3", "cat7", "cat11")
  np.testing.assert_array_equal(source.image_ids, [100, 101, 102, 103])
  assert [len(b) for b in source.boxes] == [1, 2, 0, 1]
  ann = data["annotations"][1]  # image 101, first box: category 7 -> class 1
  x, y, w, h = ann["bbox"]
  np.testing.assert_array_equal(source.boxes[1][0], [x, y, x + w, y + h])
  assert source.classes[1].tolist() == [1, 2] and source.ignore[1].tolist() == [False, True]
  assert source.areas[1][0] == pytest.approx(ann["area"])
  np.testing.assert_array_equal(source.sizes[1], [50, 30])
  assert isinstance(source.images[0], np.ndarray)  # small: decoded into memory
  half = load_source(f"coco:{tmp_path}", "train[:50%]", data_config=data_config())
  assert len(half) == 2 and half.image_ids.tolist() == [100, 101]

  config = run_config(f"coco:{tmp_path}", eval_split="train")
  train = create_input(config, "train", train=True)
  assert train.image_shape == (64, 64, 3) and train.class_names == ("cat3", "cat7", "cat11")
  batch = next(train.train_batches(0))
  check_contract(batch, 4, 100, 64, 3)
  batches = list(create_input(config, "train", train=False).eval_batches())
  assert len(batches) == 1 and batches[0]["valid"].all()
  batch = batches[0]
  check_contract(batch, 4, 100, 64, 3)
  np.testing.assert_array_equal(batch["orig_size"], [[40, 60], [50, 30], [32, 32], [45, 45]])
  assert batch["box_valid"].sum(1).tolist() == [1, 2, 0, 1]
  assert batch["box_ignore"][1, :2].tolist() == [False, True]
  # Eval: aspect kept, padded right / bottom; the boxes map back to the annotations exactly.
  for i in range(4):
    n = int(batch["box_valid"][i].sum())
    back = to_original(batch["boxes"][i, :n], batch["scale"][i], batch["offset"][i])
    np.testing.assert_allclose(back, source.boxes[i], atol=1e-4)
    h, w = batch["orig_size"][i]
    np.testing.assert_allclose(batch["scale"][i], [round(w * 64 / max(h, w)) / w,
                                                   round(h * 64 / max(h, w)) / h], rtol=1e-6)


def test_boxes_over_max_boxes_are_cut_and_reported_once(tmp_path, caplog):
  data = write_coco(tmp_path)
  many = [{"image_id": 100, "category_id": 3, "bbox": [1.0 + k, 1, 5, 5], "iscrowd": 0}
          for k in range(7)]
  write_coco(tmp_path, extra_annotations=many)
  source = load_source(f"coco:{tmp_path}", "train", data_config=data_config())
  assert source.count_over(3) == 1 and len(source.boxes[0]) == 8
  transform = detection_transform(data_config(), train=False, image_size=32, max_boxes=3)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      batch = transform(source.get_batch(np.array([0, 0, 1])), np.random.default_rng(0))
  assert batch["box_valid"].sum(1).tolist() == [3, 3, 2]
  np.testing.assert_allclose(to_original(batch["boxes"][0], batch["scale"][0],
                                         batch["offset"][0]), source.boxes[0][:3], atol=1e-4)
  warnings = [r for r in caplog.records if "max_boxes=3" in r.getMessage()]
  assert len(warnings) == 1 and "img0.png" in warnings[0].getMessage()
  assert data["images"][0]["file_name"] == "img0.png"


@pytest.mark.parametrize("bad, message", [
    ({"image_id": 100, "category_id": 3, "bbox": [50, 30, 20, 5]}, "lies outside the 60x40"),
    ({"image_id": 100, "category_id": 3, "bbox": [5, 5, 0, 4]}, "no positive width"),
    ({"image_id": 100, "category_id": 99, "bbox": [5, 5, 3, 3]}, "unknown category_id 99"),
    ({"image_id": 555, "category_id": 3, "bbox": [5, 5, 3, 3]}, "unknown image_id 555"),
    ({"image_id": 100, "category_id": 3, "bbox": [5, 5, 3]}, "is not [x, y, width, height]"),
])
def test_coco_bad_annotations(tmp_path, bad, message):
  write_coco(tmp_path, extra_annotations=[dict(bad, iscrowd=0)])
  path = tmp_path / "annotations" / "instances_train.json"
  with pytest.raises(ValueError, match=re.escape(message)) as err:
    load_source(f"coco:{tmp_path}", "train", data_config=data_config())
  assert str(path) in str(err.value) and "annotation 1000" in str(err.value)
  assert "\n" not in str(err.value)
  source = load_source(f"coco:{tmp_path}", "train", data_config=data_config(skip_bad=True))
  assert len(source.skipped) == 1 and message in source.skipped[0]
  assert [len(b) for b in source.boxes] == [1, 2, 0, 1]  # the good ones all kept


def test_coco_missing_image_and_malformed_json(tmp_path):
  write_coco(tmp_path, drop_file="img3.png")
  with pytest.raises(ValueError, match=r"image file .*img3.png does not exist"):
    load_source(f"coco:{tmp_path}", "train", data_config=data_config())
  source = load_source(f"coco:{tmp_path}", "train", data_config=data_config(skip_bad=True))
  assert len(source) == 3 and "img3.png" in source.skipped[0]
  path = tmp_path / "annotations" / "instances_train.json"
  path.write_text('{"images": [')
  with pytest.raises(ValueError, match=r"instances_train.json is not valid JSON: .* line 1"):
    load_source(f"coco:{tmp_path}", "train", data_config=data_config())
  with pytest.raises(ValueError, match=r"unknown split 'val2017'; coco:.* has \['train'\]"):
    load_source(f"coco:{tmp_path}", "val2017", data_config=data_config())


# --- Box-exact augmentation ----------------------------------------------------------------


def assert_box_covers_its_pixels(channel, box, margin=1.5):
  """Pixels well inside the box are bright in the object's channel; outside the box (by more
  than the resampling blur) that channel is dark."""
  h, w = channel.shape
  yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centers
  x1, y1, x2, y2 = box
  near = (xx > x1 - margin) & (xx < x2 + margin) & (yy > y1 - margin) & (yy < y2 + margin)
  core = (xx > x1 + margin) & (xx < x2 - margin) & (yy > y1 + margin) & (yy < y2 - margin)
  assert (channel[core] > 0.8).all(), box
  assert (channel[~near] < 0.2).all(), box


@pytest.mark.parametrize("augment", ["", "zoom_out,iou_crop,scale_jitter,flip",
                                     "iou_crop,flip", "scale_jitter(0.3,3),flip"])
def test_transformed_boxes_cover_the_same_pixels(augment):
  """Up to three rectangles, each filled in its own colour channel (so one's resampled edge
  never looks like another), through random views: each kept box still frames its colour."""
  rng = np.random.default_rng(1)
  transform = detection_transform(data_config(augment=augment), train=bool(augment),
                                  image_size=48, max_boxes=8)
  seen = 0
  for trial in range(12):
    h, w = (int(v) for v in rng.integers(20, 120, 2))
    n = int(rng.integers(1, 4))
    x1, y1 = rng.integers(0, w - 8, n), rng.integers(0, h - 8, n)
    boxes = np.stack([x1, y1, np.minimum(x1 + rng.integers(6, 40, n), w),
                      np.minimum(y1 + rng.integers(6, 40, n), h)], 1).astype(np.float32)
    image = np.zeros((h, w, 3), np.uint8)
    for k, bx in enumerate(boxes.astype(int)):
      image[bx[1]:bx[3], bx[0]:bx[2], k] = 255
    batch = {"image": [image], "boxes": [boxes], "classes": [np.arange(n, dtype=np.int32)],
             "ignore": [np.zeros(n, bool)], "area": [np.ones(n, np.float32)],
             "orig_size": np.array([[h, w]]), "id": np.array([trial]), "name": ["rects"]}
    out = transform(batch, np.random.default_rng(trial))
    valid = out["box_valid"][0]
    for box, k in zip(out["boxes"][0][valid], out["classes"][0][valid], strict=True):
      assert_box_covers_its_pixels(out["image"][0, ..., k], box)
      seen += 1
    if not augment:  # eval keeps every box, and maps back exactly
      assert valid.sum() == n
      np.testing.assert_allclose(to_original(out["boxes"][0][valid], out["scale"][0],
                                             out["offset"][0]), boxes, atol=1e-3)
  assert seen >= 12


def test_photometric_changes_colors_not_geometry():
  rng = np.random.default_rng(0)
  image = rect_image(40, 40, [(5, 5, 20, 30)], rng)
  batch = {"image": [image], "boxes": [np.array([[5.0, 5, 20, 30]], np.float32)],
           "classes": [np.zeros(1, np.int32)], "ignore": [np.zeros(1, bool)],
           "area": [np.ones(1, np.float32)], "orig_size": np.array([[40, 40]]), "id": np.array([0])}
  plain = detection_transform(data_config(), train=True, image_size=40)(batch, rng)
  changed = [detection_transform(data_config(augment="photometric"), train=True, image_size=40)(
      batch, np.random.default_rng(s)) for s in range(6)]
  assert any(np.abs(c["image"] - plain["image"]).max() > 0.05 for c in changed)
  for c in changed:
    np.testing.assert_array_equal(c["boxes"], plain["boxes"])
  with pytest.raises(ValueError, match="unknown detection augmentation 'elastic'"):
    detection_transform(data_config(augment="elastic"), train=True, image_size=40)
  with pytest.raises(ValueError, match="scale_jitter"):
    detection_transform(data_config(augment="scale_jitter(2,1)"), train=True, image_size=40)


# --- VOC and YOLO --------------------------------------------------------------------------


VOC_XML = """<annotation><filename>{stem}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_voc(root, objects_of, split="train"):
  for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
    os.makedirs(root / sub, exist_ok=True)
  rng = np.random.default_rng(0)
  for stem, (h, w, objects) in objects_of.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "JPEGImages" / f"{stem}.jpg")
    xml = VOC_XML.format(stem=stem, w=w, h=h, objects="".join(
        VOC_OBJECT.format(name=n, difficult=d, x1=a, y1=b, x2=c, y2=e)
        for n, d, a, b, c, e in objects))
    (root / "Annotations" / f"{stem}.xml").write_text(xml)
  (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(objects_of) + "\n")
  (root / "ImageSets" / "Main" / f"dog_{split}.txt").write_text("x 1\n")  # per-class list


def test_voc_reader(tmp_path):
  write_voc(tmp_path, {"a": (30, 40, [("dog", 0, 1, 1, 10, 20), ("person", 1, 5, 6, 40, 30)]),
                       "b": (20, 20, [])})
  source = load_source(f"voc:{tmp_path}", "train", data_config=data_config())
  assert source.num_classes == 20 and source.class_names[11] == "dog"
  # Inclusive 1-based pixels 1..10 are the continuous box 0..10.
  np.testing.assert_array_equal(source.boxes[0], [[0, 0, 10, 20], [4, 5, 40, 30]])
  assert source.classes[0].tolist() == [11, 14] and source.ignore[0].tolist() == [False, True]
  assert len(source.boxes[1]) == 0
  write_voc(tmp_path, {"a": (30, 40, [("unicorn", 0, 1, 1, 10, 20)]), "b": (20, 20, [])})
  with pytest.raises(ValueError, match=r"a.xml: object 0 \(unicorn\): unknown class name"):
    load_source(f"voc:{tmp_path}", "train", data_config=data_config())
  (tmp_path / "Annotations" / "a.xml").write_text("<annotation><size>")
  with pytest.raises(ValueError, match="a.xml: not a readable VOC annotation"):
    load_source(f"voc:{tmp_path}", "train", data_config=data_config())
  source = load_source(f"voc:{tmp_path}", "train", data_config=data_config(skip_bad=True))
  assert len(source) == 1 and "a.xml" in source.skipped[0]  # image b is still there


def test_yolo_reader(tmp_path):
  for sub in ("images/train", "labels/train", "images/val"):
    os.makedirs(tmp_path / sub, exist_ok=True)
  (tmp_path / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
  Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "images/train/x.png")
  Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images/train/y.png")
  Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images/val/z.png")
  (tmp_path / "labels/train/x.txt").write_text("1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.1 0.2\n")
  source = load_source(f"yolo:{tmp_path}", "train+val", data_config=data_config())
  assert source.class_names == ("cat", "dog") and len(source) == 3
  np.testing.assert_allclose(source.boxes[0], [[10, 5, 30, 15], [8, 3, 12, 7]], atol=1e-5)
  assert source.classes[0].tolist() == [1, 0] and len(source.boxes[1]) == len(source.boxes[2]) == 0
  (tmp_path / "labels/train/y.txt").write_text("0 0.5 0.5 0.2\n")
  with pytest.raises(ValueError, match=r"y.txt:1: '0 0.5 0.5 0.2' is not 'class cx cy w h'"):
    load_source(f"yolo:{tmp_path}", "train", data_config=data_config())
  (tmp_path / "labels/train/y.txt").write_text("5 0.5 0.5 0.2 0.2\n")
  with pytest.raises(ValueError, match=r"y.txt:1: unknown class 5 \(2 classes\)"):
    load_source(f"yolo:{tmp_path}", "train", data_config=data_config())
  source = load_source(f"yolo:{tmp_path}", "train", data_config=data_config(skip_bad=True))
  assert len(source.skipped) == 1 and len(source) == 2


# --- TFDS (TensorFlow optional) ------------------------------------------------------------


def test_tfds_coco_and_voc_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  import io

  import tensorflow as tf

  def encoded(h, w, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
                    ).save(buf, format="PNG")
    return buf.getvalue()

  # (ymin, xmin, ymax, xmax) normalised, as TFDS's BBoxFeature.
  examples = [(encoded(20, 40, 0), [[0.1, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 0.5]], [4, 2],
               [False, True]), (encoded(16, 16, 1), [], [], [])]

  def as_dataset(self, split, decoders=None, **kwargs):
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)  # images stay encoded
    objects_keys = {"coco": ("is_crowd", "area", "id"), "voc": ("is_difficult",)}[
        self.name.split("/")[0]]

    def gen():
      for i, (data, boxes, labels, flags) in enumerate(examples):
        objects = {"bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
                   "label": np.asarray(labels, np.int64), objects_keys[0]: np.asarray(flags)}
        if "area" in objects_keys:
          objects["area"] = np.full(len(labels), 7, np.int64)
          objects["id"] = np.arange(len(labels), dtype=np.int64)
        ex = {"image": data, "image/filename": f"f{i}.png", "objects": objects}
        if self.name.startswith("coco"):
          ex["image/id"] = np.int64(500 + i)
        yield ex

    first = next(gen())
    signature = tf.nest.map_structure(
        lambda v: tf.TensorSpec(shape=np.shape(v) if np.ndim(v) == 0 else (None,) +
                                np.shape(v)[1:], dtype=tf.as_dtype(np.asarray(v).dtype)
                                if not isinstance(v, (bytes, str)) else tf.string), first)
    return tf.data.Dataset.from_generator(gen, output_signature=signature)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    coco = load_source("tfds:coco/2017", "validation", data_config=data_config())
    voc = load_source("tfds:voc/2012", "validation", data_config=data_config())
    config = run_config("tfds:coco/2017", train_split="validation", image_size=32)
    batch = next(create_input(config, "validation", train=True).train_batches(0))
  assert coco.num_classes == 80 and voc.num_classes == 20
  for source, key in ((coco, "crowd"), (voc, "difficult")):
    assert len(source) == 2 and len(source.boxes[1]) == 0, key
    np.testing.assert_allclose(source.boxes[0], [[10, 2, 30, 10], [0, 0, 20, 20]], atol=1e-4)
    assert source.classes[0].tolist() == [4, 2] and source.ignore[0].tolist() == [False, True]
  assert coco.image_ids.tolist() == [500, 501] and coco.areas[0].tolist() == [7, 7]
  check_contract(batch, 4, 100, 32, 3)


# --- Recipe data and drawing ---------------------------------------------------------------


def sklearn_digits():
  from sklearn.datasets import load_digits

  d = load_digits()
  return (d.images * 16).clip(0, 255).astype(np.uint8), d.target


def test_digit_canvases_through_coco(tmp_path):
  digits, labels = sklearn_digits()
  kwargs = dict(train=6, val=3, seed=5, canvas_size=48, min_side=10, max_side=20,
                train_range=(0, 1000), val_range=(1000, 1797))
  make_dataset(digits, labels, str(tmp_path / "a"), **kwargs)
  make_dataset(digits, labels, str(tmp_path / "b"), **kwargs)
  for rel in ("annotations/instances_train.json", "annotations/instances_val.json",
              "train/000003.png", "val/000002.png"):
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
  train = load_source(f"coco:{tmp_path / 'a'}", "train", data_config=data_config())
  val = load_source(f"coco:{tmp_path / 'a'}", "val", data_config=data_config())
  assert len(train) == 6 and len(val) == 3 and train.num_classes == 10
  assert train.class_names == tuple(str(k) for k in range(10)) and train.channels == 1
  assert all(1 <= len(b) <= 6 for b in train.boxes)
  # Tight boxes: ink on every edge row and column of each box.
  for image, boxes in zip(train.images, train.boxes, strict=True):
    for x1, y1, x2, y2 in boxes.astype(int):
      patch = image[y1:y2, x1:x2, 0]
      assert patch[0].max() >= 64 and patch[-1].max() >= 64
      assert patch[:, 0].max() >= 64 and patch[:, -1].max() >= 64
  # Held-out canvases use only held-out digits.
  canvases, anns = make_canvases(digits[1000:], labels[1000:], 4, seed=1, canvas_size=48,
                                 min_side=10, max_side=20)
  assert canvases.shape == (4, 48, 48) and all(a["digits"].max() < 797 for a in anns)
  batch = next(create_input(run_config(f"coco:{tmp_path / 'a'}", image_size=48,
                                       augment="flip"), "train", train=True).train_batches(0))
  check_contract(batch, 4, 100, 48, 1)


def test_draw_detections(tmp_path):
  image = np.zeros((40, 50), np.uint8)
  picture = draw_detections(image, [[5, 5, 30, 30], [0, 0, 10, 10]], [0.9, 0.2], [1, 2],
                            valid=[True, False], class_names=["a", "b", "c"],
                            gt_boxes=[[20, 20, 45, 35]], gt_classes=[0])
  assert picture.shape == (40, 50, 3) and picture.dtype == np.uint8
  assert tuple(picture[30, 15]) != (0, 0, 0)  # the predicted box's bottom edge
  assert (picture[35, 30] == 255).all()  # the ground truth's white bottom edge
  assert (picture[8, 2] == 0).all()  # the invalid detection is not drawn
  path = save_detections(str(tmp_path / "d.png"), image, [[5, 5, 30, 30]], [0.5], [0])
  assert Image.open(path).size == (50, 40)
