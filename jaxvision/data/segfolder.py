"""`segfolder:DIR`: images and their segmentation masks, paired by file name.

Layouts:
  DIR/image/*.png + DIR/label/*.png (or DIR/mask/)      one split, 'train'
  DIR/SPLIT/image/ + DIR/SPLIT/label/                   one split per such sub-folder
A mask is matched to its image by file stem (`image/7.png` <-> `label/7.png` or `label/7.tif`);
two images (or two masks) of one stem, `7.png` and `7.jpg`, are an error naming both.

What a mask value means is decided once, over the masks of every split:
  * `data.mask_values = (v0, v1, ...)` declares it: value v_k is class k; any other value is an
    error naming the mask and the value.
  * Otherwise binary masks {0, 255} are classes {0, 1}, and any other values are the class
    indices themselves: below `config.num_classes` when that is set, else exactly 0..K-1 (K
    classes). A stray 255 among {0, 1, 2}, or a 16-bit {0, 1000}, is then an error naming the
    file and the value, not a silent 256- or 1001-class model. The loader sees only the data:
    the run's num_classes is checked by `MaskSource.check_num_classes`.
Masks that hold one value (one class) are an error. A palette ('P') mask gives its palette
indices. All images must share one size: evaluation runs on whole images (so the held-out pixel
error covers every pixel), and batches need one shape. Segmentation data sets are small, so
everything is decoded into memory up front.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from jaxvision.data.decode import (
  EncodedImage,
  allow_pixels,
  decode,
  decode_mode,
  default_workers,
  open_image,
  parallel_map,
  probe,
)
from jaxvision.data.source import ArraySource

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_DIRS = ("label", "mask", "labels", "masks")
IMAGE_DIRS = ("image", "images")
# How class ids were made from mask values: listed in data.mask_values, binary 0/255 -> 0/1, or
# the values themselves.
RULES = ("declared", "binary", "indices")
log = logging.getLogger(__name__)


@dataclasses.dataclass
class MaskSource(ArraySource):
  """A segmentation split, with what its masks' values are (to check them against a run).

  Attributes:
    mask_values: the distinct values found in the masks of every split, sorted.
    mask_files: for each of `mask_values`, a mask that holds it (what error messages name).
    class_values: the mask value of each class id ('declared' and 'binary'; () for 'indices').
    mask_rule: one of RULES: how the labels were made from the mask values.
    uri: the dataset, as given.
  """

  mask_values: tuple[int, ...] = ()
  mask_files: tuple[str, ...] = ()
  class_values: tuple[int, ...] = ()
  mask_rule: str = "indices"
  uri: str = ""

  def _with_masks(self, source: ArraySource) -> MaskSource:
    base = {f.name: getattr(source, f.name) for f in dataclasses.fields(ArraySource)}
    extra = {f: getattr(self, f) for f in ("mask_values", "mask_files", "class_values",
                                            "mask_rule", "uri")}
    return MaskSource(**base, **extra)

  def take(self, indices: np.ndarray, id_offset: int = 0) -> MaskSource:
    """The examples at `indices`, with ids shifted by `id_offset`."""
    return self._with_masks(ArraySource.take(self, indices, id_offset))

  @staticmethod
  def concat(parts: list[MaskSource]) -> MaskSource:
    """The examples of `parts` (of one dataset), one after another."""
    if len(parts) == 1:
      return parts[0]
    return parts[0]._with_masks(ArraySource.concat(parts))

  def check_num_classes(self, num_classes: int) -> None:
    """One-line ValueError unless the masks fit the run's `num_classes` (0: from the data)."""
    file_of = dict(zip(self.mask_values, self.mask_files, strict=True))
    if self.mask_rule == "declared":
      if num_classes and num_classes != len(self.class_values):
        raise ValueError(
            f"config.num_classes={num_classes} but data.mask_values={self.class_values} lists "
            f"{len(self.class_values)} classes ({self.uri})")
      return
    if self.mask_rule == "binary":
      if num_classes and num_classes != 2:
        raise ValueError(
            f"mask {file_of[255]} has value 255: masks of 0/255 are binary (2 classes), but "
            f"config.num_classes={num_classes}; set num_classes=2, or say which class each "
            "value is with data.mask_values")
      return
    if num_classes:
      above = [v for v in self.mask_values if v >= num_classes]
      if above:
        v = above[-1] if _looks_ignored(above[-1], self.mask_values) else above[0]
        raise ValueError(
            f"label {v} out of range for {num_classes} classes in {file_of[v]} "
            f"(config.num_classes={num_classes}){_ignore_hint(v, self.mask_values)}")
      return
    missing = next(i for i in range(len(self.mask_values) + 1) if i not in file_of)
    if missing < len(self.mask_values):
      v = min(x for x in self.mask_values if x > missing)
      if _looks_ignored(self.mask_values[-1], self.mask_values):
        v = self.mask_values[-1]
      raise ValueError(
          f"mask {file_of[v]} has value {v} but no mask has {missing}: the masks of {self.uri} "
          f"hold {_listed(self.mask_values)}, not the class indices 0..K-1; set "
          f"{_declaration(self.mask_values)} (the values in class order) or "
          f"config.num_classes{_ignore_hint(v, self.mask_values)}")


