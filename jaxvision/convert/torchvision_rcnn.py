"""torchvision state dicts <-> jaxvision variables for Faster R-CNN and Mask R-CNN (ResNet-50-FPN
v1, and any variant of the families, e.g. the `*_tiny` ones), on plain numpy arrays.

As in `torchvision_detection`, the expected variables come from `jax.eval_shape` of the
variant's `init`, each Flax module path is renamed to its torchvision module prefix, and each
leaf is transformed by its kind: conv kernels (kh, kw, in, out) <-> (out, in, kh, kw); dense
kernels transposed, fc6's rows reordered from our HWC flattening of the 7x7 crops to
torchvision's CHW; the mask predictor's transposed convolution (2, 2, in, out) <-> (in, out, 2,
2). The ResNet body's frozen BatchNorms (`batch_stats`) map to FrozenBatchNorm2d's buffers.

`from_torch` also accepts what torchvision itself still loads: `num_batches_tracked` buffers (a
model built with trainable BatchNorm2d, ignored) and the pre-0.13 key names of the published
COCO checkpoints (`rpn.head.conv.weight`, `roi_heads.mask_head.mask_fcn{i}.weight`,
`fpn.inner_blocks.{i}.weight` without the `.0`). The number of classes is read from the box
classifier; other options (e.g. `bn_epsilon=0.0` for torchvision's COCO v1 weights) are keyword
arguments.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.convert.torchvision_cnn import (
  NUM_BATCHES,
  _from_torch_array,
  _nest,
  _raise,
  _to_torch_array,
  _torch_shape,
  flat_variables,
  map_expected,
)
from jaxvision.convert.torchvision_detection import _fpn_backbone_prefix
from jaxvision.models import create_model, model_info
from jaxvision.models.rcnn import BOX_ROI_SIZE, FasterRCNN

Path = tuple[str, ...]
_PARAM_LEAVES = {"kernel": "weight", "bias": "bias"}
_STAT_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_HEADS = {"box_heads": {"fc6": "roi_heads.box_head.fc6", "fc7": "roi_heads.box_head.fc7",
                        "cls_score": "roi_heads.box_predictor.cls_score",
                        "bbox_pred": "roi_heads.box_predictor.bbox_pred"},
          "mask_heads": {"conv5_mask": "roi_heads.mask_predictor.conv5_mask",
                         "mask_fcn_logits": "roi_heads.mask_predictor.mask_fcn_logits"}}
_CLASSIFIER = ("params", "box_heads", "cls_score", "kernel")
_UP_CONV = ("params", "mask_heads", "conv5_mask", "kernel")
_FC6 = ("params", "box_heads", "fc6", "kernel")


def _prefix(path: Path) -> str:
  """torchvision module prefix of a Flax module path."""
  if path[0] == "backbone":
    return _fpn_backbone_prefix(path)
  if path[0] == "rpn":
    return "rpn.head." + {"conv": "conv.0.0"}.get(path[1], path[1])
  mask_conv = re.fullmatch(r"mask_fcn(\d+)", path[1])
  if path[0] == "mask_heads" and mask_conv:
    return f"roi_heads.mask_head.{int(mask_conv[1]) - 1}.0"
  return _HEADS[path[0]][path[1]]


def _torch_key(key: tuple) -> str:
  collection, *path, leaf = key
  table = _PARAM_LEAVES if collection == "params" else _STAT_LEAVES
  return f"{_prefix(tuple(path))}.{table[leaf]}"


def _to_torch(key: tuple, value: np.ndarray) -> np.ndarray:
  if key == _UP_CONV:
    return value.transpose(2, 3, 0, 1)
  return _to_torch_array(value, key[-1], BOX_ROI_SIZE if key == _FC6 else None)


def _from_torch(key: tuple, value: np.ndarray) -> np.ndarray:
  if key == _UP_CONV:
    return value.transpose(2, 3, 0, 1)
  return _from_torch_array(value, key[-1], BOX_ROI_SIZE if key == _FC6 else None)


def _shape(key: tuple, shape: tuple) -> tuple:
  if key == _UP_CONV:
    return (shape[2], shape[3], shape[0], shape[1])
  return _torch_shape(shape, key[-1])


def _model(name: str, options: dict):
  model = create_model(name, **options)
  if not isinstance(model, FasterRCNN):
    raise ValueError(f"model {name!r} is not a Faster / Mask R-CNN variant")
  return model


@functools.lru_cache(maxsize=16)
def _expected_cached(name: str, options: tuple) -> tuple[Any, dict]:
  # Tracing the whole inference path of a ResNet-50 model takes seconds; a conversion needs it
  # two or three times.
  model = _model(name, dict(options))
  h, w, c = model_info(name).input_shape
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c))))
  flat = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]:
      flat[(collection, *(p.key for p in path))] = leaf
  return model, flat


def _expected(name: str, options: dict) -> tuple[Any, dict]:
  """The variant's model and abstract variables {(collection, *path, leaf): ShapeDtypeStruct}."""
  frozen = lambda v: tuple(map(frozen, v)) if isinstance(v, (list, tuple)) else v
  return _expected_cached(name, tuple(sorted((k, frozen(v)) for k, v in options.items())))


