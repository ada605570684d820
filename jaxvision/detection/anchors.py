"""Anchors, SSD default boxes and FCOS points, generated on the host as NumPy constants.

They depend only on the input size and the feature-map sizes, so a detector computes them once
(for its static input shape) and closes over them in the jitted step. The numbers equal
torchvision's generators bit for bit: the arithmetic is done in float32 in the same order
(`AnchorGenerator` rounds its cell anchors to whole pixels; `DefaultBoxGenerator` clips the
relative widths/heights to [0, 1] before converting to pixels).

Order of the anchors (as torchvision, and as the heads flatten their outputs): level by level;
within a level row by row, column by column; within a location the cell anchors in order
(aspect-ratio-major, size-minor for `grid_anchors`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

# torchvision's RetinaNet (_default_anchorgen): 3 octave scales per level, truncated to ints.
RETINANET_SIZES = tuple(
    (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512)
)
RETINANET_ASPECT_RATIOS = (0.5, 1.0, 2.0)
RETINANET_STRIDES = (8, 16, 32, 64, 128)
# SSD300 (Liu et al. 2016, torchvision's ssd300_vgg16).
SSD300_FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
SSD300_ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
SSD300_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
SSD300_STEPS = (8, 16, 32, 64, 100, 300)
# FCOS: one anchor of the level's stride per location; the scale range of level l is
# (4 * stride, 8 * stride], open below on the first level and above on the last.
FCOS_STRIDES = (8, 16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class AnchorSet:
  """Anchors of every level of a detector, concatenated.

  Attributes:
    boxes: [N, 4] float32 xyxy anchors in input-image pixels.
    level_sizes: anchors per level (they sum to N).
    strides: (stride_y, stride_x) of each level's feature map.
    per_location: anchors per feature-map location of each level.
  """

  boxes: np.ndarray
  level_sizes: tuple[int, ...]
  strides: tuple[tuple[int, int], ...]
  per_location: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.boxes)

  @property
  def level_of(self) -> np.ndarray:
    """[N] int32 level index of every anchor."""
    return np.repeat(np.arange(len(self.level_sizes), dtype=np.int32), self.level_sizes)


def _pair(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def feature_shapes(image_size, strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """(H, W) of the feature maps at `strides` of a network that halves with stride-2 convs
  padded 'same' (ResNet + FPN): each halving rounds up, so 100 px at stride 8 is 13."""
  h, w = _pair(image_size)
  shapes = []
  for stride in strides:
    halvings = int(round(math.log2(stride)))
    if 2**halvings != stride:
      raise ValueError(f"feature_shapes: stride {stride} is not a power of 2")
    fh, fw = h, w
    for _ in range(halvings):
      fh, fw = -(-fh // 2), -(-fw // 2)
    shapes.append((fh, fw))
  return tuple(shapes)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """[len(ratios) * len(sizes), 4] zero-centered anchors (ratio = height / width), rounded to
  whole pixels as torchvision's AnchorGenerator.generate_anchors does."""
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  # np.round rounds half to even, as torch.round does.
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)


def grid_anchors(
    image_size, shapes: Sequence[tuple[int, int]], sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[Sequence[float]],
) -> AnchorSet:
  """torchvision's AnchorGenerator: the cell anchors of level l shifted to every location of a
  feature map of shape shapes[l]; the stride is image_size // feature size, per axis."""
  if not len(shapes) == len(sizes) == len(aspect_ratios):
    raise ValueError(
        f"grid_anchors: {len(shapes)} feature maps, {len(sizes)} size tuples and "
        f"{len(aspect_ratios)} aspect-ratio tuples (one of each per level)"
    )
  h, w = _pair(image_size)
  levels, level_sizes, strides, per_location = [], [], [], []
  for (fh, fw), level_sizes_l, ratios in zip(shapes, sizes, aspect_ratios, strict=True):
    if fh <= 0 or fw <= 0:
      raise ValueError(f"grid_anchors: feature map shape {(fh, fw)} must be positive")
    sy, sx = h // fh, w // fw
    base = cell_anchors(level_sizes_l, ratios)
    shift_x = np.arange(fw, dtype=np.int64) * sx
    shift_y = np.arange(fh, dtype=np.int64) * sy
    yy, xx = np.meshgrid(shift_y, shift_x, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = np.stack([xx, yy, xx, yy], axis=1).astype(np.float32)
    levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    level_sizes.append(fh * fw * len(base))
    strides.append((sy, sx))
    per_location.append(len(base))
  return AnchorSet(np.concatenate(levels).astype(np.float32), tuple(level_sizes),
                   tuple(strides), tuple(per_location))


def retinanet_anchors(image_size, shapes: Sequence[tuple[int, int]] | None = None) -> AnchorSet:
  """RetinaNet's 9 anchors per location on P3-P7 (torchvision's retinanet_resnet50_fpn):
  sizes 32..512 times 2^(0, 1/3, 2/3), aspect ratios 0.5, 1, 2. `shapes` default to the
  ResNet-FPN feature maps of `image_size` (see `feature_shapes`)."""
  if shapes is None:
    shapes = feature_shapes(image_size, RETINANET_STRIDES)
  return grid_anchors(image_size, shapes, RETINANET_SIZES,
                      (RETINANET_ASPECT_RATIOS,) * len(RETINANET_SIZES))


def fcos_anchors(image_size, shapes: Sequence[tuple[int, int]] | None = None) -> AnchorSet:
  """FCOS's anchors (torchvision's fcos_resnet50_fpn): one stride x stride square per location,
  centered on the point (column * stride, row * stride); the points are `anchor_centers`."""
  if shapes is None:
    shapes = feature_shapes(image_size, FCOS_STRIDES)
  sizes = tuple((s,) for s in FCOS_STRIDES[: len(shapes)])
  return grid_anchors(image_size, shapes, sizes, ((1.0,),) * len(sizes))


def anchor_centers(anchors: np.ndarray) -> np.ndarray:
  """[N, 2] (x, y) centers of xyxy anchors: FCOS's points."""
  return np.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2], -1)


