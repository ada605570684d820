"""The object-detection core: pure functions on NumPy (host) and JAX (device) arrays.

    boxes        box formats (xyxy, xywh, cxcywh) and `convert`; `area`; `pairwise_iou` /
                 `pairwise_giou` and their `elementwise_*` forms; `clip` to the image;
                 `to_original` (transformed-image boxes back to original pixels)
    coders       `DeltaCoder(weights)` (torchvision BoxCoder: SSD (10, 10, 5, 5), RetinaNet
                 (1, 1, 1, 1), log-size clamp) and `LTRBCoder` (FCOS's BoxLinearCoder)
    anchors      host-side NumPy constants, equal to torchvision's: `ssd_default_boxes`
                 (SSD300: 8732), `retinanet_anchors`, `fcos_anchors` + `fcos_scale_ranges`,
                 the generic `grid_anchors`, and `feature_shapes` of an input size; each returns
                 an `AnchorSet` (boxes [N, 4], level_sizes, strides, per_location)
    matchers     per image, padded ground truth with a valid mask: `iou_matcher` (RetinaNet),
                 `quality_matcher` (the same on an IoU matrix), `ssd_matcher`, `fcos_matcher`;
                 `matched_targets`
    losses       `sigmoid_focal_loss`, `smooth_l1_loss`, `l1_loss`, `giou_loss`,
                 `softmax_cross_entropy`, `hard_negatives`, `centerness_targets`, and the
                 complete `ssd_loss`, `retinanet_loss`, `fcos_loss` (torchvision's compute_loss)
    nms          greedy NMS on device with static shapes: `nms`, `batched_nms` (per class with
                 `classes`; fixed `max_outputs` with a valid mask)
    postprocess  raw head outputs -> fixed-size detections {'boxes', 'scores', 'classes',
                 'valid'}: `sigmoid_detections` (RetinaNet), `fcos_detections`,
                 `softmax_detections` (SSD); `to_original` maps them to original pixels
    coco_eval    COCO AP / AR in NumPy, equal to pycocotools' COCOeval: `coco_evaluate`,
                 `from_padded` (the detection task's padded arrays -> per-box rows); mask AP
                 from given IoU matrices (`iou=`, `ious_from_padded`)
    masks        instance masks on device: `paste_masks` (torchvision's paste_masks_in_image,
                 static shapes) and its host twin `paste_masks_numpy`; `mask_overlaps` /
                 `mask_ious` (COCO's mask IoU)
    voc_eval     Pascal VOC AP50 (11-point and all-point): `voc_evaluate`
    draw         detections (optional instance masks and ground truth) drawn on an image with
                 PIL: `draw_detections`, `save_detections`
    roi_align    `roi_align`: bilinear RoIAlign crops of NHWC features at boxes, with static
                 shapes, equal to torchvision's; `multiscale_roi_align` (MultiScaleRoIAlign,
                 the R-CNN heads' input)
    rpn          Faster / Mask R-CNN inference: `propose` (the RPN's filter_proposals) and
                 `two_stage_detections` (RoIHeads.postprocess_detections), static shapes
    rcnn_targets Faster / Mask R-CNN training targets with static shapes: `match`,
                 `sample_balanced` (top-k random sampling), `rpn_targets`, `sample_rois`,
                 `mask_targets`
    rcnn_losses  torchvision's `rpn_loss`, `fastrcnn_loss`, `maskrcnn_loss` on those samples
    rcnn_train   `rcnn_train_forward` (model.apply(..., method=...)) and `rcnn_loss`
    hungarian    `linear_sum_assignment` on device (the same optimum as scipy's), with padded
                 rows; `detr_cost` / `detr_match`, DETR's matcher on padded targets
    detr_loss    DETR's set loss with that matching inside the step (`detr_loss`) and its
                 query decoding (`detr_detections`)

Submodules are imported on first use; coco_eval, voc_eval and draw compute with NumPy only.
"""

from __future__ import annotations

import importlib

SUBMODULES = ("anchors", "boxes", "coco_eval", "coders", "detr_loss", "draw", "hungarian",
              "losses", "masks", "matchers", "nms", "postprocess", "rcnn_losses", "rcnn_targets",
              "rcnn_train", "roi_align", "rpn", "voc_eval")


def __getattr__(name: str):
  if name in SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(SUBMODULES)
