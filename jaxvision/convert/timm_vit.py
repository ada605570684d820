"""timm `vit_*` state dicts <-> jaxvision ViT variables, on plain numpy arrays (no torch import).

jaxvision's ViT parameter names follow timm's, so the mapping is a rename plus a layout change
per kind of leaf:

  blocks_3/attn/qkv/kernel (D, 3D)      <->  blocks.3.attn.qkv.weight (3D, D)   (transposed)
  patch_embed/proj/kernel (p, p, C, D)  <->  patch_embed.proj.weight (D, C, p, p)
  */scale (LayerNorm)                   <->  *.weight
  cls_token, pos_embed, */bias, ls*/gamma, attn_pool/latent: unchanged

Both sides fuse q, k and v in one projection laid out (3, heads, head_dim), so no reordering.
Shape-changing options are read from the weights: `num_classes` (the head's rows; no head means
0), `image_size` (the learned `pos_embed`'s grid times the patch), the pooling (`fc_norm.*`,
`attn_pool.*` or no `cls_token`), layer-scale (`ls1.gamma`) and qkv bias; `**model_kwargs`
override them and set the others (scan, dtype, ...). timm's `class_token=True,
global_pool='avg'` without fc_norm cannot be told from the weights: pass pool='gap' (the Hub
loader reads it from the repo's config.json). Matching timm models:
  pool='cls': timm's default `vit_*` (global_pool='token', class_token=True)
  pool='gap': global_pool='avg', class_token=False, fc_norm=False (norm before the mean)
  pool='gap', fc_norm=True: global_pool='avg' with the norm after the mean (`fc_norm.*` keys);
    with `cls_token` in the weights, class_token=True (the mean leaves the class token out)
  pool='map': global_pool='map', class_token=False
Conversion of a `scan=True` model stacks the blocks (`jaxvision.models.vit.stack_blocks`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.models import create_model
from jaxvision.models.vit import VisionTransformer, load_at_image_size, stack_blocks, unstack_blocks

Path = tuple[str, ...]
_BLOCK = re.compile(r"^blocks_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight"}


def to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy/JAX array or a torch tensor (without importing torch)."""
  if hasattr(value, "detach"):  # torch.Tensor; float() first because numpy has no bfloat16
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def torch_key(path: Path) -> str:
  """Flax parameter path -> timm state-dict key, e.g. ('blocks_0','attn','qkv','kernel') ->
  'blocks.0.attn.qkv.weight'."""
  parts = []
  for part in path[:-1]:
    m = _BLOCK.match(part)
    parts.extend(["blocks", m[1]] if m else [part])
  parts.append(_LEAVES.get(path[-1], path[-1]))
  return ".".join(parts)


