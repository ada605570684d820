"""Everything a run is made of, built from its frozen config alone.

The trainer resolves the config from the data once (`train.resolve`), saves it as
WORKDIR/config.json, and from then on the model, the task and every tool (transfer, viz,
predict, export, dry run) come from these functions, so a saved config.json rebuilds the
exact model of its run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxvision.models import create_model
from jaxvision.tasks import Task, create_task
from train.checkpoint import restore_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(config):
  """The registry model of a resolved config, with a one-line error for a bad keyword."""
  kwargs = dict(config.model_kwargs.to_dict())
  try:
    return create_model(config.model, num_classes=config.num_classes,
                        dtype=DTYPES[config.dtype], **kwargs)
  except TypeError as e:
    raise ValueError(
        f"config.model_kwargs={kwargs} do not fit model {config.model!r}: {e}") from None


def build_task(config) -> Task:
  """The task of a resolved config (`config.task`), configured by its section of the config."""
  return create_task(config)


def load_config(workdir: str) -> ml_collections.FrozenConfigDict:
  """The resolved config a run saved (WORKDIR/config.json), frozen like the trainer's."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a trainer workdir")
  try:
    with open(path) as f:
      return ml_collections.FrozenConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable config: {e}") from None


@dataclasses.dataclass
class Run:
  """A finished or running trainer run, rebuilt from its workdir.

  Attributes:
    config: the resolved config (WORKDIR/config.json).
    model: the Flax module, built from `config` alone.
    task: the run's task.
    variables: {'params': ..., 'batch_stats': ...} of the checkpoint (host numpy arrays).
    step: the checkpoint's step.
  """

  config: ml_collections.FrozenConfigDict
  model: Any
  task: Task
  variables: dict
  step: int


def load_run(workdir: str, step: int | None = None) -> Run:
  """The run in `workdir` at checkpoint `step` (default: the latest)."""
  config = load_config(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} not found: the run has no checkpoint yet")
  params, batch_stats, step = restore_params(directory, step)
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return Run(config, build_model(config), build_task(config), variables, step)


def check_model(model, task, config) -> None:
  """A one-line error when the model cannot take the task's inputs, or its outputs do not fit
  the task.

  Runs the model abstractly (jax.eval_shape: no compute), so a mismatch is reported before
  anything is compiled or written, and names the model and the input instead of surfacing
  as a broadcasting error deep inside the loss.
  """
  spec = task.input_spec(1)
  where = (f"input {tuple(spec['image'].shape)} (dataset {config.dataset!r}, "
           f"image_size={config.image_size})")

  def init_outputs(batch):
    args, kwargs = task.model_inputs(batch)
    key = jax.random.key(0)
    return model.init_with_output({"params": key, "dropout": key}, *args, train=False,
                                  **kwargs)[0]

  try:
    outputs = jax.eval_shape(init_outputs, spec)
  except (ValueError, TypeError, IndexError, AssertionError, ZeroDivisionError) as e:
    reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if isinstance(e, ZeroDivisionError):
      reason = "the input is too small for its convolutions and poolings"
    raise ValueError(f"model {config.model!r} cannot take {where}: {reason}") from None
  try:
    task.check_outputs(outputs)
  except ValueError as e:
    raise ValueError(f"model {config.model!r} with {where}: {e}") from None
