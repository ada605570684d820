"""LeNet-5 (LeCun et al., 1998) in its classic lecture form.

5x5 convolutions (padding 2 on the first, so 28x28 inputs work), sigmoid activations, 2x2
average pooling, dense 120-84-classes. `activation='relu', pool='max'` gives the modern variant.

Feature maps sown under 'intermediates': `stage1`, `stage2` (after each pool) and `feature_map`
(= `stage2`). Sown names differ from submodule names so `capture_intermediates=True` works too.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models.registry import register_model

_ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu, "tanh": jnp.tanh}
_POOLS = {"avg": nn.avg_pool, "max": nn.max_pool}


class LeNet(nn.Module):
  """LeNet-5.

  Attributes:
    num_classes: output classes; 0 returns the 84-d features.
    activation: 'sigmoid' (classic), 'relu' or 'tanh'.
    pool: 'avg' (classic) or 'max'.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 10
  activation: str = "sigmoid"
  pool: str = "avg"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train  # no dropout or batch norm
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"LeNet activation={self.activation!r}; choose from {sorted(_ACTIVATIONS)}")
    if self.pool not in _POOLS:
      raise ValueError(f"LeNet pool={self.pool!r}; choose from {sorted(_POOLS)}")
    act, pool = _ACTIVATIONS[self.activation], _POOLS[self.pool]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    x = act(nn.Conv(6, (5, 5), padding=2, name="conv1", **kw)(x))
    x = pool(x, (2, 2), strides=(2, 2))
    self.sow("intermediates", "stage1", x)
    x = act(nn.Conv(16, (5, 5), padding="VALID", name="conv2", **kw)(x))
    x = pool(x, (2, 2), strides=(2, 2))
    self.sow("intermediates", "stage2", x)
    self.sow("intermediates", "feature_map", x)
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(120, name="fc1", **kw)(x))
    x = act(nn.Dense(84, name="fc2", **kw)(x))
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, name="head", **kw)(x)


@register_model(
    input_shape=(28, 28, 1), num_classes=10, paper="LeCun et al. 1998, Gradient-based learning"
)
def lenet(**kwargs) -> LeNet:
  """LeNet-5, classic sigmoid + average-pool version."""
  return LeNet(**kwargs)
