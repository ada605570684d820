"""Instance masks on device: pasting mask-head outputs into the image, and COCO's mask IoU.

    probs = paste_mask_probs(mask_probs, boxes, (H, W))    # [B, D, H, W] float32
    masks = paste_masks(mask_probs, boxes, (H, W))         # [B, D, H, W] bool (probs > 0.5)
    ious = mask_ious(masks, gt_masks, gt_crowd)            # [B, D, M] float32

Pasting is torchvision's `paste_masks_in_image`: the m x m mask is padded by one pixel of zeros
(m + 2 square), the box is widened about its centre by (m + 2) / m so the padded mask keeps its
scale, the widened corners are cut to integers (toward zero, as a cast), the padded mask is
resized bilinearly (align_corners=False) to the integer box's (h, w) = (y1 - y0 + 1, x1 - x0 + 1)
and pasted with its top-left pixel at (y0, x0), cut by the image. torchvision resizes each mask
to its own box size, a shape known only at run time; here every image pixel samples the padded
mask instead, with the resize's own source coordinates. Bilinear sampling is separable, so the
pixels of a box are one [H, m+2] x [m+2, m+2] x [m+2, W] matrix product per detection: static
shapes, jit-able, and cheap on accelerators. `paste_masks_numpy` is the same math in NumPy, one
detection at a time, for host-side use at the original image resolution.

Mask IoU is pycocotools' (maskUtils.iou): intersection over union, or over the detection's own
area for a crowd ground truth, 0 when the masks do not meet. Intersections and areas are pixel
counts from one matrix product of the flattened masks (`mask_overlaps`, exact integers);
`mask_ious` divides in float32 on device. pycocotools divides in double precision, and the IoU
thresholds 0.5:0.05:0.95 are met exactly by ratios such as 3/5, where float32 rounding can flip
a match: evaluation gathers the counts and divides with `ious_from_overlaps` in float64 on the
host (jaxvision.detection.coco_eval.ious_from_padded).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PADDING = 1  # torchvision's expand_masks padding, in mask pixels


def _image_hw(image_hw: Sequence[int]) -> tuple[int, int]:
  if len(image_hw) != 2 or any(int(v) < 1 for v in image_hw):
    raise ValueError(f"paste_masks: image_hw={tuple(image_hw)} must be (H, W) >= 1")
  return int(image_hw[0]), int(image_hw[1])


def paste_corners(xp, boxes, mask_size: int):
  """Integer (x0, y0, x1, y1) [..., 4] of torchvision's expand_boxes by (m + 2) / m, cast toward
  zero, of float xyxy `boxes` [..., 4] (float32 arithmetic, as torchvision's)."""
  boxes = xp.asarray(boxes, xp.float32)
  scale = xp.float32((mask_size + 2 * PADDING) / mask_size)
  half_w = (boxes[..., 2] - boxes[..., 0]) * xp.float32(0.5) * scale
  half_h = (boxes[..., 3] - boxes[..., 1]) * xp.float32(0.5) * scale
  cx = (boxes[..., 2] + boxes[..., 0]) * xp.float32(0.5)
  cy = (boxes[..., 3] + boxes[..., 1]) * xp.float32(0.5)
  expanded = xp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
  return expanded.astype(xp.int32)  # a float -> int cast truncates toward zero, as .to(int64)


def axis_weights(xp, low, high, length: int, size: int):
  """[..., length, size] bilinear weights (align_corners=False) that resize `size` samples of
  the padded mask onto the pixels low..high (integer arrays [...]) of an axis of `length`
  pixels; rows of pixels outside low..high or the image are 0."""
  low, high = low[..., None], high[..., None]
  out_size = xp.maximum(high - low + 1, 1)
  pixel = xp.arange(length, dtype=xp.int32)
  local = pixel - low
  inside = (local >= 0) & (pixel <= high)
  # torch's area_pixel_compute_source_index in float32: scale * (dst + 0.5) - 0.5, at least 0.
  scale = xp.float32(size) / out_size.astype(xp.float32)
  source = xp.maximum(scale * (local.astype(xp.float32) + xp.float32(0.5)) - xp.float32(0.5),
                      xp.float32(0.0))
  first = xp.minimum(xp.floor(source).astype(xp.int32), size - 1)
  second = first + (first < size - 1).astype(xp.int32)
  frac = xp.clip(source - first.astype(xp.float32), 0.0, 1.0)
  taps = xp.arange(size, dtype=xp.int32)
  weights = ((taps == first[..., None]) * (1 - frac)[..., None]
             + (taps == second[..., None]) * frac[..., None])
  return xp.where(inside[..., None], weights, 0.0).astype(xp.float32)


def _padded(xp, mask_probs):
  pad = [(0, 0)] * (mask_probs.ndim - 2) + [(PADDING, PADDING)] * 2
  return xp.pad(xp.asarray(mask_probs, xp.float32), pad)


def _check_shapes(mask_probs, boxes, where: str):
  if mask_probs.ndim < 3 or mask_probs.shape[-1] != mask_probs.shape[-2]:
    raise ValueError(f"{where}: mask_probs {tuple(mask_probs.shape)} must be [..., m, m]")
  if tuple(boxes.shape) != tuple(mask_probs.shape[:-2]) + (4,):
    raise ValueError(f"{where}: boxes {tuple(boxes.shape)} must be "
                     f"{tuple(mask_probs.shape[:-2]) + (4,)} for mask_probs "
                     f"{tuple(mask_probs.shape)}")


def paste_mask_probs(mask_probs: jax.Array, boxes: jax.Array, image_hw: Sequence[int]
                     ) -> jax.Array:
  """[B, D, H, W] float32: mask probabilities [B, D, m, m] pasted into an H x W image at their
  xyxy `boxes` [B, D, 4] (pixels of that image), as torchvision's paste_masks_in_image."""
  _check_shapes(mask_probs, boxes, "paste_masks")
  return _paste(mask_probs, boxes, *_image_hw(image_hw))


# Compiled once per shape even when called outside jit: op by op, the weight construction would
# dispatch (and compile) dozens of small programs.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _paste(mask_probs, boxes, height: int, width: int):
  m = mask_probs.shape[-1]
  corners = paste_corners(jnp, boxes, m)
  rows = axis_weights(jnp, corners[..., 1], corners[..., 3], height, m + 2 * PADDING)
  cols = axis_weights(jnp, corners[..., 0], corners[..., 2], width, m + 2 * PADDING)
  padded = _padded(jnp, mask_probs)
  highest = jax.lax.Precision.HIGHEST  # probabilities, not a TF32 / bf16 approximation
  half = jnp.einsum("...yi,...ij->...yj", rows, padded, precision=highest)
  return jnp.einsum("...yj,...xj->...yx", half, cols, precision=highest)


def paste_masks(mask_probs: jax.Array, boxes: jax.Array, image_hw: Sequence[int], *,
                threshold: float = 0.5, valid: jax.Array | None = None) -> jax.Array:
  """[B, D, H, W] bool: the pasted probabilities (paste_mask_probs) above `threshold`; rows of
  detections that are not `valid` [B, D] are empty."""
  masks = paste_mask_probs(mask_probs, boxes, image_hw) > threshold
  if valid is not None:
    masks = masks & jnp.asarray(valid, bool)[..., None, None]
  return masks


def paste_masks_numpy(mask_probs: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int], *,
                      threshold: float | None = 0.5) -> np.ndarray:
  """The host twin of paste_masks for one image: mask_probs [D, m, m], boxes [D, 4] xyxy in
  pixels of the H x W image -> bool [D, H, W] (float32 probabilities when threshold is None),
  one detection at a time so a large original image needs only one [H, W] plane per mask."""
  mask_probs, boxes = np.asarray(mask_probs), np.asarray(boxes)
  _check_shapes(mask_probs, boxes, "paste_masks_numpy")
  height, width = _image_hw(image_hw)
  m = mask_probs.shape[-1]
  corners = paste_corners(np, boxes.reshape(-1, 4), m)
  padded = _padded(np, mask_probs.reshape(-1, m, m))
  out = np.zeros((len(corners), height, width), np.float32 if threshold is None else bool)
  for d, (x0, y0, x1, y1) in enumerate(corners):
    # Only the rows and columns the box reaches are computed; the rest stays 0.
    top, bottom = max(int(y0), 0), min(int(y1) + 1, height)
    left, right = max(int(x0), 0), min(int(x1) + 1, width)
    if bottom <= top or right <= left:
      continue
    rows = axis_weights(np, np.int32(y0), np.int32(y1), height, m + 2 * PADDING)[top:bottom]
    cols = axis_weights(np, np.int32(x0), np.int32(x1), width, m + 2 * PADDING)[left:right]
    probs = rows @ padded[d] @ cols.T
    out[d, top:bottom, left:right] = probs if threshold is None else probs > threshold
  return out.reshape(mask_probs.shape[:-2] + (height, width))


