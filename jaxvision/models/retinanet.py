"""RetinaNet (Lin et al., 2017, Focal loss for dense object detection) in torchvision's layout.

A frozen-BN ResNet-50 (`backbone/body`), an FPN on C3-C5 with P6/P7 (`backbone/fpn`), and two
heads shared by all five levels: `cls_head` (4 x [3x3 conv, ReLU], then a 3x3 conv to A * K
logits whose bias starts at the prior -log((1 - p) / p)) and `reg_head` (4 x [3x3 conv, ReLU],
then A * 4 box deltas). torchvision's v1 `retinanet_resnet50_fpn` computes P6 from P5
(`LastLevelP6P7(256, 256)`), so `extra='p6p7_p5'` is the default; the paper and torchvision's
v2 compute it from C5 (`extra='p6p7_c5'`).

The model returns the raw head outputs over all anchors, in torchvision's order (level, row,
column, anchor): {'cls_logits': [B, N, K], 'bbox_regression': [B, N, 4]}; `anchors(image_hw)`
gives the matching anchors (`jaxvision.detection.anchors.AnchorSet`, [N, 4] xyxy pixels) that
decode them. `num_classes` keeps
torchvision's COCO convention (91, index 0 unused). The published COCO weights
(`retinanet_resnet50_fpn_coco-eeacb38b.pth`) were trained with BatchNorm epsilon 0: pass
`bn_epsilon=0.0` with them, as torchvision does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.detection.anchors import AnchorSet, feature_shapes, grid_anchors
from jaxvision.layers.conv import BN_EPSILON
from jaxvision.models.detection_backbone import ResNetFPN, concat_levels, resnet_fpn_strides
from jaxvision.models.registry import register_model

# torchvision's initialisation of every head convolution: N(0, 0.01), zero bias.
head_kernel_init = nn.initializers.normal(0.01)


def prior_bias(prior_probability: float):
  """Bias initialiser that starts every sigmoid at `prior_probability` (the focal-loss prior)."""
  value = -math.log((1 - prior_probability) / prior_probability)
  return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


class RetinaNetHead(nn.Module):
  """`convs` x [3x3 conv, ReLU] then a 3x3 conv to `anchors * columns`, shared by all levels.

  Attributes:
    anchors: anchors per location A.
    columns: outputs per anchor (classes K, or 4 box deltas).
    convs: hidden 3x3 convolutions.
    out_name: name of the last convolution ('cls_logits' or 'bbox_reg').
    bias_init: initialiser of the last convolution's bias.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  anchors: int
  columns: int
  convs: int = 4
  out_name: str = "cls_logits"
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> jax.Array:
    kw = dict(padding=((1, 1), (1, 1)), kernel_init=head_kernel_init, dtype=self.dtype,
              param_dtype=self.param_dtype)
    width = levels[0].shape[-1]
    hidden = [nn.Conv(width, (3, 3), name=f"conv{i}", **kw) for i in range(self.convs)]
    last = nn.Conv(self.anchors * self.columns, (3, 3), bias_init=self.bias_init,
                   name=self.out_name, **kw)
    outputs = []
    for x in levels:
      for conv in hidden:
        x = nn.relu(conv(x))
      outputs.append(last(x))
    return concat_levels(outputs, self.columns)


def retinanet_anchor_sizes(base_sizes: Sequence[int], scales_per_octave: int) -> list[tuple]:
  """Anchor sizes per level: x * 2^(i / scales_per_octave), truncated as torchvision does."""
  return [tuple(int(x * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave))
          for x in base_sizes]


class RetinaNet(nn.Module):
  """RetinaNet on a frozen-BN ResNet-FPN.

  Attributes:
    num_classes: classes K of the sigmoid classifier (torchvision's COCO models: 91).
    layers: ResNet blocks per stage.
    block: 'basic' or 'bottleneck'.
    widths: ResNet stage widths.
    fpn_features: channels of the pyramid levels and the heads.
    extra: how P6/P7 are made: 'p6p7_p5' (torchvision v1) or 'p6p7_c5' (the paper, v2).
    head_convs: hidden convolutions of each head.
    anchor_sizes: base anchor size of each level P3 ... P7, in pixels.
    scales_per_octave: anchor sizes per level (x, x * 2^(1/3), x * 2^(2/3) for 3).
    aspect_ratios: anchor height / width ratios.
    prior_probability: initial foreground probability of every class logit.
    bn_epsilon: epsilon of the frozen BatchNorms (0 for torchvision's COCO v1 weights).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  # The detection task picks its loss and decoding by this name.
  family: ClassVar[str] = "retinanet"

  num_classes: int = 91
  layers: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  fpn_features: int = 256
  extra: str = "p6p7_p5"
  head_convs: int = 4
  anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512)
  scales_per_octave: int = 3
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  prior_probability: float = 0.01
  bn_epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_anchors(self) -> int:
    """Anchors per location A."""
    return self.scales_per_octave * len(self.aspect_ratios)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    if self.extra not in ("p6p7_p5", "p6p7_c5"):
      raise ValueError(f"RetinaNet extra={self.extra!r}; choose 'p6p7_p5' or 'p6p7_c5'")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = ResNetFPN(self.layers, self.block, self.widths, self.fpn_features, self.extra,
                       self.bn_epsilon, name="backbone", **kw)(x, train=train)
    a, convs = self.num_anchors, self.head_convs
    cls_head = RetinaNetHead(a, self.num_classes, convs, "cls_logits",
                             prior_bias(self.prior_probability), name="cls_head", **kw)
    reg_head = RetinaNetHead(a, 4, convs, "bbox_reg", name="reg_head", **kw)
    return {"cls_logits": cls_head(levels), "bbox_regression": reg_head(levels)}

  def level_shapes(self, image_hw: Sequence[int]) -> list[tuple[int, int]]:
    """(H, W) of the pyramid levels P3 ... P7 for an input of `image_hw`."""
    return list(feature_shapes(tuple(image_hw), resnet_fpn_strides(self.extra)))

  def anchors(self, image_hw: Sequence[int]) -> AnchorSet:
    """The anchors of the head outputs for an input of `image_hw`: [N, 4] float32 xyxy pixels
    (`.boxes`) in output order, with the anchors per level (`.level_sizes`)."""
    sizes = retinanet_anchor_sizes(self.anchor_sizes, self.scales_per_octave)
    shapes = self.level_shapes(image_hw)
    return grid_anchors(tuple(image_hw), shapes, sizes, (tuple(self.aspect_ratios),) * len(sizes))


_PAPER = "Lin et al. 2017, Focal loss for dense object detection"


@register_model(input_shape=(800, 800, 3), num_classes=91, paper=_PAPER)
def retinanet_resnet50_fpn(**kwargs) -> RetinaNet:
  """RetinaNet, ResNet-50-FPN (torchvision's v1 `retinanet_resnet50_fpn`: P6/P7 from P5)."""
  return RetinaNet(**kwargs)


@register_model(input_shape=(96, 96, 3), num_classes=4, paper=_PAPER)
def retinanet_tiny(**kwargs) -> RetinaNet:
  """Test variant: one basic block per stage (widths 8-64), 32-channel FPN, 2-conv heads, anchors
  of 16-256 px for 64-128 px inputs."""
  kwargs.setdefault("layers", (1, 1, 1, 1))
  kwargs.setdefault("block", "basic")
  kwargs.setdefault("widths", (8, 16, 32, 64))
  kwargs.setdefault("fpn_features", 32)
  kwargs.setdefault("head_convs", 2)
  kwargs.setdefault("anchor_sizes", (16, 32, 64, 128, 256))
  return RetinaNet(**kwargs)
