"""torchvision state dicts <-> jaxvision variables for AlexNet, VGG, GoogLeNet, ResNet (ResNeXt,
Wide ResNet) and DenseNet, on plain numpy arrays.

The mapping is driven by the jaxvision model itself: the expected variables come from
`jax.eval_shape` of the variant's `init`, each Flax module path is renamed to its torchvision
module prefix by a small per-family rule, and each leaf is transformed by its kind:

  conv kernel  (kh, kw, in/groups, out)  <->  weight (out, in/groups, kh, kw)
  dense kernel (in, out)                 <->  weight (out, in)   (+ the flatten permutation below)
  BatchNorm    scale, bias / mean, var   <->  weight, bias / running_mean, running_var

torchvision flattens NCHW maps, jaxvision NHWC ones, so the first dense layer after a flatten
(AlexNet `fc1` over 6x6, VGG `fc1` over 7x7, GoogLeNet `aux*/fc1` over 4x4) has its input rows
permuted from (C, H, W) to (H, W, C) order.

Options that change parameter shapes are read from the weights themselves: the number of classes
(the classifier's rows; no classifier means `num_classes=0`), input channels (the first conv),
the small stem (a 3x3 first conv, ResNet/DenseNet) and GoogLeNet's auxiliary heads (`aux1.*`
keys). Keyword arguments to `from_torch` / `to_torch` are model constructor arguments that
override those guesses or set others (e.g. `widths` of a custom variant). torchvision's
pretrained GoogLeNet expects `transform_input=True` on the jaxvision model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.models import create_model, model_info
from jaxvision.models.alexnet import POOL_SIZE as ALEXNET_POOL
from jaxvision.models.alexnet import AlexNet
from jaxvision.models.densenet import DenseNet
from jaxvision.models.googlenet import AUX_POOL_SIZE, GoogLeNet
from jaxvision.models.resnet import ResNet
from jaxvision.models.vgg import POOL_SIZE as VGG_POOL
from jaxvision.models.vgg import VGG

Path = tuple[str, ...]
# torch's BatchNorm counts its updates in this buffer; Flax keeps no such count. It is accepted
# (and ignored) on import and written as int64 0 on export: it only matters for momentum=None.
NUM_BATCHES = "num_batches_tracked"
_PARAM_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}


def _resnet_prefix(model: ResNet, path: Path) -> str:
  del model
  parts = []
  for part in path:
    stage = re.fullmatch(r"layer(\d)_(\d+)", part)
    if stage:
      parts.append(f"layer{stage[1]}.{stage[2]}")
    else:
      parts.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
                    "head": "fc"}.get(part, part))
  return ".".join(parts)


def _densenet_prefix(model: DenseNet, path: Path) -> str:
  del model
  return "classifier" if path == ("head",) else "features." + ".".join(path)


def _googlenet_prefix(model: GoogLeNet, path: Path) -> str:
  del model
  parts = [re.sub(r"^branch(\d)_(\d)$", r"branch\1.\2", p) for p in path]
  return "fc" if parts == ["head"] else ".".join(parts)


def _alexnet_prefix(model: AlexNet, path: Path) -> str:
  del model
  names = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
           "conv4": "features.8", "conv5": "features.10", "fc1": "classifier.1",
           "fc2": "classifier.4", "head": "classifier.6"}
  return names[path[0]]


def _vgg_prefix(model: VGG, path: Path) -> str:
  # torchvision's `features` is one Sequential: conv[, bn], relu per conv, a pool per stage.
  names = {"fc1": "classifier.0", "fc2": "classifier.3", "head": "classifier.6"}
  index, n = 0, 0
  for depth in model.depths:
    for _ in range(depth):
      n += 1
      names[f"conv{n}"] = f"features.{index}"
      names[f"bn{n}"] = f"features.{index + 1}"
      index += 3 if model.batch_norm else 2
    index += 1
  return names[path[0]]


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one family's Flax paths become torchvision keys.

  Attributes:
    prefix: (model, flax module path) -> torchvision module prefix.
    first_conv: Flax path of the first convolution (gives the input channels and the stem).
    flatten_hw: Flax paths of dense layers that read a flattened (H, W) map -> H (= W).
  """

  prefix: Callable[[Any, Path], str]
  first_conv: Path
  flatten_hw: dict[Path, int]


