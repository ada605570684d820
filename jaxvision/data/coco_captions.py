"""`coco_captions:DIR`: images with several captions each, in COCO's caption layout, and the
`CaptionSource` every caption dataset is read into.

    DIR/annotations/captions_{split}.json      e.g. captions_train2017.json
    DIR/{split}/{file_name}                    the images the json lists

`coco_captions:tfds` (or `coco_captions:tfds:NAME`) reads TFDS's `coco_captions` instead (the
`[tfds]` extra, imported only then; images stay encoded in memory until a batch needs them).

The split name is the file's `{split}`; only the splits the split expression names are read.
A bad record (a missing or unreadable image, an empty caption, a caption of an unknown image
id, an image without captions) stops the run with a line naming it, or with data.skip_bad is
left out and counted. Images are decoded into memory when the split fits data.cache_mb, else
batch by batch.

Batches (`CaptionSource.get_batch`) carry `image` (a list: arrays or files), `captions` (an
object array of every caption of each example) and `id`; the captioning transform picks one
caption per example (at random from the step's generator in training, the first in
evaluation) and the captioning task tokenizes it. Every caption stays the reference of its
example (`references()`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from jaxvision.data.augment import parse_augment
from jaxvision.data.decode import (
    EncodedImage,
    decode_crop_resize,
    decode_mode,
    default_workers,
    parallel_map,
    probe,
    size_pair,
)
from jaxvision.data.files import decode_all
from jaxvision.data.source import union_skipped
from jaxvision.data.splits import named_splits
from jaxvision.data.tfds_builder import as_dataset, get_builder, import_tf, split_sizes
from jaxvision.data.transforms import Normalize, normalization, pad_crop

log = logging.getLogger(__name__)
PREFIX, SUFFIX = "captions_", ".json"


@dataclasses.dataclass
class CaptionSource:
  """Images with one or more captions each.

  Attributes:
    images: [N] the images: uint8 [H, W, C] arrays when cached, else `EncodedImage`s.
    captions: [N] tuples of the captions of each image.
    ids: [N] int64 stable example ids.
    image_ids: [N] the dataset's own image ids (COCO image_id, or the row in its list).
    names: [N] file names, for messages.
    skipped: bad records left out (data.skip_bad), one line each.
    channels: 1 for grayscale data sets, else 3.
  """

  images: list
  captions: list[tuple[str, ...]]
  ids: np.ndarray | None = None
  image_ids: np.ndarray | None = None
  names: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  channels: int = 3

  task = "captioning"
  num_classes = 0
  class_names = ()

  def __post_init__(self):
    n = len(self.images)
    if self.ids is None:
      self.ids = np.arange(n, dtype=np.int64)
    if self.image_ids is None:
      self.image_ids = np.arange(n, dtype=np.int64)
    if not self.names:
      self.names = [getattr(im, "name", f"example {i}") for i, im in enumerate(self.images)]
    if len(self.captions) != n or len(self.ids) != n:
      raise ValueError(f"{n} images but {len(self.captions)} caption lists and {len(self.ids)} "
                       "ids")

  def check_num_classes(self, num_classes: int) -> None:
    """Captions have no classes: nothing to check."""
    del num_classes

  def __len__(self) -> int:
    return len(self.images)

  @property
  def labels(self) -> np.ndarray:
    """[N, 0]: captions have no class per image, so the input counts no classes."""
    return np.zeros((len(self.images), 0), np.int32)

  def get_batch(self, indices: np.ndarray) -> dict:
    """The examples at `indices`: `image` a list, `captions` an object array of tuples."""
    captions = np.empty(len(indices), object)
    captions[:] = [self.captions[i] for i in indices]
    return {"image": [self.images[i] for i in indices], "captions": captions,
            "id": self.ids[indices]}

  def take(self, indices: np.ndarray, id_offset: int = 0) -> CaptionSource:
    """The examples at `indices`, with ids shifted by `id_offset`."""
    return dataclasses.replace(
        self, images=[self.images[i] for i in indices],
        captions=[self.captions[i] for i in indices], ids=self.ids[indices] + id_offset,
        image_ids=self.image_ids[indices], names=[self.names[i] for i in indices],
        skipped=list(self.skipped))

  @staticmethod
  def concat(parts: list[CaptionSource]) -> CaptionSource:
    """The examples of `parts`, one after another."""
    if len(parts) == 1:
      return parts[0]
    join = lambda field: [x for p in parts for x in getattr(p, field)]  # noqa: E731
    return dataclasses.replace(
        parts[0], images=join("images"), captions=join("captions"),
        ids=np.concatenate([p.ids for p in parts]),
        image_ids=np.concatenate([p.image_ids for p in parts]), names=join("names"),
        skipped=union_skipped(parts), channels=max(p.channels for p in parts))

  def references(self) -> dict[int, tuple[str, ...]]:
    """{example id: every caption of the example}: what evaluation scores against."""
    return {int(i): tuple(c) for i, c in zip(self.ids, self.captions, strict=True)}

  def all_captions(self) -> list[str]:
    """Every caption of every example (to build a vocabulary from)."""
    return [c for caps in self.captions for c in caps]


class BadRecords:
  """Bad records of a data set: raise the first (one line) or, with skip_bad, collect them."""

  def __init__(self, skip_bad: bool, what: str):
    self.skip_bad = skip_bad
    self.what = what
    self.lines: list[str] = []

  def report(self, message: str) -> None:
    """A ValueError naming the record, or (skip_bad) a logged line, counted."""
    if not self.skip_bad:
      raise ValueError(message)
    log.warning("data.skip_bad: leaving out %s", message)
    self.lines.append(message)


def caption_source(entries: list[tuple[str, list[str], int]], data_config,
                   problems: BadRecords) -> CaptionSource:
  """A CaptionSource of (image path, captions, image id) entries: unreadable images and images
  without a non-empty caption are reported; decoded into memory when it fits data.cache_mb."""
  workers = default_workers(int(data_config.workers))
  kept = []
  for path, captions, image_id in entries:
    good = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if len(good) < len(captions):
      problems.report(f"{problems.what}: image {path} (id {image_id}) has "
                      f"{len(captions) - len(good)} empty caption(s)")
    if not good:
      problems.report(f"{problems.what}: image {path} (id {image_id}) has no caption")
      continue
    kept.append((path, tuple(good), image_id))

  def header(path):
    if not os.path.isfile(path):
      return f"{problems.what}: image file {path} does not exist"
    try:
      return probe(path)
    except ValueError as e:
      return f"{problems.what}: {e}"

  headers = parallel_map(lambda entry: header(entry[0]), kept, workers)
  for h in headers:
    if isinstance(h, str):
      problems.report(h)
  rows = [(e, h) for e, h in zip(kept, headers, strict=True) if not isinstance(h, str)]
  mode = decode_mode([h for _, h in rows])
  files = [EncodedImage(e[0], mode=mode) for e, _ in rows]
  channels = 1 if mode == "L" else 3
  decoded_mb = sum(h.width * h.height * channels for _, h in rows) / 2**20
  images: list = files
  if files and decoded_mb <= float(data_config.cache_mb):
    images, bad = decode_all(files, skip_bad=problems.skip_bad, workers=workers)
    for name in bad:
      problems.lines.append(f"{problems.what}: cannot decode {name}")
    keep = [a is not None for a in images]
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    files = [f for f, k in zip(files, keep, strict=True) if k]
    images = [a for a in images if a is not None]
  return CaptionSource(
      images, [e[1] for e, _ in rows], image_ids=np.array([e[2] for e, _ in rows], np.int64),
      names=[f.name for f in files], skipped=list(problems.lines), channels=channels)


def read_json(path: str):
  """The parsed JSON file; a ValueError names the file and where it is malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column "
                     f"{e.colno}") from None
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


