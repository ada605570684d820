"""U-Net (Ronneberger, Fischer & Brox, 2015) as the paper draws it.

Per level two 3x3 convolutions + ReLU (BatchNorm optional), 2x2 max-pool down, a 2x2
up-convolution (transposed convolution, or bilinear resize + 3x3 convolution) that halves the
channels, "copy and crop" skip connections and a 1x1 output convolution.

Two padding modes:
  * ``valid``: the paper's unpadded convolutions; a 572x572 input gives a 388x388 map and each
    skip is center-cropped to the decoder's size. Predict large images with overlap-tiles
    (`jaxvision.segmentation.predict_tiled`), as the paper does.
  * ``same``: zero-padded convolutions; the output has the input's size (a multiple of 2**depth).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import NonOverlappingConvTranspose, max_pool
from jaxvision.models.registry import register_model

_PADDINGS = ("valid", "same")
_UPSAMPLES = ("transpose", "resize")


def conv_transpose_padding(kernel_size: int, padding: int) -> tuple[tuple[int, int], ...]:
  """Flax `ConvTranspose` explicit padding equal to the textbook (and PyTorch) `padding`.

  Flax pads the stride-dilated input before a plain convolution, so textbook padding `p`
  (which removes `p` rows/columns from each border of the full transposed output) is
  `kernel_size - 1 - p` on both sides. Use it with ``transpose_kernel=True``, which makes
  the layer the exact adjoint of `nn.Conv` with the same kernel.
  """
  if not 0 <= padding <= kernel_size - 1:
    raise ValueError(f"padding={padding} must be in [0, kernel_size - 1 = {kernel_size - 1}]")
  side = kernel_size - 1 - padding
  return ((side, side), (side, side))


def unet_output_size(size: int, depth: int, padding: str) -> int:
  """Output height (or width) of a U-Net for input `size`; ValueError when `size` does not fit."""
  if padding not in _PADDINGS:
    raise ValueError(f"U-Net padding={padding!r}; choose from {_PADDINGS}")
  if padding == "same":
    if size % 2**depth:
      raise ValueError(f"U-Net padding='same' with depth={depth}: input size {size} must be a "
                       f"multiple of {2**depth}")
    return size
  s = size
  for level in range(depth):
    s -= 4  # two unpadded 3x3 convolutions
    if s <= 0 or s % 2:
      raise ValueError(f"U-Net padding='valid': input size {size} gives an odd or empty map "
                       f"({s}) before pool {level + 1}; try {valid_input_size(size, depth)}")
    s //= 2
  s -= 4
  for _ in range(depth):
    s = 2 * s - 4
  if s <= 0:
    raise ValueError(f"U-Net padding='valid': input size {size} is too small for depth={depth}")
  return s


def valid_input_size(at_least: int, depth: int) -> int:
  """The smallest input size >= `at_least` that a `valid` U-Net of `depth` accepts."""
  # Valid sizes are 2**depth * b + c, b the size entering the bottleneck, c what the encoder's
  # convolutions remove; b must leave a non-empty map through the whole decoder.
  c = 4 * (2**depth - 1)
  b = max(1, -(-(at_least - c) // 2**depth))
  while True:
    s = b - 4
    for _ in range(depth):
      s = 2 * s - 4 if s > 0 else s
    if s > 0:
      return 2**depth * b + c
    b += 1


def _center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width, :]


class DoubleConv(nn.Module):
  """Two 3x3 convolutions, each followed by (BatchNorm and) ReLU.

  Attributes:
    features: output channels of both convolutions.
    padding: 'valid' (each convolution trims 1 pixel per border) or 'same'.
    batch_norm: BatchNorm after each convolution (the convolutions then have no bias).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  padding: str = "valid"
  batch_norm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in (1, 2):
      x = nn.Conv(self.features, (3, 3), padding=self.padding.upper(), use_bias=not self.batch_norm,
                  name=f"conv{i}", **kw)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name=f"bn{i}", **kw)(x)
      x = nn.relu(x)
    return x


