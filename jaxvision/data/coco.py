"""`coco:DIR`: COCO's own layout, boxes and (with data.masks) instance masks.

    DIR/annotations/instances_{split}.json      e.g. instances_train2017.json
    DIR/{split}/{file_name}                     the images the json lists

The split name is the file's `{split}` (`coco:DIR` + `train2017[:90%]`); only the splits the
split expression names are read. Category ids map to contiguous classes in sorted id order
(class k is category id `category_ids[k]`, names kept); crowd annotations (`iscrowd`) are
kept as ignored boxes, with COCO's own `area`; images without annotations are kept. Boxes are
COCO's [x, y, width, height] in pixels, clipped to the image when they cross its border by
at most a pixel.

A bad annotation (box outside the image, no positive size, unknown image or category id, a
malformed bbox) or a missing image file stops the run with a line naming the file and the
annotation id, or with data.skip_bad is left out and counted.

With data.masks, each annotation's `segmentation` is read too: polygons (lists of x, y
coordinates), uncompressed RLE (`counts` a list, as COCO's crowd regions) or compressed RLE
(`counts` a string). They are checked when the file is read (a polygon needs at least three
finite points; an RLE's size must be the image's and its runs must cover it exactly, since
pycocotools' decoder trusts them), kept as they are, and decoded with pycocotools.mask per
example when a batch is made (`SegmentationMasks`), so a large split never holds its pixels.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxvision.data.decode import EncodedImage, default_workers
from jaxvision.data.detection_source import (
  DetectionSource,
  Problems,
  check_box,
  image_mode,
  masks_wanted,
  maybe_cache,
  probe_all,
)
from jaxvision.data.splits import named_splits

PREFIX, SUFFIX = "instances_", ".json"


class SegmentationMasks:
  """An image's COCO segmentations, decoded on demand into uint8 [n, H, W] 0/1 masks."""

  def __init__(self, segmentations: list, height: int, width: int):
    self.segmentations = segmentations
    self.height = height
    self.width = width

  def __len__(self) -> int:
    return len(self.segmentations)

  def decode(self) -> np.ndarray:
    """uint8 [n, H, W]: each segmentation's pixels (polygons merged into one mask)."""
    from pycocotools import mask as mask_utils

    h, w = self.height, self.width
    out = np.zeros((len(self), h, w), np.uint8)
    for k, seg in enumerate(self.segmentations):
      if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
      elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
      else:
        rle = {"size": [h, w], "counts": seg["counts"]}
      out[k] = mask_utils.decode(rle)
    return out


def _rle_string_runs(counts: bytes) -> list[int]:
  """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString, in Python)."""
  runs, p = [], 0
  while p < len(counts):
    x, k, more = 0, 0, True
    while more:
      if p >= len(counts):
        raise ValueError("the string ends inside a number")
      c = counts[p] - 48
      x |= (c & 0x1f) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(runs) > 2:
      x += runs[-2]
    runs.append(x)
  return runs


def check_segmentation(seg, height: int, width: int, where: str, problems: Problems):
  """`seg` ready for SegmentationMasks (compressed counts as bytes), or None when it is
  malformed (reported: not a polygon list or RLE, too few points, an RLE of another size or
  whose runs do not cover the image)."""
  if isinstance(seg, list):
    if not seg or not all(isinstance(p, list) for p in seg):
      problems.report(f"{where}: segmentation is not a list of polygons")
      return None
    for p in seg:
      if len(p) < 6 or len(p) % 2 or not all(
          isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in p):
        problems.report(f"{where}: malformed polygon (needs x, y pairs of at least 3 points, "
                        f"got {len(p)} values)")
        return None
    return seg
  if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
    problems.report(f"{where}: segmentation is neither polygons nor an RLE with size and counts")
    return None
  size = seg["size"]
  if not isinstance(size, list) or len(size) != 2 or not all(
      isinstance(v, int) for v in size) or list(size) != [height, width]:
    problems.report(f"{where}: RLE size {size!r} is not the image's [height, width] = "
                    f"[{height}, {width}]")
    return None
  counts = seg["counts"]
  if isinstance(counts, list):
    runs = counts
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in runs):
      problems.report(f"{where}: RLE counts are not all integers")
      return None
  elif isinstance(counts, (str, bytes)):
    counts = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
    try:
      runs = _rle_string_runs(counts)
    except ValueError as e:
      problems.report(f"{where}: compressed RLE counts are malformed ({e})")
      return None
  else:
    problems.report(f"{where}: RLE counts are neither a list nor a string")
    return None
  if any(r < 0 for r in runs) or sum(runs) != height * width:
    problems.report(f"{where}: RLE runs cover {sum(runs)} pixels (with negative runs: "
                    f"{any(r < 0 for r in runs)}), not the image's {height}x{width}")
    return None
  return {"size": [height, width], "counts": counts}


