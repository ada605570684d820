"""The Task protocol: a task owns how a batch meets the model.

The trainer never looks inside a batch or a model output. Its steps call only these methods
(`train/step.py`):

    train step   batch = task.augment(batch, rng)               # on device, e.g. mixup
                 args, kwargs = task.model_inputs(batch)
                 outputs = model.apply(variables, *args, train=True, **kwargs)
                 loss, metrics = task.loss(outputs, batch)
    eval step    predictions = task.predict(forward, batch)     # forward(*args, method=, **kw)
                 sums = task.eval_sums(predictions, batch)      # added over batches and devices
                 examples = task.eval_examples(predictions, batch)  # gathered to the host
    host         metrics = task.finalize(sums, examples)

Before anything is built, the class's `resolve(config, train_input)` writes what the task derives
from the data into the run config (e.g. a vocabulary size); then, before the first step,
`input_spec` (the batch contract, for init and abstract compiles),
`check_outputs` (one-line error when the model's outputs cannot serve the task) and
`metric_names` (what `finalize` returns, so `best_metric` is checked up front). Host batches
pass through `prepare` after the data transform; at the end of a run `save_pictures` draws a
few eval predictions.

A new task is a class with these methods (inherit `TaskBase` for the common defaults) and a
line in `jaxvision.tasks.TASKS`; the step and the loop stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

Batch = dict[str, Any]


@runtime_checkable
class Task(Protocol):
  """What the trainer needs from a task (see the module docstring for the call order)."""

  @classmethod
  def resolve(cls, config, train_input) -> None:
    """Writes the values the task derives from the data into the (unlocked) run config."""

  @classmethod
  def from_config(cls, config) -> Task:
    """The task as the resolved run config describes it."""

  @property
  def metric_names(self) -> tuple[str, ...]:
    """Names of the eval metrics `finalize` returns."""

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch as the input pipeline delivers it."""

  def augment(self, batch: Batch, rng: jax.Array) -> Batch:
    """On-device training augmentation of a batch (inside the jitted step)."""

  def model_inputs(self, batch: Batch) -> tuple[tuple, dict]:
    """(args, kwargs) the model is called with: `model.apply(variables, *args, **kwargs)`."""

  def loss(self, outputs: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar training loss and batch-mean metrics from the training forward pass."""

  def predict(self, forward: Callable[..., Any], batch: Batch) -> Any:
    """What evaluation scores. `forward(*args, **kwargs)` is
    `model.apply(variables, *args, train=False, **kwargs)`: `method=` and `mutable=` pass
    through (a method called this way takes the `train` keyword too). A task may call it more
    than once (test-time averaging, decoding with a cache)."""

  def eval_sums(self, predictions: Any, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the batch's valid examples; the trainer adds them over batches, devices and
    processes, so the totals are exact."""

  def eval_examples(self, predictions: Any, batch: Batch) -> dict[str, jax.Array]:
    """Per-example arrays [B, ...] for metrics that are not sums (COCO AP, BLEU); {} for none.

    The trainer gathers them over devices and processes in batch order, padded examples
    included (`batch['valid']` marks the real ones, include it when `finalize` needs it).
    """

  def finalize(self, sums: dict[str, np.ndarray],
               examples: dict[str, np.ndarray]) -> dict[str, float]:
    """The split's metrics from the summed `eval_sums` and the concatenated `eval_examples`."""

  def check_outputs(self, outputs: Any) -> None:
    """Raises a one-line ValueError when the model's outputs (`jax.eval_shape` structs) do not
    fit the task."""

  def prepare(self, batch: Batch, *, train: bool) -> Batch:
    """Host-side additions to a transformed numpy batch (e.g. the U-Net weight map); runs in
    the input pipeline's background thread."""

  @property
  def num_pictures(self) -> int:
    """Eval examples `save_pictures` draws at the end of a run (0: none)."""

  def save_pictures(self, path_prefix: str, batch: Batch, predictions: Any) -> list[str]:
    """Writes pictures of eval examples (host numpy `batch` of valid examples and their
    `predictions`) to files starting with `path_prefix`; returns their paths."""


class TaskBase:
  """The defaults most tasks share: no on-device augmentation, no host additions, no
  per-example eval outputs and no pictures. Tasks override what they need."""

  @classmethod
  def resolve(cls, config, train_input) -> None:
    del config, train_input

  def augment(self, batch: Batch, rng: jax.Array) -> Batch:
    del rng
    return batch

  def eval_examples(self, predictions: Any, batch: Batch) -> dict[str, jax.Array]:
    del predictions, batch
    return {}

  def prepare(self, batch: Batch, *, train: bool) -> Batch:
    del train
    return batch

  @property
  def num_pictures(self) -> int:
    return 0

  def save_pictures(self, path_prefix: str, batch: Batch, predictions: Any) -> list[str]:
    del path_prefix, batch, predictions
    return []


def image_spec(batch_size: int, image_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
  """The float32 [B, H, W, C] image of every task's batch."""
  return jax.ShapeDtypeStruct((batch_size, *(int(d) for d in image_shape)), np.float32)
