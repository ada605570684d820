"""`synthetic:HxWxC:K`: deterministic random images and labels, for benchmarks and tests."""

from __future__ import annotations

import re

import numpy as np

from jaxvision.data.source import ArraySource

_SPEC = re.compile(r"^(\d+)x(\d+)x(\d+):(\d+)$")
_SPLIT_SIZES = {"train": 1024, "test": 256}


def load(arg: str, split: str, image_size: int | None = None,
         data_config=None) -> dict[str, ArraySource]:
  """Random uint8 images whose label is a fixed function of the image (so a model can learn it)."""
  del data_config
  match = _SPEC.match(arg)
  if not match:
    raise ValueError(
        f"dataset 'synthetic:{arg}': expected synthetic:HxWxC:K, e.g. synthetic:32x32x3:10"
    )
  h, w, c, k = (int(g) for g in match.groups())
  if min(h, w, c, k) < 1:
    raise ValueError(f"dataset 'synthetic:{arg}': sizes and class count must be positive")
  if k > h * w:
    raise ValueError(f"dataset 'synthetic:{arg}': at most H*W={h * w} classes (one band of "
                     "pixels each)")
  splits = {}
  for i, (name, n) in enumerate(_SPLIT_SIZES.items()):
    rng = np.random.default_rng(1234 + i)
    images = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    # The label is the brightest of K bands, so the data is learnable, not pure noise: bands of
    # rows, or with more classes than rows (ImageNet's 1000 at 224 px) runs of pixels in
    # reading order.
    if k <= h:
      bands = np.array_split(images.astype(np.float32).mean(axis=(2, 3)), k, axis=1)
    else:
      bands = np.array_split(images.astype(np.float32).mean(axis=3).reshape(n, h * w), k, axis=1)
    labels = np.argmax(np.stack([b.mean(axis=1) for b in bands], axis=1), axis=1).astype(np.int32)
    splits[name] = ArraySource(images, labels, num_classes=k)
  return splits
