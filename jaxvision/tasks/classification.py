"""Classification: image -> one of `num_classes` labels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision import losses, metrics
from jaxvision.data.mix import mix_batch
from jaxvision.imbalance import parse_class_weights
from jaxvision.tasks.base import TaskBase, image_spec


def targets(batch: dict, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """Probability targets: the mixed soft labels when the batch carries them, else one-hot."""
  if "soft_label" in batch:
    return batch["soft_label"]
  return losses.onehot(batch["label"], num_classes, label_smoothing)


def mix(batch: dict, rng: jax.Array, num_classes: int, mixup_alpha: float,
        cutmix_alpha: float) -> dict:
  """The batch with mixup / cutmix applied on device, its targets as `soft_label`."""
  if not (mixup_alpha or cutmix_alpha):
    return batch
  images, soft = mix_batch(rng, batch["image"], targets(batch, num_classes),
                           mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
  return {**batch, "image": images, "soft_label": soft}


@dataclasses.dataclass(frozen=True)
class ClassificationTask(TaskBase):
  """Image -> one of `num_classes` labels.

  Attributes:
    num_classes: number of classes.
    label_smoothing: mass spread uniformly over the classes in the training targets.
    class_weights: per-class weights of the training cross-entropy (None: unweighted); see
      jaxvision.imbalance.class_weights. Eval metrics stay unweighted.
    mixup_alpha / cutmix_alpha: on-device mixup / cutmix of training batches (0: off).
    image_shape: (H, W, C) of the training images.
  """

  num_classes: int
  label_smoothing: float = 0.0
  class_weights: tuple[float, ...] | None = None
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  image_shape: tuple[int, int, int] = (28, 28, 1)

  @classmethod
  def from_config(cls, config) -> ClassificationTask:
    """The task as the resolved run config describes it."""
    return cls(
        int(config.num_classes), float(config.label_smoothing),
        parse_class_weights(config.class_weights, int(config.num_classes)),
        float(config.mixup_alpha), float(config.cutmix_alpha),
        image_shape=tuple(config.data_info.image_shape))

  @property
  def metric_names(self) -> tuple[str, ...]:
    """Eval loss and top-1 accuracy; top-5 only when there are more than 5 classes."""
    return ("loss", "accuracy") + (("top5",) if self.num_classes > 5 else ())

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Images and integer labels."""
    return {"image": image_spec(batch_size, self.image_shape),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32)}

  def augment(self, batch: dict, rng: jax.Array) -> dict:
    """Mixup / cutmix when configured."""
    return mix(batch, rng, self.num_classes, self.mixup_alpha, self.cutmix_alpha)

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """The model sees the images."""
    return (batch["image"],), {}

  def loss(self, outputs: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean (weighted) cross-entropy over the batch, and its accuracy."""
    logits = outputs.astype(jnp.float32)
    target = targets(batch, self.num_classes, self.label_smoothing)
    per_example = losses.softmax_cross_entropy(logits, target)
    if self.class_weights is not None:
      # A soft target (mixup, smoothing) weighs each class by its share of the target.
      per_example = per_example * (target @ jnp.asarray(self.class_weights, jnp.float32))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return jnp.mean(per_example), {"accuracy": accuracy}

  def predict(self, forward, batch: dict) -> jax.Array:
    """One forward pass: the class logits."""
    return forward(batch["image"])

  def eval_sums(self, predictions: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Loss, top-1 (and top-5) hits and the count over the valid examples."""
    sums = metrics.classification_sums(predictions, batch["label"], batch["valid"])
    if self.num_classes <= 5:
      del sums["top5"]
    return sums

  def finalize(self, sums: dict, examples: dict) -> dict[str, float]:
    """Every eval-set sum divided by the example count."""
    del examples
    return metrics.finalize_sums(sums)

  def check_outputs(self, outputs) -> None:
    """The model must give (N, num_classes) scores."""
    check_class_scores(outputs, self.num_classes, "classification")


def check_class_scores(outputs, num_classes: int, task: str) -> None:
  """One-line error unless `outputs` is an (N, num_classes) array."""
  shape = tuple(getattr(outputs, "shape", ()))
  if len(shape) != 2 or shape[-1] != num_classes:
    got = shape if hasattr(outputs, "shape") else type(outputs).__name__
    raise ValueError(
        f"the model outputs {got}, but {task} needs {num_classes} class scores per image, "
        f"(N, {num_classes})" + ("; this is a segmentation model" if len(shape) == 4 else ""))
