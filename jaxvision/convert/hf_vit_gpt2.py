"""Hugging Face `VisionEncoderDecoderModel` (ViTModel + GPT2LMHeadModel with cross-attention)
state dicts <-> jaxvision `vit_gpt2*` variables, on plain numpy arrays (no torch import).

Two key layouts are read (and written, `to_hf(..., layout=)`):
  'checkpoint'   the files on the Hub (e.g. nlpconnect/vit-gpt2-image-captioning) and the state
                 dicts of transformers < 5: `encoder.encoder.layer.N.attention.attention.query`,
                 `....attention.output.dense`, `....intermediate.dense`, `....output.dense`;
                 transformers >= 5 renames them when it loads such a file.
  'transformers5' the module names of transformers >= 5: `encoder.layers.N.attention.q_proj`,
                 `....attention.o_proj`, `....mlp.fc1`, `....mlp.fc2`.
The rest is shared: `encoder.embeddings.{cls_token, position_embeddings,
patch_embeddings.projection}`, `encoder.layernorm`, `encoder.pooler.dense`, `enc_to_dec_proj`,
`decoder.transformer.{wte, wpe, h.N.*, ln_f}` and `decoder.lm_head` (tied to `wte`).

Per leaf: torch Linear weights are transposed; GPT-2's Conv1D weights are already (in, out);
the patch convolution goes OIHW <-> HWIO; the ViT's separate query/key/value are our fused
`qkv` (concatenated along the output axis, each laid out (heads, head_dim) on both sides).

Shape-changing options are read from the weights (vocab_size, max_positions, image_size); the
head counts, which weights cannot tell, come from the variant or `**model_kwargs` (see
`config_kwargs` for a Hugging Face config.json).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.convert.timm_vit import flatten, to_numpy, unflatten
from jaxvision.models import create_model

Path = tuple[str, ...]
LAYOUTS = ("checkpoint", "transformers5")
_BLOCK = re.compile(r"^blocks_(\d+)$")
_H = re.compile(r"^h_(\d+)$")
_LN = {"scale": "weight", "bias": "bias"}
# Our ViT block names -> the two Hugging Face layouts (None: the fused qkv, three keys).
_VIT_BLOCK = {
    "checkpoint": {"norm1": "layernorm_before", "norm2": "layernorm_after",
                   "attn/proj": "attention.output.dense", "mlp/fc1": "intermediate.dense",
                   "mlp/fc2": "output.dense",
                   "qkv": ("attention.attention.query", "attention.attention.key",
                           "attention.attention.value")},
    "transformers5": {"norm1": "layernorm_before", "norm2": "layernorm_after",
                      "attn/proj": "attention.o_proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
                      "qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj")},
}
_VIT_LAYER_PREFIX = {"checkpoint": "encoder.encoder.layer.", "transformers5": "encoder.layers."}


def hf_keys(path: Path, layout: str = "checkpoint") -> tuple[tuple[str, ...], str]:
  """(Hugging Face keys, kind) of one jaxvision parameter path; kind says how the values map:
  'plain' (as is), 'linear' (transposed), 'conv' (OIHW), 'qkv' (three transposed Linears),
  'qkv_bias' (three biases)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; choose from {LAYOUTS}")
  top, leaf = path[0], path[-1]
  if top == "encoder":
    return _vit_keys(path[1:], layout)
  if top in ("encoder_pooler", "enc_to_dec_proj"):
    name = "encoder.pooler.dense" if top == "encoder_pooler" else "enc_to_dec_proj"
    return (f"{name}.{'weight' if leaf == 'kernel' else leaf}",), (
        "linear" if leaf == "kernel" else "plain")
  if top == "decoder":
    return _gpt2_keys(path[1:]), "plain"
  raise ValueError(f"no Hugging Face key for parameter {'/'.join(path)}")


