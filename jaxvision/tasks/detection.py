"""Object detection: image -> boxes, scores and classes. This module holds the task of the
one-stage detectors (SSD, RetinaNet, FCOS); the two-stage R-CNNs (`jaxvision.tasks.two_stage`) and
DETR (`jaxvision.tasks.detr`) subclass it and keep its evaluation (COCO AP) and pictures.

The model returns raw head outputs over its anchors (`jaxvision.models.ssd` / `retinanet` /
`fcos`); the task holds the anchors of the run's input size (host constants closed over by
the jitted steps) and picks the loss and decoding of the model's family
(`model.family`, or `config.detection.loss`):

    ssd        smooth-L1 on (10, 10, 5, 5) deltas + softmax cross-entropy with 3:1 hard
               negative mining, over the batch's matched default boxes
    retinanet  focal loss + L1 on deltas, each over the image's foreground anchors
    fcos       focal + GIoU + centerness BCE with center sampling, over the batch's foreground

(`jaxvision.detection.losses`, torchvision's `compute_loss` of each model). `predict` decodes
and runs fixed-size on-device NMS, then maps the boxes to original-image pixels with the
batch's `scale` / `offset`; `finalize` runs COCO evaluation on the host.

Classes: the data's classes are 0 .. K-1. A sigmoid head (RetinaNet, FCOS) has K columns; SSD's
and the R-CNNs' softmax heads have K + 1, column 0 the background; DETR's has K + 1 with the
no-object column last (`num_model_classes`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.detection import losses, postprocess
from jaxvision.detection.anchors import AnchorSet, fcos_scale_ranges
from jaxvision.detection.boxes import to_original
from jaxvision.detection.coco_eval import coco_evaluate, from_padded
from jaxvision.detection.draw import save_detections
from jaxvision.models import create_model
from jaxvision.tasks.base import TaskBase, image_spec

FAMILIES = ("ssd", "retinanet", "fcos")
# Detector families whose task subclass lives in its own module, loaded on first use (as TASKS).
FAMILY_TASKS = {"rcnn": "jaxvision.tasks.two_stage:TwoStageDetectionTask",
                "detr": "jaxvision.tasks.detr:DetrTask"}
ALL_FAMILIES = FAMILIES + tuple(FAMILY_TASKS)
# Families whose `num_classes` counts a background column besides the data's classes (DETR's
# model adds its no-object column itself, as Hugging Face's `num_labels` does).
BACKGROUND_COLUMN = ("ssd", "rcnn")
METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100")
# torchvision's post-processing defaults per family:
# (score_threshold, nms_iou, max_detections, pre_nms_top_k).
POSTPROCESS = {"ssd": (0.01, 0.45, 200, 400), "retinanet": (0.05, 0.5, 300, 1000),
               "fcos": (0.2, 0.6, 100, 1000)}
RETINANET_BOX_LOSSES = ("l1", "smooth_l1", "giou")


def num_model_classes(family: str, num_classes: int) -> int:
  """The `num_classes` of a `family` model for data with `num_classes` classes (SSD and the
  R-CNNs count the background column)."""
  if family not in ALL_FAMILIES:
    raise ValueError(f"detection family {family!r} is unknown; choose from {ALL_FAMILIES}")
  return num_classes + (family in BACKGROUND_COLUMN)


def model_family(model) -> str:
  """The detector family (`ALL_FAMILIES`) of a detector module (its `family` attribute)."""
  family = getattr(model, "family", None)
  if family not in ALL_FAMILIES:
    raise ValueError(f"model {type(model).__name__} is not a detector (family {family!r}); "
                     "choose an ssd*, retinanet*, fcos*, fasterrcnn*, maskrcnn* or detr* model")
  return family


@dataclasses.dataclass(frozen=True, eq=False)
class DetectionTask(TaskBase):
  """Image -> up to `max_detections` (box, score, class) per image.

  Attributes:
    family: 'ssd', 'retinanet' or 'fcos': the loss and the decoding.
    num_classes: the data's classes K (0 .. K-1).
    image_shape: (H, W, C) of the model's input.
    anchors: the model's anchors for that input (`model.anchors((H, W))`); None for detectors
      that keep their own (R-CNN's RPN, DETR).
    max_boxes: ground-truth boxes per image in a batch (padded, with `box_valid`).
    score_threshold: detections need a score above this.
    nms_iou: IoU above which NMS suppresses a box of the same class.
    max_detections: detections kept per image (a static output size).
    pre_nms_top_k: candidates per level (sigmoid heads) or per class (SSD) that enter NMS.
    retinanet_box_loss: RetinaNet's box term: 'l1' (torchvision), 'smooth_l1' or 'giou'.
    class_names: names of the classes for the pictures (empty: the class numbers).
    pictures: eval examples drawn at the end of a run.
  """

  family: str
  num_classes: int
  image_shape: tuple[int, int, int]
  anchors: AnchorSet | None
  max_boxes: int = 100
  score_threshold: float = 0.05
  nms_iou: float = 0.5
  max_detections: int = 100
  pre_nms_top_k: int = 1000
  retinanet_box_loss: str = "l1"
  class_names: tuple[str, ...] = ()
  pictures: int = 0

  def __post_init__(self):
    if self.family not in ALL_FAMILIES:
      raise ValueError(f"detection.loss={self.family!r}; choose from {ALL_FAMILIES}")
    if self.num_classes < 1:
      raise ValueError(f"detection needs num_classes >= 1, got {self.num_classes}")
    if self.max_boxes < 1 or self.max_detections < 1 or self.pre_nms_top_k < 1:
      raise ValueError(f"detection.max_boxes={self.max_boxes}, max_detections="
                       f"{self.max_detections} and pre_nms_top_k={self.pre_nms_top_k} must be "
                       ">= 1")
    if self.retinanet_box_loss not in RETINANET_BOX_LOSSES:
      raise ValueError(f"detection.box_loss={self.retinanet_box_loss!r}; choose from "
                       f"{RETINANET_BOX_LOSSES}")
    if self.anchors is not None and (self.anchors.boxes.shape
                                     != (sum(self.anchors.level_sizes), 4)):
      raise ValueError(f"detection anchors {self.anchors.boxes.shape} do not match their "
                       f"levels {self.anchors.level_sizes}")

  @classmethod
  def for_model(cls, model, image_shape: Sequence[int], num_classes: int | None = None,
                **kwargs) -> DetectionTask:
    """The task for a detector module on inputs of `image_shape` (H, W, C); post-processing
    options default to torchvision's for the model's family."""
    family = kwargs.pop("family", None) or model_family(model)
    score, iou, dets, top_k = POSTPROCESS[family]
    defaults = dict(score_threshold=score, nms_iou=iou, max_detections=dets,
                    pre_nms_top_k=top_k)
    defaults.update({k: v for k, v in kwargs.items() if v is not None})
    if num_classes is None:
      num_classes = model.num_classes - (family == "ssd")
    image_shape = tuple(int(d) for d in image_shape)
    return cls(family, int(num_classes), image_shape, model.anchors(image_shape[:2]),
               **defaults)

  @classmethod
  def resolve(cls, config, train_input) -> None:
    """`num_classes` (when 0): the model's class columns for the data's classes."""
    if not config.num_classes:
      family = str(config.detection.loss)
      if family in ("", "auto"):
        family = model_family(create_model(config.model, **dict(config.model_kwargs.to_dict())))
      config.num_classes = num_model_classes(family, int(train_input.num_classes))

  @classmethod
  def from_config(cls, config) -> DetectionTask:
    """The task as the resolved run config describes it: `config.detection` (post-processing
    values <= 0 take the family's torchvision defaults), the model's anchors for
    `config.data_info.image_shape`, and the data's classes from the model's class columns
    (`config.num_classes`, see `num_model_classes`)."""
    det = config.detection
    model = create_model(config.model, num_classes=int(config.num_classes),
                         **dict(config.model_kwargs.to_dict()))
    family = str(det.loss)
    family = model_family(model) if family in ("", "auto") else family
    if family in FAMILY_TASKS and cls is DetectionTask:
      module, name = FAMILY_TASKS[family].split(":")
      return getattr(importlib.import_module(module), name).from_config(config)
    positive = lambda v: v if v > 0 else None
    names = tuple(str(n) for n in config.data_info.get("class_names", ()))
    return cls.for_model(
        model, tuple(config.data_info.image_shape), family=family,
        max_boxes=int(det.max_boxes), score_threshold=positive(float(det.score_threshold)),
        nms_iou=positive(float(det.nms_iou)), max_detections=positive(int(det.max_detections)),
        pre_nms_top_k=positive(int(det.pre_nms_top_k)), retinanet_box_loss=str(det.box_loss),
        class_names=names, pictures=int(det.pictures))

  # -- the batch and the model ----------------------------------------------------------------
  @property
  def metric_names(self) -> tuple[str, ...]:
    """COCO box AP (0.50:0.95, 0.50, 0.75, small / medium / large) and AR at 100 detections."""
    return METRICS

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Images, ground truth padded to `max_boxes` (xyxy input pixels) with its masks, and the
    image id, original size and the transform (`scale`, `offset`) back to original pixels."""
    b, m = batch_size, self.max_boxes
    s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    return {"image": image_spec(b, self.image_shape), "boxes": s((b, m, 4), np.float32),
            "classes": s((b, m), np.int32), "box_valid": s((b, m), np.bool_),
            "box_ignore": s((b, m), np.bool_), "id": s((b,), np.int32),
            "orig_size": s((b, 2), np.int32), "scale": s((b, 2), np.float32),
            "offset": s((b, 2), np.float32)}

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """The model sees the images."""
    return (batch["image"],), {}

  def check_outputs(self, outputs) -> None:
    """The model must give the raw head outputs of this family over the task's anchors."""
    if not isinstance(outputs, dict) or "cls_logits" not in outputs:
      got = type(outputs).__name__ if not hasattr(outputs, "shape") else tuple(outputs.shape)
      raise ValueError(f"the model outputs {got}, but detection needs a dict of raw head "
                       "outputs ('cls_logits', 'bbox_regression'); choose an ssd*, retinanet* "
                       "or fcos* model")
    n, k = len(self.anchors), num_model_classes(self.family, self.num_classes)
    want = {"cls_logits": (n, k), "bbox_regression": (n, 4)}
    if self.family == "fcos":
      want["bbox_ctrness"] = (n, 1)
    for key, tail in want.items():
      shape = tuple(getattr(outputs.get(key), "shape", ()))
      if len(shape) != 3 or shape[1:] != tail:
        raise ValueError(f"the model's {key!r} is {shape or 'missing'}, but the {self.family} "
                         f"task needs (B, {tail[0]}, {tail[1]}): {n} anchors at "
                         f"{self.image_shape[:2]} px, {self.num_classes} classes")

  # -- training -------------------------------------------------------------------------------
  def _targets(self, batch: dict):
    valid = batch["box_valid"] & ~batch["box_ignore"]
    return batch["boxes"].astype(jnp.float32), batch["classes"].astype(jnp.int32), valid

  def loss(self, outputs: dict, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The family's torchvision training loss and its terms."""
    boxes, classes, valid = self._targets(batch)
    anchors = self.anchors.boxes
    cls, reg = outputs["cls_logits"], outputs["bbox_regression"].astype(jnp.float32)
    if self.family == "ssd":
      total, parts = losses.ssd_loss(cls, reg, anchors, boxes, classes, valid)
    elif self.family == "retinanet":
      total, parts = losses.retinanet_loss(cls, reg, anchors, boxes, classes, valid,
                                           box_loss=self.retinanet_box_loss)
    else:
      lower, upper = fcos_scale_ranges(self.anchors)
      total, parts = losses.fcos_loss(cls, reg, outputs["bbox_ctrness"], anchors, lower, upper,
                                      boxes, classes, valid)
    return total, {f"loss_{k}": v for k, v in parts.items()}

  # -- evaluation -----------------------------------------------------------------------------
  def detections(self, outputs: dict) -> dict[str, jax.Array]:
    """Fixed-size detections {'boxes' (xyxy input pixels), 'scores', 'classes', 'valid'} of
    raw head outputs."""
    kw = dict(image_size=self.image_shape[:2], score_threshold=self.score_threshold,
              pre_nms_top_k=self.pre_nms_top_k, iou_threshold=self.nms_iou,
              max_detections=self.max_detections)
    cls, reg, anchors = outputs["cls_logits"], outputs["bbox_regression"], self.anchors.boxes
    if self.family == "ssd":
      return postprocess.softmax_detections(cls, reg, anchors, **kw)
    if self.family == "retinanet":
      return postprocess.sigmoid_detections(cls, reg, anchors, self.anchors.level_sizes, **kw)
    return postprocess.fcos_detections(cls, reg, outputs["bbox_ctrness"], anchors,
                                       self.anchors.level_sizes, **kw)

  def infer(self, forward, batch: dict) -> dict[str, jax.Array]:
    """Detections of one forward pass over the batch's images, boxes in original-image pixels
    (the batch's `scale`, `offset`, `orig_size`); needs no ground truth (`train.predict`)."""
    dets = self.detections(forward(batch["image"]))
    return postprocess.to_original(dets, batch["scale"], batch["offset"], batch["orig_size"])

  def predict(self, forward, batch: dict) -> dict[str, jax.Array]:
    """What evaluation scores: `infer`'s detections."""
    return self.infer(forward, batch)

  def eval_sums(self, predictions: dict, batch: dict) -> dict[str, jax.Array]:
    """Valid examples and their detections (COCO AP is not a sum: see `eval_examples`)."""
    valid = batch["valid"]
    return {"count": jnp.sum(valid.astype(jnp.int32)),
            "detections": jnp.sum(predictions["valid"] & valid[:, None])}

  def eval_examples(self, predictions: dict, batch: dict) -> dict[str, jax.Array]:
    """Per example: the detections, the padded ground truth in original pixels, its masks (and
    the annotations' areas when the batch has `box_area`), the image id and whether the example
    is real (for COCO evaluation on the host)."""
    gt = to_original(batch["boxes"].astype(jnp.float32), batch["scale"][:, None, :],
                     batch["offset"][:, None, :])
    examples = {"det_boxes": predictions["boxes"], "det_scores": predictions["scores"],
                "det_classes": predictions["classes"], "det_valid": predictions["valid"],
                "gt_boxes": jnp.where(batch["box_valid"][..., None], gt, 0.0),
                "gt_classes": batch["classes"], "gt_valid": batch["box_valid"],
                "gt_ignore": batch["box_ignore"], "id": batch["id"], "valid": batch["valid"]}
    if "box_area" in batch:  # COCO's segment areas decide small / medium / large
      examples["gt_area"] = batch["box_area"]
    return examples

  def finalize(self, sums: dict, examples: dict) -> dict[str, float]:
    """COCO AP / AR of every valid example (crowd / difficult boxes as COCO's iscrowd; sizes
    from the annotations' areas when given, else the boxes')."""
    del sums
    e = {k: np.asarray(v) for k, v in examples.items()}
    dets, gts = from_padded(e["id"], e["det_boxes"], e["det_scores"], e["det_classes"],
                            e["det_valid"], e["gt_boxes"], e["gt_classes"], e["gt_valid"],
                            gt_ignore=e["gt_ignore"], gt_area=e.get("gt_area"),
                            example_valid=e["valid"])
    metrics = coco_evaluate(dets, gts)
    return {name: float(metrics[name]) for name in METRICS}

  # -- pictures -------------------------------------------------------------------------------
  @property
  def num_pictures(self) -> int:
    """Eval examples drawn at the end of a run."""
    return self.pictures

  def save_pictures(self, path_prefix: str, batch: dict, predictions: Any) -> list[str]:
    """One PNG per example: the model's input image with its detections (class name and score)
    and the ground truth (white) drawn; files `{path_prefix}{i}.png`."""
    return self._draw(path_prefix, batch, predictions)

  def _draw(self, path_prefix: str, batch: dict, predictions: Any, masks=None) -> list[str]:
    """save_pictures' drawing, with instance masks (bool [D, H, W] per example, in the model's
    input pixels) filled in when given."""
    names = self.class_names or None
    os.makedirs(os.path.dirname(path_prefix) or ".", exist_ok=True)
    paths = []
    for i in range(len(batch["image"])):
      # Predictions are in original pixels; the picture is the model's input.
      scale, offset = np.tile(batch["scale"][i], 2), np.tile(batch["offset"][i], 2)
      boxes = np.asarray(predictions["boxes"][i]) * scale + offset
      paths.append(save_detections(
          f"{path_prefix}{i}.png", np.asarray(batch["image"][i]), boxes,
          np.asarray(predictions["scores"][i]), np.asarray(predictions["classes"][i]),
          valid=np.asarray(predictions["valid"][i]), class_names=names,
          gt_boxes=np.asarray(batch["boxes"][i]), gt_classes=np.asarray(batch["classes"][i]),
          gt_valid=np.asarray(batch["box_valid"][i]),
          masks=None if masks is None else masks[i]))
    return paths
