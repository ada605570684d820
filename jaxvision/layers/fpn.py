"""Feature pyramid network (Lin et al., 2017) in torchvision's layout.

    levels = FPN(256, extra="p6p7_p5")([c3, c4, c5])   # [P3, P4, P5, P6, P7], 256 channels each

Each input level gets a 1x1 lateral convolution (`inner_{i}`); from the coarsest level down, the
running map is upsampled (nearest, PyTorch's rule) to the next level's size and added to its
lateral; every sum then goes through a 3x3 output convolution (`layer_{i}`). Optional extra
levels above the coarsest (torchvision's `extra_blocks`):

  * 'p6p7_c5': P6 = 3x3/2 conv of the last *input* (C5), P7 = 3x3/2 conv of relu(P6)
    (the RetinaNet paper; torchvision's `retinanet_resnet50_fpn_v2`, `LastLevelP6P7(2048, 256)`);
  * 'p6p7_p5': the same convolutions on the last *output* (P5) (torchvision's v1
    `retinanet_resnet50_fpn` and `fcos_resnet50_fpn`, `LastLevelP6P7(256, 256)`);
  * 'pool': a stride-2 subsample of the last output (`LastLevelMaxPool`, Faster R-CNN's P6).

NHWC; parameter names map one to one onto torchvision's `inner_blocks.{i}.0`,
`layer_blocks.{i}.0` and `extra_blocks.p6` / `.p7`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EXTRA_LEVELS = ("none", "p6p7_c5", "p6p7_p5", "pool")

# kaiming_uniform_(a=1), torchvision's initialisation of every FPN convolution.
fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source rows of PyTorch's `interpolate(mode='nearest')`: floor(i * in / out) in float32."""
  if size_out == size_in:
    return np.arange(size_out)
  if size_out == 2 * size_in:
    return np.arange(size_out) // 2
  scale = np.float32(size_in) / np.float32(size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, size_in - 1)


def upsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C] by nearest neighbour with PyTorch's source-index rule."""
  h, w = x.shape[1:3]
  out_h, out_w = int(size[0]), int(size[1])
  if (out_h, out_w) == (2 * h, 2 * w):
    # The common case as a broadcast, whose gradient is a plain reshape-sum.
    b, _, _, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, out_h, out_w, c)
  x = jnp.take(x, jnp.asarray(nearest_indices(h, out_h)), axis=1)
  return jnp.take(x, jnp.asarray(nearest_indices(w, out_w)), axis=2)


class FPN(nn.Module):
  """Lateral 1x1 convolutions, a nearest-upsampling top-down path and 3x3 output convolutions.

  Attributes:
    features: channels of every output level.
    extra: levels added above the coarsest: 'none', 'p6p7_c5', 'p6p7_p5' or 'pool' (see the
      module docstring).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int = 256
  extra: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv(self, kernel: int, strides: int, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(self.features, (kernel, kernel), (strides, strides), ((pad, pad), (pad, pad)),
                   kernel_init=fpn_kernel_init, name=name, dtype=self.dtype,
                   param_dtype=self.param_dtype)

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> list[jax.Array]:
    if self.extra not in EXTRA_LEVELS:
      raise ValueError(f"FPN extra={self.extra!r}; choose from {EXTRA_LEVELS}")
    if not inputs:
      raise ValueError("FPN needs at least one input level")
    inputs = [x.astype(self.dtype) for x in inputs]
    last = len(inputs) - 1
    inner = self._conv(1, 1, f"inner_{last}")(inputs[last])
    outputs = [self._conv(3, 1, f"layer_{last}")(inner)]
    for i in range(last - 1, -1, -1):
      lateral = self._conv(1, 1, f"inner_{i}")(inputs[i])
      inner = lateral + upsample_nearest(inner, lateral.shape[1:3])
      outputs.insert(0, self._conv(3, 1, f"layer_{i}")(inner))
    if self.extra in ("p6p7_c5", "p6p7_p5"):
      source = inputs[-1] if self.extra == "p6p7_c5" else outputs[-1]
      p6 = self._conv(3, 2, "p6")(source)
      outputs += [p6, self._conv(3, 2, "p7")(nn.relu(p6))]
    elif self.extra == "pool":
      outputs.append(outputs[-1][:, ::2, ::2])
    return outputs
