"""COCO box evaluation in NumPy: AP / AR exactly as pycocotools' COCOeval computes them.

    metrics = coco_evaluate(detections, ground_truth)   # {'ap': ..., 'ap50': ..., ...}

`detections` and `ground_truth` are dicts of per-box arrays (one row per box, any order):

    detections    image_id [n], category_id [n], score [n], box [n, 4] xyxy pixels
    ground_truth  image_id [m], category_id [m], box [m, 4] xyxy pixels,
                  optional iscrowd [m] (default False) and area [m] (default: box area;
                  COCO's own 'area' is the segment's, which decides small / medium / large)

(`from_padded` builds both from the detection task's padded arrays.) Every image that appears
in either counts, so detections on an image without objects are false positives. The rules are
pycocotools' (iouType 'bbox'): per image and category the detections sorted by score (stable)
and cut to the largest maxDets; IoU in double precision on xywh boxes, crowd boxes measured
against the detection's own area; greedy matching per IoU threshold (0.50:0.05:0.95) where a
detection prefers a regular box to an ignored one (crowd, or outside the area range), the
highest IoU, and on ties the later box; unmatched detections outside the area range ignored;
101-point interpolated precision. A metric with nothing to average is -1, as pycocotools
reports it.

Mask AP (iouType 'segm') is the same matching and accumulation on other IoUs: pass `iou`, a
dict {image_id: float [n_dt, n_gt]} of each image's IoU matrix, rows in the order that image's
detections appear in `detections`, columns in the order its ground truth appears in
`ground_truth` (an image with no detection or no ground truth needs no entry), and the masks'
pixel areas as detections['area'] and ground_truth['area'] (COCO's 'area' is the mask's; the
detection's area decides whether an unmatched detection is outside an area range). Boxes are
then not needed. `ious_from_padded` builds the dict from per-example [D, M] matrices (e.g.
jaxvision.detection.masks' counts divided in float64); compute them in double precision, as
pycocotools does, since ratios such as 3/5 meet the thresholds exactly.
"""

from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2),
               "large": (96.0**2, 1e10)}
# name -> (AP (True) or AR, IoU threshold or None for the 0.50:0.95 mean, area, maxDets):
# the 12 numbers of COCOeval.summarize(), in its order.
METRICS = {
    "ap": (True, None, "all", 100), "ap50": (True, 0.5, "all", 100),
    "ap75": (True, 0.75, "all", 100), "ap_small": (True, None, "small", 100),
    "ap_medium": (True, None, "medium", 100), "ap_large": (True, None, "large", 100),
    "ar1": (False, None, "all", 1), "ar10": (False, None, "all", 10),
    "ar100": (False, None, "all", 100), "ar_small": (False, None, "small", 100),
    "ar_medium": (False, None, "medium", 100), "ar_large": (False, None, "large", 100),
}


def _column(table: dict, key: str, n: int | None, dtype, default=None, where: str = ""):
  if key not in table:
    if default is None:
      raise ValueError(f"coco_evaluate: {where} has no {key!r}")
    return np.full(n, default, dtype)
  value = np.asarray(table[key], dtype)
  if n is not None and len(value) != n:
    raise ValueError(f"coco_evaluate: {where}[{key!r}] has {len(value)} rows, expected {n}")
  return value


def _xywh(boxes) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
  return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                   boxes[:, 3] - boxes[:, 1]], axis=1)


