"""torchvision state dicts <-> jaxvision variables for the one-stage detectors: SSD300-VGG16,
RetinaNet-ResNet50-FPN and FCOS-ResNet50-FPN (and any variant of those families, e.g. the
`*_tiny` ones), on plain numpy arrays.

As in `torchvision_cnn`, the expected variables come from `jax.eval_shape` of the variant's
`init`, each Flax module path is renamed to its torchvision module prefix, and each leaf is
transformed by its kind (conv kernel (kh, kw, in, out) <-> weight (out, in, kh, kw); GroupNorm
scale <-> weight; SSD's `l2_scale` <-> `backbone.scale_weight`). The frozen BatchNorms of the
ResNet body live in `batch_stats` (scale, bias, mean, var) and map to torchvision's
`FrozenBatchNorm2d` buffers (weight, bias, running_mean, running_var).

`from_torch` also accepts the layouts torchvision itself still loads: `num_batches_tracked`
buffers (a model built with trainable BatchNorm2d, ignored) and the pre-0.13 key names the
published COCO checkpoints use (`fpn.inner_blocks.{i}.weight` without the `.0`, RetinaNet head
convolutions at `conv.{2i}`). The number of classes is read from the classifier; other options
(e.g. `bn_epsilon=0.0` for torchvision's COCO RetinaNet) are keyword arguments.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.convert.torchvision_cnn import (
  NUM_BATCHES,
  _from_torch_array,
  _nest,
  _raise,
  _resnet_prefix,
  _to_torch_array,
  _torch_shape,
  flat_variables,
  map_expected,
)
from jaxvision.models import create_model, model_info
from jaxvision.models.fcos import FCOS
from jaxvision.models.retinanet import RetinaNet
from jaxvision.models.ssd import SSD

Path = tuple[str, ...]
_HEADS = {"cls_head": "head.classification_head", "reg_head": "head.regression_head"}
_PARAM_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_STAT_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _fpn_backbone_prefix(path: Path) -> str:
  """backbone/body/... and backbone/fpn/... of the ResNet-FPN detectors."""
  if path[1] == "body":
    return "backbone.body." + _resnet_prefix(None, path[2:])
  name = path[2]
  level = re.fullmatch(r"(inner|layer)_(\d+)", name)
  if level:
    return f"backbone.fpn.{level[1]}_blocks.{level[2]}.0"
  return f"backbone.fpn.extra_blocks.{name}"


def _retinanet_prefix(model: RetinaNet, path: Path) -> str:
  del model
  if path[0] == "backbone":
    return _fpn_backbone_prefix(path)
  conv = re.fullmatch(r"conv(\d+)", path[1])
  return f"{_HEADS[path[0]]}." + (f"conv.{conv[1]}.0" if conv else path[1])


def _fcos_prefix(model: FCOS, path: Path) -> str:
  del model
  if path[0] == "backbone":
    return _fpn_backbone_prefix(path)
  # torchvision's tower is one Sequential of [conv, GroupNorm, ReLU] per layer.
  layer = re.fullmatch(r"(conv|norm)(\d+)", path[1])
  if layer:
    return f"{_HEADS[path[0]]}.conv.{3 * int(layer[2]) + (layer[1] == 'norm')}"
  return f"{_HEADS[path[0]]}.{path[1]}"


def _ssd_prefix(model: SSD, path: Path) -> str:
  if path[0] in _HEADS:
    return f"{_HEADS[path[0]]}.module_list.{path[1].removeprefix('conv')}"
  # torchvision splits VGG's `features` Sequential (conv, relu per conv; a pool per stage) at
  # pool4: `features` runs to conv4_3, `extra.0` is pool4, the conv5 convs and the fc block
  # (pool5, fc6, relu, fc7, relu); each later `extra.{j}` is (1x1 conv, relu, conv, relu).
  names, index, n = {}, 0, 0
  for stage, depth in enumerate(model.depths):
    if stage == 4:
      index = 1
    for _ in range(depth):
      n += 1
      names[f"conv{n}"] = f"features.{index}" if stage < 4 else f"extra.0.{index}"
      index += 2
    index += 1
  names["fc6"], names["fc7"] = f"extra.0.{index - 1}.1", f"extra.0.{index - 1}.3"
  name = path[1]
  extra = re.fullmatch(r"extra(\d+)_([12])", name)
  if extra:
    return f"backbone.extra.{extra[1]}.{2 * int(extra[2]) - 2}"
  return "backbone." + names[name]


_PREFIXES: dict[type, Callable[[Any, Path], str]] = {
    SSD: _ssd_prefix, RetinaNet: _retinanet_prefix, FCOS: _fcos_prefix}


def _model(name: str, options: dict):
  model = create_model(name, **options)
  if type(model) not in _PREFIXES:
    raise ValueError(f"model {name!r} is not an SSD, RetinaNet or FCOS variant")
  return model


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _expected(name: str, options: dict) -> tuple[Any, dict]:
  """The variant's model and abstract variables {(collection, *path, leaf): ShapeDtypeStruct}."""
  return _expected_cached(name, tuple(sorted((k, _freeze(v)) for k, v in options.items())))


