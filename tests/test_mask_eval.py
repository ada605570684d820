"""Mask AP: jaxvision.detection.masks' IoUs through coco_eval's matching and accumulation against
pycocotools' COCOeval(iouType='segm') on the same masks RLE-encoded (the reference, a core
dependency), on random instance masks with crowd regions, empty images, duplicates and ties."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxvision.detection import coco_eval
from jaxvision.detection.masks import ious_from_overlaps, mask_ious, mask_overlaps

HEIGHT, WIDTH = 128, 160  # large enough for masks over 96 x 96 pixels (COCO's 'large')
RADII = ((2.5, 12.0), (20.0, 45.0), (58.0, 80.0))  # ellipse radii of small, medium, large masks


def blob(rng, height=HEIGHT, width=WIDTH):
  """A random filled ellipse (sometimes cut by the border) with ragged edges, in one of COCO's
  three area ranges."""
  yy, xx = np.mgrid[0:height, 0:width] + 0.5
  side = rng.uniform(*RADII[int(rng.integers(0, 3))])
  ry, rx = side * np.exp(rng.uniform(-0.4, 0.4, 2))
  cy, cx = rng.uniform(0, height), rng.uniform(0, width)
  d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  return d + rng.normal(0, 0.08, d.shape) < 1.0


def jitter(rng, mask):
  """A near-duplicate detection of `mask`: shifted by a few pixels, grown or shrunk."""
  dy, dx = rng.integers(-2, 3, 2)
  out = np.roll(mask, (dy, dx), axis=(0, 1))
  if rng.random() < 0.5:
    grow = out | np.roll(out, 1, 0) | np.roll(out, 1, 1)
    out = grow if rng.random() < 0.5 else out & np.roll(out, 1, 0) & np.roll(out, 1, 1)
  return out


def random_instances(seed, num_images=12, num_cats=3, max_gt=6, max_det=14):
  """Per image: gt masks, categories, crowd flags; detections' masks, categories, scores."""
  rng = np.random.default_rng(seed)
  images = []
  for img in range(num_images):
    n = 0 if img % 5 == 4 else int(rng.integers(1, max_gt + 1))  # some images without objects
    gt = [blob(rng) for _ in range(n)]
    gt_cat = rng.integers(1, num_cats + 1, n)
    crowd = rng.random(n) < 0.15
    det, det_cat = [], []
    for k in range(n):
      for _ in range(int(rng.integers(0, 3))):
        det.append(jitter(rng, gt[k]))
        det_cat.append(gt_cat[k] if rng.random() < 0.85 else int(rng.integers(1, num_cats + 2)))
      if rng.random() < 0.2 and det:  # an exact duplicate
        det.append(det[-1].copy())
        det_cat.append(det_cat[-1])
    for _ in range(int(rng.integers(0, 4))):  # background detections
      det.append(blob(rng))
      det_cat.append(int(rng.integers(1, num_cats + 1)))
    if rng.random() < 0.3:  # an empty detection mask
      det.append(np.zeros((HEIGHT, WIDTH), bool))
      det_cat.append(1)
    det, det_cat = det[:max_det], det_cat[:max_det]
    scores = np.round(rng.random(len(det)), 1)  # coarse: many ties
    images.append({"gt": gt, "gt_cat": np.asarray(gt_cat, np.int64), "crowd": crowd, "det": det,
                   "det_cat": np.asarray(det_cat, np.int64), "score": scores})
  return images


def rle(mask, uncompressed=False):
  """COCO RLE of a bool [H, W] mask; the uncompressed (counts list) form COCO's crowd
  annotations use when asked."""
  encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  if not uncompressed:
    return encoded
  flat = mask.T.reshape(-1)  # column-major, as RLE counts run
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
  counts = ([0] + runs) if flat[0] else runs
  return {"size": list(mask.shape), "counts": counts}


def pycocotools_segm(images, num_cats):
  anns, results = [], []
  for img, im in enumerate(images, start=1):
    for k, m in enumerate(im["gt"]):
      seg = rle(m, uncompressed=bool(im["crowd"][k]))
      anns.append({"id": len(anns) + 1, "image_id": img, "category_id": int(im["gt_cat"][k]),
                   "segmentation": seg, "area": float(m.sum()), "iscrowd": int(im["crowd"][k]),
                   "bbox": list(mask_utils.toBbox(rle(m)))})
    for k, m in enumerate(im["det"]):
      results.append({"image_id": img, "category_id": int(im["det_cat"][k]),
                      "score": float(im["score"][k]), "segmentation": rle(m)})
  dataset = {"images": [{"id": i, "height": HEIGHT, "width": WIDTH}
                        for i in range(1, len(images) + 1)],
             "categories": [{"id": c} for c in range(1, num_cats + 1)], "annotations": anns}
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    e = COCOeval(coco, coco.loadRes(results), "segm")
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e


