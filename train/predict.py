"""python -m train.predict --workdir RUN [--step N] FILES_OR_DIRS...
python -m train.predict --model NAME --pretrained SPEC FILES_OR_DIRS...

Runs a trained run (or a pretrained model) on image files and prints one JSON object per image
(or writes them to --output as JSON lines):

  classification  {"file", "topk": [{"class", "index", "prob"}, ...]}   (--topk, default 5)
  multitask       the same, plus "regression"
  segmentation    {"file", "mask", "height", "width", "fractions": {class: share of pixels}}:
                  the class map as a PNG (pixel value = class index) in --mask-dir; images
                  larger than the training crops are predicted by overlap-tiles
                  (jaxvision.segmentation.predict_tiled)
  captioning      {"file", "caption"}: the caption the run's decoding generates
  detection       {"file", "height", "width", "detections": [{"box" (x0, y0, x1, y1 pixels of
                  the file), "score", "class", "index"}, ...]} for scores of at least
                  --min-score; a Mask R-CNN run adds each detection's "segmentation", its mask
                  pasted at the file's resolution as COCO's compressed RLE

Images are read with PIL and prepared by the data package's own eval transform with the run's
settings (config.json: image_size, data.normalize, data.eval_crop, channels) or the pretrained
weights' (jaxvision.load_pretrained), then batched through the jitted model via the task's
`predict`. Class names come from the run's data (config.data_info.class_names) or the weights'
config, else indices. Folders are searched recursively for .png / .jpg / .jpeg files. A file that
cannot be read is reported on stderr and skipped; the others are still predicted and the exit
status is then 1.

    python -m train.predict --workdir runs/lenet_digits digits_pngs/ --topk 3
    python -m train.predict --model resnet50 --pretrained True photo.jpg --output preds.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from configs import base
from jaxvision.data.decode import IMAGE_EXTENSIONS, EncodedImage, decode
from jaxvision.data.task_transforms import build_transform
from jaxvision.detection.masks import paste_masks_numpy
from jaxvision.pretrained import load_pretrained
from jaxvision.segmentation import predict_tiled
from jaxvision.tasks.classification import ClassificationTask
from train.build import load_run
from train.export import parse_spec


@dataclasses.dataclass
class Predictor:
  """A model with everything needed to predict on image files.

  Attributes:
    model: the Flax module.
    variables: its variables.
    task: the task whose `predict` turns a batch into predictions.
    task_name: config.task ('classification', 'segmentation', ...): picks the formatter.
    image_shape: (H, W, C) of the images the model was trained on.
    data_config: settings of the eval transform (normalize, eval_crop, ...).
    class_names: one name per class, or empty for indices.
    num_classes: number of classes.
    batch_size: images per forward pass.
  """

  model: Any
  variables: dict
  task: Any
  task_name: str
  image_shape: tuple[int, int, int]
  data_config: Any
  class_names: tuple[str, ...]
  num_classes: int
  batch_size: int = 32
  _predict: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

  @classmethod
  def from_run(cls, workdir: str, step: int | None = None) -> Predictor:
    """The run in `workdir` at checkpoint `step`, with its own eval preprocessing."""
    run = load_run(workdir, step)
    config = run.config
    return cls(run.model, run.variables, run.task, str(config.task),
               tuple(int(d) for d in config.data_info.image_shape), config.data,
               tuple(str(n) for n in config.data_info.class_names), int(config.num_classes),
               int(config.eval_batch_size))

  @classmethod
  def from_pretrained(cls, name: str, spec, **model_kwargs) -> Predictor:
    """Registry model `name` with pretrained weights `spec` and their preprocessing."""
    model, variables, cfg = load_pretrained(name, spec, **model_kwargs)
    data = base.get_config().data  # the trainer's data defaults, with the weights' statistics
    data.normalize, data.eval_crop = cfg.normalize, cfg.crop_pct
    task = ClassificationTask(cfg.num_classes, image_shape=cfg.input_size)
    return cls(model, variables, task, "classification", cfg.input_size, data,
               cfg.class_names, cfg.num_classes)

  def class_name(self, index: int) -> str:
    """The name of class `index` (its index as a string when the names are unknown)."""
    names = self.class_names
    return names[index] if len(names) == self.num_classes and index < len(names) else str(index)

  def predict_fn(self) -> Callable[[np.ndarray], Any]:
    """images [n, H, W, C] -> the task's predictions, jitted (one compile per batch shape,
    shared by every caller of this predictor)."""
    if self._predict is not None:
      return self._predict
    model, task = self.model, self.task

    @jax.jit
    def predict(variables, images):
      def forward(*args, method=None, **kwargs):
        return model.apply(variables, *args, train=False, method=method, **kwargs)

      return task.predict(forward, {"image": images})

    self._predict = lambda images: predict(self.variables, images)
    return self._predict


def _mode(channels: int) -> str:
  return "L" if channels == 1 else "RGB"


class Formatter:
  """How one task's predictions on image files are computed and reported.

  `prepare` reads one file into the model's input (ValueError when it cannot be read),
  `predict` runs a list of prepared images, `record` turns one prediction into the JSON object
  printed for its file. A task with other needs (detection boxes, generated captions) subclasses
  this and adds a line to FORMATTERS.
  """

  transform_task = "classification"  # whose eval transform prepares the files

  def __init__(self, predictor: Predictor, args: argparse.Namespace):
    self.predictor, self.args = predictor, args
    h, w, _ = predictor.image_shape
    self.transform = build_transform(predictor.data_config, train=False,
                                     task=self.transform_task,
                                     image_size=h if h == w else (h, w))
    self._predict = predictor.predict_fn()

  def _targets(self) -> dict:
    """What the transform reads besides the image, for one file (a placeholder label)."""
    return {"label": np.zeros(1, np.int32)}

  def prepare(self, path: str) -> np.ndarray:
    """The eval-transformed image of file `path`, [H, W, C] float32."""
    item = EncodedImage(path, mode=_mode(self.predictor.image_shape[-1]))
    batch = self.transform({"image": [item], **self._targets()}, np.random.default_rng(0))
    return batch["image"][0]

  def predict(self, images: list[np.ndarray]) -> list[Any]:
    """Predictions of `images`, one per image, in batches of a fixed size (one compile)."""
    size = self.predictor.batch_size
    out = []
    for start in range(0, len(images), size):
      chunk = np.stack(images[start:start + size])
      n = len(chunk)
      if n < size:  # every batch of one shape: one compilation
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
      predictions = jax.tree.map(np.asarray, self._predict(chunk))
      out.extend(jax.tree.map(lambda x, i=i: x[i], predictions) for i in range(n))
    return out

  def record(self, path: str, prediction: Any) -> dict:
    """The JSON object of one file."""
    raise NotImplementedError


class ClassificationFormatter(Formatter):
  """Top-k classes with their softmax probabilities."""

  def record(self, path: str, prediction: Any) -> dict:
    logits = np.asarray(prediction, np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:self.args.topk]
    return {"file": path, "topk": [{"class": self.predictor.class_name(int(i)), "index": int(i),
                                    "prob": round(float(probs[i]), 6)} for i in top]}


class MultiTaskFormatter(ClassificationFormatter):
  """Top-k classes and the regression output ({'logits', 'regression'} predictions)."""

  def record(self, path: str, prediction: Any) -> dict:
    row = super().record(path, prediction["logits"])
    row["regression"] = float(np.asarray(prediction["regression"]).reshape(-1)[0])
    return row


class SegmentationFormatter(Formatter):
  """A class-map PNG per image (overlap-tile inference beyond the training size)."""

  def __init__(self, predictor: Predictor, args: argparse.Namespace):
    self.predictor, self.args = predictor, args
    self.transform = build_transform(predictor.data_config, train=False, task="segmentation",
                                     image_size=None)
    self._predict = predictor.predict_fn()
    h, w, c = predictor.image_shape
    out = jax.eval_shape(self._predict, jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
    oh, ow = out.shape[1:3]
    if (oh, ow) == (h, w):  # 'same' network: each tile keeps the central half of its input
      self.margin = (h // 4, w // 4)
      self.tile = (h - 2 * self.margin[0], w - 2 * self.margin[1])
    else:  # 'valid' network: the input tile grows by what the network trims
      self.margin = ((h - oh) // 2, (w - ow) // 2)
      self.tile = (oh, ow)
    self.same = (oh, ow) == (h, w)
    self.names: dict[str, int] = {}
    os.makedirs(args.mask_dir, exist_ok=True)

  def prepare(self, path: str) -> np.ndarray:
    """The normalized full image of file `path`, [H, W, C] float32."""
    image = decode(EncodedImage(path, mode=_mode(self.predictor.image_shape[-1])))
    batch = self.transform({"image": image[None], "label": np.zeros((1, *image.shape[:2]),
                                                                    np.int32)},
                           np.random.default_rng(0))
    return batch["image"][0]

  def predict(self, images: list[np.ndarray]) -> list[Any]:
    """Class maps [H, W] of `images`: one pass at the training size, else overlap-tiles."""
    out = []
    for image in images:
      if self.same and image.shape == self.predictor.image_shape:
        logits = np.asarray(self._predict(image[None]))[0]
      else:
        logits = predict_tiled(self._predict, image, self.tile, self.margin,
                               batch_size=self.predictor.batch_size)
      out.append(np.asarray((logits[..., 0] > 0) if logits.shape[-1] == 1
                            else np.argmax(logits, -1), np.uint8))
    return out

  def record(self, path: str, prediction: Any) -> dict:
    stem = os.path.splitext(os.path.basename(path))[0]
    count = self.names.get(stem, 0)
    self.names[stem] = count + 1
    mask_path = os.path.join(self.args.mask_dir, f"{stem}{f'_{count}' if count else ''}.png")
    mask = Image.fromarray(prediction, "P")
    mask.putpalette(_palette(self.predictor.num_classes))
    mask.save(mask_path)
    counts = np.bincount(prediction.reshape(-1), minlength=self.predictor.num_classes)
    total = max(int(counts.sum()), 1)
    fractions = {self.predictor.class_name(k): round(float(c) / total, 6)
                 for k, c in enumerate(counts)}
    return {"file": path, "mask": mask_path, "height": int(prediction.shape[0]),
            "width": int(prediction.shape[1]), "fractions": fractions}


class CaptioningFormatter(Formatter):
  """The caption the run's decoding (greedy, beam search or sampling; config.caption) generates
  for each image, resized to the run's input size as in its evaluation."""

  transform_task = "captioning"

  def _targets(self) -> dict:
    return {"captions": [("",)]}

  def record(self, path: str, prediction: Any) -> dict:
    return {"file": path, "caption": self.predictor.task.tokenizer.decode(prediction["tokens"])}


