"""Box coders: what a detector's regression head predicts relative to its anchors.

`DeltaCoder` is the Faster R-CNN / SSD / RetinaNet parametrisation (torchvision's `BoxCoder`):
center offsets in units of the anchor's size and log size ratios, each multiplied by a weight
(SSD (10, 10, 5, 5), RetinaNet (1, 1, 1, 1)); decoding clamps the log ratios at log(1000 / 16)
so exp() cannot overflow. `LTRBCoder` is FCOS's (torchvision's `BoxLinearCoder`): distances
from the anchor's center to the box's left, top, right and bottom sides, divided by the anchor's
size. Both work on NumPy and JAX arrays and broadcast over leading dimensions.
"""

from __future__ import annotations

import dataclasses
import math

from jaxvision.detection.boxes import array_module

DEFAULT_CLAMP = math.log(1000.0 / 16)  # torchvision's bbox_xform_clip
SSD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
RETINANET_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def _center_size(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


@dataclasses.dataclass(frozen=True)
class DeltaCoder:
  """(dx, dy, dw, dh) deltas of xyxy boxes relative to xyxy anchors.

  Attributes:
    weights: multipliers of (dx, dy, dw, dh) when encoding (divisors when decoding).
    clamp: largest dw / dh used when decoding (after dividing by the weights).
  """

  weights: tuple[float, float, float, float] = RETINANET_WEIGHTS
  clamp: float = DEFAULT_CLAMP

  def encode(self, boxes, anchors):
    """Deltas [..., 4] that move `anchors` [..., 4] onto `boxes` [..., 4]."""
    xp = array_module(boxes, anchors)
    wx, wy, ww, wh = self.weights
    ax, ay, aw, ah = _center_size(anchors)
    bx, by, bw, bh = _center_size(boxes)
    return xp.stack([
        wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * xp.log(bw / aw), wh * xp.log(bh / ah)
    ], axis=-1)

  def decode(self, deltas, anchors):
    """xyxy boxes [..., 4] from `deltas` [..., 4] relative to `anchors` [..., 4]."""
    xp = array_module(deltas, anchors)
    anchors = anchors.astype(deltas.dtype)
    wx, wy, ww, wh = self.weights
    ax, ay, aw, ah = _center_size(anchors)
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = xp.minimum(deltas[..., 2] / ww, self.clamp)
    dh = xp.minimum(deltas[..., 3] / wh, self.clamp)
    cx, cy = dx * aw + ax, dy * ah + ay
    half_w, half_h = 0.5 * xp.exp(dw) * aw, 0.5 * xp.exp(dh) * ah
    return xp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


@dataclasses.dataclass(frozen=True)
class LTRBCoder:
  """(left, top, right, bottom) distances from the anchors' centers to the boxes' sides.

  Attributes:
    normalize_by_size: divide the distances by the anchor's width / height (FCOS: True, so a
      level's regression targets are in units of its stride).
  """

  normalize_by_size: bool = True

  def encode(self, boxes, anchors):
    """Distances [..., 4] from the centers of `anchors` to the sides of `boxes`."""
    xp = array_module(boxes, anchors)
    cx = 0.5 * (anchors[..., 0] + anchors[..., 2])
    cy = 0.5 * (anchors[..., 1] + anchors[..., 3])
    out = xp.stack([cx - boxes[..., 0], cy - boxes[..., 1], boxes[..., 2] - cx,
                    boxes[..., 3] - cy], axis=-1)
    if self.normalize_by_size:
      out = out / _sizes(anchors, xp)
    return out

  def decode(self, distances, anchors):
    """xyxy boxes [..., 4] from `distances` [..., 4] to the sides, around `anchors`' centers."""
    xp = array_module(distances, anchors)
    anchors = anchors.astype(distances.dtype)
    if self.normalize_by_size:
      distances = distances * _sizes(anchors, xp)
    cx = 0.5 * (anchors[..., 0] + anchors[..., 2])
    cy = 0.5 * (anchors[..., 1] + anchors[..., 3])
    return xp.stack([cx - distances[..., 0], cy - distances[..., 1], cx + distances[..., 2],
                     cy + distances[..., 3]], axis=-1)


def _sizes(anchors, xp):
  w = anchors[..., 2] - anchors[..., 0]
  h = anchors[..., 3] - anchors[..., 1]
  return xp.stack([w, h, w, h], axis=-1)