def annotation_files(root: str) -> dict[str, str]:
  """{split: captions json} of DIR/annotations/captions_{split}.json."""
  if not root:
    raise ValueError("dataset 'coco_captions:' needs a directory, e.g. coco_captions:/data/coco")
  folder = os.path.join(root, "annotations")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"dataset coco_captions:{root}: no annotations/ folder")
  files = {f[len(PREFIX):-len(SUFFIX)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
           if f.startswith(PREFIX) and f.endswith(SUFFIX)}
  if not files:
    raise FileNotFoundError(f"dataset coco_captions:{root}: no annotations/captions_{{split}}.json")
  return files


def read_coco_split(path: str, image_dir: str, problems: BadRecords
                    ) -> list[tuple[str, list[str], int]]:
  """(image path, captions, image id) of one COCO captions json, in its image order."""
  data = read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
      data.get("annotations"), list):
    raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
  order, files = [], {}
  for k, image in enumerate(data["images"]):
    if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
      raise ValueError(f"{path}: images[{k}] has no 'id' and 'file_name'")
    order.append(image["id"])
    files[image["id"]] = os.path.join(image_dir, str(image["file_name"]))
  captions: dict = {i: [] for i in order}
  for k, ann in enumerate(data["annotations"]):
    ann_id = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
    if not isinstance(ann, dict) or ann.get("image_id") not in captions:
      problems.report(f"{path}: annotation {ann_id} refers to unknown image_id "
                      f"{ann.get('image_id') if isinstance(ann, dict) else None}")
      continue
    caption = ann.get("caption")
    if not isinstance(caption, str) or not caption.strip():
      problems.report(f"{path}: annotation {ann_id} of image_id {ann['image_id']} has an empty "
                      "caption")
      continue
    captions[ann["image_id"]].append(caption)
  return [(files[i], captions[i], int(i)) for i in order]