def _new_layout(sd: dict) -> dict:
  """Renames the pre-0.13 keys of published checkpoints to the current layout."""
  out = {}
  for key, value in sd.items():
    key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", key)
    key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
    old = re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)", key)
    if old:
      key = f"roi_heads.mask_head.{int(old[1]) - 1}.0.{old[2]}"
    out[key] = value
  return out


def state_dict_layout(name: str, **options) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict keys and shapes of variant `name` built with `options`."""
  _, expected = _expected(name, options)
  return {_torch_key(key): _shape(key, spec.shape) for key, spec in expected.items()}


def from_torch(name: str, state_dict: dict[str, Any], **model_kwargs) -> dict:
  """A torchvision Faster / Mask R-CNN state dict -> {'params', 'batch_stats'} numpy trees."""
  _model(name, {k: v for k, v in model_kwargs.items() if k != "num_classes"})
  sd = _new_layout({str(k): np.asarray(v) for k, v in state_dict.items()})
  options = dict(model_kwargs)
  classifier = _torch_key(_CLASSIFIER)
  if "num_classes" not in options and classifier in sd and sd[classifier].ndim == 2:
    options["num_classes"] = sd[classifier].shape[0]
  _, expected = _expected(name, options)
  flat, used, missing, misshaped = {}, set(), [], []
  for key, spec in expected.items():
    tkey = _torch_key(key)
    if tkey not in sd:
      missing.append(tkey)
      continue
    used.add(tkey)
    want = _shape(key, spec.shape)
    if sd[tkey].shape != want:
      misshaped.append(f"{tkey} {sd[tkey].shape} (expected {want})")
      continue
    flat[key] = _from_torch(key, sd[tkey]).astype(spec.dtype)
  # A model built with trainable BatchNorm2d has these counters; frozen BatchNorm has none.
  used |= {k for k in sd if k.endswith("." + NUM_BATCHES)}
  _raise("from_torch", name, missing, sorted(set(sd) - used), misshaped)
  return _nest(flat)


def to_torch(name: str, variables: dict, **model_kwargs) -> dict[str, np.ndarray]:
  """Flax variables {'params', 'batch_stats'} -> a torchvision state dict of numpy arrays, in
  the layout of torchvision's models with frozen BatchNorm (the published checkpoints')."""
  given = flat_variables(name, variables)
  options = dict(model_kwargs)
  if "num_classes" not in options and _CLASSIFIER in given and given[_CLASSIFIER].ndim == 2:
    options["num_classes"] = given[_CLASSIFIER].shape[1]
  _, expected = _expected(name, options)
  return map_expected(name, expected, given,
                      lambda key, array: (_torch_key(key), _to_torch(key, array)))