class DetectionFormatter(Formatter):
  """Each file's detections scoring at least --min-score, in the file's own pixels, from the
  run's eval transform (resized to fit the input, padded); with instance masks (Mask R-CNN) each
  detection's mask, pasted at the file's resolution, as COCO's compressed RLE."""

  transform_task = "detection"

  def __init__(self, predictor: Predictor, args: argparse.Namespace):
    self.predictor, self.args = predictor, args
    # The files have no ground truth: the transform makes no masks of their annotations.
    data = ml_collections.ConfigDict(predictor.data_config.to_dict())
    data.masks = False
    self.transform = build_transform(data, train=False, task="detection",
                                     image_size=predictor.image_shape[0])
    task, model = predictor.task, predictor.model

    @jax.jit
    def predict(variables, batch):
      def forward(*args, method=None, **kwargs):
        return model.apply(variables, *args, train=False, method=method, **kwargs)

      return {**task.infer(forward, batch), "orig_size": batch["orig_size"]}

    self._predict = lambda batch: predict(predictor.variables, batch)

  def prepare(self, path: str) -> dict:
    """The eval-transformed image of file `path` and the map back to its pixels."""
    with Image.open(path) as im:
      width, height = im.size
    empty = lambda shape, dtype: [np.zeros(shape, dtype)]
    batch = self.transform(
        {"id": [0], "image": [EncodedImage(path, mode=_mode(self.predictor.image_shape[-1]))],
         "boxes": empty((0, 4), np.float32), "classes": empty((0,), np.int32),
         "ignore": empty((0,), bool), "area": empty((0,), np.float32),
         "orig_size": [np.array([height, width])]}, np.random.default_rng(0))
    return {k: batch[k][0] for k in ("image", "scale", "offset", "orig_size")}

  def predict(self, images: list[dict]) -> list[Any]:
    """Predictions of prepared files, in batches of a fixed size (one compile)."""
    size = self.predictor.batch_size
    out = []
    for start in range(0, len(images), size):
      chunk = images[start:start + size]
      n = len(chunk)
      chunk = chunk + [chunk[-1]] * (size - n)  # every batch of one shape: one compilation
      batch = {k: np.stack([item[k] for item in chunk]) for k in chunk[0]}
      predictions = jax.tree.map(np.asarray, self._predict(batch))
      out.extend(jax.tree.map(lambda x, i=i: x[i], predictions) for i in range(n))
    return out

  def record(self, path: str, prediction: Any) -> dict:
    height, width = (int(v) for v in prediction["orig_size"])
    keep = np.asarray(prediction["valid"], bool) & (
        np.asarray(prediction["scores"]) >= self.args.min_score)
    boxes = np.asarray(prediction["boxes"], np.float64)[keep]
    scores, classes = np.asarray(prediction["scores"])[keep], prediction["classes"][keep]
    # The data's class names (a detector's num_classes may count a background column too).
    names = self.predictor.class_names
    name = lambda k: names[k] if k < len(names) else str(k)
    detections = [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                   "class": name(int(cls)), "index": int(cls)}
                  for box, score, cls in zip(boxes, scores, classes, strict=True)]
    if "mask_probs" in prediction:
      masks = paste_masks_numpy(prediction["mask_probs"][keep], boxes, (height, width))
      for detection, mask in zip(detections, masks, strict=True):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        detection["segmentation"] = {"size": [height, width],
                                     "counts": rle["counts"].decode("ascii")}
    return {"file": path, "height": height, "width": width, "detections": detections}


