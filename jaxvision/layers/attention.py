"""Multi-head scaled dot-product attention, fused or explicit.

Two paths compute softmax(Q K^T / sqrt(d_k)) V:
  * fused: `jax.nn.dot_product_attention` (XLA, or cuDNN's flash kernel on GPU in bf16/fp16);
    `impl='fused'` lets JAX pick, 'xla' and 'cudnn' force one.
  * explicit (`impl='explicit'`): the textbook einsum + softmax; it sows the attention weights
    (batch, heads, queries, keys) under 'intermediates' / 'attention_weights' for attention maps
    and rollout:

      _, state = model.apply(variables, x, mutable=['intermediates'])
      state['intermediates']['blocks_0']['attn']['attend']['attention_weights'][0]  # (B, H, N, N)

Attention dropout has no fused kernel, so a train-mode call with `attention_dropout > 0` takes the
explicit path whatever `impl` says.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("fused", "xla", "cudnn", "explicit")


def check_impl(impl: str) -> None:
  """ValueError unless `impl` is one of IMPLEMENTATIONS."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}; choose from {IMPLEMENTATIONS}")


def dot_product_attention_weights(query: jax.Array, key: jax.Array) -> jax.Array:
  """softmax(Q K^T / sqrt(d_k)) over the keys: (B, Q, H, d), (B, K, H, d) -> (B, H, Q, K)."""
  scale = 1.0 / jnp.sqrt(jnp.asarray(query.shape[-1], jnp.float32))
  scores = jnp.einsum("...qhd,...khd->...hqk", query, key)
  # The softmax runs in float32 even under bf16 compute: its exp/sum is where bf16 loses rows.
  weights = jax.nn.softmax(scores.astype(jnp.float32) * scale, axis=-1)
  return weights.astype(query.dtype)


def explicit_attention(weights: jax.Array, value: jax.Array) -> jax.Array:
  """Weights (B, H, Q, K) applied to values (B, K, H, d) -> (B, Q, H, d)."""
  return jnp.einsum("...hqk,...khd->...qhd", weights, value)


def fused_attention(query, key, value, implementation: str | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` on (B, T, H, d); implementation None | 'xla' | 'cudnn'."""
  return jax.nn.dot_product_attention(query, key, value, implementation=implementation)


class Attend(nn.Module):
  """softmax(Q K^T / sqrt(d_k)) V on (B, T, H, d) heads, by the path `impl` names.

  Attributes:
    impl: 'fused' (JAX picks), 'xla', 'cudnn' (fused, forced) or 'explicit' (sows the weights).
    attention_dropout: dropout on the attention weights in train mode (explicit path).
  """

  impl: str = "fused"
  attention_dropout: float = 0.0

  @nn.compact
  def __call__(self, query, key, value, *, train: bool = False):
    check_impl(self.impl)
    dropout = train and self.attention_dropout > 0
    if self.impl != "explicit" and not dropout:
      return fused_attention(query, key, value, None if self.impl == "fused" else self.impl)
    weights = dot_product_attention_weights(query, key)
    self.sow("intermediates", "attention_weights", weights)
    weights = nn.Dropout(self.attention_dropout)(weights, deterministic=not dropout)
    return explicit_attention(weights, value)


def fused_qkv_init(base=nn.initializers.xavier_uniform()):
  """Initializer of a (D, 3D) fused qkv kernel: `base` on each D x D part, as if three layers."""

  def init(rng, shape, dtype=jnp.float32):
    d_in, d_out = shape
    if d_out % 3:
      raise ValueError(f"fused qkv kernel needs an output size divisible by 3, got {shape}")
    parts = jax.vmap(lambda k: base(k, (d_in, d_out // 3), dtype))(jax.random.split(rng, 3))
    return jnp.concatenate(list(parts), axis=1)

  return init


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (the timm layout) and an output proj.

  The qkv output is laid out (3, heads, head_dim): [q of head 0..H-1 | k ... | v ...].

  Attributes:
    num_heads: attention heads; the width must be divisible by it.
    qkv_bias: bias on the qkv projection.
    attention_dropout: dropout on the attention weights (train mode).
    dropout: dropout on the output projection (train mode).
    impl: 'fused' | 'xla' | 'cudnn' | 'explicit', see the module docstring.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  qkv_bias: bool = True
  attention_dropout: float = 0.0
  dropout: float = 0.0
  impl: str = "fused"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = nn.Dense(3 * width, use_bias=self.qkv_bias, kernel_init=fused_qkv_init(), name="qkv",
                   **kw)(x)
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=self.num_heads)
    out = Attend(self.impl, self.attention_dropout, name="attend")(q, k, v, train=train)
    out = einops.rearrange(out, "b n h d -> b n (h d)")
    out = nn.Dense(width, kernel_init=nn.initializers.xavier_uniform(), name="proj", **kw)(out)
    return nn.Dropout(self.dropout)(out, deterministic=not train)
