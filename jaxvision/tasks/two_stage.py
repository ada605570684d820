"""The two-stage detectors' task (Faster R-CNN; Mask R-CNN adds instance masks).

Training runs the whole of torchvision's training-mode R-CNN inside the jitted step: the model is
called through `rcnn_train_forward` (`model.apply(..., method=rcnn_train_forward)`), which
proposes regions, samples fixed-size sets of anchors and proposals against the padded ground
truth and runs the heads on them; `rcnn_loss` adds torchvision's four (five with masks) losses.
Evaluation calls the model itself, which returns final detections (and 28x28 mask
probabilities); the masks are pasted into the input image and compared with the batch's
ground-truth masks on device, so only the [detections x ground truth] mask IoUs travel to the
host (as pixel counts: the IoUs are divided there in double precision, as pycocotools does),
where COCO's matching gives mask AP besides box AP.

Mask AP is measured at the model's input resolution (ground-truth masks transformed like the
image); it is COCO's own where the images are not resized, as in the cells recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxvision.detection import postprocess
from jaxvision.detection.coco_eval import coco_evaluate, from_padded, ious_from_padded
from jaxvision.detection.masks import (
  ious_from_overlaps,
  mask_overlaps,
  paste_masks,
  paste_masks_numpy,
)
from jaxvision.detection.rcnn_train import rcnn_loss, rcnn_train_forward
from jaxvision.models import create_model
from jaxvision.tasks.detection import METRICS, DetectionTask, model_family

MASK_METRICS = tuple(f"mask_{name}" for name in METRICS)


@dataclasses.dataclass(frozen=True, eq=False)
class TwoStageDetectionTask(DetectionTask):
  """Faster / Mask R-CNN: the training forward and its losses, detections with optional instance
  masks, box AP and (with masks) mask AP. Post-processing values are the model's own
  (`model_kwargs.box_score_thresh`, `box_nms_thresh`, `box_detections_per_img`).

  Attributes (besides `DetectionTask`'s; `anchors` is None: the RPN keeps its own):
    masks: whether the model predicts instance masks (Mask R-CNN), so batches carry `masks`.
  """

  masks: bool = False

  @classmethod
  def from_config(cls, config) -> TwoStageDetectionTask:
    """The task of a fasterrcnn* / maskrcnn* model; a Mask R-CNN needs `config.data.masks`."""
    det = config.detection
    model = create_model(config.model, num_classes=int(config.num_classes),
                         **dict(config.model_kwargs.to_dict()))
    if model_family(model) != "rcnn":
      raise ValueError(f"model {config.model!r} is not a two-stage (R-CNN) model")
    knobs = {"score_threshold": "box_score_thresh", "nms_iou": "box_nms_thresh",
             "max_detections": "box_detections_per_img", "pre_nms_top_k": "rpn_pre_nms_top_n_test"}
    for key, model_key in knobs.items():
      if float(det[key]) > 0:
        raise ValueError(f"config.detection.{key}={det[key]}: the R-CNNs post-process in the "
                         f"model; set config.model_kwargs.{model_key} instead")
    masks = bool(model.has_masks)
    if masks and not config.data.masks:
      raise ValueError(f"model {config.model!r} predicts instance masks: set "
                       "config.data.masks=True so the batches carry the ground-truth masks")
    names = tuple(str(n) for n in config.data_info.get("class_names", ()))
    return cls(family="rcnn", num_classes=int(config.num_classes) - 1,
               image_shape=tuple(int(d) for d in config.data_info.image_shape), anchors=None,
               max_boxes=int(det.max_boxes), score_threshold=float(model.box_score_thresh),
               nms_iou=float(model.box_nms_thresh),
               max_detections=int(model.box_detections_per_img),
               pre_nms_top_k=int(model.rpn_pre_nms_top_n_test), class_names=names,
               pictures=int(det.pictures), masks=masks)

  # -- the batch and the model ----------------------------------------------------------------
  @property
  def metric_names(self) -> tuple[str, ...]:
    """Box AP / AR as `DetectionTask`'s, and for Mask R-CNN the same for masks (`mask_*`)."""
    return METRICS + (MASK_METRICS if self.masks else ())

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """`DetectionTask`'s batch, and with masks the ground-truth masks uint8 [B, max_boxes, H, W]
    at the input resolution."""
    spec = super().input_spec(batch_size)
    if self.masks:
      h, w = self.image_shape[:2]
      spec["masks"] = jax.ShapeDtypeStruct((batch_size, self.max_boxes, h, w), np.uint8)
    return spec

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """The training forward sees the images and the ground truth (crowd boxes left out, as
    torchvision's COCO training drops them)."""
    boxes, classes, valid = self._targets(batch)
    args = (batch["image"], boxes, classes, valid)
    if self.masks:
      args += (batch["masks"],)
    return args, {"method": rcnn_train_forward}

  def check_outputs(self, outputs) -> None:
    """The training forward's outputs must hold the RPN's and the box head's raw outputs (and
    the mask head's for Mask R-CNN) for this task's classes."""
    if not isinstance(outputs, dict) or "class_logits" not in outputs:
      raise ValueError("the model's training forward gives no 'class_logits'; choose a "
                       "fasterrcnn* or maskrcnn* model")
    columns = outputs["class_logits"].shape[-1]
    if columns != self.num_classes + 1:
      raise ValueError(f"the model's box head has {columns} class columns, but the task needs "
                       f"{self.num_classes + 1} ({self.num_classes} classes and background)")
    if self.masks and "mask_logits" not in outputs:
      raise ValueError("the task expects instance masks, but the model's training forward "
                       "gives no 'mask_logits'")

  # -- training -------------------------------------------------------------------------------
  def loss(self, outputs: dict, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """torchvision's R-CNN losses: RPN objectness and boxes, box classifier and boxes (and the
    masks' binary cross-entropy)."""
    del batch
    return rcnn_loss(outputs)

  # -- evaluation -----------------------------------------------------------------------------
  def infer(self, forward, batch: dict) -> dict[str, jax.Array]:
    """The model's detections, boxes in original-image pixels; with masks also their 28x28
    probabilities and the boxes in input pixels ('input_boxes') to paste them into the input."""
    dets = forward(batch["image"])
    predictions = {k: dets[k] for k in ("boxes", "scores", "classes", "valid")}
    if self.masks:
      predictions.update(mask_probs=dets["mask_probs"], input_boxes=dets["boxes"])
    return postprocess.to_original(predictions, batch["scale"], batch["offset"],
                                   batch["orig_size"])

  def predict(self, forward, batch: dict) -> dict[str, jax.Array]:
    """`infer`'s detections; with masks also, pasted into the input image on device, their pixel
    overlaps with every ground-truth mask of the image and both masks' areas
    (`mask_overlaps`)."""
    predictions = self.infer(forward, batch)
    if self.masks:
      pasted = paste_masks(predictions["mask_probs"], predictions["input_boxes"],
                           self.image_shape[:2], valid=predictions["valid"])
      gt = (batch["masks"] > 0) & batch["box_valid"][:, :, None, None]
      inter, det_area, gt_area = mask_overlaps(pasted, gt)
      predictions.update(mask_inter=inter, mask_det_area=det_area, mask_gt_area=gt_area)
    return predictions

  def eval_examples(self, predictions: dict, batch: dict) -> dict[str, jax.Array]:
    """`DetectionTask`'s examples, and with masks the detections x ground-truth mask overlaps
    and areas in input pixels."""
    examples = super().eval_examples(predictions, batch)
    if self.masks:
      for key in ("mask_inter", "mask_det_area", "mask_gt_area"):
        examples[key] = predictions[key]
    return examples

  def finalize(self, sums: dict, examples: dict) -> dict[str, float]:
    """Box AP / AR, and mask AP / AR from the gathered mask IoUs (COCO's matching and
    accumulation, the annotations' areas for small / medium / large)."""
    metrics = super().finalize(sums, examples)
    if not self.masks:
      return metrics
    e = {k: np.asarray(v) for k, v in examples.items()}
    # COCO sizes a mask by its annotation's area; without one, by its pixels here.
    gt_area = e["gt_area"] if "gt_area" in e else e["mask_gt_area"]
    dets, gts = from_padded(e["id"], e["det_boxes"], e["det_scores"], e["det_classes"],
                            e["det_valid"], e["gt_boxes"], e["gt_classes"], e["gt_valid"],
                            gt_ignore=e["gt_ignore"], gt_area=gt_area,
                            det_area=e["mask_det_area"], example_valid=e["valid"])
    ious = ious_from_overlaps(e["mask_inter"], e["mask_det_area"], e["mask_gt_area"],
                              e["gt_ignore"])
    iou = ious_from_padded(e["id"], ious, e["det_valid"], e["gt_valid"],
                           example_valid=e["valid"])
    segm = coco_evaluate(dets, gts, iou=iou)
    metrics.update({f"mask_{name}": float(segm[name]) for name in METRICS})
    return metrics

  # -- pictures -------------------------------------------------------------------------------
  def save_pictures(self, path_prefix: str, batch: dict, predictions: Any) -> list[str]:
    """`DetectionTask`'s pictures, with the instance masks filled in for Mask R-CNN."""
    if not self.masks:
      return super().save_pictures(path_prefix, batch, predictions)
    h, w = self.image_shape[:2]
    masks = [paste_masks_numpy(np.asarray(predictions["mask_probs"][i]),
                               np.asarray(predictions["input_boxes"][i]), (h, w))
             & np.asarray(predictions["valid"][i])[:, None, None]
             for i in range(len(batch["image"]))]
    return self._draw(path_prefix, batch, predictions, masks)
