"""RoIAlign on device with static shapes, equal to `torchvision.ops.roi_align`, and the
multi-level form the R-CNN heads use (`multiscale_roi_align`, torchvision's MultiScaleRoIAlign).

The two-stage (R-CNN) detectors crop a fixed-size feature patch per proposal before their box
and mask heads: RoIAlign divides each box into `output_size` bins and averages a
`sampling_ratio x sampling_ratio` grid of bilinear samples in every bin, so the crop is a smooth
function of the box coordinates (unlike RoIPool's rounding). torchvision's heads use it through
MultiScaleRoIAlign with sampling_ratio=2 and aligned=False; aligned=True moves the box by half a
pixel so that pixel centres, not corners, sit at integer coordinates (detectron2's convention).

Layout is NHWC: `features` [N, H, W, C], `boxes` [K, 4] xyxy in input-image pixels (multiplied by
`spatial_scale` to reach the feature map), `box_indices` [K] naming each box's image. The border
rules are torchvision's compiled kernel's: a sample more than one pixel outside the map
([-1, H] x [-1, W]) contributes 0, one within that margin is clamped onto the map.

Memory: the bilinear weight of a sample's corner is a product (weight along y) x (weight along
x), so the crop is a sum of 4 * S^2 terms (S samples and 2 corners per axis), each one gather of
[K, out_h, out_w, C] rows scaled by its [K, out_h, out_w] weight. Summing term by term never
holds more than a few crops, where one gather of all samples and corners at once would hold
[K, out_h, S, 2, out_w, S, 2, C] (4 S^2 crops: 1.6 GB for 512 RoIs of 14 x 14 x 256). As in
torchvision, no gradient flows to the boxes, only to the features.

`multiscale_roi_align` flattens the pyramid into one [sum_l N * H_l * W_l, C] table and gives
every box the offset, size and scale of its own level, so all boxes of all levels are cropped
by the same gathers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's LevelMapper (FPN paper, eq. 1): a 224 x 224 box goes to level 4.
CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6


def _axis_weights(coord: jax.Array, size: jax.Array):
  """Low/high indices and their bilinear weights for sample coordinates along one axis, on maps
  of `size` pixels along it (broadcast against `coord`)."""
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
  return (low, high), ((1.0 - frac) * inside, frac * inside)


def _sample_coords(start: jax.Array, extent: jax.Array, bins: int, samples: int) -> jax.Array:
  """[K, bins, samples] sample positions: the centres of a samples-wide grid in every bin."""
  bin_size = extent / bins
  b = jnp.arange(bins, dtype=start.dtype)
  s = jnp.arange(samples, dtype=start.dtype) + 0.5
  return (start[:, None, None] + b[None, :, None] * bin_size[:, None, None]
          + s[None, None, :] * (bin_size / samples)[:, None, None])


def _check_sampling_ratio(sampling_ratio) -> None:
  integral = isinstance(sampling_ratio, numbers.Integral) and not isinstance(sampling_ratio, bool)
  if not integral or sampling_ratio < 1:
    raise ValueError(f"roi_align: sampling_ratio must be an int >= 1 (got {sampling_ratio!r}); "
                     "torchvision's adaptive sampling_ratio <= 0 takes a data-dependent number "
                     "of samples per box, which static shapes cannot express")


@jax.custom_vjp
def _weighted_gather_sum(table: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
  """sum_t weight[t, ..., None] * table[index[t]]: [T, K, h, w] indices and weights -> float32
  [K, h, w, C]. Every index is on the table by construction, so the gathers use "clip" (no fill
  masking), which compiles and runs leaner than take's default."""
  out = weight[0][..., None] * jnp.take(table, index[0], axis=0, mode="clip").astype(jnp.float32)
  for t in range(1, index.shape[0]):
    out = out + weight[t][..., None] * jnp.take(table, index[t], axis=0,
                                                mode="clip").astype(jnp.float32)
  return out


def _weighted_gather_sum_fwd(table, index, weight):
  # A [rows, 0] array keeps the table's row count and dtype without its values.
  return _weighted_gather_sum(table, index, weight), (index, weight, table[:, :0])


