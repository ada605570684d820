"""DETR's detection task: image -> a fixed set of (box, class) predictions, one per object query.

Training matches the queries to the padded ground truth inside the jitted step (Hungarian
matching on device, `jaxvision.detection.hungarian`) and takes DETR's set loss over the matched
pairs and the unmatched queries' "no object" class, for the last decoder layer and every
auxiliary one (`jaxvision.detection.detr_loss`). Evaluation keeps each query's best real class
(no NMS: the set loss already taught the queries not to duplicate) and scores the boxes with
COCO AP like every detector (`DetectionTask`).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxvision.detection.detr_loss import detr_detections, detr_loss
from jaxvision.models import create_model
from jaxvision.tasks.detection import DetectionTask, model_family


@dataclasses.dataclass(frozen=True, eq=False)
class DetrTask(DetectionTask):
  """DETR's set loss and query decoding; evaluation and pictures as `DetectionTask`'s.

  Attributes (besides `DetectionTask`'s; `anchors` is None, `max_detections` at most the
  model's queries):
    no_object_weight: the cross-entropy weight of the "no object" class (DETR's eos_coef).
    aux_loss: whether every decoder layer's output is trained too (DETR's auxiliary losses).
  """

  no_object_weight: float = 0.1
  aux_loss: bool = True

  @classmethod
  def from_config(cls, config) -> DetrTask:
    """The task of a detr* model: `config.detection.max_boxes`, `max_detections` (<= 0: one per
    query), `no_object_weight` and `aux_loss`; DETR has no score threshold, NMS or anchors, so
    setting those is an error."""
    det = config.detection
    model = create_model(config.model, num_classes=int(config.num_classes),
                         **dict(config.model_kwargs.to_dict()))
    if model_family(model) != "detr":
      raise ValueError(f"model {config.model!r} is not a DETR model")
    for key in ("score_threshold", "nms_iou", "pre_nms_top_k"):
      if float(det[key]) > 0:
        raise ValueError(f"config.detection.{key}={det[key]} does not apply to DETR (every "
                         "query is one detection, without NMS); leave it 0")
    queries = int(model.num_queries)
    max_detections = int(det.max_detections) if int(det.max_detections) > 0 else queries
    if max_detections > queries:
      raise ValueError(f"config.detection.max_detections={max_detections} is more than the "
                       f"model's {queries} object queries")
    names = tuple(str(n) for n in config.data_info.get("class_names", ()))
    return cls(family="detr", num_classes=int(config.num_classes),
               image_shape=tuple(int(d) for d in config.data_info.image_shape), anchors=None,
               max_boxes=int(det.max_boxes), score_threshold=0.0, nms_iou=0.0,
               max_detections=max_detections, pre_nms_top_k=queries, class_names=names,
               pictures=int(det.pictures), no_object_weight=float(det.no_object_weight),
               aux_loss=bool(det.aux_loss))

  def check_outputs(self, outputs) -> None:
    """The model must give per-query class logits (K + 1 columns, no-object last) and boxes."""
    if not isinstance(outputs, dict) or "logits" not in outputs or "pred_boxes" not in outputs:
      got = type(outputs).__name__ if not hasattr(outputs, "shape") else tuple(outputs.shape)
      raise ValueError(f"the model outputs {got}, but DETR's task needs a dict with 'logits' "
                       "and 'pred_boxes'; choose a detr* model")
    logits, boxes = tuple(outputs["logits"].shape), tuple(outputs["pred_boxes"].shape)
    if len(logits) != 3 or logits[2] != self.num_classes + 1:
      raise ValueError(f"the model's 'logits' are {logits}, but the task needs (B, queries, "
                       f"{self.num_classes + 1}): {self.num_classes} classes and no-object")
    if boxes != logits[:2] + (4,):
      raise ValueError(f"the model's 'pred_boxes' are {boxes}, but the task needs "
                       f"{logits[:2] + (4,)}")
    if self.aux_loss and "aux_logits" not in outputs:
      raise ValueError("config.detection.aux_loss=True, but the model gives no auxiliary "
                       "decoder outputs ('aux_logits')")

  def loss(self, outputs: dict, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DETR's set loss (class + 5 L1 + 2 GIoU over the matched queries, per decoder layer)."""
    boxes, classes, valid = self._targets(batch)
    total, parts = detr_loss(outputs, boxes, classes, valid, self.image_shape[:2],
                             eos_coef=self.no_object_weight, aux=self.aux_loss)
    return total, {k if k.startswith("loss") else f"loss_{k}": v for k, v in parts.items()}

  def detections(self, outputs: dict) -> dict[str, jax.Array]:
    """Each query's most likely real class and its box in input pixels, the best
    `max_detections` queries per image."""
    return detr_detections(outputs, self.image_shape[:2], max_detections=self.max_detections)
