"""`build_transform`: the host-side transform of a split, chosen by its task (classification,
segmentation, detection, captioning)."""

from __future__ import annotations

from jaxvision.data.coco_captions import captioning_transform
from jaxvision.data.detection_transform import DEFAULT_MAX_BOXES, detection_transform
from jaxvision.data.transforms import (
    Transform,
    classification_transform,
    segmentation_transform,
)


def build_transform(
    data_config, *, train: bool, task: str,
    image_size: int | tuple[int, int] | None = None, geometry: bool = True,
    max_boxes: int | None = None,
) -> Transform:
  """The host-side transform of a split (see the module docstring); `geometry=False` skips the
  crop/resize stage for pipelines that crop before batching (the TFDS stream); `max_boxes`:
  detection's boxes per image (jaxvision.data.detection_transform, default 100)."""
  if isinstance(image_size, tuple) and task != "captioning":
    raise ValueError(f"config.image_width={image_size[1]} is for captioning only: {task} "
                     "inputs are square (image_size); leave it 0")
  if task == "detection":
    return detection_transform(data_config, train=train, image_size=image_size,
                               max_boxes=max_boxes or DEFAULT_MAX_BOXES)
  if task == "segmentation":
    return segmentation_transform(data_config, train=train, image_size=image_size)
  if task == "captioning":
    return captioning_transform(data_config, train=train, image_size=image_size)
  if task != "classification":
    raise ValueError(f"no transform for task {task!r}")
  return classification_transform(
      data_config, train=train, image_size=image_size, geometry=geometry
  )
