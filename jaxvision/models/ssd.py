"""SSD (Liu et al., 2016, SSD: single shot multibox detector) on VGG-16, in torchvision's layout
(`ssd300_vgg16`).

The backbone (`backbone`) is VGG-16's convolutions `conv1` ... `conv13` (VGG's numbering, so
ImageNet VGG-16 weights fit) with the paper's changes: pool3 in ceil mode (38x38 maps at 300 px),
the L2-normalised conv4_3 map rescaled by a learned per-channel scale (`l2_scale`, init 20),
pool5 as 3x3/1 pad 1, `fc6` a 3x3 conv dilated 6, `fc7` a 1x1 conv, then the extra layers
(`extra{j}_1` 1x1 reduce, `extra{j}_2` 3x3). Each of the six maps gets its own 3x3 class and box
convolutions (`cls_head/conv{i}`, `reg_head/conv{i}`) for its 4 or 6 default boxes per location.

The model returns {'cls_logits': [B, N, K], 'bbox_regression': [B, N, 4]} over all default
boxes in torchvision's order (level, row, column, box); `anchors(image_hw)` gives the [N, 4]
default boxes (xyxy pixels). K = `num_classes` counts the background class 0 (softmax over
K; torchvision's COCO models: 91).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.detection.anchors import AnchorSet, ssd_default_boxes
from jaxvision.layers.conv import conv_kernel_init, max_pool, pool_output_size
from jaxvision.models.detection_backbone import concat_levels
from jaxvision.models.registry import register_model

# torchvision's initialisation of the layers SSD adds to VGG (fc6, fc7, the extras, the heads).
xavier_init = nn.initializers.xavier_uniform()
# (1x1 reduce width, output width, kernel, stride, padding) of SSD300's extra layers.
SSD300_EXTRAS = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))


def _conv_size(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


def ssd_level_shapes(image_hw: Sequence[int], extras: Sequence[Sequence[int]]
                     ) -> list[tuple[int, int]]:
  """(H, W) of the maps `SSDBackbone` returns (conv4_3, fc7, the extras) for `image_hw`."""
  shapes = []
  for size in (int(s) for s in image_hw):
    sizes = []
    for stage in (1, 2, 3):
      size = pool_output_size(size, 2, 2, 0, ceil_mode=stage == 3)
    sizes.append(size)  # conv4_3
    size = size // 2  # pool4; pool5, fc6 and fc7 keep the size
    sizes.append(size)
    for _, _, kernel, stride, padding in extras:
      size = _conv_size(size, kernel, stride, padding)
      sizes.append(size)
    shapes.append(sizes)
  if min(min(s) for s in shapes) < 1:
    raise ValueError(f"SSD: an input of {tuple(image_hw)} is too small for its extra layers")
  return list(zip(*shapes, strict=True))


class SSDBackbone(nn.Module):
  """VGG with SSD's changes: returns the L2-normalised conv4_3 map, fc7 and the extra maps.

  Attributes:
    depths: 3x3 convolutions of the five VGG stages.
    widths: channels of the five VGG stages.
    fc_width: channels of fc6 and fc7.
    extras: (reduce width, width, kernel, stride, padding) of each extra layer pair.
    l2_scale_init: initial value of the learned conv4_3 scale.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  depths: Sequence[int] = (2, 2, 3, 3, 3)
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  fc_width: int = 1024
  extras: Sequence[Sequence[int]] = SSD300_EXTRAS
  l2_scale_init: float = 20.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def conv(features, kernel, name, stride=1, padding=None, dilation=1, init=xavier_init):
      pad = kernel // 2 if padding is None else padding
      return nn.Conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                     kernel_dilation=(dilation, dilation), kernel_init=init, name=name, **kw)

    x, n, outputs = x.astype(self.dtype), 0, []
    for stage, (width, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
      if stage:  # pools 1-4; pool3 rounds up (the paper's 38x38 map at 300 px)
        x = max_pool(x, 2, 2, ceil_mode=stage == 3)
      for _ in range(depth):
        n += 1
        x = nn.relu(conv(width, 3, f"conv{n}", init=conv_kernel_init)(x))
      if stage == 3:  # conv4_3: L2-normalised over channels, then rescaled
        scale = self.param("l2_scale", nn.initializers.constant(self.l2_scale_init), (width,),
                           self.param_dtype)
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True))
        normed = (x / jnp.maximum(norm, 1e-12).astype(self.dtype))
        outputs.append(normed * scale.astype(self.dtype))
    x = max_pool(x, 3, 1, 1)  # pool5
    x = nn.relu(conv(self.fc_width, 3, "fc6", padding=6, dilation=6)(x))
    x = nn.relu(conv(self.fc_width, 1, "fc7")(x))
    outputs.append(x)
    for j, (mid, width, kernel, stride, padding) in enumerate(self.extras, 1):
      x = nn.relu(conv(mid, 1, f"extra{j}_1")(x))
      x = nn.relu(conv(width, kernel, f"extra{j}_2", stride, padding)(x))
      outputs.append(x)
    return outputs


