"""Token embeddings of the Vision Transformer: patches, and fixed or resampled position embeddings.

    tokens = PatchEmbed(width=768, patch_size=16)(images)        # (B, 14*14, 768) at 224 px
    pe = sincos_posemb_2d((14, 14), 768)                          # (196, 768), no parameters
    pe = resample_posemb(pos_embed, (24, 24), num_prefix_tokens=1)  # 224 px weights at 384 px
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_RESAMPLE_METHODS = ("bilinear", "bicubic")


def to_pair(size: int | tuple[int, int]) -> tuple[int, int]:
  """An int or (h, w) -> (h, w)."""
  if isinstance(size, int):
    return (size, size)
  h, w = size
  return (int(h), int(w))


def patch_grid(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
  """Patch grid (rows, cols) of an image; ValueError when the patch does not tile it."""
  h, w = to_pair(image_size)
  if patch_size <= 0 or h % patch_size or w % patch_size:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch_size={patch_size}")
  return (h // patch_size, w // patch_size)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens: a convolution with kernel = stride = patch size.

  Attributes:
    width: token dimension D.
    patch_size: side of the square patches, in pixels.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  width: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    patch_grid(x.shape[1:3], self.patch_size)  # a clear error instead of silently cropping
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="proj",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return einops.rearrange(x, "b h w d -> b (h w) d")


def _sincos_1d(positions: np.ndarray, width: int, temperature: float) -> np.ndarray:
  # Even channels 2i get sin(pos / T^(2i/D)), odd channels 2i+1 the cos at the same frequency.
  i = np.arange(width // 2, dtype=np.float64)
  angles = positions[:, None] / temperature ** (2.0 * i / width)[None, :]
  pe = np.zeros((len(positions), width), np.float64)
  pe[:, 0::2] = np.sin(angles)
  pe[:, 1::2] = np.cos(angles)
  return pe


def sincos_posemb_1d(length: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """(length, D) embedding: PE(pos, 2i) = sin(pos / T^(2i/D)), PE(pos, 2i+1) = cos(...)."""
  if width % 2:
    raise ValueError(f"sin-cos 1-D position embedding needs an even width, got {width}")
  return _sincos_1d(np.arange(length, dtype=np.float64), width, temperature).astype(np.float32)


def sincos_posemb_2d(
    grid: tuple[int, int], width: int, temperature: float = 10_000.0
) -> np.ndarray:
  """Fixed 2-D embedding, row-major over the grid: the 1-D formula of the row in the first D/2
  channels, of the column in the last D/2; shape (rows * cols, D)."""
  if width % 4:
    raise ValueError(f"sin-cos 2-D position embedding needs a width divisible by 4, got {width}")
  rows, cols = grid
  y, x = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                     indexing="ij")
  pe_y = _sincos_1d(y.reshape(-1), width // 2, temperature)
  pe_x = _sincos_1d(x.reshape(-1), width // 2, temperature)
  return np.concatenate([pe_y, pe_x], axis=1).astype(np.float32)


def fixed_posemb(
    kind: str, grid: tuple[int, int], width: int, num_prefix_tokens: int
) -> np.ndarray:
  """(1, prefix + rows*cols, D) sin-cos embedding; prefix tokens (class token) get zeros."""
  n = grid[0] * grid[1]
  if kind == "sincos1d":
    pe = sincos_posemb_1d(n, width)
  elif kind == "sincos2d":
    pe = sincos_posemb_2d(grid, width)
  else:
    raise ValueError(f"fixed position embedding {kind!r}; choose 'sincos1d' or 'sincos2d'")
  prefix = np.zeros((num_prefix_tokens, width), np.float32)
  return np.concatenate([prefix, pe], axis=0)[None]


def resample_posemb(
    posemb: jax.Array,
    new_grid: tuple[int, int],
    method: str = "bilinear",
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> jax.Array:
  """Resizes a (1, prefix + rows*cols, D) position embedding to `new_grid` over its 2-D grid.

  Prefix tokens (the class token) are kept as they are. `old_grid` defaults to the square root
  of the grid length. Returns `posemb` itself when the grids already match.
  """
  if method not in _RESAMPLE_METHODS:
    raise ValueError(f"resample_posemb method={method!r}; choose from {_RESAMPLE_METHODS}")
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"posemb must have shape (1, tokens, width), got {tuple(posemb.shape)}")
  n = posemb.shape[1] - num_prefix_tokens
  if old_grid is None:
    side = math.isqrt(max(n, 0))
    if side * side != n:
      raise ValueError(f"posemb has {n} grid tokens, not a square; pass old_grid=(rows, cols)")
    old_grid = (side, side)
  old_grid, new_grid = to_pair(old_grid), to_pair(new_grid)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f"old_grid={old_grid} does not match the {n} grid tokens of posemb")
  if old_grid == new_grid:
    return posemb
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  d = grid.shape[-1]
  grid = grid.reshape((old_grid[0], old_grid[1], d)).astype(jnp.float32)
  # antialias=False: a position embedding is a smooth field to interpolate, not an image to
  # low-pass; plain interpolation keeps downsample(upsample(x)) close to x.
  grid = jax.image.resize(grid, (*new_grid, d), method=method, antialias=False)
  grid = grid.reshape((1, new_grid[0] * new_grid[1], d)).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)
