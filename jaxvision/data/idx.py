"""`idx:DIR`: MNIST-format (IDX) files, gzipped or raw.

Files are found by name: `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]`
(the dot spelling `{prefix}-images.idx3-ubyte` too). The prefix names the split: `train` ->
'train', `t10k` -> 'test'. An IDX file is a 4-byte magic number (two zero bytes, a type code, the
number of dimensions), one big-endian int32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import os
import re

import numpy as np

from jaxvision.data.source import ArraySource

_FILE = re.compile(
    r"^(?P<prefix>train|t10k)-(?P<kind>images|labels)[-.]idx(?P<ndim>\d)-ubyte(\.gz)?$"
)
SPLIT_OF_PREFIX = {"train": "train", "t10k": "test"}
# IDX type code -> big-endian NumPy dtype.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """The array stored in one IDX file; a ValueError names the file when it is malformed."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read IDX file {path}: {e}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
  ndim = data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
  dtype = np.dtype(_DTYPES[data[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
        f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
        f"{len(data) - header} bytes"
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_files(directory: str) -> dict[str, dict[str, str]]:
  """{split: {'images': path, 'labels': path}} from the IDX file names in `directory`."""
  if not directory:
    raise ValueError("dataset 'idx:' needs a directory, e.g. idx:data/mnist")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"dataset idx:{directory}: no such directory")
  found: dict[str, dict[str, str]] = {}
  for name in sorted(os.listdir(directory)):
    match = _FILE.match(name)
    if match:
      split = SPLIT_OF_PREFIX[match["prefix"]]
      # A raw and a gzipped copy of the same file: either will do, keep the first (raw sorts first).
      found.setdefault(split, {}).setdefault(match["kind"], os.path.join(directory, name))
  if not found:
    raise FileNotFoundError(
        f"dataset idx:{directory}: no IDX files (expected e.g. train-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz)"
    )
  for kinds in found.values():
    for kind, other in (("images", "labels"), ("labels", "images")):
      if kind not in kinds:
        raise FileNotFoundError(
            f"dataset idx:{directory}: {kinds[other]} has no matching {kind} file"
        )
  return found


def load(arg: str, split: str, image_size: int | None = None,
         data_config=None) -> dict[str, ArraySource]:
  """Every split present in the directory, as uint8 [N, H, W, C] images and int32 labels."""
  del split, image_size, data_config  # the dispatcher slices; the transform resizes
  arrays = {}
  for name, paths in find_files(arg).items():
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.ndim not in (3, 4):
      raise ValueError(f"{paths['images']}: expected [N, H, W] images, got shape {images.shape}")
    if labels.ndim != 1:
      raise ValueError(f"{paths['labels']}: expected [N] labels, got shape {labels.shape}")
    if len(images) != len(labels):
      raise ValueError(
          f"{paths['images']} holds {len(images)} images but {paths['labels']} {len(labels)} labels"
      )
    if images.dtype != np.uint8:
      raise ValueError(f"{paths['images']}: expected unsigned bytes, got {images.dtype}")
    if len(labels) and labels.min() < 0:
      raise ValueError(f"label {int(labels.min())} out of range (negative) in {paths['labels']}")
    arrays[name] = (images if images.ndim == 4 else images[..., None], labels.astype(np.int32))
  # One class count for every split, so ids line up when splits are concatenated.
  num_classes = max(
      (int(labels.max()) + 1 for _, labels in arrays.values() if len(labels)), default=1
  )
  return {name: ArraySource(images, labels, num_classes=num_classes)
          for name, (images, labels) in arrays.items()}
