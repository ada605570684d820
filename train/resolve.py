"""Resolve -> freeze: the run config completed from the data, once.

`resolve` opens the inputs, writes a cheap description of the data (`config.data_info`: image
shape, example counts, class names) and every value derived from it (`num_classes`, `task`,
`eval_batch_size`, `total_steps` from `num_epochs`, `model_kwargs.image_size` for models sized
by their input, and what the task derives, e.g. a vocabulary) into the config, and freezes it.
The frozen config is what the run saves as config.json and builds everything from
(train.build).
"""

from __future__ import annotations

import dataclasses
import logging

import ml_collections
import numpy as np

from jaxvision.data import create_input
from jaxvision.models import create_model
from jaxvision.tasks import task_class
from train.configuration import validate

log = logging.getLogger("train")


def _sized_by_input(model_name: str) -> bool:
  """Whether the model's parameters depend on its input size (a ViT's position embedding)."""
  return "image_size" in {f.name for f in dataclasses.fields(create_model(model_name))}


def resolve(config, *, process_index: int = 0, process_count: int = 1):
  """(frozen config, train input, eval input or None) for `config` (left unchanged)."""
  validate(config)
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's stays as given
  with config.unlocked():
    if not config.eval_batch_size:
      config.eval_batch_size = config.batch_size
  inputs = dict(process_index=process_index, process_count=process_count)
  train_input = create_input(config, config.train_split, train=True, **inputs)
  eval_input = (create_input(config, config.eval_split, train=False, **inputs)
                if config.eval_split else None)

  with config.unlocked():
    info = config.data_info
    info.image_shape = tuple(int(d) for d in train_input.image_shape)
    info.train_examples = int(train_input.num_examples)
    info.eval_examples = int(eval_input.num_examples) if eval_input is not None else 0
    info.steps_per_epoch = int(train_input.steps_per_epoch)
    info.class_names = tuple(str(n) for n in train_input.class_names)
    if config.task == "auto":
      config.task = train_input.task
    # The task first: its model may count classes its own way (SSD's background column, a
    # caption decoder's vocabulary).
    task_class(config.task).resolve(config, train_input)
    if not config.num_classes:
      config.num_classes = int(train_input.num_classes)
    if config.num_epochs:
      config.total_steps = int(round(config.num_epochs * train_input.steps_per_epoch))
      if config.total_steps < 1:
        raise ValueError(
            f"config.num_epochs={config.num_epochs} is {config.total_steps} steps of "
            f"{train_input.steps_per_epoch} per epoch; train at least one step")
    if "image_size" not in config.model_kwargs and _sized_by_input(config.model):
      height, width = info.image_shape[:2]
      config.model_kwargs.image_size = height if height == width else (height, width)
  for key, data in (("train_split", train_input), ("eval_split", eval_input)):
    _warn_missing_classes(key, config[key], data, int(config.num_classes))
  return ml_collections.FrozenConfigDict(config), train_input, eval_input


def _warn_missing_classes(key: str, split: str, data, num_classes: int) -> None:
  """One line when a split has no example of some classes (e.g. a slice of sorted data)."""
  counts = None if data is None else data.class_counts
  if counts is None:
    return
  counts = np.pad(counts, (0, max(0, num_classes - len(counts))))
  missing = np.nonzero(counts == 0)[0]
  if len(missing):
    names = data.class_names or tuple(str(i) for i in range(num_classes))
    listed = ", ".join(str(names[i]) if i < len(names) else str(i) for i in missing[:10])
    log.warning("%s=%r has no example of %d of the %d classes (%s%s)", key, split, len(missing),
                num_classes, listed, ", ..." if len(missing) > 10 else "")
