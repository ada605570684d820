"""`segfolder:DIR`: images and their segmentation masks, paired by file name.

Layouts:
  DIR/image/*.png + DIR/label/*.png (or DIR/mask/)      one split, 'train'
  DIR/SPLIT/image/ + DIR/SPLIT/label/                   one split per such sub-folder
A mask is matched to its image by file stem (`image/7.png` <-> `label/7.png` or `label/7.tif`).
Masks hold class indices, or are binary with values {0, 255}, which map to {0, 1} (num_classes 2);
a palette ('P') mask gives its palette indices. All images must share one size: evaluation runs
on whole images (so the held-out pixel error covers every pixel), and batches need one shape.
Segmentation data sets are small, so everything is decoded into memory up front.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from jaxvision.data.decode import (
  EncodedImage,
  decode,
  decode_mode,
  default_workers,
  parallel_map,
  probe,
)
from jaxvision.data.source import ArraySource

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_DIRS = ("label", "mask", "labels", "masks")
IMAGE_DIRS = ("image", "images")
log = logging.getLogger(__name__)


def _pair_dirs(path: str) -> tuple[str, str] | None:
  def first_dir(names):
    found = [os.path.join(path, d) for d in names if os.path.isdir(os.path.join(path, d))]
    return found[0] if found else None

  image, mask = first_dir(IMAGE_DIRS), first_dir(MASK_DIRS)
  if image is None:
    return None
  if mask is None:
    raise FileNotFoundError(f"{image} has no sibling label/ (or mask/) folder")
  return image, mask


def split_dirs(root: str) -> dict[str, tuple[str, str]]:
  """{split name: (image folder, mask folder)} for either layout."""
  if not root:
    raise ValueError("dataset 'segfolder:' needs a directory, e.g. segfolder:data/isbi/train")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"dataset segfolder:{root}: no such directory")
  pair = _pair_dirs(root)
  if pair:
    return {"train": pair}
  splits = {}
  for name in sorted(os.listdir(root)):
    sub = os.path.join(root, name)
    if os.path.isdir(sub) and (pair := _pair_dirs(sub)):
      splits[name] = pair
  if not splits:
    raise FileNotFoundError(f"dataset segfolder:{root}: no image/ and label/ (or mask/) folders")
  return splits


def _by_stem(folder: str) -> dict[str, str]:
  files = sorted(
      f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS) and not f.startswith(".")
  )
  return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in files}


def pair_files(image_dir: str, mask_dir: str) -> list[tuple[str, str]]:
  """(image, mask) paths matched by stem; an unmatched file is an error naming it."""
  images, masks = _by_stem(image_dir), _by_stem(mask_dir)
  if not images:
    raise ValueError(f"image folder {image_dir} has no images ({', '.join(EXTENSIONS)})")
  for stem, path in images.items():
    if stem not in masks:
      raise FileNotFoundError(f"image {path} has no mask {os.path.join(mask_dir, stem)}.* ")
  for stem, path in masks.items():
    if stem not in images:
      raise FileNotFoundError(f"mask {path} has no image {os.path.join(image_dir, stem)}.*")
  # Numeric stems sort numerically (2.png before 10.png), others alphabetically.
  order = sorted(images, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
  return [(images[s], masks[s]) for s in order]


def read_mask(path: str) -> np.ndarray:
  """The raw mask values as [H, W] uint8/int; a color mask is an error naming the file."""
  try:
    with Image.open(path) as im:
      array = np.asarray(im)
  except (OSError, SyntaxError, ValueError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"cannot read mask {path}: {reason}") from None
  if array.ndim == 3:
    if array.shape[-1] in (3, 4) and np.all(array[..., :3] == array[..., :1]):
      array = array[..., 0]  # gray saved as RGB(A)
    else:
      raise ValueError(f"mask {path} is a color image; expected class indices (or 0/255)")
  return array


def load(
    arg: str, split: str, image_size: int | None = None, data_config=None
) -> dict[str, ArraySource]:
  """Every split as uint8 [N, H, W, C] images and int32 [N, H, W] class maps."""
  del split, image_size  # the dispatcher slices; the transform crops
  skip_bad = bool(data_config.skip_bad)
  workers = default_workers(int(data_config.workers))
  pairs = {name: pair_files(*dirs) for name, dirs in split_dirs(arg).items()}
  every = [p for ps in pairs.values() for p in ps]
  headers = parallel_map(lambda p: _try(probe, p[0], skip_bad), every, workers)
  mode = decode_mode([h for h in headers if h is not None])

  def read_pair(pair):
    image_path, mask_path = pair
    image = _try(decode, EncodedImage(image_path, mode=mode), skip_bad)
    mask = _try(read_mask, mask_path, skip_bad)
    if image is None or mask is None:
      return None
    if image.shape[:2] != mask.shape:
      raise ValueError(
          f"image {image_path} is {image.shape[1]}x{image.shape[0]} but mask {mask_path} is "
          f"{mask.shape[1]}x{mask.shape[0]}"
      )
    return image, mask

  read = dict(zip(every, parallel_map(read_pair, every, workers), strict=True))
  skipped = [img for (img, _), r in read.items() if r is None]
  good = [(pair, r) for pair, r in read.items() if r is not None]
  if not good:
    raise ValueError(f"dataset segfolder:{arg}: no readable image/mask pair")
  first_pair, (first_image, _) = good[0]
  for pair, (image, _) in good:
    if image.shape != first_image.shape:
      raise ValueError(
          f"images differ in size: {first_pair[0]} is {first_image.shape[1]}x{first_image.shape[0]}"
          f", {pair[0]} is {image.shape[1]}x{image.shape[0]} (segfolder needs one size)"
      )

  values = np.unique(np.concatenate([np.unique(m) for _, (_, m) in good]))
  binary = bool(np.all(np.isin(values, (0, 255))) and 255 in values)
  num_classes = 2 if binary else int(values.max()) + 1
  if binary:
    log.info("segfolder:%s: binary masks, 0 -> class 0, 255 -> class 1", arg)

  sources = {}
  for name, split_pairs in pairs.items():
    rows = [(i, read[p]) for i, p in enumerate(split_pairs) if read[p] is not None]
    if not rows:
      raise ValueError(f"split {name} of segfolder:{arg} has no readable image/mask pair")
    masks = np.stack([m for _, (_, m) in rows]).astype(np.int32)
    sources[name] = ArraySource(
        images=np.stack([img for _, (img, _) in rows]),
        labels=(masks > 0).astype(np.int32) if binary else masks,
        num_classes=num_classes, task="segmentation",
        ids=np.array([i for i, _ in rows], np.int64),
        names=np.array([split_pairs[i][1] for i, _ in rows]),
        skipped=[p[0] for p in split_pairs if read[p] is None],
    )
  if skipped:
    log.warning("segfolder:%s: skipped %d unreadable pairs", arg, len(skipped))
  return sources


def _try(fn, arg, skip_bad: bool):
  try:
    return fn(arg)
  except ValueError as e:
    if not skip_bad:
      raise
    log.warning("skipping %s", e)
    return None
