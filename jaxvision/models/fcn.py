"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015) on a ResNet backbone.

The backbone is `jaxvision.models.resnet.ResNet` (torchvision layout, under `backbone/`, so
ImageNet weights load into it). Class scores are read from its last stage (stride 32) with a
1x1 convolution and brought back to the input size with transposed convolutions initialised to
bilinear interpolation:
  * FCN-32s: scores of layer4, upsampled x32;
  * FCN-16s: x2, plus the scores of layer3 (stride 16), then x16;
  * FCN-8s:  x2, plus layer3's scores, x2, plus layer2's scores (stride 8), then x8.
As in the paper, the skip scorers start at zero, so a finer net starts out as the coarser one.
Any input size works: upsampled maps are cropped to the finer map (the extra rows and columns
from the backbone's rounded-up strides are at the bottom/right).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.layers.conv import batch_norm, conv_kernel_init
from jaxvision.models.registry import register_model
from jaxvision.models.resnet import ResNet
from jaxvision.models.unet import conv_transpose_padding

STRIDES = (32, 16, 8)
_BLOCK_NAME = re.compile(r"^layer([1-4])_\d+$")
_BACKBONES = {  # name -> (layers, block, widths)
    "resnet18": ((2, 2, 2, 2), "basic", (64, 128, 256, 512)),
    "resnet34": ((3, 4, 6, 3), "basic", (64, 128, 256, 512)),
    "resnet50": ((3, 4, 6, 3), "bottleneck", (64, 128, 256, 512)),
    "resnet101": ((3, 4, 23, 3), "bottleneck", (64, 128, 256, 512)),
    "resnet_tiny": ((1, 1, 1, 1), "basic", (8, 16, 32, 64)),
}


def bilinear_kernel(factor: int, channels: int) -> np.ndarray:
  """[2f, 2f, C, C] transposed-convolution kernel that upsamples each channel bilinearly by f."""
  size = 2 * factor
  center = factor - 0.5  # even kernel: the centre falls between two taps
  taps = 1.0 - np.abs(np.arange(size) - center) / factor
  kernel = np.zeros((size, size, channels, channels), np.float32)
  kernel[:, :, np.arange(channels), np.arange(channels)] = np.outer(taps, taps)[..., None]
  return kernel


class BilinearUpsample(nn.Module):
  """x`factor` transposed convolution initialised to (or fixed at) bilinear interpolation.

  Attributes:
    factor: upsampling factor f (kernel 2f, stride f, padding f/2: output = f * input).
    learnable: a learned [2f, 2f, C, C] kernel starting at bilinear; False: fixed bilinear,
      applied channel by channel, with no parameter (the paper's final upsampling).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  factor: int
  learnable: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    f, c = self.factor, x.shape[-1]
    padding = conv_transpose_padding(2 * f, f // 2)
    if self.learnable:
      init = lambda key, shape, dtype: jnp.asarray(bilinear_kernel(f, c), dtype)
      return nn.ConvTranspose(
          c, (2 * f, 2 * f), strides=(f, f), padding=padding, transpose_kernel=True,
          use_bias=False, kernel_init=init, name="conv", dtype=self.dtype,
          param_dtype=self.param_dtype,
      )(x)
    # Fixed: every channel through the same one-channel kernel (channels folded into the batch).
    b, h, w, _ = x.shape
    y = x.astype(self.dtype).transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)
    y = jax.lax.conv_transpose(y, jnp.asarray(bilinear_kernel(f, 1), self.dtype), (f, f), padding,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
    return y.reshape(b, c, f * h, f * w).transpose(0, 2, 3, 1)


class FCN(nn.Module):
  """FCN-32s / 16s / 8s on a ResNet.

  Attributes:
    num_classes: classes scored per pixel.
    backbone: 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101' | 'resnet_tiny'.
    stride: 32, 16 or 8: the finest backbone stage whose scores are fused (FCN-32s/16s/8s).
    head_width: > 0: a 3x3 conv-BN-ReLU of this width on layer4 before its scores (0: none).
    learn_final_upsample: learn the last (x stride) upsampling too; the paper fixes it to
      bilinear (and learns the x2 ones, initialised to bilinear).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 21
  backbone: str = "resnet18"
  stride: int = 8
  head_width: int = 0
  learn_final_upsample: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.backbone not in _BACKBONES:
      raise ValueError(f"FCN backbone={self.backbone!r}; choose from {sorted(_BACKBONES)}")
    if self.stride not in STRIDES:
      raise ValueError(f"FCN stride={self.stride}; choose from {STRIDES}")
    if self.num_classes < 1:
      raise ValueError(f"FCN num_classes={self.num_classes} must be >= 1")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    height, width = x.shape[1:3]
    layers, block, widths = _BACKBONES[self.backbone]
    stages = _run_backbone(ResNet(layers, block, num_classes=0, widths=widths, name="backbone",
                                  **kw), x, train)

    top = stages[4]
    if self.head_width:
      top = nn.Conv(self.head_width, (3, 3), padding=1, use_bias=False,
                    kernel_init=conv_kernel_init, name="head_conv", **kw)(top)
      top = nn.relu(batch_norm(train, name="head_bn", **kw)(top))
    scores = nn.Conv(self.num_classes, (1, 1), name="score_layer4", **kw)(top)
    self.sow("intermediates", "scores32", scores)
    for stage, stride in ((3, 16), (2, 8)):
      if self.stride > stride:
        break
      skip = stages[stage]
      up = BilinearUpsample(2, name=f"upsample_to_layer{stage}", **kw)(scores)
      # Zero-initialised, as in the paper: the finer net starts as the coarser one.
      skip_scores = nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros,
                            name=f"score_layer{stage}", **kw)(skip)
      scores = up[:, :skip.shape[1], :skip.shape[2]] + skip_scores
      self.sow("intermediates", f"scores{stride}", scores)
    out = BilinearUpsample(self.stride, self.learn_final_upsample, name="upsample_out",
                           **kw)(scores)
    return out[:, :height, :width]


