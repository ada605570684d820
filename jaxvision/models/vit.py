"""Vision Transformer (Dosovitskiy et al., 2021, "An image is worth 16x16 words").

Patches -> linear embedding (a convolution with kernel = stride = patch size) -> tokens, a class
token prepended, position embeddings added (learned, or fixed sin-cos 1-D / 2-D), a stack of
pre-norm encoder blocks, a final LayerNorm, and a head on the class token, the mean of the
tokens ('gap') or an attention-pooled vector ('map').

Every variant comes from ONE size table: `vit_b16` is size 'B' with 16-pixel patches. Parameter
names follow timm so that conversion is a rename: `patch_embed/proj`, `cls_token`, `pos_embed`,
`blocks_{i}/{norm1, attn/qkv, attn/proj, ls1, norm2, mlp/fc1, mlp/fc2, ls2}`, `norm` (or
`fc_norm` after the pooling), `attn_pool`, `head`. With `scan=True` the blocks are one `blocks`
module whose parameters carry a leading depth axis; `stack_blocks` / `unstack_blocks` move
between the two layouts.

Weights: `jaxvision.convert.from_torch` / `to_torch` (timm `vit_*` state dicts) and
`jaxvision.convert.vit_npz.from_vit_npz` (the official `.npz` checkpoints); at another image size,
`load_at_image_size` resamples the learned position embedding.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.layers.attention import check_impl
from jaxvision.layers.embed import PatchEmbed, fixed_posemb, patch_grid, resample_posemb, to_pair
from jaxvision.layers.transformer import LN_EPSILON, AttentionPool, EncoderBlock
from jaxvision.models.registry import register_model

# name -> (width, depth, heads, mlp_dim), as in the ViT paper (Ti and S from DeiT).
SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
POOLS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d", "sincos1d")
_BLOCK = re.compile(r"^blocks_(\d+)$")


class VisionTransformer(nn.Module):
  """ViT classifier on NHWC images.

  Attributes:
    num_classes: output classes; 0 returns the pooled (B, width) features.
    image_size: input side (or (h, w)); fixes the patch grid and the learned posemb's length.
    patch_size: side of the square patches.
    width: token dimension.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width; None gives 4 * width.
    pool: 'cls' (class token), 'gap' (mean of the tokens) or 'map' (attention pooling).
    fc_norm: with pool='gap', the final LayerNorm comes after the mean (named `fc_norm`)
      instead of before it (`norm`), as timm's global-average-pool ViTs with `fc_norm` do.
    class_token: prepend a class token; None means only with pool='cls'. With pool='gap' the
      mean leaves it out (timm's `class_token=True, global_pool='avg'` models).
    posemb: 'learn', 'sincos2d' or 'sincos1d' (fixed, no parameters).
    dropout: dropout after the position embedding, attention projection and MLP layers.
    attention_dropout: dropout on the attention weights.
    drop_path: stochastic-depth rate of the last block (linear from 0 over the depth).
    layer_scale: initial layer-scale value, None for none.
    qkv_bias: bias on the qkv projections.
    ln_epsilon: epsilon of every LayerNorm (1e-6 as timm; Hugging Face's ViTModel uses 1e-12).
    attention_impl: 'fused' (jax.nn.dot_product_attention picks), 'xla', 'cudnn' or 'explicit'
      (sows the attention weights, see `attention_maps`).
    remat: recompute each block's activations in the backward pass (saves memory).
    scan: run the blocks with nn.scan over stacked parameters (one compiled block).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  image_size: Any = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  pool: str = "cls"
  fc_norm: bool = False
  class_token: bool | None = None
  posemb: str = "learn"
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_scale: float | None = None
  qkv_bias: bool = True
  ln_epsilon: float = LN_EPSILON
  attention_impl: str = "fused"
  remat: bool = False
  scan: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: 1 for the class token, else 0."""
    has_cls = self.pool == "cls" if self.class_token is None else self.class_token
    return 1 if has_cls else 0

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid (rows, cols) at `image_size`."""
    return patch_grid(self.image_size, self.patch_size)

  def _check(self, x, any_size: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool={self.pool!r}; choose from {POOLS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"ViT posemb={self.posemb!r}; choose from {POSEMBS}")
    if self.fc_norm and self.pool != "gap":
      raise ValueError(f"ViT fc_norm=True needs pool='gap', got pool={self.pool!r}")
    if self.pool == "cls" and self.class_token is False:
      raise ValueError("ViT pool='cls' needs the class token; class_token=False contradicts it")
    check_impl(self.attention_impl)
    if self.depth < 1 or self.width % self.num_heads:
      raise ValueError(f"ViT depth={self.depth}, width={self.width}, num_heads={self.num_heads}: "
                       "need depth >= 1 and width divisible by num_heads")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"ViT drop_path={self.drop_path} must be in [0, 1)")
    if x.ndim != 4:
      raise ValueError(f"ViT expects NHWC input, got shape {tuple(x.shape)}")
    if not any_size and tuple(x.shape[1:3]) != to_pair(self.image_size):
      raise ValueError(f"ViT built for image_size={self.image_size} got input of shape "
                       f"{tuple(x.shape)} (want NHWC); build it at that size and "
                       "load weights with load_at_image_size")

  @nn.compact
  def __call__(self, x, *, train: bool = False, tokens: bool = False):
    """Logits (B, num_classes), or the pooled (B, width) features when num_classes is 0.

    `tokens=True` returns every token instead, (B, prefix + rows * cols, width) with the class
    token first, after the final `norm` (none with fc_norm), and creates no pooling or head. It
    takes inputs of any size that the patches tile: the learned position embedding (kept at
    `image_size`'s grid) is resampled bilinearly to the input's grid, as dense-prediction models
    (Segmenter) do.
    """
    self._check(x, any_size=tokens)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, prefix = self.width, self.num_prefix_tokens
    grid = patch_grid(x.shape[1:3], self.patch_size)
    x = PatchEmbed(d, self.patch_size, name="patch_embed", **kw)(x.astype(self.dtype))
    if prefix:
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, d)), x], 1)
    if self.posemb == "learn":
      rows, cols = self.grid
      pe = self.param("pos_embed", nn.initializers.normal(0.02), (1, prefix + rows * cols, d),
                      self.param_dtype)
      pe = resample_posemb(pe, grid, num_prefix_tokens=prefix, old_grid=self.grid)
    else:
      pe = jnp.asarray(fixed_posemb(self.posemb, grid, d, prefix))
    x = x + pe.astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    self.sow("intermediates", "embedded", x)

    x = self._encode(x, train)
    if not self.fc_norm:
      x = nn.LayerNorm(epsilon=self.ln_epsilon, name="norm", **kw)(x)
    self.sow("intermediates", "encoded", x)
    if tokens:
      return x
    if self.pool == "cls":
      x = x[:, 0]
    elif self.pool == "gap":
      x = jnp.mean(x[:, prefix:], axis=1)
      if self.fc_norm:
        x = nn.LayerNorm(epsilon=self.ln_epsilon, name="fc_norm", **kw)(x)
    else:
      x = AttentionPool(self.num_heads, self._mlp_dim, attention_impl=self.attention_impl,
                        name="attn_pool", **kw)(x, train=train)
    self.sow("intermediates", "pre_logits", x)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.02), name="head",
                    **kw)(x)

  @property
  def _mlp_dim(self) -> int:
    return self.mlp_dim or 4 * self.width

  def _encode(self, x, train: bool):
    block = dict(
        num_heads=self.num_heads, mlp_dim=self._mlp_dim, dropout=self.dropout,
        attention_dropout=self.attention_dropout, layer_scale=self.layer_scale,
        qkv_bias=self.qkv_bias, ln_epsilon=self.ln_epsilon, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype,
    )
    # Stochastic depth grows linearly with depth (DeiT / timm): early blocks are rarely dropped.
    rates = np.linspace(0.0, self.drop_path, self.depth)

    if self.scan:
      # Without stochastic depth the per-layer rate is left out, so no 'dropout' rng is needed.
      per_layer = bool(self.drop_path)

      def body(mdl, carry, rate):
        return mdl(carry, rate if per_layer else None, train=train), None

      if self.remat:
        body = nn.remat(body, prevent_cse=False)  # scan already keeps XLA from merging layers
      body = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True, "dropout": True}, length=self.depth)
      x, _ = body(EncoderBlock(name="blocks", **block), x, jnp.asarray(rates, jnp.float32))
      return x

    def call(mdl, y):
      return mdl(y, train=train)

    if self.remat:
      call = nn.remat(call)
    for i in range(self.depth):
      x = call(EncoderBlock(drop_path=float(rates[i]), name=f"blocks_{i}", **block), x)
    return x