class UpConv(nn.Module):
  """Doubles the resolution and sets the channels to `features`.

  Attributes:
    features: output channels (the paper halves them).
    mode: 'transpose' (the paper's 2x2 stride-2 up-convolution) or 'resize' (bilinear x2, then a
      3x3 'same' convolution: no checkerboard artifacts).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  mode: str = "transpose"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.mode == "transpose":
      # The textbook/PyTorch transposed convolution (kernel scattered as is); stride 2 = kernel 2,
      # so it is computed as a matrix product (same parameters as nn.ConvTranspose).
      return NonOverlappingConvTranspose(self.features, 2, name="conv", **kw)(x)
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bilinear")
    return nn.Conv(self.features, (3, 3), padding="SAME", name="conv", **kw)(x)


class UNet(nn.Module):
  """U-Net: a contracting path, an expanding path and skip connections between them.

  Attributes:
    num_classes: output channels of the 1x1 head; 0 returns the last decoder features.
    depth: number of 2x2 poolings (the paper: 4).
    width: channels of the first level, doubled at each level down (the paper: 64).
    padding: 'valid' (paper-exact, smaller output) or 'same' (output size = input size).
    batch_norm: BatchNorm after each 3x3 convolution (not in the paper).
    upsample: 'transpose' (the paper's up-convolution) or 'resize' (bilinear + 3x3 convolution).
    dropout_rate: dropout at the end of the contracting path (the paper uses 0.5).
    dtype: computation dtype.
    param_dtype: parameter dtype.

  Intermediates sown: 'skip{l}' (encoder output of level l, before pooling), 'bottom' (the
  bottleneck), 'decoder{l}' (decoder output of level l; 'decoder0' feeds the head).
  """

  num_classes: int = 2
  depth: int = 4
  width: int = 64
  padding: str = "valid"
  batch_norm: bool = False
  upsample: str = "transpose"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.upsample not in _UPSAMPLES:
      raise ValueError(f"UNet upsample={self.upsample!r}; choose from {_UPSAMPLES}")
    if self.depth < 1 or self.width < 1:
      raise ValueError(f"UNet depth={self.depth} and width={self.width} must be >= 1")
    if x.ndim != 4:
      raise ValueError(f"UNet expects NHWC input, got shape {x.shape}")
    for size in x.shape[1:3]:
      unet_output_size(size, self.depth, self.padding)  # a clear error before any layer runs
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = dict(padding=self.padding, batch_norm=self.batch_norm, **kw)
    x = x.astype(self.dtype)

    skips: list[jax.Array] = []
    for level in range(self.depth):
      x = DoubleConv(self.width * 2**level, name=f"enc{level}", **block)(x, train=train)
      self.sow("intermediates", f"skip{level}", x)
      skips.append(x)
      x = max_pool(x, 2)
    x = DoubleConv(self.width * 2**self.depth, name="bottleneck", **block)(x, train=train)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    self.sow("intermediates", "bottom", x)

    for level in reversed(range(self.depth)):
      features = self.width * 2**level
      x = UpConv(features, self.upsample, name=f"up{level}", **kw)(x)
      skip = _center_crop(skips[level], x.shape[1], x.shape[2])  # "copy and crop"
      x = jnp.concatenate([skip, x], axis=-1)
      x = DoubleConv(features, name=f"dec{level}", **block)(x, train=train)
      self.sow("intermediates", f"decoder{level}", x)

    if not self.num_classes:
      return x
    return nn.Conv(self.num_classes, (1, 1), name="head", **kw)(x)


def _preset(defaults: dict, kwargs: dict) -> UNet:
  return UNet(**{**defaults, **kwargs})


@register_model(input_shape=(572, 572, 1), num_classes=2, paper="Ronneberger et al. 2015, U-Net")
def unet(**kwargs) -> UNet:
  """The paper's U-Net: 64..1024 channels, 4 poolings, valid padding, no BatchNorm."""
  return _preset(dict(depth=4, width=64, padding="valid"), kwargs)


@register_model(input_shape=(256, 256, 1), num_classes=2, paper="Ronneberger et al. 2015, U-Net")
def unet_small(**kwargs) -> UNet:
  """CPU-scale U-Net: 16..256 channels, 4 poolings, same padding, BatchNorm (~1.9M parameters)."""
  return _preset(dict(depth=4, width=16, padding="same", batch_norm=True), kwargs)


@register_model(input_shape=(32, 32, 1), num_classes=2, paper="Ronneberger et al. 2015, U-Net")
def unet_tiny(**kwargs) -> UNet:
  """Test-size U-Net: 4..16 channels, 2 poolings, same padding, BatchNorm."""
  return _preset(dict(depth=2, width=4, padding="same", batch_norm=True), kwargs)

