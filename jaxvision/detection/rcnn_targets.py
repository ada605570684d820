"""Faster / Mask R-CNN training targets with static shapes: matching, sampling, encoding.

torchvision's two-stage training picks a random, fixed-size subset of anchors (RPN) and of
proposals (RoI heads) per image, and its Python code does it with variable-length index lists.
Here every image keeps all its candidates in fixed-size arrays: the sampler draws one random
integer key per candidate and takes the top keys among the foreground and among the background
(`jax.lax.top_k`), which is a uniformly random subset of the sizes torchvision's
BalancedPositiveNegativeSampler would take, so the whole train step jits once on padded ground
truth (boxes [B, M, 4] xyxy, classes [B, M] 0..K-1, valid [B, M]).

    match            torchvision's Matcher on a batch of IoU matrices (padding never matches)
    sample_balanced  BalancedPositiveNegativeSampler as (positive, negative) masks
    rpn_targets      RegionProposalNetwork.assign_targets_to_anchors + BoxCoder(1, 1, 1, 1)
    sample_rois      RoIHeads.select_training_samples, laid out positives first
    mask_targets     project_masks_on_boxes (RoIAlign of each RoI's matched gt mask)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvision.detection import matchers
from jaxvision.detection.boxes import pairwise_iou
from jaxvision.detection.coders import RETINANET_WEIGHTS, DeltaCoder
from jaxvision.detection.roi_align import roi_align

RPN_WEIGHTS = RETINANET_WEIGHTS  # torchvision's RPN BoxCoder (1, 1, 1, 1)
ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's RoIHeads BoxCoder
# roi_align needs a fixed number of samples per bin; torchvision's project_masks_on_boxes uses
# the adaptive ceil(roi_size / 28). With 2 (the heads' own ratio) the targets differ only along
# mask edges: on RoIs of 16-128 px, at most 0.17 and 0.0019 on average per target pixel, and
# the mask loss by 3e-4 (tests/test_rcnn_training.py; 4 gives 0.09 / 0.0005 for 4x the gathers).
MASK_SAMPLING_RATIO = 2


def match(iou, gt_valid, *, high: float, low: float, allow_low_quality: bool):
  """Matched gt index [B, N] for IoU [B, M, N]: -1 below `low`, -2 in [low, high); with
  `allow_low_quality`, every gt's best candidates (all ties) keep their best gt."""
  if iou.ndim != 3 or gt_valid.shape != iou.shape[:2]:
    raise ValueError(f"match: iou {iou.shape} must be [B, M, N] and gt_valid {gt_valid.shape} "
                     "[B, M]")
  one = lambda q, v: matchers.quality_matcher(q, v, high, low, allow_low_quality)
  return jax.vmap(one)(iou.astype(jnp.float32), gt_valid)


def batch_iou(gt_boxes, boxes):
  """IoU [B, M, N] of gt_boxes [B, M, 4] with boxes [B, N, 4] (or shared boxes [N, 4])."""
  gt_boxes = gt_boxes.astype(jnp.float32)
  boxes = jnp.broadcast_to(jnp.asarray(boxes, jnp.float32), gt_boxes.shape[:1] + boxes.shape[-2:])
  return jax.vmap(pairwise_iou)(gt_boxes, boxes)


def _balanced_choice(labels, rng, batch_size_per_image: int, positive_fraction: float):
  """(pos_idx [B, Kp], num_pos [B], neg_idx [B, Kn], num_neg [B]): the first num_pos of
  pos_idx are the chosen foreground candidates, the first num_neg of neg_idx the background."""
  if labels.ndim != 2:
    raise ValueError(f"sample_balanced: labels {labels.shape} must be [B, N]")
  if batch_size_per_image < 1 or not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f"sample_balanced: batch_size_per_image={batch_size_per_image} must be >= 1 "
                     f"and positive_fraction={positive_fraction} in [0, 1]")
  n = labels.shape[1]
  foreground, background = labels >= 1, labels == 0
  max_pos = int(batch_size_per_image * positive_fraction)  # torchvision truncates too
  num_pos = jnp.minimum(max_pos, jnp.sum(foreground, axis=1))
  num_neg = jnp.minimum(batch_size_per_image - num_pos, jnp.sum(background, axis=1))
  # 31 random bits per candidate: the top keys among a group are a uniformly random subset of
  # it (ties are rare at 2^31 values), and -1 ranks every non-member below every member.
  keys = (jax.random.bits(rng, labels.shape, jnp.uint32) >> 1).astype(jnp.int32)
  _, pos_idx = jax.lax.top_k(jnp.where(foreground, keys, -1), max(min(max_pos, n), 1))
  _, neg_idx = jax.lax.top_k(jnp.where(background, keys, -1), min(batch_size_per_image, n))
  return pos_idx, num_pos, neg_idx, num_neg