def _looks_ignored(value: int, values) -> bool:
  """255 over class indices far below it: the 'ignore' label of VOC-style masks."""
  return value == 255 and len(values) > 1 and sorted(values)[-2] < 64


def _ignore_hint(value: int, values) -> str:
  if not _looks_ignored(value, values):
    return ""
  return ("; 255 looks like an 'ignore' label, which is not supported yet: relabel those pixels, "
          "or make 255 a class of its own in data.mask_values")


def _listed(values, most: int = 8) -> str:
  shown = ", ".join(str(v) for v in values[:most])
  return "{" + shown + (f", ... ({len(values)} values)" if len(values) > most else "") + "}"


def _declaration(values) -> str:
  if len(values) > 16:
    return "data.mask_values"
  return f"data.mask_values=({', '.join(str(v) for v in values)})"


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


def _by_stem(folder: str, what: str) -> dict[str, str]:
  """{stem: path} of the folder's files; two files of one stem are an error naming both."""
  files = sorted(
      f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS) and not f.startswith(".")
  )
  found: dict[str, str] = {}
  for f in files:
    stem, path = os.path.splitext(f)[0], os.path.join(folder, f)
    if stem in found:
      raise ValueError(f"two {what}s named {stem}: {found[stem]} and {path} (which one pairs by "
                       "name is ambiguous); keep one")
    found[stem] = path
  return found


def pair_files(image_dir: str, mask_dir: str) -> list[tuple[str, str]]:
  """(image, mask) paths matched by stem; an unmatched or ambiguous file is an error naming it."""
  images, masks = _by_stem(image_dir, "image"), _by_stem(mask_dir, "mask")
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


def read_mask(path: str, max_pixels: int = 0) -> np.ndarray:
  """The raw mask values as [H, W] integers; a color or non-integer mask is an error naming it."""
  with open_image(path, path, max_pixels, what="mask") as im:
    try:
      array = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:  # truncated pixel data
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"cannot read mask {path}: {reason}") from None
  if array.ndim == 3:
    if array.shape[-1] in (3, 4) and np.all(array[..., :3] == array[..., :1]):
      array = array[..., 0]  # gray saved as RGB(A)
    else:
      raise ValueError(f"mask {path} is a color image; expected class indices (or 0/255)")
  if array.dtype.kind == "f":
    fractional = array[array != np.round(array)]
    if fractional.size:
      raise ValueError(f"mask {path} has value {fractional[0]:g}; expected integer class indices")
    array = array.astype(np.int64)
  return array.astype(np.uint8) if array.dtype == bool else array


def declared_values(mask_values) -> tuple[int, ...]:
  """data.mask_values as distinct ints (() when not set); a bad declaration names the key."""
  values = tuple(mask_values or ())
  if not values:
    return ()
  text = f"data.mask_values={values}"
  if not all(float(v) == int(v) for v in values):
    raise ValueError(f"{text}: mask values are integers")
  values = tuple(int(v) for v in values)
  if len(set(values)) != len(values):
    twice = next(v for v in values if values.count(v) > 1)
    raise ValueError(f"{text} lists {twice} twice")
  if len(values) < 2:
    raise ValueError(f"{text} lists one class; segmentation needs at least 2")
  return values


def mask_rule(found: dict[int, str], declared: tuple[int, ...], uri: str) -> str:
  """Which of RULES turns the `found` values ({value: a mask holding it}) into class ids;
  the errors the data alone shows (undeclared, negative or a single value) name a mask."""
  for v, path in found.items():
    if declared and v not in declared:
      raise ValueError(f"mask {path} has value {v}, which data.mask_values={declared} does not "
                       "list")
    if not declared and v < 0:
      raise ValueError(f"mask {path} has value {v}; class indices are >= 0 (or declare the "
                       "values in data.mask_values)")
  if len(found) < 2:
    (v, path), = found.items()
    raise ValueError(f"segmentation needs at least 2 classes; the masks of {uri} hold one value, "
                     f"{v} (e.g. {path})")
  if declared:
    return "declared"
  return "binary" if set(found) == {0, 255} else "indices"


