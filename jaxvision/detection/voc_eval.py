"""Pascal VOC detection AP in NumPy (the devkit's rules, as py-faster-rcnn's voc_eval).

Per class: detections sorted by score (stable), each matched to the box of its image with the
highest IoU; IoU > threshold on a not yet matched box is a true positive, on an already
matched box a false positive, on a `difficult` box neither; below the threshold a false
positive. AP is the area under the precision envelope (all-point, VOC2010+) or the mean of the
envelope at recall 0, 0.1, ..., 1 (11-point, VOC2007). Boxes are continuous xyxy pixels: the
devkit's inclusive integer boxes (x1 .. x2, width x2 - x1 + 1) are (x1 - 1, x2) here, so
its "+1" widths are already in the coordinates (see jaxvision.data.voc).

Inputs are per-box tables as for coco_eval: detections {image_id, category_id, score, box},
ground truth {image_id, category_id, box, optional difficult}.
"""

from __future__ import annotations

import numpy as np

from jaxvision.detection.boxes import pairwise_iou


def average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False):
  """VOC AP from recall / precision curves (in score order)."""
  recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
  if eleven_point:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
      above = recall >= t
      ap += (np.max(precision[above]) if above.any() else 0.0) / 11.0
    return float(ap)
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_evaluate(detections: dict, ground_truth: dict, *, iou_threshold: float = 0.5,
                 eleven_point: bool = False) -> dict:
  """{'ap50': mean AP over the classes with a non-difficult box, 'per_class': {category id:
  AP}} (the key says 50 for the default threshold; any `iou_threshold` is honoured)."""
  dt_img = np.asarray(detections["image_id"], np.int64)
  dt_cat = np.asarray(detections["category_id"], np.int64)
  dt_score = np.asarray(detections["score"], np.float64)
  dt_box = np.asarray(detections["box"], np.float64).reshape(-1, 4)
  gt_img = np.asarray(ground_truth["image_id"], np.int64)
  gt_cat = np.asarray(ground_truth["category_id"], np.int64)
  gt_box = np.asarray(ground_truth["box"], np.float64).reshape(-1, 4)
  difficult = np.asarray(ground_truth.get("difficult", np.zeros(len(gt_cat), bool)), bool)
  if not len(dt_img) == len(dt_cat) == len(dt_score) == len(dt_box):
    raise ValueError("voc_evaluate: detection columns differ in length")
  if not len(gt_img) == len(gt_cat) == len(gt_box) == len(difficult):
    raise ValueError("voc_evaluate: ground-truth columns differ in length")
  per_class = {}
  for cat in np.unique(gt_cat):
    gts = np.nonzero(gt_cat == cat)[0]
    num_pos = int(np.sum(~difficult[gts]))
    if not num_pos:
      continue
    dts = np.nonzero(dt_cat == cat)[0]
    dts = dts[np.argsort(-dt_score[dts], kind="mergesort")]
    taken = np.zeros(len(gt_cat), bool)
    tp = np.zeros(len(dts))
    fp = np.zeros(len(dts))
    for i, d in enumerate(dts):
      same = gts[gt_img[gts] == dt_img[d]]
      if not len(same):
        fp[i] = 1
        continue
      iou = pairwise_iou(dt_box[d][None], gt_box[same])[0]
      j = same[np.argmax(iou)]
      if iou.max() > iou_threshold:
        if difficult[j]:
          continue
        if taken[j]:
          fp[i] = 1
        else:
          tp[i], taken[j] = 1, True
      else:
        fp[i] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_pos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    per_class[int(cat)] = average_precision(recall, precision, eleven_point)
  mean = float(np.mean(list(per_class.values()))) if per_class else -1.0
  return {"ap50": mean, "per_class": per_class}
