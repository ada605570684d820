"""Segmenter (Strudel, Garcia, Laptev & Schmid, 2021): semantic segmentation with a ViT.

A Vision Transformer encodes the image into patch tokens (the class token rides along through
the encoder and is dropped after it); a decoder turns the patch tokens into per-patch class
scores, bilinearly upsampled to the input size. Two decoders, as in the paper:

  * 'linear': one linear layer, patch token -> K class logits.
  * 'mask' (the mask transformer): patch tokens projected to the decoder width, K learned class
    embeddings appended, a few pre-norm transformer layers (2 in the paper) over patches and
    classes together, a LayerNorm; patches and classes projected (`proj_patch`, `proj_classes`)
    and L2-normalised; the masks are their scalar products (patches x classes), LayerNorm-ed over
    the classes ("mask norm").

Parameter layout. The encoder's parameters sit at the top level under the ViT's own names
(`patch_embed`, `cls_token`, `pos_embed`, `blocks_{i}` or `blocks`, `norm`), the decoder's under
`decoder/` with the official code's names (`head`; `proj_dec`, `cls_emb`, `blocks_{i}`,
`decoder_norm`, `proj_patch`, `proj_classes`, `mask_norm`). So ViT weights load by path:
`config.init_from=<a ViT run or .npz>` (train.transfer) fills the encoder, resamples its position
embedding to this model's grid, reports the ViT's `head` as unused and leaves the decoder as
initialised; in code, `segmenter_from_vit` does the same with converted weights
(`jaxvision.convert.from_torch` / `from_vit_npz`).

Image sizes. The model is built for `image_size` (the training crop), which fixes the learned
position embedding. By default any other input is padded at the bottom/right to a multiple of
the patch size and the position embedding is resampled bilinearly to its grid, as the official
model does on every call. The official evaluation instead slides windows of the training crop's
size over larger images, so that every window has the geometry the model was trained on; here
`predict_sliding` does that on the host (overlap-tile inference,
`jaxvision.segmentation.predict_tiled`), and `eval_margin=m` makes the model itself do it in
eval mode for inputs larger than `image_size`, which is what the trainer's evaluation of whole
images then runs.

Where this follows the official code (rstrudel/segmenter) and where not: decoder width = encoder
width, decoder heads = the encoder's (the official width // 64 is the same for Ti, S, B and L),
MLP 4x; `proj_dec` and the linear head drawn from N(0, 0.02) with zero bias (torch's
`trunc_normal_(std=0.02)` cuts at +-2 absolute, i.e. +-100 std: a plain normal); `cls_emb` from
N(0, 0.02); `proj_patch` and `proj_classes` from `d_model ** -0.5 * N(0, 1)`; every decoder
LayerNorm with torch's epsilon 1e-5; the decoder's dropout (official 0.1) on the attention
weights, the attention projection and the MLP. Not followed: the decoder blocks are jaxvision's
`EncoderBlock`, whose kernels start Xavier-uniform like the encoder's, where the official blocks
draw them from N(0, 0.02).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.layers.embed import patch_grid, resample_posemb, to_pair
from jaxvision.layers.transformer import EncoderBlock
from jaxvision.models.registry import register_model
from jaxvision.models.vit import SIZES, VisionTransformer, stack_blocks, unstack_blocks
from jaxvision.segmentation.tiling import predict_tiled

DECODERS = ("linear", "mask")
TORCH_LN_EPSILON = 1e-5  # torch's LayerNorm default, which every official decoder norm uses
_NORMAL = nn.initializers.normal(0.02)


def upsample_logits(logits: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of [B, h, w, K] to [B, height, width, K] (half-pixel centres, no
  antialiasing: torch's F.interpolate(mode='bilinear') of the official code)."""
  b, _, _, k = logits.shape
  return jax.image.resize(logits, (b, height, width, k), method="bilinear", antialias=False)