def _weighted_gather_sum_bwd(residuals, grad):
  # The terms scatter into the table's gradient one after the other, so only one term's
  # [K, h, w, C] update exists at a time. The weights come from boxes that get no gradient.
  index, weight, empty_table = residuals

  def add_term(table_grad, term):
    idx, w = term
    return table_grad.at[idx].add(w[..., None] * grad, mode="promise_in_bounds"), None

  zeros = jnp.zeros((empty_table.shape[0], grad.shape[-1]), jnp.float32)
  table_grad, _ = jax.lax.scan(add_term, zeros, (index, weight))
  return table_grad.astype(empty_table.dtype), None, None


_weighted_gather_sum.defvjp(_weighted_gather_sum_fwd, _weighted_gather_sum_bwd)


def _crops(table, dtype, boxes, base, height, width, scale, output_size, sampling_ratio,
           aligned):
  """Crops [K, out_h, out_w, C] from the rows of `table` [rows, C]: box k reads the map of
  height[k] x width[k] pixels starting at row base[k], at spatial scale scale[k]."""
  out_h, out_w = output_size
  s = sampling_ratio
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  # jnp.where rather than `if`: aligned only changes values, so it may be traced like the scale.
  offset = jnp.where(aligned, 0.5, 0.0).astype(jnp.float32)
  x0, y0, x1, y1 = (boxes[:, i] * scale - offset for i in range(4))
  roi_w, roi_h = x1 - x0, y1 - y0
  # Legacy (aligned=False): degenerate boxes still cover one pixel instead of collapsing to a point.
  roi_w = jnp.where(aligned, roi_w, jnp.maximum(roi_w, 1.0))
  roi_h = jnp.where(aligned, roi_h, jnp.maximum(roi_h, 1.0))
  ys = _sample_coords(y0, roi_h, out_h, s)  # [K, out_h, S]
  xs = _sample_coords(x0, roi_w, out_w, s)  # [K, out_w, S]
  y_index, y_weight = _axis_weights(ys, height[:, None, None])
  x_index, x_weight = _axis_weights(xs, width[:, None, None])
  # One term per (y sample, y corner, x sample, x corner): a [K, out_h, out_w] gather of rows
  # and its separable weight.
  index, weight = [], []
  for sy in range(s):
    for yi, wy in zip(y_index, y_weight, strict=True):
      row_start = base[:, None] + yi[:, :, sy] * width[:, None]  # [K, out_h]
      for sx in range(s):
        for xi, wx in zip(x_index, x_weight, strict=True):
          index.append(row_start[:, :, None] + xi[:, None, :, sx])  # [K, out_h, out_w]
          weight.append(wy[:, :, None, sy] * wx[:, None, :, sx])
  out = _weighted_gather_sum(table, jnp.stack(index), jnp.stack(weight))
  return (out / (s * s)).astype(dtype)


def roi_align(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
              output_size: int | Sequence[int], *, spatial_scale: float | jax.Array = 1.0,
              sampling_ratio: int = 2, aligned: bool | jax.Array = True) -> jax.Array:
  """Bilinear RoIAlign crops [K, out_h, out_w, C] of NHWC `features` at xyxy `boxes` [K, 4].

  `box_indices` [K] (int) picks each box's image. `output_size` is an int or (out_h, out_w).
  Boxes are in input-image pixels and multiplied by `spatial_scale` (e.g. 1/16 for a stride-16
  map). Each bin averages `sampling_ratio`^2 bilinear samples. aligned=True shifts the scaled
  box by -0.5 pixel; aligned=False instead clamps box width and height to >= 1 pixel, as
  torchvision does. `output_size` and `sampling_ratio` set shapes and must be static under jit;
  `spatial_scale` and `aligned` only change values and may be traced. The boxes get no
  gradient (torchvision's neither).
  """
  _check_sampling_ratio(sampling_ratio)
  out_hw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if features.ndim != 4:
    raise ValueError(f"roi_align: features {features.shape} must be NHWC [N, H, W, C]")
  k = boxes.shape[0]
  if boxes.shape != (k, 4) or box_indices.shape != (k,):
    raise ValueError(f"roi_align: boxes {boxes.shape} and box_indices {box_indices.shape} must "
                     "be [K, 4] and [K]")
  n, h, w, c = features.shape
  base = box_indices.astype(jnp.int32) * (h * w)
  full = lambda v: jnp.full((k,), v, jnp.int32)
  scale = jnp.broadcast_to(jnp.asarray(spatial_scale, jnp.float32), (k,))
  return _crops(features.reshape(n * h * w, c), features.dtype, boxes, base, full(h), full(w),
                scale, out_hw, sampling_ratio, aligned)


