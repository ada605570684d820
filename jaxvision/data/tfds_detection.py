"""TFDS detection datasets (`tfds:coco/2017`, `tfds:voc/2012`, ...) as DetectionSources.

A TFDS dataset is a detection dataset when its features hold `objects` with a `bbox`
(BBoxFeature: (ymin, xmin, ymax, xmax) normalised to [0, 1]) and a `label`. The selected
splits are read once, keeping each image ENCODED (tfds.decode.SkipDecoding) beside its boxes in
pixels; the detection transform decodes batch by batch. Crowd (`is_crowd`) and difficult
(`is_difficult`) objects are ignored boxes; COCO's `area` is kept. TFDS numbers the classes
0..K-1 itself (its COCO drops the original category ids), so these are the category ids.

Encoded images stay in host memory, so a split larger than data.cache_mb on disk (TFDS's
coco/2017 train is about 18 GB) is refused with a pointer to `coco:DIR`, which reads the COCO
files directly.
"""

from __future__ import annotations

import io

import numpy as np

from jaxvision.data.decode import EncodedImage, allow_pixels, open_image
from jaxvision.data.detection_source import DetectionSource, Problems, check_box
from jaxvision.data.source import select_split
from jaxvision.data.splits import named_splits, split_indices
from jaxvision.data.tfds_builder import as_dataset, import_tf, split_sizes


def is_detection(builder) -> bool:
  """Whether the dataset's features hold objects with boxes and labels."""
  features = builder.info.features
  try:
    return "objects" in features and all(k in features["objects"] for k in ("bbox", "label"))
  except TypeError:  # objects that are not a feature dict
    return False


def _split_bytes(builder, name: str) -> int:
  split = builder.info.splits.get(name) if hasattr(builder.info.splits, "get") else None
  return int(getattr(split, "num_bytes", 0) or 0) if split is not None else 0


def read_split(builder, name: str, data_config) -> DetectionSource:
  """Every example of split `name` (a plain split name) as a DetectionSource."""
  tf, tfds = import_tf()
  cache_mb = float(data_config.cache_mb)
  if _split_bytes(builder, name) > cache_mb * 2**20:
    raise ValueError(
        f"tfds:{builder.name} {name} is {_split_bytes(builder, name) / 2**30:.1f} GB of encoded "
        f"images, more than data.cache_mb={cache_mb:g} MB; raise data.cache_mb or read the "
        "original files (dataset='coco:DIR' / 'voc:DIR')")
  features = builder.info.features
  label_feature = features["objects"]["label"]
  num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
  names = tuple(getattr(label_feature, "names", ()) or ())
  ds = as_dataset(builder, name, shuffle_files=False,
                  decoders={"image": tfds.decode.SkipDecoding()})
  mode = "L" if tuple(features["image"].shape)[-1:] == (1,) else "RGB"
  max_pixels = int(data_config.max_image_pixels)
  allow_pixels(max_pixels)
  problems = Problems(bool(data_config.skip_bad), f"tfds:{builder.name} {name}")
  rows = []
  for index, ex in enumerate(tfds.as_numpy(ds)):
    data = bytes(ex["image"])
    filename = ex.get("image/filename", b"")
    where = f"tfds:{builder.name} {name} example {index}" + (
        f" ({filename.decode(errors='replace')})" if filename else "")
    try:
      with open_image(io.BytesIO(data), where, max_pixels) as im:
        width, height = im.size
    except ValueError as e:
      problems.report(str(e))
      continue
    objects = ex["objects"]
    bbox = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    labels = np.asarray(objects["label"]).reshape(-1)
    flags = np.zeros(len(bbox), bool)
    for key in ("is_crowd", "is_difficult"):
      if key in objects:
        flags = np.asarray(objects[key], bool).reshape(-1)
    areas = np.asarray(objects["area"], np.float64).reshape(-1) if "area" in objects else None
    lengths = {len(bbox), len(labels), len(flags)} | ({len(areas)} if areas is not None else set())
    if len(lengths) != 1:
      problems.report(f"{where}: object fields differ in length ({sorted(lengths)})")
      continue
    boxes, classes, ignore, kept_areas = [], [], [], []
    for k, (ymin, xmin, ymax, xmax) in enumerate(bbox):
      if num_classes and not 0 <= labels[k] < num_classes:
        problems.report(f"{where}: object {k} has unknown label {int(labels[k])}")
        continue
      box = check_box((xmin * width, ymin * height, xmax * width, ymax * height), width, height,
                      f"{where}: object {k}", problems)
      if box is None:
        continue
      boxes.append(box)
      classes.append(int(labels[k]))
      ignore.append(bool(flags[k]))
      kept_areas.append(float(areas[k]) if areas is not None else
                        (box[2] - box[0]) * (box[3] - box[1]))
    image_id = int(ex["image/id"]) if "image/id" in ex else index
    rows.append((EncodedImage(data=data, mode=mode), (height, width),
                 np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32),
                 np.asarray(ignore, bool), np.asarray(kept_areas, np.float32), image_id, where))
  problems.log_summary()
  if not rows:
    raise ValueError(f"split {name!r} of tfds:{builder.name} has no readable example")
  num_classes = num_classes or int(max((r[3].max() for r in rows if len(r[3])), default=0)) + 1
  return DetectionSource(
      images=[r[0] for r in rows], boxes=[r[2] for r in rows], classes=[r[3] for r in rows],
      ignore=[r[4] for r in rows], areas=[r[5] for r in rows],
      sizes=np.asarray([r[1] for r in rows], np.int32).reshape(-1, 2), num_classes=num_classes,
      class_names=names or tuple(str(k) for k in range(num_classes)),
      image_ids=np.asarray([r[6] for r in rows], np.int64), names=[r[7] for r in rows],
      skipped=list(problems.lines))


def load(builder, split: str, data_config) -> dict[str, DetectionSource]:
  """{split name: DetectionSource} of the plain splits the expression `split` names."""
  known = split_sizes(builder)
  if known:  # a bad or empty selection fails before anything is read
    split_indices(split, known)
  return {name: read_split(builder, name, data_config) for name in named_splits(split)}


def materialise(builder, split: str, data_config) -> DetectionSource:
  """The selection `split` (TFDS slicing syntax) as one DetectionSource."""
  return select_split(load(builder, split, data_config), split)
