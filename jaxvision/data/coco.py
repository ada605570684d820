"""`coco:DIR`: COCO's own layout, boxes only.

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
  maybe_cache,
  probe_all,
)
from jaxvision.data.splits import named_splits

PREFIX, SUFFIX = "instances_", ".json"


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
               workers: int, data: dict | None = None):
  """Per image: (EncodedImage path, (H, W), boxes, classes, ignore, areas, image id), in the
  file's image order, the bad annotations and images reported to `problems`."""
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
                        "boxes": [], "classes": [], "ignore": [], "areas": []}
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
                   np.asarray(img["areas"], np.float32), image_id))
  return rows


def build_source(rows, mode: str, cat_ids, names, skipped) -> DetectionSource:
  """A DetectionSource from `read_split`-style rows."""
  return DetectionSource(
      images=[EncodedImage(r[0], mode=mode) for r in rows],
      boxes=[r[2] for r in rows], classes=[r[3] for r in rows], ignore=[r[4] for r in rows],
      areas=[r[5] for r in rows], sizes=np.asarray([r[1] for r in rows], np.int32).reshape(-1, 2),
      num_classes=len(cat_ids), class_names=tuple(names), category_ids=tuple(cat_ids),
      image_ids=np.asarray([r[6] for r in rows], np.int64), skipped=list(skipped))


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
    rows = read_split(files[s], os.path.join(arg, s), cat_ids, problems, workers, parsed[s])
    problems.log_summary()
    if not rows:
      raise ValueError(f"split {s} of coco:{arg} has no readable image")
    mode = image_mode([r[0] for r in rows], workers)
    source = build_source(rows, mode, cat_ids, names, problems.lines)
    sources[s] = maybe_cache(source, data_config, f"coco:{arg} {s}")
  return sources