def pyramid_scales(map_shapes: Sequence[Sequence[int]], image_hw: Sequence[int]) -> list[float]:
  """torchvision's `_infer_scale` per level: 2^round(log2(map height / image height))."""
  scales = []
  for shape in map_shapes:
    approx = np.float32(float(shape[0]) / float(image_hw[0]))
    scales.append(float(2.0 ** float(np.round(np.log2(approx)))))
  return scales


def roi_levels(boxes: jax.Array, k_min: int, k_max: int) -> jax.Array:
  """torchvision's LevelMapper: the pyramid index (0 = level k_min) of every xyxy box [..., 4]:
  floor(4 + log2(sqrt(area) / 224) + 1e-6), clamped to [k_min, k_max]."""
  boxes = boxes.astype(jnp.float32)
  size = jnp.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
  level = jnp.floor(CANONICAL_LEVEL + jnp.log2(size / CANONICAL_SCALE) + np.float32(LEVEL_EPS))
  return (jnp.clip(level, k_min, k_max) - k_min).astype(jnp.int32)


def multiscale_roi_align(feature_maps: Sequence[jax.Array], boxes: jax.Array,
                         image_hw: Sequence[int], output_size: int | Sequence[int], *,
                         sampling_ratio: int = 2) -> jax.Array:
  """torchvision's MultiScaleRoIAlign: crops [B, R, out_h, out_w, C] of boxes [B, R, 4] (xyxy
  input pixels), each from the level LevelMapper picks for its size (canonical scale 224 at
  level 4, levels from the maps' scales, e.g. P2-P5), with aligned=False as torchvision.

  `feature_maps` are NHWC [B, H_l, W_l, C] of an `image_hw` input; each level's scale is
  inferred from its height as torchvision does (`pyramid_scales`).
  """
  _check_sampling_ratio(sampling_ratio)
  out_hw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if not feature_maps:
    raise ValueError("multiscale_roi_align: no feature maps")
  b, r = boxes.shape[:2]
  if boxes.shape != (b, r, 4):
    raise ValueError(f"multiscale_roi_align: boxes {boxes.shape} must be [B, R, 4]")
  c = feature_maps[0].shape[-1]
  for m in feature_maps:
    if m.ndim != 4 or m.shape[0] != b or m.shape[-1] != c:
      raise ValueError(f"multiscale_roi_align: feature map {m.shape} must be [{b}, H, W, {c}]")
  scales = pyramid_scales([m.shape[1:3] for m in feature_maps], image_hw)
  k_min, k_max = (int(-math.log2(scales[i])) for i in (0, -1))
  boxes = boxes.reshape(b * r, 4)
  level = roi_levels(boxes, k_min, k_max)
  if len(feature_maps) == 1:  # torchvision skips the mapper with a single map
    level = jnp.zeros_like(level)
  image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
  starts = np.cumsum([0] + [int(np.prod(m.shape[:3])) for m in feature_maps])[:-1]
  pick = lambda values: jnp.asarray(np.asarray(values, np.int32))[level]
  heights = pick([m.shape[1] for m in feature_maps])
  widths = pick([m.shape[2] for m in feature_maps])
  base = pick(starts) + image * heights * widths
  scale = jnp.asarray(np.asarray(scales, np.float32))[level]
  dtype = jnp.result_type(*(m.dtype for m in feature_maps))
  table = jnp.concatenate([m.reshape(-1, c).astype(dtype) for m in feature_maps])
  crops = _crops(table, dtype, boxes, base, heights, widths, scale, out_hw, sampling_ratio,
                 False)
  return crops.reshape(b, r, *out_hw, c)
