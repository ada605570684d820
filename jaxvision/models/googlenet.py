"""GoogLeNet / Inception v1 (Szegedy et al., 2015) as torchvision builds it, so its weights convert.

torchvision's differences from the paper, kept here on purpose: every convolution is
conv (no bias) + BatchNorm (eps 0.001) + ReLU (its `BasicConv2d`), there is no local response
normalization, and the "5x5" branch of each inception module is in fact a 3x3 convolution.
Max-pools use ceil mode. Parameter names follow torchvision (`conv1/conv`, `conv1/bn`,
`inception3a/branch2_1/conv`, `aux1/fc1`, ...), with the classifier named `head` (its `fc`).

Auxiliary heads (`aux_logits=True`; off by default) sit after inception4a and inception4d. They
run in train mode only, and `__call__` still returns just the main logits: the auxiliary logits
are sown under the 'aux' collection as `aux1_logits` and `aux2_logits`. To train with them,
apply with `mutable=['batch_stats', 'aux']` and add their losses (the paper weights each by
0.3); a trainer that does not ask for 'aux' trains the main head alone (the aux heads then get
no gradient). `transform_input=True` maps ImageNet-normalized inputs to the [-1, 1] scaling
torchvision's pretrained weights expect.

Feature maps sown under 'intermediates': `stem` (after the second max-pool), `stage3`,
`stage4`, `stage5` (the outputs of inception3b, 4e and 5b), and `feature_map` (= `stage5`, the last
spatial map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.conv import ConvNormAct, adaptive_avg_pool, global_avg_pool, max_pool
from jaxvision.models.registry import register_model

BN_EPSILON = 1e-3
AUX_POOL_SIZE = 4
# Inception modules in order: (name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj), the
# paper's table 1; 'pool' marks the ceil-mode max-pools between stages.
INCEPTIONS = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    "pool",
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    "pool",
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)
AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}
# torchvision's `transform_input`: x * std / 0.5 + (mean - 0.5) / 0.5 with ImageNet's mean/std.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class Inception(nn.Module):
  """Four parallel branches concatenated: 1x1; 1x1-3x3; 1x1-3x3; 3x3 max-pool-1x1.

  Attributes:
    widths: (1x1, 3x3 reduce, 3x3, second reduce, second 3x3, pool projection) channels.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  widths: tuple[int, int, int, int, int, int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    c1, r3, c3, r5, c5, proj = self.widths

    def conv(features, kernel, name):
      return ConvNormAct(features, kernel, bn_epsilon=BN_EPSILON, name=name, dtype=self.dtype,
                         param_dtype=self.param_dtype)

    b1 = conv(c1, 1, "branch1")(x, train=train)
    b2 = conv(c3, 3, "branch2_1")(conv(r3, 1, "branch2_0")(x, train=train), train=train)
    # torchvision's "5x5" branch is a 3x3 convolution; kept so its weights convert.
    b3 = conv(c5, 3, "branch3_1")(conv(r5, 1, "branch3_0")(x, train=train), train=train)
    b4 = conv(proj, 1, "branch4_1")(max_pool(x, 3, 1, 1, ceil_mode=True), train=train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
  """Auxiliary classifier: 4x4 average pool, 1x1 conv, dense + ReLU, dropout 0.7, dense.

  Attributes:
    num_classes: output classes.
    width_divisor: divides the 128 conv and 1024 dense widths (test variants).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int
  width_divisor: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = adaptive_avg_pool(x, AUX_POOL_SIZE)
    x = ConvNormAct(128 // self.width_divisor, 1, bn_epsilon=BN_EPSILON, name="conv", **kw)(
        x, train=train)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(1024 // self.width_divisor, name="fc1", **kw)(x))
    x = nn.Dropout(0.7, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc2", **kw)(x)


class GoogLeNet(nn.Module):
  """GoogLeNet (Inception v1).

  Attributes:
    num_classes: output classes; 0 returns the pooled 1024-d features.
    aux_logits: build the two auxiliary heads (sown under 'aux' in train mode).
    transform_input: rescale ImageNet-normalized input as torchvision's pretrained weights expect.
    dropout_rate: dropout before the head.
    inceptions: the inception modules and pools in order (test variants use fewer).
    width_divisor: divides every channel count (test variants).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  aux_logits: bool = False
  transform_input: bool = False
  dropout_rate: float = 0.2
  inceptions: Sequence[Any] = INCEPTIONS
  width_divisor: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.aux_logits and not self.num_classes:
      raise ValueError("GoogLeNet aux_logits=True needs num_classes > 0")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.width_divisor
    x = x.astype(self.dtype)
    if self.transform_input:
      std, mean = jnp.asarray(_IMAGENET_STD), jnp.asarray(_IMAGENET_MEAN)
      x = (x * (std / 0.5) + (mean - 0.5) / 0.5).astype(self.dtype)

    def conv(features, kernel, strides, name):
      return ConvNormAct(features // d, kernel, strides, bn_epsilon=BN_EPSILON, name=name, **kw)

    x = max_pool(conv(64, 7, 2, "conv1")(x, train=train), 3, 2, ceil_mode=True)
    x = conv(64, 1, 1, "conv2")(x, train=train)
    x = max_pool(conv(192, 3, 1, "conv3")(x, train=train), 3, 2, ceil_mode=True)
    self.sow("intermediates", "stem", x)
    # Aux params are created at init even in eval mode, so a model initialised with
    # train=False can later train with them.
    run_aux = self.aux_logits and (train or self.is_initializing())
    stage = 3
    for spec in self.inceptions:
      if spec == "pool":
        self.sow("intermediates", f"stage{stage}", x)
        stage += 1
        # Into stage 4 a 3x3/2 pool, into stage 5 a 2x2/2 one.
        x = max_pool(x, 3 if stage < 5 else 2, 2, ceil_mode=True)
        continue
      name, *widths = spec
      x = Inception(tuple(w // d for w in widths), name=name, **kw)(x, train=train)
      if run_aux and name in AUX_AFTER:
        aux = InceptionAux(self.num_classes, d, name=AUX_AFTER[name], **kw)(x, train=train)
        if not self.is_initializing():  # init would otherwise return them among the variables
          self.sow("aux", f"{AUX_AFTER[name]}_logits", aux)
    self.sow("intermediates", f"stage{stage}", x)
    self.sow("intermediates", "feature_map", x)
    x = global_avg_pool(x)
    if not self.num_classes:
      return x
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head", **kw)(x)


_PAPER = "Szegedy et al. 2015, Going deeper with convolutions"
_TINY = ("inception3a", "inception4a", "inception4d", "inception5b")


@register_model(paper=_PAPER)
def googlenet(**kwargs) -> GoogLeNet:
  """GoogLeNet as in torchvision; aux heads off (6.6M parameters at 1000 classes)."""
  return GoogLeNet(**kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=10, paper=_PAPER)
def googlenet_tiny(**kwargs) -> GoogLeNet:
  """Test variant: widths divided by 8, four inception modules (3a, 4a, 4d, 5b), same aux sites."""
  kwargs.setdefault("width_divisor", 8)
  kwargs.setdefault("inceptions", tuple(s for s in INCEPTIONS if s == "pool" or s[0] in _TINY))
  return GoogLeNet(**kwargs)
