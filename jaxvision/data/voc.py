"""`voc:DIR`: Pascal VOC (DIR is a year folder such as VOCdevkit/VOC2012).

    DIR/ImageSets/Main/{split}.txt      one image stem per line (train, val, trainval, test)
    DIR/Annotations/{stem}.xml          size and objects (name, difficult, bndbox)
    DIR/JPEGImages/{stem}.jpg

Classes are the 20 VOC classes in the devkit's order, or the lines of DIR/classes.txt when it
exists. The devkit's boxes are inclusive 1-based pixel indices: xmin..xmax covers
xmax - xmin + 1 pixels, i.e. the continuous box (xmin - 1, xmax) used here. `difficult`
objects are kept as ignored boxes (left out of training targets; evaluation neither counts nor
misses them, as the devkit).

A malformed XML file, an unknown class name, a box outside the image or without positive size,
or a missing image stops the run with a line naming the file and the object, or with
data.skip_bad is left out and counted.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from jaxvision.data.coco import build_source
from jaxvision.data.decode import default_workers
from jaxvision.data.detection_source import Problems, check_box, image_mode, maybe_cache, probe_all
from jaxvision.data.splits import named_splits

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def split_files(root: str) -> dict[str, str]:
  """{split: DIR/ImageSets/Main/{split}.txt} (per-class lists such as cat_train.txt aside)."""
  if not root:
    raise ValueError("dataset 'voc:' needs a directory, e.g. voc:/data/VOCdevkit/VOC2012")
  folder = os.path.join(root, "ImageSets", "Main")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"dataset voc:{root}: no ImageSets/Main/ folder")
  files = {}
  for f in sorted(os.listdir(folder)):
    stem = f[:-4]
    if f.endswith(".txt") and not any(stem.startswith(c + "_") for c in VOC_CLASSES):
      files[stem] = os.path.join(folder, f)
  if not files:
    raise FileNotFoundError(f"dataset voc:{root}: no ImageSets/Main/{{split}}.txt")
  return files


def class_names(root: str) -> tuple[str, ...]:
  """DIR/classes.txt's names when present, else the 20 VOC classes."""
  path = os.path.join(root, "classes.txt")
  if not os.path.isfile(path):
    return VOC_CLASSES
  with open(path, encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names or len(set(names)) != len(names):
    raise ValueError(f"{path}: needs one distinct class name per line")
  return names


def parse_annotation(path: str, index: dict[str, int], problems: Problems):
  """((H, W), boxes [n, 4], classes [n], difficult [n], areas [n]) of one XML file, or None
  when the file cannot be used (reported)."""
  try:
    root = ET.parse(path).getroot()
  except (ET.ParseError, OSError) as e:
    problems.report(f"{path}: not a readable VOC annotation ({e})")
    return None
  try:
    size = root.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
  except (AttributeError, TypeError, ValueError):
    problems.report(f"{path}: no <size> with integer <width> and <height>")
    return None
  boxes, classes, difficult = [], [], []
  for k, obj in enumerate(root.findall("object")):
    name = (obj.findtext("name") or "").strip()
    where = f"{path}: object {k} ({name or 'no name'})"
    if name not in index:
      problems.report(f"{where}: unknown class name {name!r}")
      continue
    try:
      bb = obj.find("bndbox")
      x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
    except (AttributeError, TypeError, ValueError):
      problems.report(f"{where}: no <bndbox> with numeric xmin, ymin, xmax, ymax")
      continue
    box = check_box((x1 - 1, y1 - 1, x2, y2), width, height, where, problems)
    if box is None:
      continue
    boxes.append(box)
    classes.append(index[name])
    difficult.append((obj.findtext("difficult") or "0").strip() == "1")
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return (height, width), boxes, np.asarray(classes, np.int32), np.asarray(difficult, bool), areas


def load(arg: str, split: str, image_size: int | None = None, data_config=None):
  """The splits `split` names, each a DetectionSource."""
  del image_size
  files = split_files(arg)
  unknown = [s for s in named_splits(split) if s not in files]
  if unknown:
    raise ValueError(f"split {split!r}: unknown split {unknown[0]!r}; voc:{arg} has "
                     f"{sorted(files)}")
  names = class_names(arg)
  index = {n: i for i, n in enumerate(names)}
  skip_bad = bool(data_config.skip_bad)
  workers = default_workers(int(data_config.workers))
  sources = {}
  for s in named_splits(split):
    problems = Problems(skip_bad, f"voc:{arg} {s}")
    with open(files[s], encoding="utf-8") as f:
      stems = [line.split()[0] for line in f if line.strip()]
    # In file order, one after another: the skipped lines come out in a stable order.
    parsed = [parse_annotation(os.path.join(arg, "Annotations", stem + ".xml"), index, problems)
              for stem in stems]
    images = [os.path.join(arg, "JPEGImages", stem + ".jpg") for stem in stems]
    readable = probe_all(images, problems, workers)
    rows = [(image, *p, i)
            for i, (image, p, ok) in enumerate(zip(images, parsed, readable, strict=True))
            if ok and p is not None]
    problems.log_summary()
    if not rows:
      raise ValueError(f"split {s} of voc:{arg} has no readable image")
    source = build_source(rows, image_mode([r[0] for r in rows], workers), range(len(names)),
                          names, problems.lines)
    sources[s] = maybe_cache(source, data_config, f"voc:{arg} {s}")
  return sources
