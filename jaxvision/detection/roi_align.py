"""RoIAlign on device with static shapes, equal to `torchvision.ops.roi_align`.

The two-stage (R-CNN) detectors crop a fixed-size feature patch per proposal before their box
and mask heads: RoIAlign divides each box into `output_size` bins and averages a
`sampling_ratio x sampling_ratio` grid of bilinear samples in every bin, so the crop is a smooth
function of the box coordinates (unlike RoIPool's rounding). torchvision's heads use it through
MultiScaleRoIAlign with sampling_ratio=2 and aligned=False; aligned=True moves the box by half a
pixel so that pixel centres, not corners, sit at integer coordinates (detectron2's convention).

Layout is NHWC: `features` [N, H, W, C], `boxes` [K, 4] xyxy in input-image pixels (multiplied by
`spatial_scale` to reach the feature map), `box_indices` [K] naming each box's image. All K boxes,
their bins and their samples are computed at once by one gather of the four bilinear corners, so
the function jits with static shapes. The border rules are torchvision's compiled kernel's: a
sample more than one pixel outside the map ([-1, H] x [-1, W]) contributes 0, one within that
margin is clamped onto the map.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _axis_weights(coord: jax.Array, size: int):
  """Low/high indices and their bilinear weights for sample coordinates along one axis."""
  # The kernel drops a sample beyond one pixel of margin; the mask folds that into its weights
  # so the gather itself never needs a condition.
  inside = ((coord >= -1.0) & (coord <= size)).astype(coord.dtype)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  # At the last row/column both corners are the edge pixel, so the sample is that pixel's value.
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac = jnp.where(at_edge, 0.0, coord - low.astype(coord.dtype))
  return low, high, (1.0 - frac) * inside, frac * inside


def _sample_coords(start: jax.Array, extent: jax.Array, bins: int, samples: int) -> jax.Array:
  """[K, bins, samples] sample positions: the centres of a samples-wide grid in every bin."""
  bin_size = extent / bins
  b = jnp.arange(bins, dtype=start.dtype)
  s = jnp.arange(samples, dtype=start.dtype) + 0.5
  return (start[:, None, None] + b[None, :, None] * bin_size[:, None, None]
          + s[None, None, :] * (bin_size / samples)[:, None, None])


def roi_align(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
              output_size: int | Sequence[int], *, spatial_scale: float | jax.Array = 1.0,
              sampling_ratio: int = 2, aligned: bool | jax.Array = True) -> jax.Array:
  """Bilinear RoIAlign crops [K, out_h, out_w, C] of NHWC `features` at xyxy `boxes` [K, 4].

  `box_indices` [K] (int) picks each box's image. `output_size` is an int or (out_h, out_w).
  Boxes are in input-image pixels and multiplied by `spatial_scale` (e.g. 1/16 for a stride-16
  map). Each bin averages `sampling_ratio`^2 bilinear samples. aligned=True shifts the scaled
  box by -0.5 pixel; aligned=False instead clamps box width and height to >= 1 pixel, as
  torchvision does. `output_size` and `sampling_ratio` set shapes and must be static under jit;
  `spatial_scale` and `aligned` only change values and may be traced.
  """
  integral = isinstance(sampling_ratio, numbers.Integral) and not isinstance(sampling_ratio, bool)
  if not integral or sampling_ratio < 1:
    raise ValueError(f"roi_align: sampling_ratio must be an int >= 1 (got {sampling_ratio!r}); "
                     "torchvision's adaptive sampling_ratio <= 0 takes a data-dependent number "
                     "of samples per box, which static shapes cannot express")
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  if features.ndim != 4:
    raise ValueError(f"roi_align: features {features.shape} must be NHWC [N, H, W, C]")
  k = boxes.shape[0]
  if boxes.shape != (k, 4) or box_indices.shape != (k,):
    raise ValueError(f"roi_align: boxes {boxes.shape} and box_indices {box_indices.shape} must "
                     "be [K, 4] and [K]")
  n, h, w, c = features.shape

  boxes = boxes.astype(jnp.float32)
  # jnp.where rather than `if`: aligned only changes values, so it may be traced like the scale.
  offset = jnp.where(aligned, 0.5, 0.0).astype(jnp.float32)
  x0, y0, x1, y1 = (boxes[:, i] * spatial_scale - offset for i in range(4))
  roi_w, roi_h = x1 - x0, y1 - y0
  # Legacy (aligned=False): degenerate boxes still cover one pixel instead of collapsing to a point.
  roi_w = jnp.where(aligned, roi_w, jnp.maximum(roi_w, 1.0))
  roi_h = jnp.where(aligned, roi_h, jnp.maximum(roi_h, 1.0))
  ys = _sample_coords(y0, roi_h, out_h, sampling_ratio)  # [K, out_h, S]
  xs = _sample_coords(x0, roi_w, out_w, sampling_ratio)  # [K, out_w, S]
  y_lo, y_hi, wy_lo, wy_hi = _axis_weights(ys, h)
  x_lo, x_hi, wx_lo, wx_hi = _axis_weights(xs, w)

  # One gather of all four corners: rows of [N*H*W, C] at [K, out_h, S, 2, out_w, S, 2], the
  # 2s being the low/high corner along y and x; the bilinear weights are a separable product.
  yi, wy = jnp.stack([y_lo, y_hi], -1), jnp.stack([wy_lo, wy_hi], -1)  # [K, out_h, S, 2]
  xi, wx = jnp.stack([x_lo, x_hi], -1), jnp.stack([wx_lo, wx_hi], -1)  # [K, out_w, S, 2]
  base = (box_indices.astype(jnp.int32) * (h * w))[:, None, None, None, None, None, None]
  index = base + yi[:, :, :, :, None, None, None] * w + xi[:, None, None, None]
  weight = wy[:, :, :, :, None, None, None] * wx[:, None, None, None]
  # Every index is on the map by construction, so "clip" (no fill masking) changes nothing and
  # compiles and runs leaner than take's default.
  values = jnp.take(features.reshape(n * h * w, c), index, axis=0, mode="clip")
  values = values.astype(jnp.float32)
  out = (weight[..., None] * values).sum(axis=(2, 3, 5, 6)) / (sampling_ratio * sampling_ratio)
  return out.astype(features.dtype)