class LinearDecoder(nn.Module):
  """Patch tokens -> class logits on the patch grid, by one linear layer.

  Attributes:
    num_classes: classes K.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid: tuple[int, int], *, train: bool = False):
    del train  # no dropout in the linear decoder
    logits = nn.Dense(self.num_classes, kernel_init=_NORMAL, name="head", dtype=self.dtype,
                      param_dtype=self.param_dtype)(tokens)
    return logits.reshape((tokens.shape[0], *grid, self.num_classes))


def _l2_normalize(x: jax.Array) -> jax.Array:
  # In float32: a bf16 sum of squares over the width loses the digits the cosine needs.
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + 1e-12)).astype(x.dtype)


class MaskTransformer(nn.Module):
  """The mask-transformer decoder: class embeddings decoded jointly with the patch tokens.

  Attributes:
    num_classes: classes K (one learned class embedding each).
    num_layers: transformer layers over patches and classes (the paper: 2).
    num_heads: attention heads of those layers.
    width: decoder width; None keeps the tokens' width (the official choice).
    mlp_dim: MLP hidden width; None gives 4 * width.
    dropout: dropout on attention weights, attention projection and MLP (train mode).
    drop_path: stochastic-depth rate of the last layer (linear from 0).
    attention_impl: 'fused' | 'xla' | 'cudnn' | 'explicit' (sows the attention weights).
    dtype: computation dtype.
    param_dtype: parameter dtype.

  Intermediates sown: 'masks', the patch x class cosine similarities [B, rows, cols, K] before
  the mask norm.

  With two classes the mask norm (a LayerNorm over the K values of a patch) leaves each patch
  +-s, s = |d| / sqrt(d^2 + eps) < 1 for half the difference d of its two similarities, before
  the affine: the logits are bounded by the norm's scale and bias, and s saturates at 1 once the
  similarities differ by more than a few sqrt(eps), passing little gradient back.
  """

  num_classes: int
  num_layers: int = 2
  num_heads: int = 12
  width: int | None = None
  mlp_dim: int | None = None
  dropout: float = 0.0
  drop_path: float = 0.0
  attention_impl: str = "fused"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid: tuple[int, int], *, train: bool = False):
    b, n, _ = tokens.shape
    d, k = self.width or tokens.shape[-1], self.num_classes
    if n != grid[0] * grid[1]:
      raise ValueError(f"MaskTransformer got {n} patch tokens for a {grid[0]}x{grid[1]} grid")
    if self.num_layers < 1 or d % self.num_heads:
      raise ValueError(f"MaskTransformer num_layers={self.num_layers}, width={d}, num_heads="
                       f"{self.num_heads}: need num_layers >= 1 and width divisible by num_heads")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(d, kernel_init=_NORMAL, name="proj_dec", **kw)(tokens)
    cls_emb = self.param("cls_emb", _NORMAL, (1, k, d), self.param_dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(cls_emb.astype(self.dtype), (b, k, d))], axis=1)
    rates = np.linspace(0.0, self.drop_path, self.num_layers)
    for i in range(self.num_layers):
      x = EncoderBlock(
          self.num_heads, self.mlp_dim or 4 * d, dropout=self.dropout,
          attention_dropout=self.dropout, drop_path=float(rates[i]), ln_epsilon=TORCH_LN_EPSILON,
          attention_impl=self.attention_impl, name=f"blocks_{i}", **kw,
      )(x, train=train)
    x = nn.LayerNorm(epsilon=TORCH_LN_EPSILON, name="decoder_norm", **kw)(x)
    patches, classes = x[:, :n], x[:, n:]
    scaled = nn.initializers.normal(d**-0.5)  # the official `scale * torch.randn(d, d)`
    proj_patch = self.param("proj_patch", scaled, (d, d), self.param_dtype)
    proj_classes = self.param("proj_classes", scaled, (d, d), self.param_dtype)
    patches = _l2_normalize(patches @ proj_patch.astype(self.dtype))
    classes = _l2_normalize(classes @ proj_classes.astype(self.dtype))
    masks = jnp.einsum("bnd,bkd->bnk", patches, classes)
    self.sow("intermediates", "masks", masks.reshape((b, *grid, k)))
    masks = nn.LayerNorm(epsilon=TORCH_LN_EPSILON, name="mask_norm", **kw)(masks)
    return masks.reshape((b, *grid, k))


class Segmenter(nn.Module):
  """ViT encoder + linear or mask-transformer decoder -> per-pixel logits [B, H, W, K].

  Attributes:
    num_classes: classes K.
    image_size: training input side (or (h, w)): fixes the learned position embedding's grid.
    patch_size: side of the square patches.
    width: encoder (and decoder) token width.
    depth: encoder blocks.
    num_heads: attention heads of the encoder and the mask decoder.
    mlp_dim: encoder MLP width; None gives 4 * width.
    decoder: 'linear' or 'mask'.
    decoder_layers: transformer layers of the mask decoder (the paper: 2).
    decoder_dropout: dropout in the mask decoder's layers (the official code: 0.1).
    decoder_drop_path: stochastic depth of the mask decoder's last layer (official: 0).
    dropout: encoder dropout (position embedding, attention projection, MLP).
    attention_dropout: encoder dropout on the attention weights.
    drop_path: encoder stochastic-depth rate of the last block (the official recipe: 0.1).
    eval_margin: None: inputs of another size than `image_size` resample the position embedding.
      An int m >= 0: in eval mode, inputs larger than `image_size` are predicted from windows
      of exactly `image_size` instead, overlap-tiles with m pixels of context on each side
      (the same numbers as `predict_sliding(margin=m)`, computed inside the jitted call).
    posemb: encoder position embedding, 'learn' | 'sincos2d' | 'sincos1d'.
    attention_impl: 'fused' | 'xla' | 'cudnn' | 'explicit', encoder and decoder.
    remat: recompute each encoder block's activations in the backward pass.
    scan: run the encoder blocks with nn.scan (stacked `blocks` parameters).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int = 150
  image_size: Any = 512
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  decoder: str = "linear"
  decoder_layers: int = 2
  decoder_dropout: float = 0.1
  decoder_drop_path: float = 0.0
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  eval_margin: int | None = None
  posemb: str = "learn"
  attention_impl: str = "fused"
  remat: bool = False
  scan: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid (rows, cols) at `image_size`."""
    return patch_grid(self.image_size, self.patch_size)

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in the encoder: the class token."""
    return 1

  def vit(self, **overrides) -> VisionTransformer:
    """The encoder as a stand-alone (unbound) ViT with this model's options."""
    kwargs = dict(
        num_classes=0, image_size=self.image_size, patch_size=self.patch_size, width=self.width,
        depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, pool="cls",
        posemb=self.posemb, dropout=self.dropout, attention_dropout=self.attention_dropout,
        drop_path=self.drop_path, attention_impl=self.attention_impl, remat=self.remat,
        scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype, parent=None,
    )
    return VisionTransformer(**{**kwargs, **overrides})

  def decoder_module(self, **overrides) -> nn.Module:
    """The decoder as a stand-alone (unbound) module with this model's options."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
    if self.decoder == "linear":
      return LinearDecoder(self.num_classes, **{**kw, **overrides})
    if self.decoder == "mask":
      kwargs = dict(num_layers=self.decoder_layers, num_heads=self.num_heads,
                    dropout=self.decoder_dropout, drop_path=self.decoder_drop_path,
                    attention_impl=self.attention_impl, **kw)
      return MaskTransformer(self.num_classes, **{**kwargs, **overrides})
    raise ValueError(f"Segmenter decoder={self.decoder!r}; choose from {DECODERS}")

  def _check(self, x):
    if self.decoder not in DECODERS:
      raise ValueError(f"Segmenter decoder={self.decoder!r}; choose from {DECODERS}")
    if self.num_classes < 1:
      raise ValueError(f"Segmenter num_classes={self.num_classes} must be >= 1")
    if x.ndim != 4:
      raise ValueError(f"Segmenter expects NHWC input, got shape {tuple(x.shape)}")
    self.grid  # noqa: B018 - a clear error when the patches do not tile image_size
    if self.eval_margin is not None and not 0 <= 2 * self.eval_margin < min(
        to_pair(self.image_size)):
      raise ValueError(f"Segmenter eval_margin={self.eval_margin} must leave a tile inside the "
                       f"image_size={self.image_size} window (0 <= 2 * margin < side)")

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    self._check(x)
    # The encoder shares this module's scope: its parameters keep the ViT's names at the top
    # level, so ViT checkpoints and init_from load into it by path.
    encoder = self.vit(parent=self, name="encoder")
    nn.share_scope(self, encoder)
    decoder = self.decoder_module(parent=self, name="decoder")

    def segment(x):
      h, w = x.shape[1:3]
      p = self.patch_size
      # As the official code: zeros at the bottom/right up to a multiple of the patch size,
      # cropped off the logits at the end.
      ph, pw = -h % p, -w % p
      if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
      tokens = encoder(x, train=train, tokens=True)[:, self.num_prefix_tokens:]
      masks = decoder(tokens, ((h + ph) // p, (w + pw) // p), train=train)
      return upsample_logits(masks, h + ph, w + pw)[:, :h, :w]

    wh, ww = to_pair(self.image_size)
    larger = x.shape[1] > wh or x.shape[2] > ww
    if train or self.eval_margin is None or not larger:
      return segment(x)
    return _overlap_tiles(segment, x, (wh, ww), self.eval_margin)


def _overlap_tiles(segment, x: jax.Array, window: tuple[int, int], margin: int) -> jax.Array:
  """`segment` over windows of `window` pixels: the image mirrored by `margin`, cut into tiles
  of window - 2 * margin, each tile the centre of its window's logits (jaxvision.segmentation.
  tiling.predict_tiled, in one batch of static slices)."""
  (wh, ww), m = window, margin
  th, tw = wh - 2 * m, ww - 2 * m
  b, h, w, c = x.shape
  ny, nx = -(-h // th), -(-w // tw)
  padded = jnp.pad(x, ((0, 0), (m, m + ny * th - h), (m, m + nx * tw - w), (0, 0)),
                   mode="reflect")
  windows = jnp.stack([padded[:, i * th:i * th + wh, j * tw:j * tw + ww]
                       for i in range(ny) for j in range(nx)], axis=1)
  logits = segment(windows.reshape((b * ny * nx, wh, ww, c)))[:, m:m + th, m:m + tw]
  logits = logits.reshape((b, ny, nx, th, tw, -1)).transpose((0, 1, 3, 2, 4, 5))
  return logits.reshape((b, ny * th, nx * tw, -1))[:, :h, :w]


# --- Weights from a ViT ---------------------------------------------------------------------------


def segmenter_from_vit(model: Segmenter, vit_params: dict, params: dict) -> dict:
  """`params` of `model` with the encoder replaced by a ViT's parameters (its `head` or
  `attn_pool` dropped, `pos_embed` resampled to the model's grid, block layout converted); the
  decoder stays as it is in `params`. `vit_params` may be the {'params': ...} variables that
  `jaxvision.convert.from_torch` / `from_vit_npz` return."""
  vit_params = dict(vit_params.get("params", vit_params))
  vit_params = {k: v for k, v in vit_params.items() if k not in ("head", "attn_pool")}
  if model.scan and "blocks" not in vit_params:
    vit_params = stack_blocks(vit_params)
  elif not model.scan and "blocks" in vit_params:
    vit_params = unstack_blocks(vit_params)
  if "pos_embed" in vit_params:
    vit_params["pos_embed"] = resample_posemb(jnp.asarray(vit_params["pos_embed"]), model.grid,
                                              num_prefix_tokens=model.num_prefix_tokens)
  encoder = {k: v for k, v in params.items() if k != "decoder"}
  if sorted(encoder) != sorted(vit_params):
    raise ValueError(f"segmenter_from_vit: the ViT has {sorted(vit_params)}, the encoder needs "
                     f"{sorted(encoder)}")
  mismatched = [
      f"{jax.tree_util.keystr(path)} {tuple(a.shape)} vs {tuple(b.shape)}"
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(encoder),
                              jax.tree.leaves(vit_params), strict=True)
      if tuple(a.shape) != tuple(np.shape(b))
  ]
  if jax.tree.structure(encoder) != jax.tree.structure(vit_params) or mismatched:
    raise ValueError("segmenter_from_vit: the ViT's parameters do not fit the encoder: "
                     + ("; ".join(mismatched[:4]) or "different tree structure"))
  loaded = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), encoder, vit_params)
  return {**loaded, "decoder": params["decoder"]}


# --- Sliding-window inference ---------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def jit_forward(model: nn.Module):
  """`(variables, images) -> logits` of `model` in eval mode under jax.jit; one per model, so
  every call with the same shapes reuses one compilation."""
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def predict_sliding(model: Segmenter, variables: dict, images, *, margin: int = 0,
                    batch_size: int = 8) -> np.ndarray:
  """Logits [H, W, K] (or [B, H, W, K]) of images of any size from windows of exactly
  `model.image_size`: overlap-tile inference (`jaxvision.segmentation.predict_tiled`).

  The image is mirrored at its borders by `margin` pixels and cut into tiles of
  image_size - 2 * margin; each tile's logits are the centre of the model's logits for the
  window that holds the tile and `margin` pixels of context on every side. With margin 0 the
  windows are plain non-overlapping crops. A model built with `eval_margin=margin` computes the
  same inside its own call (what the trainer's evaluation then uses).
  """

  wh, ww = to_pair(model.image_size)
  if not 0 <= 2 * margin < min(wh, ww):
    raise ValueError(f"predict_sliding margin={margin} must leave a tile inside the "
                     f"{wh}x{ww} window (0 <= 2 * margin < {min(wh, ww)})")
  apply_fn = functools.partial(jit_forward(model), variables)
  return predict_tiled(apply_fn, images, (wh - 2 * margin, ww - 2 * margin), margin,
                       batch_size=batch_size)


# --- Registered variants --------------------------------------------------------------------------


def segmenter(decoder: str, size: str, patch_size: int, /, **kwargs) -> Segmenter:
  """A Segmenter with a `decoder` ('linear' | 'mask') over ViT `size` (vit.SIZES) and
  `patch_size`; keyword arguments override anything."""
  if size not in SIZES:
    raise ValueError(f"Segmenter size {size!r}; choose from {sorted(SIZES)}")
  width, depth, heads, mlp_dim = SIZES[size]
  defaults = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                  patch_size=patch_size, decoder=decoder)
  return Segmenter(**{**defaults, **kwargs})


# The paper's main benchmark, ADE20K: 150 classes, 512x512 crops.
_PAPER = "Strudel et al. 2021, Segmenter: Transformer for Semantic Segmentation"
_ADE = dict(input_shape=(512, 512, 3), num_classes=150, paper=_PAPER)


@register_model(**_ADE)
def segmenter_linear_ti16(**kwargs) -> Segmenter:
  """Seg-T/16 with the linear decoder: ViT-Ti/16 encoder."""
  return segmenter("linear", "Ti", 16, **kwargs)


@register_model(**_ADE)
def segmenter_linear_ti8(**kwargs) -> Segmenter:
  """Seg-T/8 with the linear decoder: ViT-Ti with 8-pixel patches."""
  return segmenter("linear", "Ti", 8, **kwargs)


@register_model(**_ADE)
def segmenter_linear_s16(**kwargs) -> Segmenter:
  """Seg-S/16 with the linear decoder: ViT-S/16 encoder."""
  return segmenter("linear", "S", 16, **kwargs)


@register_model(**_ADE)
def segmenter_linear_s8(**kwargs) -> Segmenter:
  """Seg-S/8 with the linear decoder: ViT-S/8 encoder."""
  return segmenter("linear", "S", 8, **kwargs)


@register_model(**_ADE)
def segmenter_linear_b16(**kwargs) -> Segmenter:
  """Seg-B/16 with the linear decoder: ViT-B/16 encoder."""
  return segmenter("linear", "B", 16, **kwargs)


@register_model(**_ADE)
def segmenter_linear_b8(**kwargs) -> Segmenter:
  """Seg-B/8 with the linear decoder: ViT-B/8 encoder."""
  return segmenter("linear", "B", 8, **kwargs)


@register_model(**_ADE)
def segmenter_mask_ti16(**kwargs) -> Segmenter:
  """Seg-T/16 with the mask transformer (2 layers): ViT-Ti/16 encoder."""
  return segmenter("mask", "Ti", 16, **kwargs)


@register_model(**_ADE)
def segmenter_mask_ti8(**kwargs) -> Segmenter:
  """Seg-T/8 with the mask transformer: ViT-Ti with 8-pixel patches."""
  return segmenter("mask", "Ti", 8, **kwargs)


@register_model(**_ADE)
def segmenter_mask_s16(**kwargs) -> Segmenter:
  """Seg-S/16 with the mask transformer: ViT-S/16 encoder."""
  return segmenter("mask", "S", 16, **kwargs)


@register_model(**_ADE)
def segmenter_mask_s8(**kwargs) -> Segmenter:
  """Seg-S/8 with the mask transformer: ViT-S/8 encoder."""
  return segmenter("mask", "S", 8, **kwargs)


@register_model(**_ADE)
def segmenter_mask_b16(**kwargs) -> Segmenter:
  """Seg-B/16 with the mask transformer: ViT-B/16 encoder."""
  return segmenter("mask", "B", 16, **kwargs)


@register_model(**_ADE)
def segmenter_mask_b8(**kwargs) -> Segmenter:
  """Seg-B/8 with the mask transformer: ViT-B/8 encoder."""
  return segmenter("mask", "B", 8, **kwargs)


_TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)


@register_model(input_shape=(32, 32, 3), num_classes=3, paper=_PAPER)
def segmenter_linear_tiny(**kwargs) -> Segmenter:
  """Test-size Segmenter, linear decoder: 32 px, 8-pixel patches, width 32, 2 blocks."""
  return Segmenter(**{**_TINY, "decoder": "linear", **kwargs})


@register_model(input_shape=(32, 32, 3), num_classes=3, paper=_PAPER)
def segmenter_mask_tiny(**kwargs) -> Segmenter:
  """Test-size Segmenter, mask transformer with 2 layers: 32 px, 8-pixel patches, width 32."""
  return Segmenter(**{**_TINY, "decoder": "mask", **kwargs})
