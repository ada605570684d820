"""VGG (Simonyan & Zisserman, 2015): configurations A, B, D, E = VGG-11/13/16/19, with and
without BatchNorm, in torchvision's layout.

Five stages of 3x3 convolutions (padding 1), each ending in a 2x2 max-pool; an adaptive average
pool to 7x7 (so 224 px matches torchvision and small inputs still run); then dense
4096-4096-classes with dropout. Parameter names: `conv1` ... `convN` and `bn1` ... `bnN`
numbered over the whole network, `fc1`, `fc2`, `head`. `fc1` reads the 7x7 map flattened in
(H, W, C) order; the converter permutes it from torchvision's (C, H, W).

Feature maps sown under 'intermediates': `stage1` ... `stage5` (the last ReLU of each stage,
before its max-pool) and `feature_map` (= `stage5`, the last spatial map, for Grad-CAM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import adaptive_avg_pool, batch_norm, conv_kernel_init, max_pool
from jaxvision.models.registry import register_model

# Convolutions per stage of each configuration (the paper's table 1).
DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
POOL_SIZE = 7


class VGG(nn.Module):
  """VGG.

  Attributes:
    depths: 3x3 convolutions in each of the five stages.
    batch_norm: BatchNorm after every convolution (the `_bn` variants).
    num_classes: output classes; 0 returns the `fc2` features (what the head reads).
    widths: channels of the five stages.
    hidden: width of the two hidden dense layers.
    dropout_rate: dropout after `fc1` and `fc2` (train mode needs a 'dropout' rng).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  depths: Sequence[int]
  batch_norm: bool = False
  num_classes: int = 1000
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  hidden: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    n = 0
    for stage, (features, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
      for _ in range(depth):
        n += 1
        # Without BatchNorm the conv keeps its bias; with it the bias is redundant but
        # torchvision keeps it, so it stays for weight conversion.
        x = nn.Conv(features, (3, 3), padding=1, kernel_init=conv_kernel_init, name=f"conv{n}",
                    **kw)(x)
        if self.batch_norm:
          x = batch_norm(train, name=f"bn{n}", **kw)(x)
        x = nn.relu(x)
      self.sow("intermediates", f"stage{stage + 1}", x)
      if stage == len(self.depths) - 1:
        self.sow("intermediates", "feature_map", x)
      x = max_pool(x, 2, 2)
    x = adaptive_avg_pool(x, POOL_SIZE).reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="fc1", **kw)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.hidden, name="fc2", **kw)(x))
    if not self.num_classes:
      return x
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head", **kw)(x)


_PAPER = "Simonyan & Zisserman 2015, Very deep convolutional networks"


def _vgg(depth: int, bn: bool, **kwargs) -> VGG:
  return VGG(depths=DEPTHS[depth], batch_norm=bn, **kwargs)


@register_model(paper=_PAPER)
def vgg11(**kwargs) -> VGG:
  """VGG-11 (configuration A)."""
  return _vgg(11, False, **kwargs)


@register_model(paper=_PAPER)
def vgg13(**kwargs) -> VGG:
  """VGG-13 (configuration B)."""
  return _vgg(13, False, **kwargs)


@register_model(paper=_PAPER)
def vgg16(**kwargs) -> VGG:
  """VGG-16 (configuration D)."""
  return _vgg(16, False, **kwargs)


@register_model(paper=_PAPER)
def vgg19(**kwargs) -> VGG:
  """VGG-19 (configuration E)."""
  return _vgg(19, False, **kwargs)


@register_model(paper=_PAPER)
def vgg11_bn(**kwargs) -> VGG:
  """VGG-11 with BatchNorm."""
  return _vgg(11, True, **kwargs)


@register_model(paper=_PAPER)
def vgg13_bn(**kwargs) -> VGG:
  """VGG-13 with BatchNorm."""
  return _vgg(13, True, **kwargs)


@register_model(paper=_PAPER)
def vgg16_bn(**kwargs) -> VGG:
  """VGG-16 with BatchNorm."""
  return _vgg(16, True, **kwargs)


@register_model(paper=_PAPER)
def vgg19_bn(**kwargs) -> VGG:
  """VGG-19 with BatchNorm."""
  return _vgg(19, True, **kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=10, paper=_PAPER)
def vgg_tiny(**kwargs) -> VGG:
  """Test variant: one conv per stage, widths 8-32, BatchNorm, hidden 64."""
  kwargs.setdefault("widths", (8, 16, 32, 32, 32))
  kwargs.setdefault("hidden", 64)
  return VGG(depths=(1, 1, 1, 1, 1), batch_norm=True, **kwargs)