def to_labels(masks: np.ndarray, rule: str, class_values: tuple[int, ...]) -> np.ndarray:
  """[N, H, W] int32 class ids of raw `masks` under `rule` (values already validated)."""
  if rule == "indices":
    return masks.astype(np.int32)
  order = np.argsort(class_values)
  position = np.searchsorted(np.asarray(class_values)[order], masks)
  return order[position].astype(np.int32)


def load(
    arg: str, split: str, image_size: int | None = None, data_config=None
) -> dict[str, MaskSource]:
  """Every split as uint8 [N, H, W, C] images and int32 [N, H, W] class maps."""
  del split, image_size  # the dispatcher slices; the transform crops
  uri = f"segfolder:{arg}"
  skip_bad = bool(data_config.skip_bad)
  workers = default_workers(int(data_config.workers))
  max_pixels = int(data_config.max_image_pixels)
  declared = declared_values(data_config.mask_values)
  allow_pixels(max_pixels)
  pairs = {name: pair_files(*dirs) for name, dirs in split_dirs(arg).items()}
  every = [p for ps in pairs.values() for p in ps]
  headers = parallel_map(lambda p: _try(lambda q: probe(q, max_pixels), p[0], skip_bad), every,
                         workers)
  mode = decode_mode([h for h in headers if h is not None])

  def read_pair(pair):
    image_path, mask_path = pair
    image = _try(decode, EncodedImage(image_path, mode=mode, max_pixels=max_pixels), skip_bad)
    mask = _try(lambda p: read_mask(p, max_pixels), mask_path, skip_bad)
    if image is None or mask is None:
      return None
    if image.shape[:2] != mask.shape:
      raise ValueError(
          f"image {image_path} is {image.shape[1]}x{image.shape[0]} but mask {mask_path} is "
          f"{mask.shape[1]}x{mask.shape[0]}"
      )
    return image, mask, np.unique(mask)

  read = dict(zip(every, parallel_map(read_pair, every, workers), strict=True))
  skipped = [img for (img, _), r in read.items() if r is None]
  good = [(pair, r) for pair, r in read.items() if r is not None]
  if not good:
    raise ValueError(f"dataset {uri}: no readable image/mask pair")
  first_pair, (first_image, _, _) = good[0]
  for pair, (image, _, _) in good:
    if image.shape != first_image.shape:
      raise ValueError(
          f"images differ in size: {first_pair[0]} is {first_image.shape[1]}x{first_image.shape[0]}"
          f", {pair[0]} is {image.shape[1]}x{image.shape[0]} (segfolder needs one size)"
      )

  found: dict[int, str] = {}
  for (_, mask_path), (_, _, values) in good:
    for v in values.tolist():
      found.setdefault(int(v), mask_path)
  found = dict(sorted(found.items()))
  rule = mask_rule(found, declared, uri)
  class_values = declared or ((0, 255) if rule == "binary" else ())
  num_classes = len(class_values) or max(found) + 1
  if rule == "binary":
    log.info("%s: binary masks, 0 -> class 0, 255 -> class 1", uri)

  sources = {}
  for name, split_pairs in pairs.items():
    rows = [(i, read[p]) for i, p in enumerate(split_pairs) if read[p] is not None]
    if not rows:
      raise ValueError(f"split {name} of {uri} has no readable image/mask pair")
    masks = np.stack([m for _, (_, m, _) in rows])
    sources[name] = MaskSource(
        images=np.stack([img for _, (img, _, _) in rows]),
        labels=to_labels(masks, rule, class_values),
        num_classes=num_classes, task="segmentation",
        ids=np.array([i for i, _ in rows], np.int64),
        names=np.array([split_pairs[i][1] for i, _ in rows]),
        skipped=[p[0] for p in split_pairs if read[p] is None],
        mask_values=tuple(found), mask_files=tuple(found.values()), class_values=class_values,
        mask_rule=rule, uri=uri,
    )
  if skipped:
    log.warning("%s: skipped %d unreadable pairs", uri, len(skipped))
  return sources


def _try(fn, arg, skip_bad: bool):
  try:
    return fn(arg)
  except ValueError as e:
    if not skip_bad:
      raise
    log.warning("skipping %s", e)
    return None