def _vit_keys(path: Path, layout: str) -> tuple[tuple[str, ...], str]:
  leaf = path[-1]
  if path == ("cls_token",):
    return ("encoder.embeddings.cls_token",), "plain"
  if path == ("pos_embed",):
    return ("encoder.embeddings.position_embeddings",), "plain"
  if path[0] == "patch_embed":
    kind = "conv" if leaf == "kernel" else "plain"
    return (f"encoder.embeddings.patch_embeddings.projection.{_weight(leaf)}",), kind
  if path[0] == "norm":
    return (f"encoder.layernorm.{_LN[leaf]}",), "plain"
  match = _BLOCK.match(path[0])
  if not match:
    raise ValueError(f"no Hugging Face key for parameter encoder/{'/'.join(path)}")
  names = _VIT_BLOCK[layout]
  prefix = f"{_VIT_LAYER_PREFIX[layout]}{match[1]}."
  inner = "/".join(path[1:-1])
  if inner == "attn/qkv":
    keys = tuple(f"{prefix}{k}.{_weight(leaf)}" for k in names["qkv"])
    return keys, "qkv" if leaf == "kernel" else "qkv_bias"
  if inner in ("norm1", "norm2"):
    return (f"{prefix}{names[inner]}.{_LN[leaf]}",), "plain"
  if inner in names:
    return (f"{prefix}{names[inner]}.{_weight(leaf)}",), "linear" if leaf == "kernel" else "plain"
  raise ValueError(f"no Hugging Face key for parameter encoder/{'/'.join(path)}")


def _weight(leaf: str) -> str:
  return "weight" if leaf in ("kernel", "scale", "embedding") else leaf


def _gpt2_keys(path: Path) -> tuple[str, ...]:
  parts = ["decoder.transformer"]
  for part in path[:-1]:
    match = _H.match(part)
    parts.extend(["h", match[1]] if match else [part])
  parts.append(_weight(path[-1]))
  return (".".join(parts),)


def _to_hf_values(kind: str, value: np.ndarray) -> list[np.ndarray]:
  if kind == "linear":
    return [value.T]
  if kind == "conv":
    return [np.transpose(value, (3, 2, 0, 1))]
  if kind == "qkv":
    return [part.T for part in np.split(value, 3, axis=1)]
  if kind == "qkv_bias":
    return list(np.split(value, 3))
  return [value]


def _from_hf_values(kind: str, values: list[np.ndarray]) -> np.ndarray:
  if kind == "linear":
    return values[0].T
  if kind == "conv":
    return np.transpose(values[0], (2, 3, 1, 0))
  if kind == "qkv":
    return np.concatenate([v.T for v in values], axis=1)
  if kind == "qkv_bias":
    return np.concatenate(values)
  return values[0]


def detect_layout(state_dict: dict) -> str:
  """'checkpoint' or 'transformers5', from the ViT layer key names."""
  if any(k.startswith("encoder.encoder.layer.") for k in state_dict):
    return "checkpoint"
  if any(k.startswith("encoder.layers.") for k in state_dict):
    return "transformers5"
  raise ValueError("not a ViT + GPT-2 VisionEncoderDecoderModel state dict: no "
                   "'encoder.encoder.layer.*' nor 'encoder.layers.*' keys")


def expected_params(model) -> dict[Path, tuple[int, ...]]:
  """The parameter shapes of a VitGpt2 `model`, from `jax.eval_shape` (no compute)."""
  size = model.image_size
  h, w = (size, size) if isinstance(size, int) else size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)
  return {p: tuple(s.shape) for p, s in flatten(shapes["params"]).items()}


def _infer_kwargs(sd: dict[str, np.ndarray], model_kwargs: dict) -> dict:
  kwargs = dict(model_kwargs)
  wte, wpe = sd.get("decoder.transformer.wte.weight"), sd.get("decoder.transformer.wpe.weight")
  if wte is not None:
    kwargs.setdefault("vocab_size", int(wte.shape[0]))
  if wpe is not None:
    kwargs.setdefault("max_positions", int(wpe.shape[0]))
  proj = sd.get("encoder.embeddings.patch_embeddings.projection.weight")
  pos = sd.get("encoder.embeddings.position_embeddings")
  if proj is not None and pos is not None and "image_size" not in kwargs:
    patch = int(proj.shape[-1])
    side = math.isqrt(pos.shape[1] - 1)
    if side * side == pos.shape[1] - 1:
      kwargs["image_size"] = side * patch
  kwargs.setdefault("pooler", "encoder.pooler.dense.weight" in sd)
  return kwargs


