"""Hugging Face transformers `DetrForObjectDetection` state dicts (with transformers' own ResNet
backbone, `use_timm_backbone=False`) <-> jaxvision `detr*` variables, on plain numpy arrays.

Two key layouts are read (and written, `to_hf(..., layout=)`):
  'checkpoint'    the files on the Hub (facebook/detr-resnet-50 at revision 'no_timm') and the
                  state dicts of transformers < 5: `model.backbone.conv_encoder.model.*`,
                  `....self_attn.out_proj`, `model.encoder.layers.N.fc1`; transformers >= 5
                  renames them when it loads such a file.
  'transformers5' the module names of transformers >= 5: `model.backbone.model.*`,
                  `....self_attn.o_proj`, `model.encoder.layers.N.mlp.fc1`.

Per leaf: Linear weights are transposed, convolutions go OIHW <-> HWIO, the frozen BatchNorms'
`weight`, `bias`, `running_mean`, `running_var` buffers are our `batch_stats` `scale`, `bias`,
`mean`, `var` (a `num_batches_tracked` in a file is ignored). The sizes are read from the
weights (`infer_kwargs`); the attention heads, which weights cannot tell, come from the variant
or `**model_kwargs`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.convert.timm_vit import flatten, to_numpy, unflatten
from jaxvision.models import create_model

Path = tuple[str, ...]
LAYOUTS = ("checkpoint", "transformers5")
COLLECTIONS = ("params", "batch_stats")
_BACKBONE = {"checkpoint": "model.backbone.conv_encoder.model",
             "transformers5": "model.backbone.model"}
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_LN = {"scale": "weight", "bias": "bias"}
_STAGE_BLOCK = re.compile(r"^layer(\d)_(\d+)$")
_CONV = re.compile(r"^(conv|bn)(\d)$")
_LAYER = re.compile(r"^(encoder|decoder)_(\d+)$")
_BOX = re.compile(r"^box_head_(\d)$")
_ATTN = {"self_attn": "self_attn", "cross_attn": "encoder_attn"}
_NORMS = {"self_attn_norm": "self_attn_layer_norm", "cross_attn_norm": "encoder_attn_layer_norm",
          "final_norm": "final_layer_norm"}


def _linear(prefix: str, leaf: str) -> tuple[str, str]:
  return (f"{prefix}.weight", "linear") if leaf == "kernel" else (f"{prefix}.{leaf}", "plain")


def hf_key(path: Path, layout: str = "checkpoint") -> tuple[str, str]:
  """(Hugging Face key, kind) of one jaxvision variable path (params or batch_stats, without
  the collection); kind is 'plain', 'linear' (transposed) or 'conv' (OIHW)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; choose from {LAYOUTS}")
  top, leaf = path[0], path[-1]
  if top == "backbone":
    return _backbone_key(path[1:], layout)
  if path == ("query_embed",):
    return "model.query_position_embeddings.weight", "plain"
  if top == "input_proj":
    return ("model.input_projection.weight", "conv") if leaf == "kernel" else (
        f"model.input_projection.{leaf}", "plain")
  if top == "decoder_norm":
    return f"model.decoder.layernorm.{_LN[leaf]}", "plain"
  if top == "class_head":
    return _linear("class_labels_classifier", leaf)
  match = _BOX.match(top)
  if match and len(path) == 2:
    return _linear(f"bbox_predictor.layers.{match[1]}", leaf)
  match = _LAYER.match(top)
  if match and len(path) >= 3:
    prefix = f"model.{match[1]}.layers.{match[2]}"
    part = path[1]
    if part in _NORMS and len(path) == 3:
      return f"{prefix}.{_NORMS[part]}.{_LN[leaf]}", "plain"
    if part in ("fc1", "fc2") and len(path) == 3:
      mlp = "" if layout == "checkpoint" else "mlp."
      return _linear(f"{prefix}.{mlp}{part}", leaf)
    if part in _ATTN and len(path) == 4 and path[2] in ("q_proj", "k_proj", "v_proj", "o_proj"):
      proj = "out_proj" if path[2] == "o_proj" and layout == "checkpoint" else path[2]
      return _linear(f"{prefix}.{_ATTN[part]}.{proj}", leaf)
  raise ValueError(f"no Hugging Face key for variable {'/'.join(path)}")


def _backbone_key(path: Path, layout: str) -> tuple[str, str]:
  base, leaf = _BACKBONE[layout], path[-1]
  if path == ("conv1", "kernel"):
    return f"{base}.embedder.embedder.convolution.weight", "conv"
  if len(path) == 2 and path[0] == "bn1" and leaf in _BN:
    return f"{base}.embedder.embedder.normalization.{_BN[leaf]}", "plain"
  match = _STAGE_BLOCK.match(path[0]) if len(path) == 3 else None
  if match:
    block = f"{base}.encoder.stages.{int(match[1]) - 1}.layers.{match[2]}"
    part = path[1]
    if part == "downsample_conv" and leaf == "kernel":
      return f"{block}.shortcut.convolution.weight", "conv"
    if part == "downsample_bn" and leaf in _BN:
      return f"{block}.shortcut.normalization.{_BN[leaf]}", "plain"
    conv = _CONV.match(part)
    if conv and conv[1] == "conv" and leaf == "kernel":
      return f"{block}.layer.{int(conv[2]) - 1}.convolution.weight", "conv"
    if conv and conv[1] == "bn" and leaf in _BN:
      return f"{block}.layer.{int(conv[2]) - 1}.normalization.{_BN[leaf]}", "plain"
  raise ValueError(f"no Hugging Face key for variable backbone/{'/'.join(path)}")


