"""DETR's set loss (Carion et al. 2020; transformers' `ImageLoss` / DETR's `SetCriterion`) with
the Hungarian matching on device, and DETR's post-processing.

    total, parts = detr_loss(outputs, gt_boxes, gt_classes, gt_valid, image_hw)
    detections = detr_detections(outputs, image_hw, max_detections=100)

Every decoder layer's predictions (the last, and with `aux` every auxiliary one) are matched to
the padded ground truth on their own (`jaxvision.detection.hungarian.detr_match`, on normalised
cx, cy, w, h targets, inside the jitted step: no host round trip), then scored:
  loss_ce    softmax cross-entropy of every query against its matched class, or "no object"
             (the last column) for the unmatched ones, weighted `eos_coef` for no-object and
             averaged by the weights (PyTorch's `cross_entropy` with class weights)
  loss_bbox  L1 between matched predicted and target boxes (normalised cx, cy, w, h)
  loss_giou  1 - GIoU of the matched pairs
  the two box terms summed over the pairs and divided by the batch's target boxes (at least 1),
  and `cardinality_error` (logged, not trained): the mean absolute difference between the
  queries not predicting no-object and the image's targets.
The total is class_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou summed
over the layers; the same three weights are the matching costs, as in DETR. `parts` has
transformers' names: `loss_ce` ... for the last layer, `loss_ce_0` ... for auxiliary layer 0.
All layers are matched at once (the matcher is vmapped over the layer axis too), so the step
holds one matching loop, not one per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxvision.detection.boxes import convert, elementwise_giou
from jaxvision.detection.hungarian import detr_match
from jaxvision.detection.losses import softmax_cross_entropy

PARTS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


def _image_hw(image_hw) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in image_hw)
  except (TypeError, ValueError):
    raise ValueError(f"image_hw must be (height, width), got {image_hw!r}") from None
  if h <= 0 or w <= 0:
    raise ValueError(f"image_hw must be positive, got {(h, w)}")
  return h, w


def _check_outputs(name: str, outputs, aux: bool) -> tuple[int, int, int]:
  if not isinstance(outputs, dict) or "logits" not in outputs or "pred_boxes" not in outputs:
    raise ValueError(f"{name}: outputs must be a dict with 'logits' and 'pred_boxes' (DETR's)")
  logits, boxes = outputs["logits"], outputs["pred_boxes"]
  if logits.ndim != 3 or boxes.shape != (*logits.shape[:2], 4):
    raise ValueError(f"{name}: logits {logits.shape} and pred_boxes {boxes.shape} must be "
                     "[B, Q, K + 1] and [B, Q, 4]")
  if aux:
    if "aux_logits" not in outputs or "aux_pred_boxes" not in outputs:
      raise ValueError(f"{name}: aux=True needs 'aux_logits' and 'aux_pred_boxes' outputs")
    aux_logits, aux_boxes = outputs["aux_logits"], outputs["aux_pred_boxes"]
    if aux_logits.shape[1:] != logits.shape or aux_boxes.shape[1:] != boxes.shape or (
        aux_logits.shape[0] != aux_boxes.shape[0]):
      raise ValueError(f"{name}: aux_logits {aux_logits.shape} and aux_pred_boxes "
                       f"{aux_boxes.shape} must be [L - 1, *{logits.shape}] and "
                       f"[L - 1, *{boxes.shape}]")
  return logits.shape


def _layer_losses(logits, boxes, targets, gt_classes, gt_valid, num_boxes, weights, matcher):
  """The four parts of one decoder layer's predictions (logits [B, Q, K + 1], boxes [B, Q, 4])."""
  class_weight, bbox_weight, giou_weight, eos_coef = weights
  b, q, columns = logits.shape
  no_object = columns - 1
  match = matcher(logits, boxes, gt_classes, targets, gt_valid, class_weight=class_weight,
                     l1_weight=bbox_weight, giou_weight=giou_weight)  # [B, G]
  matched = gt_valid & (match >= 0)
  # Each query's class target: its matched object's class, else no-object; the padded and
  # unmatched rows write out of range, which drops them.
  rows = jnp.arange(b)[:, None]
  target_classes = jnp.full((b, q), no_object, jnp.int32).at[
      rows, jnp.where(matched, match, q)].set(gt_classes.astype(jnp.int32), mode="drop")
  class_weights = jnp.where(target_classes == no_object, eos_coef, 1.0)
  ce = softmax_cross_entropy(logits, target_classes)
  loss_ce = jnp.sum(class_weights * ce) / jnp.sum(class_weights)

  pred = jnp.take_along_axis(boxes.astype(jnp.float32), jnp.maximum(match, 0)[..., None], axis=1)
  l1 = jnp.abs(pred - targets).sum(-1)
  giou = 1.0 - elementwise_giou(convert(pred, "cxcywh", "xyxy"),
                                convert(targets, "cxcywh", "xyxy"))
  loss_bbox = jnp.sum(jnp.where(matched, l1, 0.0)) / num_boxes
  loss_giou = jnp.sum(jnp.where(matched, giou, 0.0)) / num_boxes

  predicted = jnp.sum(jnp.argmax(logits, -1) != no_object, axis=1)
  cardinality = jnp.mean(jnp.abs(predicted - gt_valid.sum(1)).astype(jnp.float32))
  return loss_ce, loss_bbox, loss_giou, jax.lax.stop_gradient(cardinality)


