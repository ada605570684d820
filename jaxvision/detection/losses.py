"""Detection losses: the elementwise terms and the three detectors' complete training losses.

Elementwise terms equal torchvision's formulas (`sigmoid_focal_loss`, `smooth_l1_loss`,
`generalized_box_iou_loss`, ...). The complete losses take a batch of raw head outputs and
padded ground truth and follow torchvision's `compute_loss` of each model, including how it
normalises:

    ssd_loss        smooth-L1 on (10, 10, 5, 5) deltas + softmax cross-entropy with 3:1 hard
                    negative mining, both divided by the batch's matched anchors
    retinanet_loss  focal loss (anchors between the IoU thresholds left out) + L1 on deltas,
                    each divided by the image's foreground anchors, then averaged over images
    fcos_loss       focal loss + GIoU loss + centerness BCE, divided by the batch's foreground

Ground truth: boxes [B, M, 4] xyxy in input pixels, classes [B, M] int (0..K-1, contiguous),
valid [B, M] bool (pass `box_valid & ~box_ignore`: crowd / difficult boxes are not targets).
SSD's logits have a background column 0, so class k is column k + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvision.detection import matchers
from jaxvision.detection.coders import SSD_WEIGHTS, DeltaCoder, LTRBCoder

# --- Elementwise terms ---------------------------------------------------------------------


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Focal loss (Lin et al. 2017) per element; alpha < 0 turns the class weighting off."""
  p = jax.nn.sigmoid(logits)
  ce = binary_cross_entropy_with_logits(logits, targets)
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def binary_cross_entropy_with_logits(logits, targets):
  """-(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))) per element, computed stably."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def smooth_l1_loss(pred, target, beta: float = 1.0):
  """Huber-like loss per element: quadratic below |d| = beta, linear above (beta 0: L1)."""
  d = jnp.abs(pred - target)
  if beta <= 0:
    return d
  return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def l1_loss(pred, target):
  """|pred - target| per element."""
  return jnp.abs(pred - target)


def giou_loss(boxes1, boxes2, eps: float = 1e-7):
  """1 - GIoU [...] of corresponding xyxy boxes, with torchvision's eps placement (so a
  degenerate prediction gives a finite loss and gradient)."""
  x1, y1, x2, y2 = (boxes1[..., i] for i in range(4))
  x1g, y1g, x2g, y2g = (boxes2[..., i] for i in range(4))
  iw = jnp.minimum(x2, x2g) - jnp.maximum(x1, x1g)
  ih = jnp.minimum(y2, y2g) - jnp.maximum(y1, y1g)
  inter = jnp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
  union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
  iou = inter / (union + eps)
  enclosing = (jnp.maximum(x2, x2g) - jnp.minimum(x1, x1g)) * (
      jnp.maximum(y2, y2g) - jnp.minimum(y1, y1g))
  return 1 - (iou - (enclosing - union) / (enclosing + eps))


def softmax_cross_entropy(logits, labels):
  """-log softmax(logits)[label] per element; logits [..., C], integer labels [...]."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def hard_negatives(loss, foreground, neg_to_pos: float = 3.0):
  """[B, N] mask of each image's highest-loss background anchors, neg_to_pos per foreground
  anchor of the image (SSD's hard negative mining; none for an image without foreground)."""
  num_negative = neg_to_pos * jnp.sum(foreground, axis=1, keepdims=True)
  ranked = jnp.where(foreground, -jnp.inf, loss)
  order = jnp.argsort(-ranked, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True)
  # Foreground anchors rank last; they are excluded even when an image has fewer background
  # anchors than neg_to_pos x foreground (torchvision would count them a second time).
  return (rank < num_negative) & ~foreground


def centerness_targets(ltrb):
  """FCOS centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of ltrb [..., 4]
  distances (only meaningful for points inside their box)."""
  lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
  return jnp.sqrt((lr.min(-1) / lr.max(-1)) * (tb.min(-1) / tb.max(-1)))


