"""Detections drawn on an image with PIL: boxes, class names and scores (no matplotlib).

    picture = draw_detections(image, boxes, scores, classes, class_names=names,
                              gt_boxes=gt, gt_classes=gt_cls)
    save_detections('pred.png', image, boxes, scores, classes, class_names=names, masks=m)

Predictions are drawn in a colour per class; ground truth, when given, as white outlines edged
in black, underneath, so the two can be told apart. Instance masks (bool [D, H, W], one per
detection) are translucent fills in their detection's class colour, laid on the image before
any outline so every box and label stays readable on top.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOR = (255, 255, 255)
MASK_ALPHA = 0.45  # opacity of a mask's fill: the image stays visible underneath


def class_color(index: int) -> tuple[int, int, int]:
  """A bright colour for class `index` (golden-angle hues, so neighbours differ)."""
  r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """[H, W] / [H, W, 1] / [H, W, 3] uint8 or float in [0, 1] -> [H, W, 3] uint8."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"draw: image must be [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")
  if image.dtype != np.uint8:
    lo, hi = float(np.min(image)), float(np.max(image))
    if lo < 0 or hi > 1:  # normalised input: stretch to the visible range
      image = (image - lo) / max(hi - lo, 1e-12)
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _ordered(boxes) -> np.ndarray:
  """[n, 4] float boxes with x1 <= x2 and y1 <= y2 (PIL refuses inverted rectangles)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                   np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])], axis=1)


def _label(class_names, cls: int) -> str:
  if class_names is not None and 0 <= cls < len(class_names):
    return str(class_names[cls])
  return str(cls)


def draw_detections(
    image: np.ndarray, boxes, scores=None, classes=None, *, valid=None,
    class_names: Sequence[str] | None = None, score_threshold: float = 0.0,
    gt_boxes=None, gt_classes=None, gt_valid=None, width: int = 2, masks=None,
    mask_alpha: float = MASK_ALPHA,
) -> np.ndarray:
  """[H, W, 3] uint8: `image` with the detections (xyxy pixels of this image) drawn, each
  labelled with its class name and score, and filled with its instance mask (`masks`, bool
  [D, H, W]) when given; ground truth optional, in white."""
  rgb = to_rgb_uint8(image)
  boxes = _ordered(boxes)
  n = len(boxes)
  scores = np.ones(n) if scores is None else np.asarray(scores, np.float64).reshape(-1)
  classes = np.zeros(n, int) if classes is None else np.asarray(classes).reshape(-1)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
  if not len(scores) == len(classes) == len(valid) == n:
    raise ValueError(f"draw: {n} boxes but {len(scores)} scores, {len(classes)} classes, "
                     f"{len(valid)} valid flags")
  # Lowest score first, so the best detections end up on top.
  shown = sorted(np.nonzero(valid & (scores >= score_threshold))[0], key=lambda j: scores[j])
  if masks is not None:
    rgb = _fill_masks(rgb, masks, [(i, class_color(int(classes[i]))) for i in shown], n,
                      mask_alpha)
  canvas = Image.fromarray(rgb)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  if gt_boxes is not None:
    gt_boxes = _ordered(gt_boxes)
    gt_valid = (np.ones(len(gt_boxes), bool) if gt_valid is None
                else np.asarray(gt_valid, bool).reshape(-1))
    gt_classes = None if gt_classes is None else np.asarray(gt_classes).reshape(-1)
    for i in np.nonzero(gt_valid)[0]:
      x1, y1, x2, y2 = gt_boxes[i]
      draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=width + 2)
      draw.rectangle([x1, y1, x2, y2], outline=GT_COLOR, width=max(1, width - 1))
      if gt_classes is not None:
        draw.text((x1 + 2, y2 - 12), _label(class_names, int(gt_classes[i])), fill=GT_COLOR,
                  font=font)
  for i in shown:
    x1, y1, x2, y2 = boxes[i]
    color = class_color(int(classes[i]))
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    text = f"{_label(class_names, int(classes[i]))} {scores[i]:.2f}"
    left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
    y = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
    draw.rectangle([x1, y, x1 + (right - left) + 3, y + (bottom - top) + 2], fill=color)
    draw.text((x1 + 1, y), text, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def _fill_masks(rgb: np.ndarray, masks, fills, n: int, alpha: float) -> np.ndarray:
  """`rgb` with masks [n, H, W] blended in, (index, colour) of `fills` in order."""
  masks = np.asarray(masks).astype(bool)
  if masks.shape != (n,) + rgb.shape[:2]:
    raise ValueError(f"draw: masks {masks.shape} must be [{n}, {rgb.shape[0]}, {rgb.shape[1]}] "
                     f"for {n} boxes on a {rgb.shape[1]}x{rgb.shape[0]} image")
  if not 0 <= alpha <= 1:
    raise ValueError(f"draw: mask_alpha={alpha} must be in [0, 1]")
  out = rgb.astype(np.float32)
  for i, color in fills:
    out[masks[i]] = (1 - alpha) * out[masks[i]] + alpha * np.asarray(color, np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def save_detections(path: str, image: np.ndarray, boxes, scores=None, classes=None,
                    **kwargs) -> str:
  """Writes `draw_detections(...)` to `path` (PNG) and returns the path."""
  Image.fromarray(draw_detections(image, boxes, scores, classes, **kwargs)).save(path)
  return path