def config_kwargs(hf_config: dict) -> dict:
  """jaxvision VitGpt2 kwargs from a Hugging Face VisionEncoderDecoder config.json (as a dict)."""
  try:
    enc, dec = hf_config["encoder"], hf_config["decoder"]
    return dict(
        image_size=int(enc["image_size"]), patch_size=int(enc["patch_size"]),
        encoder_size=(enc["hidden_size"], enc["num_hidden_layers"], enc["num_attention_heads"],
                      enc["intermediate_size"]),
        encoder_ln_epsilon=float(enc.get("layer_norm_eps", 1e-12)),
        decoder_size=(dec["n_embd"], dec["n_layer"], dec["n_head"],
                      dec.get("n_inner") or 4 * dec["n_embd"]),
        vocab_size=int(dec["vocab_size"]), max_positions=int(dec["n_positions"]),
    )
  except KeyError as e:
    raise ValueError(f"Hugging Face config has no {e} (want a VisionEncoderDecoder config of "
                     "ViT + GPT-2)") from None


def from_hf(name: str, state_dict: dict[str, Any], **model_kwargs) -> dict:
  """A Hugging Face ViT + GPT-2 state dict (either layout) -> {'params': ...} of jaxvision
  variant `name`, with a strict check: one ValueError names every missing, unexpected and
  wrongly shaped key."""
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  layout = detect_layout(sd)
  model = create_model(name, **_infer_kwargs(sd, model_kwargs))
  used: set[str] = set()
  flat, missing, wrong = {}, [], []
  for path, shape in expected_params(model).items():
    keys, kind = hf_keys(path, layout)
    if any(k not in sd for k in keys):
      missing.extend(k for k in keys if k not in sd)
      continue
    used.update(keys)
    value = _from_hf_values(kind, [sd[k] for k in keys])
    if tuple(value.shape) != shape:
      wrong.append(f"{'/'.join(path)} {tuple(value.shape)} != {shape}")
    flat[path] = value
  head = sd.get("decoder.lm_head.weight")
  if head is not None:
    used.add("decoder.lm_head.weight")
    wte = sd.get("decoder.transformer.wte.weight")
    if wte is None or head.shape != wte.shape or not np.array_equal(head, wte):
      wrong.append("decoder.lm_head.weight is not tied to decoder.transformer.wte.weight")
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or wrong:
    raise ValueError(f"Hugging Face state dict for {name} does not match the model: missing "
                     f"{missing}, unexpected {unexpected}, wrong {wrong}")
  return {"params": unflatten(flat)}


def to_hf(name: str, variables: dict, layout: str = "checkpoint") -> dict[str, np.ndarray]:
  """jaxvision VitGpt2 variables (or params) -> a Hugging Face state dict of numpy arrays, with
  the tied `decoder.lm_head.weight` included (so `load_state_dict(strict=True)` accepts it)."""
  del name  # the parameter names carry everything; kept for the dispatcher's signature
  params = variables.get("params", variables)
  out: dict[str, np.ndarray] = {}
  for path, value in flatten(params).items():
    keys, kind = hf_keys(path, layout)
    for key, v in zip(keys, _to_hf_values(kind, np.asarray(value)), strict=True):
      out[key] = np.ascontiguousarray(v)
  out["decoder.lm_head.weight"] = out["decoder.transformer.wte.weight"]
  return out


def hf_shapes(model, layout: str = "checkpoint") -> dict[str, tuple[int, ...]]:
  """{key: shape} of the state dict `to_hf` writes for `model`, without making any weights."""
  out = {}
  for path, shape in expected_params(model).items():
    keys, kind = hf_keys(path, layout)
    # Zero-stride views: the layout changes run on shapes alone, whatever the model's size.
    views = _to_hf_values(kind, np.broadcast_to(np.zeros((), np.float32), shape))
    out.update({k: tuple(v.shape) for k, v in zip(keys, views, strict=True)})
  out["decoder.lm_head.weight"] = out["decoder.transformer.wte.weight"]
  return out


# The dispatcher in jaxvision.convert calls every family's converter by these names.
from_torch = from_hf
to_torch = to_hf