# --- Complete losses -----------------------------------------------------------------------


def _check(name, cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_valid):
  b, n = cls_logits.shape[:2]
  if bbox_regression.shape != (b, n, 4):
    raise ValueError(f"{name}: bbox_regression {bbox_regression.shape} != {(b, n, 4)} "
                     f"(cls_logits {cls_logits.shape})")
  if anchors.shape != (n, 4):
    raise ValueError(f"{name}: {anchors.shape[0]} anchors for {n} predictions per image")
  m = gt_boxes.shape[1] if gt_boxes.ndim == 3 else -1
  if gt_boxes.shape != (b, m, 4) or gt_classes.shape != (b, m) or gt_valid.shape != (b, m):
    raise ValueError(f"{name}: ground truth boxes {gt_boxes.shape}, classes {gt_classes.shape}, "
                     f"valid {gt_valid.shape} must be [B, M, 4], [B, M], [B, M] with B={b}")


def ssd_loss(cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_valid, *,
             iou_threshold: float = 0.5, neg_to_pos: float = 3.0):
  """torchvision SSD's loss: (total, {'bbox_regression', 'classification'}); cls_logits
  [B, N, K + 1] with column 0 the background."""
  _check("ssd_loss", cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_valid)
  anchors = jnp.asarray(anchors, jnp.float32)
  match = jax.vmap(lambda b, v: matchers.ssd_matcher(b, v, anchors, iou_threshold))
  matches = match(gt_boxes, gt_valid)
  boxes, classes, fg = jax.vmap(matchers.matched_targets)(matches, gt_boxes, gt_classes)
  num_fg = jnp.maximum(jnp.sum(fg), 1).astype(jnp.float32)
  # Background anchors get a well-defined dummy target (the anchor itself) so no log(0) or
  # 0/0 reaches the gradient through the masked-out entries.
  boxes = jnp.where(fg[..., None], boxes, anchors[None])
  targets = DeltaCoder(SSD_WEIGHTS).encode(boxes, anchors[None])
  box_loss = jnp.sum(jnp.where(fg[..., None], smooth_l1_loss(bbox_regression, targets), 0.0))
  labels = jnp.where(fg, classes + 1, 0)
  ce = softmax_cross_entropy(cls_logits, labels)
  negatives = hard_negatives(ce, fg, neg_to_pos)
  cls_loss = jnp.sum(jnp.where(fg | negatives, ce, 0.0))
  parts = {"bbox_regression": box_loss / num_fg, "classification": cls_loss / num_fg}
  return parts["bbox_regression"] + parts["classification"], parts


def retinanet_loss(cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_valid, *,
                   fg_iou_threshold: float = 0.5, bg_iou_threshold: float = 0.4,
                   box_loss: str = "l1", beta: float = 1.0, alpha: float = 0.25,
                   gamma: float = 2.0):
  """torchvision RetinaNet's loss: (total, {'classification', 'bbox_regression'}); `box_loss`
  'l1' (torchvision's default), 'smooth_l1' (with `beta`) or 'giou' on the decoded boxes."""
  _check("retinanet_loss", cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_valid)
  if box_loss not in ("l1", "smooth_l1", "giou"):
    raise ValueError(f"retinanet_loss: box_loss={box_loss!r}; choose l1, smooth_l1 or giou")
  anchors = jnp.asarray(anchors, jnp.float32)
  match = jax.vmap(lambda b, v: matchers.iou_matcher(
      b, v, anchors, fg_iou_threshold, bg_iou_threshold, allow_low_quality_matches=True))
  matches = match(gt_boxes, gt_valid)
  boxes, classes, fg = jax.vmap(matchers.matched_targets)(matches, gt_boxes, gt_classes)
  num_fg = jnp.maximum(jnp.sum(fg, axis=1), 1).astype(jnp.float32)  # per image
  num_classes = cls_logits.shape[-1]
  onehot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32) * fg[..., None]
  counted = matches != matchers.BETWEEN_THRESHOLDS
  focal = sigmoid_focal_loss(cls_logits.astype(jnp.float32), onehot, alpha, gamma)
  cls_loss = jnp.sum(jnp.where(counted[..., None], focal, 0.0), axis=(1, 2)) / num_fg
  coder = DeltaCoder()
  boxes = jnp.where(fg[..., None], boxes, anchors[None])
  if box_loss == "giou":
    per_anchor = giou_loss(coder.decode(bbox_regression, anchors[None]), boxes)
  else:
    targets = coder.encode(boxes, anchors[None])
    terms = (l1_loss(bbox_regression, targets) if box_loss == "l1"
             else smooth_l1_loss(bbox_regression, targets, beta))
    per_anchor = jnp.sum(terms, axis=-1)
  reg_loss = jnp.sum(jnp.where(fg, per_anchor, 0.0), axis=1) / num_fg
  parts = {"classification": jnp.mean(cls_loss), "bbox_regression": jnp.mean(reg_loss)}
  return parts["classification"] + parts["bbox_regression"], parts