def mask_overlaps(pred: jax.Array, gt: jax.Array):
  """(intersections int32 [B, D, M], pred areas int32 [B, D], gt areas int32 [B, M]) in pixels of
  bool masks pred [B, D, H, W] and gt [B, M, H, W], from one matrix product."""
  if pred.ndim != 4 or gt.ndim != 4 or pred.shape[0] != gt.shape[0] or (
      pred.shape[2:] != gt.shape[2:]):
    raise ValueError(f"mask_overlaps: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must be "
                     "[B, D, H, W] and [B, M, H, W]")
  b, d, h, w = pred.shape
  # 0/1 values are exact in bfloat16 and the products accumulate in float32: exact counts up to
  # 2**24 pixels (a 4096 x 4096 image), at the accelerators' fastest matrix rate.
  p = pred.reshape(b, d, h * w).astype(jnp.bfloat16)
  g = gt.reshape(b, gt.shape[1], h * w).astype(jnp.bfloat16)
  inter = jnp.einsum("bdp,bmp->bdm", p, g, preferred_element_type=jnp.float32)
  return (inter.astype(jnp.int32), pred.reshape(b, d, -1).sum(-1, dtype=jnp.int32),
          gt.reshape(b, gt.shape[1], -1).sum(-1, dtype=jnp.int32))


