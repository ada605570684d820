"""The ISBI 2012 EM slices as a COCO instance-segmentation set: one instance per cell.

    python -m jaxvision.data.make_cell_instances --isbi ../shared/data/isbi2012-membrane \\
        --out runs/cells

The challenge labels membranes (0) against cell interior (255). Each labelled slice's interior is
split into its connected regions (4-connectivity: cells touching only at a corner are two) and
every region of at least --min_area pixels becomes an instance of the one category "cell";
smaller ones are specks between membranes, not cells. Regions touching the image border are
kept: they are real cells the section cuts. Each instance has a compressed-RLE segmentation and
its `area` and `bbox` from the mask ([x, y, w, h] of its pixels, as pycocotools' toBbox). Slices
0..train-1 (in numeric order) are the train split, the rest val: the 25 / 5 split of
configs/unet_membrane.py. The result is read by the `coco:` reader (data.masks=True):

    OUT/annotations/instances_{train,val}.json
    OUT/{train,val}/N.png       the slices, copied (N_R_C.png: tile R, C with --tile)

`--tile 256` cuts every slice into non-overlapping 256 x 256 tiles, each an image of its own
whose instances are the regions of its own part of the label (a cell the tile edge cuts is a
partial instance, as one the section edge cuts). A whole slice holds about 110 cells, more than
COCO's 100 detections per image that AP and AR count (maxDets), so whole-slice AP could not
reach 1; a 256-pixel tile holds about 30.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
from PIL import Image

INTERIOR = 255  # the labels' value of cell interior (membranes are 0)
MIN_AREA = 50  # pixels: smaller regions are not cells
TRAIN_SLICES = 25  # slices 0..24 train, the rest val (configs/unet_membrane.py's split)


def cell_regions(label: np.ndarray, min_area: int = MIN_AREA) -> np.ndarray:
  """bool [n, H, W]: the connected regions (4-connectivity) of a label's cell interior with at
  least `min_area` pixels, in scan order of their first pixel."""
  from scipy import ndimage

  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f"cell_regions: a label image must be [H, W], got {label.shape}")
  four = ndimage.generate_binary_structure(2, 1)
  regions, count = ndimage.label(label == INTERIOR, structure=four)
  sizes = np.bincount(regions.ravel(), minlength=count + 1)
  keep = np.nonzero(sizes[1:] >= min_area)[0] + 1
  return regions[None] == keep[:, None, None]


def instance_annotations(regions: np.ndarray, image_id: int, first_id: int) -> list[dict]:
  """COCO annotations of bool regions [n, H, W]: compressed RLE, area and bbox from the mask."""
  from pycocotools import mask as mask_utils

  anns = []
  for k, region in enumerate(regions):
    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    ys, xs = np.nonzero(region)
    x0, y0 = int(xs.min()), int(ys.min())
    anns.append({
        "id": first_id + k, "image_id": image_id, "category_id": 1, "iscrowd": 0,
        "segmentation": {"size": list(region.shape), "counts": rle["counts"].decode("ascii")},
        "area": int(region.sum()),
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
  return anns


def labelled_slices(isbi_dir: str) -> list[str]:
  """The numeric stems of DIR/train/label/N.png that have a DIR/train/image/N.png, in order."""
  labels, images = (os.path.join(isbi_dir, "train", d) for d in ("label", "image"))
  if not os.path.isdir(labels) or not os.path.isdir(images):
    raise FileNotFoundError(f"{isbi_dir}: needs train/image/N.png and train/label/N.png")
  stems = [f[:-4] for f in os.listdir(labels) if f.endswith(".png") and f[:-4].isdigit()]
  missing = [s for s in stems if not os.path.isfile(os.path.join(images, s + ".png"))]
  if missing:
    raise FileNotFoundError(f"{images}: no image {missing[0]}.png for label {missing[0]}.png")
  if not stems:
    raise FileNotFoundError(f"{labels}: no N.png label files")
  return sorted(stems, key=int)


def tiles(height: int, width: int, tile: int) -> list[tuple[str, tuple[slice, slice]]]:
  """('', whole image) without tiling, else ('_R_C', window) for every tile x tile window."""
  if not tile:
    return [("", (slice(0, height), slice(0, width)))]
  if tile < 0 or height % tile or width % tile:
    raise ValueError(f"--tile {tile} must divide the slices' size {width}x{height}")
  return [(f"_{r}_{c}", (slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile)))
          for r in range(height // tile) for c in range(width // tile)]


def make_cell_instances(isbi_dir: str, out_dir: str, *, min_area: int = MIN_AREA,
                        train_slices: int = TRAIN_SLICES, tile: int = 0
                        ) -> dict[str, list[int]]:
  """Writes the COCO set (module docstring); returns {split: instances per image}."""
  stems = labelled_slices(isbi_dir)
  if not 0 < train_slices < len(stems):
    raise ValueError(f"train_slices={train_slices}: {isbi_dir} has {len(stems)} labelled slices")
  splits = {"train": stems[:train_slices], "val": stems[train_slices:]}
  counts = {}
  for split, names in splits.items():
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    images, anns, per_image = [], [], []
    for stem in names:
      image_path = os.path.join(isbi_dir, "train", "image", stem + ".png")
      label_path = os.path.join(isbi_dir, "train", "label", stem + ".png")
      label = np.asarray(Image.open(label_path))
      with Image.open(image_path) as im:
        width, height = im.size
        pixels = np.asarray(im)
      if label.shape != (height, width):
        raise ValueError(f"{label_path} is {label.shape[::-1]} but its image is "
                         f"{(width, height)}")
      for suffix, window in tiles(height, width, tile):
        image_id = len(images) + 1
        regions = cell_regions(label[window], min_area)
        anns += instance_annotations(regions, image_id, len(anns) + 1)
        per_image.append(len(regions))
        file_name = stem + suffix + ".png"
        if suffix:
          Image.fromarray(pixels[window]).save(os.path.join(out_dir, split, file_name))
        else:
          shutil.copyfile(image_path, os.path.join(out_dir, split, file_name))
        h, w = label[window].shape
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cell"}]}
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
      json.dump(data, f)
    counts[split] = per_image
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--isbi", required=True, help="the ISBI 2012 folder (train/image, "
                      "train/label)")
  parser.add_argument("--out", required=True, help="output folder of the COCO set")
  parser.add_argument("--min_area", type=int, default=MIN_AREA, help="smallest region, pixels")
  parser.add_argument("--train_slices", type=int, default=TRAIN_SLICES,
                      help="the first slices that are the train split")
  parser.add_argument("--tile", type=int, default=0,
                      help="cut each slice into tile x tile images (0: whole slices)")
  args = parser.parse_args(argv)
  try:
    counts = make_cell_instances(args.isbi, args.out, min_area=args.min_area,
                                 train_slices=args.train_slices, tile=args.tile)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"make_cell_instances: {e}") from None
  for split, per_image in counts.items():
    print(f"{split}: {len(per_image)} images, {sum(per_image)} instances "
          f"({np.mean(per_image):.1f} per image, {min(per_image)}..{max(per_image)})")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
