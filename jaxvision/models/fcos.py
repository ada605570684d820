"""FCOS (Tian et al., 2019, Fully convolutional one-stage object detection) in torchvision's
layout (`fcos_resnet50_fpn`).

A frozen-BN ResNet-50 with an FPN on C3-C5 and P6/P7 from P5 (`backbone`), and two heads shared
by all levels, each 4 x [3x3 conv, GroupNorm(32), ReLU]: `cls_head` ends in a 3x3 conv to K
class logits (bias at the focal-loss prior), `reg_head` in two 3x3 convs, `bbox_reg` (relu'd
left/top/right/bottom distances in units of the level's anchor size) and `bbox_ctrness` (the
centerness logit).

The model returns {'cls_logits': [B, N, K], 'bbox_regression': [B, N, 4],
'bbox_ctrness': [B, N, 1]} over every location of every level, in torchvision's order (level,
row, column); `anchors(image_hw)` gives the [N, 4] anchor boxes (one per location, the size of
the level's stride, centred on the location) that `bbox_regression` is relative to. As in
torchvision, the location of column x, row y is (x * stride, y * stride), not the paper's
centre of the cell (which adds stride / 2): converted weights expect it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.detection.anchors import AnchorSet, feature_shapes, grid_anchors
from jaxvision.layers.conv import BN_EPSILON
from jaxvision.models.detection_backbone import ResNetFPN, concat_levels, resnet_fpn_strides
from jaxvision.models.registry import register_model
from jaxvision.models.retinanet import head_kernel_init, prior_bias


class FCOSBranch(nn.Module):
  """One FCOS head: `convs` x [3x3 conv (`conv{i}`), GroupNorm (`norm{i}`), ReLU], then one
  3x3 output convolution per entry of `outputs`; the weights are shared by all levels.

  Attributes:
    outputs: (name, columns, prior) of each output convolution; prior > 0 starts its bias at
      that sigmoid probability (the classifier), else at zero.
    convs: conv-norm-ReLU layers.
    groups: GroupNorm groups.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  outputs: Sequence[tuple[str, int, float]]
  convs: int = 4
  groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> list[list[jax.Array]]:
    width = levels[0].shape[-1]
    if width % self.groups:
      raise ValueError(f"FCOS head: {width} channels do not split into {self.groups} groups")
    kw = dict(padding=((1, 1), (1, 1)), kernel_init=head_kernel_init, dtype=self.dtype,
              param_dtype=self.param_dtype)
    tower = []
    for i in range(self.convs):
      tower.append(nn.Conv(width, (3, 3), name=f"conv{i}", **kw))
      # Two-pass variance, as PyTorch's GroupNorm computes it.
      tower.append(nn.GroupNorm(self.groups, epsilon=1e-5, use_fast_variance=False,
                                name=f"norm{i}", dtype=self.dtype, param_dtype=self.param_dtype))
    heads = [nn.Conv(columns, (3, 3), name=name,
                     bias_init=prior_bias(prior) if prior > 0 else nn.initializers.zeros, **kw)
             for name, columns, prior in self.outputs]
    results = [[] for _ in heads]
    for x in levels:
      for conv, norm in zip(tower[::2], tower[1::2], strict=True):
        x = nn.relu(norm(conv(x)))
      for out, head in zip(results, heads, strict=True):
        out.append(head(x))
    return results


