"""Do the labels sit on what they label? A check to run before choosing flips and rotations.

`label_shift_profile` moves the mask of one class by every (dy, dx) up to `max_shift` pixels
and returns the mean image intensity under it. For a class that is darker (or brighter) than its
surroundings, such as EM membranes, the extremum should be at (0, 0); an extremum off the centre
means the labels are offset from the images. Vertical flips and rotations then turn a fixed
offset into a random one that no network can learn (configs/unet_membrane.py has the measurement
on the ISBI 2012 slices).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def label_shift_profile(images: Iterable[np.ndarray], masks: Iterable[np.ndarray], label: int,
                        max_shift: int = 2) -> np.ndarray:
  """[2s+1, 2s+1] mean intensity under the `label` pixels with the mask moved by (dy, dx).

  Entry [s + dy, s + dx] moves the mask down by dy rows and right by dx columns. Images are
  [H, W] or [H, W, C] (channels averaged), masks [H, W]; a border of `max_shift` pixels is left
  out so that no shift wraps around. The result averages the per-image means.
  """
  s = int(max_shift)
  if s < 0:
    raise ValueError(f"max_shift={max_shift} must be >= 0")
  total, count = np.zeros((2 * s + 1, 2 * s + 1)), 0
  for image, mask in zip(images, masks, strict=True):
    image = np.asarray(image, np.float64)
    image = image.mean(-1) if image.ndim == 3 else image
    if image.shape != np.shape(mask):
      raise ValueError(f"image {image.shape} and mask {np.shape(mask)} differ in size")
    h, w = image.shape
    if min(h, w) <= 2 * s:
      raise ValueError(f"a {h}x{w} image is too small for max_shift={s}")
    inner = image[s:h - s, s:w - s]
    for dy in range(-s, s + 1):
      for dx in range(-s, s + 1):
        # Mask moved down by dy and right by dx, read over the same inner window.
        moved = np.asarray(mask)[s - dy:h - s - dy, s - dx:w - s - dx] == label
        if not moved.any():
          raise ValueError(f"label {label} is absent from a mask's inner window")
        total[s + dy, s + dx] += inner[moved].mean()
    count += 1
  if not count:
    raise ValueError("label_shift_profile needs at least one image")
  return total / count
