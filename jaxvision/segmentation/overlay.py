"""Prediction overlays as PNG files (PIL only): what a person looks at to judge a segmentation.

Each file has three panels side by side: the image; the image tinted by the predicted classes
with the predicted boundaries in yellow; the image with the wrongly predicted pixels in red.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from jaxvision.segmentation.metrics import confusion_metrics
from jaxvision.segmentation.tiling import predict_tiled

# Tint per class; class 0 (background / membrane) stays untinted.
PALETTE = np.array([
    (0, 0, 0), (40, 200, 80), (60, 120, 255), (255, 160, 0), (200, 60, 255), (0, 220, 220),
    (255, 90, 160), (150, 150, 40),
], np.float32)
_TINT = 0.35


def to_display(image: np.ndarray) -> np.ndarray:
  """[H, W, C] image (uint8, or float in any range) -> [H, W, 3] uint8, stretched per image."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8:
    lo, hi = float(image.min()), float(image.max())
    image = ((image - lo) / max(hi - lo, 1e-12) * 255.0).round().astype(np.uint8)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def boundaries(classes: np.ndarray) -> np.ndarray:
  """Pixels whose right or lower neighbour has another class."""
  edge = np.zeros(classes.shape, bool)
  edge[:, :-1] |= classes[:, :-1] != classes[:, 1:]
  edge[:-1, :] |= classes[:-1, :] != classes[1:, :]
  return edge


def class_map(logits: np.ndarray) -> np.ndarray:
  """[..., K] logits -> int32 classes (one channel: a sigmoid logit, class 1 where > 0)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(np.int32)
  return logits.argmax(-1).astype(np.int32)


def _center_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
  top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
  return x[top:top + h, left:left + w]


def overlay_panels(
    image: np.ndarray, label: np.ndarray | None, prediction: np.ndarray
) -> np.ndarray:
  """[h, 3w, 3] uint8: image | prediction tint + boundaries | errors (red)."""
  h, w = prediction.shape
  base = to_display(_center_crop(image, h, w)).astype(np.float32)
  tint = PALETTE[prediction % len(PALETTE)]
  tinted = np.where((prediction > 0)[..., None], (1 - _TINT) * base + _TINT * tint, base)
  tinted[boundaries(prediction)] = (255, 230, 0)
  errors = base * 0.6
  if label is not None:
    label = _center_crop(np.asarray(label), h, w)
    errors[label != prediction] = (255, 30, 30)
  return np.concatenate([base, tinted, errors], axis=1).round().astype(np.uint8)


def save_overlays(
    path_prefix: str, images: np.ndarray, labels: np.ndarray | None, predictions: np.ndarray
) -> list[str]:
  """Writes `{path_prefix}{i:03d}.png` per example; returns the paths.

  `predictions` are class maps [N, h, w] or logits [N, h, w, K]; images and labels larger than
  the predictions ('valid' U-Net) are center-cropped to them.
  """
  predictions = np.asarray(predictions)
  if predictions.ndim == 4:
    predictions = class_map(predictions)
  if predictions.ndim != 3 or len(predictions) != len(images):
    raise ValueError(f"predictions of shape {predictions.shape} do not match {len(images)} images")
  if labels is not None and len(labels) != len(images):
    raise ValueError(f"{len(labels)} labels for {len(images)} images")
  directory = os.path.dirname(path_prefix)
  if directory:
    os.makedirs(directory, exist_ok=True)
  paths = []
  for i, prediction in enumerate(predictions):
    label = None if labels is None else labels[i]
    path = f"{path_prefix}{i:03d}.png"
    Image.fromarray(overlay_panels(images[i], label, prediction)).save(path)
    paths.append(path)
  return paths


def predict_and_save_overlays(
    apply_fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray | None,
    path_prefix: str,
    *,
    tile: int | tuple[int, int] | None = None,
    margin: int | tuple[int, int] = 0,
    batch_size: int = 4,
    num_classes: int = 2,
) -> tuple[list[str], dict[str, float]]:
  """Predicts `images` (whole, or by overlap-tiles when `tile` is set), writes the overlays and
  returns their paths with the metrics against `labels` (empty when there are none)."""
  images = np.asarray(images)
  if tile is None:
    logits = np.concatenate([
        np.asarray(apply_fn(images[i:i + batch_size]), np.float32)
        for i in range(0, len(images), batch_size)
    ])
  else:
    logits = predict_tiled(apply_fn, images, tile, margin, batch_size=batch_size)
  predictions = class_map(logits)
  paths = save_overlays(path_prefix, images, labels, predictions)
  metrics: dict[str, float] = {}
  if labels is not None:
    h, w = predictions.shape[1:]
    truth = np.stack([_center_crop(np.asarray(y), h, w) for y in labels])
    keep = (truth >= 0) & (truth < num_classes)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (truth[keep], predictions[keep]), 1)
    metrics = confusion_metrics(confusion)
  return paths, metrics
