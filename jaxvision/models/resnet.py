"""ResNet v1.5 (He et al., 2016), ResNeXt (Xie et al., 2017) and Wide ResNet (Zagoruyko &
Komodakis, 2016) in torchvision's layout.

v1.5: a bottleneck strides in its 3x3 convolution, not in its first 1x1 (torchvision's choice).
Parameter names follow torchvision's modules (`conv1`, `bn1`, `layer1_0/conv1`,
`layer1_0/downsample_conv`, ...), with the classifier named `head` (torchvision's `fc`).

Feature maps sown under 'intermediates': `stem` (after the max-pool), `layer1` ... `layer4`, and
`feature_map` (= `layer4`, the last spatial map, for Grad-CAM).
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


class _Block(nn.Module):
  """Shared fields of both residual blocks.

  Attributes:
    planes: width of the block's stage (the output is planes * expansion).
    strides: stride of the block (2 at the first block of stages 2-4).
    downsample: project the shortcut with a strided 1x1 conv + BN.
    groups: groups of the 3x3 convolution (ResNeXt).
    width_per_group: bottleneck width per group at planes=64 (Wide ResNet doubles it).
    zero_init_residual: start the last BN's scale at zero so each block begins as identity.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  planes: int
  strides: int = 1
  downsample: bool = False
  groups: int = 1
  width_per_group: int = 64
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def conv(self, features, kernel, strides=1, groups=1, name=None):
    """A bias-free conv with symmetric 'same' padding, as torchvision's."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (strides, strides), ((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False, kernel_init=conv_kernel_init,
                   name=name, dtype=self.dtype, param_dtype=self.param_dtype)

  def norm(self, train, name, last=False):
    """BatchNorm; the block's last one starts at zero when `zero_init_residual`."""
    init = nn.initializers.zeros if last and self.zero_init_residual else nn.initializers.ones
    return batch_norm(train, scale_init=init, name=name, dtype=self.dtype,
                      param_dtype=self.param_dtype)

  def shortcut(self, x, features, train):
    """Identity, or the strided 1x1 projection when the shape changes."""
    if not self.downsample:
      return x
    x = self.conv(features, 1, self.strides, name="downsample_conv")(x)
    return self.norm(train, "downsample_bn")(x)


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""

  expansion = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    y = nn.relu(self.norm(train, "bn1")(self.conv(self.planes, 3, self.strides, name="conv1")(x)))
    y = self.norm(train, "bn2", last=True)(self.conv(self.planes, 3, name="conv2")(y))
    return nn.relu(y + self.shortcut(x, self.planes, train))


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (strided, grouped), 1x1 expand by 4 (ResNet-50+, ResNeXt, Wide ResNet)."""

  expansion = 4

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    out = self.planes * self.expansion
    y = nn.relu(self.norm(train, "bn1")(self.conv(width, 1, name="conv1")(x)))
    y = self.conv(width, 3, self.strides, groups=self.groups, name="conv2")(y)
    y = nn.relu(self.norm(train, "bn2")(y))
    y = self.norm(train, "bn3", last=True)(self.conv(out, 1, name="conv3")(y))
    return nn.relu(y + self.shortcut(x, out, train))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """A ResNet: stem, four stages of residual blocks, global average pool, linear head.

  Attributes:
    layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'basic' or 'bottleneck'.
    num_classes: output classes; 0 returns the pooled features.
    widths: `planes` of the four stages; the stem has widths[0] channels.
    groups: groups of the bottleneck 3x3 convolutions (ResNeXt cardinality).
    width_per_group: bottleneck width per group at planes=64.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'small' (3x3/1 conv, no pool; 28-64 px).
    zero_init_residual: zero-init the last BN scale of every block (off for torchvision parity).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  layers: Sequence[int]
  block: str = "bottleneck"
  num_classes: int = 1000
  widths: Sequence[int] = (64, 128, 256, 512)
  groups: int = 1
  width_per_group: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.block not in _BLOCKS:
      raise ValueError(f"ResNet block={self.block!r}; choose from {sorted(_BLOCKS)}")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r}; choose from {STEMS}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = _BLOCKS[self.block]
    x = x.astype(self.dtype)
    k, s = (7, 2) if self.stem == "imagenet" else (3, 1)
    x = nn.Conv(self.widths[0], (k, k), (s, s), k // 2, use_bias=False,
                kernel_init=conv_kernel_init, name="conv1", **kw)(x)
    x = nn.relu(batch_norm(train, name="bn1", **kw)(x))
    if self.stem == "imagenet":
      x = max_pool(x, 3, 2, 1)
    self.sow("intermediates", "stem", x)
    channels = self.widths[0]
    for stage, (planes, depth) in enumerate(zip(self.widths, self.layers, strict=True)):
      for i in range(depth):
        strides = 2 if stage > 0 and i == 0 else 1
        out = planes * block_cls.expansion
        x = block_cls(
            planes, strides, downsample=(strides != 1 or channels != out), groups=self.groups,
            width_per_group=self.width_per_group, zero_init_residual=self.zero_init_residual,
            name=f"layer{stage + 1}_{i}", **kw,
        )(x, train=train)
        channels = out
      self.sow("intermediates", f"layer{stage + 1}", x)
    self.sow("intermediates", "feature_map", x)
    x = global_avg_pool(x)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, name="head", **kw)(x)


