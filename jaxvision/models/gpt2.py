"""GPT-2 (Radford et al., 2019) as a caption decoder: token + learned position embeddings, a stack
of pre-LayerNorm blocks with causal self-attention (and, for an encoder-decoder, cross-attention
to the image tokens), a final LayerNorm and logits tied to the token embedding.

Parameter names follow Hugging Face's `GPT2LMHeadModel` (with `add_cross_attention=True`) so
that conversion is a rename: `wte`, `wpe`, `h_{i}/{ln_1, attn/c_attn, attn/c_proj,
ln_cross_attn, crossattention/{q_attn, c_attn, c_proj}, ln_2, mlp/c_fc, mlp/c_proj}`, `ln_f`.
GPT-2's `Conv1D` weights are stored (in, out), so they are Flax kernels as they are.

Decoding one token at a time uses a key/value cache (`GPT2Decoder.init_cache`): a pytree

    {'index': int32 []                      tokens already written,
     'self':  ({'k', 'v'}: [B, T, H, d], ...)  per layer, slots 0..T-1 = positions 0..T-1,
     'cross': ({'k', 'v'}: [B, N, H, d], ...)  per layer, the image tokens' keys and values}

passed to and returned by `__call__(tokens, cache=cache)`, so a step costs one token's work and
the image tokens are projected once per caption, not once per step. Shapes are static.

Attention weights: with `apply(..., mutable=['intermediates'])` every attention is computed
explicitly and sows its weights (B, heads, queries, keys) under `attend/attention_weights`,
e.g. `h_0/crossattention/attend` (see `jaxvision.models.vit_gpt2.cross_attention_maps`).
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.layers.attention import check_impl, fused_attention

LN_EPSILON = 1e-5  # GPT-2's layer_norm_epsilon
# name -> (width, depth, heads), as released by OpenAI (mlp_dim is 4 * width).
SIZES = {
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}


def causal_mask(query_positions: jax.Array, num_keys: int) -> jax.Array:
  """[Q, K] bool: query at position p sees the keys in slots 0..p."""
  return jnp.arange(num_keys)[None, :] <= query_positions[:, None]


class Attend(nn.Module):
  """softmax(Q K^T / sqrt(d) + mask) V on (B, T, H, d) heads.

  The explicit path (einsum + float32 softmax) runs for impl='explicit', for attention dropout
  in train mode and whenever 'intermediates' is mutable, and sows the weights there; otherwise
  `jax.nn.dot_product_attention` runs.

  Attributes:
    impl: 'fused' (JAX picks), 'xla', 'cudnn' or 'explicit'.
    attention_dropout: dropout on the attention weights (train mode).
  """

  impl: str = "fused"
  attention_dropout: float = 0.0

  @nn.compact
  def __call__(self, query, key, value, mask=None, *, train: bool = False):
    check_impl(self.impl)
    dropout = train and self.attention_dropout > 0
    if self.impl != "explicit" and not dropout and not self.is_mutable_collection("intermediates"):
      if mask is None:
        return fused_attention(query, key, value, None if self.impl == "fused" else self.impl)
      return jax.nn.dot_product_attention(
          query, key, value, mask=mask[None, None],
          implementation=None if self.impl == "fused" else self.impl)
    scale = 1.0 / math.sqrt(query.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
    if mask is not None:
      scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    self.sow("intermediates", "attention_weights", weights)
    weights = nn.Dropout(self.attention_dropout)(weights, deterministic=not dropout)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _dense(features: int, std: float, name: str, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.normal(std), name=name, dtype=dtype,
                  param_dtype=param_dtype)


class SelfAttention(nn.Module):
  """Causal multi-head self-attention with GPT-2's fused `c_attn` (q | k | v) and `c_proj`.

  Attributes:
    num_heads: attention heads.
    dropout: dropout on the output projection (train mode).
    attention_dropout: dropout on the attention weights (train mode).
    impl: attention implementation (see `Attend`).
    proj_std: init std of `c_proj` (GPT-2 scales it by 1 / sqrt(2 * depth)).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  impl: str = "fused"
  proj_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, cache=None, index=None, train: bool = False):
    """(B, L, D) -> ((B, L, D), the updated {'k', 'v'} cache or None)."""
    b, length, width = x.shape
    qkv = _dense(3 * width, 0.02, "c_attn", self.dtype, self.param_dtype)(x)
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=self.num_heads)
    if cache is None:
      mask = causal_mask(jnp.arange(length), length)
    else:
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
      cache = {"k": k, "v": v}
      mask = causal_mask(index + jnp.arange(length), k.shape[1])
    out = Attend(self.impl, self.attention_dropout, name="attend")(q, k, v, mask, train=train)
    out = _dense(width, self.proj_std, "c_proj", self.dtype, self.param_dtype)(
        einops.rearrange(out, "b n h d -> b n (h d)"))
    return nn.Dropout(self.dropout)(out, deterministic=not train), cache


