"""The official Google ViT `.npz` checkpoints -> jaxvision ViT params, on plain numpy arrays.

    params = from_vit_npz('vit_b16', np.load('ViT-B_16.npz'))['params']

Two namings are read:
  * vit_jax (the paper's release, AugReg): `Transformer/encoderblock_{i}/LayerNorm_0`,
    `MultiHeadDotProductAttention_1/{query,key,value,out}`, `LayerNorm_2`, `MlpBlock_3/Dense_{0,1}`,
    `Transformer/posembed_input/pos_embedding`, `Transformer/encoder_norm`, `embedding`, `cls`,
    `head`;
  * big_vision: the same with `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, a
    top-level `pos_embedding`, `MAPHead_0/...` for attention pooling, and scanned checkpoints whose
    single `Transformer/encoderblock/...` carries a leading depth axis. A `params/` prefix is
    dropped.
Separate q/k/v kernels (D, heads, head_dim) are fused into jaxvision's (D, 3D) `qkv`. `num_classes`
(head), the pooling ('cls' when `cls` exists, 'map' with `MAPHead_0`, else 'gap') and `image_size`
(the position embedding's grid) are read from the checkpoint unless given. Checkpoints without a
learned position embedding, or with a `pre_logits` layer, are rejected by the strict key check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxvision.convert.timm_vit import Path, assemble, grid_image_size
from jaxvision.models import create_model
from jaxvision.models.vit import VisionTransformer

_BLOCK = re.compile(r"^blocks_(\d+)$")
# jaxvision block part -> (vit_jax module, big_vision module)
_BLOCK_MODULES = {"norm1": ("LayerNorm_0", "LayerNorm_0"),
                  "attn": ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
                  "norm2": ("LayerNorm_2", "LayerNorm_1"),
                  "mlp": ("MlpBlock_3", "MlpBlock_0")}


def _posemb_key(npz: Mapping[str, np.ndarray]) -> str | None:
  for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
    if key in npz:
      return key
  return None


def _split_heads_kernel(k: np.ndarray) -> np.ndarray:
  return k.reshape(k.shape[0], -1)  # (D, heads, head_dim) -> (D, heads * head_dim)


class _Reader:
  """Reads npz entries by jaxvision path, remembering which keys were used."""

  def __init__(self, npz: Mapping[str, np.ndarray]):
    self.npz = {k.removeprefix("params/"): np.asarray(v) for k, v in npz.items()}
    self.used: set[str] = set()
    self.vit_jax = any("MultiHeadDotProductAttention_1" in k for k in self.npz)
    self.scanned = any(k.startswith("Transformer/encoderblock/") for k in self.npz)

  def get(self, key: str, layer: int | None = None) -> np.ndarray | None:
    if key not in self.npz:
      return None
    self.used.add(key)
    value = self.npz[key]
    return value[layer] if layer is not None else value

  def many(self, keys: list[str], layer: int | None, join) -> np.ndarray | None:
    values = [self.get(k, layer) for k in keys]
    return None if any(v is None for v in values) else join(values)

  def attention(self, prefix: str, part: str, leaf: str, layer: int | None) -> np.ndarray | None:
    """Fused/renamed projections of a MultiHeadDotProductAttention module."""
    names = {"qkv": ["query", "key", "value"], "q": ["query"], "kv": ["key", "value"],
             "proj": ["out"]}[part]
    keys = [f"{prefix}/{n}/{leaf}" for n in names]
    if part == "proj":
      reshape = (lambda v: v.reshape(-1, v.shape[-1])) if leaf == "kernel" else (lambda v: v)
      return self.many(keys, layer, lambda vs: reshape(vs[0]))
    if leaf == "kernel":
      return self.many(keys, layer,
                       lambda vs: np.concatenate([_split_heads_kernel(v) for v in vs], 1))
    return self.many(keys, layer, lambda vs: np.concatenate([v.reshape(-1) for v in vs]))

  def source(self, path: Path) -> np.ndarray | None:
    """The array for jaxvision parameter `path`, or None when the checkpoint lacks it."""
    top, leaf = path[0], path[-1]
    if path == ("cls_token",):
      return self.get("cls")
    if path == ("pos_embed",):
      key = _posemb_key(self.npz)
      return None if key is None else self.get(key)
    if top == "patch_embed":
      return self.get(f"embedding/{leaf}")
    if top in ("norm", "head"):
      return self.get(f"Transformer/encoder_norm/{leaf}" if top == "norm" else f"head/{leaf}")
    m = _BLOCK.match(top)
    if m:
      layer = int(m[1])
      block, index = (("Transformer/encoderblock", layer) if self.scanned
                      else (f"Transformer/encoderblock_{layer}", None))
      module = f"{block}/{_BLOCK_MODULES[path[1]][0 if self.vit_jax else 1]}"
      return self._module(module, path[1:], index)
    if top == "attn_pool":
      if path[1] == "latent":
        return self.get("MAPHead_0/probe")
      module = {"norm": "MAPHead_0/LayerNorm_0", "mlp": "MAPHead_0/MlpBlock_0"}.get(
          path[1], "MAPHead_0/MultiHeadDotProductAttention_0")
      return self._module(module, path[1:], None)
    return None

  def _module(self, module: str, rest: Path, layer: int | None) -> np.ndarray | None:
    part, leaf = rest[0], rest[-1]
    if part in ("norm1", "norm2", "norm"):
      return self.get(f"{module}/{leaf}", layer)
    if part == "mlp":
      dense = {"fc1": "Dense_0", "fc2": "Dense_1"}[rest[1]]
      return self.get(f"{module}/{dense}/{leaf}", layer)
    if part == "attn":
      return self.attention(module, rest[1], leaf, layer)
    return self.attention(module, part, leaf, layer)  # attn_pool's q / kv / proj


def _infer_kwargs(reader: _Reader, model_kwargs: dict) -> dict:
  npz, kwargs = reader.npz, dict(model_kwargs)
  kwargs.setdefault("num_classes", npz["head/kernel"].shape[-1] if "head/kernel" in npz else 0)
  pool = "map" if any(k.startswith("MAPHead_0/") for k in npz) else "cls" if "cls" in npz else "gap"
  kwargs.setdefault("pool", pool)
  key = _posemb_key(npz)
  if key is not None and "image_size" not in kwargs and "embedding/kernel" in npz:
    prefix = 1 if kwargs["pool"] == "cls" else 0
    kwargs["image_size"] = grid_image_size(npz[key].shape[1] - prefix,
                                           npz["embedding/kernel"].shape[0])
  return kwargs


def from_vit_npz(
    name_or_model: str | VisionTransformer, npz: Mapping[str, Any], **model_kwargs
) -> dict:
  """An official ViT `.npz` (vit_jax or big_vision naming) -> {'params': ...} for a registry name
  or a built model; the position embedding is resampled when the model's grid differs."""
  reader = _Reader(npz)
  if isinstance(name_or_model, VisionTransformer):
    if model_kwargs:
      raise ValueError(f"from_vit_npz: model_kwargs {sorted(model_kwargs)} given with a built "
                       "model; put them in the model")
    model, what = name_or_model, "ViT .npz checkpoint"
  else:
    model = create_model(name_or_model, **_infer_kwargs(reader, model_kwargs))
    what = f"ViT .npz checkpoint for {name_or_model}"
  params = assemble(model, reader.source, lambda: sorted(set(reader.npz) - reader.used), what)
  return {"params": params}


__all__ = ["from_vit_npz"]
