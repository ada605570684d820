"""`FileSource`: a classification split whose images are files, of any sizes.

Small folders are decoded once into host memory (`cache`); large ones keep only the file list
and are decoded batch by batch, in the transform's thread pool, together with the crop (see
`jaxvision.data.decode.decode_crop_resize`). Either way `get_batch` returns the images as a list
(one entry per example: a uint8 [H, W, C] array or an `EncodedImage`), and the transform turns
that list into the [b, S, S, C] batch of the contract.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxvision.data.decode import EncodedImage, decode, parallel_map
from jaxvision.data.source import check_label_range, check_labels_below, union_skipped

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FileSource:
  """Image files with one class label each.

  Attributes:
    files: [N] the images, not decoded yet.
    labels: [N] int32 class ids.
    num_classes: number of classes.
    task: always 'classification' (segmentation folders are loaded into an ArraySource).
    ids: [N] int64 stable example ids.
    cache: [N] decoded uint8 images, or None to decode on demand.
    skipped: files left out because they could not be read (data.skip_bad).
    class_names: the class of each label id.
  """

  files: list[EncodedImage]
  labels: np.ndarray
  num_classes: int
  task: str = "classification"
  ids: np.ndarray | None = None
  cache: list[np.ndarray] | None = None
  skipped: list[str] = dataclasses.field(default_factory=list)
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.ids is None:
      self.ids = np.arange(len(self.files), dtype=np.int64)
    if len(self.files) != len(self.labels):
      raise ValueError(f"{len(self.files)} images but {len(self.labels)} labels")
    check_label_range(self.labels, self.num_classes, self.names)

  def __len__(self) -> int:
    return len(self.files)

  @property
  def names(self) -> list[str]:
    """Each example's file name, in order."""
    return [f.name for f in self.files]

  @property
  def channels(self) -> int:
    """1 for grayscale files, else 3 (decided by the first file's mode)."""
    return 1 if self.files and self.files[0].mode == "L" else 3

  def check_num_classes(self, num_classes: int) -> None:
    """One-line ValueError when a label is not below the run's `num_classes` (0: any)."""
    if num_classes and num_classes < self.num_classes:
      check_labels_below(self.labels, num_classes, self.names)

  def get_batch(self, indices: np.ndarray) -> dict:
    """The examples at `indices`: `image` is a list (arrays when cached, else files)."""
    pool = self.cache if self.cache is not None else self.files
    return {
        "image": [pool[i] for i in indices],
        "label": self.labels[indices],
        "id": self.ids[indices],
    }

  def take(self, indices: np.ndarray, id_offset: int = 0) -> FileSource:
    """The examples at `indices`, with ids shifted by `id_offset`."""
    return dataclasses.replace(
        self, files=[self.files[i] for i in indices], labels=self.labels[indices],
        ids=self.ids[indices] + id_offset,
        cache=None if self.cache is None else [self.cache[i] for i in indices],
        skipped=list(self.skipped),
    )

  @staticmethod
  def concat(parts: list[FileSource]) -> FileSource:
    """The examples of `parts`, one after another."""
    if len(parts) == 1:
      return parts[0]
    cached = all(p.cache is not None for p in parts)
    return dataclasses.replace(
        parts[0],
        files=[f for p in parts for f in p.files],
        labels=np.concatenate([p.labels for p in parts]),
        ids=np.concatenate([p.ids for p in parts]),
        cache=[a for p in parts for a in p.cache] if cached else None,
        skipped=union_skipped(parts),
    )


def decode_all(
    files: list[EncodedImage], *, skip_bad: bool, workers: int
) -> tuple[list[np.ndarray | None], list[str]]:
  """Decodes every file; a corrupt one raises (naming it) or, with skip_bad, is returned as None."""

  def one(item):
    try:
      return decode(item), None
    except ValueError as e:
      if not skip_bad:
        raise
      log.warning("skipping %s", e)
      return None, item.name

  results = parallel_map(one, files, workers)
  return [a for a, _ in results], [name for _, name in results if name]