def _iou_xywh(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
  """[..., D, G] IoU of dt [..., D, 4] and gt [..., G, 4] xywh boxes as pycocotools' bbIou
  (C, double): intersection over union, or over the detection's area for crowd boxes."""
  d, g = dt[..., :, None, :], gt[..., None, :, :]
  w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
  h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
  inter = w * h
  da, ga = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
  union = np.where(crowd[..., None, :], da, da + ga - inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
  return np.where((w > 0) & (h > 0), iou, 0.0)


def _match(iou, crowd, gt_ignore, thresholds):
  """Greedy matching, for a stack of (image, category) groups at once, of each group's
  detections (score order) to its boxes, for every area range and IoU threshold.

  iou [S, D, G] (-1 for padding), crowd [S, G], gt_ignore [S, A, G] -> (matched [S, D, A, T],
  matched to an ignored box [S, D, A, T]).
  """
  num_s, num_d, num_g = iou.shape
  num_a, num_t = gt_ignore.shape[1], len(thresholds)
  # Position of each box in pycocotools' per-area order (regular boxes first, stable): ties in
  # IoU go to the later box in that order.
  order = np.argsort(gt_ignore, axis=2, kind="stable")
  position = np.empty_like(order)
  np.put_along_axis(position, order, np.broadcast_to(np.arange(num_g), order.shape), axis=2)
  position = position[:, :, None, :]  # [S, A, 1, G]
  regular = ~gt_ignore[:, :, None, :]
  crowd = crowd[:, None, None, :]
  taken = np.zeros((num_s, num_a, num_t, num_g), bool)
  matched = np.zeros((num_s, num_d, num_a, num_t), bool)
  to_ignored = np.zeros((num_s, num_d, num_a, num_t), bool)
  limit = np.minimum(thresholds, 1 - 1e-10)[None, None, :, None]
  for d in range(num_d):
    row = iou[:, d, None, None, :]  # [S, 1, 1, G]
    candidate = (~taken | crowd) & (row >= limit)
    best_regular = candidate & regular
    candidate = np.where(best_regular.any(-1, keepdims=True), best_regular, candidate & ~regular)
    best = np.max(np.where(candidate, row, -np.inf), axis=-1, keepdims=True)
    choice = np.argmax(np.where(candidate & (row == best), position, -1), axis=-1)  # [S, A, T]
    hit = candidate.any(-1)
    matched[:, d] = hit
    to_ignored[:, d] = hit & np.take_along_axis(
        np.broadcast_to(gt_ignore[:, :, None, :], taken.shape), choice[..., None], -1)[..., 0]
    np.put_along_axis(taken, choice[..., None], hit[..., None] | np.take_along_axis(
        taken, choice[..., None], -1), axis=-1)
  return matched, to_ignored


def _runs(keys: np.ndarray) -> np.ndarray:
  """Start of each run of equal rows of sorted keys [n, k], and n at the end."""
  if not len(keys):
    return np.zeros(1, np.int64)
  change = np.any(keys[1:] != keys[:-1], axis=1)
  return np.concatenate([[0], np.nonzero(change)[0] + 1, [len(keys)]])


def _boxes(table: dict, n: int, where: str, needed: bool) -> np.ndarray:
  if "box" not in table and not needed:
    return np.zeros((n, 4))
  boxes = _xywh(_column(table, "box", None, np.float64, where=where))
  if len(boxes) != n:
    raise ValueError(f"coco_evaluate: {where} has {len(boxes)} boxes for {n} rows")
  return boxes


def _areas(table: dict, boxes: np.ndarray, n: int, where: str, needed: bool) -> np.ndarray:
  if "area" in table:
    return _column(table, "area", n, np.float64, where=where)
  if needed:
    raise ValueError(f"coco_evaluate: {where} needs 'area' (the masks' pixel areas) with iou=")
  return boxes[:, 2] * boxes[:, 3]


def _local_index(image_ids: np.ndarray) -> np.ndarray:
  """Position of each row among the rows of its image, in table order."""
  order = np.argsort(image_ids, kind="stable")
  starts = _runs(image_ids[order][:, None])
  local = np.empty(len(image_ids), np.int64)
  local[order] = np.arange(len(order)) - np.repeat(starts[:-1], np.diff(starts))
  return local


def _check_ious(iou: dict, dt_img: np.ndarray, gt_img: np.ndarray) -> dict:
  """{image id: float64 [n_dt, n_gt]} checked against the tables' rows per image."""
  dt_count = dict(zip(*np.unique(dt_img, return_counts=True), strict=True))
  gt_count = dict(zip(*np.unique(gt_img, return_counts=True), strict=True))
  out = {}
  for image in set(dt_count) & set(gt_count):
    if image not in iou:
      raise ValueError(f"coco_evaluate: iou has no matrix for image {image} "
                       f"({dt_count[image]} detections, {gt_count[image]} ground truth)")
  for image, matrix in iou.items():
    matrix = np.asarray(matrix, np.float64)
    expected = (dt_count.get(image, 0), gt_count.get(image, 0))
    if matrix.shape != expected:
      raise ValueError(f"coco_evaluate: iou[{image}] is {matrix.shape}, but image {image} has "
                       f"{expected[0]} detections and {expected[1]} ground truth")
    out[int(image)] = matrix
  return out


def coco_accumulate(detections: dict, ground_truth: dict, *, iou: dict | None = None,
                    max_detections=MAX_DETECTIONS, area_ranges=AREA_RANGES):
  """COCOeval's evaluate + accumulate: (precision [T, R, K, A, M], recall [T, K, A, M],
  category ids [K]) with -1 where a category has no regular box; `iou` gives the IoU matrices
  per image (mask AP; see the module docstring) instead of box IoUs."""
  n_dt = len(np.asarray(detections.get("score", [])))
  n_gt = len(np.asarray(ground_truth.get("category_id", [])))
  dt_img = _column(detections, "image_id", n_dt, np.int64, where="detections")
  dt_cat = _column(detections, "category_id", n_dt, np.int64, where="detections")
  dt_score = _column(detections, "score", n_dt, np.float64, where="detections")
  gt_img = _column(ground_truth, "image_id", n_gt, np.int64, where="ground_truth")
  gt_cat = _column(ground_truth, "category_id", n_gt, np.int64, where="ground_truth")
  given = iou is not None
  dt_box = _boxes(detections, n_dt, "detections", needed=not given)
  gt_box = _boxes(ground_truth, n_gt, "ground_truth", needed=not given)
  gt_crowd = _column(ground_truth, "iscrowd", n_gt, bool, default=False, where="ground_truth")
  gt_area = _areas(ground_truth, gt_box, n_gt, "ground_truth", needed=given)
  # pycocotools' loadRes: w * h of the result's bbox, or the area of its segmentation.
  dt_area = _areas(detections, dt_box, n_dt, "detections", needed=given)
  if given:
    iou = _check_ious(iou, dt_img, gt_img)
    pair_iou = _pair_iou(iou, dt_img, gt_img)
  else:
    pair_iou = _box_iou(dt_box, gt_box, gt_crowd)
  ranges = np.asarray(list(area_ranges.values()), np.float64)  # [A, 2]
  max_detections = tuple(sorted(max_detections))
  cats = np.unique(gt_cat)
  num_t, num_r, num_k, num_a, num_m = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(cats),
                                       len(ranges), len(max_detections))
  precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
  recall = -np.ones((num_t, num_k, num_a, num_m))

  # Detections of categories without ground truth count nowhere (COCOeval loops over the
  # ground truth's categories). Sorted by (category, image, score desc, input order), each
  # (image, category) group cut to the largest maxDets: COCOeval's evaluateImg order.
  dt_idx = np.nonzero(np.isin(dt_cat, cats))[0]
  dt_idx = dt_idx[np.lexsort((dt_idx, -dt_score[dt_idx], dt_img[dt_idx], dt_cat[dt_idx]))]
  starts = _runs(np.stack([dt_cat[dt_idx], dt_img[dt_idx]], 1))
  rank = np.arange(len(dt_idx)) - np.repeat(starts[:-1], np.diff(starts))
  dt_idx, rank = dt_idx[rank < max_detections[-1]], rank[rank < max_detections[-1]]
  gt_idx = np.lexsort((np.arange(n_gt), gt_img, gt_cat))
  gt_ignore = gt_crowd[:, None] | (gt_area[:, None] < ranges[:, 0]) | (
      gt_area[:, None] > ranges[:, 1])  # [n_gt, A]
  dt_outside = (dt_area[:, None] < ranges[:, 0]) | (dt_area[:, None] > ranges[:, 1])

  # Per kept detection: matched / ignored [n, A, T]; unmatched ones outside the area ignored.
  matched = np.zeros((len(dt_idx), num_a, num_t), bool)
  to_ignored = np.zeros_like(matched)
  gt_starts = _runs(np.stack([gt_cat[gt_idx], gt_img[gt_idx]], 1))
  gt_of = {(gt_cat[gt_idx[s]], gt_img[gt_idx[s]]): gt_idx[s:e]
           for s, e in zip(gt_starts[:-1], gt_starts[1:], strict=True) if e > s}
  starts = _runs(np.stack([dt_cat[dt_idx], dt_img[dt_idx]], 1))
  groups = []  # (rows of dt_idx, gt indices) of the groups with both
  for s, e in zip(starts[:-1], starts[1:], strict=True):
    g = gt_of.get((dt_cat[dt_idx[s]], dt_img[dt_idx[s]]))
    if e > s and g is not None:
      groups.append((np.arange(s, e), g))
  _match_groups(groups, dt_idx, pair_iou, gt_crowd, gt_ignore, matched, to_ignored)
  ignored = to_ignored | (~matched & dt_outside[dt_idx][:, :, None])

  regular = np.zeros((num_k, num_a), np.int64)
  np.add.at(regular, np.searchsorted(cats, gt_cat), ~gt_ignore)
  cat_starts = np.searchsorted(dt_cat[dt_idx], cats, side="left")
  cat_ends = np.searchsorted(dt_cat[dt_idx], cats, side="right")
  for k in range(num_k):
    rows = slice(cat_starts[k], cat_ends[k])
    scores, ranks = dt_score[dt_idx[rows]], rank[rows]
    for m, max_det in enumerate(max_detections):
      sel = np.nonzero(ranks < max_det)[0]
      sel = sel[np.argsort(-scores[sel], kind="mergesort")]
      areas = np.nonzero(regular[k] > 0)[0]
      dtm = np.moveaxis(matched[rows][sel][:, areas], 0, -1)  # [A', T, nd]
      dtig = np.moveaxis(ignored[rows][sel][:, areas], 0, -1)
      p, r = _precision_recall(dtm, dtig, regular[k, areas])
      precision[:, :, k, areas, m] = np.moveaxis(p, 0, -1)
      recall[:, k, areas, m] = r.T
  return precision, recall, cats


def _box_iou(dt_box, gt_box, gt_crowd):
  """`fn(dt indices [S, D], gt indices [S, G], crowd [S, G]) -> [S, D, G]` box IoUs."""
  return lambda d, g, crowd: _iou_xywh(dt_box[d], gt_box[g], crowd)


def _pair_iou(iou: dict, dt_img, gt_img):
  """The same function over given per-image matrices: the entry of each (detection, box)."""
  dt_local, gt_local = _local_index(dt_img), _local_index(gt_img)

  def pairs(d, g, crowd):
    del crowd
    out = np.zeros(d.shape + g.shape[-1:])
    for s in range(len(d)):
      matrix = iou[int(dt_img[d[s, 0]])]
      out[s] = matrix[np.ix_(dt_local[d[s]], gt_local[g[s]])]
    return out

  return pairs


def _match_groups(groups, dt_idx, pair_iou, gt_crowd, gt_ignore, matched, to_ignored):
  """Runs `_match` over the (image, category) groups in chunks of similar sizes (so padding
  stays small), writing into matched / to_ignored rows."""
  groups = sorted(groups, key=lambda x: (len(x[0]), len(x[1])))
  chunk = 256
  for c in range(0, len(groups), chunk):
    part = groups[c:c + chunk]
    num_d = max(len(r) for r, _ in part)
    num_g = max(len(g) for _, g in part)
    num_a = gt_ignore.shape[1]
    # Padding repeats a group's first detection / box and is masked out below.
    dts = np.zeros((len(part), num_d), np.int64)
    gts = np.zeros((len(part), num_g), np.int64)
    real = np.zeros((len(part), num_d, num_g), bool)
    crowd = np.zeros((len(part), num_g), bool)
    ignore = np.ones((len(part), num_a, num_g), bool)
    for i, (r, g) in enumerate(part):
      dts[i], gts[i] = dt_idx[r[0]], g[0]
      dts[i, :len(r)], gts[i, :len(g)] = dt_idx[r], g
      real[i, :len(r), :len(g)] = True
      crowd[i, :len(g)] = gt_crowd[g]
      ignore[i, :, :len(g)] = gt_ignore[g].T
    # Padding gets IoU -1: below every threshold, so it never matches.
    iou = np.where(real, pair_iou(dts, gts, crowd), -1.0)
    hit, to_ig = _match(iou, crowd, ignore, IOU_THRESHOLDS)
    for i, (r, _) in enumerate(part):
      matched[r] = hit[i, :len(r)]
      to_ignored[r] = to_ig[i, :len(r)]


def _precision_recall(dtm, dtig, num_regular):
  """101-point interpolated precision [A, T, R] and final recall [A, T] of score-sorted
  matches dtm / dtig [A, T, nd], with num_regular [A] boxes to find."""
  tp = np.cumsum(dtm & ~dtig, axis=-1).astype(float)
  fp = np.cumsum(~dtm & ~dtig, axis=-1).astype(float)
  num_a, num_t, nd = tp.shape
  precision = np.zeros((num_a, num_t, len(RECALL_THRESHOLDS)))
  if not nd:
    return precision, np.zeros((num_a, num_t))
  rc = tp / num_regular[:, None, None]
  pr = tp / (fp + tp + np.spacing(1))
  pr = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]  # the precision envelope
  for a in range(num_a):
    for t in range(num_t):
      idx = np.searchsorted(rc[a, t], RECALL_THRESHOLDS, side="left")
      inside = idx < nd
      precision[a, t, inside] = pr[a, t, idx[inside]]
  return precision, rc[..., -1]


