"""Weight conversion between jaxvision and the PyTorch layouts (torchvision, timm) and the
official ViT `.npz` checkpoints. Works on plain numpy arrays: no torch import needed.

    variables = from_torch('resnet50', state_dict)   # {name: np.ndarray} -> Flax variables
    state_dict = to_torch('resnet50', variables)     # and back; a round trip is exact
"""

from __future__ import annotations

from typing import Any

from jaxvision.convert import (
    hf_detr,
    hf_vit_gpt2,
    timm_vit,
    torchvision_cnn,
    torchvision_detection,
    torchvision_rcnn,
    vit_npz,
)

# Registry names of the one-stage detectors (jaxvision.convert.torchvision_detection).
DETECTION_PREFIXES = ("ssd", "retinanet", "fcos")
# Registry names of the two-stage detectors (jaxvision.convert.torchvision_rcnn).
RCNN_PREFIXES = ("fasterrcnn", "maskrcnn")


def _backend(name: str):
  if name.startswith("detr"):
    return hf_detr
  if name.startswith("vit_gpt2"):
    return hf_vit_gpt2
  if name.startswith("vit"):
    return timm_vit
  if name.startswith(RCNN_PREFIXES):
    return torchvision_rcnn
  if name.startswith(DETECTION_PREFIXES):
    return torchvision_detection
  return torchvision_cnn


def from_torch(name: str, state_dict: dict[str, Any], **kwargs) -> dict:
  """A torchvision/timm state dict of variant `name` -> Flax variables {'params', 'batch_stats'}.

  Keyword arguments go to the family's converter (e.g. ViT's `image_size`, `pool`, `scan`).
  """
  return _backend(name).from_torch(name, state_dict, **kwargs)


def to_torch(name: str, variables: dict, **kwargs) -> dict:
  """Flax variables of variant `name` -> a torchvision/timm state dict of numpy arrays."""
  return _backend(name).to_torch(name, variables, **kwargs)


def from_vit_npz(name_or_model, npz, **model_kwargs) -> dict:
  """An official ViT `.npz` checkpoint (vit_jax / big_vision naming) -> Flax variables.

  Keyword arguments are model constructor arguments (e.g. `image_size`, `num_classes`), as for
  `jaxvision.convert.vit_npz.from_vit_npz`.
  """
  return vit_npz.from_vit_npz(name_or_model, npz, **model_kwargs)


def _hf_backend(name: str):
  return hf_detr if name.startswith("detr") else hf_vit_gpt2


def from_hf(name: str, state_dict: dict[str, Any], **kwargs) -> dict:
  """A Hugging Face state dict -> Flax variables of `name`: a ViT + GPT-2
  VisionEncoderDecoderModel for the captioners (jaxvision.convert.hf_vit_gpt2), a
  DetrForObjectDetection for detr* (jaxvision.convert.hf_detr)."""
  return _hf_backend(name).from_hf(name, state_dict, **kwargs)


def to_hf(name: str, variables: dict, **kwargs) -> dict:
  """Flax variables of `name` (a captioner or detr*) -> a Hugging Face state dict of numpy
  arrays."""
  return _hf_backend(name).to_hf(name, variables, **kwargs)


__all__ = ["from_hf", "from_torch", "from_vit_npz", "to_hf", "to_torch"]