def detr_loss(outputs: dict, gt_boxes: jax.Array, gt_classes: jax.Array, gt_valid: jax.Array,
              image_hw: Sequence[int], *, eos_coef: float = 0.1, class_weight: float = 1.0,
              bbox_weight: float = 5.0, giou_weight: float = 2.0, aux: bool = True,
              matcher: Callable[..., jax.Array] = detr_match,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DETR's set loss (total, parts) of a DETR model's outputs against padded ground truth:
  gt_boxes [B, M, 4] xyxy in input pixels, gt_classes [B, M] in 0..K-1, gt_valid [B, M].

  `matcher` has `hungarian.detr_match`'s signature (and is vmapped over the decoder layers);
  it is there to compare other assignment solvers, e.g. a host one, on the same loss."""
  b, q, _ = _check_outputs("detr_loss", outputs, aux)
  m = gt_boxes.shape[1] if gt_boxes.ndim == 3 else -1
  if gt_boxes.shape != (b, m, 4) or gt_classes.shape != (b, m) or gt_valid.shape != (b, m):
    raise ValueError(f"detr_loss: ground truth boxes {gt_boxes.shape}, classes "
                     f"{gt_classes.shape}, valid {gt_valid.shape} must be [B, M, 4], [B, M], "
                     f"[B, M] with B={b}")
  if m > q:
    raise ValueError(f"detr_loss: {m} ground-truth boxes per image but only {q} queries to "
                     "match them to")
  h, w = _image_hw(image_hw)
  scale = jnp.array([w, h, w, h], jnp.float32)
  targets = convert(gt_boxes.astype(jnp.float32), "xyxy", "cxcywh") / scale
  gt_valid = gt_valid.astype(bool)
  num_boxes = jnp.maximum(jnp.sum(gt_valid).astype(jnp.float32), 1.0)

  logits, boxes = outputs["logits"][None], outputs["pred_boxes"][None]
  if aux:  # [L, B, Q, ...]: the auxiliary layers, then the last
    logits = jnp.concatenate([outputs["aux_logits"], logits])
    boxes = jnp.concatenate([outputs["aux_pred_boxes"], boxes])
  weights = (class_weight, bbox_weight, giou_weight, eos_coef)
  per_layer = jax.vmap(lambda lg, bx: _layer_losses(lg, bx, targets, gt_classes, gt_valid,
                                                    num_boxes, weights, matcher))(logits, boxes)
  ce, l1, giou, _ = per_layer
  total = jnp.sum(class_weight * ce + bbox_weight * l1 + giou_weight * giou)
  layers = logits.shape[0]
  parts = {}
  for name, values in zip(PARTS, per_layer, strict=True):
    parts[name] = values[-1]
    parts.update({f"{name}_{i}": values[i] for i in range(layers - 1)})
  return total, parts


def detr_detections(outputs: dict, image_hw: Sequence[int], *, max_detections: int,
                    score_threshold: float = 0.0) -> dict[str, jax.Array]:
  """transformers' `post_process_object_detection` with static shapes: each query's best real
  class (softmax, no-object column dropped) and its box, the `max_detections` best queries per
  image by score. Returns {'boxes' [B, D, 4] xyxy input pixels, 'scores' [B, D], 'classes'
  [B, D] in 0..K-1, 'valid' [B, D] (score above `score_threshold`)}."""
  b, q, _ = _check_outputs("detr_detections", outputs, aux=False)
  if not 1 <= int(max_detections) <= q:
    raise ValueError(f"detr_detections: max_detections={max_detections} must be in 1..{q} "
                     "(the model's queries)")
  h, w = _image_hw(image_hw)
  prob = jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)[..., :-1]
  scores, classes = prob.max(-1), jnp.argmax(prob, -1).astype(jnp.int32)
  boxes = convert(outputs["pred_boxes"].astype(jnp.float32), "cxcywh", "xyxy")
  boxes = boxes * jnp.array([w, h, w, h], jnp.float32)
  top, order = jax.lax.top_k(scores, int(max_detections))
  return {"boxes": jnp.take_along_axis(boxes, order[..., None], axis=1), "scores": top,
          "classes": jnp.take_along_axis(classes, order, axis=1),
          "valid": top > score_threshold}
