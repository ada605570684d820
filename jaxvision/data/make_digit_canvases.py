"""A COCO-format detection set of canvases with real handwritten digits on them.

    python -m jaxvision.data.make_digit_canvases --mnist /data/mnist --out /data/digit_canvases

Each grayscale canvas (128 x 128 by default) holds 1-6 MNIST digits at random sizes (14-40 px
squares) and places, composited by maximum so overlapping strokes stay visible; a new digit's
box may overlap an earlier one's by IoU <= 0.3. Boxes are tight around each digit's own ink
(pixels >= 64 after resizing). Train canvases draw digits from MNIST test images [0, 8000),
val canvases only from [8000, 10000), so no held-out digit was ever seen in training. Output:

    OUT/annotations/instances_{train,val}.json    categories 0..9 (id = the digit)
    OUT/{train,val}/000000.png ...

read back with `dataset='coco:OUT'`. The same seed gives the same files. `make_dataset` accepts
any array of digits (e.g. scikit-learn's 8x8 load_digits, for tests).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxvision.data.idx import find_files, read_idx

SPLITS = {"train": 0, "val": 1}


def _iou(box, boxes) -> np.ndarray:
  if not len(boxes):
    return np.zeros(0)
  boxes = np.asarray(boxes, np.float64)
  w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
  h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
  inter = w * h
  union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (
      boxes[:, 3] - boxes[:, 1]) - inter
  return inter / union


def make_canvases(
    digits: np.ndarray, labels: np.ndarray, count: int, *, seed: int = 0, canvas_size: int = 128,
    min_digits: int = 1, max_digits: int = 6, min_side: int = 14, max_side: int = 40,
    max_overlap: float = 0.3, ink_threshold: int = 64,
) -> tuple[np.ndarray, list[dict]]:
  """(uint8 [count, S, S] canvases, per canvas {'boxes' [n, 4] xyxy, 'classes' [n],
  'digits' [n] indices into `digits`}) from uint8 [N, h, w] digit images and their labels."""
  digits = np.asarray(digits)
  if digits.ndim != 3 or not len(digits):
    raise ValueError(f"digits must be a non-empty [N, H, W] array, got shape {digits.shape}")
  if digits.dtype != np.uint8:
    raise ValueError(f"digits must be uint8 (0..255), got {digits.dtype}")
  if len(labels) != len(digits):
    raise ValueError(f"{len(digits)} digits but {len(labels)} labels")
  if not 1 <= min_digits <= max_digits or not 2 <= min_side <= max_side <= canvas_size:
    raise ValueError(f"need 1 <= min_digits <= max_digits and 2 <= min_side <= max_side <= "
                     f"canvas_size, got digits {min_digits}..{max_digits}, sides "
                     f"{min_side}..{max_side}, canvas {canvas_size}")
  rng = np.random.default_rng(seed)
  canvases = np.zeros((count, canvas_size, canvas_size), np.uint8)
  annotations = []
  for c in range(count):
    boxes, classes, used = [], [], []
    for _ in range(int(rng.integers(min_digits, max_digits + 1))):
      for _attempt in range(50):
        index = int(rng.integers(0, len(digits)))
        side = int(rng.integers(min_side, max_side + 1))
        x, y = (int(v) for v in rng.integers(0, canvas_size - side + 1, 2))
        patch = np.asarray(Image.fromarray(digits[index]).resize((side, side), Image.BILINEAR))
        rows, cols = np.nonzero(patch >= ink_threshold)
        if not len(rows):
          continue  # an empty digit at this size: draw another
        box = (x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1)
        if len(boxes) and _iou(box, boxes).max() > max_overlap:
          continue
        view = canvases[c, y:y + side, x:x + side]
        np.maximum(view, patch, out=view)
        boxes.append(box)
        classes.append(int(labels[index]))
        used.append(index)
        break
    annotations.append({"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                        "classes": np.asarray(classes, np.int32),
                        "digits": np.asarray(used, np.int64)})
  return canvases, annotations


def write_coco(out_dir: str, split: str, canvases: np.ndarray, annotations: list[dict],
               class_names: Sequence[str]) -> str:
  """Writes OUT/{split}/NNNNNN.png and OUT/annotations/instances_{split}.json; returns the
  json path."""
  image_dir = os.path.join(out_dir, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
  images, anns = [], []
  for i, (canvas, ann) in enumerate(zip(canvases, annotations, strict=True)):
    name = f"{i:06d}.png"
    Image.fromarray(canvas).save(os.path.join(image_dir, name))
    images.append({"id": i + 1, "file_name": name, "width": int(canvas.shape[1]),
                   "height": int(canvas.shape[0])})
    for box, cls in zip(ann["boxes"], ann["classes"], strict=True):
      x1, y1, x2, y2 = (float(v) for v in box)
      # COCO ids start at 1 (pycocotools reads an annotation id of 0 as "no match").
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                   "iscrowd": 0})
  data = {"info": {"description": f"digit canvases, {split}"}, "images": images,
          "annotations": anns,
          "categories": [{"id": k, "name": str(n)} for k, n in enumerate(class_names)]}
  path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  return path


def make_dataset(digits: np.ndarray, labels: np.ndarray, out_dir: str, *, train: int = 3000,
                 val: int = 500, seed: int = 0, train_range: tuple[int, int] = (0, 8000),
                 val_range: tuple[int, int] = (8000, 10000), **canvas_kwargs) -> dict[str, str]:
  """Writes the train and val splits (digits of train_range / val_range only); returns
  {split: annotation json}."""
  labels = np.asarray(labels)
  names = [str(k) for k in range(int(labels.max()) + 1)]
  paths = {}
  for split, count, (lo, hi) in (("train", train, train_range), ("val", val, val_range)):
    lo, hi = max(0, lo), min(len(digits), hi)
    if hi <= lo:
      raise ValueError(f"{split}: digit range [{lo}, {hi}) is empty ({len(digits)} digits)")
    canvases, anns = make_canvases(digits[lo:hi], labels[lo:hi], count,
                                   seed=int(np.random.SeedSequence([seed, SPLITS[split]])
                                            .generate_state(1)[0]), **canvas_kwargs)
    for a in anns:
      a["digits"] = a["digits"] + lo
    paths[split] = write_coco(out_dir, split, canvases, anns, names)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: MNIST's test images -> a COCO-format canvas set."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mnist", required=True, help="folder with t10k-images-idx3-ubyte[.gz]")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--train", type=int, default=3000, help="train canvases")
  parser.add_argument("--val", type=int, default=500, help="val canvases")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
  parser.add_argument("--min_digits", type=int, default=1)
  parser.add_argument("--max_digits", type=int, default=6)
  parser.add_argument("--min_side", type=int, default=14, help="smallest digit side (px)")
  parser.add_argument("--max_side", type=int, default=40, help="largest digit side (px)")
  args = parser.parse_args(argv)

  files = find_files(args.mnist)
  if "test" not in files:
    raise SystemExit(f"{args.mnist}: no t10k-images / t10k-labels IDX files")
  digits, labels = read_idx(files["test"]["images"]), read_idx(files["test"]["labels"])
  paths = make_dataset(digits, labels, args.out, train=args.train, val=args.val, seed=args.seed,
                       canvas_size=args.size, min_digits=args.min_digits,
                       max_digits=args.max_digits, min_side=args.min_side,
                       max_side=args.max_side)
  for split, path in paths.items():
    print(f"{split}: {path}")


if __name__ == "__main__":
  main()
