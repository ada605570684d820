"""Box formats, areas, IoU / GIoU and clipping.

Boxes are [..., 4] arrays in one of three formats: 'xyxy' (x1, y1, x2, y2: corners, the
library's working format), 'xywh' (x1, y1, width, height: COCO's) and 'cxcywh' (center, width,
height). Coordinates are continuous pixels: a box (0, 0, 2, 1) covers two pixels of row 0.

Every function works on NumPy arrays (host code, returning NumPy) and on JAX arrays (device
code, jit-able, returning JAX) alike: the array module is taken from the input.
"""

from __future__ import annotations

import numpy as np

FORMATS = ("xyxy", "xywh", "cxcywh")


def array_module(*arrays):
  """numpy when every input is a NumPy array (or scalar), else jax.numpy."""
  if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays):
    return np
  import jax.numpy as jnp

  return jnp


def _unstack(boxes):
  return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def convert(boxes, source: str, target: str):
  """`boxes` [..., 4] converted from format `source` to format `target`."""
  for fmt in (source, target):
    if fmt not in FORMATS:
      raise ValueError(f"box format {fmt!r}: choose one of {', '.join(FORMATS)}")
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [..., 4], got shape {tuple(boxes.shape)}")
  if source == target:
    return boxes
  xp = array_module(boxes)
  a, b, c, d = _unstack(boxes)
  if source == "xywh":
    x1, y1, x2, y2 = a, b, a + c, b + d
  elif source == "cxcywh":
    x1, y1, x2, y2 = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
  else:
    x1, y1, x2, y2 = a, b, c, d
  if target == "xywh":
    out = (x1, y1, x2 - x1, y2 - y1)
  elif target == "cxcywh":
    out = ((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1)
  else:
    out = (x1, y1, x2, y2)
  return xp.stack(out, axis=-1)


def area(boxes):
  """Areas [...] of xyxy boxes [..., 4] (0 for empty or inverted boxes)."""
  xp = array_module(boxes)
  x1, y1, x2, y2 = _unstack(boxes)
  return xp.maximum(x2 - x1, 0) * xp.maximum(y2 - y1, 0)


def _intersection(a, b, xp):
  # a and b broadcast against each other: [..., 4] each.
  w = xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0])
  h = xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1])
  return xp.maximum(w, 0) * xp.maximum(h, 0)


def _enclosing_area(a, b, xp):
  w = xp.maximum(a[..., 2], b[..., 2]) - xp.minimum(a[..., 0], b[..., 0])
  h = xp.maximum(a[..., 3], b[..., 3]) - xp.minimum(a[..., 1], b[..., 1])
  return w * h


def _safe_divide(num, den, xp):
  # 0 where the denominator is 0 (two empty boxes): no NaN reaches a gradient or a matcher.
  ok = den > 0
  return xp.where(ok, num / xp.where(ok, den, 1), 0)


def elementwise_iou(boxes1, boxes2):
  """IoU [...] of corresponding xyxy boxes (shapes broadcast); 0 when both are empty."""
  xp = array_module(boxes1, boxes2)
  inter = _intersection(boxes1, boxes2, xp)
  union = area(boxes1) + area(boxes2) - inter
  return _safe_divide(inter, union, xp)


def elementwise_giou(boxes1, boxes2):
  """Generalized IoU [...] (Rezatofighi et al. 2019) of corresponding xyxy boxes, in [-1, 1]."""
  xp = array_module(boxes1, boxes2)
  inter = _intersection(boxes1, boxes2, xp)
  union = area(boxes1) + area(boxes2) - inter
  enclosing = _enclosing_area(boxes1, boxes2, xp)
  return _safe_divide(inter, union, xp) - _safe_divide(enclosing - union, enclosing, xp)


def pairwise_iou(boxes1, boxes2):
  """IoU [N, M] of every xyxy box of boxes1 [N, 4] with every box of boxes2 [M, 4]."""
  return elementwise_iou(boxes1[:, None, :], boxes2[None, :, :])


def pairwise_giou(boxes1, boxes2):
  """Generalized IoU [N, M] of every box of boxes1 [N, 4] with every box of boxes2 [M, 4]."""
  return elementwise_giou(boxes1[:, None, :], boxes2[None, :, :])


def clip(boxes, height, width):
  """xyxy boxes clipped to the image [0, width] x [0, height] (torchvision's
  clip_boxes_to_image); `height`/`width` are scalars or arrays broadcasting to [...]."""
  xp = array_module(boxes)
  x1, y1, x2, y2 = _unstack(boxes)
  return xp.stack([
      xp.clip(x1, 0, width), xp.clip(y1, 0, height), xp.clip(x2, 0, width), xp.clip(y2, 0, height)
  ], axis=-1)


def is_nonempty(boxes, min_size: float = 0.0):
  """[...] True where an xyxy box is wider and taller than `min_size`."""
  return ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)


def to_original(boxes, scale, offset):
  """xyxy boxes of a transformed image mapped back to the original image's pixels.

  The data transform maps an original point p to `p * scale + offset` (per axis, x then y;
  scale [..., 2] and offset [..., 2] broadcast against boxes [..., 4]). A negative scale (a
  horizontal flip) swaps the two corners, which are put back in order.
  """
  xp = array_module(boxes, scale, offset)
  s = xp.concatenate([scale, scale], axis=-1)
  o = xp.concatenate([offset, offset], axis=-1)
  back = (boxes - o) / s
  x = xp.stack([back[..., 0], back[..., 2]], axis=-1)
  y = xp.stack([back[..., 1], back[..., 3]], axis=-1)
  return xp.stack([x.min(-1), y.min(-1), x.max(-1), y.max(-1)], axis=-1)
