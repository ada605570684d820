"""DETR (Carion et al., 2020, End-to-end object detection with transformers) in the layout of
Hugging Face transformers' `DetrForObjectDetection` with its own ResNet backbone.

A frozen-BN ResNet (`backbone`, `jaxvision.models.detection_backbone.ResNetBody`; only its
stride-32 C5 map is used), a 1x1 `input_proj` to `d_model`, sine position embeddings of the
(downsampled) pixel mask, a post-norm transformer encoder (`encoder_{i}`) over the C5 tokens and
decoder (`decoder_{i}`, then `decoder_norm`) over `num_queries` learned object queries
(`query_embed`, added to the queries and keys of every decoder attention; the decoder input
itself starts at zero), then per query a linear `class_head` (K + 1 logits, the last one
"no object") and a 3-layer MLP `box_head` (sigmoid: normalised cx, cy, w, h).

    outputs = model.apply(variables, images, pixel_mask)   # mask [B, H, W], 1 = real pixel
    outputs['logits'] [B, Q, K + 1], outputs['pred_boxes'] [B, Q, 4],
    outputs['aux_logits'] [L - 1, B, Q, K + 1], outputs['aux_pred_boxes'] [L - 1, B, Q, 4]

The auxiliary outputs are the heads on `decoder_norm` of every decoder layer but the last, for
DETR's auxiliary losses. Position embeddings are added to the queries and keys of every
attention, never to the values; padded pixels (mask 0) are keys no query attends to.

One detail differs between the original DETR and transformers: with `config.auxiliary_loss`
on, transformers' decoder feeds each layer the *layer-normed* output of the one before (and norms
the last output twice); the original DETR, and transformers with `auxiliary_loss` off (how its
converted checkpoints run inference), norm only the copies that go to the heads. The default
is the original; `hf_auxiliary_norm=True` is transformers' training-mode variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.layers.conv import BN_EPSILON
from jaxvision.models.detection_backbone import ResNetBody
from jaxvision.models.registry import register_model

LN_EPSILON = 1e-5  # PyTorch's nn.LayerNorm default
# The original DETR's transformer initialisation (xavier-uniform on every matrix).
_dense_init = nn.initializers.xavier_uniform()


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source indices of PyTorch's `interpolate(mode='nearest')` from size_in to size_out:
  floor(i * in / out) in float32, clipped (a host constant: shapes are static)."""
  scale = np.float32(size_in) / np.float32(size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, size_in - 1)


def downsample_mask(pixel_mask: jax.Array, hw: Sequence[int]) -> jax.Array:
  """Pixel mask [B, H, W] -> bool [B, h, w] by nearest neighbour, as transformers' backbone."""
  rows = nearest_indices(pixel_mask.shape[1], hw[0])
  cols = nearest_indices(pixel_mask.shape[2], hw[1])
  return pixel_mask[:, rows][:, :, cols].astype(bool)


