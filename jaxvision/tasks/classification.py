"""A task says how logits meet a batch: the training loss, what evaluation scores, and the exact
eval sums.

The trainer is task-agnostic; `get_task(name)` returns one of these.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxvision import losses, metrics


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """Image -> one of `num_classes` labels.

  Attributes:
    num_classes: number of classes.
    label_smoothing: mass spread uniformly over the classes in the training targets.
    class_weights: per-class weights of the training cross-entropy (None: unweighted); see
      jaxvision.imbalance.class_weights. Eval metrics stay unweighted.
  """

  num_classes: int
  label_smoothing: float = 0.0
  class_weights: tuple[float, ...] | None = None

  def targets(self, batch: dict) -> jax.Array:
    """Probability targets: mixed soft labels when the batch carries them, else one-hot."""
    if "soft_label" in batch:
      return batch["soft_label"]
    return losses.onehot(batch["label"], self.num_classes, self.label_smoothing)

  def loss(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean training loss over the batch, and batch metrics to log."""
    targets = self.targets(batch)
    per_example = losses.softmax_cross_entropy(logits, targets)
    if self.class_weights is not None:
      # A soft target (mixup, smoothing) weighs each class by its share of the target.
      per_example = per_example * (targets @ jnp.asarray(self.class_weights, jnp.float32))
    loss = jnp.mean(per_example)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}

  def eval_logits(self, apply_fn, images: jax.Array) -> jax.Array:
    """The logits that evaluation scores: one forward pass, `apply_fn(images)`."""
    return apply_fn(images)

  def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Sums to add over the eval set; `finalize` turns them into metrics."""
    return metrics.classification_sums(logits, batch["label"], batch["valid"])

  def finalize(self, sums: dict) -> dict[str, float]:
    """Every eval-set sum divided by the example count (accuracy, loss, ...)."""
    return metrics.finalize_sums(sums)


def get_task(name: str, *, num_classes: int, config=None):
  """The task `name` ('classification', 'segmentation' or 'multitask') configured from the run
  config."""
  if name == "classification":
    from jaxvision.imbalance import parse_class_weights

    smoothing = float(config.label_smoothing) if config is not None else 0.0
    weights = (parse_class_weights(config.get("class_weights"), num_classes)
               if config is not None else None)
    return ClassificationTask(num_classes, smoothing, weights)
  if name == "multitask":
    from jaxvision.multitask import MultiTask

    return MultiTask.from_config(num_classes, config)
  if name == "segmentation":
    from jaxvision.segmentation import SegmentationTask

    return SegmentationTask.from_config(num_classes, config)
  raise ValueError(f"task={name!r} is unknown; choose 'classification', 'segmentation' or "
                   "'multitask'")