_FAMILIES = {
    ResNet: _Family(_resnet_prefix, ("conv1",), {}),
    DenseNet: _Family(_densenet_prefix, ("conv0",), {}),
    GoogLeNet: _Family(_googlenet_prefix, ("conv1", "conv"),
                       {("aux1", "fc1"): AUX_POOL_SIZE, ("aux2", "fc1"): AUX_POOL_SIZE}),
    AlexNet: _Family(_alexnet_prefix, ("conv1",), {("fc1",): ALEXNET_POOL}),
    VGG: _Family(_vgg_prefix, ("conv1",), {("fc1",): VGG_POOL}),
}


def _family(name: str) -> tuple[Any, _Family]:
  model = create_model(name)
  family = _FAMILIES.get(type(model))
  if family is None:
    raise ValueError(f"model {name!r} has no torchvision counterpart to convert")
  return model, family


def _expected(name: str, num_classes: int, in_channels: int, options: dict) -> tuple[Any, dict]:
  """The variant's model and abstract variables {(collection, *path, leaf): ShapeDtypeStruct}."""
  model = create_model(name, num_classes=num_classes, **options)
  h, w, _ = model_info(name).input_shape
  rng = jax.random.key(0)
  abstract = jax.eval_shape(
      lambda: model.init({"params": rng, "dropout": rng}, jnp.zeros((1, h, w, in_channels)),
                         train=False))
  flat = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]:
      flat[(collection, *(p.key for p in path))] = leaf
  return model, flat


def _torch_key(family: _Family, model, key: tuple) -> str:
  collection, *path, leaf = key
  table = _PARAM_LEAVES if collection == "params" else _STAT_LEAVES
  return f"{family.prefix(model, tuple(path))}.{table[leaf]}"