def summarize(precision, recall, *, max_detections=MAX_DETECTIONS,
              area_ranges=AREA_RANGES) -> dict[str, float]:
  """The 12 COCOeval.summarize() numbers, by name (see METRICS)."""
  areas = list(area_ranges)
  max_detections = tuple(sorted(max_detections))
  out = {}
  for name, (is_ap, iou, area, max_det) in METRICS.items():
    if area not in areas or max_det not in max_detections:
      continue
    a, m = areas.index(area), max_detections.index(max_det)
    s = precision[..., a, m] if is_ap else recall[..., a, m]
    if iou is not None:
      s = s[np.nonzero(np.isclose(IOU_THRESHOLDS, iou))[0]]
    s = s[s > -1]
    out[name] = float(np.mean(s)) if s.size else -1.0
  return out


def coco_evaluate(detections: dict, ground_truth: dict, *, iou: dict | None = None
                  ) -> dict[str, float]:
  """AP, AP50, AP75, AP small/medium/large, AR1/10/100, AR small/medium/large (see METRICS)
  of per-box `detections` against per-box `ground_truth`, on box IoUs or on the given per-image
  `iou` matrices (mask AP; see the module docstring)."""
  precision, recall, _ = coco_accumulate(detections, ground_truth, iou=iou)
  return summarize(precision, recall)