def fcos_scale_ranges(anchor_set: AnchorSet) -> tuple[np.ndarray, np.ndarray]:
  """([N] lower, [N] upper) bounds of the regression distance each FCOS point is responsible
  for: (4, 8] times its anchor size, the first level from 0 and the last without limit."""
  sizes = anchor_set.boxes[:, 2] - anchor_set.boxes[:, 0]
  lower, upper = sizes * 4, sizes * 8
  lower[: anchor_set.level_sizes[0]] = 0
  upper[len(sizes) - anchor_set.level_sizes[-1]:] = np.inf
  return lower.astype(np.float32), upper.astype(np.float32)


def ssd_default_boxes(
    image_size=300,
    feature_sizes: Sequence = SSD300_FEATURE_SIZES,
    aspect_ratios: Sequence[Sequence[float]] = SSD300_ASPECT_RATIOS,
    scales: Sequence[float] = SSD300_SCALES,
    steps: Sequence[int] | None = SSD300_STEPS,
    clip: bool = True,
) -> AnchorSet:
  """SSD's default boxes (torchvision's DefaultBoxGenerator; 8732 for SSD300): per location
  a square of scale s_k, one of sqrt(s_k * s_k+1), and a w/h pair per aspect ratio."""
  if len(scales) != len(aspect_ratios) + 1:
    raise ValueError(
        f"ssd_default_boxes: {len(aspect_ratios)} levels need {len(aspect_ratios) + 1} scales, "
        f"got {len(scales)}"
    )
  if steps is not None and len(steps) != len(aspect_ratios):
    raise ValueError("ssd_default_boxes: one step per level (aspect_ratios and steps differ)")
  h, w = _pair(image_size)
  shapes = [_pair(f) for f in feature_sizes]
  if len(shapes) != len(aspect_ratios):
    raise ValueError(
        f"ssd_default_boxes: {len(shapes)} feature maps but {len(aspect_ratios)} aspect-ratio sets"
    )
  levels, level_sizes, strides, per_location = [], [], [], []
  for k, (fh, fw) in enumerate(shapes):
    # Pairs computed in Python floats, then stored as float32: torchvision's _generate_wh_pairs.
    s_k, s_prime = scales[k], math.sqrt(scales[k] * scales[k + 1])
    pairs = [[s_k, s_k], [s_prime, s_prime]]
    for ar in aspect_ratios[k]:
      sq = math.sqrt(ar)
      pairs += [[s_k * sq, s_k / sq], [s_k / sq, s_k * sq]]
    wh = np.asarray(pairs, np.float32)
    if clip:
      wh = np.clip(wh, 0, 1)
    if steps is not None:
      x_f, y_f = w / steps[k], h / steps[k]
    else:
      y_f, x_f = fh, fw
    shift_x = ((np.arange(fw) + 0.5) / x_f).astype(np.float32)
    shift_y = ((np.arange(fh) + 0.5) / y_f).astype(np.float32)
    yy, xx = np.meshgrid(shift_y, shift_x, indexing="ij")
    centers = np.repeat(np.stack([xx.reshape(-1), yy.reshape(-1)], -1), len(wh), axis=0)
    sizes = np.tile(wh, (fh * fw, 1))
    scale_xy = np.asarray([w, h], np.float32)
    levels.append(np.concatenate([(centers - np.float32(0.5) * sizes) * scale_xy,
                                  (centers + np.float32(0.5) * sizes) * scale_xy], axis=1))
    level_sizes.append(fh * fw * len(wh))
    step = steps[k] if steps is not None else None
    strides.append((step or h // fh, step or w // fw))
    per_location.append(len(wh))
  return AnchorSet(np.concatenate(levels).astype(np.float32), tuple(level_sizes),
                   tuple(strides), tuple(per_location))