def _to_hf_value(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return value.T
  if kind == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  return value


def _from_hf_value(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return value.T
  if kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  return value


def detect_layout(state_dict: dict) -> str:
  """'checkpoint' or 'transformers5', from the backbone's key names."""
  for layout in LAYOUTS:
    if any(k.startswith(_BACKBONE[layout] + ".embedder.") for k in state_dict):
      return layout
  raise ValueError("not a DETR state dict with transformers' ResNet backbone: no "
                   "'model.backbone.conv_encoder.model.embedder.*' nor "
                   "'model.backbone.model.embedder.*' keys")


def expected_variables(model) -> dict[str, dict[Path, tuple[int, ...]]]:
  """{collection: {path: shape}} of a DETR `model`, from `jax.eval_shape` (no compute)."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return {c: {p: tuple(s.shape) for p, s in flatten(shapes.get(c, {})).items()}
          for c in COLLECTIONS}


def _count(sd: dict, pattern: str) -> int:
  found = {int(m[1]) for m in (re.match(pattern, k) for k in sd) if m}
  return max(found) + 1 if found else 0


def infer_kwargs(state_dict: dict[str, np.ndarray], model_kwargs: dict | None = None) -> dict:
  """DETR constructor kwargs read from a state dict's shapes (classes, queries, widths, depths,
  backbone blocks); `model_kwargs` win over what is read."""
  sd, kwargs = state_dict, dict(model_kwargs or {})
  layout = detect_layout(sd)
  base = _BACKBONE[layout]
  read: dict[str, Any] = {}
  classifier, queries = sd.get("class_labels_classifier.weight"), sd.get(
      "model.query_position_embeddings.weight")
  if classifier is not None:
    read["num_classes"] = int(classifier.shape[0]) - 1
  if queries is not None:
    read["num_queries"], read["d_model"] = (int(d) for d in queries.shape)
  read["encoder_layers"] = _count(sd, r"^model\.encoder\.layers\.(\d+)\.")
  read["decoder_layers"] = _count(sd, r"^model\.decoder\.layers\.(\d+)\.")
  fc1 = [k for k in sd if re.match(r"^model\.encoder\.layers\.0\.(mlp\.)?fc1\.weight$", k)]
  if fc1:
    read["ffn_dim"] = int(sd[fc1[0]].shape[0])
  stages = _count(sd, rf"^{re.escape(base)}\.encoder\.stages\.(\d+)\.")
  if stages:
    stage = lambda s: rf"^{re.escape(base)}\.encoder\.stages\.{s}\.layers\.(\d+)\."
    read["layers"] = tuple(_count(sd, stage(s)) for s in range(stages))
    first = f"{base}.encoder.stages.0.layers.0.layer"
    read["block"] = "bottleneck" if f"{first}.2.convolution.weight" in sd else "basic"
    read["widths"] = tuple(
        int(sd[f"{base}.encoder.stages.{s}.layers.0.layer.0.convolution.weight"].shape[0])
        for s in range(stages))
  read = {k: v for k, v in read.items() if v}
  return {**read, **kwargs}


def from_hf(name: str, state_dict: dict[str, Any], **model_kwargs) -> dict:
  """A transformers DETR state dict (either layout) -> {'params', 'batch_stats'} of jaxvision
  variant `name`, strictly: one ValueError names every missing, unexpected and wrongly shaped
  key."""
  sd = {k: to_numpy(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  layout = detect_layout(sd)
  model = create_model(name, **infer_kwargs(sd, model_kwargs))
  used: set[str] = set()
  out: dict[str, dict] = {}
  missing, wrong = [], []
  for collection, shapes in expected_variables(model).items():
    flat = {}
    for path, shape in shapes.items():
      key, kind = hf_key(path, layout)
      if key not in sd:
        missing.append(key)
        continue
      used.add(key)
      value = _from_hf_value(kind, sd[key])
      if tuple(value.shape) != shape:
        wrong.append(f"{key} {tuple(sd[key].shape)} for {'/'.join(path)} {shape}")
      flat[path] = value
    out[collection] = unflatten(flat)
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or wrong:
    raise ValueError(f"Hugging Face DETR state dict for {name} does not match the model: "
                     f"missing {missing}, unexpected {unexpected}, wrong {wrong}")
  return out


def to_hf(name: str, variables: dict, layout: str = "checkpoint") -> dict[str, np.ndarray]:
  """jaxvision DETR variables {'params', 'batch_stats'} -> a transformers state dict of numpy
  arrays in `layout`."""
  del name  # the variable names carry everything; kept for the dispatcher's signature
  missing = [c for c in COLLECTIONS if c not in variables]
  if missing:
    raise ValueError(f"DETR variables need {COLLECTIONS}; {missing} missing (the frozen "
                     "BatchNorm statistics live in 'batch_stats')")
  out: dict[str, np.ndarray] = {}
  for collection in COLLECTIONS:
    for path, value in flatten(variables[collection]).items():
      key, kind = hf_key(path, layout)
      out[key] = np.ascontiguousarray(_to_hf_value(kind, np.asarray(value)))
  return out


def hf_shapes(model, layout: str = "checkpoint") -> dict[str, tuple[int, ...]]:
  """{key: shape} of the state dict `to_hf` writes for `model`, without making any weights."""
  out = {}
  for shapes in expected_variables(model).values():
    for path, shape in shapes.items():
      key, kind = hf_key(path, layout)
      out[key] = tuple(_to_hf_value(kind, np.broadcast_to(np.zeros((), np.float32), shape)).shape)
  return out


# The dispatcher in jaxvision.convert calls every family's converter by these names.
from_torch = from_hf
to_torch = to_hf
