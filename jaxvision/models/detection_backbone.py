"""The ResNet-FPN backbone of the one-stage detectors (RetinaNet, FCOS), and what their heads
share.

The ResNet is torchvision's (`jaxvision.models.resnet` blocks, the same parameter names) with
*frozen* BatchNorm, as torchvision builds it for detection (`FrozenBatchNorm2d`): the four
arrays of every BatchNorm (scale, bias, running mean and variance) are fixed statistics, held
in the non-trainable `batch_stats` collection (leaves `scale`, `bias`, `mean`, `var`), not in
`params`. They are never updated, so detection batches of a few images do not disturb the
ImageNet statistics, and the `params` count equals torchvision's parameter count.

    levels = ResNetFPN(layers=(3, 4, 6, 3))(images)   # [P3, ..., P7] at strides 8 ... 128
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import BN_EPSILON, conv_kernel_init, max_pool
from jaxvision.layers.fpn import FPN
from jaxvision.models.resnet import BasicBlock, Bottleneck


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed affine parameters and statistics: y = (x - mean) / sqrt(var + eps) *
  scale + bias, with all four arrays in the non-trainable `batch_stats` collection.

  Attributes:
    epsilon: added to the variance (torchvision's default 1e-5; its COCO RetinaNet weights were
      trained with 0).
    dtype: computation dtype.
    param_dtype: dtype of the stored arrays.
  """

  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1],)
    stat = lambda name, init: self.variable("batch_stats", name, init, shape, self.param_dtype)
    scale, bias = stat("scale", jnp.ones).value, stat("bias", jnp.zeros).value
    mean, var = stat("mean", jnp.zeros).value, stat("var", jnp.ones).value
    # torchvision folds the four arrays into one multiply-add, in the stored precision.
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return x.astype(self.dtype) * mul.astype(self.dtype) + add.astype(self.dtype)


def _frozen_norm(block, name: str) -> FrozenBatchNorm:
  return FrozenBatchNorm(block.bn_epsilon, name=name, dtype=block.dtype,
                         param_dtype=block.param_dtype)


class FrozenBasicBlock(BasicBlock):
  """ResNet's basic block with frozen BatchNorm.

  Attributes:
    bn_epsilon: epsilon of the frozen BatchNorms.
  """

  bn_epsilon: float = BN_EPSILON

  def norm(self, train, name, last=False):
    """A frozen BatchNorm (training mode does not change it)."""
    del train, last
    return _frozen_norm(self, name)


class FrozenBottleneck(Bottleneck):
  """ResNet's bottleneck block with frozen BatchNorm.

  Attributes:
    bn_epsilon: epsilon of the frozen BatchNorms.
  """

  bn_epsilon: float = BN_EPSILON

  def norm(self, train, name, last=False):
    """A frozen BatchNorm (training mode does not change it)."""
    del train, last
    return _frozen_norm(self, name)


_BLOCKS = {"basic": FrozenBasicBlock, "bottleneck": FrozenBottleneck}


class ResNetBody(nn.Module):
  """ResNet stem and four stages with frozen BatchNorm, returning the stage outputs C2 ... C5
  (strides 4, 8, 16, 32). Parameter names are `jaxvision.models.resnet.ResNet`'s.

  Attributes:
    layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'basic' or 'bottleneck'.
    widths: `planes` of the four stages; the stem has widths[0] channels.
    bn_epsilon: epsilon of the frozen BatchNorms.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  layers: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  bn_epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
    if self.block not in _BLOCKS:
      raise ValueError(f"ResNetBody block={self.block!r}; choose from {sorted(_BLOCKS)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = _BLOCKS[self.block]
    x = nn.Conv(self.widths[0], (7, 7), (2, 2), ((3, 3), (3, 3)), use_bias=False,
                kernel_init=conv_kernel_init, name="conv1", **kw)(x.astype(self.dtype))
    x = nn.relu(FrozenBatchNorm(self.bn_epsilon, name="bn1", **kw)(x))
    x = max_pool(x, 3, 2, 1)
    channels, stages = self.widths[0], []
    for stage, (planes, depth) in enumerate(zip(self.widths, self.layers, strict=True)):
      for i in range(depth):
        strides = 2 if stage > 0 and i == 0 else 1
        out = planes * block_cls.expansion
        block = block_cls(planes, strides, downsample=(strides != 1 or channels != out),
                          bn_epsilon=self.bn_epsilon, name=f"layer{stage + 1}_{i}", **kw)
        x = block(x, train=train)
        channels = out
      stages.append(x)
    return stages


class ResNetFPN(nn.Module):
  """torchvision's `BackboneWithFPN` over a frozen-BN ResNet: `body` (C3-C5) then `fpn`.

  Attributes:
    layers: ResNet blocks per stage.
    block: 'basic' or 'bottleneck'.
    widths: ResNet stage widths.
    fpn_features: channels of every pyramid level.
    extra: the FPN's extra levels ('p6p7_p5', 'p6p7_c5', 'pool' or 'none').
    bn_epsilon: epsilon of the frozen BatchNorms.
    min_level: the finest level: 3 (torchvision's detectors, P3 at stride 8) or 2 (also C2,
      as torchvision's `returned_layers=[1, 2, 3, 4]`: a stride-4 P2 for objects a few pixels
      across, at the cost of a 4x larger finest level).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  layers: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  fpn_features: int = 256
  extra: str = "p6p7_p5"
  bn_epsilon: float = BN_EPSILON
  min_level: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
    if self.min_level not in (2, 3):
      raise ValueError(f"ResNetFPN min_level={self.min_level}; choose 2 or 3")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stages = ResNetBody(self.layers, self.block, self.widths, self.bn_epsilon, name="body",
                        **kw)(x, train=train)
    # torchvision's detectors skip C2 by default: it would give too many anchors (RetinaNet
    # paper).
    return FPN(self.fpn_features, self.extra, name="fpn", **kw)(stages[self.min_level - 2:])


def resnet_fpn_strides(extra: str, min_level: int = 3) -> tuple[int, ...]:
  """Strides of the levels `ResNetFPN` returns: P2 (for `min_level=2`), P3-P5, then P6 (and
  P7) for the extra levels."""
  extra_strides = {"none": (), "pool": (64,)}.get(extra, (64, 128))
  return (4, 8, 16, 32)[min_level - 2:] + extra_strides


def concat_levels(maps: Sequence[jax.Array], columns: int) -> jax.Array:
  """Per-level head maps [B, H, W, A * columns] -> [B, sum(H * W * A), columns], in
  torchvision's order (level, then row, column, anchor)."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, columns) for m in maps], axis=1)