def padded(images, max_det=14, max_gt=6):
  """The task's padded arrays of `images`: masks, classes (category - 1), valid flags, scores."""
  n = len(images)
  out = {"pred": np.zeros((n, max_det, HEIGHT, WIDTH), bool),
         "gt": np.zeros((n, max_gt, HEIGHT, WIDTH), bool),
         "det_classes": np.zeros((n, max_det), np.int32), "det_valid": np.zeros((n, max_det), bool),
         "scores": np.zeros((n, max_det), np.float32),
         "gt_classes": np.zeros((n, max_gt), np.int32), "gt_valid": np.zeros((n, max_gt), bool),
         "crowd": np.zeros((n, max_gt), bool)}
  for i, im in enumerate(images):
    d, g = len(im["det"]), len(im["gt"])
    if d:
      out["pred"][i, :d] = np.stack(im["det"])
    if g:
      out["gt"][i, :g] = np.stack(im["gt"])
    out["det_classes"][i, :d], out["det_valid"][i, :d] = im["det_cat"] - 1, True
    out["scores"][i, :d] = im["score"]
    out["gt_classes"][i, :g], out["gt_valid"][i, :g] = im["gt_cat"] - 1, True
    out["crowd"][i, :g] = im["crowd"]
  return out


def our_segm(arrays, num_images, num_cats):
  inter, pred_area, gt_area = jax.jit(mask_overlaps)(arrays["pred"], arrays["gt"])
  ious = ious_from_overlaps(np.asarray(inter), np.asarray(pred_area), np.asarray(gt_area),
                            arrays["crowd"])
  image_ids = np.arange(1, num_images + 1)
  boxes = lambda v: np.zeros(v.shape + (4,), np.float32)  # noqa: E731  (unused by mask AP)
  dets, gts = coco_eval.from_padded(
      image_ids, boxes(arrays["det_valid"]), arrays["scores"], arrays["det_classes"],
      arrays["det_valid"], boxes(arrays["gt_valid"]), arrays["gt_classes"], arrays["gt_valid"],
      gt_ignore=arrays["crowd"], gt_area=np.asarray(gt_area), det_area=np.asarray(pred_area),
      category_ids=np.arange(1, num_cats + 2))  # one category only detections have
  iou = coco_eval.ious_from_padded(image_ids, ious, arrays["det_valid"], arrays["gt_valid"])
  return coco_eval.coco_accumulate(dets, gts, iou=iou), ious


def test_mask_ap_equals_pycocotools_segm():
  worst = 0.0
  for seed in range(3):
    images = random_instances(seed)
    num_cats = 3
    ref = pycocotools_segm(images, num_cats)
    arrays = padded(images)
    (precision, recall, cats), ious = our_segm(arrays, len(images), num_cats)
    metrics = coco_eval.summarize(precision, recall)
    ours = np.array(list(metrics.values()))
    worst = max(worst, float(np.abs(ours - ref.stats).max()))
    np.testing.assert_allclose(ours, ref.stats, rtol=0, atol=1e-6, err_msg=f"seed {seed}")
    columns = [list(range(1, num_cats + 1)).index(c) for c in cats]
    np.testing.assert_allclose(precision, ref.eval["precision"][:, :, columns], atol=1e-12)
    np.testing.assert_allclose(recall, ref.eval["recall"][:, columns], atol=1e-12)
    # The data reaches every area range, crowd regions and matches at every threshold.
    assert (ours > 0).all() and (ours < 1).all(), f"seed {seed}: {metrics}"
    assert arrays["crowd"].any() and (~arrays["gt_valid"].any(1)).any()
    # Our float64 IoUs are pycocotools' own, bit for bit.
    for i, im in enumerate(images):
      if im["det"] and im["gt"]:
        expected = mask_utils.iou([rle(m) for m in im["det"]], [rle(m) for m in im["gt"]],
                                  [int(c) for c in im["crowd"]])
        np.testing.assert_array_equal(ious[i, :len(im["det"]), :len(im["gt"])], expected)
  print(f"mask AP: max |ours - pycocotools segm| over 3 seeds: {worst:.3g}")


