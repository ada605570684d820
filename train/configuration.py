"""Checks on a config before anything runs, each failing with one line that names the key."""

from __future__ import annotations

import math
import os
import re

from jaxvision.convert import hub
from jaxvision.data import parse_uri
from jaxvision.models import model_info
from jaxvision.tasks import TASKS
from train.optim import OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "bfloat16", "float16")


def validate(config) -> None:
  """Raises ValueError naming the first key whose value cannot work."""
  model_info(config.model)
  parse_uri(config.dataset)

  def need(ok: bool, key: str, what: str):
    if not ok:
      raise ValueError(f"config.{key}={config[key]!r}: {what}")

  lr = float(config.learning_rate)
  need(math.isfinite(lr) and lr >= 0, "learning_rate", "must be a finite number >= 0")
  need(config.batch_size > 0, "batch_size", "must be positive")
  need(config.eval_batch_size >= 0, "eval_batch_size", "must be >= 0 (0: same as batch_size)")
  need(config.total_steps > 0 or config.num_epochs > 0, "total_steps",
       "must be positive (or set num_epochs)")
  need(config.num_epochs >= 0, "num_epochs", "must be >= 0")
  need(config.image_size > 0, "image_size", "must be positive")
  need(config.image_width >= 0, "image_width", "must be >= 0 (0: image_size, square)")
  need(config.log_every > 0, "log_every", "must be positive")
  need(config.eval_every >= 0, "eval_every", "must be >= 0")
  need(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
  need(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  need(config.optimizer in OPTIMIZERS, "optimizer", f"choose from {', '.join(OPTIMIZERS)}")
  need(config.schedule in SCHEDULES, "schedule", f"choose from {', '.join(SCHEDULES)}")
  need(config.warmup_steps >= 0, "warmup_steps", "must be >= 0")
  need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
  need(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0")
  need(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
  need(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1)")
  need(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
  need(config.mixup_alpha >= 0, "mixup_alpha", "must be >= 0")
  need(config.cutmix_alpha >= 0, "cutmix_alpha", "must be >= 0")
  need(config.dtype in DTYPES, "dtype", f"choose from {', '.join(DTYPES)}")
  need(config.parallel in ("mesh", "pmap"), "parallel", "choose 'mesh' or 'pmap'")
  need(config.task == "auto" or config.task in TASKS, "task",
       f"choose 'auto' (from the dataset) or one of {', '.join(TASKS)}")
  need(config.best_mode in ("max", "min"), "best_mode", "choose 'max' or 'min'")
  need(config.progress in ("auto", "bar", "lines", "none"), "progress",
       "choose 'auto', 'bar', 'lines' or 'none'")
  need(config.stop_at_step >= 0, "stop_at_step", "must be >= 0")
  need(config.scaled_lr_factor >= 0, "scaled_lr_factor", "must be >= 0")
  if (config.init_from and not config.init_from.startswith(hub.HUB_PREFIX)
      and not os.path.exists(config.init_from)):
    # Checked here, before the workdir is touched; the loop reads it only once it knows the run
    # starts afresh.
    raise ValueError(f"config.init_from={config.init_from!r}: no such file or directory")
  for key in ("freeze", "init_skip", "scaled_lr_params"):
    if config[key]:
      try:
        re.compile(config[key])
      except re.error as e:
        raise ValueError(
            f"config.{key}={config[key]!r} is not a regular expression: {e}") from None