# --- Parameter layouts and resolution change ----------------------------------------------------


def stack_blocks(params: dict) -> dict:
  """Loop layout (`blocks_0` ... `blocks_{L-1}`) -> scan layout (`blocks` with a depth axis)."""
  names = sorted((k for k in params if _BLOCK.match(k)), key=lambda k: int(k.split("_")[1]))
  if not names:
    raise ValueError("stack_blocks: no 'blocks_{i}' entries; are these params already stacked?")
  if [int(k.split("_")[1]) for k in names] != list(range(len(names))):
    raise ValueError(f"stack_blocks: block indices are not 0..L-1: {names}")
  out = {k: v for k, v in params.items() if not _BLOCK.match(k)}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
  return out


def unstack_blocks(params: dict) -> dict:
  """Scan layout (`blocks` with a leading depth axis) -> loop layout (`blocks_{i}`)."""
  if "blocks" not in params:
    raise ValueError("unstack_blocks: no 'blocks' entry; are these params already unstacked?")
  depth = jax.tree.leaves(params["blocks"])[0].shape[0]
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out


def load_at_image_size(params: dict, model: VisionTransformer, method: str = "bilinear") -> dict:
  """`params` trained at another image size, with `pos_embed` resampled to `model`'s patch grid
  (class token kept); unchanged when the grids already match or the embedding is fixed."""
  if "pos_embed" not in params:
    return params
  new = resample_posemb(params["pos_embed"], model.grid, method=method,
                        num_prefix_tokens=model.num_prefix_tokens)
  return {**params, "pos_embed": new}


