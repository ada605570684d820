"""Convolution building blocks: conv-norm-act, BatchNorm with PyTorch's defaults, and the pooling
operations whose PyTorch semantics the converted models need (ceil-mode max pooling, adaptive
average pooling).

Shared by the CNN families, U-Net and FCN. Everything is NHWC. Padding is explicit and symmetric,
as in PyTorch, because Flax's 'SAME' pads strided convolutions asymmetrically, which would break
the parity of converted weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Flax's momentum is the weight of the old running average; PyTorch's (0.1) is that of the new one.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He-normal over fan-out, the initialization torchvision gives the convolutions of these families.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def batch_norm(
    train: bool,
    *,
    epsilon: float = BN_EPSILON,
    scale_init: Callable = nn.initializers.ones,
    name: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> nn.BatchNorm:
  """A BatchNorm with PyTorch's defaults: batch statistics when `train`, running ones otherwise.

  The running variance is updated with the biased batch variance (PyTorch uses the unbiased one);
  this only changes training-time bookkeeping, not the inference of converted weights.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=epsilon,
      scale_init=scale_init,
      name=name,
      dtype=dtype,
      param_dtype=param_dtype,
  )


class ConvNormAct(nn.Module):
  """Convolution, then BatchNorm (optional), then an activation (optional).

  Submodules are named `conv` and `bn`, which is torchvision's `BasicConv2d` layout.

  Attributes:
    features: output channels.
    kernel_size: square size or (height, width).
    strides: square stride or (height, width).
    padding: symmetric zero padding per side (int or pair); None: kernel_size // 2 ("same" for
      odd kernels at stride 1).
    groups: feature groups of the convolution.
    use_bias: conv bias (redundant before BatchNorm, so off by default).
    norm: 'batch' or 'none'.
    act: activation, or None for a linear output.
    bn_epsilon: BatchNorm epsilon.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] | None = None
  groups: int = 1
  use_bias: bool = False
  norm: str = "batch"
  act: Callable | None = nn.relu
  bn_epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.norm not in ("batch", "none"):
      raise ValueError(f"ConvNormAct norm={self.norm!r}; choose 'batch' or 'none'")
    kernel = _pair(self.kernel_size)
    pad = _pair(self.padding) if self.padding is not None else (kernel[0] // 2, kernel[1] // 2)
    x = nn.Conv(
        self.features,
        kernel,
        strides=_pair(self.strides),
        padding=((pad[0], pad[0]), (pad[1], pad[1])),
        feature_group_count=self.groups,
        use_bias=self.use_bias,
        kernel_init=conv_kernel_init,
        name="conv",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(x)
    if self.norm == "batch":
      x = batch_norm(
          train, epsilon=self.bn_epsilon, name="bn", dtype=self.dtype, param_dtype=self.param_dtype
      )(x)
    return self.act(x) if self.act is not None else x


def pool_output_size(size: int, window: int, stride: int, padding: int, ceil_mode: bool) -> int:
  """PyTorch's pooling output length; in ceil mode the last window must start inside the input."""
  span = size + 2 * padding - window
  out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    ceil_mode: bool = False,
) -> jax.Array:
  """Max pooling with PyTorch's `MaxPool2d` semantics (implicit -inf padding, ceil mode).

  Raises ValueError when the input is too small to give at least one output.
  """
  window, padding = _pair(window), _pair(padding)
  stride = window if stride is None else _pair(stride)
  if window == stride and padding == (0, 0) and not ceil_mode:
    return _max_pool_tiles(x, window)
  pads = []
  for axis in (0, 1):
    size = x.shape[1 + axis]
    out = pool_output_size(size, window[axis], stride[axis], padding[axis], ceil_mode)
    if out < 1:
      raise ValueError(
          f"max_pool: input of {x.shape[1:3]} is too small for window {window} stride {stride}"
      )
    # Ceil mode: extra padding on the far side so the last, partial window exists.
    far = max((out - 1) * stride[axis] + window[axis] - size - padding[axis], 0)
    pads.append((padding[axis], far))
  # A Python -inf init lets JAX recognise the max monoid, which it knows how to differentiate.
  return jax.lax.reduce_window(
      x,
      -jnp.inf,
      jax.lax.max,
      (1, *window, 1),
      (1, *stride, 1),
      ((0, 0), *pads, (0, 0)),
  )


def _max_pool_tiles(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """Max over disjoint `window` tiles (stride = window, remainder rows/columns dropped).

  The same values as `reduce_window`, but as a reshape and a max: its gradient is an
  elementwise mask instead of XLA's select-and-scatter, about 5x faster on CPU (a tie among
  equal maxima shares the gradient instead of giving it to the first).
  """
  n, h, w, c = x.shape
  (wh, ww) = window
  out_h, out_w = h // wh, w // ww
  if out_h < 1 or out_w < 1:
    raise ValueError(f"max_pool: input of {x.shape[1:3]} is too small for window {window}")
  x = x[:, :out_h * wh, :out_w * ww, :]
  return x.reshape(n, out_h, wh, out_w, ww, c).max(axis=(2, 4))


class NonOverlappingConvTranspose(nn.Module):
  """Transposed convolution whose stride equals its kernel size (U-Net's 2x2 up-convolution).

  Each input pixel then writes its own k x k output tile, so the layer is one matrix product
  and a reshape. It computes what `nn.ConvTranspose(features, (k, k), strides=(k, k),
  padding=conv_transpose_padding(k, 0), transpose_kernel=True)` computes, with the same
  parameters (kernel `(k, k, features, in_features)`, bias `(features,)`) and initializers, but
  XLA lowers that one to a dilated convolution that is ~10x slower to train on CPU.

  Attributes:
    features: output channels.
    kernel_size: k, the kernel's height and width and the stride.
    use_bias: add a bias.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int = 2
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.linear.default_kernel_init, (k, k, self.features, c),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    # out[n, k*i + a, k*j + b, o] = sum_c x[n, i, j, c] * kernel[a, b, o, c]
    y = jnp.einsum("nhwc,aboc->nhawbo", x, kernel).reshape(n, k * h, k * w, self.features)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
  # Row i averages input positions [floor(i*size/out), ceil((i+1)*size/out)), as PyTorch does.
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
  """Average pooling to a fixed (H, W), with PyTorch's `AdaptiveAvgPool2d` bins (overlapping
  when the size does not divide)."""
  out_h, out_w = _pair(output_size)
  n, h, w, c = x.shape
  if (h, w) == (out_h, out_w):
    return x
  if h % out_h == 0 and w % out_w == 0:
    return x.reshape(n, out_h, h // out_h, out_w, w // out_w, c).mean(axis=(2, 4))
  mh = jnp.asarray(_adaptive_matrix(h, out_h), x.dtype)
  mw = jnp.asarray(_adaptive_matrix(w, out_w), x.dtype)
  return jnp.einsum("oh,nhwc,pw->nopc", mh, x, mw)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C): the mean over space."""
  return jnp.mean(x, axis=(1, 2))