@functools.lru_cache(maxsize=32)
def _expected_cached(name: str, options: tuple) -> tuple[Any, dict]:
  # Tracing a ResNet-50 detector takes about a second; a conversion needs it two or three times.
  model = _model(name, dict(options))
  h, w, c = model_info(name).input_shape
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False))
  flat = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]:
      flat[(collection, *(p.key for p in path))] = leaf
  return model, flat


def _torch_key(model, key: tuple) -> str:
  collection, *path, leaf = key
  if leaf == "l2_scale":
    return "backbone.scale_weight"
  table = _PARAM_LEAVES if collection == "params" else _STAT_LEAVES
  return f"{_PREFIXES[type(model)](model, tuple(path))}.{table[leaf]}"


def _classifier(model) -> tuple[tuple, int]:
  """Flax key of the (first) classifier kernel and the anchors that share its outputs."""
  if isinstance(model, SSD):
    return ("params", "cls_head", "conv0", "kernel"), model.num_anchors[0]
  return ("params", "cls_head", "cls_logits", "kernel"), model.num_anchors


def _new_layout(sd: dict, model) -> dict:
  """Renames the pre-0.13 keys of published checkpoints to the current layout."""
  out = {}
  for key, value in sd.items():
    key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", key)
    if isinstance(model, RetinaNet):
      old = re.fullmatch(r"(head\.\w+_head\.conv)\.(\d+)\.(weight|bias)", key)
      if old:
        key = f"{old[1]}.{int(old[2]) // 2}.0.{old[3]}"
    out[key] = value
  return out


def state_dict_layout(name: str, **options) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict keys and shapes of variant `name` built with `options`."""
  model, expected = _expected(name, options)
  return {_torch_key(model, key): _torch_shape(spec.shape, key[-1])
          for key, spec in expected.items()}


def from_torch(name: str, state_dict: dict[str, Any], **model_kwargs) -> dict:
  """A torchvision detector state dict -> {'params', 'batch_stats'} numpy trees."""
  model = _model(name, {k: v for k, v in model_kwargs.items() if k != "num_classes"})
  sd = _new_layout({str(k): np.asarray(v) for k, v in state_dict.items()}, model)
  options = dict(model_kwargs)
  key, anchors = _classifier(model)
  key = _torch_key(model, key)
  if "num_classes" not in options and key in sd and sd[key].ndim == 4:
    options["num_classes"] = sd[key].shape[0] // anchors
  model, expected = _expected(name, options)
  flat, used, missing, misshaped = {}, set(), [], []
  for key, spec in expected.items():
    tkey, leaf = _torch_key(model, key), key[-1]
    if tkey not in sd:
      missing.append(tkey)
      continue
    used.add(tkey)
    want = _torch_shape(spec.shape, leaf)
    if sd[tkey].shape != want:
      misshaped.append(f"{tkey} {sd[tkey].shape} (expected {want})")
      continue
    flat[key] = _from_torch_array(sd[tkey], leaf, None).astype(spec.dtype)
  # A model built with trainable BatchNorm2d has these counters; frozen BatchNorm has none.
  used |= {k for k in sd if k.endswith("." + NUM_BATCHES)}
  _raise("from_torch", name, missing, sorted(set(sd) - used), misshaped)
  return _nest(flat)


def to_torch(name: str, variables: dict, **model_kwargs) -> dict[str, np.ndarray]:
  """Flax variables {'params', 'batch_stats'} -> a torchvision state dict of numpy arrays, in
  the layout of torchvision's detectors with frozen BatchNorm (the published checkpoints')."""
  given = flat_variables(name, variables)
  options = dict(model_kwargs)
  key, anchors = _classifier(_model(name, {k: v for k, v in options.items()
                                            if k != "num_classes"}))
  if "num_classes" not in options and key in given and given[key].ndim == 4:
    options["num_classes"] = given[key].shape[-1] // anchors
  model, expected = _expected(name, options)
  return map_expected(name, expected, given, lambda key, array: (
      _torch_key(model, key), _to_torch_array(array, key[-1], None)))
