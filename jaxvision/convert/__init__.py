"""Weight conversion between jaxvision and the PyTorch layouts (torchvision, timm) and the
official ViT `.npz` checkpoints. Works on plain numpy arrays: no torch import needed.

    variables = from_torch('resnet50', state_dict)   # {name: np.ndarray} -> Flax variables
    state_dict = to_torch('resnet50', variables)     # and back; a round trip is exact
"""

from __future__ import annotations

from typing import Any


def _backend(name: str):
  if name.startswith("vit"):
    from jaxvision.convert import timm_vit

    return timm_vit
  from jaxvision.convert import torchvision_cnn

  return torchvision_cnn


def from_torch(name: str, state_dict: dict[str, Any]) -> dict:
  """A torchvision/timm state dict of variant `name` -> Flax variables {'params', 'batch_stats'}."""
  return _backend(name).from_torch(name, state_dict)


def to_torch(name: str, variables: dict) -> dict:
  """Flax variables of variant `name` -> a torchvision/timm state dict of numpy arrays."""
  return _backend(name).to_torch(name, variables)


__all__ = ["from_torch", "to_torch"]
