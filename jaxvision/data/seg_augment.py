"""Joint image + mask augmentation for segmentation: every geometric op moves both the same way.

Images are float32 [H, W, C] in [0, 1]; masks int32 [H, W]. Geometric ops resample the image
with (bi)cubic splines and the mask with nearest neighbours (order 0), so class ids stay ids.
"""

from __future__ import annotations

import numpy as np


def crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator | None):
  """A size x size window (random with `rng`, else centered); smaller inputs are mirror-padded."""
  h, w = mask.shape
  pad_h, pad_w = max(0, size - h), max(0, size - w)
  if pad_h or pad_w:
    # Mirroring extends the tissue plausibly (the U-Net paper's border extrapolation).
    pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    image = np.pad(image, pads + ((0, 0),), mode="reflect" if min(h, w) > 1 else "edge")
    mask = np.pad(mask, pads, mode="reflect" if min(h, w) > 1 else "edge")
    h, w = mask.shape
  if rng is None:
    top, left = (h - size) // 2, (w - size) // 2
  else:
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size], mask[top:top + size, left:left + size]


def flip(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
  """Horizontal and vertical flips, each with probability 1/2."""
  image, mask = hflip(image, mask, rng)
  if rng.random() < 0.5:
    image, mask = image[::-1], mask[::-1]
  return image, mask


def hflip(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
  """Horizontal flip with probability 1/2 (top and bottom stay where they are)."""
  if rng.random() < 0.5:
    image, mask = image[:, ::-1], mask[:, ::-1]
  return image, mask


def rot90(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
  """Rotation by k * 90 degrees, k uniform in {0, 1, 2, 3} (square inputs keep their shape)."""
  k = int(rng.integers(0, 4))
  return np.rot90(image, k, axes=(0, 1)), np.rot90(mask, k, axes=(0, 1))


def _cubic_weights(grid: int, n: int) -> np.ndarray:
  """[n, grid] weights that interpolate `grid` control values onto n pixels with a cubic spline."""
  from scipy import ndimage  # here: its import costs every run ~0.7 s, and only this needs it

  positions = np.linspace(0, grid - 1, n)
  basis = np.eye(grid)
  return np.stack([
      ndimage.map_coordinates(basis[j], positions[None], order=3, mode="nearest")
      for j in range(grid)
  ], axis=1)


def displacement_field(shape: tuple[int, int], rng: np.random.Generator, sigma: float, grid: int):
  """Per-pixel (dy, dx): N(0, sigma) displacements on a coarse grid, bicubically interpolated."""
  h, w = shape
  coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
  wy, wx = _cubic_weights(grid, h), _cubic_weights(grid, w)
  # The tensor-product spline is separable: interpolate rows, then columns.
  return np.einsum("hi,cij,wj->chw", wy, coarse, wx)


def elastic(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, sigma: float = 10.0,
            grid: int = 3):
  """Elastic deformation as in the U-Net paper (Ronneberger et al. 2015), applied to both."""
  from scipy import ndimage  # see _cubic_weights

  h, w = mask.shape
  dy, dx = displacement_field((h, w), rng, sigma, int(grid))
  yy, xx = np.meshgrid(
      np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
  )
  coords = np.stack([yy + dy, xx + dx])
  warped = np.stack([
      ndimage.map_coordinates(image[..., c], coords, order=3, mode="mirror")
      for c in range(image.shape[-1])
  ], axis=-1)
  warped_mask = ndimage.map_coordinates(mask, coords, order=0, mode="mirror")
  # Cubic splines overshoot at sharp edges; keep intensities in range.
  return np.clip(warped, 0.0, 1.0).astype(np.float32), warped_mask.astype(mask.dtype)


def jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
  """Brightness shift and contrast scale, each uniform within +-strength; the mask is untouched."""
  brightness = rng.uniform(-strength, strength)
  contrast = rng.uniform(1.0 - strength, 1.0 + strength)
  mean = image.mean()
  return np.clip((image - mean) * contrast + mean + brightness, 0.0, 1.0).astype(np.float32)
