"""The segmentation task: how per-pixel logits meet a batch of label maps.

`loss` is the training objective; `eval_sums` returns counts and sums that the trainer adds over
batches, devices and processes; `finalize` turns the totals into exact metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.segmentation import losses
from jaxvision.segmentation.metrics import confusion_matrix, confusion_metrics, label_mask, predict
from jaxvision.segmentation.tta import TTA_VERSIONS, tta_logits

LOSS_TERMS = ("cross_entropy", "bce", "dice")


def center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  """Center crop of [B, H, W, ...] to [B, height, width, ...] (the 'valid' U-Net's output)."""
  h, w = x.shape[1], x.shape[2]
  if h < height or w < width:
    raise ValueError(f"cannot crop a {h}x{w} map to the logits' larger {height}x{width}")
  top, left = (h - height) // 2, (w - width) // 2
  return x[:, top:top + height, left:left + width]


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
  """Image -> one of `num_classes` labels per pixel.

  Attributes:
    num_classes: number of classes K (a one-channel model output is a sigmoid logit, K = 2).
    loss_terms: summed loss terms, from 'cross_entropy', 'bce' and 'dice'.
    class_weights: per-class weights of the cross-entropy terms, or None.
    test_time_augment: '' (off), or evaluate the average over flipped/rotated versions:
      'dihedral' (the 8 flips/rotations) or 'hflip' (`tta.tta_logits`).
  """

  num_classes: int
  loss_terms: tuple[str, ...] = ("cross_entropy",)
  class_weights: tuple[float, ...] | None = None
  test_time_augment: str = ""

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f"segmentation needs num_classes >= 2, got {self.num_classes}")
    for term in self.loss_terms:
      if term not in LOSS_TERMS:
        raise ValueError(f"seg.loss term {term!r} is unknown; join terms of {LOSS_TERMS} by '+'")
    if not self.loss_terms:
      raise ValueError(f"seg.loss is empty; join terms of {LOSS_TERMS} by '+'")
    if self.test_time_augment and self.test_time_augment not in TTA_VERSIONS:
      raise ValueError(f"seg.tta={self.test_time_augment!r}: choose '' (off), "
                       f"{' or '.join(repr(v) for v in TTA_VERSIONS)}")
    if self.class_weights is not None and len(self.class_weights) != self.num_classes:
      raise ValueError(f"seg.class_weights has {len(self.class_weights)} values for "
                       f"{self.num_classes} classes")

  @classmethod
  def from_config(cls, num_classes: int, config=None) -> SegmentationTask:
    """The task configured by `config.seg` (defaults when `config` is None)."""
    if config is None:
      return cls(num_classes)
    if float(config.get("mixup_alpha", 0.0)) or float(config.get("cutmix_alpha", 0.0)):
      raise ValueError("mixup_alpha / cutmix_alpha are not supported by the segmentation task")
    terms = tuple(t.strip() for t in str(config.seg.loss).split("+") if t.strip())
    weights = config.seg.class_weights
    weights = tuple(float(w) for w in weights) if weights not in ("", None, ()) else None
    return cls(num_classes, terms, weights, str(config.seg.get("tta", "")))

  # -- shared pieces --------------------------------------------------------------------------
  def _aligned(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array | None]:
    """Label (and weight map) center-cropped to the logits' size (the 'valid' U-Net)."""
    h, w = logits.shape[1], logits.shape[2]
    labels = center_crop(batch["label"], h, w)
    weight = batch.get("weight")
    if weight is not None:
      weight = center_crop(weight, h, w)
    return labels, weight

  def _pixel_loss(self, logits, labels, weight) -> jax.Array:
    """Sum of the pixel-wise terms, weighted, per pixel [B, h, w]."""
    loss = jnp.zeros(labels.shape, jnp.float32)
    if "cross_entropy" in self.loss_terms:
      loss = loss + losses.pixel_cross_entropy(logits, labels)
    if "bce" in self.loss_terms:
      loss = loss + losses.binary_cross_entropy(logits, labels)
    return loss * losses.pixel_weights(labels, self.class_weights, weight)

  # -- the contract with the trainer ----------------------------------------------------------
  def loss(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean training loss over the labelled pixels of the batch, and its pixel accuracy."""
    labels, weight = self._aligned(logits, batch)
    mask = label_mask(labels, self.num_classes, batch.get("valid"))
    m = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    loss = jnp.sum(self._pixel_loss(logits, labels, weight) * m) / count
    if "dice" in self.loss_terms:
      s = losses.dice_sums(logits, labels, self.num_classes, mask)
      loss = loss + losses.soft_dice_loss(s["dice_intersection"], s["dice_prob"], s["dice_target"])
    accuracy = jnp.sum((predict(logits) == labels) * m) / count
    return loss, {"pixel_accuracy": accuracy}

  def eval_logits(self, apply_fn, images: jax.Array) -> jax.Array:
    """The logits that evaluation scores: `apply_fn(images)`, or its test-time average."""
    if self.test_time_augment:
      return tta_logits(apply_fn, images, self.test_time_augment)
    return apply_fn(images)

  def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Sums over the valid examples' labelled pixels: confusion matrix, loss, Dice sums, count."""
    labels, weight = self._aligned(logits, batch)
    valid = batch.get("valid")
    if valid is None:
      valid = jnp.ones(labels.shape[:1], bool)
    mask = label_mask(labels, self.num_classes, valid)
    confusion = confusion_matrix(labels, predict(logits), self.num_classes, mask)
    pixel_loss = jnp.sum(self._pixel_loss(logits, labels, weight) * mask)
    return {
        "confusion": confusion,
        "pixel_loss": pixel_loss,
        "count": jnp.sum(mask.astype(jnp.int32)),
        **losses.dice_sums(logits, labels, self.num_classes, mask),
    }

  def finalize(self, sums: dict) -> dict[str, float]:
    """Exact metrics of the whole split from the summed `eval_sums`."""
    count = max(int(np.asarray(sums["count"])), 1)
    loss = float(np.asarray(sums["pixel_loss"])) / count
    if "dice" in self.loss_terms:
      loss += float(losses.soft_dice_loss(
          np.asarray(sums["dice_intersection"]), np.asarray(sums["dice_prob"]),
          np.asarray(sums["dice_target"]),
      ))
    return {"loss": loss, **confusion_metrics(np.asarray(sums["confusion"]))}