def _palette(num_classes: int) -> list[int]:
  """A PNG palette: black and white for two classes, distinct colours beyond."""
  if num_classes <= 2:
    colours = [(0, 0, 0), (255, 255, 255)]
  else:
    rng = np.random.default_rng(0)
    colours = [(0, 0, 0)] + [tuple(int(v) for v in rng.integers(40, 256, 3))
                             for _ in range(num_classes - 1)]
  flat = [v for c in colours for v in c]
  return flat + [0] * (768 - len(flat))


# config.task -> the formatter of its predictions.
FORMATTERS: dict[str, type[Formatter]] = {
    "classification": ClassificationFormatter,
    "multitask": MultiTaskFormatter,
    "segmentation": SegmentationFormatter,
    "captioning": CaptioningFormatter,
    "detection": DetectionFormatter,
}


def find_images(paths: Sequence[str]) -> list[str]:
  """The files named, and the .png/.jpg/.jpeg files under the folders named (sorted)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names
               if f.lower().endswith(IMAGE_EXTENSIONS)]
      files.extend(sorted(found))
    else:
      files.append(path)
  return files


def predict_files(predictor: Predictor, files: Sequence[str], args: argparse.Namespace,
                  write: Callable[[dict], None], report: Callable[[str], None]) -> int:
  """Predicts `files`, calling `write(record)` per readable file in order and `report(line)`
  per unreadable one; returns the number of unreadable files."""
  if predictor.task_name not in FORMATTERS:
    raise ValueError(f"train.predict has no output format for task {predictor.task_name!r} "
                     f"(known: {', '.join(FORMATTERS)})")
  # No batch larger than the files: a few files compile and run at their own count.
  predictor.batch_size = max(1, min(predictor.batch_size, len(files)))
  formatter = FORMATTERS[predictor.task_name](predictor, args)
  failed = 0

  def prepare(path):
    try:
      return formatter.prepare(path), None
    except (ValueError, OSError) as e:
      return None, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

  chunk = predictor.batch_size * 4
  # A pool of its own: the data transforms use the shared pools inside `prepare`.
  with (ThreadPoolExecutor(args.workers) as pool,
        tqdm(total=len(files), unit="img", disable=None, file=sys.stderr) as bar):
    for start in range(0, len(files), chunk):
      names = list(files[start:start + chunk])
      prepared = list(pool.map(prepare, names))
      good = []
      for name, (image, error) in zip(names, prepared, strict=True):
        if error is None:
          good.append((name, image))
        else:
          failed += 1
          report(error if name in error else f"cannot read image {name}: {error}")
      predictions = formatter.predict([image for _, image in good]) if good else []
      for (name, _), prediction in zip(good, predictions, strict=True):
        write(formatter.record(name, prediction))
      bar.update(len(names))
  return failed


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line of `python -m train.predict`."""
  parser = argparse.ArgumentParser(
      prog="python -m train.predict", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("files", nargs="+", metavar="FILES_OR_DIRS", help="images or folders")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="trainer workdir (config.json, checkpoints/)")
  source.add_argument("--model", help="registry model name (with --pretrained)")
  parser.add_argument("--pretrained", default="", help="weights for --model: True (default "
                      "weights), hf-hub:ORG/REPO[@REV] or a weights file")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--topk", type=int, default=5, help="classes reported per image")
  parser.add_argument("--output", default="", help="write JSON lines here instead of stdout")
  parser.add_argument("--mask-dir", default="", help="segmentation: folder of the mask PNGs "
                      "(default: masks/ beside --output, else ./masks)")
  parser.add_argument("--min-score", type=float, default=0.5,
                      help="detection: report detections scoring at least this")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="images per forward pass (default: the run's eval batch size, 32)")
  parser.add_argument("--workers", type=int, default=4, help="threads reading images")
  args = parser.parse_args(argv)
  if args.model and not args.pretrained:
    parser.error("--model needs --pretrained (True, hf-hub:ORG/REPO or a weights file)")
  if args.topk < 1:
    parser.error(f"--topk={args.topk} must be >= 1")
  if args.batch_size < 0 or args.workers < 1:
    parser.error("--batch-size must be >= 0 and --workers >= 1")
  if not args.mask_dir:
    args.mask_dir = os.path.join(os.path.dirname(args.output) or ".", "masks")
  return args


def main(argv: list[str] | None = None) -> int:
  """Entry point: 0 when every file was predicted, 1 when some could not be read, 2 on errors."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices are not news
  out = None
  try:
    if args.workdir:
      predictor = Predictor.from_run(args.workdir, args.step)
    else:
      predictor = Predictor.from_pretrained(args.model, parse_spec(args.pretrained))
    if args.batch_size:
      predictor.batch_size = args.batch_size
    files = find_images(args.files)
    if not files:
      raise ValueError(f"no images (.png, .jpg, .jpeg) in {' '.join(args.files)}")
    if args.output:
      os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
      out = open(args.output, "w")  # noqa: SIM115 - closed below, after every record

    def write(row: dict) -> None:
      print(json.dumps(row), file=out or sys.stdout, flush=out is None)

    failed = predict_files(predictor, files, args, write,
                           lambda line: print(f"error: {line}", file=sys.stderr))
  except (ValueError, FileNotFoundError, ImportError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  finally:
    if out is not None:
      out.close()
  if failed:
    print(f"error: {failed} of {len(files)} files could not be read", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
