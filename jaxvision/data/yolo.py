"""`yolo:DIR`: the ultralytics (YOLO) layout.

    DIR/images/{split}/*.jpg|png        one split per sub-folder (train, val, ...)
    DIR/labels/{split}/{stem}.txt       one box per line: class cx cy w h, normalised to [0, 1]
    DIR/data.yaml ('names': a list, or {index: name}) or DIR/classes.txt (a name per line)

An image without a label file has no objects (a background image, as ultralytics reads it).
Every image header is read, since normalised boxes need the image size. A malformed line, an
unknown class, a box outside the image or without positive size, or an unreadable image stops
the run with a line naming the file and line, or with data.skip_bad is left out and counted.
"""

from __future__ import annotations

import os

import numpy as np

from jaxvision.data.coco import build_source
from jaxvision.data.decode import (
  IMAGE_EXTENSIONS,
  decode_mode,
  default_workers,
  parallel_map,
  probe,
)
from jaxvision.data.detection_source import Problems, check_box, maybe_cache
from jaxvision.data.splits import named_splits


def class_names(root: str) -> tuple[str, ...]:
  """Class names from DIR/data.yaml's 'names' or DIR/classes.txt."""
  yaml_path = os.path.join(root, "data.yaml")
  txt_path = os.path.join(root, "classes.txt")
  if os.path.isfile(yaml_path):
    import yaml

    try:
      with open(yaml_path, encoding="utf-8") as f:
        names = (yaml.safe_load(f) or {}).get("names")
    except (yaml.YAMLError, AttributeError) as e:
      raise ValueError(f"{yaml_path}: not a YAML mapping with 'names' ({e})") from None
    if isinstance(names, dict):
      try:
        keys = sorted(int(k) for k in names)
      except (TypeError, ValueError):
        raise ValueError(f"{yaml_path}: 'names' keys must be class indices") from None
      if keys != list(range(len(keys))):
        raise ValueError(f"{yaml_path}: 'names' must number the classes 0..{len(keys) - 1}")
      names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, list) or not names:
      raise ValueError(f"{yaml_path}: 'names' must be a non-empty list or {{index: name}}")
    return tuple(str(n) for n in names)
  if os.path.isfile(txt_path):
    with open(txt_path, encoding="utf-8") as f:
      names = tuple(line.strip() for line in f if line.strip())
    if names:
      return names
    raise ValueError(f"{txt_path} lists no class names")
  raise FileNotFoundError(f"dataset yolo:{root}: no data.yaml (with 'names') or classes.txt")


def split_dirs(root: str) -> dict[str, str]:
  """{split: DIR/images/{split}}."""
  if not root:
    raise ValueError("dataset 'yolo:' needs a directory, e.g. yolo:/data/coco128")
  images = os.path.join(root, "images")
  if not os.path.isdir(images):
    raise FileNotFoundError(f"dataset yolo:{root}: no images/ folder")
  splits = {d: os.path.join(images, d) for d in sorted(os.listdir(images))
            if os.path.isdir(os.path.join(images, d)) and not d.startswith(".")}
  if not splits:
    raise FileNotFoundError(f"dataset yolo:{root}: no split folders in images/")
  return splits


def read_labels(path: str, width: int, height: int, num_classes: int, problems: Problems):
  """(boxes [n, 4] xyxy pixels, classes [n]) of one label file (missing: no objects)."""
  boxes, classes = [], []
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      parts = line.split()
      try:
        if len(parts) != 5:
          raise ValueError
        cls = int(parts[0])
        cx, cy, w, h = (float(v) for v in parts[1:])
      except ValueError:
        problems.report(f"{where}: {line.strip()!r} is not 'class cx cy w h'")
        continue
      if not 0 <= cls < num_classes:
        problems.report(f"{where}: unknown class {cls} ({num_classes} classes)")
        continue
      box = check_box(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                       (cy + h / 2) * height), width, height, where, problems)
      if box is not None:
        boxes.append(box)
        classes.append(cls)
  return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32)


def load(arg: str, split: str, image_size: int | None = None, data_config=None):
  """The splits `split` names, each a DetectionSource."""
  del image_size
  dirs = split_dirs(arg)
  unknown = [s for s in named_splits(split) if s not in dirs]
  if unknown:
    raise ValueError(f"split {split!r}: unknown split {unknown[0]!r}; yolo:{arg} has "
                     f"{sorted(dirs)}")
  names = class_names(arg)
  skip_bad = bool(data_config.skip_bad)
  workers = default_workers(int(data_config.workers))
  sources = {}
  for s in named_splits(split):
    problems = Problems(skip_bad, f"yolo:{arg} {s}")
    images = sorted(os.path.join(dirs[s], f) for f in os.listdir(dirs[s])
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not images:
      raise ValueError(f"split folder {dirs[s]} has no .jpg/.png images")

    def header(path):
      try:
        return probe(path), None
      except ValueError as e:
        return None, str(e)

    headers = parallel_map(header, images, workers)
    rows = []
    for i, (path, (h, error)) in enumerate(zip(images, headers, strict=True)):
      if h is None:
        problems.report(error)
        continue
      stem = os.path.splitext(os.path.basename(path))[0]
      label = os.path.join(arg, "labels", s, stem + ".txt")
      boxes, classes = read_labels(label, h.width, h.height, len(names), problems)
      areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
      rows.append((path, (h.height, h.width), boxes, classes, np.zeros(len(boxes), bool), areas,
                   i))
    problems.log_summary()
    if not rows:
      raise ValueError(f"split {s} of yolo:{arg} has no readable image")
    mode = decode_mode([h for h, _ in headers if h is not None])
    source = build_source(rows, mode, range(len(names)), names, problems.lines)
    sources[s] = maybe_cache(source, data_config, f"yolo:{arg} {s}")
  return sources
