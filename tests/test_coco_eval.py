"""COCO evaluation against pycocotools' COCOeval (the reference, a dev dependency) on random
ground truth and detections, and VOC AP on a hand-computed example."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest

from jaxvision.detection import coco_eval
from jaxvision.detection.voc_eval import average_precision, voc_evaluate

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def random_split(seed, num_images=40, num_cats=4):
  """COCO-style annotations and results: crowd boxes, 'area' fields that differ from the box
  area, images without boxes, all three area ranges, detections of a category the ground truth
  does not have, detections on empty images, and tied scores."""
  rng = np.random.default_rng(seed)
  gts, dts = [], []
  for img in range(1, num_images + 1):
    n = 0 if img % 7 == 0 else int(rng.integers(0, 9))
    for _ in range(n):
      side = np.exp(rng.uniform(np.log(4), np.log(250)))
      w, h = side * np.exp(rng.uniform(-0.5, 0.5, 2))
      x, y = rng.uniform(0, 400, 2)
      cat = int(rng.integers(1, num_cats + 1))
      area = float(w * h * (rng.uniform(0.4, 1.0) if rng.random() < 0.5 else 1.0))
      gts.append({"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": area,
                  "iscrowd": int(rng.random() < 0.1)})
      for _ in range(int(rng.integers(0, 4))):  # near-duplicates of this box
        j = rng.normal(0, 0.15, 4) * [w, h, w, h]
        c = cat if rng.random() < 0.8 else int(rng.integers(1, num_cats + 2))
        dts.append({"image_id": img, "category_id": c, "score": float(np.round(rng.random(), 2)),
                    "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]})
    for _ in range(int(rng.integers(0, 5))):  # background detections
      w, h = rng.uniform(3, 150, 2)
      x, y = rng.uniform(0, 400, 2)
      dts.append({"image_id": img, "category_id": int(rng.integers(1, num_cats + 1)),
                  "score": float(np.round(rng.random(), 2)), "bbox": [x, y, w, h]})
  return gts, dts, num_images, num_cats


def pycocotools_eval(gts, dts, num_images, num_cats):
  dataset = {"images": [{"id": i} for i in range(1, num_images + 1)],
             "categories": [{"id": c} for c in range(1, num_cats + 1)],
             "annotations": [dict(g, id=i + 1) for i, g in enumerate(gts)]}
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    e = COCOeval(coco, coco.loadRes([dict(d) for d in dts]), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e


def tables(gts, dts):
  xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
  detections = {"image_id": [d["image_id"] for d in dts],
                "category_id": [d["category_id"] for d in dts],
                "score": [d["score"] for d in dts], "box": [xyxy(d["bbox"]) for d in dts]}
  ground_truth = {"image_id": [g["image_id"] for g in gts],
                  "category_id": [g["category_id"] for g in gts],
                  "iscrowd": [g["iscrowd"] for g in gts], "area": [g["area"] for g in gts],
                  "box": [xyxy(g["bbox"]) for g in gts]}
  return detections, ground_truth


def test_equals_pycocotools_over_seeds():
  worst = 0.0
  for seed in range(6):
    gts, dts, num_images, num_cats = random_split(seed)
    ref = pycocotools_eval(gts, dts, num_images, num_cats)
    detections, ground_truth = tables(gts, dts)
    precision, recall, cats = coco_eval.coco_accumulate(detections, ground_truth)
    metrics = coco_eval.summarize(precision, recall)
    assert list(metrics) == list(coco_eval.METRICS)
    ours = np.array(list(metrics.values()))
    worst = max(worst, float(np.abs(ours - ref.stats).max()))
    np.testing.assert_allclose(ours, ref.stats, rtol=0, atol=1e-6, err_msg=f"seed {seed}")
    columns = [list(range(1, num_cats + 1)).index(c) for c in cats]
    np.testing.assert_allclose(precision, ref.eval["precision"][:, :, columns], atol=1e-12)
    np.testing.assert_allclose(recall, ref.eval["recall"][:, columns], atol=1e-12)
    # The random data reaches every area range and every kind of metric.
    assert (ours > 0).all() and (ours < 1).all(), f"seed {seed}: {metrics}"
  print(f"max |ours - pycocotools| over 6 seeds: {worst:.3g}")


def test_perfect_and_empty_predictions():
  gts, _, _, _ = random_split(9)
  regular = [g for g in gts if not g["iscrowd"]]
  perfect = [{"image_id": g["image_id"], "category_id": g["category_id"], "score": 0.9,
              "bbox": g["bbox"]} for g in regular]
  detections, ground_truth = tables(gts, perfect)
  metrics = coco_eval.coco_evaluate(detections, ground_truth)
  assert metrics["ap"] == 1.0 and metrics["ap50"] == 1.0 and metrics["ar100"] == 1.0
  empty = {"image_id": [], "category_id": [], "score": [], "box": np.zeros((0, 4))}
  metrics = coco_eval.coco_evaluate(empty, ground_truth)
  assert metrics["ap"] == 0.0 and metrics["ar100"] == 0.0
  with pytest.raises(ValueError, match="has 3 rows, expected 2"):
    coco_eval.coco_evaluate({"image_id": [1, 2, 3], "category_id": [1, 1], "score": [0.5, 0.4],
                             "box": np.zeros((2, 4))}, ground_truth)


def test_from_padded_and_category_ids():
  """The task's padded arrays (with padding examples) give the same numbers as the tables."""
  gts, dts, _, _ = random_split(3, num_images=6)
  detections, ground_truth = tables(gts, dts)
  expected = coco_eval.coco_evaluate(detections, ground_truth)
  d, m = 40, 10
  n = 8  # 6 images and 2 padding examples repeating image 1
  ids = np.array([1, 2, 3, 4, 5, 6, 1, 1])
  arrays = {k: np.zeros(s, t) for k, s, t in (
      ("db", (n, d, 4), np.float32), ("ds", (n, d), np.float32), ("dc", (n, d), np.int32),
      ("dv", (n, d), bool), ("gb", (n, m, 4), np.float32), ("gc", (n, m), np.int32),
      ("gv", (n, m), bool), ("gi", (n, m), bool), ("ga", (n, m), np.float32))}
  for table, prefix, size in ((detections, "d", d), (ground_truth, "g", m)):
    slots = np.zeros(n, int)
    for i, img in enumerate(table["image_id"]):
      row = img - 1
      j = slots[row]
      assert j < size
      slots[row] += 1
      arrays[prefix + "b"][row, j] = table["box"][i]
      arrays[prefix + "c"][row, j] = table["category_id"][i] - 1  # contiguous class
      arrays[prefix + "v"][row, j] = True
      if prefix == "d":
        arrays["ds"][row, j] = table["score"][i]
      else:
        arrays["gi"][row, j], arrays["ga"][row, j] = table["iscrowd"][i], table["area"][i]
  for k in ("db", "ds", "dc", "dv", "gb", "gc", "gv"):  # padding examples hold copies of row 0
    arrays[k][6:] = arrays[k][0]
  dets, gt = coco_eval.from_padded(
      ids, arrays["db"], arrays["ds"], arrays["dc"], arrays["dv"], arrays["gb"], arrays["gc"],
      arrays["gv"], gt_ignore=arrays["gi"], gt_area=arrays["ga"],
      example_valid=np.arange(n) < 6, category_ids=[1, 2, 3, 4, 5])
  got = coco_eval.coco_evaluate(dets, gt)
  np.testing.assert_allclose(list(got.values()), list(expected.values()), atol=1e-6)
  with pytest.raises(ValueError, match="image ids repeat"):
    coco_eval.from_padded(ids, arrays["db"], arrays["ds"], arrays["dc"], arrays["dv"],
                          arrays["gb"], arrays["gc"], arrays["gv"])