def wanted_splits(split: str, known) -> list[str]:
  """The split names `split` refers to, each one of `known` (a one-line error otherwise)."""
  names = named_splits(split)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"split {unknown[0]!r} not found; available: {', '.join(known)}")
  return names


def load(arg: str, split: str, image_size: int | None = None,
         data_config=None) -> dict[str, CaptionSource]:
  """The splits `split` names, each a CaptionSource (TFDS's coco_captions for 'tfds[:NAME]')."""
  del image_size  # the transform resizes
  if arg == "tfds" or arg.startswith("tfds:"):
    return load_tfds(arg.partition(":")[2] or "coco_captions", split, data_config)
  files = annotation_files(arg)
  sources = {}
  for name in wanted_splits(split, files):
    problems = BadRecords(bool(data_config.skip_bad), f"coco_captions:{arg} {name}")
    entries = read_coco_split(files[name], os.path.join(arg, name), problems)
    sources[name] = caption_source(entries, data_config, problems)
  return sources


def load_tfds(name: str, split: str, data_config) -> dict[str, CaptionSource]:
  """TFDS `name` (features image, image/id, captions/text) as CaptionSources of encoded images."""
  _, tfds = import_tf()
  builder = get_builder(name, data_config)
  features = builder.info.features
  if "image" not in features or "captions" not in features:
    raise ValueError(f"dataset tfds:{name}: no 'image' and 'captions' features; it has "
                     f"{sorted(features)}")
  known = split_sizes(builder)
  sources = {}
  for split_name in (wanted_splits(split, known) if known else named_splits(split)):
    ds = as_dataset(builder, split_name, shuffle_files=False,
                    decoders={"image": tfds.decode.SkipDecoding()})
    images, captions, image_ids = [], [], []
    problems = BadRecords(bool(data_config.skip_bad), f"coco_captions:tfds:{name} {split_name}")
    for k, example in enumerate(tfds.as_numpy(ds)):
      texts = [t.decode("utf-8").strip() for t in example["captions"]["text"]]
      image_id = int(example["image/id"]) if "image/id" in example else k
      where = f"{problems.what}: image_id {image_id}"
      if not all(texts):
        problems.report(f"{where} has {texts.count('')} empty caption(s)")
      if not any(texts):
        problems.report(f"{where} has no caption")
        continue
      images.append(EncodedImage(data=bytes(example["image"]), mode="RGB"))
      captions.append(tuple(t for t in texts if t))
      image_ids.append(image_id)
    sources[split_name] = CaptionSource(
        images, captions, image_ids=np.array(image_ids, np.int64),
        names=[f"tfds:{name} {split_name} image_id {i}" for i in image_ids],
        skipped=list(problems.lines))
  return sources


def captioning_transform(data_config, *, train: bool,
                         image_size: int | tuple[int, int] | None):
  """The captioning transform: each whole image resized to image_size x image_size, or to
  `image_size`'s (height, width) (no crop and no flip: a caption may say what is where), shifted
  by `pad_crop` in training, normalized; `caption` is one caption per example, drawn from the
  step's generator in training, the first one in evaluation."""
  ops = parse_augment(data_config.augment, "captioning")
  shift = int(ops["pad_crop"][0]) if train and "pad_crop" in ops else 0
  workers = default_workers(int(data_config.workers))
  norm = Normalize(*normalization(data_config.normalize), workers=workers)
  skip_bad = bool(data_config.skip_bad)
  shape = None if image_size is None else size_pair(image_size)

  def one(item):
    if isinstance(item, np.ndarray) and (shape is None or item.shape[:2] == shape):
      return item
    if image_size is None:
      raise ValueError("the captioning transform needs an image_size for images of any size")
    try:
      return decode_crop_resize(item, lambda w, h: (0, 0, w, h), image_size)
    except ValueError as e:
      if not skip_bad:
        raise
      # Found only now (decoded on the fly): a gray image keeps the batch shape.
      log.warning("data.skip_bad: replacing %s by a gray image", e)
      channels = item.shape[-1] if isinstance(item, np.ndarray) else (
          1 if item.mode == "L" else 3)
      return np.full((*shape, channels), 128, np.uint8)

  def transform(batch, rng):
    images = np.stack(parallel_map(one, list(batch["image"]), workers))
    if shift:
      images = pad_crop(images, shift, rng)
    captions = batch["captions"]
    if train:
      picks = [int(rng.integers(len(c))) for c in captions]
    else:
      picks = [0] * len(captions)
    chosen = np.empty(len(captions), object)
    chosen[:] = [c[k] for c, k in zip(captions, picks, strict=True)]
    return {**batch, "image": norm(images), "caption": chosen}

  return transform
