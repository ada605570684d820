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

from jaxvision import losses, metrics

TARGETS = ("ink", "label")
REGRESSION_LOSSES = ("mse", "mae")


def ink_percentage(images: jax.Array) -> jax.Array:
  """(B,) percentage of pixels (over all channels) above the midpoint of each image's range."""
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
  lo, hi = jnp.min(flat, axis=1, keepdims=True), jnp.max(flat, axis=1, keepdims=True)
  return 100.0 * jnp.mean(flat > 0.5 * (lo + hi), axis=1)


def _split(outputs) -> tuple[jax.Array, jax.Array]:
  if not isinstance(outputs, dict) or not {"logits", "regression"} <= set(outputs):
    got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
    raise ValueError(f"the multitask task needs model outputs {{'logits', 'regression'}}, got "
                     f"{got}; use a multi-task model such as lenet_multitask")
  return outputs["logits"].astype(jnp.float32), outputs["regression"].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class MultiTask:
  """Classification + regression from one model, trained on the weighted sum of both losses.

  Attributes:
    num_classes: number of classes.
    target: regression target, 'ink' or 'label' (see the module docstring).
    regression_loss: 'mse' or 'mae'.
    regression_weight: weight of the regression loss.
    classification_weight: weight of the cross-entropy.
    label_smoothing: mass spread uniformly over the classes in the training targets.
  """

  num_classes: int
  target: str = "ink"
  regression_loss: str = "mse"
  regression_weight: float = 1.0
  classification_weight: float = 1.0
  label_smoothing: float = 0.0

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
  def from_config(cls, num_classes: int, config=None) -> MultiTask:
    """The task as `config.multitask` and `config.label_smoothing` describe it."""
    if config is None:
      return cls(num_classes)
    m = config.multitask
    return cls(num_classes, target=m.target, regression_loss=m.regression_loss,
               regression_weight=float(m.regression_weight),
               classification_weight=float(m.classification_weight),
               label_smoothing=float(config.label_smoothing))

  def targets(self, batch: dict) -> jax.Array:
    """Class probability targets: mixed soft labels when the batch carries them, else one-hot."""
    if "soft_label" in batch:
      return batch["soft_label"]
    return losses.onehot(batch["label"], self.num_classes, self.label_smoothing)

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
    cross_entropy = jnp.mean(losses.softmax_cross_entropy(logits, self.targets(batch)))
    target = self.regression_targets(batch)
    regression = jnp.mean(self._regression_error(prediction, target))
    loss = self.classification_weight * cross_entropy + self.regression_weight * regression
    return loss, {
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "cross_entropy": cross_entropy,
        "regression_loss": regression,
        "mae": jnp.mean(jnp.abs(prediction - target)),
    }

  def eval_logits(self, apply_fn, images: jax.Array):
    """The outputs that evaluation scores: one forward pass, `apply_fn(images)`."""
    return apply_fn(images)

  def eval_sums(self, outputs, batch: dict) -> dict[str, jax.Array]:
    """Sums over the valid examples; `finalize` turns them into metrics."""
    logits, prediction = _split(outputs)
    sums = metrics.classification_sums(logits, batch["label"], batch["valid"])
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

  def finalize(self, sums: dict) -> dict[str, float]:
    """Means over the eval set, and r2 of the regression."""
    means = metrics.finalize_sums(sums)
    mean, mean_sq = means.pop("target_sum"), means.pop("target_sq_sum")
    variance = mean_sq - mean * mean
    means["r2"] = 1.0 - means["mse"] / variance if variance > 1e-12 else float("nan")
    return means
