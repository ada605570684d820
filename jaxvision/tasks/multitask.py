"""Multi-task learning: one model, a classification head and a regression head, one summed loss.

    loss = classification_weight * cross_entropy + regression_weight * (MSE or MAE)

The model returns {'logits': (B, K), 'regression': (B,)} (jaxvision.models.multitask). The
regression target is derived from the batch itself, so any classification dataset serves:

  * 'ink' (default): the percentage of the image's pixels brighter than the middle of its own
    intensity range, 0..100. It measures how much of the image the stroke covers (a '1' has
    little ink, an '8' much), is independent of the class boundaries, and is invariant to the
    normalisation preset (any positive affine map of the pixel values keeps it). Under mixup it
    is measured on the mixed image, so it stays exact.
  * 'label': the class index as a number (0..K-1); with soft labels (mixup) their expected index.

Eval reports the classification metrics ('loss' is the cross-entropy alone, comparable with a
single-task run) plus mae, mse and r2 of the regression (r2 = 1 - mse / variance of the target
over the eval set).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision import losses, metrics
from jaxvision.tasks.base import TaskBase, image_spec
from jaxvision.tasks.classification import check_class_scores, mix, targets

TARGETS = ("ink", "label")
REGRESSION_LOSSES = ("mse", "mae")


def ink_percentage(images: jax.Array) -> jax.Array:
  """(B,) percentage of pixels (over all channels) above the midpoint of each image's range."""
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
  lo, hi = jnp.min(flat, axis=1, keepdims=True), jnp.max(flat, axis=1, keepdims=True)
  return 100.0 * jnp.mean(flat > 0.5 * (lo + hi), axis=1)


def _check_keys(outputs) -> None:
  if not isinstance(outputs, dict) or not {"logits", "regression"} <= set(outputs):
    got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
    raise ValueError(f"the multitask task needs model outputs {{'logits', 'regression'}}, got "
                     f"{got}; use a multi-task model such as lenet_multitask")


def _split(outputs) -> tuple[jax.Array, jax.Array]:
  _check_keys(outputs)
  return outputs["logits"].astype(jnp.float32), outputs["regression"].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class MultiTask(TaskBase):
  """Classification + regression from one model, trained on the weighted sum of both losses.

  Attributes:
    num_classes: number of classes.
    target: regression target, 'ink' or 'label' (see the module docstring).
    regression_loss: 'mse' or 'mae'.
    regression_weight: weight of the regression loss.
    classification_weight: weight of the cross-entropy.
    label_smoothing: mass spread uniformly over the classes in the training targets.
    mixup_alpha / cutmix_alpha: on-device mixup / cutmix of training batches (0: off).
    image_shape: (H, W, C) of the training images.
  """

  num_classes: int
  target: str = "ink"
  regression_loss: str = "mse"
  regression_weight: float = 1.0
  classification_weight: float = 1.0
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  image_shape: tuple[int, int, int] = (28, 28, 1)

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f"multitask target={self.target!r}; choose from {TARGETS}")
    if self.regression_loss not in REGRESSION_LOSSES:
      raise ValueError(f"config.multitask.regression_loss={self.regression_loss!r}; choose from "
                       f"{REGRESSION_LOSSES}")
    for name in ("regression_weight", "classification_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"config.multitask.{name}={getattr(self, name)} must be >= 0")

  @classmethod
  def from_config(cls, config) -> MultiTask:
    """The task as `config.multitask` and the resolved run config describe it."""
    m = config.multitask
    return cls(int(config.num_classes), image_shape=tuple(config.data_info.image_shape),
               target=m.target,
               regression_loss=m.regression_loss, regression_weight=float(m.regression_weight),
               classification_weight=float(m.classification_weight),
               label_smoothing=float(config.label_smoothing),
               mixup_alpha=float(config.mixup_alpha), cutmix_alpha=float(config.cutmix_alpha))

  @property
  def metric_names(self) -> tuple[str, ...]:
    """Classification metrics, then the regression's mae, mse and r2."""
    return (("loss", "accuracy") + (("top5",) if self.num_classes > 5 else ())
            + ("mae", "mse", "r2"))

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Images and integer labels (the regression target is derived from them)."""
    return {"image": image_spec(batch_size, self.image_shape),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32)}

  def augment(self, batch: dict, rng: jax.Array) -> dict:
    """Mixup / cutmix when configured (the ink target is then measured on the mixed image)."""
    return mix(batch, rng, self.num_classes, self.mixup_alpha, self.cutmix_alpha)

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """The model sees the images."""
    return (batch["image"],), {}

  def check_outputs(self, outputs) -> None:
    """The model must return {'logits': (N, K), 'regression': (N,)}."""
    _check_keys(outputs)
    check_class_scores(outputs["logits"], self.num_classes, "multitask")

  def regression_targets(self, batch: dict) -> jax.Array:
    """(B,) float32 regression targets derived from the batch."""
    if self.target == "ink":
      return ink_percentage(batch["image"])
    if "soft_label" in batch:
      return batch["soft_label"] @ jnp.arange(self.num_classes, dtype=jnp.float32)
    return batch["label"].astype(jnp.float32)

  def _regression_error(self, prediction, target):
    error = prediction - target
    return jnp.square(error) if self.regression_loss == "mse" else jnp.abs(error)

  def loss(self, outputs, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the mean cross-entropy and the mean regression loss, and batch metrics."""
    logits, prediction = _split(outputs)
    class_target = targets(batch, self.num_classes, self.label_smoothing)
    cross_entropy = jnp.mean(losses.softmax_cross_entropy(logits, class_target))
    target = self.regression_targets(batch)
    regression = jnp.mean(self._regression_error(prediction, target))
    loss = self.classification_weight * cross_entropy + self.regression_weight * regression
    return loss, {
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "cross_entropy": cross_entropy,
        "regression_loss": regression,
        "mae": jnp.mean(jnp.abs(prediction - target)),
    }

  def predict(self, forward, batch: dict):
    """One forward pass: {'logits', 'regression'}."""
    return forward(batch["image"])

  def eval_sums(self, outputs, batch: dict) -> dict[str, jax.Array]:
    """Sums over the valid examples; `finalize` turns them into metrics."""
    logits, prediction = _split(outputs)
    sums = metrics.classification_sums(logits, batch["label"], batch["valid"])
    if self.num_classes <= 5:
      del sums["top5"]
    valid = batch["valid"].astype(jnp.float32)
    target = self.regression_targets({k: v for k, v in batch.items() if k != "soft_label"})
    error = prediction - target
    return {
        **sums,
        "mae": jnp.sum(jnp.abs(error) * valid),
        "mse": jnp.sum(jnp.square(error) * valid),
        "target_sum": jnp.sum(target * valid),
        "target_sq_sum": jnp.sum(jnp.square(target) * valid),
    }

  def finalize(self, sums: dict, examples: dict) -> dict[str, float]:
    """Means over the eval set, and r2 of the regression."""
    del examples
    means = metrics.finalize_sums(sums)
    mean, mean_sq = means.pop("target_sum"), means.pop("target_sq_sum")
    variance = mean_sq - mean * mean
    means["r2"] = 1.0 - means["mse"] / variance if variance > 1e-12 else float("nan")
    return means
