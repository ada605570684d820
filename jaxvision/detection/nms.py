"""Non-maximum suppression on device, with static shapes.

Greedy NMS keeps boxes in descending score order and suppresses every remaining box whose IoU
with a kept one is above the threshold (`torchvision.ops.nms`: IoU > threshold suppresses).
Its first D kept boxes are decided by the first D picks alone, so `nms` runs exactly D steps,
each picking the best box still alive and suppressing its neighbours: O(D x N) work and O(N)
memory, whatever N (SSD's 90 classes x 400 candidates included). With `classes`, boxes of
different classes never suppress each other (torchvision's batched_nms). Equal scores are
taken in index order, so results are deterministic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvision.detection.boxes import elementwise_iou


def nms(boxes, scores, *, iou_threshold: float, max_outputs: int, classes=None, valid=None):
  """Greedy (per-class with `classes`) NMS of one image's boxes [N, 4] xyxy and scores [N].

  Returns (indices [max_outputs] int32 into the N boxes, in descending score order; valid
  [max_outputs] bool, False for the slots left when fewer boxes survive). Boxes with
  `valid` False (e.g. below a score threshold) are never kept.
  """
  n = boxes.shape[0]
  if boxes.shape != (n, 4) or scores.shape != (n,):
    raise ValueError(f"nms: boxes {boxes.shape} and scores {scores.shape} must be [N, 4], [N]")
  boxes = boxes.astype(jnp.float32)
  alive = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  alive = alive & ~jnp.isnan(scores)
  scores = scores.astype(jnp.float32)

  def step(alive, _):
    masked = jnp.where(alive, scores, -jnp.inf)
    best = jnp.argmax(masked).astype(jnp.int32)
    found = alive[best]
    iou = elementwise_iou(boxes, boxes[best][None, :])
    suppress = iou > iou_threshold
    if classes is not None:
      suppress = suppress & (classes == classes[best])
    # Once nothing is alive the mask stays all False and every later slot is invalid.
    return alive & ~suppress & (jnp.arange(n) != best), (best, found)

  _, (indices, kept) = jax.lax.scan(step, alive, None, length=max_outputs)
  return indices, kept


def batched_nms(boxes, scores, *, iou_threshold: float, max_outputs: int, classes=None,
                valid=None):
  """`nms` over a batch: boxes [B, N, 4], scores [B, N], classes / valid [B, N] or None;
  returns indices [B, max_outputs] and valid [B, max_outputs]."""
  def one(b, s, c, v):
    return nms(b, s, iou_threshold=iou_threshold, max_outputs=max_outputs, classes=c, valid=v)

  return jax.vmap(one, in_axes=(0, 0, None if classes is None else 0,
                                None if valid is None else 0))(boxes, scores, classes, valid)