def _chosen_mask(shape, idx, count):
  rank = jnp.arange(idx.shape[1])[None, :]
  rows = jnp.arange(shape[0])[:, None]
  # top_k's indices are distinct within a row, so set() never writes one place twice.
  return jnp.zeros(shape, bool).at[rows, idx].set(rank < count[:, None])


def sample_balanced(labels, rng, *, batch_size_per_image: int, positive_fraction: float):
  """(positive [B, N], negative [B, N]) bool: per image min(int(bs * fraction), #fg) random
  candidates with label >= 1 and min(bs - #positive, #bg) random ones with label 0 (-1 is
  ignored), as torchvision's BalancedPositiveNegativeSampler."""
  pos_idx, num_pos, neg_idx, num_neg = _balanced_choice(labels, rng, batch_size_per_image,
                                                        positive_fraction)
  return (_chosen_mask(labels.shape, pos_idx, num_pos),
          _chosen_mask(labels.shape, neg_idx, num_neg))


def rpn_targets(anchors, gt_boxes, gt_valid, *, fg_iou: float = 0.7, bg_iou: float = 0.3):
  """(labels [B, A] 1 / 0 / -1 (ignored), regression_targets [B, A, 4]) of anchors [A, 4]:
  torchvision's assign_targets_to_anchors with low-quality matches and BoxCoder (1, 1, 1, 1).
  Non-foreground anchors get zero targets (torchvision encodes gt 0, which no loss reads)."""
  anchors = jnp.asarray(anchors, jnp.float32)
  if anchors.ndim != 2 or anchors.shape[1] != 4:
    raise ValueError(f"rpn_targets: anchors {anchors.shape} must be [A, 4]")
  _check_gt("rpn_targets", gt_boxes, gt_valid)
  matches = match(batch_iou(gt_boxes, anchors), gt_valid, high=fg_iou, low=bg_iou,
                  allow_low_quality=True)
  labels = jnp.where(matches >= 0, 1, jnp.where(matches == matchers.BELOW_LOW_THRESHOLD, 0, -1))
  targets = _encode(gt_boxes, matches, jnp.broadcast_to(anchors, matches.shape + (4,)),
                    RPN_WEIGHTS)
  return labels.astype(jnp.int32), jax.lax.stop_gradient(targets)


def _encode(gt_boxes, matches, references, weights):
  """Deltas of each reference's matched gt box, zero where it has none."""
  matched = jnp.take_along_axis(gt_boxes.astype(jnp.float32), jnp.maximum(matches, 0)[..., None],
                                axis=1)
  foreground = (matches >= 0)[..., None]
  # Encoding the reference onto itself keeps log(0) and 0/0 of padding out of the arrays.
  deltas = DeltaCoder(weights).encode(jnp.where(foreground, matched, references), references)
  return jnp.where(foreground, deltas, 0.0)


def _check_gt(name, gt_boxes, gt_valid, gt_classes=None):
  b, m = gt_valid.shape if gt_valid.ndim == 2 else (-1, -1)
  if gt_boxes.shape != (b, m, 4) or (gt_classes is not None and gt_classes.shape != (b, m)):
    shapes = f"gt_boxes {gt_boxes.shape}, gt_valid {gt_valid.shape}"
    if gt_classes is not None:
      shapes += f", gt_classes {gt_classes.shape}"
    raise ValueError(f"{name}: {shapes} must be [B, M, 4], [B, M] (and [B, M])")


def sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, rng, *,
                num_samples: int = 512, positive_fraction: float = 0.25, fg_iou: float = 0.5,
                bg_iou: float = 0.5):
  """torchvision's select_training_samples with static shapes: the gt boxes are appended to the
  proposals, matched at fg_iou / bg_iou without low-quality matches and sampled
  num_samples / positive_fraction. Returns {'rois' [B, S, 4], 'valid', 'positive' [B, S] bool,
  'labels' [B, S] (0 background, k + 1 for gt class k), 'matched' [B, S] gt index (0 for
  background, as torchvision's clamp), 'regression_targets' [B, S, 4] (10, 10, 5, 5; zero off
  the positives)}, S = num_samples: the positives in slots [0, int(S * fraction)), then the
  negatives, then invalid padding."""
  _check_gt("sample_rois", gt_boxes, gt_valid, gt_classes)
  b, p = proposal_valid.shape if proposal_valid.ndim == 2 else (-1, -1)
  if proposals.shape != (b, p, 4) or b != gt_boxes.shape[0]:
    raise ValueError(f"sample_rois: proposals {proposals.shape} and proposal_valid "
                     f"{proposal_valid.shape} must be [B, P, 4] and [B, P] with B="
                     f"{gt_boxes.shape[0]}")
  gt_boxes = jax.lax.stop_gradient(gt_boxes.astype(jnp.float32))
  candidates = jnp.concatenate([jax.lax.stop_gradient(proposals.astype(jnp.float32)), gt_boxes],
                               axis=1)
  candidate_valid = jnp.concatenate([proposal_valid, gt_valid], axis=1)
  matches = match(batch_iou(gt_boxes, candidates), gt_valid, high=fg_iou, low=bg_iou,
                  allow_low_quality=False)
  classes = jnp.take_along_axis(gt_classes.astype(jnp.int32), jnp.maximum(matches, 0), axis=1)
  labels = jnp.where(matches >= 0, classes + 1,
                     jnp.where(matches == matchers.BELOW_LOW_THRESHOLD, 0, -1))
  labels = jnp.where(candidate_valid, labels, -1)  # padding is never sampled

  pos_idx, num_pos, neg_idx, num_neg = _balanced_choice(labels, rng, num_samples,
                                                        positive_fraction)
  slot = jnp.arange(num_samples)[None, :]
  from_pos = jnp.take_along_axis(pos_idx, jnp.minimum(slot, pos_idx.shape[1] - 1), axis=1)
  neg_slot = jnp.clip(slot - num_pos[:, None], 0, neg_idx.shape[1] - 1)
  from_neg = jnp.take_along_axis(neg_idx, neg_slot, axis=1)
  positive = slot < num_pos[:, None]
  valid = slot < (num_pos + num_neg)[:, None]
  index = jnp.where(positive, from_pos, from_neg)

  rois = jnp.take_along_axis(candidates, index[..., None], axis=1)
  rois = jnp.where(valid[..., None], rois, 0.0)
  roi_matches = jnp.where(positive, jnp.take_along_axis(matches, index, axis=1), -1)
  out = {
      "rois": rois,
      "valid": valid,
      "positive": positive,
      "labels": jnp.where(positive, jnp.take_along_axis(labels, index, axis=1), 0),
      "matched": jnp.maximum(roi_matches, 0),
      "regression_targets": _encode(gt_boxes, roi_matches, rois, ROI_WEIGHTS),
  }
  return jax.lax.stop_gradient(out)


def mask_targets(gt_masks, rois, matched, size: int = 28, *,
                 sampling_ratio: int = MASK_SAMPLING_RATIO):
  """[B, R, size, size] float32 targets: RoIAlign (aligned=False) of each RoI's matched gt mask
  at the input resolution, torchvision's project_masks_on_boxes with a fixed sampling ratio."""
  if gt_masks.ndim != 4:
    raise ValueError(f"mask_targets: gt_masks {gt_masks.shape} must be [B, M, H, W]")
  b, m, h, w = gt_masks.shape
  r = matched.shape[1] if matched.ndim == 2 else -1
  if rois.shape != (b, r, 4) or matched.shape != (b, r):
    raise ValueError(f"mask_targets: rois {rois.shape} and matched {matched.shape} must be "
                     f"[B, R, 4] and [B, R] with B={b}")
  # Float masks: roi_align returns its input's dtype, and its averages are fractions.
  maps = gt_masks.reshape(b * m, h, w, 1).astype(jnp.float32)
  image_of_mask = (jnp.arange(b)[:, None] * m + jnp.clip(matched, 0, m - 1)).reshape(-1)
  out = roi_align(maps, rois.reshape(b * r, 4).astype(jnp.float32), image_of_mask, size,
                  spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=False)
  return jax.lax.stop_gradient(out.reshape(b, r, size, size))
