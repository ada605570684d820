"""Tasks: how a batch meets the model (the `Task` protocol in `jaxvision.tasks.base`).

    task = create_task(config)       # config.task names one of TASKS
"""

from __future__ import annotations

import importlib

from jaxvision.tasks.base import Task, TaskBase, image_spec

# task name -> 'module:Class'; the class has `from_config(config)`. Imported on first use, so
# a run pays only for its own task's dependencies.
TASKS = {
    "classification": "jaxvision.tasks.classification:ClassificationTask",
    "segmentation": "jaxvision.tasks.segmentation:SegmentationTask",
    "multitask": "jaxvision.tasks.multitask:MultiTask",
    "captioning": "jaxvision.tasks.captioning:CaptioningTask",
    "detection": "jaxvision.tasks.detection:DetectionTask",
}


def task_class(name: str):
  """The class registered for task `name`."""
  if name not in TASKS:
    raise ValueError(f"task={name!r} is unknown; choose from {', '.join(TASKS)}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def create_task(config) -> Task:
  """The task `config.task`, configured from the resolved run config."""
  return task_class(config.task).from_config(config)


__all__ = ["TASKS", "Task", "TaskBase", "create_task", "image_spec", "task_class"]
