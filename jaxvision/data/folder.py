"""`folder:DIR`: one sub-folder per class, holding .jpg/.png images (of any sizes).

Two layouts:
  DIR/CLASS/*.jpg                  one split, 'train' (hold out with slicing: 'train[90%:]')
  DIR/SPLIT/CLASS/*.jpg            one split per sub-folder when DIR/train holds class folders
                                   (e.g. ImageNet's train/ and val/); classes come from train/.
Class ids follow the sorted class-folder names; one class folder is an error (a one-class
classifier reaches loss 0 without learning anything). Each split's files are put in a stratified
order (classes interleaved in proportion, each class's files shuffled with a fixed seed), so any
slice such as 'train[:80%]' / 'train[80%:]' holds every class in its share, the same on every run
and every process; sorted by class, 'train[80%:]' would be the last classes only. Every file's
header is read up front, so a file that is not an image, or one over data.max_image_pixels,
stops the run before training starts (or is skipped with data.skip_bad).
When the decoded images fit in data.cache_mb they are decoded once and kept in memory (a corrupt
pixel stream is then found up front too); larger folders are decoded batch by batch.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from jaxvision.data.decode import (
  IMAGE_EXTENSIONS,
  EncodedImage,
  allow_pixels,
  decode_mode,
  default_workers,
  parallel_map,
  probe,
)
from jaxvision.data.files import FileSource, decode_all

log = logging.getLogger(__name__)


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path)
                if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _images_in(path: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
  return found


def _has_top_level_images(path: str) -> bool:
  return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path))


def split_dirs(root: str) -> dict[str, str]:
  """{split name: folder of class folders} for either layout."""
  if not root:
    raise ValueError("dataset 'folder:' needs a directory, e.g. folder:/data/flowers")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"dataset folder:{root}: no such directory")
  subdirs = _subdirs(root)
  if not subdirs:
    raise ValueError(f"dataset folder:{root} has no class sub-folders")
  train = os.path.join(root, "train")
  if "train" in subdirs and _subdirs(train) and not _has_top_level_images(train):
    return {name: os.path.join(root, name) for name in subdirs}
  return {"train": root}


def list_files(root: str) -> tuple[tuple[str, ...], dict[str, tuple[list[str], np.ndarray]]]:
  """Class names, and for each split its image paths and labels; empty class folders are errors."""
  dirs = split_dirs(root)
  classes = tuple(_subdirs(dirs.get("train", next(iter(dirs.values())))))
  if len(classes) == 1:
    raise ValueError(f"classification needs at least 2 classes; folder:{root} has one, "
                     f"{classes[0]!r}")
  index = {c: i for i, c in enumerate(classes)}
  splits = {}
  for name, path in dirs.items():
    paths, labels = [], []
    for c in _subdirs(path):
      if c not in index:
        raise ValueError(f"class folder {os.path.join(path, c)} is not a class of the train split")
      files = _images_in(os.path.join(path, c))
      if not files:
        raise ValueError(f"class folder {os.path.join(path, c)} has no .jpg/.png images")
      paths += files
      labels += [index[c]] * len(files)
    if not paths:
      raise ValueError(f"split folder {path} has no class sub-folders with images")
    order = stratified_order(np.asarray(labels, np.int32))
    splits[name] = ([paths[i] for i in order], np.asarray(labels, np.int32)[order])
  return classes, splits


def stratified_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
  """An order of the examples in which every contiguous slice holds each class in proportion.

  Each class's examples are shuffled (fixed `seed`) and spread evenly over [0, 1): the k-th of a
  class of n sits at (k + 1/2) / n; the examples are then sorted by that position (ties by class).
  """
  rng = np.random.default_rng(seed)
  position = np.empty(len(labels), np.float64)
  for c in np.unique(labels):
    members = rng.permutation(np.nonzero(labels == c)[0])
    position[members] = (np.arange(len(members)) + 0.5) / len(members)
  return np.lexsort((labels, position))


def load(
    arg: str, split: str, image_size: int | None = None, data_config=None
) -> dict[str, FileSource]:
  """Every split of the folder as a FileSource (decoded into memory when it fits cache_mb)."""
  del split, image_size  # the dispatcher slices; the transform crops and resizes
  skip_bad = bool(data_config.skip_bad)
  cache_mb = float(data_config.cache_mb)
  workers = default_workers(int(data_config.workers))
  max_pixels = int(data_config.max_image_pixels)
  allow_pixels(max_pixels)
  classes, listed = list_files(arg)

  all_paths = [p for paths, _ in listed.values() for p in paths]
  headers = parallel_map(lambda p: _probe_or_none(p, skip_bad, max_pixels), all_paths, workers)
  header_of = dict(zip(all_paths, headers, strict=True))
  mode = decode_mode([h for h in headers if h is not None])
  channels = 1 if mode == "L" else 3
  decoded_mb = sum(h.width * h.height * channels for h in headers if h is not None) / 2**20
  eager = decoded_mb <= cache_mb

  sources = {}
  for name, (paths, labels) in listed.items():
    ids = np.arange(len(paths), dtype=np.int64)
    keep = np.array([header_of[p] is not None for p in paths], bool)
    skipped = [p for p, k in zip(paths, keep, strict=True) if not k]
    files = [EncodedImage(p, mode=mode, max_pixels=max_pixels)
             for p, k in zip(paths, keep, strict=True) if k]
    labels, ids = labels[keep], ids[keep]
    cache = None
    if eager:
      cache, bad = decode_all(files, skip_bad=skip_bad, workers=workers)
      if bad:
        good = np.array([a is not None for a in cache], bool)
        files = [f for f, g in zip(files, good, strict=True) if g]
        cache = [a for a in cache if a is not None]
        labels, ids = labels[good], ids[good]
        skipped += bad
    for c in np.setdiff1d(np.unique(listed[name][1]), labels):
      raise ValueError(f"class folder {classes[c]} of {name} has no readable images")
    sources[name] = FileSource(files, labels, num_classes=len(classes), ids=ids, cache=cache,
                               skipped=skipped, class_names=classes)
  if not eager:
    log.info("folder:%s: %.0f MB decoded > data.cache_mb, decoding on the fly", arg, decoded_mb)
  return sources


def _probe_or_none(path: str, skip_bad: bool, max_pixels: int):
  try:
    return probe(path, max_pixels)
  except ValueError as e:
    if not skip_bad:
      raise
    log.warning("skipping %s", e)
    return None
