"""AlexNet (Krizhevsky et al., 2012) in torchvision's single-tower form (64-192-384-256-256).

Before the classifier an adaptive average pool brings the map to 6x6, as torchvision does, so
224 px matches torchvision exactly and any input of at least 63 px runs. Parameter names:
`conv1` ... `conv5`, `fc1`, `fc2`, `head`. `fc1` reads the 6x6 map flattened in (H, W, C) order;
the converter permutes it from torchvision's (C, H, W).

Feature maps sown under 'intermediates': `act1` ... `act5` (each convolution after its ReLU)
and `feature_map` (= `act5`, the last spatial map, for Grad-CAM). Sown names never equal submodule
names, so `capture_intermediates=True` works alongside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import adaptive_avg_pool, conv_kernel_init, max_pool
from jaxvision.models.registry import register_model

# (kernel, stride, padding, max-pool after) of the five convolutions; their widths are `widths`.
_CONVS = ((11, 4, 2, True), (5, 1, 2, True), (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, True))
POOL_SIZE = 6


class AlexNet(nn.Module):
  """AlexNet.

  Attributes:
    num_classes: output classes; 0 returns the `fc2` features (what the head reads).
    widths: channels of the five convolutions.
    hidden: width of the two hidden dense layers.
    dropout_rate: dropout before `fc1` and `fc2` (train mode needs a 'dropout' rng).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  widths: Sequence[int] = (64, 192, 384, 256, 256)
  hidden: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    for i, (features, (k, s, p, pool)) in enumerate(zip(self.widths, _CONVS, strict=True)):
      x = nn.Conv(features, (k, k), (s, s), p, kernel_init=conv_kernel_init, name=f"conv{i + 1}",
                  **kw)(x)
      x = nn.relu(x)
      self.sow("intermediates", f"act{i + 1}", x)
      if i == len(_CONVS) - 1:
        self.sow("intermediates", "feature_map", x)
      if pool:
        x = max_pool(x, 3, 2)
    x = adaptive_avg_pool(x, POOL_SIZE).reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.hidden, name="fc1", **kw)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.hidden, name="fc2", **kw)(x))
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, name="head", **kw)(x)


_PAPER = "Krizhevsky et al. 2012, ImageNet classification with deep CNNs"


@register_model(paper=_PAPER)
def alexnet(**kwargs) -> AlexNet:
  """AlexNet as in torchvision (61.1M parameters at 1000 classes)."""
  return AlexNet(**kwargs)


@register_model(input_shape=(64, 64, 3), num_classes=10, paper=_PAPER)
def alexnet_tiny(**kwargs) -> AlexNet:
  """Test variant: convolutions 8-32 wide, hidden 64."""
  kwargs.setdefault("widths", (8, 16, 32, 16, 16))
  kwargs.setdefault("hidden", 64)
  return AlexNet(**kwargs)
