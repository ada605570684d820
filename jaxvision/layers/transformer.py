"""Transformer encoder pieces: MLP, stochastic depth, layer-scale, the pre-norm encoder block and
the attention-pooling (MAP) head.

Pre-norm block, as in ViT:
    x = x + drop_path(ls1(attn(norm1(x))))
    x = x + drop_path(ls2(mlp(norm2(x))))
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.attention import Attend, MultiHeadSelfAttention

LN_EPSILON = 1e-6  # timm's ViT and the official checkpoints


class Mlp(nn.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout.

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: output width; None keeps the input width.
    dropout: dropout after each layer (train mode).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  hidden_dim: int
  out_dim: int | None = None
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    out_dim = self.out_dim or x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=nn.initializers.xavier_uniform())
    x = nn.Dense(self.hidden_dim, name="fc1", **kw)(x)
    x = nn.gelu(x, approximate=False)  # timm and the ViT paper use the erf form, not tanh
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.Dense(out_dim, name="fc2", **kw)(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


def drop_path(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops whole samples of a residual branch with probability `rate` and scales
  the kept ones by 1 / (1 - rate), so the expectation is unchanged. `rate` may be traced."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class DropPath(nn.Module):
  """Stochastic depth on a residual branch, with the 'dropout' rng in train mode.

  Attributes:
    rate: probability of dropping a sample's branch, in [0, 1).
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False, rate=None):
    """`rate` (possibly traced, e.g. per layer under nn.scan) overrides the attribute."""
    rate = self.rate if rate is None else rate
    if isinstance(rate, (int, float)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path rate={rate} must be in [0, 1)")
      if rate == 0.0:
        return x
    if not train:
      return x
    return drop_path(x, rate, self.make_rng("dropout"))


class LayerScale(nn.Module):
  """Per-channel learnable scale of a residual branch (CaiT), initialised small.

  Attributes:
    init_value: initial value of every channel's scale.
    param_dtype: parameter dtype.
  """

  init_value: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Pre-norm transformer encoder block.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dropout: dropout after the attention projection and in the MLP (train mode).
    attention_dropout: dropout on the attention weights (train mode).
    drop_path: stochastic-depth rate of both residual branches.
    layer_scale: initial layer-scale value; None (or 0) for no layer-scale.
    qkv_bias: bias on the qkv projection.
    ln_epsilon: epsilon of both LayerNorms.
    attention_impl: 'fused' | 'xla' | 'cudnn' | 'explicit' (see jaxvision.layers.attention).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_scale: float | None = None
  qkv_bias: bool = True
  ln_epsilon: float = LN_EPSILON
  attention_impl: str = "fused"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, drop_path_rate=None, *, train: bool = False):
    """`drop_path_rate` (possibly traced) overrides `drop_path`: nn.scan feeds one per layer."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rate = self.drop_path if drop_path_rate is None else drop_path_rate
    y = nn.LayerNorm(epsilon=self.ln_epsilon, name="norm1", **kw)(x)
    y = MultiHeadSelfAttention(
        self.num_heads, qkv_bias=self.qkv_bias, attention_dropout=self.attention_dropout,
        dropout=self.dropout, impl=self.attention_impl, name="attn", **kw,
    )(y, train=train)
    if self.layer_scale:
      y = LayerScale(self.layer_scale, self.param_dtype, name="ls1")(y)
    x = x + DropPath(name="drop_path1")(y, train=train, rate=rate)
    y = nn.LayerNorm(epsilon=self.ln_epsilon, name="norm2", **kw)(x)
    y = Mlp(self.mlp_dim, dropout=self.dropout, name="mlp", **kw)(y, train=train)
    if self.layer_scale:
      y = LayerScale(self.layer_scale, self.param_dtype, name="ls2")(y)
    x = x + DropPath(name="drop_path2")(y, train=train, rate=rate)
    self.sow("intermediates", "out", x)
    return x


class AttentionPool(nn.Module):
  """Multi-head attention pooling (MAP): a learned latent query attends over the tokens, then a
  pre-norm MLP with residual; returns the pooled (B, D) vector.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    attention_impl: 'fused' | 'xla' | 'cudnn' | 'explicit'.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  mlp_dim: int
  attention_impl: str = "fused"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    b, _, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    latent = self.param("latent", nn.initializers.normal(d**-0.5), (1, 1, d), self.param_dtype)
    latent = jnp.broadcast_to(latent.astype(self.dtype), (b, 1, d))
    dense = dict(kernel_init=nn.initializers.xavier_uniform(), **kw)
    q = nn.Dense(d, name="q", **dense)(latent)
    kv = nn.Dense(2 * d, name="kv", **dense)(x)
    q = einops.rearrange(q, "b n (h d) -> b n h d", h=self.num_heads)
    k, v = einops.rearrange(kv, "b n (two h d) -> two b n h d", two=2, h=self.num_heads)
    y = Attend(self.attention_impl, name="attend")(q, k, v, train=train)
    y = nn.Dense(d, name="proj", **dense)(einops.rearrange(y, "b n h d -> b n (h d)"))
    y = y + Mlp(self.mlp_dim, name="mlp", **kw)(
        nn.LayerNorm(epsilon=LN_EPSILON, name="norm", **kw)(y), train=train)
    return y[:, 0]