def ious_from_overlaps(inter, pred_area, gt_area, gt_crowd, xp=np):
  """[..., D, M] COCO mask IoU from pixel counts (mask_overlaps): inter / union, inter / the
  detection's area for crowd gts [..., M], 0 without intersection; float64 with NumPy (as
  pycocotools), float32 with jax.numpy."""
  dtype = xp.float64 if xp is np else xp.float32
  inter = xp.asarray(inter).astype(dtype)
  pred_area = xp.asarray(pred_area).astype(dtype)[..., :, None]
  gt_area = xp.asarray(gt_area).astype(dtype)[..., None, :]
  crowd = xp.asarray(gt_crowd).astype(bool)[..., None, :]
  denominator = xp.where(crowd, pred_area, pred_area + gt_area - inter)
  return xp.where(inter > 0, inter / xp.maximum(denominator, 1), 0.0).astype(dtype)


def mask_ious(pred: jax.Array, gt: jax.Array, gt_crowd: jax.Array) -> jax.Array:
  """[B, D, M] float32 COCO mask IoU of bool masks pred [B, D, H, W] and gt [B, M, H, W], gt_crowd
  [B, M] (intersection over the detection's area for crowd gts)."""
  return ious_from_overlaps(*mask_overlaps(pred, gt), gt_crowd, xp=jnp)