def _to_torch_array(arr: np.ndarray, leaf: str, hw: int | None) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return arr.transpose(3, 2, 0, 1)
  if leaf == "kernel" and arr.ndim == 2:
    if hw:
      rows, out = arr.shape
      return arr.reshape(hw, hw, rows // (hw * hw), out).transpose(3, 2, 0, 1).reshape(out, rows)
    return arr.T
  return arr


def _from_torch_array(arr: np.ndarray, leaf: str, hw: int | None) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)
  if leaf == "kernel" and arr.ndim == 2:
    if hw:
      out, rows = arr.shape
      return arr.reshape(out, rows // (hw * hw), hw, hw).transpose(2, 3, 1, 0).reshape(rows, out)
    return arr.T
  return arr


def _torch_shape(shape: tuple, leaf: str) -> tuple:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _nest(flat: dict) -> dict:
  out: dict = {}
  for (collection, *path), value in flat.items():
    node = out.setdefault(collection, {})
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return out


def _raise(direction: str, name: str, missing, unexpected, misshaped) -> None:
  problems = []
  for what, items in (("missing", missing), ("unexpected", unexpected),
                      ("mis-shaped", misshaped)):
    if items:
      shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
      problems.append(f"{what} keys: {shown}")
  if problems:
    raise ValueError(f"{direction}({name!r}): " + "; ".join(problems))


def flat_variables(name: str, variables: dict) -> dict[tuple, np.ndarray]:
  """{(collection, *path): array} of Flax variables' 'params' and 'batch_stats', as numpy:
  what the `to_torch` converters map key by key."""
  if "params" not in variables:
    raise ValueError(f"to_torch({name!r}): variables have no 'params' collection")
  given = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      given[(collection, *(getattr(p, "key", str(p)) for p in path))] = np.asarray(leaf)
  return given


def map_expected(name: str, expected: dict, given: dict, convert) -> dict[str, np.ndarray]:
  """The state dict {torch key: array} of `convert(key, array)` -> (torch key, array) over
  every `expected` key (ShapeDtypeStructs by Flax key) in `given` (`flat_variables`); one
  ValueError lists the missing, unexpected and mis-shaped keys."""
  sd, missing, misshaped = {}, [], []
  for key, spec in expected.items():
    label = "/".join(key)
    if key not in given:
      missing.append(label)
      continue
    if given[key].shape != spec.shape:
      misshaped.append(f"{label} {given[key].shape} (expected {spec.shape})")
      continue
    torch_key, array = convert(key, given[key])
    sd[torch_key] = array
  unexpected = sorted("/".join(k) for k in set(given) - set(expected))
  _raise("to_torch", name, missing, unexpected, misshaped)
  return sd


def state_dict_layout(
    name: str, *, num_classes: int | None = None, in_channels: int = 3, **options
) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict keys and shapes of variant `name` built with `options`."""
  model, family = _family(name)
  if num_classes is None:
    num_classes = model_info(name).num_classes
  model, expected = _expected(name, num_classes, in_channels, options)
  layout = {}
  for key, spec in expected.items():
    tkey = _torch_key(family, model, key)
    layout[tkey] = _torch_shape(spec.shape, key[-1])
    if key[0] == "params" and key[-1] == "scale":
      layout[tkey.rsplit(".", 1)[0] + "." + NUM_BATCHES] = ()
  return layout


def from_torch(name: str, state_dict: dict[str, Any], **model_kwargs) -> dict:
  """A torchvision state dict (arrays or CPU tensors) -> {'params', 'batch_stats'} numpy trees."""
  model, family = _family(name)
  sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
  head = _torch_key(family, model, ("params", "head", "kernel"))
  first = _torch_key(family, model, ("params", *family.first_conv, "kernel"))
  num_classes = sd[head].shape[0] if head in sd and sd[head].ndim == 2 else 0
  in_channels = sd[first].shape[1] if first in sd and sd[first].ndim == 4 else 3
  options = {}
  if hasattr(model, "stem") and first in sd and sd[first].shape[-1] == 3:
    options["stem"] = "small"
  if isinstance(model, GoogLeNet):
    options["aux_logits"] = any(k.startswith(("aux1.", "aux2.")) for k in sd)
  options.update(model_kwargs)
  num_classes = options.pop("num_classes", num_classes)
  model, expected = _expected(name, num_classes, in_channels, options)
  flat, used, missing, misshaped = {}, set(), [], []
  for key, spec in expected.items():
    tkey, leaf = _torch_key(family, model, key), key[-1]
    if tkey not in sd:
      missing.append(tkey)
      continue
    used.add(tkey)
    want = _torch_shape(spec.shape, leaf)
    if sd[tkey].shape != want:
      misshaped.append(f"{tkey} {sd[tkey].shape} (expected {want})")
      continue
    hw = family.flatten_hw.get(tuple(key[1:-1]))
    flat[key] = _from_torch_array(sd[tkey], leaf, hw).astype(spec.dtype)
    if key[0] == "params" and leaf == "scale":
      used.add(tkey.rsplit(".", 1)[0] + "." + NUM_BATCHES)
  unexpected = sorted(set(sd) - used)
  _raise("from_torch", name, missing, unexpected, misshaped)
  return _nest(flat)


def to_torch(name: str, variables: dict, **model_kwargs) -> dict[str, np.ndarray]:
  """Flax variables {'params', 'batch_stats'} -> a torchvision state dict of numpy arrays."""
  model, family = _family(name)
  given = flat_variables(name, variables)
  head = ("params", "head", "kernel")
  first = ("params", *family.first_conv, "kernel")
  num_classes = given[head].shape[-1] if head in given else 0
  in_channels = given[first].shape[2] if first in given and given[first].ndim == 4 else 3
  options = {}
  if hasattr(model, "stem") and first in given and given[first].shape[0] == 3:
    options["stem"] = "small"
  if isinstance(model, GoogLeNet):
    options["aux_logits"] = any(k[1] in ("aux1", "aux2") for k in given)
  options.update(model_kwargs)
  num_classes = options.pop("num_classes", num_classes)
  model, expected = _expected(name, num_classes, in_channels, options)
  converted = map_expected(name, expected, given, lambda key, array: (
      _torch_key(family, model, key),
      _to_torch_array(array, key[-1], family.flatten_hw.get(tuple(key[1:-1])))))
  # Each BatchNorm2d also counts its updates (torchvision's layout): the count follows its
  # weight, from 0.
  sd = {}
  for (key, _), (tkey, array) in zip(expected.items(), converted.items(), strict=True):
    sd[tkey] = array
    if key[0] == "params" and key[-1] == "scale":
      sd[tkey.rsplit(".", 1)[0] + "." + NUM_BATCHES] = np.zeros((), np.int64)
  return sd