def test_a_few_thousand_detections_take_well_under_a_second():
  gts, dts, _, _ = random_split(21, num_images=600, num_cats=20)
  detections, ground_truth = tables(gts, dts)
  assert len(dts) > 2500
  start = time.perf_counter()
  coco_eval.coco_evaluate(detections, ground_truth)
  elapsed = time.perf_counter() - start
  print(f"coco_evaluate: {len(dts)} detections, {len(gts)} boxes in {elapsed:.3f} s")
  assert elapsed < 2.0  # about 0.15 s on an idle 2-core machine; generous for shared CPUs


# --- VOC -------------------------------------------------------------------------------------


def test_voc_ap_hand_example():
  """Class 1: two boxes to find in two images (and a difficult one); detections in score order
  TP, FP (duplicate), ignored (difficult), FP, TP -> recall .5 .5 .5 .5 1, precision
  1 .5 .5 1/3 .5: all-point AP .5 * 1 + .5 * .5 = 0.75; 11-point (6 * 1 + 5 * .5) / 11.
  Class 2: one box, no detection -> 0. Class 3: only difficult boxes -> not counted."""
  ground_truth = {
      "image_id": [1, 1, 2, 2, 2], "category_id": [1, 1, 1, 2, 3],
      "box": [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [30, 30, 40, 40],
              [0, 0, 5, 5]],
      "difficult": [False, True, False, False, True]}
  detections = {
      "image_id": [1, 1, 1, 2, 2], "category_id": [1, 1, 1, 1, 1],
      "score": [0.9, 0.8, 0.7, 0.6, 0.5],
      "box": [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [50, 50, 60, 60],
              [0, 0, 10, 10]]}
  result = voc_evaluate(detections, ground_truth)
  assert result["per_class"] == pytest.approx({1: 0.75, 2: 0.0})
  assert result["ap50"] == pytest.approx(0.375)
  result = voc_evaluate(detections, ground_truth, eleven_point=True)
  assert result["per_class"][1] == pytest.approx(8.5 / 11)
  # Full recall at full precision throughout: AP 1.
  assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