def attention_maps(intermediates: dict) -> list[jax.Array]:
  """Per-block attention weights (B, heads, N, N) sown by the explicit attention path, in depth
  order, from the 'intermediates' collection (loop or scan layout)."""
  if "blocks" in intermediates:
    stacked = intermediates["blocks"]["attn"]["attend"]["attention_weights"][0]
    return list(stacked)
  names = sorted((k for k in intermediates if _BLOCK.match(k)), key=lambda k: int(k.split("_")[1]))
  maps = [intermediates[k]["attn"]["attend"].get("attention_weights") for k in names
          if "attend" in intermediates[k].get("attn", {})]
  if not maps or any(m is None for m in maps):
    raise ValueError("no attention weights sown: use attention_impl='explicit' and "
                     "apply(..., mutable=['intermediates'])")
  return [m[0] for m in maps]


# --- Registered variants --------------------------------------------------------------------------


def vit(size: str, patch_size: int, /, **kwargs) -> VisionTransformer:
  """A ViT of `size` (a SIZES key) and `patch_size`; keyword arguments override anything."""
  if size not in SIZES:
    raise ValueError(f"ViT size {size!r}; choose from {sorted(SIZES)}")
  width, depth, heads, mlp_dim = SIZES[size]
  defaults = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                  patch_size=patch_size)
  return VisionTransformer(**{**defaults, **kwargs})


_PAPER = "Dosovitskiy et al. 2021, An image is worth 16x16 words"


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_ti16(**kwargs) -> VisionTransformer:
  """ViT-Ti/16: width 192, 12 blocks, 3 heads (DeiT-Ti)."""
  return vit("Ti", 16, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_s16(**kwargs) -> VisionTransformer:
  """ViT-S/16: width 384, 12 blocks, 6 heads (DeiT-S)."""
  return vit("S", 16, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_s8(**kwargs) -> VisionTransformer:
  """ViT-S/8: ViT-S with 8-pixel patches (784 tokens at 224 px)."""
  return vit("S", 8, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_b16(**kwargs) -> VisionTransformer:
  """ViT-B/16: width 768, 12 blocks, 12 heads."""
  return vit("B", 16, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_b32(**kwargs) -> VisionTransformer:
  """ViT-B/32: ViT-B with 32-pixel patches."""
  return vit("B", 32, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_b8(**kwargs) -> VisionTransformer:
  """ViT-B/8: ViT-B with 8-pixel patches."""
  return vit("B", 8, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_l16(**kwargs) -> VisionTransformer:
  """ViT-L/16: width 1024, 24 blocks, 16 heads."""
  return vit("L", 16, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_l32(**kwargs) -> VisionTransformer:
  """ViT-L/32: ViT-L with 32-pixel patches."""
  return vit("L", 32, **kwargs)


@register_model(input_shape=(224, 224, 3), num_classes=1000, paper=_PAPER)
def vit_h14(**kwargs) -> VisionTransformer:
  """ViT-H/14: width 1280, 32 blocks, 16 heads, 14-pixel patches."""
  return vit("H", 14, **kwargs)


@register_model(input_shape=(32, 32, 3), num_classes=10, paper=_PAPER)
def vit_tiny(**kwargs) -> VisionTransformer:
  """Test-size ViT (not ViT-Ti): 32 px, 8-pixel patches, width 32, 2 blocks, 2 heads."""
  defaults = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
  return VisionTransformer(**{**defaults, **kwargs})
