"""DenseNet (Huang et al., 2017) in torchvision's layout (memory-efficient mode off).

Each dense layer is BN-ReLU-1x1 conv (bn_size * growth) - BN-ReLU-3x3 conv (growth) and its
output is concatenated after all earlier feature maps of the block, in order (the order matters
for converted weights). Transitions halve channels and resolution. Parameter names follow
torchvision's `features.*` modules without the `features.` prefix (`conv0`, `norm0`,
`denseblock1/denselayer1/norm1`, `transition1/conv`, `norm5`); the classifier is `head`.

Feature maps sown under 'intermediates': `stem`, `block1` ... `blockN` (each dense block's
output, before its transition), and `feature_map` (ReLU(norm5), the last spatial map, for Grad-CAM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import batch_norm, conv_kernel_init, global_avg_pool, max_pool
from jaxvision.models.registry import register_model

STEMS = ("imagenet", "small")


def _conv(features, kernel, name, dtype, param_dtype, strides=1):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (strides, strides), pad, use_bias=False,
                 kernel_init=conv_kernel_init, name=name, dtype=dtype, param_dtype=param_dtype)


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv, BN-ReLU-3x3 conv: `growth_rate` new channels.

  Attributes:
    growth_rate: channels this layer adds.
    bn_size: the bottleneck is bn_size * growth_rate wide.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  growth_rate: int
  bn_size: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.relu(batch_norm(train, name="norm1", **kw)(x))
    y = _conv(self.bn_size * self.growth_rate, 1, "conv1", **kw)(y)
    y = nn.relu(batch_norm(train, name="norm2", **kw)(y))
    return _conv(self.growth_rate, 3, "conv2", **kw)(y)


class DenseBlock(nn.Module):
  """`num_layers` dense layers; each sees the concatenation of all earlier outputs.

  Attributes:
    num_layers: dense layers in the block.
    growth_rate: channels each layer adds.
    bn_size: bottleneck multiplier.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_layers: int
  growth_rate: int
  bn_size: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    for i in range(self.num_layers):
      y = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{i + 1}",
                     dtype=self.dtype, param_dtype=self.param_dtype)(x, train=train)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to `features` channels, then 2x2 average pooling.

  Attributes:
    features: output channels.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(batch_norm(train, name="norm", **kw)(x))
    x = _conv(self.features, 1, "conv", **kw)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """A DenseNet-BC: stem, dense blocks joined by transitions, final BN, pool, linear head.

  Attributes:
    growth_rate: channels each dense layer adds (k in the paper).
    block_config: dense layers per block.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck multiplier of the dense layers.
    num_classes: output classes; 0 returns the pooled features.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'small' (3x3/1 conv, no pool; 28-64 px).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = 1000
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.stem not in STEMS:
      raise ValueError(f"DenseNet stem={self.stem!r}; choose from {STEMS}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = _conv(self.num_init_features, 7, "conv0", strides=2, **kw)(x)
    else:
      x = _conv(self.num_init_features, 3, "conv0", **kw)(x)
    x = nn.relu(batch_norm(train, name="norm0", **kw)(x))
    if self.stem == "imagenet":
      x = max_pool(x, 3, 2, 1)
    self.sow("intermediates", "stem", x)
    channels = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, name=f"denseblock{i + 1}",
                     **kw)(x, train=train)
      self.sow("intermediates", f"block{i + 1}", x)
      channels += num_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        channels //= 2
        x = Transition(channels, name=f"transition{i + 1}", **kw)(x, train=train)
    x = nn.relu(batch_norm(train, name="norm5", **kw)(x))
    self.sow("intermediates", "feature_map", x)
    x = global_avg_pool(x)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, name="head", bias_init=nn.initializers.zeros, **kw)(x)


_PAPER = "Huang et al. 2017, Densely connected convolutional networks"


@register_model(paper=_PAPER)
def densenet121(**kwargs) -> DenseNet:
  """DenseNet-121: k=32, blocks (6, 12, 24, 16)."""
  return DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, **kwargs)


@register_model(paper=_PAPER)
def densenet161(**kwargs) -> DenseNet:
  """DenseNet-161: k=48, blocks (6, 12, 36, 24), 96 stem channels."""
  return DenseNet(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, **kwargs)


@register_model(paper=_PAPER)
def densenet169(**kwargs) -> DenseNet:
  """DenseNet-169: k=32, blocks (6, 12, 32, 32)."""
  return DenseNet(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64, **kwargs)


@register_model(paper=_PAPER)
def densenet201(**kwargs) -> DenseNet:
  """DenseNet-201: k=32, blocks (6, 12, 48, 32)."""
  return DenseNet(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64, **kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=10, paper=_PAPER)
def densenet_tiny(**kwargs) -> DenseNet:
  """Test variant: k=4, blocks (2, 2), 8 stem channels, bottleneck x2."""
  return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, **kwargs)
