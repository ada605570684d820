"""Faster / Mask R-CNN in training mode (torchvision's GeneralizedRCNN given targets), as one
jit-able function of padded ground truth.

`rcnn_train_forward` runs a two-stage model's stages in torchvision's training order: the
backbone, the RPN head and its sampled targets, proposals with the training sizes (no gradient
flows through them), RoI sampling against the ground truth, the box head on the sampled RoIs
and, for Mask R-CNN, the mask head on the positive slots with their mask targets. It is a
method for `model.apply`:

    outputs, updates = model.apply(variables, images, gt_boxes, gt_classes, gt_valid, gt_masks,
                                   train=True, rngs={'dropout': key}, mutable=['batch_stats'],
                                   method=rcnn_train_forward)
    total, parts = rcnn_loss(outputs)

Both samplers draw from the 'dropout' stream, so a step's key makes its sample reproducible.
The model provides `features`, `rpn_head`, `rpn_anchors`, `box_head`, `mask_head`,
`has_masks` and its torchvision training hyper-parameters (`rpn_*` and `box_*`, see
jaxvision/models/rcnn.py). Ground truth: gt_boxes [B, M, 4] xyxy input pixels, gt_classes
[B, M] int 0..K-1, gt_valid [B, M] bool, gt_masks [B, M, H, W] uint8 at the input resolution.
"""

from __future__ import annotations

import jax

from jaxvision.detection.rcnn_losses import fastrcnn_loss, maskrcnn_loss, rpn_sampled_loss
from jaxvision.detection.rcnn_targets import (
    mask_targets,
    rpn_targets,
    sample_balanced,
    sample_rois,
)
from jaxvision.detection.rpn import propose


def rcnn_train_forward(module, images, gt_boxes, gt_classes, gt_valid, gt_masks=None, *,
                       train: bool = True) -> dict:
  """Everything `rcnn_loss` needs: 'rpn_objectness', 'rpn_deltas' and the RPN's sampled
  targets ('rpn_labels', 'rpn_regression_targets', 'rpn_positive', 'rpn_negative'), the
  proposals, the sampled RoIs ('rois', 'roi_valid', 'roi_positive', 'roi_labels',
  'roi_matched', 'roi_regression_targets'), the box head's 'class_logits' and
  'box_regression', and with masks 'mask_logits', 'mask_targets', 'mask_labels',
  'mask_positive' on the first int(S * box_positive_fraction) RoI slots (the positives')."""
  b, h, w = images.shape[:3]
  if gt_boxes.shape[:1] != (b,):
    raise ValueError(f"rcnn_train_forward: gt_boxes {gt_boxes.shape} for images {images.shape}")
  if module.has_masks:
    if gt_masks is None:
      raise ValueError(f"rcnn_train_forward: {type(module).__name__} has a mask head and needs "
                       "gt_masks [B, M, H, W]")
    if gt_masks.shape != (b, gt_boxes.shape[1], h, w):
      raise ValueError(f"rcnn_train_forward: gt_masks {gt_masks.shape} must be "
                       f"{(b, gt_boxes.shape[1], h, w)} (one mask per gt box, at the input size)")
  image_hw = (h, w)
  rpn_key, roi_key = jax.random.split(module.make_rng("dropout"))

  feature_maps = module.features(images, train=train)
  objectness, deltas = module.rpn_head(feature_maps)
  anchors = module.rpn_anchors(image_hw)
  rpn_labels, rpn_regression = rpn_targets(anchors.boxes, gt_boxes, gt_valid,
                                           fg_iou=module.rpn_fg_iou_thresh,
                                           bg_iou=module.rpn_bg_iou_thresh)
  rpn_positive, rpn_negative = sample_balanced(
      rpn_labels, rpn_key, batch_size_per_image=module.rpn_batch_size_per_image,
      positive_fraction=module.rpn_positive_fraction)
  proposals, _, proposal_valid = propose(
      jax.lax.stop_gradient(objectness), jax.lax.stop_gradient(deltas), anchors, image_hw,
      pre_nms_top_n=module.rpn_pre_nms_top_n_train,
      post_nms_top_n=module.rpn_post_nms_top_n_train, nms_thresh=module.rpn_nms_thresh,
      score_thresh=module.rpn_score_thresh)
  samples = sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, roi_key,
                        num_samples=module.box_batch_size_per_image,
                        positive_fraction=module.box_positive_fraction,
                        fg_iou=module.box_fg_iou_thresh, bg_iou=module.box_bg_iou_thresh)
  class_logits, box_regression = module.box_head(feature_maps, samples["rois"], image_hw)
  outputs = {
      "rpn_objectness": objectness, "rpn_deltas": deltas, "rpn_labels": rpn_labels,
      "rpn_regression_targets": rpn_regression, "rpn_positive": rpn_positive,
      "rpn_negative": rpn_negative, "proposals": proposals, "proposal_valid": proposal_valid,
      "class_logits": class_logits, "box_regression": box_regression, "rois": samples["rois"],
  }
  for key in ("valid", "positive", "labels", "matched", "regression_targets"):
    outputs[f"roi_{key}"] = samples[key]
  if module.has_masks:
    # sample_rois puts every positive in the first int(S * fraction) slots.
    slots = int(module.box_batch_size_per_image * module.box_positive_fraction)
    mask_rois = samples["rois"][:, :slots]
    outputs["mask_logits"] = module.mask_head(feature_maps, mask_rois, image_hw)
    outputs["mask_targets"] = mask_targets(gt_masks, mask_rois, samples["matched"][:, :slots],
                                           outputs["mask_logits"].shape[2])
    outputs["mask_labels"] = samples["labels"][:, :slots]
    outputs["mask_positive"] = samples["positive"][:, :slots]
  return outputs


def rcnn_loss(outputs: dict):
  """(total, parts): the sum of torchvision's loss dict, parts = {'loss_classifier',
  'loss_box_reg', 'loss_mask' (Mask R-CNN), 'loss_objectness', 'loss_rpn_box_reg'}, from
  `rcnn_train_forward`'s outputs."""
  loss_classifier, loss_box_reg = fastrcnn_loss(
      outputs["class_logits"], outputs["box_regression"], outputs["roi_labels"],
      outputs["roi_regression_targets"], outputs["roi_valid"])
  parts = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
  if "mask_logits" in outputs:
    parts["loss_mask"] = maskrcnn_loss(outputs["mask_logits"], outputs["mask_targets"],
                                       outputs["mask_labels"], outputs["mask_positive"])
  parts.update(rpn_sampled_loss(outputs["rpn_objectness"], outputs["rpn_deltas"],
                                outputs["rpn_labels"], outputs["rpn_regression_targets"],
                                outputs["rpn_positive"], outputs["rpn_negative"]))
  return sum(parts.values()), parts
