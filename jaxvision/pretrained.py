"""Pretrained weights for registry models: which weights a variant has, how they are fitted to
the model asked for, and the preprocessing they expect.

    model, variables, cfg = jaxvision.load_pretrained('resnet50')       # its default weights
    model, variables, cfg = jaxvision.load_pretrained(
        'vit_b16', 'hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k', num_classes=10)
    logits = model.apply(variables, images)   # images prepared as cfg says (cfg.mean, cfg.std,
                                              # cfg.input_size, cfg.crop_pct, cfg.class_names)
    model = jaxvision.create_model('resnet50', pretrained=True)   # the module bound to them:
    logits = model(images); module, variables = model.unbind()

The weight spec is True (`DEFAULT_WEIGHTS`), 'hf-hub:ORG/REPO[@REVISION]' (timm's and
torchvision's checkpoints as timm publishes them: model.safetensors + config.json), a local
.safetensors / .npz (jaxvision's layout or an official ViT checkpoint) / .pth file, or a folder
laid out like a Hub repo (`save_pretrained` writes one); see jaxvision.convert.hub.

The model follows the weights: a ViT is built at their resolution, a classifier with their
class count, a CNN with their stem. What the caller asks for on top is met when it can be:
another `num_classes` replaces the head (freshly initialised, and logged: "head replaced:
1000 -> 10 classes"), another ViT `image_size` resamples the position embedding. Anything else
that does not fit (another architecture's weights, another width) is a one-line ValueError
naming the file and the first key that differs.

With a trainer run, the config keys that match the weights are `PretrainedConfig.overrides()`:
image_size, data.normalize and data.eval_crop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxvision import convert
from jaxvision.convert import hub, timm_vit, torchvision_cnn
from jaxvision.data.transforms import NORMALIZE_PRESETS
from jaxvision.layers.embed import to_pair
from jaxvision.models import create_model, model_info
from jaxvision.models.alexnet import AlexNet
from jaxvision.models.densenet import DenseNet
from jaxvision.models.googlenet import GoogLeNet
from jaxvision.models.resnet import ResNet
from jaxvision.models.vgg import VGG
from jaxvision.models.vit import VisionTransformer, load_at_image_size

log = logging.getLogger("jaxvision")

# Registry name -> its default published weights: torchvision's DEFAULT weights for the CNNs
# and timm's default tag for the ViTs, as timm publishes them on the Hugging Face Hub.
DEFAULT_WEIGHTS = {
    "resnet18": "hf-hub:timm/resnet18.tv_in1k",
    "resnet34": "hf-hub:timm/resnet34.tv_in1k",
    "resnet50": "hf-hub:timm/resnet50.tv2_in1k",
    "resnet101": "hf-hub:timm/resnet101.tv2_in1k",
    "resnet152": "hf-hub:timm/resnet152.tv2_in1k",
    "resnext50_32x4d": "hf-hub:timm/resnext50_32x4d.tv2_in1k",
    "resnext101_32x8d": "hf-hub:timm/resnext101_32x8d.tv2_in1k",
    "resnext101_64x4d": "hf-hub:timm/resnext101_64x4d.tv_in1k",
    "wide_resnet50_2": "hf-hub:timm/wide_resnet50_2.tv2_in1k",
    "wide_resnet101_2": "hf-hub:timm/wide_resnet101_2.tv2_in1k",
    "densenet121": "hf-hub:timm/densenet121.tv_in1k",
    "densenet161": "hf-hub:timm/densenet161.tv_in1k",
    "densenet169": "hf-hub:timm/densenet169.tv_in1k",
    "densenet201": "hf-hub:timm/densenet201.tv_in1k",
    "vit_ti16": "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_s16": "hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_s8": "hf-hub:timm/vit_small_patch8_224.dino",  # self-supervised: no classifier
    "vit_b16": "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_b32": "hf-hub:timm/vit_base_patch32_224.augreg_in21k_ft_in1k",
    "vit_b8": "hf-hub:timm/vit_base_patch8_224.augreg2_in21k_ft_in1k",
    "vit_l16": "hf-hub:timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
    "vit_l32": "hf-hub:timm/vit_large_patch32_384.orig_in21k_ft_in1k",  # 384 px
    "vit_h14": "hf-hub:timm/vit_huge_patch14_224.orig_in21k",  # ImageNet-21k features, no head
}

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
  """How inputs must be prepared for a set of pretrained weights, and what the outputs mean.

  Attributes:
    source: the weight spec they were loaded from.
    architecture: the source's architecture name (timm's, e.g. 'resnet50'), else the registry
      name.
    mean / std: per-channel normalization of [0, 1] images.
    input_size: (H, W, C) the model takes.
    interpolation: resize filter the weights were evaluated with ('bilinear', 'bicubic').
    crop_pct: evaluation center crop, as a fraction of the shorter side (timm's crop_pct;
      jaxvision's data.eval_crop).
    num_classes: classifier outputs (0: features).
    class_names: one name per class when the source has them, else empty.
  """

  source: str
  architecture: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  input_size: tuple[int, int, int]
  interpolation: str = "bilinear"
  crop_pct: float = 0.875
  num_classes: int = 1000
  class_names: tuple[str, ...] = ()

  @property
  def image_size(self) -> int | tuple[int, int]:
    """Model input side, or (H, W) when not square."""
    h, w = self.input_size[:2]
    return h if h == w else (h, w)

  @property
  def normalize(self) -> str:
    """The `config.data.normalize` value of these statistics (a preset name when one fits)."""

    channels = len(self.mean)
    for name, (mean, std) in NORMALIZE_PRESETS.items():
      m, s = (np.broadcast_to(np.asarray(v, np.float64), (channels,)) for v in (mean, std))
      if np.allclose(m, self.mean, atol=1e-6) and np.allclose(s, self.std, atol=1e-6):
        return name
    return f"({','.join(map(str, self.mean))}),({','.join(map(str, self.std))})"

  def overrides(self) -> dict[str, Any]:
    """Trainer config keys that prepare inputs as these weights expect."""
    return {"image_size": self.input_size[0], "data.normalize": self.normalize,
            "data.eval_crop": self.crop_pct}

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields."""
    return {**dataclasses.asdict(self), "normalize": self.normalize}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> PretrainedConfig:
    """The inverse of `to_dict` (unknown keys are ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in fields}
    for key in ("mean", "std", "input_size", "class_names"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)

  def to_timm(self) -> dict[str, Any]:
    """A timm-format config.json (what `save_pretrained` writes and the Hub loader reads)."""
    h, w, c = self.input_size
    cfg = {"architecture": self.architecture, "num_classes": self.num_classes,
           "pretrained_cfg": {"input_size": [c, h, w], "interpolation": self.interpolation,
                              "crop_pct": self.crop_pct, "crop_mode": "center",
                              "mean": list(self.mean), "std": list(self.std),
                              "num_classes": self.num_classes}}
    if self.class_names:
      cfg["label_names"] = list(self.class_names)
    return cfg


def default_weights(name: str) -> str:
  """The spec of variant `name`'s default weights; ValueError when it has none."""
  if name not in DEFAULT_WEIGHTS:
    raise ValueError(f"model {name!r} has no default pretrained weights (those that do: "
                     f"{', '.join(sorted(DEFAULT_WEIGHTS))}); pass pretrained='hf-hub:ORG/REPO' "
                     "or a weights file")
  return DEFAULT_WEIGHTS[name]


# --- Loading ----------------------------------------------------------------------------------


def _family(name: str) -> str | None:
  """'vit', 'cnn' (a torchvision layout) or None (jaxvision's own layout only)."""
  model = create_model(name)
  if isinstance(model, VisionTransformer):
    return "vit"
  if isinstance(model, (ResNet, DenseNet, GoogLeNet, AlexNet, VGG)):
    return "cnn"
  return None


def _hub_hints(config: dict | None) -> dict[str, Any]:
  """ViT pooling that config.json states and the weights cannot show (timm's global_pool)."""
  pool = (config or {}).get("global_pool")
  return {"pool": {"token": "cls", "avg": "gap", "map": "map"}[pool]} if pool in (
      "token", "avg", "map") else {}


def _cnn_kwargs(model, params: dict) -> dict[str, Any]:
  """Constructor arguments that converted CNN parameters imply (classes, stem, aux heads)."""
  kwargs: dict[str, Any] = {
      "num_classes": int(params["head"]["kernel"].shape[-1]) if "head" in params else 0}
  first = params.get("conv1", params.get("conv0", {}))
  if hasattr(model, "stem") and np.shape(first.get("kernel"))[:1] == (3,):
    kwargs["stem"] = "small"
  if hasattr(model, "aux_logits"):
    kwargs["aux_logits"] = "aux1" in params
  return kwargs


def _first_difference(expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> str:
  """The first key (in the model's order) that is missing or mis-shaped, else the first extra
  key, with the count of all differences."""
  problems = []
  for key, shape in expected.items():
    if key not in given:
      problems.append(f"{key} {tuple(shape)} is missing")
    elif tuple(given[key]) != tuple(shape):
      problems.append(f"{key} has shape {tuple(given[key])}, the model expects {tuple(shape)}")
  problems += [f"unexpected key {key} {tuple(given[key])}" for key in given if key not in expected]
  if not problems:
    return "the arrays do not fit"
  more = f" ({len(problems) - 1} more differences)" if len(problems) > 1 else ""
  return problems[0] + more


def _torch_layout(name: str, family: str, state_dict: dict, kwargs: dict) -> dict[str, tuple]:
  """The torch-layout keys and shapes the model that `state_dict` implies would have."""

  if family == "vit":
    model = create_model(name, **timm_vit.infer_kwargs(state_dict, kwargs))
    out = {}
    for path, shape in timm_vit.expected_params(model).items():
      if path[-1] == "kernel" and len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif path[-1] == "kernel" and len(shape) == 2:
        shape = shape[::-1]
      out[timm_vit.torch_key(path)] = shape
    return out
  # The head is whichever key changes with the class count; the weights give that count.
  a = torchvision_cnn.state_dict_layout(name, num_classes=7)
  b = torchvision_cnn.state_dict_layout(name, num_classes=8)
  heads = [k for k in a if a[k] != b[k] and len(a[k]) == 2]
  classes = next((int(state_dict[k].shape[0]) for k in heads if k in state_dict), 0)
  layout = torchvision_cnn.state_dict_layout(name, num_classes=classes)
  return {k: v for k, v in layout.items() if not k.endswith(torchvision_cnn.NUM_BATCHES)}


def _from_state_dict(name: str, family: str, weights: hub.Weights, state_dict: dict,
                     kwargs: dict) -> tuple[dict, dict]:
  """(Flax variables, the constructor arguments they were built with) from a torch-layout
  state dict; a one-line error naming the file and the first differing key."""

  if family == "vit":
    kwargs = {**_hub_hints(weights.config), **kwargs}
  try:
    variables = convert.from_torch(name, state_dict, **kwargs)
  except ValueError as e:
    try:
      given = {k: tuple(v.shape) for k, v in state_dict.items()
               if not k.endswith("num_batches_tracked")}
      reason = _first_difference(_torch_layout(name, family, state_dict, kwargs), given)
    except Exception:  # noqa: BLE001 - the layout itself does not build: report the original
      reason = str(e).splitlines()[0]
    raise ValueError(f"{weights.name}: not weights of {name}: {reason}") from None
  if family == "vit":
    built = timm_vit.infer_kwargs(state_dict, kwargs)
  else:
    built = {**_cnn_kwargs(create_model(name), variables["params"]), **kwargs}
  return variables, built


def _is_head(path: str) -> bool:
  parts = path.split("/")
  return parts[1] == "head" or (len(parts) > 2 and parts[1].startswith("aux") and
                                parts[2] == "fc2")


def input_shape(name: str, model) -> tuple[int, int, int]:
  """An (H, W, C) input that `model` (registry variant `name`) takes: a ViT's own image size,
  else the registry's default input."""

  default = model_info(name).input_shape
  size = getattr(model, "image_size", None)
  return (*to_pair(size), default[-1]) if size is not None else default


def fit_variables(model, variables: dict, *, source: str, input_shape: tuple[int, int, int],
                  seed: int = 0) -> dict:
  """`variables` fitted to `model` (which takes `input_shape` (H, W, C) inputs): a head of
  another class count replaced by a fresh one, a ViT position embedding of another grid
  resampled; anything else that differs is a one-line ValueError naming `source` and the
  first differing path."""


  key = jax.random.key(0)
  init = lambda: model.init({"params": key, "dropout": key}, jnp.zeros((1, *input_shape)),
                            train=False)
  want = {k: v for k, v in hub.flatten(jax.eval_shape(init)).items()
          if k.startswith(("params/", "batch_stats/"))}
  if isinstance(model, VisionTransformer) and "pos_embed" in variables.get("params", {}):
    variables = {**variables, "params": load_at_image_size(dict(variables["params"]), model)}
  have = hub.flatten({c: variables[c] for c in ("params", "batch_stats") if c in variables})
  heads = {k for k in set(want) | set(have) if _is_head(k)}
  new_head = [k for k in heads if k not in have or (k in want and
                                                   tuple(have[k].shape) != want[k].shape)]
  body_want = {k: tuple(v.shape) for k, v in want.items() if k not in heads}
  body_have = {k: tuple(np.shape(v)) for k, v in have.items() if k not in heads}
  if body_want != body_have:
    raise ValueError(f"{source}: does not fit the model: "
                     f"{_first_difference(body_want, body_have)}")
  out = {k: v for k, v in have.items() if k in want}
  old, new = _class_count(have), _class_count(want)
  rng = np.random.default_rng(seed)
  std = 0.02 if isinstance(model, VisionTransformer) else None
  out.update({k: _fresh_leaf(k, want[k].shape, rng, std) for k in new_head})
  if new_head or old != new:
    log.warning("%s: head replaced: %d -> %d classes", source, old, new)
  return hub.unflatten({k: out[k] for k in want})


def _fresh_leaf(path: str, shape: tuple, rng: np.random.Generator,
                std: float | None) -> np.ndarray:
  """A newly initialised head leaf, as the models initialise theirs: kernels normal with
  `std` (None: LeCun's 1/sqrt(fan-in)), biases zero, norm scales and variances one."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    scale = std if std is not None else float(np.prod(shape[:-1])) ** -0.5
    return (rng.standard_normal(shape) * scale).astype(np.float32)
  fill = 1.0 if leaf in ("scale", "var") else 0.0
  return np.full(shape, fill, np.float32)


def _class_count(flat: Mapping[str, Any]) -> int:
  bias = flat.get("params/head/bias")
  return int(np.shape(bias)[-1]) if bias is not None else 0


def _preprocessing(name: str, family: str | None, weights: hub.Weights, model,
                   num_classes: int, replaced: bool) -> PretrainedConfig:
  """The PretrainedConfig of the loaded weights: config.json's pretrained_cfg when the source
  has one, else the usual statistics of its kind."""
  config = weights.config or {}
  pcfg = dict(config.get("pretrained_cfg", config))
  if family == "vit":  # Google's ViTs (and timm's augreg ones) see [-1, 1] inputs
    defaults = dict(mean=HALF[0], std=HALF[1], interpolation="bicubic", crop_pct=0.9)
  elif family == "cnn":
    defaults = dict(mean=IMAGENET[0], std=IMAGENET[1], interpolation="bilinear", crop_pct=0.875)
  else:  # jaxvision's own layout carries no statistics: inputs in [0, 1]
    defaults = dict(mean=(0.0,), std=(1.0,), interpolation="bilinear", crop_pct=0.875)
  h, w, c = input_shape(name, model)
  if "input_size" in pcfg:
    c = int(pcfg["input_size"][0])
    if family != "vit":  # a ViT's resolution is the model's, resampled or not
      h, w = (int(v) for v in pcfg["input_size"][1:3])
  return PretrainedConfig(
      source=str(weights.spec), architecture=str(config.get("architecture", name)),
      mean=tuple(float(v) for v in pcfg.get("mean", defaults["mean"])),
      std=tuple(float(v) for v in pcfg.get("std", defaults["std"])),
      input_size=(h, w, c),
      interpolation=str(pcfg.get("interpolation", defaults["interpolation"])),
      crop_pct=float(pcfg.get("crop_pct", defaults["crop_pct"])),
      num_classes=int(num_classes),
      class_names=() if replaced else _class_names(config, pcfg, num_classes))


def _class_names(config: dict, pcfg: dict, num_classes: int) -> tuple[str, ...]:
  """Readable class names from timm's label_names (list or {index: name}) and
  label_descriptions ({name: description}); () when absent or not one per class."""
  names = config.get("label_names", pcfg.get("label_names"))
  if isinstance(names, dict):
    names = [names.get(str(i), names.get(i, str(i))) for i in range(num_classes)]
  if not names or len(names) != num_classes:
    return ()
  descriptions = config.get("label_descriptions", pcfg.get("label_descriptions")) or {}
  return tuple(str(descriptions.get(n, n)) for n in names)


def load_pretrained(name: str, spec: Any = True, **model_kwargs) -> tuple[Any, dict,
                                                                          PretrainedConfig]:
  """(model, variables, PretrainedConfig) of registry variant `name` with the weights of
  `spec` (True: `DEFAULT_WEIGHTS[name]`); `model_kwargs` override the constructor arguments
  the weights imply (see the module docstring)."""

  spec = default_weights(name) if spec is True else spec
  weights = hub.read_weights(spec)
  family = _family(name)
  wanted_classes = model_kwargs.pop("num_classes", None)
  arrays, layout = weights.arrays, weights.layout
  if layout == "vit_npz":
    if family != "vit":
      raise ValueError(f"{weights.name}: an official ViT checkpoint cannot load into {name}")
    try:
      params = convert.from_vit_npz(name, arrays, **model_kwargs)["params"]
    except ValueError as e:
      raise ValueError(f"{weights.name}: not weights of {name}: {_short(e)}") from None
    arrays, layout = convert.to_torch(name, {"params": params}), "torch"
  elif layout == "jaxvision" and family is not None:
    try:
      arrays = convert.to_torch(name, hub.jaxvision_variables(arrays))
    except ValueError as e:
      raise ValueError(f"{weights.name}: not weights of {name}: {_short(e)}") from None
    layout = "torch"

  if layout == "torch":
    if family is None:
      raise ValueError(f"{weights.name}: model {name!r} has no torchvision/timm counterpart; "
                       "load jaxvision-layout weights (.npz / .safetensors of its parameters)")
    variables, built = _from_state_dict(name, family, weights, arrays, model_kwargs)
  else:
    variables = hub.jaxvision_variables(arrays)
    built = dict(model_kwargs)
    head = variables["params"].get("head", {})
    if "bias" in head:
      built.setdefault("num_classes", int(np.shape(head["bias"])[-1]))
  if wanted_classes is not None:
    built["num_classes"] = int(wanted_classes)
  model = create_model(name, **built)
  source_classes = _class_count(hub.flatten(variables))
  variables = fit_variables(model, variables, source=weights.name,
                            input_shape=input_shape(name, model))
  num_classes = _class_count(hub.flatten(variables))
  cfg = _preprocessing(name, family, weights, model, num_classes, num_classes != source_classes)
  return model, variables, cfg


def _short(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# --- Saving -----------------------------------------------------------------------------------


def save_pretrained(directory: str, name: str, variables: dict,
                    config: PretrainedConfig) -> str:
  """Writes `variables` of variant `name` as a Hub-style folder (model.safetensors in
  timm/torchvision layout when the family has one, else jaxvision's; config.json in timm's
  format) that `load_pretrained(name, directory)` and the Hub loader read; returns the folder."""


  os.makedirs(directory, exist_ok=True)
  if _family(name) is not None:
    arrays = convert.to_torch(name, variables)
  else:
    arrays = hub.flatten({c: variables[c] for c in ("params", "batch_stats") if c in variables})
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
  save_file(arrays, os.path.join(directory, hub.WEIGHTS_NAME), metadata={"format": "pt"})
  with open(os.path.join(directory, hub.CONFIG_NAME), "w") as f:
    json.dump(config.to_timm(), f, indent=2)
  return directory
