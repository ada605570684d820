"""The U-Net paper's pixel weight map (host-side numpy): it emphasises thin borders between cells.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

w_c balances the class frequencies; d1 and d2 are the distances to the nearest and the second
nearest cell. As in the paper's figure (and most reproductions), the border term applies to the
pixels between cells, not to the cells themselves.
"""

from __future__ import annotations

import math

import numpy as np


def class_balance_weights(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """w_c per pixel: N / (K_present * N_k) for the pixel's class k (its mean over the image is 1)."""
  counts = np.bincount(mask.ravel().clip(0, num_classes - 1), minlength=num_classes)
  present = np.count_nonzero(counts)
  weights = np.where(counts > 0, mask.size / (max(present, 1) * np.maximum(counts, 1)), 0.0)
  return weights[mask.clip(0, num_classes - 1)].astype(np.float32)


def nearest_two_distances(cells: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
  """Distances d1 <= d2 from every pixel to its nearest and second-nearest connected component.

  Distances beyond `reach` are reported as inf: each component's distance transform is computed
  only in its bounding box grown by `reach`, which keeps the cost proportional to the cells' area.
  """
  from scipy import ndimage  # here: its import costs every run ~0.5 s, and only U-Net needs it

  labels, _ = ndimage.label(cells)
  d1 = np.full(cells.shape, np.inf, np.float32)
  d2 = np.full(cells.shape, np.inf, np.float32)
  r = int(math.ceil(reach))
  for i, box in enumerate(ndimage.find_objects(labels), start=1):
    if box is None:
      continue
    window = tuple(slice(max(s.start - r, 0), min(s.stop + r, size))
                   for s, size in zip(box, cells.shape, strict=True))
    d = ndimage.distance_transform_edt(labels[window] != i).astype(np.float32)
    d[d > reach] = np.inf
    w1, w2 = d1[window], d2[window]
    # The new distance displaces d1 and/or d2 where it is smaller.
    w2[...] = np.minimum(w2, np.maximum(w1, d))
    w1[...] = np.minimum(w1, d)
  return d1, d2


def unet_weight_map(
    mask: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    *,
    cell_class: int = 1,
    num_classes: int = 2,
    balance: bool = True,
    tolerance: float = 1e-3,
) -> np.ndarray:
  """The paper's weight map [H, W] float32 for one class map [H, W].

  Cells are the 4-connected components of `mask == cell_class`. The border term is exact to
  `tolerance`: distances beyond the point where it falls below `tolerance` are not computed.
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"unet_weight_map expects one [H, W] class map, got shape {mask.shape}")
  if sigma <= 0 or w0 < 0:
    raise ValueError(f"unet_weight_map needs sigma > 0 and w0 >= 0, got sigma={sigma}, w0={w0}")
  w = class_balance_weights(mask, num_classes) if balance else np.ones(mask.shape, np.float32)
  if w0 == 0:
    return w
  cells = mask == cell_class
  # w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) < tolerance once d2 > reach (as d1 + d2 >= d2).
  reach = sigma * math.sqrt(2.0 * math.log(max(w0 / tolerance, 1.0 + 1e-6)))
  d1, d2 = nearest_two_distances(cells, reach)
  border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))  # inf -> 0
  return (w + np.where(cells, 0.0, border)).astype(np.float32)


def add_weight_map(
    batch: dict, w0: float = 10.0, sigma: float = 5.0, *, cell_class: int = 1,
    num_classes: int = 2, balance: bool = True,
) -> dict:
  """The batch with batch['weight'] [B, H, W] float32: the weight map of each batch['label']."""
  labels = np.asarray(batch["label"])
  if labels.ndim != 3:
    raise ValueError(f"add_weight_map expects batch['label'] [B, H, W], got shape {labels.shape}")
  weight = np.stack([
      unet_weight_map(m, w0, sigma, cell_class=cell_class, num_classes=num_classes, balance=balance)
      for m in labels
  ])
  return {**batch, "weight": weight}
