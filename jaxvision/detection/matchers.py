"""Anchor-to-ground-truth matching, one image at a time (jax.vmap over the batch).

Ground truth is padded: boxes [M, 4] xyxy with a `valid` mask [M]; an invalid row never
matches (pass `box_valid & ~box_ignore` to keep crowd / difficult boxes out of the targets).
Every matcher returns `matches` [N] int32: the index of the matched ground-truth row, or
BELOW_LOW_THRESHOLD (-1, background) or BETWEEN_THRESHOLDS (-2, ignored by the loss).

    iou_matcher      torchvision `Matcher` (RetinaNet: 0.5 / 0.4 with low-quality matches);
                     `quality_matcher` is the same rule on a given IoU matrix
    ssd_matcher      torchvision `SSDMatcher` (0.5, and every box's best anchor forced)
    fcos_matcher     torchvision FCOS: center sampling, points inside the box, scale ranges
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxvision.detection.boxes import pairwise_iou

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def _masked_iou(gt_boxes, gt_valid, anchors):
  iou = pairwise_iou(gt_boxes.astype(jnp.float32), anchors.astype(jnp.float32))  # [M, N]
  # -1 is below every threshold and every real IoU, so padding neither matches nor wins a max.
  return jnp.where(gt_valid[:, None], iou, -1.0)


def iou_matcher(gt_boxes, gt_valid, anchors, high_threshold: float, low_threshold: float,
                allow_low_quality_matches: bool = False):
  """torchvision's Matcher on the IoU of padded boxes [M, 4] with anchors [N, 4] (see
  `quality_matcher`)."""
  return quality_matcher(_masked_iou(gt_boxes, gt_valid, anchors), gt_valid, high_threshold,
                         low_threshold, allow_low_quality_matches)


def quality_matcher(quality, gt_valid, high_threshold: float, low_threshold: float,
                    allow_low_quality_matches: bool = False):
  """torchvision's Matcher on a match-quality matrix [M, N] (IoU): each anchor takes its
  highest-quality box; quality < low -> -1, in [low, high) -> -2. With low-quality matches,
  every anchor that is some box's best anchor (ties included) keeps its highest-quality box
  even below the thresholds. Rows with `gt_valid` False never match."""
  if low_threshold > high_threshold:
    raise ValueError(f"iou_matcher: low_threshold {low_threshold} > high_threshold "
                     f"{high_threshold}")
  iou = jnp.where(gt_valid[:, None], quality, -1.0)
  best = jnp.max(iou, axis=0)
  all_matches = jnp.argmax(iou, axis=0).astype(jnp.int32)
  matches = jnp.where(best < low_threshold, BELOW_LOW_THRESHOLD,
                      jnp.where(best < high_threshold, BETWEEN_THRESHOLDS, all_matches))
  if allow_low_quality_matches:
    highest_per_gt = jnp.max(iou, axis=1)
    is_best = (iou == highest_per_gt[:, None]) & gt_valid[:, None]
    matches = jnp.where(jnp.any(is_best, axis=0), all_matches, matches)
  return matches.astype(jnp.int32)


def ssd_matcher(gt_boxes, gt_valid, anchors, threshold: float = 0.5):
  """torchvision's SSDMatcher: IoU >= threshold matches, and each box's highest-IoU anchor is
  matched to that box (a later box wins an anchor that is best for two)."""
  iou = _masked_iou(gt_boxes, gt_valid, anchors)
  best = jnp.max(iou, axis=0)
  matches = jnp.where(best < threshold, BELOW_LOW_THRESHOLD, jnp.argmax(iou, axis=0))
  num_gt, num_anchors = iou.shape
  best_anchor = jnp.argmax(iou, axis=1)  # [M]
  rows = jnp.arange(num_gt, dtype=jnp.int32)
  # The last valid box whose best anchor is n: a scatter with a deterministic winner.
  owns = (best_anchor[:, None] == jnp.arange(num_anchors)[None, :]) & gt_valid[:, None]
  forced = jnp.max(jnp.where(owns, rows[:, None], -1), axis=0)
  return jnp.where(forced >= 0, forced, matches).astype(jnp.int32)


def fcos_matcher(gt_boxes, gt_valid, anchors, lower, upper, center_sampling_radius: float = 1.5):
  """torchvision FCOS matching of points (the anchors' centers) to boxes.

  A point matches a box when it lies inside the box, within radius x its anchor size of the
  box's center (center sampling, per axis), and the largest of its four distances to the sides
  is in (lower, upper) (`anchors.fcos_scale_ranges`). Among several boxes, the smallest wins
  (torchvision compares 1e8 - area in float32, which cannot tell apart areas closer than
  ~8 px^2; here the exact smallest area wins, the first one on ties).
  """
  gt_boxes = gt_boxes.astype(jnp.float32)
  anchors = anchors.astype(jnp.float32)
  centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # [N, 2]
  sizes = anchors[:, 2] - anchors[:, 0]  # [N]
  gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [M, 2]
  near = jnp.max(jnp.abs(centers[:, None, :] - gt_centers[None, :, :]), axis=2) < (
      center_sampling_radius * sizes[:, None])
  x, y = centers[:, 0:1], centers[:, 1:2]  # [N, 1]
  distances = jnp.stack([x - gt_boxes[None, :, 0], y - gt_boxes[None, :, 1],
                         gt_boxes[None, :, 2] - x, gt_boxes[None, :, 3] - y], axis=2)  # [N, M, 4]
  inside = jnp.min(distances, axis=2) > 0
  reach = jnp.max(distances, axis=2)
  in_range = (reach > lower[:, None]) & (reach < upper[:, None])
  ok = near & inside & in_range & gt_valid[None, :]
  areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
  choice = jnp.argmin(jnp.where(ok, areas[None, :], jnp.inf), axis=1)
  return jnp.where(jnp.any(ok, axis=1), choice, BELOW_LOW_THRESHOLD).astype(jnp.int32)


def matched_targets(matches, gt_boxes, gt_classes):
  """(boxes [N, 4], classes [N], foreground [N]) of the rows `matches` points to; background
  and ignored anchors get row 0's values, to be masked with `foreground`."""
  rows = jnp.maximum(matches, 0)
  return gt_boxes[rows], gt_classes[rows], matches >= 0
