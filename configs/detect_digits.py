"""Draft."""

from configs import base

PRESETS = ("fcos", "retinanet", "ssd")


def get_config(arg: str | None = None):
  """`arg` picks the detector."""
  preset = arg or "fcos"
  if preset not in PRESETS:
    raise ValueError(f"detect_digits preset {preset!r}; choose from {PRESETS}")
  c = base.get_config()
  c.task = "detection"
  c.dataset = "coco:/tmp/det/canvases"
  c.train_split = "train"
  c.eval_split = "val"
  c.image_size = 128
  c.batch_size = 16
  c.data.normalize = "half"
  c.best_metric = "ap"
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 0
  c.checkpoint_every = 0
  c.detection.max_boxes = 8
  if preset == "fcos":
    c.model = "fcos_tiny"
  elif preset == "retinanet":
    c.model = "retinanet_tiny"
  else:
    c.model = "ssd_tiny"
  return c
