"""Faster / Mask R-CNN losses on fixed-size samples, equal to torchvision's.

torchvision computes its four training losses on variable-length lists of the sampled anchors
and RoIs; here the samples are masks (RPN) or padded slots with a valid mask (RoI heads, see
`rcnn_targets.sample_rois`), and every mean is taken over the batch's sampled entries exactly
as torchvision's concatenation over images does:

    rpn_loss        RegionProposalNetwork.compute_loss: BCE over the sampled anchors;
                    smooth-L1 (beta 1/9) over the positives, divided by the number sampled
    fastrcnn_loss   cross-entropy over the sampled RoIs; smooth-L1 (beta 1/9) of the positives'
                    class-specific deltas, divided by the number sampled
    maskrcnn_loss   BCE of each positive's gt-class mask channel, mean over its pixels

An empty sample gives 0 (torchvision gives NaN for an empty RPN / RoI sample and 0 for masks).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxvision.detection.losses import (
    binary_cross_entropy_with_logits,
    smooth_l1_loss,
    softmax_cross_entropy,
)
from jaxvision.detection.rcnn_targets import rpn_targets, sample_balanced

BOX_BETA = 1.0 / 9  # torchvision's smooth-L1 beta for both the RPN and the box head
RPN_BATCH_SIZE_PER_IMAGE = 256
RPN_POSITIVE_FRACTION = 0.5


def _count(mask):
  return jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def rpn_sampled_loss(objectness, deltas, labels, regression_targets, positive, negative):
  """{'loss_objectness', 'loss_rpn_box_reg'} of objectness [B, A] and deltas [B, A, 4] on the
  sampled anchors (`positive` / `negative` [B, A] masks, `labels` 1 / 0 / -1)."""
  if objectness.ndim != 2 or deltas.shape != objectness.shape + (4,):
    raise ValueError(f"rpn_loss: objectness {objectness.shape} and deltas {deltas.shape} must be "
                     "[B, A] and [B, A, 4]")
  for name, array in (("labels", labels), ("positive", positive), ("negative", negative)):
    if array.shape != objectness.shape:
      raise ValueError(f"rpn_loss: {name} {array.shape} != objectness {objectness.shape}")
  sampled = positive | negative
  count = _count(sampled)
  bce = binary_cross_entropy_with_logits(objectness.astype(jnp.float32),
                                         (labels > 0).astype(jnp.float32))
  box = smooth_l1_loss(deltas.astype(jnp.float32), regression_targets, BOX_BETA)
  return {
      "loss_objectness": jnp.sum(jnp.where(sampled, bce, 0.0)) / count,
      "loss_rpn_box_reg": jnp.sum(jnp.where(positive[..., None], box, 0.0)) / count,
  }


def rpn_loss(objectness, deltas, anchors, gt_boxes, gt_valid, rng, *, fg_iou: float = 0.7,
             bg_iou: float = 0.3, batch_size_per_image: int = RPN_BATCH_SIZE_PER_IMAGE,
             positive_fraction: float = RPN_POSITIVE_FRACTION):
  """torchvision's RPN training loss {'loss_objectness', 'loss_rpn_box_reg'}: anchors [A, 4]
  matched at fg_iou / bg_iou (low-quality matches kept), batch_size_per_image sampled per
  image, at most positive_fraction of them positive."""
  labels, targets = rpn_targets(anchors, gt_boxes, gt_valid, fg_iou=fg_iou, bg_iou=bg_iou)
  positive, negative = sample_balanced(labels, rng, batch_size_per_image=batch_size_per_image,
                                       positive_fraction=positive_fraction)
  return rpn_sampled_loss(objectness, deltas, labels, targets, positive, negative)


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets, valid):
  """(loss_classifier, loss_box_reg) of class_logits [B, S, C] and box_regression [B, S, C * 4]
  on the valid sampled RoIs with `labels` [B, S] (0 background) and regression_targets
  [B, S, 4]."""
  b, s, c = class_logits.shape if class_logits.ndim == 3 else (-1, -1, -1)
  if box_regression.shape != (b, s, c * 4):
    raise ValueError(f"fastrcnn_loss: box_regression {box_regression.shape} must be "
                     f"[B, S, C * 4] for class_logits {class_logits.shape}")
  if labels.shape != (b, s) or valid.shape != (b, s) or regression_targets.shape != (b, s, 4):
    raise ValueError(f"fastrcnn_loss: labels {labels.shape}, valid {valid.shape} and "
                     f"regression_targets {regression_targets.shape} must be [{b}, {s}](, 4)")
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  count = _count(valid)
  ce = softmax_cross_entropy(class_logits, labels)
  per_class = box_regression.astype(jnp.float32).reshape(b, s, c, 4)
  own = jnp.take_along_axis(per_class, labels[:, :, None, None], axis=2)[:, :, 0]
  box = jnp.sum(smooth_l1_loss(own, regression_targets, BOX_BETA), axis=-1)
  positive = valid & (labels > 0)
  return jnp.sum(jnp.where(valid, ce, 0.0)) / count, jnp.sum(jnp.where(positive, box, 0.0)) / count


def maskrcnn_loss(mask_logits, targets, labels, positive):
  """Mean BCE over the positives' pixels of mask_logits [B, R, H, W, C] in each RoI's label
  channel against `targets` [B, R, H, W]; 0 without positives."""
  b, r, h, w, _ = mask_logits.shape if mask_logits.ndim == 5 else (-1,) * 5
  if targets.shape != (b, r, h, w) or labels.shape != (b, r) or positive.shape != (b, r):
    raise ValueError(f"maskrcnn_loss: mask_logits {mask_logits.shape} must be [B, R, H, W, C] "
                     f"with targets {targets.shape} [B, R, H, W], labels {labels.shape} and "
                     f"positive {positive.shape} [B, R]")
  channel = jnp.where(positive, labels, 0).astype(jnp.int32)[:, :, None, None, None]
  logits = jnp.take_along_axis(mask_logits, channel, axis=4)[..., 0].astype(jnp.float32)
  bce = binary_cross_entropy_with_logits(logits, targets.astype(jnp.float32))
  pixels = jnp.sum(jnp.where(positive[:, :, None, None], bce, 0.0))
  return pixels / (_count(positive) * (h * w))