class SSDHead(nn.Module):
  """One 3x3 convolution per level to `anchors[i] * columns` outputs.

  Attributes:
    anchors: default boxes per location of each level.
    columns: outputs per box (classes K, or 4 box deltas).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  anchors: Sequence[int]
  columns: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> jax.Array:
    if len(levels) != len(self.anchors):
      raise ValueError(f"SSD head: {len(levels)} feature maps for {len(self.anchors)} levels")
    maps = [nn.Conv(a * self.columns, (3, 3), padding=((1, 1), (1, 1)), kernel_init=xavier_init,
                    name=f"conv{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
            for i, (x, a) in enumerate(zip(levels, self.anchors, strict=True))]
    return concat_levels(maps, self.columns)


class SSD(nn.Module):
  """SSD: the VGG backbone, per-level heads, and the default boxes they are relative to.

  Attributes:
    num_classes: classes K of the softmax, background (0) included (torchvision's COCO: 91).
    depths: 3x3 convolutions of the five VGG stages.
    widths: channels of the five VGG stages.
    fc_width: channels of fc6 and fc7.
    extras: (reduce width, width, kernel, stride, padding) of each extra layer pair.
    aspect_ratios: per level, the ratios r > 1 whose boxes (r and 1/r) join the two square ones.
    scales: box scale of each level as a fraction of the image (one more than the levels: the
      second square box of level k has scale sqrt(s_k * s_k+1)).
    steps: per level, the pixel step between box centres (None: image size / map size).
    clip: clip box widths and heights to the image (torchvision's default).
    l2_scale_init: initial value of the learned conv4_3 scale.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  # The detection task picks its loss and decoding by this name.
  family: ClassVar[str] = "ssd"

  num_classes: int = 91
  depths: Sequence[int] = (2, 2, 3, 3, 3)
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  fc_width: int = 1024
  extras: Sequence[Sequence[int]] = SSD300_EXTRAS
  aspect_ratios: Sequence[Sequence[float]] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
  scales: Sequence[float] = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
  steps: Sequence[float] | None = (8, 16, 32, 64, 100, 300)
  clip: bool = True
  l2_scale_init: float = 20.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_anchors(self) -> tuple[int, ...]:
    """Default boxes per location of each level: 2 squares + 2 per aspect ratio."""
    return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    del train  # no dropout or BatchNorm
    levels = 2 + len(self.extras)
    if len(self.aspect_ratios) != levels or len(self.scales) != levels + 1:
      raise ValueError(f"SSD: {levels} feature maps need {levels} aspect_ratios and "
                       f"{levels + 1} scales, got {len(self.aspect_ratios)} and {len(self.scales)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    maps = SSDBackbone(self.depths, self.widths, self.fc_width, self.extras, self.l2_scale_init,
                       name="backbone", **kw)(x)
    return {
        "cls_logits": SSDHead(self.num_anchors, self.num_classes, name="cls_head", **kw)(maps),
        "bbox_regression": SSDHead(self.num_anchors, 4, name="reg_head", **kw)(maps),
    }

  def level_shapes(self, image_hw: Sequence[int]) -> list[tuple[int, int]]:
    """(H, W) of the six (or len(extras) + 2) feature maps for an input of `image_hw`."""
    return ssd_level_shapes(image_hw, self.extras)

  def anchors(self, image_hw: Sequence[int]) -> AnchorSet:
    """The default boxes of the head outputs for an input of `image_hw`: [N, 4] float32 xyxy
    pixels (`.boxes`) in output order, with `.level_sizes`."""
    return ssd_default_boxes(tuple(image_hw), self.level_shapes(image_hw), self.aspect_ratios,
                             self.scales, self.steps, clip=self.clip)


_PAPER = "Liu et al. 2016, SSD: single shot multibox detector"


@register_model(input_shape=(300, 300, 3), num_classes=91, paper=_PAPER)
def ssd300_vgg16(**kwargs) -> SSD:
  """SSD300 on VGG-16 (torchvision's `ssd300_vgg16`)."""
  return SSD(**kwargs)


@register_model(input_shape=(96, 96, 3), num_classes=4, paper=_PAPER)
def ssd_tiny(**kwargs) -> SSD:
  """Test variant: one conv per VGG stage (widths 8-32), fc 32, two stride-2 extra layers, four
  levels (12, 6, 3, 2 at 96 px) with steps from the map sizes."""
  kwargs.setdefault("depths", (1, 1, 1, 1, 1))
  kwargs.setdefault("widths", (8, 16, 32, 32, 32))
  kwargs.setdefault("fc_width", 32)
  kwargs.setdefault("extras", ((16, 32, 3, 2, 1), (16, 32, 3, 2, 1)))
  kwargs.setdefault("aspect_ratios", ((2,), (2, 3), (2,), (2,)))
  kwargs.setdefault("scales", (0.15, 0.3, 0.5, 0.7, 0.9))
  kwargs.setdefault("steps", None)
  return SSD(**kwargs)