def annotation_files(root: str) -> dict[str, str]:
  """{split: annotation json} of DIR/annotations/instances_{split}.json."""
  if not root:
    raise ValueError("dataset 'coco:' needs a directory, e.g. coco:/data/coco")
  folder = os.path.join(root, "annotations")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"dataset coco:{root}: no annotations/ folder")
  files = {f[len(PREFIX):-len(SUFFIX)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
           if f.startswith(PREFIX) and f.endswith(SUFFIX)}
  if not files:
    raise FileNotFoundError(f"dataset coco:{root}: no annotations/instances_{{split}}.json")
  return files


def read_json(path: str) -> dict:
  """The parsed json file; a ValueError names the file and the place it is malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")\
        from None
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e.strerror}") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
      data.get("categories"), list):
    raise ValueError(f"{path} is not a COCO instances file (needs 'images' and 'categories')")
  return data


def categories(data: dict, path: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """(sorted category ids, their names) of a COCO file."""
  cats = {}
  for c in data["categories"]:
    if not isinstance(c, dict) or not isinstance(c.get("id"), int):
      raise ValueError(f"{path}: category {c!r} has no integer 'id'")
    if c["id"] in cats:
      raise ValueError(f"{path}: category id {c['id']} appears twice")
    cats[c["id"]] = str(c.get("name", c["id"]))
  if not cats:
    raise ValueError(f"{path} defines no categories")
  ids = tuple(sorted(cats))
  return ids, tuple(cats[i] for i in ids)


def read_split(path: str, image_dir: str, cat_ids: tuple[int, ...], problems: Problems,
               workers: int, data: dict | None = None, masks: bool = False):
  """Per image: (EncodedImage path, (H, W), boxes, classes, ignore, areas, image id,
  SegmentationMasks or None), in the file's image order, the bad annotations and images
  reported to `problems`; segmentations are read with `masks`."""
  data = data if data is not None else read_json(path)
  index = {c: k for k, c in enumerate(cat_ids)}
  images, order = {}, []
  for im in data["images"]:
    try:
      image_id, name = int(im["id"]), str(im["file_name"])
      width, height = int(im["width"]), int(im["height"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: image entry {im!r} needs id, file_name, width and height")\
          from None
    if image_id in images:
      raise ValueError(f"{path}: image id {image_id} appears twice")
    images[image_id] = {"file": os.path.join(image_dir, name), "size": (height, width),
                        "boxes": [], "classes": [], "ignore": [], "areas": [], "segs": []}
    order.append(image_id)
  for ann in data.get("annotations", []):
    ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
    where = f"{path}: annotation {ann_id}"
    if not isinstance(ann, dict):
      problems.report(f"{where} is not an object")
      continue
    img = images.get(ann.get("image_id"))
    if img is None:
      problems.report(f"{where}: unknown image_id {ann.get('image_id')!r}")
      continue
    if ann.get("category_id") not in index:
      problems.report(f"{where}: unknown category_id {ann.get('category_id')!r}")
      continue
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
        isinstance(v, (int, float)) for v in bbox):
      problems.report(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
      continue
    x, y, w, h = (float(v) for v in bbox)
    height, width = img["size"]
    box = check_box((x, y, x + w, y + h), width, height,
                    f"{where} ({os.path.basename(img['file'])})", problems)
    if box is None:
      continue
    if masks:
      seg = check_segmentation(ann.get("segmentation"), height, width,
                               f"{where} ({os.path.basename(img['file'])})", problems)
      if seg is None:
        continue
      img["segs"].append(seg)
    img["boxes"].append(box)
    img["classes"].append(index[ann["category_id"]])
    img["ignore"].append(bool(ann.get("iscrowd", 0)))
    area = ann.get("area")
    img["areas"].append(float(area) if isinstance(area, (int, float)) else w * h)
  files = [images[i]["file"] for i in order]
  readable = probe_all(files, problems, workers)
  rows = []
  for image_id, ok in zip(order, readable, strict=True):
    if ok:
      img = images[image_id]
      rows.append((img["file"], img["size"], np.asarray(img["boxes"], np.float32).reshape(-1, 4),
                   np.asarray(img["classes"], np.int32), np.asarray(img["ignore"], bool),
                   np.asarray(img["areas"], np.float32), image_id,
                   SegmentationMasks(img["segs"], *img["size"]) if masks else None))
  return rows


def build_source(rows, mode: str, cat_ids, names, skipped) -> DetectionSource:
  """A DetectionSource from `read_split`-style rows."""
  return DetectionSource(
      images=[EncodedImage(r[0], mode=mode) for r in rows],
      boxes=[r[2] for r in rows], classes=[r[3] for r in rows], ignore=[r[4] for r in rows],
      areas=[r[5] for r in rows], sizes=np.asarray([r[1] for r in rows], np.int32).reshape(-1, 2),
      num_classes=len(cat_ids), class_names=tuple(names), category_ids=tuple(cat_ids),
      image_ids=np.asarray([r[6] for r in rows], np.int64), skipped=list(skipped),
      masks=[r[7] for r in rows] if rows and len(rows[0]) > 7 and rows[0][7] is not None
      else None)


def load(arg: str, split: str, image_size: int | None = None, data_config=None
         ) -> dict[str, DetectionSource]:
  """The splits `split` names, each a DetectionSource (decoded into memory when it fits)."""
  del image_size
  files = annotation_files(arg)
  wanted = [s for s in named_splits(split) if s in files] or list(files)[:1]
  unknown = [s for s in named_splits(split) if s not in files]
  if unknown:
    raise ValueError(f"split {split!r}: unknown split {unknown[0]!r}; coco:{arg} has "
                     f"{sorted(files)}")
  skip_bad = bool(data_config.skip_bad)
  workers = default_workers(int(data_config.workers))
  parsed = {s: read_json(files[s]) for s in wanted}
  cat_ids, names = categories(parsed[wanted[0]], files[wanted[0]])
  sources = {}
  for s in wanted:
    if categories(parsed[s], files[s])[0] != cat_ids:
      raise ValueError(f"{files[s]}: its categories differ from those of {files[wanted[0]]}")
    problems = Problems(skip_bad, f"coco:{arg} {s}")
    rows = read_split(files[s], os.path.join(arg, s), cat_ids, problems, workers, parsed[s],
                      masks=masks_wanted(data_config))
    problems.log_summary()
    if not rows:
      raise ValueError(f"split {s} of coco:{arg} has no readable image")
    mode = image_mode([r[0] for r in rows], workers)
    source = build_source(rows, mode, cat_ids, names, problems.lines)
    sources[s] = maybe_cache(source, data_config, f"coco:{arg} {s}")
  return sources