class CrossAttention(nn.Module):
  """Multi-head attention from the text tokens (`q_attn`) to the image tokens (`c_attn`: k | v).

  Attributes:
    num_heads: attention heads.
    width: token dimension (of the text and of the image tokens).
    dropout: dropout on the output projection (train mode).
    attention_dropout: dropout on the attention weights (train mode).
    impl: attention implementation (see `Attend`).
    proj_std: init std of `c_proj`.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  width: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  impl: str = "fused"
  proj_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(0.02)
    self.q_attn = nn.Dense(self.width, kernel_init=init, **kw)
    self.c_attn = nn.Dense(2 * self.width, kernel_init=init, **kw)
    self.c_proj = nn.Dense(self.width, kernel_init=nn.initializers.normal(self.proj_std), **kw)
    self.attend = Attend(self.impl, self.attention_dropout)
    self.drop = nn.Dropout(self.dropout)

  def key_value(self, encoded):
    """Image tokens (B, N, D) -> {'k', 'v'}: (B, N, H, d) each."""
    k, v = einops.rearrange(self.c_attn(encoded), "b n (two h d) -> two b n h d", two=2,
                            h=self.num_heads)
    return {"k": k, "v": v}

  def __call__(self, x, encoded=None, *, kv=None, train: bool = False):
    """(B, L, D) text tokens attending to `encoded` (or to its precomputed `kv`)."""
    kv = self.key_value(encoded) if kv is None else kv
    q = einops.rearrange(self.q_attn(x), "b n (h d) -> b n h d", h=self.num_heads)
    out = self.attend(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype), train=train)
    out = self.c_proj(einops.rearrange(out, "b n h d -> b n (h d)"))
    return self.drop(out, deterministic=not train)


class Mlp(nn.Module):
  """c_fc -> GELU (tanh approximation, as GPT-2) -> c_proj -> dropout.

  Attributes:
    hidden_dim: hidden width.
    dropout: dropout on the output (train mode).
    proj_std: init std of `c_proj`.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  hidden_dim: int
  dropout: float = 0.0
  proj_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    h = _dense(self.hidden_dim, 0.02, "c_fc", self.dtype, self.param_dtype)(x)
    h = nn.gelu(h, approximate=True)
    h = _dense(x.shape[-1], self.proj_std, "c_proj", self.dtype, self.param_dtype)(h)
    return nn.Dropout(self.dropout)(h, deterministic=not train)


