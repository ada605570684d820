"""In-memory examples: the common currency of every local source, and split selection over sources.

A source is anything with `len()`, `get_batch(indices)`, `num_classes`, `task`, `channels`,
`class_names`, `ids`, `skipped` and the two methods `select_split` needs:
`take(indices, id_offset)` and `concat(parts)`.
`ArraySource` holds stacked arrays; `jaxvision.data.files.FileSource` holds image files that are
decoded on demand.
"""

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
    names: optional [N] file names of the examples, used to name the culprit in error messages.
    skipped: files left out because they could not be read (data.skip_bad).
    class_names: the class of each label id, when the source knows them.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  task: str = "classification"
  ids: np.ndarray | None = None
  names: np.ndarray | None = None
  skipped: list[str] = dataclasses.field(default_factory=list)
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.ids is None:
      self.ids = np.arange(len(self.images), dtype=np.int64)
    if len(self.images) != len(self.labels):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
    if self.images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {self.images.shape}")
    check_label_range(self.labels, self.num_classes, self.names)

  def __len__(self) -> int:
    return len(self.images)

  @property
  def channels(self) -> int:
    """Channels of the images."""
    return int(self.images.shape[-1])

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices`, as a dict of stacked arrays."""
    return {"image": self.images[indices], "label": self.labels[indices], "id": self.ids[indices]}

  def check_num_classes(self, num_classes: int) -> None:
    """One-line ValueError when a label is not below the run's `num_classes` (0: any)."""
    if num_classes and num_classes < self.num_classes:
      check_labels_below(self.labels, num_classes, self.names)

  def take(self, indices: np.ndarray, id_offset: int = 0) -> ArraySource:
    """The examples at `indices`, with ids shifted by `id_offset`."""
    return ArraySource(
        self.images[indices], self.labels[indices], self.num_classes, self.task,
        ids=self.ids[indices] + id_offset,
        names=None if self.names is None else self.names[indices], skipped=list(self.skipped),
        class_names=self.class_names,
    )

  @staticmethod
  def concat(parts: list[ArraySource]) -> ArraySource:
    """The examples of `parts`, one after another."""
    if len(parts) == 1:
      return parts[0]
    names = None
    if all(p.names is not None for p in parts):
      names = np.concatenate([p.names for p in parts])
    return ArraySource(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        num_classes=max(p.num_classes for p in parts),
        task=parts[0].task,
        ids=np.concatenate([p.ids for p in parts]),
        names=names,
        skipped=union_skipped(parts),
        class_names=parts[0].class_names,
    )


def union_skipped(parts) -> list[str]:
  """The skipped files of all `parts`, each once, in order."""
  seen: dict[str, None] = {}
  for p in parts:
    seen.update(dict.fromkeys(p.skipped))
  return list(seen)


def check_label_range(labels: np.ndarray, num_classes: int, names=None, where: str = "") -> None:
  """Raises a one-line ValueError naming the first label outside [0, num_classes)."""
  if not len(labels):
    return
  flat = labels.reshape(len(labels), -1)
  bad_rows = np.nonzero((flat.min(axis=1) < 0) | (flat.max(axis=1) >= num_classes))[0]
  if not len(bad_rows):
    return
  row = int(bad_rows[0])
  values = flat[row]
  value = int(values[(values < 0) | (values >= num_classes)][0])
  culprit = f" in {names[row]}" if names is not None else f" (example {row}{where})"
  raise ValueError(f"label {value} out of range for {num_classes} classes{culprit}")


def check_num_classes(source, config) -> None:
  """The run's `config.num_classes` (0: from the data) against the source's labels, one line
  naming the culprit (`source.check_num_classes`).

  Only when the run's task is the source's own (its labels are the targets); another task, e.g.
  a regression on the images, gives num_classes its own meaning.
  """
  if config.task in ("auto", source.task):
    source.check_num_classes(int(config.num_classes))


def check_labels_below(labels, num_classes: int, names=None) -> None:
  """With an explicit `num_classes` (0: none), every label must be below it."""
  try:
    check_label_range(labels, num_classes, names)
  except ValueError as e:
    raise ValueError(f"{e} (config.num_classes={num_classes})") from None


def select_split(splits: dict, split: str):
  """Applies TFDS slicing syntax to named splits and concatenates the parts.

  Works for any source kind with `take` and `concat` (ArraySource, FileSource); ids stay unique
  across concatenated splits by offsetting each split's ids by the sizes of the splits before it.
  """
  parts = split_indices(split, {name: len(src) for name, src in splits.items()})
  offsets, total = {}, 0
  for name in splits:
    offsets[name] = total
    total += len(splits[name])
  first = splits[parts[0][0]]
  taken = [splits[n].take(i, id_offset=offsets[n]) for n, i in parts]
  return type(first).concat(taken)
