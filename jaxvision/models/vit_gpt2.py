"""ViT + GPT-2 image captioner: Hugging Face's `VisionEncoderDecoderModel(ViTModel, GPT2LMHeadModel
with add_cross_attention=True)`, the layout of `nlpconnect/vit-gpt2-image-captioning`.

The encoder is jaxvision's `VisionTransformer` with Hugging Face's details (LayerNorm epsilon
1e-12, the final LayerNorm's tokens are what the decoder reads); the decoder is
`jaxvision.models.gpt2.GPT2Decoder` with cross-attention to every image token (class token
included). When the widths differ the image tokens go through `enc_to_dec_proj` first, as in
Hugging Face. ViTModel's pooler (Dense + tanh on the class token, `encoder_pooler`) is unused
by the caption but kept, so checkpoints round-trip and the parameter count is Hugging Face's.

    model = create_model('vit_gpt2_tiny')
    logits = model.apply(variables, images, tokens)                       # teacher forcing
    encoded = model.apply(variables, images, method='encode')
    cache = model.apply(variables, encoded, max_len, method='init_cache')
    logits, cache = model.apply(variables, next_tokens, cache=cache, method='decode')

Weights: `jaxvision.convert.hf_vit_gpt2` (Hugging Face checkpoints, both directions).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.models import gpt2
from jaxvision.models.registry import register_model
from jaxvision.models.vit import SIZES as VIT_SIZES
from jaxvision.models.vit import VisionTransformer

HF_LN_EPSILON = 1e-12  # ViTConfig.layer_norm_eps


def parse_size(size, table: dict, what: str) -> tuple[int, int, int, int]:
  """(width, depth, heads, mlp_dim) from a size-table name or an explicit 3- or 4-sequence."""
  if isinstance(size, str):
    if size not in table:
      raise ValueError(f"{what}={size!r}; choose from {sorted(table)} or give "
                       "(width, depth, heads[, mlp_dim])")
    size = table[size]
  size = tuple(int(v) for v in size)
  if len(size) == 3:
    size = (*size, 4 * size[0])
  if len(size) != 4 or min(size) < 1:
    raise ValueError(f"{what}={size}: want (width, depth, heads[, mlp_dim]) of positive ints")
  return size


class VitGpt2(nn.Module):
  """Image captioner: ViT encoder tokens -> GPT-2 decoder with cross-attention.

  Attributes:
    vocab_size: tokens in the vocabulary (the registry's `num_classes`).
    image_size: input side (or (h, w)).
    patch_size: side of the ViT's square patches.
    encoder_size: ViT (width, depth, heads[, mlp_dim]) or a `jaxvision.models.vit.SIZES` name.
    decoder_size: GPT-2 (width, depth, heads[, mlp_dim]) or a `gpt2.SIZES` name.
    max_positions: GPT-2's position-embedding length (the longest caption, bos included).
    encoder_ln_epsilon: the ViT's LayerNorm epsilon (Hugging Face's 1e-12).
    pooler: keep ViTModel's (unused) pooler, as Hugging Face checkpoints have it.
    dropout: dropout in both transformers (train mode).
    attention_dropout: dropout on the attention weights (train mode).
    attention_impl: 'fused' | 'xla' | 'cudnn' | 'explicit' in both.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  vocab_size: int = 50257
  image_size: Any = 224
  patch_size: int = 16
  encoder_size: Any = "B"
  decoder_size: Any = "small"
  max_positions: int = 1024
  encoder_ln_epsilon: float = HF_LN_EPSILON
  pooler: bool = True
  dropout: float = 0.0
  attention_dropout: float = 0.0
  attention_impl: str = "fused"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def encoder_dims(self) -> tuple[int, int, int, int]:
    """The ViT's (width, depth, heads, mlp_dim)."""
    return parse_size(self.encoder_size, VIT_SIZES, "encoder_size")

  @property
  def decoder_dims(self) -> tuple[int, int, int, int]:
    """GPT-2's (width, depth, heads, mlp_dim)."""
    return parse_size(self.decoder_size, gpt2.SIZES, "decoder_size")

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = dict(dropout=self.dropout, attention_dropout=self.attention_dropout,
                attention_impl=self.attention_impl)
    ew, ed, eh, em = self.encoder_dims
    dw, dd, dh, dm = self.decoder_dims
    self.encoder = VisionTransformer(
        num_classes=0, image_size=self.image_size, patch_size=self.patch_size, width=ew,
        depth=ed, num_heads=eh, mlp_dim=em, ln_epsilon=self.encoder_ln_epsilon, **drop, **kw)
    if self.pooler:
      self.encoder_pooler = nn.Dense(ew, kernel_init=nn.initializers.normal(0.02), **kw)
    if ew != dw:
      self.enc_to_dec_proj = nn.Dense(dw, kernel_init=nn.initializers.normal(0.02), **kw)
    self.decoder = gpt2.GPT2Decoder(
        vocab_size=self.vocab_size, max_positions=self.max_positions, width=dw, depth=dd,
        num_heads=dh, mlp_dim=dm, cross_attention=True, **drop, **kw)

  def encode(self, images, *, train: bool = False):
    """NHWC images -> the image tokens (B, N, decoder width) the decoder attends to."""
    size = (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size
    if images.ndim != 4 or tuple(images.shape[1:3]) != tuple(size):
      # Hugging Face's ViTModel rejects other sizes too (its weights know one patch grid).
      raise ValueError(f"vit_gpt2 built for image_size={self.image_size} got images of shape "
                       f"{tuple(images.shape)} (want NHWC at that size)")
    tokens = self.encoder(images, train=train, tokens=True)
    if self.pooler and self.is_initializing():
      # Only its parameters matter: nothing reads the pooled vector.
      jnp.tanh(self.encoder_pooler(tokens[:, 0]))
    if self.encoder_dims[0] != self.decoder_dims[0]:
      tokens = self.enc_to_dec_proj(tokens)
    return tokens

  def decode(self, tokens, encoded=None, *, cache=None, positions=None, train: bool = False):
    """Next-token logits (B, L, vocab) of `tokens`, attending to `encoded`; with a `cache`
    (from `init_cache`) returns (logits, updated cache) and `encoded` is not needed."""
    return self.decoder(tokens, encoded, cache=cache, positions=positions, train=train)

  def init_cache(self, encoded, max_len: int, *, train: bool = False) -> dict:
    """An empty decoding cache for `max_len` tokens of a batch of encoded images."""
    del train  # a method called through the trainer's forward gets it
    return self.decoder.init_cache(encoded.shape[0], max_len, encoded)

  def __call__(self, images, tokens, *, train: bool = False):
    """Teacher-forced logits (B, L, vocab) of the next token at each input token (B, L)."""
    return self.decode(tokens, self.encode(images, train=train), train=train)


def cross_attention_maps(intermediates: dict) -> list[jax.Array]:
  """Per-layer cross-attention weights (B, heads, text tokens, image tokens), from the
  'intermediates' of an apply(..., mutable=['intermediates']) of `decode` or `__call__`."""
  decoder = intermediates.get("decoder", {})
  names = sorted((k for k in decoder if k.startswith("h_")), key=lambda k: int(k[2:]))
  maps = [decoder[k].get("crossattention", {}).get("attend", {}).get("attention_weights")
          for k in names]
  if not maps or any(m is None for m in maps):
    raise ValueError("no cross-attention weights sown: apply the model with "
                     "mutable=['intermediates']")
  return [m[0] for m in maps]


# --- Registered variants --------------------------------------------------------------------------

_PAPER = ("Dosovitskiy et al. 2021 (ViT) + Radford et al. 2019 (GPT-2), as "
          "nlpconnect/vit-gpt2-image-captioning")


def _variant(defaults: dict, kwargs: dict) -> VitGpt2:
  kwargs = dict(kwargs)
  # The registry's num_classes is the vocabulary size for a captioner.
  vocab = kwargs.pop("num_classes", None)
  if vocab and "vocab_size" not in kwargs:
    kwargs["vocab_size"] = int(vocab)
  return VitGpt2(**{**defaults, **kwargs})


@register_model(input_shape=(224, 224, 3), num_classes=50257, paper=_PAPER)
def vit_gpt2(**kwargs) -> VitGpt2:
  """ViT-B/16 (224 px, Hugging Face ViTModel) + GPT-2 small (12 x 768, 1024 positions)."""
  return _variant(dict(encoder_size="B", decoder_size="small"), kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=50257, paper=_PAPER)
def vit_gpt2_small(**kwargs) -> VitGpt2:
  """ViT-S/16 + a 6-layer GPT-2 of width 384 (6 heads), 1024 positions."""
  return _variant(dict(encoder_size="S", decoder_size=(384, 6, 6)), kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=64, paper=_PAPER)
def vit_gpt2_tiny(**kwargs) -> VitGpt2:
  """Test size: 32 px, 8-pixel patches, ViT width 32 x 2 blocks, GPT width 64 x 2 blocks (the
  widths differ, so `enc_to_dec_proj` is exercised), 32 positions."""
  return _variant(dict(image_size=32, patch_size=8, encoder_size=(32, 2, 2, 64),
                       decoder_size=(64, 2, 2, 128), max_positions=32), kwargs)
