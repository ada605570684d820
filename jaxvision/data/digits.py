"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), the embedded default.

It ships inside scikit-learn, so it needs no download. One split, ``train``; hold out with
slicing, e.g. ``train[:80%]`` / ``train[80%:]``. scikit-learn stores the digits grouped by
writer, so the split is kept in one fixed shuffled order (permutation seed 0): a contiguous
slice is then a random held-out set, as with ``train_test_split(shuffle=True)``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
from PIL import Image

from jaxvision.data.source import ArraySource


def read_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8] float 0..16, labels [1797] int) of scikit-learn's bundled digits.

  Read from the data file scikit-learn ships (what `sklearn.datasets.load_digits` parses),
  found without importing scikit-learn: its import costs more CPU time than a LeNet step's
  compilation, and this is the trainer's default dataset.
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("dataset 'digits' needs scikit-learn (pip install scikit-learn)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data",
                      "digits.csv.gz")
  table = np.loadtxt(path, delimiter=",")
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)


def load(arg: str, split: str, image_size: int | None = None,
         data_config=None) -> dict[str, ArraySource]:
  """All digits as one ``train`` split: uint8 [N, S, S, 1] images (S = image_size or 8)."""
  del data_config
  if arg:
    raise ValueError(f"dataset 'digits' takes no argument, got 'digits:{arg}'")
  images, labels, order = _prepared(image_size or 8)
  return {
      "train": ArraySource(images, labels, num_classes=10, ids=order,
                            class_names=tuple(str(d) for d in range(10)))
  }


@functools.lru_cache(maxsize=4)
def _prepared(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, ids) in the split's fixed order, read-only: the train and eval splits of
  a run, and every later run in the same process, share one decoding and resizing."""
  images, labels = read_digits()
  images = images.astype(np.float32) / 16.0  # pixel values are 0..16
  if size != images.shape[1]:
    images = np.stack([
        np.asarray(Image.fromarray(im, mode="F").resize((size, size), Image.BILINEAR))
        for im in images
    ])
  images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)[..., None]
  order = np.random.default_rng(0).permutation(len(labels))
  arrays = images[order], labels[order], order.astype(np.int64)
  for a in arrays:
    a.setflags(write=False)
  return arrays
