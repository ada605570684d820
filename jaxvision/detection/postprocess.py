"""From raw head outputs to a fixed number of detections per image, on device.

As torchvision's `postprocess_detections`: score threshold (score > threshold), pre-NMS top-k
(per level for the sigmoid detectors RetinaNet / FCOS, per class for SSD), decode, clip to the
image, class-aware NMS, then the best `max_detections`. Static shapes throughout: the output is

    {'boxes': [B, D, 4] xyxy input pixels, 'scores': [B, D], 'classes': [B, D] int32,
     'valid': [B, D] bool}

with slots past the surviving detections marked invalid (zero boxes, score 0). Classes are
foreground indices: the logit column for sigmoid heads, column - 1 for SSD's softmax head
(whose column 0 is the background). `to_original` maps them to original-image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxvision.detection.boxes import clip
from jaxvision.detection.boxes import to_original as boxes_to_original
from jaxvision.detection.coders import SSD_WEIGHTS, DeltaCoder, LTRBCoder
from jaxvision.detection.nms import batched_nms


def _image_hw(image_size, batch: int):
  """[B] heights and widths from an (H, W) pair or a [B, 2] array."""
  hw = jnp.asarray(image_size, jnp.float32)
  if hw.ndim == 1:
    hw = jnp.broadcast_to(hw, (batch, 2))
  if hw.shape != (batch, 2):
    raise ValueError(f"image_size must be (H, W) or [B, 2], got shape {tuple(hw.shape)}")
  return hw[:, 0], hw[:, 1]


def _finish(boxes, scores, classes, valid, *, iou_threshold, max_detections):
  indices, kept = batched_nms(boxes, scores, iou_threshold=iou_threshold,
                              max_outputs=max_detections, classes=classes, valid=valid)
  take = jax.vmap(lambda a, i: a[i])
  return {
      "boxes": jnp.where(kept[..., None], take(boxes, indices), 0.0),
      "scores": jnp.where(kept, take(scores, indices), 0.0),
      "classes": jnp.where(kept, take(classes, indices), 0).astype(jnp.int32),
      "valid": kept,
  }


def sigmoid_detections(cls_logits, bbox_regression, anchors, level_sizes: Sequence[int], *,
                       image_size, coder=None, ctrness=None, score_threshold: float = 0.05,
                       pre_nms_top_k: int = 1000, iou_threshold: float = 0.5,
                       max_detections: int = 300):
  """Detections of a sigmoid head (RetinaNet; FCOS with `ctrness` [B, N, 1], whose score is
  sqrt(sigmoid(cls) * sigmoid(ctrness))): per level the top `pre_nms_top_k` (anchor, class)
  pairs above the threshold, decoded with `coder` (DeltaCoder() by default), clipped to
  `image_size` ((H, W) or [B, 2]), then class-aware NMS."""
  b, n, k = cls_logits.shape
  if sum(level_sizes) != n:
    raise ValueError(f"sigmoid_detections: levels {tuple(level_sizes)} sum to "
                     f"{sum(level_sizes)}, not the {n} predictions per image")
  coder = coder or DeltaCoder()
  anchors = jnp.asarray(anchors, jnp.float32)
  scores = jax.nn.sigmoid(cls_logits.astype(jnp.float32))
  if ctrness is not None:
    scores = jnp.sqrt(scores * jax.nn.sigmoid(ctrness.reshape(b, n, 1).astype(jnp.float32)))
  height, width = _image_hw(image_size, b)
  parts, start = [], 0
  for size in level_sizes:
    level = scores[:, start:start + size].reshape(b, size * k)
    keep = level > score_threshold
    top, flat = jax.lax.top_k(jnp.where(keep, level, -1.0), min(pre_nms_top_k, size * k))
    anchor_idx = start + flat // k
    deltas = jnp.take_along_axis(bbox_regression, anchor_idx[..., None], axis=1)
    boxes = coder.decode(deltas.astype(jnp.float32), anchors[anchor_idx])
    boxes = clip(boxes, height[:, None], width[:, None])
    parts.append((boxes, top, (flat % k).astype(jnp.int32), top > score_threshold))
    start += size
  boxes, top, classes, valid = (jnp.concatenate(p, axis=1) for p in zip(*parts, strict=True))
  return _finish(boxes, top, classes, valid, iou_threshold=iou_threshold,
                 max_detections=max_detections)


def softmax_detections(cls_logits, bbox_regression, anchors, *, image_size, coder=None,
                       score_threshold: float = 0.01, pre_nms_top_k: int = 400,
                       iou_threshold: float = 0.45, max_detections: int = 200):
  """Detections of SSD's softmax head (column 0 = background): boxes decoded with `coder`
  (DeltaCoder(SSD_WEIGHTS) by default) and clipped, the top `pre_nms_top_k` anchors of each
  foreground class above the threshold, then class-aware NMS."""
  b, n, c = cls_logits.shape
  coder = coder or DeltaCoder(SSD_WEIGHTS)
  anchors = jnp.asarray(anchors, jnp.float32)
  height, width = _image_hw(image_size, b)
  boxes = coder.decode(bbox_regression.astype(jnp.float32), anchors[None])
  boxes = clip(boxes, height[:, None], width[:, None])
  scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[..., 1:]  # [B, N, C - 1]
  per_class = jnp.swapaxes(scores, 1, 2)  # [B, C - 1, N]
  keep = per_class > score_threshold
  top, idx = jax.lax.top_k(jnp.where(keep, per_class, -1.0), min(pre_nms_top_k, n))
  kk = idx.shape[-1]
  classes = jnp.broadcast_to(jnp.arange(c - 1, dtype=jnp.int32)[None, :, None], idx.shape)
  flat_idx = idx.reshape(b, (c - 1) * kk)
  cand = jnp.take_along_axis(boxes, flat_idx[..., None], axis=1)
  return _finish(cand, top.reshape(b, -1), classes.reshape(b, -1),
                 (top > score_threshold).reshape(b, -1), iou_threshold=iou_threshold,
                 max_detections=max_detections)


def fcos_detections(cls_logits, bbox_regression, ctrness, anchors, level_sizes, *, image_size,
                    score_threshold: float = 0.2, pre_nms_top_k: int = 1000,
                    iou_threshold: float = 0.6, max_detections: int = 100):
  """FCOS's detections with torchvision's defaults (LTRB coder, centerness-weighted scores)."""
  return sigmoid_detections(
      cls_logits, bbox_regression, anchors, level_sizes, image_size=image_size,
      coder=LTRBCoder(normalize_by_size=True), ctrness=ctrness, score_threshold=score_threshold,
      pre_nms_top_k=pre_nms_top_k, iou_threshold=iou_threshold, max_detections=max_detections)


def to_original(detections, scale, offset, orig_size=None):
  """`detections` with boxes mapped from the transformed image to original-image pixels (the
  batch's `scale` / `offset` [B, 2], see boxes.to_original) and clipped to `orig_size`
  [B, 2] (H, W) when given; invalid slots stay zero."""
  boxes = boxes_to_original(detections["boxes"], scale[:, None, :], offset[:, None, :])
  if orig_size is not None:
    hw = jnp.asarray(orig_size, jnp.float32)
    boxes = clip(boxes, hw[:, None, 0], hw[:, None, 1])
  boxes = jnp.where(detections["valid"][..., None], boxes, 0.0)
  return {**detections, "boxes": boxes}