def _run_backbone(backbone: ResNet, x: jax.Array, train: bool) -> dict[int, jax.Array]:
  """Runs the ResNet and returns each stage's output {1..4: [B, h, w, C]}.

  The output of a stage is the output of its last block, caught by intercepting the blocks'
  calls (block names `layer{stage}_{i}` are the ResNet's public parameter layout).
  """
  stages: dict[int, jax.Array] = {}

  def catch(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    match = _BLOCK_NAME.match(context.module.name or "")
    if context.method_name == "__call__" and match and context.module.parent is not None \
        and context.module.parent.name == backbone.name:
      stages[int(match.group(1))] = y
    return y

  with nn.intercept_methods(catch):
    backbone(x, train=train)
  if sorted(stages) != [1, 2, 3, 4]:
    raise ValueError(f"FCN could not read the backbone's stages (found {sorted(stages)})")
  return stages


_PAPER = "Long et al. 2015, Fully convolutional networks for semantic segmentation"


def _fcn(stride: int, backbone: str, kwargs: dict) -> FCN:
  return FCN(**{"stride": stride, "backbone": backbone, **kwargs})


@register_model(input_shape=(224, 224, 3), num_classes=21, paper=_PAPER)
def fcn32s_resnet18(**kwargs) -> FCN:
  """FCN-32s on ResNet-18."""
  return _fcn(32, "resnet18", kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=21, paper=_PAPER)
def fcn16s_resnet18(**kwargs) -> FCN:
  """FCN-16s on ResNet-18."""
  return _fcn(16, "resnet18", kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=21, paper=_PAPER)
def fcn8s_resnet18(**kwargs) -> FCN:
  """FCN-8s on ResNet-18."""
  return _fcn(8, "resnet18", kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=21, paper=_PAPER)
def fcn32s_resnet50(**kwargs) -> FCN:
  """FCN-32s on ResNet-50."""
  return _fcn(32, "resnet50", kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=21, paper=_PAPER)
def fcn8s_resnet50(**kwargs) -> FCN:
  """FCN-8s on ResNet-50."""
  return _fcn(8, "resnet50", kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=21, paper=_PAPER)
def fcn8s_resnet101(**kwargs) -> FCN:
  """FCN-8s on ResNet-101."""
  return _fcn(8, "resnet101", kwargs)


@register_model(input_shape=(64, 64, 3), num_classes=3, paper=_PAPER)
def fcn8s_tiny(**kwargs) -> FCN:
  """Test variant: FCN-8s on the 8..64-channel one-block-per-stage ResNet."""
  return _fcn(8, "resnet_tiny", kwargs)
