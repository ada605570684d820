"""The model registry: every variant is a function registered under a lowercase name."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the registry knows about a variant.

  Attributes:
    name: registry name, e.g. ``resnet50``.
    builder: function(**kwargs) -> flax.linen.Module.
    input_shape: default (H, W, C) input, used by shape tests, benchmarks and the zoo table.
    num_classes: default number of classes.
    paper: short citation of the source paper.
  """

  name: str
  builder: Callable[..., nn.Module]
  input_shape: tuple[int, int, int]
  num_classes: int
  paper: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    *, input_shape: tuple[int, int, int] = (224, 224, 3), num_classes: int = 1000, paper: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Decorator: registers `fn` under `fn.__name__` with its default input shape."""

  def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelInfo(name, fn, tuple(input_shape), num_classes, paper)
    return fn

  return decorator


def list_models(pattern: str = "*") -> list[str]:
  """Sorted registry names matching a shell-style pattern, e.g. ``list_models('vit_*')``."""
  return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
  """The registry entry for `name`; a clear error listing close names when it is unknown."""
  if name not in _REGISTRY:
    known = ", ".join(list_models())
    raise ValueError(f"unknown model {name!r}; registered models: {known}")
  return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
  """Builds the registered variant `name`; keyword arguments override its defaults (with
  published weights: `jaxvision.create_model(name, pretrained=...)`)."""
  info = model_info(name)
  kwargs.setdefault("num_classes", info.num_classes)
  return info.builder(**kwargs)