def sine_position_embedding(mask: jax.Array, num_features: int, *, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> jax.Array:
  """DETR's normalised sine embedding [B, h, w, 2 * num_features] of a feature mask [B, h, w]:
  (y features, x features), each (sin, cos) pairs over the cumulative real rows / columns."""
  m = mask.astype(jnp.float32)
  y = jnp.cumsum(m, axis=1)
  x = jnp.cumsum(m, axis=2)
  eps = 1e-6
  y = y / (y[:, -1:, :] + eps) * scale
  x = x / (x[:, :, -1:] + eps) * scale
  i = jnp.arange(num_features, dtype=jnp.float32)
  dim_t = temperature ** (2 * jnp.floor(i / 2) / num_features)

  def pairs(p):
    p = p[..., None] / dim_t
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(
        *p.shape[:-1], num_features)

  return jnp.concatenate([pairs(y), pairs(x)], axis=-1)


class DetrAttention(nn.Module):
  """Multi-head attention with separate q/k/v/o projections (`q_proj` ... `o_proj`) and a key
  padding mask; position embeddings are added by the caller to the query and key inputs.

  Attributes:
    num_heads: attention heads; the width must be divisible by it.
    attention_dropout: dropout on the attention weights (train mode).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, key_mask=None, *, train: bool = False):
    """query [B, T, D], key/value [B, S, D], key_mask bool [B, S] (True: attend) -> [B, T, D]."""
    width = query.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"DETR attention: width {width} is not divisible by "
                       f"num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, kernel_init=_dense_init, name=name, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
    q, k = split(dense("q_proj")(query)), split(dense("k_proj")(key))
    v = split(dense("v_proj")(value))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
    if key_mask is not None:
      scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.attention_dropout)(weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*query.shape[:-1], width)
    return dense("o_proj")(out)


class _PostNormLayer(nn.Module):
  """What the encoder and decoder layers share: dropout, the residual + LayerNorm step and the
  ReLU feed-forward block (`fc1`, `fc2`, then `final_norm`)."""

  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def attention(self, name):
    """A DetrAttention named `name`."""
    return DetrAttention(self.num_heads, self.attention_dropout, name=name, dtype=self.dtype,
                         param_dtype=self.param_dtype)

  def add_norm(self, x, y, name, train):
    """LayerNorm(x + dropout(y)), the post-norm residual step."""
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return nn.LayerNorm(LN_EPSILON, use_fast_variance=False, name=name, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x + y)

  def feed_forward(self, x, train):
    """x + FFN(x), normed (`fc1` -> ReLU -> `fc2`)."""
    kw = dict(kernel_init=_dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.relu(nn.Dense(self.ffn_dim, name="fc1", **kw)(x))
    y = nn.Dropout(self.activation_dropout)(y, deterministic=not train)
    y = nn.Dense(x.shape[-1], name="fc2", **kw)(y)
    return self.add_norm(x, y, "final_norm", train)


class DetrEncoderLayer(_PostNormLayer):
  """Post-norm encoder layer: self-attention (`self_attn`, `self_attn_norm`) over the image
  tokens with the position embedding on queries and keys, then the feed-forward block.

  Attributes:
    num_heads: attention heads.
    ffn_dim: hidden width of the feed-forward block.
    dropout: dropout after the attention and the feed-forward block (train mode).
    attention_dropout: dropout on the attention weights.
    activation_dropout: dropout after the ReLU.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  @nn.compact
  def __call__(self, x, pos, mask, *, train: bool = False):
    qk = x + pos
    y = self.attention("self_attn")(qk, qk, x, mask, train=train)
    x = self.add_norm(x, y, "self_attn_norm", train)
    return self.feed_forward(x, train)


class DetrDecoderLayer(_PostNormLayer):
  """Post-norm decoder layer: self-attention over the queries (`self_attn`, `self_attn_norm`),
  cross-attention to the encoder output (`cross_attn`, `cross_attn_norm`; query position on the
  queries, image position on the keys), then the feed-forward block.

  Attributes:
    num_heads: attention heads.
    ffn_dim: hidden width of the feed-forward block.
    dropout: dropout after each attention and the feed-forward block (train mode).
    attention_dropout: dropout on the attention weights.
    activation_dropout: dropout after the ReLU.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  @nn.compact
  def __call__(self, x, query_pos, memory, pos, mask, *, train: bool = False):
    qk = x + query_pos
    y = self.attention("self_attn")(qk, qk, x, train=train)
    x = self.add_norm(x, y, "self_attn_norm", train)
    y = self.attention("cross_attn")(x + query_pos, memory + pos, memory, mask, train=train)
    x = self.add_norm(x, y, "cross_attn_norm", train)
    return self.feed_forward(x, train)


class DETR(nn.Module):
  """DETR on a frozen-BN ResNet.

  Attributes:
    num_classes: data classes K; the class head has K + 1 columns, the last one "no object"
      (transformers' `num_labels`; facebook/detr-resnet-50 has 91).
    layers: ResNet blocks per stage.
    block: 'basic' or 'bottleneck'.
    widths: ResNet stage widths (`planes`; the stem has widths[0] channels).
    d_model: transformer width.
    num_heads: attention heads of every attention.
    encoder_layers: encoder depth.
    decoder_layers: decoder depth (L); the auxiliary outputs come from the first L - 1.
    ffn_dim: hidden width of every feed-forward block.
    num_queries: object queries Q (the most objects one image can have).
    dropout: dropout of the transformer (train mode; transformers' `dropout`).
    attention_dropout: dropout on attention weights (transformers' `attention_dropout`).
    activation_dropout: dropout after the feed-forward ReLU.
    temperature: temperature of the sine position embedding.
    hf_auxiliary_norm: transformers' decoder with `auxiliary_loss=True` (see the module
      docstring); False is the original DETR.
    bn_epsilon: epsilon of the frozen BatchNorms.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  # The detection task picks its loss and decoding by this name.
  family: ClassVar[str] = "detr"

  num_classes: int = 91
  layers: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  d_model: int = 256
  num_heads: int = 8
  encoder_layers: int = 6
  decoder_layers: int = 6
  ffn_dim: int = 2048
  num_queries: int = 100
  dropout: float = 0.1
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  temperature: float = 10000.0
  hf_auxiliary_norm: bool = False
  bn_epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, pixel_mask: jax.Array | None = None, *,
               train: bool = False) -> dict[str, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f"DETR input must be [B, H, W, C], got shape {x.shape}")
    if pixel_mask is None:
      pixel_mask = jnp.ones(x.shape[:3], bool)
    if pixel_mask.shape != x.shape[:3]:
      raise ValueError(f"DETR pixel_mask {pixel_mask.shape} must be [B, H, W] = {x.shape[:3]}")
    if self.d_model % 2 or self.decoder_layers < 1:
      raise ValueError(f"DETR d_model={self.d_model} must be even and decoder_layers="
                       f"{self.decoder_layers} at least 1")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c5 = ResNetBody(self.layers, self.block, self.widths, self.bn_epsilon, name="backbone",
                    **kw)(x, train=train)[-1]
    b, h, w, _ = c5.shape
    mask = downsample_mask(pixel_mask, (h, w))
    pos = sine_position_embedding(mask, self.d_model // 2, temperature=self.temperature)
    pos = pos.reshape(b, h * w, self.d_model).astype(self.dtype)
    mask = mask.reshape(b, h * w)
    memory = nn.Conv(self.d_model, (1, 1), name="input_proj", **kw)(c5).reshape(b, h * w, -1)

    layer_kw = dict(num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout,
                    attention_dropout=self.attention_dropout,
                    activation_dropout=self.activation_dropout, **kw)
    memory = nn.Dropout(self.dropout)(memory, deterministic=not train)
    for i in range(self.encoder_layers):
      memory = DetrEncoderLayer(name=f"encoder_{i}", **layer_kw)(memory, pos, mask, train=train)

    # nn.Embedding's N(0, 1) start, as the original DETR's query embedding.
    query_pos = self.param("query_embed", nn.initializers.normal(1.0),
                           (self.num_queries, self.d_model), self.param_dtype).astype(self.dtype)
    query_pos = jnp.broadcast_to(query_pos, (b, *query_pos.shape))
    decoder_norm = nn.LayerNorm(LN_EPSILON, use_fast_variance=False, name="decoder_norm", **kw)
    hidden, normed = jnp.zeros_like(query_pos), []
    for i in range(self.decoder_layers):
      hidden = DetrDecoderLayer(name=f"decoder_{i}", **layer_kw)(hidden, query_pos, memory, pos,
                                                                  mask, train=train)
      normed.append(decoder_norm(hidden))
      if self.hf_auxiliary_norm:
        hidden = normed[-1]
    if self.hf_auxiliary_norm:
      normed[-1] = decoder_norm(normed[-1])
    states = jnp.stack(normed)  # [L, B, Q, D]

    logits = nn.Dense(self.num_classes + 1, name="class_head", **kw)(states)
    boxes = states
    for i in range(3):
      boxes = nn.Dense(4 if i == 2 else self.d_model, name=f"box_head_{i}", **kw)(boxes)
      boxes = nn.relu(boxes) if i < 2 else nn.sigmoid(boxes)
    return {"logits": logits[-1], "pred_boxes": boxes[-1], "aux_logits": logits[:-1],
            "aux_pred_boxes": boxes[:-1]}


_PAPER = "Carion et al. 2020, End-to-end object detection with transformers"


@register_model(input_shape=(800, 800, 3), num_classes=91, paper=_PAPER)
def detr_resnet50(**kwargs) -> DETR:
  """DETR, ResNet-50 (transformers' `DetrForObjectDetection`, facebook/detr-resnet-50)."""
  return DETR(**kwargs)


@register_model(input_shape=(128, 128, 3), num_classes=10, paper=_PAPER)
def detr_tiny(**kwargs) -> DETR:
  """CPU-sized variant for 128 x 128 digit canvases: one basic block per stage (widths
  16-128), d_model 64 with 4 heads, FFN 128, 2 + 2 layers, 12 queries."""
  kwargs.setdefault("layers", (1, 1, 1, 1))
  kwargs.setdefault("block", "basic")
  kwargs.setdefault("widths", (16, 32, 64, 128))
  kwargs.setdefault("d_model", 64)
  kwargs.setdefault("num_heads", 4)
  kwargs.setdefault("encoder_layers", 2)
  kwargs.setdefault("decoder_layers", 2)
  kwargs.setdefault("ffn_dim", 128)
  kwargs.setdefault("num_queries", 12)
  return DETR(**kwargs)