def _flax_leaf(path: Path, torch_value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and torch_value.ndim == 4:
    return np.transpose(torch_value, (2, 3, 1, 0))
  if path[-1] == "kernel" and torch_value.ndim == 2:
    return torch_value.T
  return torch_value


def _torch_leaf(path: Path, flax_value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and flax_value.ndim == 4:
    return np.transpose(flax_value, (3, 2, 0, 1))
  if path[-1] == "kernel" and flax_value.ndim == 2:
    return flax_value.T
  return flax_value


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(dict(v), (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def unflatten(flat: dict[Path, Any]) -> dict:
  """{path tuple: leaf} -> nested dict."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def expected_params(model: VisionTransformer) -> dict[Path, tuple[int, ...]]:
  """The loop-layout parameter shapes of `model`, from `jax.eval_shape` (no compute)."""
  model = model.clone(scan=False)
  h, w = model.grid
  x = jax.ShapeDtypeStruct((1, h * model.patch_size, w * model.patch_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  return {p: tuple(s.shape) for p, s in flatten(shapes).items()}


def grid_image_size(num_grid_tokens: int, patch_size: int) -> int:
  """Image side of a square patch grid of `num_grid_tokens`; ValueError when it is not square."""
  side = math.isqrt(num_grid_tokens)
  if side * side != num_grid_tokens:
    raise ValueError(f"position embedding has {num_grid_tokens} grid tokens, not a square grid; "
                     "pass image_size=(h, w)")
  return side * patch_size


def assemble(
    model: VisionTransformer,
    source: Callable[[Path], np.ndarray | None],
    unused: Callable[[], list[str]],
    what: str,
    key_name: Callable[[Path], str] = "/".join,
) -> dict:
  """Builds `model`'s params from `source(path)` (None when absent) with a strict check.

  Raises one ValueError that names every missing key (as `key_name(path)`), unexpected key
  (`unused()` after all paths were read) and shape mismatch (in jaxvision's layout). A learned
  `pos_embed` on another grid is resampled (bilinear).
  """
  expected = expected_params(model)
  flat, missing, wrong = {}, [], []
  for path, shape in expected.items():
    value = source(path)
    if value is None:
      missing.append(key_name(path))
      continue
    if path == ("pos_embed",) and value.shape != shape and value.shape[-1] == shape[-1]:
      value = np.asarray(load_at_image_size({"pos_embed": value}, model)["pos_embed"])
    if tuple(value.shape) != shape:
      wrong.append(f"{key_name(path)} {tuple(value.shape)} != {shape}")
    flat[path] = value
  unexpected = unused()
  if missing or unexpected or wrong:
    raise ValueError(f"{what} does not match the model: missing {missing}, unexpected "
                     f"{unexpected}, wrong shapes {wrong}")
  params = unflatten(flat)
  return stack_blocks(params) if model.scan else params


def infer_kwargs(state_dict: dict[str, np.ndarray], model_kwargs: dict) -> dict:
  """`model_kwargs` completed with what a timm state dict's keys and shapes imply: num_classes,
  image_size, the pooling (class token, mean with or without fc_norm, attention pool),
  layer-scale and qkv bias."""
  kwargs = dict(model_kwargs)
  kwargs.setdefault("num_classes", state_dict["head.weight"].shape[0] if "head.weight" in
                    state_dict else 0)
  if "fc_norm.weight" in state_dict:
    kwargs.setdefault("pool", "gap")
    kwargs.setdefault("fc_norm", True)
  elif "attn_pool.latent" in state_dict:
    kwargs.setdefault("pool", "map")
  elif "cls_token" not in state_dict:
    kwargs.setdefault("pool", "gap")
  if kwargs.get("pool") == "gap" and "cls_token" in state_dict:
    kwargs.setdefault("class_token", True)
  if "blocks.0.ls1.gamma" in state_dict:
    # Any value: it only initialises the layer-scale parameters that the weights replace.
    kwargs.setdefault("layer_scale", 1.0)
  if "blocks.0.attn.qkv.weight" in state_dict and "blocks.0.attn.qkv.bias" not in state_dict:
    kwargs.setdefault("qkv_bias", False)
  if "pos_embed" in state_dict and "image_size" not in kwargs:
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    prefix = 1 if "cls_token" in state_dict else 0
    kwargs["image_size"] = grid_image_size(state_dict["pos_embed"].shape[1] - prefix, patch)
  return kwargs


def from_torch(name: str, state_dict: dict[str, Any], **model_kwargs) -> dict:
  """A timm ViT state dict -> {'params': ...} of jaxvision variant `name` (strict key check)."""
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  model = create_model(name, **infer_kwargs(sd, model_kwargs))
  used: set[str] = set()

  def source(path: Path):
    key = torch_key(path)
    if key not in sd:
      return None
    used.add(key)
    return _flax_leaf(path, sd[key])

  params = assemble(model, source, lambda: sorted(set(sd) - used), f"timm state dict for {name}",
                    key_name=torch_key)
  return {"params": params}


def to_torch(name: str, variables: dict) -> dict[str, np.ndarray]:
  """jaxvision ViT variables or params (loop or scan layout) -> a timm state dict (numpy)."""
  del name  # the names carry everything; kept for the dispatcher's signature
  params = variables.get("params", variables)
  if "blocks" in params:
    params = unstack_blocks(params)
  return {torch_key(p): np.ascontiguousarray(_torch_leaf(p, np.asarray(v)))
          for p, v in flatten(params).items()}