class FCOS(nn.Module):
  """FCOS on a frozen-BN ResNet-FPN.

  Attributes:
    num_classes: classes K of the sigmoid classifier (torchvision's COCO models: 91).
    layers: ResNet blocks per stage.
    block: 'basic' or 'bottleneck'.
    widths: ResNet stage widths.
    fpn_features: channels of the pyramid levels and the heads.
    extra: how P6/P7 are made: 'p6p7_p5' (torchvision) or 'p6p7_c5'.
    head_convs: conv-norm-ReLU layers of each head tower.
    head_groups: GroupNorm groups of the heads.
    anchor_sizes: anchor (= location) size of each level P3 ... P7 (P2 ... P7 for
      `min_level=2`), in pixels; also the unit of the box distances, and x4 / x8 of it bound the
      object sizes each level learns.
    prior_probability: initial foreground probability of every class logit.
    bn_epsilon: epsilon of the frozen BatchNorms.
    min_level: the finest pyramid level, 3 (torchvision) or 2 (`ResNetFPN.min_level`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  # The detection task picks its loss and decoding by this name.
  family: ClassVar[str] = "fcos"

  num_classes: int = 91
  layers: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  fpn_features: int = 256
  extra: str = "p6p7_p5"
  head_convs: int = 4
  head_groups: int = 32
  anchor_sizes: Sequence[int] = (8, 16, 32, 64, 128)
  prior_probability: float = 0.01
  bn_epsilon: float = BN_EPSILON
  min_level: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  num_anchors: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    if self.extra not in ("p6p7_p5", "p6p7_c5"):
      raise ValueError(f"FCOS extra={self.extra!r}; choose 'p6p7_p5' or 'p6p7_c5'")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = ResNetFPN(self.layers, self.block, self.widths, self.fpn_features, self.extra,
                       self.bn_epsilon, self.min_level, name="backbone", **kw)(x, train=train)
    head = dict(convs=self.head_convs, groups=self.head_groups, **kw)
    (cls,) = FCOSBranch([("cls_logits", self.num_classes, self.prior_probability)],
                        name="cls_head", **head)(levels)
    box, ctr = FCOSBranch([("bbox_reg", 4, 0.0), ("bbox_ctrness", 1, 0.0)], name="reg_head",
                          **head)(levels)
    return {"cls_logits": concat_levels(cls, self.num_classes),
            "bbox_regression": nn.relu(concat_levels(box, 4)),
            "bbox_ctrness": concat_levels(ctr, 1)}

  def level_shapes(self, image_hw: Sequence[int]) -> list[tuple[int, int]]:
    """(H, W) of the pyramid levels (P3 or P2 ... P7) for an input of `image_hw`."""
    return list(feature_shapes(tuple(image_hw), resnet_fpn_strides(self.extra, self.min_level)))

  def anchors(self, image_hw: Sequence[int]) -> AnchorSet:
    """The anchor boxes of the head outputs for an input of `image_hw`, one per location:
    [N, 4] float32 xyxy pixels (`.boxes`) in output order, with `.level_sizes`."""
    shapes = self.level_shapes(image_hw)
    if len(self.anchor_sizes) < len(shapes):
      raise ValueError(f"FCOS has {len(shapes)} pyramid levels but anchor_sizes="
                       f"{tuple(self.anchor_sizes)} names {len(self.anchor_sizes)}")
    sizes = [(s,) for s in self.anchor_sizes[:len(shapes)]]
    return grid_anchors(tuple(image_hw), shapes, sizes, ((1.0,),) * len(sizes))


_PAPER = "Tian et al. 2019, FCOS: fully convolutional one-stage object detection"


@register_model(input_shape=(800, 800, 3), num_classes=91, paper=_PAPER)
def fcos_resnet50_fpn(**kwargs) -> FCOS:
  """FCOS, ResNet-50-FPN (torchvision's `fcos_resnet50_fpn`)."""
  return FCOS(**kwargs)


@register_model(input_shape=(96, 96, 3), num_classes=4, paper=_PAPER)
def fcos_tiny(**kwargs) -> FCOS:
  """Test variant: one basic block per stage (widths 8-64), 32-channel FPN, 2-layer towers with
  GroupNorm(8)."""
  kwargs.setdefault("layers", (1, 1, 1, 1))
  kwargs.setdefault("block", "basic")
  kwargs.setdefault("widths", (8, 16, 32, 64))
  kwargs.setdefault("fpn_features", 32)
  kwargs.setdefault("head_convs", 2)
  kwargs.setdefault("head_groups", 8)
  return FCOS(**kwargs)
