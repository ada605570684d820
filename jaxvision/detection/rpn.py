"""The two stages of Faster / Mask R-CNN inference on device, with static shapes.

`propose` is torchvision's RegionProposalNetwork.filter_proposals: the RPN's deltas decoded on
their anchors (BoxCoder (1, 1, 1, 1), log-size clamp log(1000 / 16)), the best
`pre_nms_top_n` anchors of every level by objectness, clipped to the image, small and
low-score boxes dropped, NMS within each level (levels never suppress each other), and the
`post_nms_top_n` best survivors. torchvision returns a variable number of proposals per image;
here every image has exactly `post_nms_top_n` slots and a valid mask (unused slots are zero
boxes with score 0), so the RoI heads run on fixed [B, P, 4] proposals.

`two_stage_detections` is RoIHeads.postprocess_detections: softmax over the classes, the
class-specific box of each (proposal, class) decoded with BoxCoder (10, 10, 5, 5) and clipped,
the background column dropped, then score threshold, small boxes removed, NMS per class and
the best `detections_per_img`. Its output is the one-stage detectors' (see postprocess.py):

    {'boxes': [B, D, 4] xyxy input pixels, 'scores': [B, D], 'classes': [B, D] int32,
     'valid': [B, D] bool}

with data classes 0..K-1 (torchvision's label - 1: its column 0 is the background).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.detection.anchors import AnchorSet
from jaxvision.detection.boxes import clip
from jaxvision.detection.coders import RETINANET_WEIGHTS, DeltaCoder
from jaxvision.detection.nms import batched_nms
from jaxvision.detection.postprocess import _finish, _image_hw

RPN_CODER = DeltaCoder(RETINANET_WEIGHTS)  # torchvision's RPN BoxCoder (1, 1, 1, 1)
BOX_HEAD_CODER = DeltaCoder((10.0, 10.0, 5.0, 5.0))  # torchvision's RoIHeads BoxCoder


def _large_enough(boxes, min_size: float):
  """torchvision's remove_small_boxes as a mask: both sides at least `min_size`."""
  return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1])
                                                          >= min_size)


def propose(objectness, deltas, anchors: AnchorSet, image_hw, *, pre_nms_top_n: int,
            post_nms_top_n: int, nms_thresh: float = 0.7, min_size: float = 1e-3,
            score_thresh: float = 0.0):
  """RPN proposals (boxes [B, P, 4], sigmoid scores [B, P], valid [B, P]), P = post_nms_top_n,
  from objectness logits [B, A] and deltas [B, A, 4] over `anchors` (A of them, in level
  order) of an `image_hw` ((H, W) or [B, 2]) input. No gradient flows through them, as in
  torchvision, whose second stage takes the proposals as constants."""
  b, a = objectness.shape
  if deltas.shape != (b, a, 4):
    raise ValueError(f"propose: deltas {deltas.shape} must be [B, A, 4] for objectness "
                     f"{objectness.shape}")
  if len(anchors) != a:
    raise ValueError(f"propose: {len(anchors)} anchors for {a} objectness values per image")
  if pre_nms_top_n < 1 or post_nms_top_n < 1:
    raise ValueError(f"propose: pre_nms_top_n={pre_nms_top_n} and post_nms_top_n="
                     f"{post_nms_top_n} must be >= 1")
  objectness = jax.lax.stop_gradient(objectness.astype(jnp.float32))
  deltas = jax.lax.stop_gradient(deltas.astype(jnp.float32))
  anchor_boxes = jnp.asarray(anchors.boxes, jnp.float32)
  logits, indices, levels, start = [], [], [], 0
  for level, size in enumerate(anchors.level_sizes):
    top, idx = jax.lax.top_k(objectness[:, start:start + size], min(pre_nms_top_n, size))
    logits.append(top)
    indices.append(idx + start)
    levels.append(np.full(top.shape[1], level, np.int32))
    start += size
  logits, indices = jnp.concatenate(logits, 1), jnp.concatenate(indices, 1)
  boxes = RPN_CODER.decode(jnp.take_along_axis(deltas, indices[..., None], axis=1),
                           anchor_boxes[indices])
  height, width = _image_hw(image_hw, b)
  boxes = clip(boxes, height[:, None], width[:, None])
  scores = jax.nn.sigmoid(logits)
  keep = _large_enough(boxes, min_size) & (scores >= score_thresh)
  level_of = jnp.broadcast_to(jnp.asarray(np.concatenate(levels)), scores.shape)
  picked, kept = batched_nms(boxes, scores, iou_threshold=nms_thresh, max_outputs=post_nms_top_n,
                             classes=level_of, valid=keep)
  take = jax.vmap(lambda values, i: values[i])
  return (jnp.where(kept[..., None], take(boxes, picked), 0.0),
          jnp.where(kept, take(scores, picked), 0.0), kept)


def two_stage_detections(class_logits, box_regression, rois, roi_valid, image_hw, *,
                         score_thresh: float, nms_thresh: float, detections_per_img: int,
                         min_size: float = 1e-2):
  """Detections of the box head: class_logits [B, R, C] (column 0 = background),
  box_regression [B, R, C * 4] on rois [B, R, 4] (those with roi_valid [B, R] False are never
  kept), for an `image_hw` ((H, W) or [B, 2]) input; see the module docstring."""
  b, r, c = class_logits.shape
  if box_regression.shape != (b, r, c * 4):
    raise ValueError(f"two_stage_detections: box_regression {box_regression.shape} must be "
                     f"[B, R, C * 4] for class_logits {class_logits.shape}")
  if rois.shape != (b, r, 4) or roi_valid.shape != (b, r):
    raise ValueError(f"two_stage_detections: rois {rois.shape} and roi_valid {roi_valid.shape} "
                     f"must be [{b}, {r}, 4] and [{b}, {r}]")
  if c < 2:
    raise ValueError(f"two_stage_detections: {c} classes; the background needs one more")
  deltas = box_regression.astype(jnp.float32).reshape(b, r, c, 4)
  boxes = BOX_HEAD_CODER.decode(deltas, rois.astype(jnp.float32)[:, :, None, :])
  height, width = _image_hw(image_hw, b)
  boxes = clip(boxes, height[:, None, None], width[:, None, None])[:, :, 1:]
  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :, 1:]
  classes = jnp.broadcast_to(jnp.arange(c - 1, dtype=jnp.int32), scores.shape)
  valid = roi_valid[:, :, None] & (scores > score_thresh) & _large_enough(boxes, min_size)
  n = r * (c - 1)
  return _finish(boxes.reshape(b, n, 4), scores.reshape(b, n), classes.reshape(b, n),
                 valid.reshape(b, n), iou_threshold=nms_thresh,
                 max_detections=detections_per_img)
