"""`flickr:DIR`: Flickr8k / Flickr30k captions, in any of their usual layouts.

  Karpathy split JSON   DIR/dataset_*.json ({"images": [{"filename", "split", "sentences":
                        [{"raw"}]}]}): splits train / val / test / restval, as it says.
  token file            DIR/*.token.txt or DIR/*.token (Flickr8k.token.txt,
                        results_20130124.token), one `image.jpg#n<TAB>caption` per line; the
                        splits are the `*trainImages.txt` / `*devImages.txt` /
                        `*testImages.txt` lists beside it (one file name a line), else one
                        split 'train' (hold out with slicing).
  captions.txt          DIR/captions.txt with an `image,caption` header (the Kaggle copy).

Images are found in the first of DIR/{Flicker8k_Dataset, Flickr8k_Dataset, Images, images,
flickr30k-images, flickr30k_images} that exists, else DIR. Bad records (a missing image, an
empty caption, a malformed line, a split list naming an image without captions) stop the run
with a line naming them, or with data.skip_bad are left out and counted.
"""

from __future__ import annotations

import csv
import glob
import os
import re

from jaxvision.data.coco_captions import (
  BadRecords,
  CaptionSource,
  caption_source,
  read_json,
  wanted_splits,
)

IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images", "flickr30k-images",
              "flickr30k_images")
_SPLIT_LIST = re.compile(r"^(?:.*[._-])?(train|dev|val|test)Images\.txt$")


def image_dir(root: str) -> str:
  """The folder holding the images."""
  for name in IMAGE_DIRS:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  return root


def find_layout(root: str) -> tuple[str, str]:
  """('karpathy' | 'token' | 'csv', file) of the caption file in `root`."""
  if not root:
    raise ValueError("dataset 'flickr:' needs a directory, e.g. flickr:/data/flickr8k")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"dataset flickr:{root}: no such directory")
  karpathy = sorted(glob.glob(os.path.join(root, "dataset_*.json")))
  if karpathy:
    return "karpathy", karpathy[0]
  tokens = sorted(p for p in glob.glob(os.path.join(root, "*.token*"))
                  if p.endswith((".token", ".token.txt")) and "lemma" not in os.path.basename(p))
  if tokens:
    return "token", tokens[0]
  if os.path.isfile(os.path.join(root, "captions.txt")):
    return "csv", os.path.join(root, "captions.txt")
  raise FileNotFoundError(f"dataset flickr:{root}: no dataset_*.json, *.token.txt or "
                          "captions.txt")


def read_token_file(path: str, problems: BadRecords) -> dict[str, list[str]]:
  """{image file name: captions} of a `name#n<TAB>caption` file, in first-seen order."""
  captions: dict[str, list[str]] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      key, tab, caption = line.rstrip("\n").partition("\t")
      name = key.rsplit("#", 1)[0].strip()
      if not tab or not name:
        problems.report(f"{path} line {number}: not 'image#n<TAB>caption'")
        continue
      if not caption.strip():
        problems.report(f"{path} line {number}: empty caption of {name}")
        continue
      captions.setdefault(name, []).append(caption.strip())
  return captions


def read_csv_file(path: str, problems: BadRecords) -> dict[str, list[str]]:
  """{image file name: captions} of an `image,caption` CSV file."""
  captions: dict[str, list[str]] = {}
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
      raise ValueError(f"{path}: the first line must be the header 'image,caption'")
    for number, row in enumerate(reader, 2):
      if len(row) < 2 or not row[0].strip():
        problems.report(f"{path} line {number}: not 'image,caption'")
        continue
      caption = ",".join(row[1:]).strip()
      if not caption:
        problems.report(f"{path} line {number}: empty caption of {row[0].strip()}")
        continue
      captions.setdefault(row[0].strip(), []).append(caption)
  return captions


def split_lists(root: str) -> dict[str, list[str]]:
  """{split: image file names} of the `*{train,dev,test}Images.txt` lists in `root`."""
  lists = {}
  for name in sorted(os.listdir(root)):
    match = _SPLIT_LIST.match(name)
    if match:
      with open(os.path.join(root, name), encoding="utf-8") as f:
        lists[match[1]] = [line.strip() for line in f if line.strip()]
  return lists


def _karpathy_entries(path: str, folder: str, problems: BadRecords
                      ) -> dict[str, list[tuple[str, list[str], int]]]:
  data = read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"{path}: not a Karpathy split file (needs an 'images' list)")
  splits: dict[str, list] = {}
  for k, image in enumerate(data["images"]):
    if not isinstance(image, dict) or "filename" not in image:
      problems.report(f"{path}: images[{k}] has no 'filename'")
      continue
    sentences = image.get("sentences") or []
    captions = [s.get("raw", "") if isinstance(s, dict) else "" for s in sentences]
    name = os.path.join(image.get("filepath", ""), image["filename"])
    image_id = int(image.get("cocoid", image.get("imgid", k)))
    splits.setdefault(str(image.get("split", "train")), []).append(
        (os.path.join(folder, name), captions, image_id))
  return splits


def load(arg: str, split: str, image_size: int | None = None,
         data_config=None) -> dict[str, CaptionSource]:
  """The splits `split` names, each a CaptionSource."""
  del image_size  # the transform resizes
  layout, path = find_layout(arg)
  folder = image_dir(arg)
  what = f"flickr:{arg}"
  problems = BadRecords(bool(data_config.skip_bad), what)
  if layout == "karpathy":
    entries = _karpathy_entries(path, folder, problems)
  else:
    captions = (read_token_file if layout == "token" else read_csv_file)(path, problems)
    lists = split_lists(arg) or {"train": list(captions)}
    entries = {}
    for name, files in lists.items():
      rows = []
      for file_name in files:
        if file_name not in captions:
          problems.report(f"{what}: {name} split lists {file_name}, which has no caption")
          continue
        rows.append((os.path.join(folder, file_name), captions[file_name], len(rows)))
      entries[name] = rows
  sources = {}
  for name in wanted_splits(split, entries):
    split_problems = BadRecords(problems.skip_bad, f"{what} {name}")
    split_problems.lines = list(problems.lines)
    sources[name] = caption_source(entries[name], data_config, split_problems)
  return sources
