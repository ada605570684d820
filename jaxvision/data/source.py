"""In-memory examples: the common currency of every local source."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxvision.data.splits import split_indices


@dataclasses.dataclass
class ArraySource:
  """A split held in host memory.

  Attributes:
    images: [N, H, W, C] uint8 (0..255) or float32 (0..1) images.
    labels: [N] int class ids (classification) or [N, H, W] int class maps (segmentation).
    num_classes: number of classes.
    task: 'classification' or 'segmentation'.
    ids: [N] int64 stable example ids (used to prove no example is repeated or skipped).
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  task: str = "classification"
  ids: np.ndarray | None = None

  def __post_init__(self):
    if self.ids is None:
      self.ids = np.arange(len(self.images), dtype=np.int64)
    if len(self.images) != len(self.labels):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
    if self.images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {self.images.shape}")
    if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
      bad = int(self.labels.max() if self.labels.max() >= self.num_classes else self.labels.min())
      raise ValueError(f"label {bad} out of range for {self.num_classes} classes")

  def __len__(self) -> int:
    return len(self.images)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices`, as a dict of stacked arrays."""
    return {"image": self.images[indices], "label": self.labels[indices], "id": self.ids[indices]}


def select_split(splits: dict[str, ArraySource], split: str) -> ArraySource:
  """Applies TFDS slicing syntax to named in-memory splits and concatenates the parts."""
  parts = split_indices(split, {name: len(src) for name, src in splits.items()})
  first = splits[parts[0][0]]
  # Ids stay unique across concatenated splits by offsetting each split's ids.
  offsets, total = {}, 0
  for name in splits:
    offsets[name] = total
    total += len(splits[name])
  return ArraySource(
      images=np.concatenate([splits[n].images[i] for n, i in parts]),
      labels=np.concatenate([splits[n].labels[i] for n, i in parts]),
      num_classes=first.num_classes,
      task=first.task,
      ids=np.concatenate([splits[n].ids[i] + offsets[n] for n, i in parts]),
  )