def fcos_loss(cls_logits, bbox_regression, bbox_ctrness, anchors, lower, upper, gt_boxes,
              gt_classes, gt_valid, *, center_sampling_radius: float = 1.5,
              alpha: float = 0.25, gamma: float = 2.0):
  """torchvision FCOS's loss: (total, {'classification', 'bbox_regression', 'bbox_ctrness'});
  `lower`/`upper` are the points' scale ranges (`anchors.fcos_scale_ranges`)."""
  _check("fcos_loss", cls_logits, bbox_regression, anchors, gt_boxes, gt_classes, gt_valid)
  n = cls_logits.shape[1]
  if bbox_ctrness.shape not in ((cls_logits.shape[0], n, 1), (cls_logits.shape[0], n)):
    raise ValueError(f"fcos_loss: bbox_ctrness {bbox_ctrness.shape} must be [B, {n}, 1]")
  anchors = jnp.asarray(anchors, jnp.float32)
  lower, upper = jnp.asarray(lower, jnp.float32), jnp.asarray(upper, jnp.float32)
  match = jax.vmap(lambda b, v: matchers.fcos_matcher(
      b, v, anchors, lower, upper, center_sampling_radius))
  matches = match(gt_boxes, gt_valid)
  boxes, classes, fg = jax.vmap(matchers.matched_targets)(matches, gt_boxes, gt_classes)
  num_fg = jnp.maximum(jnp.sum(fg), 1).astype(jnp.float32)
  onehot = jax.nn.one_hot(classes, cls_logits.shape[-1], dtype=jnp.float32) * fg[..., None]
  cls_loss = jnp.sum(sigmoid_focal_loss(cls_logits.astype(jnp.float32), onehot, alpha, gamma))
  coder = LTRBCoder(normalize_by_size=True)
  pred_boxes = coder.decode(bbox_regression.astype(jnp.float32), anchors[None])
  box_loss = jnp.sum(jnp.where(fg, giou_loss(pred_boxes, boxes), 0.0))
  ltrb = coder.encode(boxes, anchors[None])
  # Only foreground points lie inside their box; elsewhere the target is set to a harmless 0.
  target = jnp.where(fg, centerness_targets(jnp.where(fg[..., None], ltrb, 1.0)), 0.0)
  ctr = bbox_ctrness.reshape(fg.shape).astype(jnp.float32)
  ctr_loss = jnp.sum(jnp.where(fg, binary_cross_entropy_with_logits(ctr, target), 0.0))
  parts = {"classification": cls_loss / num_fg, "bbox_regression": box_loss / num_fg,
           "bbox_ctrness": ctr_loss / num_fg}
  return sum(parts.values()), parts
