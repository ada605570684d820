"""`DetectionSource`: images of any sizes with a variable number of boxes each.

The common currency of the detection readers (coco, voc, yolo, TFDS coco / voc): per image the
file (or encoded bytes, or the decoded pixels when the split fits data.cache_mb), its original
size and its annotations in original-image pixels. `get_batch` returns per-example lists; the
detection transform (jaxvision.data.detection_transform) turns them into the padded batch.

With data.masks (`masks_wanted`), a reader that has instance masks (coco:) also keeps per image
an object whose `decode()` gives its masks, uint8 [n_i, H, W] aligned with the boxes; they are
decoded batch by batch, never cached (pixels of every mask would not fit).

Annotation problems are collected by the readers with `Problems`: without data.skip_bad the
first one stops the run with a one-line ValueError naming the file and the annotation; with it,
the bad annotation (or image) is left out and counted in `skipped`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from jaxvision.data.decode import (
  EncodedImage,
  decode,
  decode_mode,
  default_workers,
  parallel_map,
  probe,
)
from jaxvision.data.source import check_labels_below, union_skipped

log = logging.getLogger(__name__)
# Up to this many images, every header is read up front (a broken file stops the run before
# training starts); larger splits sample this many to decide the channel count.
PROBE_ALL_UP_TO = 5000


@dataclasses.dataclass
class DetectionSource:
  """A split of a detection dataset.

  Attributes:
    images: [N] EncodedImage (file path or bytes), or uint8 [H, W, C] arrays once cached.
    boxes: [N] float32 [n_i, 4] xyxy boxes in original-image pixels.
    classes: [N] int32 [n_i] contiguous class indices.
    ignore: [N] bool [n_i] crowd (COCO) / difficult (VOC) boxes: not training targets, and
      neither found nor missed by evaluation.
    areas: [N] float32 [n_i] the annotations' areas (COCO's segment area; else the box area).
    sizes: [N, 2] int32 (H, W) of the original images.
    num_classes: number of classes K.
    class_names: [K] name of each class.
    category_ids: [K] the dataset's id of each class (COCO category ids; else 0..K-1).
    image_ids: [N] the dataset's image ids (COCO's; else 0..N-1 of the split).
    task: always 'detection'.
    ids: [N] int64 stable example ids (unique over concatenated splits).
    names: [N] file names, for error messages.
    skipped: annotations or images left out (data.skip_bad), one line each.
    masks: [N] per image its instance masks (`decode()` -> uint8 [n_i, H, W] in original pixels,
      one per box), or None when the reader was not asked for them (data.masks).
  """

  images: list
  boxes: list[np.ndarray]
  classes: list[np.ndarray]
  ignore: list[np.ndarray]
  areas: list[np.ndarray]
  sizes: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] = ()
  category_ids: tuple[int, ...] = ()
  image_ids: np.ndarray | None = None
  task: str = "detection"
  ids: np.ndarray | None = None
  names: list[str] | None = None
  skipped: list[str] = dataclasses.field(default_factory=list)
  masks: list | None = None

  def __post_init__(self):
    n = len(self.images)
    if self.ids is None:
      self.ids = np.arange(n, dtype=np.int64)
    if self.image_ids is None:
      self.image_ids = np.arange(n, dtype=np.int64)
    if self.names is None:
      self.names = [getattr(x, "name", f"image {i}") for i, x in enumerate(self.images)]
    if not self.category_ids:
      self.category_ids = tuple(range(self.num_classes))
    fields = ["boxes", "classes", "ignore", "areas", "sizes", "ids", "image_ids", "names"]
    for field in fields + (["masks"] if self.masks is not None else []):
      if len(getattr(self, field)) != n:
        raise ValueError(f"DetectionSource: {n} images but {len(getattr(self, field))} {field}")
    for i in range(n):
      cls = self.classes[i]
      if len(cls) and (cls.min() < 0 or cls.max() >= self.num_classes):
        raise ValueError(f"class {int(cls.max() if cls.max() >= self.num_classes else cls.min())}"
                         f" out of range for {self.num_classes} classes in {self.names[i]}")

  def __len__(self) -> int:
    return len(self.images)

  def check_num_classes(self, num_classes: int) -> None:
    """One-line ValueError when a box's class is not below the run's `num_classes` (0: any)."""
    if num_classes and num_classes < self.num_classes:
      check_labels_below(self.labels, num_classes, self.names)

  @property
  def labels(self) -> np.ndarray:
    """[N, max boxes] classes padded with 0, one row per image (for label-range checks)."""
    width = max((len(c) for c in self.classes), default=0)
    out = np.zeros((len(self), max(width, 1)), np.int32)
    for i, c in enumerate(self.classes):
      out[i, :len(c)] = c
    return out

  @property
  def channels(self) -> int:
    """1 for grayscale data, else 3."""
    first = self.images[0] if self.images else None
    if isinstance(first, np.ndarray):
      return first.shape[-1]
    return 1 if first is not None and first.mode == "L" else 3

  def count_over(self, max_boxes: int) -> int:
    """Images with more than `max_boxes` boxes (the transform keeps their first max_boxes)."""
    return sum(len(b) > max_boxes for b in self.boxes)

  def get_batch(self, indices: np.ndarray) -> dict:
    """The examples at `indices` as per-example lists (images, boxes, ...) and arrays."""
    idx = [int(i) for i in indices]
    out = {
        "image": [self.images[i] for i in idx],
        "boxes": [self.boxes[i] for i in idx],
        "classes": [self.classes[i] for i in idx],
        "ignore": [self.ignore[i] for i in idx],
        "area": [self.areas[i] for i in idx],
        "orig_size": self.sizes[idx] if idx else np.zeros((0, 2), np.int32),
        "id": self.ids[idx] if idx else np.zeros(0, np.int64),
        "name": [self.names[i] for i in idx],
    }
    if self.masks is not None:
      out["masks"] = [self.masks[i] for i in idx]
    return out

  def take(self, indices: np.ndarray, id_offset: int = 0) -> DetectionSource:
    """The examples at `indices`, with ids shifted by `id_offset`."""
    idx = [int(i) for i in indices]
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    return dataclasses.replace(
        self, images=pick(self.images), boxes=pick(self.boxes), classes=pick(self.classes),
        ignore=pick(self.ignore), areas=pick(self.areas),
        sizes=self.sizes[idx].reshape(-1, 2), image_ids=self.image_ids[idx],
        ids=self.ids[idx] + id_offset, names=pick(self.names), skipped=list(self.skipped),
        masks=None if self.masks is None else pick(self.masks))

  @staticmethod
  def concat(parts: list[DetectionSource]) -> DetectionSource:
    """The examples of `parts`, one after another (the class list of the first)."""
    if len(parts) == 1:
      return parts[0]
    join = lambda field: [x for p in parts for x in getattr(p, field)]  # noqa: E731
    with_masks = [p.masks is not None for p in parts]
    if any(with_masks) and not all(with_masks):
      raise ValueError("DetectionSource.concat: some parts have instance masks, others not")
    return dataclasses.replace(
        parts[0], images=join("images"), boxes=join("boxes"), classes=join("classes"),
        ignore=join("ignore"), areas=join("areas"),
        sizes=np.concatenate([p.sizes for p in parts]),
        image_ids=np.concatenate([p.image_ids for p in parts]),
        ids=np.concatenate([p.ids for p in parts]), names=join("names"),
        skipped=union_skipped(parts), masks=join("masks") if all(with_masks) else None)


def masks_wanted(data_config) -> bool:
  """data.masks: whether the readers keep instance masks and the transform makes `masks`."""
  # A config saved before the key existed reads as box-only.
  return bool(data_config.get("masks", False))


class Problems:
  """Bad annotations of a dataset: raise the first (one line) or, with skip_bad, count them."""

  def __init__(self, skip_bad: bool, what: str):
    self.skip_bad = skip_bad
    self.what = what
    self.lines: list[str] = []

  def report(self, message: str) -> None:
    """One bad annotation / image: a ValueError, or (skip_bad) a line in `lines`."""
    if not self.skip_bad:
      raise ValueError(message)
    self.lines.append(message)

  def log_summary(self) -> None:
    """One log line with the count of what data.skip_bad left out."""
    if self.lines:
      log.warning("%s: data.skip_bad left out %d bad annotations/images (first: %s)", self.what,
                  len(self.lines), self.lines[0])


def check_box(box, width: float, height: float, where: str, problems: Problems,
              tolerance: float = 1.0):
  """The xyxy `box` clipped to the image, or None (reported) when it has no positive size or
  lies outside the image by more than `tolerance` pixels (annotation tools round borders)."""
  x1, y1, x2, y2 = (float(v) for v in box)
  if not all(np.isfinite([x1, y1, x2, y2])):
    problems.report(f"{where}: box {box} is not finite")
    return None
  if x2 <= x1 or y2 <= y1:
    problems.report(f"{where}: box {_fmt(box)} has no positive width and height")
    return None
  if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
    problems.report(f"{where}: box {_fmt(box)} lies outside the {width:g}x{height:g} image")
    return None
  clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
  if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
    problems.report(f"{where}: box {_fmt(box)} has no area inside the {width:g}x{height:g} image")
    return None
  return clipped


def _fmt(box) -> str:
  return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def image_mode(paths: list[str], workers: int) -> str:
  """'L' when the (sampled) images are all grayscale, else 'RGB'."""
  if not paths:
    return "RGB"
  if len(paths) > PROBE_ALL_UP_TO:
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, 64).astype(int)]
  headers = parallel_map(lambda p: _probe_or_none(p), paths, workers)
  return decode_mode([h for h in headers if h is not None])


def _probe_or_none(path):
  try:
    return probe(path)
  except ValueError:
    return None


def probe_all(paths: list[str], problems: Problems, workers: int) -> list[bool]:
  """Reads each header of a small split (a broken file is reported); large splits only check
  that the files exist."""
  if len(paths) > PROBE_ALL_UP_TO:
    ok = [os.path.isfile(p) for p in paths]
    for p, good in zip(paths, ok, strict=True):
      if not good:
        problems.report(f"image file {p} does not exist")
    return ok

  def one(path):
    if not os.path.isfile(path):
      return f"image file {path} does not exist"
    try:
      probe(path)
    except ValueError as e:
      return str(e)
    return None

  errors = parallel_map(one, paths, workers)
  for e in errors:
    if e:
      problems.report(e)
  return [e is None for e in errors]


def maybe_cache(source: DetectionSource, data_config, what: str) -> DetectionSource:
  """Decodes every image into memory when the split fits data.cache_mb (corrupt pixels are
  then found up front too); otherwise images are decoded batch by batch."""

  cache_mb = float(data_config.cache_mb)
  workers = default_workers(int(data_config.workers))
  channels = source.channels
  decoded_mb = float(np.sum(source.sizes[:, 0].astype(np.float64) * source.sizes[:, 1])) * (
      channels / 2**20)
  if not len(source) or decoded_mb > cache_mb or not isinstance(source.images[0], EncodedImage):
    if len(source) and decoded_mb > cache_mb:
      log.info("%s: %.0f MB decoded > data.cache_mb, decoding on the fly", what, decoded_mb)
    return source
  skip_bad = bool(data_config.skip_bad)

  def one(item):
    try:
      return decode(item), None
    except ValueError as e:
      if not skip_bad:
        raise
      return None, str(e)

  results = parallel_map(one, source.images, workers)
  keep = [i for i, (a, _) in enumerate(results) if a is not None]
  errors = [e for _, e in results if e]
  for e in errors:
    log.warning("skipping %s", e)
  for i in keep:
    image = results[i][0]
    if tuple(image.shape[:2]) != tuple(source.sizes[i]):
      raise ValueError(f"image {source.names[i]} is {image.shape[1]}x{image.shape[0]} but its "
                       f"annotation says {source.sizes[i][1]}x{source.sizes[i][0]}")
  cached = source.take(np.asarray(keep, np.int64))
  cached.images = [results[i][0] for i in keep]
  cached.skipped = list(source.skipped) + errors
  return cached