def _resnet(layers, block, **kwargs) -> ResNet:
  return ResNet(layers=layers, block=block, **kwargs)


_PAPER = "He et al. 2016, Deep residual learning for image recognition"


@register_model(paper=_PAPER)
def resnet18(**kwargs) -> ResNet:
  """ResNet-18: basic blocks (2, 2, 2, 2)."""
  return _resnet((2, 2, 2, 2), "basic", **kwargs)


@register_model(paper=_PAPER)
def resnet34(**kwargs) -> ResNet:
  """ResNet-34: basic blocks (3, 4, 6, 3)."""
  return _resnet((3, 4, 6, 3), "basic", **kwargs)


@register_model(paper=_PAPER)
def resnet50(**kwargs) -> ResNet:
  """ResNet-50 v1.5: bottlenecks (3, 4, 6, 3)."""
  return _resnet((3, 4, 6, 3), "bottleneck", **kwargs)


@register_model(paper=_PAPER)
def resnet101(**kwargs) -> ResNet:
  """ResNet-101 v1.5: bottlenecks (3, 4, 23, 3)."""
  return _resnet((3, 4, 23, 3), "bottleneck", **kwargs)


@register_model(paper=_PAPER)
def resnet152(**kwargs) -> ResNet:
  """ResNet-152 v1.5: bottlenecks (3, 8, 36, 3)."""
  return _resnet((3, 8, 36, 3), "bottleneck", **kwargs)


@register_model(paper="Xie et al. 2017, Aggregated residual transformations (ResNeXt)")
def resnext50_32x4d(**kwargs) -> ResNet:
  """ResNeXt-50 32x4d: ResNet-50 with 32 groups of width 4 in the 3x3 convolutions."""
  return _resnet((3, 4, 6, 3), "bottleneck", groups=32, width_per_group=4, **kwargs)


@register_model(paper="Zagoruyko & Komodakis 2016, Wide residual networks")
def wide_resnet50_2(**kwargs) -> ResNet:
  """Wide ResNet-50-2: ResNet-50 with bottlenecks twice as wide."""
  return _resnet((3, 4, 6, 3), "bottleneck", width_per_group=128, **kwargs)


@register_model(paper="Xie et al. 2017, Aggregated residual transformations (ResNeXt)")
def resnext101_32x8d(**kwargs) -> ResNet:
  """ResNeXt-101 32x8d: ResNet-101 with 32 groups of width 8 in the 3x3 convolutions."""
  return _resnet((3, 4, 23, 3), "bottleneck", groups=32, width_per_group=8, **kwargs)


@register_model(paper="Xie et al. 2017, Aggregated residual transformations (ResNeXt)")
def resnext101_64x4d(**kwargs) -> ResNet:
  """ResNeXt-101 64x4d: ResNet-101 with 64 groups of width 4 in the 3x3 convolutions."""
  return _resnet((3, 4, 23, 3), "bottleneck", groups=64, width_per_group=4, **kwargs)


@register_model(paper="Zagoruyko & Komodakis 2016, Wide residual networks")
def wide_resnet101_2(**kwargs) -> ResNet:
  """Wide ResNet-101-2: ResNet-101 with bottlenecks twice as wide."""
  return _resnet((3, 4, 23, 3), "bottleneck", width_per_group=128, **kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=10, paper=_PAPER)
def resnet_tiny(**kwargs) -> ResNet:
  """Test variant: one basic block per stage, widths 8-64."""
  kwargs.setdefault("widths", (8, 16, 32, 64))
  return _resnet((1, 1, 1, 1), "basic", **kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=10, paper=_PAPER)
def resnext_tiny(**kwargs) -> ResNet:
  """Test variant: one grouped bottleneck per stage (2 groups), widths 8-64."""
  kwargs.setdefault("widths", (8, 16, 32, 64))
  return _resnet((1, 1, 1, 1), "bottleneck", groups=2, width_per_group=32, **kwargs)
