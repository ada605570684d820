"""Overlap-tile inference: the U-Net paper's way to segment images larger than the network input.

The image is mirrored at its borders by `margin` pixels; each output tile of `tile` pixels is
predicted from an input tile grown by `margin` on every side, so every predicted pixel sees its
full context. Tiles run through the network in fixed-size batches (one compilation).

With a 'valid' U-Net the network itself maps tile + 2*margin to tile (margin = 92 for 572 -> 388).
With a 'same' U-Net the centre of the output is kept; when the margin covers the receptive field
and `tile` is a multiple of 2**depth (pooling windows line up), the result equals predicting the
whole mirrored image at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _pair(x: int | tuple[int, int], name: str) -> tuple[int, int]:
  pair = (x, x) if isinstance(x, int) else tuple(x)
  if len(pair) != 2 or any(int(v) != v for v in pair):
    raise ValueError(f"{name}={x!r} must be an int or a pair of ints")
  return int(pair[0]), int(pair[1])


def mirror_pad(images: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
  """Mirrors [B, H, W, C] images at their borders (edge pixel not repeated, as in the paper)."""
  return np.pad(images, ((0, 0), (top, bottom), (left, right), (0, 0)), mode="reflect")


def predict_tiled(
    apply_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: int | tuple[int, int],
    margin: int | tuple[int, int] = 0,
    *,
    batch_size: int = 8,
) -> np.ndarray:
  """Logits [H, W, K] (or [B, H, W, K]) of `image` [H, W, C] (or [B, H, W, C]) by overlap-tiles.

  `apply_fn` maps a [n, tile_h + 2*mh, tile_w + 2*mw, C] batch to logits of either that size
  ('same' networks: the centre is kept) or [n, tile_h, tile_w, K] ('valid' networks).
  """
  th, tw = _pair(tile, "tile")
  mh, mw = _pair(margin, "margin")
  if th <= 0 or tw <= 0 or mh < 0 or mw < 0 or batch_size <= 0:
    raise ValueError(f"predict_tiled needs tile > 0, margin >= 0, batch_size > 0; got tile={tile}, "
                     f"margin={margin}, batch_size={batch_size}")
  image = np.asarray(image)
  single = image.ndim == 3
  images = image[None] if single else image
  if images.ndim != 4:
    raise ValueError(f"predict_tiled expects [H, W, C] or [B, H, W, C], got shape {image.shape}")
  b, h, w, _ = images.shape
  ny, nx = -(-h // th), -(-w // tw)
  padded = mirror_pad(images, mh, mh + ny * th - h, mw, mw + nx * tw - w)

  origins = [(i, y * th, x * tw) for i in range(b) for y in range(ny) for x in range(nx)]
  out = None
  for start in range(0, len(origins), batch_size):
    chunk = origins[start:start + batch_size]
    tiles = np.stack([padded[i, y:y + th + 2 * mh, x:x + tw + 2 * mw] for i, y, x in chunk])
    if len(chunk) < batch_size:  # same batch shape every call: no recompilation for the last one
      tiles = np.concatenate([tiles, np.repeat(tiles[-1:], batch_size - len(chunk), axis=0)])
    logits = np.asarray(apply_fn(tiles), np.float32)[: len(chunk)]
    oh, ow = logits.shape[1:3]
    if (oh, ow) == (th + 2 * mh, tw + 2 * mw):
      logits = logits[:, mh:mh + th, mw:mw + tw]
    elif (oh, ow) != (th, tw):
      raise ValueError(f"apply_fn maps {th + 2 * mh}x{tw + 2 * mw} tiles to {oh}x{ow}; expected "
                       f"{th}x{tw} (valid) or {th + 2 * mh}x{tw + 2 * mw} (same)")
    if out is None:
      out = np.zeros((b, ny * th, nx * tw, logits.shape[-1]), np.float32)
    for (i, y, x), piece in zip(chunk, logits, strict=True):
      out[i, y:y + th, x:x + tw] = piece
  out = out[:, :h, :w]
  return out[0] if single else out