def per_category_ap(detections: dict, ground_truth: dict, *, iou: dict | None = None
                    ) -> dict[int, float]:
  """AP (IoU 0.50:0.95, all areas, 100 detections) of each ground-truth category id."""
  precision, _, cats = coco_accumulate(detections, ground_truth, iou=iou)
  out = {}
  for k, cat in enumerate(cats):
    s = precision[:, :, k, 0, -1]
    s = s[s > -1]
    out[int(cat)] = float(np.mean(s)) if s.size else -1.0
  return out


def _valid_examples(image_id, example_valid, where: str):
  image_id = np.asarray(image_id).reshape(-1)
  n = len(image_id)
  keep = np.ones(n, bool) if example_valid is None else np.asarray(example_valid, bool)
  if keep.shape != (n,):
    raise ValueError(f"{where}: example_valid {keep.shape} for {n} image ids")
  if len(np.unique(image_id[keep])) != keep.sum():
    raise ValueError(f"{where}: image ids repeat among the valid examples")
  return image_id, keep


def from_padded(image_id, det_boxes, det_scores, det_classes, det_valid, gt_boxes, gt_classes,
                gt_valid, *, gt_ignore=None, gt_area=None, det_area=None, example_valid=None,
                category_ids=None) -> tuple[dict, dict]:
  """(detections, ground_truth) per-box tables from the detection task's padded arrays.

  image_id [N]; det_* [N, D(, 4)] with det_valid and det_area (mask AP: the masks' pixel
  areas); gt_* [N, M(, 4)] with gt_valid, gt_ignore (crowd / difficult: evaluated as COCO's
  iscrowd) and gt_area; example_valid [N] drops the padding examples of the last eval batch.
  Boxes are xyxy in original-image pixels. Class k is reported as category_ids[k] (default: k
  itself). Each image's rows keep the order of its valid slots, as `ious_from_padded`'s do.
  """
  image_id, keep = _valid_examples(image_id, example_valid, "from_padded")
  mapping = None if category_ids is None else np.asarray(category_ids, np.int64)

  def rows(boxes, classes, valid, extra):
    boxes, classes = np.asarray(boxes, np.float64), np.asarray(classes, np.int64)
    valid = np.asarray(valid, bool) & keep[:, None]
    if boxes.shape[:2] != valid.shape or classes.shape != valid.shape:
      raise ValueError(f"from_padded: boxes {boxes.shape}, classes {classes.shape} and valid "
                       f"{valid.shape} must be [N, D, 4], [N, D], [N, D]")
    cls = classes[valid]
    if mapping is not None:
      if len(cls) and (cls.min() < 0 or cls.max() >= len(mapping)):
        raise ValueError(f"from_padded: class {int(cls.max())} has no category id "
                         f"({len(mapping)} given)")
      cls = mapping[cls]
    table = {"image_id": np.broadcast_to(image_id[:, None], valid.shape)[valid],
             "category_id": cls, "box": boxes[valid]}
    for key, value in extra.items():
      if value is not None:
        table[key] = np.asarray(value)[valid]
    return table

  dets = rows(det_boxes, det_classes, det_valid, {"score": det_scores, "area": det_area})
  gts = rows(gt_boxes, gt_classes, gt_valid, {"iscrowd": gt_ignore, "area": gt_area})
  return dets, gts


def ious_from_padded(image_id, ious, det_valid, gt_valid, *, example_valid=None
                     ) -> dict[int, np.ndarray]:
  """The `iou=` dict of coco_evaluate from per-example matrices ious [N, D, M] (detection slot x
  ground-truth slot of each example), keeping the valid rows [N, D] and columns [N, M] in slot
  order: aligned with the tables `from_padded` builds from the same arrays."""
  image_id, keep = _valid_examples(image_id, example_valid, "ious_from_padded")
  ious = np.asarray(ious, np.float64)
  det_valid, gt_valid = np.asarray(det_valid, bool), np.asarray(gt_valid, bool)
  n = len(image_id)
  if ious.ndim != 3 or det_valid.shape != ious.shape[:2] or gt_valid.shape != (
      n, ious.shape[2]) or len(ious) != n:
    raise ValueError(f"ious_from_padded: ious {ious.shape}, det_valid {det_valid.shape} and "
                     f"gt_valid {gt_valid.shape} must be [N, D, M], [N, D], [N, M] for N={n}")
  return {int(image_id[i]): ious[i][np.ix_(det_valid[i], gt_valid[i])]
          for i in np.nonzero(keep)[0]}