class Block(nn.Module):
  """Pre-LayerNorm GPT-2 block: causal self-attention, cross-attention (optional), MLP.

  Attributes:
    width: token dimension.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    cross_attention: add the cross-attention sub-block (`ln_cross_attn`, `crossattention`).
    dropout: residual dropout (train mode).
    attention_dropout: dropout on the attention weights (train mode).
    attention_impl: attention implementation (see `Attend`).
    proj_std: init std of the output projections.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  width: int
  num_heads: int
  mlp_dim: int
  cross_attention: bool = True
  dropout: float = 0.0
  attention_dropout: float = 0.0
  attention_impl: str = "fused"
  proj_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, dropout=self.dropout,
                attention_dropout=self.attention_dropout, impl=self.attention_impl,
                proj_std=self.proj_std, **kw)
    self.ln_1 = nn.LayerNorm(epsilon=LN_EPSILON, **kw)
    self.attn = SelfAttention(**attn)
    if self.cross_attention:
      self.ln_cross_attn = nn.LayerNorm(epsilon=LN_EPSILON, **kw)
      self.crossattention = CrossAttention(width=self.width, **attn)
    self.ln_2 = nn.LayerNorm(epsilon=LN_EPSILON, **kw)
    self.mlp = Mlp(self.mlp_dim, dropout=self.dropout, proj_std=self.proj_std, **kw)

  def cross_key_value(self, encoded):
    """The image tokens' keys and values for this block's cross-attention."""
    return self.crossattention.key_value(encoded)

  def __call__(self, x, encoded=None, *, cache=None, cross_kv=None, index=None,
               train: bool = False):
    """(B, L, D) -> ((B, L, D), updated self-attention cache or None)."""
    y, cache = self.attn(self.ln_1(x), cache=cache, index=index, train=train)
    x = x + y
    if self.cross_attention:
      if encoded is None and cross_kv is None:
        raise ValueError("GPT-2 decoder with cross-attention needs the encoded image tokens")
      x = x + self.crossattention(self.ln_cross_attn(x), encoded, kv=cross_kv, train=train)
    return x + self.mlp(self.ln_2(x), train=train), cache


class GPT2Decoder(nn.Module):
  """GPT-2 language model, optionally cross-attending to encoder tokens; logits tied to `wte`.

  Attributes:
    vocab_size: tokens in the vocabulary.
    max_positions: length of the learned position embedding (the longest sequence).
    width: token dimension.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width; None gives 4 * width.
    cross_attention: cross-attention to `encoded` in every block (GPT-2's add_cross_attention).
    dropout: dropout on the embeddings and the residual branches (train mode).
    attention_dropout: dropout on the attention weights (train mode).
    attention_impl: 'fused' | 'xla' | 'cudnn' | 'explicit'.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  vocab_size: int = 50257
  max_positions: int = 1024
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  cross_attention: bool = True
  dropout: float = 0.0
  attention_dropout: float = 0.0
  attention_impl: str = "fused"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.depth < 1 or self.width % self.num_heads:
      raise ValueError(f"GPT-2 depth={self.depth}, width={self.width}, "
                       f"num_heads={self.num_heads}: need depth >= 1 and width divisible by "
                       "num_heads")
    if self.vocab_size < 1 or self.max_positions < 1:
      raise ValueError(f"GPT-2 vocab_size={self.vocab_size}, max_positions={self.max_positions} "
                       "must be positive")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(0.02)
    self.wte = nn.Embed(self.vocab_size, self.width, embedding_init=init, **kw)
    self.wpe = nn.Embed(self.max_positions, self.width, embedding_init=init, **kw)
    self.drop = nn.Dropout(self.dropout)
    # GPT-2 scales the residual projections' init by 1 / sqrt(number of residual branches).
    proj_std = 0.02 / math.sqrt(2 * self.depth)
    self.h = [Block(self.width, self.num_heads, self.mlp_dim or 4 * self.width,
                    cross_attention=self.cross_attention, dropout=self.dropout,
                    attention_dropout=self.attention_dropout,
                    attention_impl=self.attention_impl, proj_std=proj_std, **kw)
              for _ in range(self.depth)]
    self.ln_f = nn.LayerNorm(epsilon=LN_EPSILON, **kw)

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.width // self.num_heads

  def _check_length(self, last_position: int) -> None:
    if last_position > self.max_positions:
      raise ValueError(f"GPT-2 sequence of {last_position} tokens exceeds "
                       f"max_positions={self.max_positions}")

  def init_cache(self, batch_size: int, max_len: int, encoded=None) -> dict:
    """An empty cache for `max_len` tokens, with the image tokens' cross-attention keys and
    values computed once from `encoded` (B, N, width)."""
    self._check_length(max_len)
    shape = (batch_size, max_len, self.num_heads, self.head_dim)
    empty = {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
    cross = ()
    if self.cross_attention:
      if encoded is None:
        raise ValueError("GPT-2 init_cache with cross-attention needs the encoded image tokens")
      cross = tuple(block.cross_key_value(encoded) for block in self.h)
    return {"index": jnp.zeros((), jnp.int32), "self": tuple(empty for _ in self.h),
            "cross": cross}

  def __call__(self, tokens, encoded=None, *, cache=None, positions=None, train: bool = False):
    """Logits (B, L, vocab_size) of the next token at each of `tokens` (B, L) int.

    With `cache` (from `init_cache`) the tokens are the next L of the sequence and the result
    is (logits, updated cache); `positions` (B, L) defaults to the cache's index onwards.
    """
    if tokens.ndim != 2:
      raise ValueError(f"GPT-2 tokens must be (batch, length), got shape {tuple(tokens.shape)}")
    length = tokens.shape[1]
    index = None if cache is None else cache["index"]
    if positions is None:
      start = 0 if index is None else index
      positions = jnp.broadcast_to(start + jnp.arange(length), tokens.shape)
    if cache is None:
      self._check_length(length)
    x = self.wte(tokens) + self.wpe(positions)
    x = self.drop(x, deterministic=not train)
    new_self = []
    for i, block in enumerate(self.h):
      layer_cache = None if cache is None else cache["self"][i]
      cross_kv = cache["cross"][i] if cache is not None and cache["cross"] else None
      x, layer_cache = block(x, encoded, cache=layer_cache, cross_kv=cross_kv, index=index,
                             train=train)
      new_self.append(layer_cache)
    logits = self.wte.attend(self.ln_f(x))
    if cache is None:
      return logits
    return logits, {"index": index + length, "self": tuple(new_self), "cross": cache["cross"]}
