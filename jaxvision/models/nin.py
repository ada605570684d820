"""Network in Network (Lin et al., 2014) for ImageNet-sized inputs.

Four "mlpconv" blocks, each a spatial convolution followed by two 1x1 convolutions (a small MLP
shared over positions), all with ReLU. The first three are followed by 3x3/2 max-pools; the last
maps to one channel per class and a global average pool gives the logits, with no dense layer.
As in the paper's ImageNet model the class maps pass a ReLU before pooling. Inputs need at least
67 px (three pools after a stride-4 11x11 convolution). torchvision has no NiN, so there is no
weight conversion.

Parameter names: `block1` ... `block3` and `head`, each with `conv`, `mlp1`, `mlp2`.
Feature maps sown under 'intermediates': `stage1` ... `stage3` (the blocks' outputs, before
their pools) and `feature_map` (= `stage3`, the last map before the class maps, for Grad-CAM).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import conv_kernel_init, global_avg_pool, max_pool
from jaxvision.models.registry import register_model

# (features, kernel, stride, padding) of the three feature blocks.
_BLOCKS = ((96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1))


class MLPConv(nn.Module):
  """A kxk convolution then two 1x1 convolutions, each followed by ReLU.

  Attributes:
    features: channels of all three convolutions.
    kernel: size of the first convolution.
    strides: stride of the first convolution.
    padding: symmetric zero padding of the first convolution.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel: int
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(kernel_init=conv_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
    k, s = (self.kernel, self.kernel), (self.strides, self.strides)
    x = nn.relu(nn.Conv(self.features, k, s, self.padding, name="conv", **kw)(x))
    x = nn.relu(nn.Conv(self.features, (1, 1), name="mlp1", **kw)(x))
    return nn.relu(nn.Conv(self.features, (1, 1), name="mlp2", **kw)(x))


class NiN(nn.Module):
  """Network in Network.

  Attributes:
    num_classes: output classes; 0 returns the globally pooled `block3` features (384-d).
    dropout_rate: dropout before the class-map block (train mode needs a 'dropout' rng).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    for i, (features, kernel, strides, padding) in enumerate(_BLOCKS):
      x = MLPConv(features, kernel, strides, padding, name=f"block{i + 1}", **kw)(x)
      self.sow("intermediates", f"stage{i + 1}", x)
      if i == len(_BLOCKS) - 1:
        self.sow("intermediates", "feature_map", x)
      x = max_pool(x, 3, 2)
    if not self.num_classes:
      return global_avg_pool(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = MLPConv(self.num_classes, 3, padding=1, name="head", **kw)(x)
    return global_avg_pool(x)


@register_model(paper="Lin et al. 2014, Network in network")
def nin(**kwargs) -> NiN:
  """NiN with the paper's ImageNet block widths 96-256-384-classes."""
  return NiN(**kwargs)
