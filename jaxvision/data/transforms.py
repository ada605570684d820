"""Batch transforms applied on the host: scaling, normalization (augmentation lives beside it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Per-channel statistics presets, for inputs scaled to [0, 1].
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0,), (1.0,)),
    "half": ((0.5,), (0.5,)),  # maps [0, 1] to [-1, 1]
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
}

Transform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per channel, on float images in [0, 1]."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) / std


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [0, 1]; float input is passed through."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) * np.float32(1 / 255)
  return image.astype(np.float32)


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Mean and std of a preset, with an error listing the presets for an unknown name."""
  if name not in NORMALIZE_PRESETS:
    raise ValueError(f"data.normalize={name!r} is not a preset; choose from {sorted(NORMALIZE_PRESETS)}")
  return NORMALIZE_PRESETS[name]


def build_transform(data_config, *, train: bool, task: str) -> Transform:
  """The host-side transform for a split: scale to [0, 1], then normalize."""
  del train, task
  mean, std = normalization(data_config.normalize)

  def transform(batch, rng):
    del rng
    return {**batch, "image": normalize(to_float(batch["image"]), mean, std)}

  return transform
