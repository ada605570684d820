"""Recipe caption data sets, written in COCO's caption layout (read them with `coco_captions:OUT`):

    python -m jaxvision.data.make_caption_sets --mnist /data/mnist --out /tmp/digits --kind digits
    python -m jaxvision.data.make_caption_sets --out /tmp/shapes --kind shapes

  digits   strips of 3-5 real MNIST digits side by side on a 28 x 140 canvas, captioned with
           the digit words left to right ("four one seven"). Train strips draw their digits from
           MNIST test images [0, 8000), the 'val' strips only from [8000, 10000), so no held-out
           digit was ever seen in training.
  shapes   64 x 64 scenes of two coloured shapes in a spatial relation, several captions each
           ("a red circle left of a blue square", "a blue square right of a red circle", ...).

Both write OUT/annotations/captions_{train,val}.json and OUT/{train,val}/NNNNNN.png. The same
functions (`digit_strips`, `shape_scenes`, `write_coco_captions`) make the tiny sets of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from jaxvision.data.idx import find_files, read_idx

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TRAIN_DIGITS, EVAL_DIGITS = (0, 8000), (8000, 10000)  # disjoint MNIST test-image ranges


def digit_strips(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator,
                 *, min_digits: int = 3, max_digits: int = 5
                 ) -> tuple[list[np.ndarray], list[list[str]]]:
  """`count` strips of min..max digits drawn from `images` [N, s, s] uint8 (labels [N]) on an
  s x (s * max_digits) canvas at random spacings; each with its one caption, the digit words."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 3 or len(images) != len(labels) or not len(images):
    raise ValueError(f"digit_strips needs [N, s, s] images and [N] labels, got "
                     f"{images.shape} and {labels.shape}")
  side = images.shape[1]
  width = side * max_digits
  strips, captions = [], []
  for _ in range(count):
    k = int(rng.integers(min_digits, max_digits + 1))
    picks = rng.integers(0, len(images), k)
    # Free columns spread at random over the k + 1 gaps keep the digits apart and in order.
    gaps = rng.multinomial(width - k * side, np.ones(k + 1) / (k + 1))
    canvas = np.zeros((side, width), np.uint8)
    x = 0
    for i, p in enumerate(picks):
      x += int(gaps[i])
      canvas[:, x:x + side] = np.maximum(canvas[:, x:x + side], images[p])
      x += side
    strips.append(canvas[..., None])
    captions.append([" ".join(DIGIT_WORDS[int(labels[p])] for p in picks)])
  return strips, captions


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour):
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  else:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def shape_captions(a: str, relation: str, b: str) -> list[str]:
  """The captions of shape `a` in `relation` to shape `b` (a few templates, both directions)."""
  return [f"a {a} {relation} a {b}", f"a {b} {RELATIONS[relation]} a {a}",
          f"there is a {a} {relation} a {b}"]


def shape_scenes(count: int, rng: np.random.Generator, size: int = 64
                 ) -> tuple[list[np.ndarray], list[list[str]]]:
  """`count` RGB size x size scenes of two shapes (different colour or kind) in one of four
  relations, with their captions."""
  scenes, captions = [], []
  colours, r = list(COLOURS), size // 8
  for _ in range(count):
    while True:
      kinds = [(str(rng.choice(colours)), str(rng.choice(SHAPES))) for _ in range(2)]
      if kinds[0] != kinds[1]:
        break
    relation = str(rng.choice(list(RELATIONS)))
    # Centres: the first shape on the relation's side, the second on the other, both jittered.
    lo, hi = size // 4, 3 * size // 4
    along = [lo, hi] if relation in ("left of", "above") else [hi, lo]
    across = [int(rng.integers(lo, hi + 1)) for _ in range(2)]
    jitter = [int(rng.integers(-size // 16, size // 16 + 1)) for _ in range(2)]
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for (colour, shape), a, c, j in zip(kinds, along, across, jitter, strict=True):
      cx, cy = (a + j, c) if relation in ("left of", "right of") else (c, a + j)
      _draw(draw, shape, (cx - r, cy - r, cx + r, cy + r), COLOURS[colour])
    scenes.append(np.asarray(image))
    captions.append(shape_captions(" ".join(kinds[0]), relation, " ".join(kinds[1])))
  return scenes, captions


def write_coco_captions(out: str, split: str, images: Sequence[np.ndarray],
                        captions: Sequence[Sequence[str]]) -> str:
  """Writes OUT/{split}/NNNNNN.png and OUT/annotations/captions_{split}.json; returns the json."""
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
  os.makedirs(os.path.join(out, split), exist_ok=True)
  os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
  entries, annotations = [], []
  for i, (image, caps) in enumerate(zip(images, captions, strict=True)):
    name = f"{i:06d}.png"
    array = np.asarray(image)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(
        os.path.join(out, split, name))
    entries.append({"id": i, "file_name": name, "height": array.shape[0],
                    "width": array.shape[1]})
    annotations += [{"id": len(annotations) + j, "image_id": i, "caption": c}
                    for j, c in enumerate(caps)]
  path = os.path.join(out, "annotations", f"captions_{split}.json")
  with open(path, "w") as f:
    json.dump({"images": entries, "annotations": annotations}, f)
  return path


def read_mnist_test(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """MNIST's 10,000 test images [N, 28, 28] and labels from an IDX folder."""

  files = find_files(directory)
  if "test" not in files:
    raise FileNotFoundError(f"{directory} has no t10k-images / t10k-labels IDX files")
  images, labels = read_idx(files["test"]["images"]), read_idx(files["test"]["labels"])
  if len(images) < EVAL_DIGITS[1]:
    raise ValueError(f"{files['test']['images']} holds {len(images)} images; the digits set "
                     f"needs MNIST's {EVAL_DIGITS[1]} test images")
  return images, labels


def make(kind: str, out: str, *, mnist: str = "", train: int = 10000, val: int = 1000,
         seed: int = 0) -> dict[str, str]:
  """Writes the `kind` set ('digits' or 'shapes') to `out`; returns {split: captions json}."""
  rng = np.random.default_rng(seed)
  if kind == "digits":
    if not mnist:
      raise ValueError("--kind digits needs --mnist DIR (MNIST-format IDX files)")
    images, labels = read_mnist_test(mnist)
    parts = {"train": TRAIN_DIGITS, "val": EVAL_DIGITS}
    made = {name: digit_strips(images[lo:hi], labels[lo:hi], n, rng)
            for (name, (lo, hi)), n in zip(parts.items(), (train, val), strict=True)}
  elif kind == "shapes":
    made = {name: shape_scenes(n, rng) for name, n in (("train", train), ("val", val))}
  else:
    raise ValueError(f"--kind {kind!r}: choose 'digits' or 'shapes'")
  return {name: write_coco_captions(out, name, *pair) for name, pair in made.items()}


def main(argv: list[str] | None = None) -> int:
  """Command line: see the module docstring."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", required=True, choices=("digits", "shapes"))
  parser.add_argument("--out", required=True, help="output folder (COCO caption layout)")
  parser.add_argument("--mnist", default="", help="folder of MNIST IDX files (digits)")
  parser.add_argument("--train", type=int, default=10000, help="training images")
  parser.add_argument("--val", type=int, default=1000, help="held-out images")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    written = make(args.kind, args.out, mnist=args.mnist, train=args.train, val=args.val,
                   seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, path in written.items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