def test_float32_device_ious_and_the_double_precision_ties():
  """mask_ious on device equals the float64 IoU to float32 rounding; a 7/10 ratio shows why
  evaluation divides in float64: rounded to float32 it falls below the 0.7 threshold that
  pycocotools' double meets."""
  images = random_instances(7, num_images=4)
  arrays = padded(images)
  device = np.asarray(jax.jit(mask_ious)(arrays["pred"], arrays["gt"], arrays["crowd"]))
  counts = [np.asarray(a) for a in mask_overlaps(arrays["pred"], arrays["gt"])]
  exact = ious_from_overlaps(*counts, arrays["crowd"])
  assert device.dtype == np.float32 and exact.dtype == np.float64
  np.testing.assert_allclose(device, exact, rtol=1e-7, atol=0)
  assert (exact > 0.3).sum() > 10
  pred = np.zeros((1, 1, 1, 10), bool)
  gt = np.zeros((1, 1, 1, 10), bool)
  pred[..., :7], gt[..., :] = True, True  # intersection 7, union 10
  threshold = coco_eval.IOU_THRESHOLDS[4]
  f32 = float(mask_ious(jnp.asarray(pred), jnp.asarray(gt), jnp.zeros((1, 1), bool))[0, 0, 0])
  f64 = float(ious_from_overlaps(*mask_overlaps(pred, gt), np.zeros((1, 1), bool))[0, 0, 0])
  assert f32 < threshold <= f64
  # Crowd: over the detection's own area; no intersection: 0, even for crowd gts.
  crowd = ious_from_overlaps(*mask_overlaps(pred, gt), np.ones((1, 1), bool))
  assert crowd[0, 0, 0] == 1.0
  assert ious_from_overlaps(np.zeros((1, 1, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                            np.ones((1, 1), bool))[0, 0, 0] == 0.0


def test_iou_argument_is_checked():
  gts = {"image_id": [1, 1], "category_id": [1, 1], "area": [10.0, 20.0]}
  dets = {"image_id": [1], "category_id": [1], "score": [0.5], "area": [12.0]}
  ok = coco_eval.coco_evaluate(dets, gts, iou={1: [[0.8, 0.1]]})
  assert ok["ap50"] == pytest.approx(0.5, abs=1e-2)  # one of the two found at full precision
  with pytest.raises(ValueError, match=r"iou\[1\] is \(2, 1\), but image 1 has 1 detections"):
    coco_eval.coco_evaluate(dets, gts, iou={1: [[0.8], [0.1]]})
  with pytest.raises(ValueError, match="iou has no matrix for image 1"):
    coco_eval.coco_evaluate(dets, gts, iou={})
  with pytest.raises(ValueError, match="detections needs 'area'"):
    coco_eval.coco_evaluate({k: v for k, v in dets.items() if k != "area"}, gts,
                            iou={1: [[0.8, 0.1]]})
  with pytest.raises(ValueError, match="ious_from_padded: ious"):
    coco_eval.ious_from_padded([1], np.zeros((1, 2, 3)), np.ones((1, 2), bool),
                               np.ones((1, 4), bool))


def test_given_box_ious_reproduce_box_ap_with_rows_in_any_image_order():
  """The iou= path on box IoUs, with the tables' rows of different images interleaved (each
  image's own order kept), gives the box path's numbers: matrices are read by position."""
  from test_coco_eval import random_split, tables

  gts, dts, _, _ = random_split(4, num_images=12)
  detections, ground_truth = tables(gts, dts)
  expected = coco_eval.coco_evaluate(detections, ground_truth)

  def interleaved(table):
    order = np.argsort(np.asarray(table["image_id"]) % 3, kind="stable")
    return {k: np.asarray(v)[order] for k, v in table.items()}

  detections, ground_truth = interleaved(detections), interleaved(ground_truth)
  xywh = lambda b: np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)  # noqa: E731
  iou = {}
  for image in np.unique(np.concatenate([detections["image_id"], ground_truth["image_id"]])):
    d = detections["image_id"] == image
    g = ground_truth["image_id"] == image
    iou[int(image)] = coco_eval._iou_xywh(xywh(detections["box"][d]),
                                          xywh(ground_truth["box"][g]),
                                          ground_truth["iscrowd"][g].astype(bool))
  detections["area"] = np.prod(detections["box"][:, 2:] - detections["box"][:, :2], axis=1)
  got = coco_eval.coco_evaluate({k: v for k, v in detections.items() if k != "box"},
                                {k: v for k, v in ground_truth.items() if k != "box"}, iou=iou)
  np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=0, atol=1e-12)
  assert min(expected.values()) > 0
