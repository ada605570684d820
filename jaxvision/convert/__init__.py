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


def from_torch(name: str, state_dict: dict[str, Any], **kwargs) -> dict:
  """A torchvision/timm state dict of variant `name` -> Flax variables {'params', 'batch_stats'}.

  Keyword arguments go to the family's converter (e.g. ViT's `image_size`, `pool`, `scan`).
  """
  return _backend(name).from_torch(name, state_dict, **kwargs)


def to_torch(name: str, variables: dict, **kwargs) -> dict:
  """Flax variables of variant `name` -> a torchvision/timm state dict of numpy arrays."""
  return _backend(name).to_torch(name, variables, **kwargs)


def from_vit_npz(name_or_model, npz) -> dict:
  """An official ViT `.npz` checkpoint (vit_jax / big_vision naming) -> Flax variables."""
  from jaxvision.convert.vit_npz import from_vit_npz as convert

  return convert(name_or_model, npz)


__all__ = ["from_torch", "from_vit_npz", "to_torch"]
