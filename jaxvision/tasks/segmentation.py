"""Semantic segmentation: image -> one of `num_classes` labels per pixel.

`loss` is the training objective; `eval_sums` returns counts and sums that the trainer adds over
batches, devices and processes; `finalize` turns the totals into exact metrics; `prepare` adds
the U-Net paper's border weight map to training batches on the host; `save_pictures` writes
the overlays of a few eval predictions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.segmentation import losses
from jaxvision.segmentation.metrics import confusion_matrix, confusion_metrics, label_mask, predict
from jaxvision.segmentation.overlay import save_overlays
from jaxvision.segmentation.tta import TTA_VERSIONS, tta_logits
from jaxvision.segmentation.weight_map import add_weight_map
from jaxvision.tasks.base import TaskBase, image_spec

LOSS_TERMS = ("cross_entropy", "bce", "dice")


def center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  """Center crop of [B, H, W, ...] to [B, height, width, ...] (the 'valid' U-Net's output)."""
  h, w = x.shape[1], x.shape[2]
  if h < height or w < width:
    raise ValueError(f"cannot crop a {h}x{w} map to the logits' larger {height}x{width}")
  top, left = (h - height) // 2, (w - width) // 2
  return x[:, top:top + height, left:left + width]


@dataclasses.dataclass(frozen=True)
class SegmentationTask(TaskBase):
  """Image -> one of `num_classes` labels per pixel.

  Attributes:
    num_classes: number of classes K (a one-channel model output is a sigmoid logit, K = 2).
    loss_terms: summed loss terms, from 'cross_entropy', 'bce' and 'dice'.
    class_weights: per-class weights of the cross-entropy terms, or None.
    test_time_augment: '' (off), or evaluate the average over flipped/rotated versions:
      'dihedral' (the 8 flips/rotations) or 'hflip' (`tta.tta_logits`).
    test_time_shift: s > 0 also averages over the input translated by 0 or s pixels down and
      right (`tta.tta_logits`' shift), with or without `test_time_augment`.
    weight_map: (w0, sigma) of the U-Net paper's border weight map added to training batches,
      or None.
    overlays: eval examples drawn as overlay PNGs at the end of a run.
    image_shape: (H, W, C) of the training crops.
  """

  num_classes: int
  loss_terms: tuple[str, ...] = ("cross_entropy",)
  class_weights: tuple[float, ...] | None = None
  test_time_augment: str = ""
  test_time_shift: int = 0
  weight_map: tuple[float, float] | None = None
  overlays: int = 0
  image_shape: tuple[int, int, int] = (64, 64, 1)

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
    if self.test_time_shift < 0:
      raise ValueError(f"seg.tta_shift={self.test_time_shift} must be >= 0 pixels (0: off)")
    if self.class_weights is not None and len(self.class_weights) != self.num_classes:
      raise ValueError(f"seg.class_weights has {len(self.class_weights)} values for "
                       f"{self.num_classes} classes")

  @classmethod
  def from_config(cls, config) -> SegmentationTask:
    """The task as the resolved run config (`config.seg`) describes it."""
    if float(config.mixup_alpha) or float(config.cutmix_alpha):
      raise ValueError("mixup_alpha / cutmix_alpha are not supported by the segmentation task")
    seg = config.seg
    terms = tuple(t.strip() for t in str(seg.loss).split("+") if t.strip())
    weights = seg.class_weights
    weights = tuple(float(w) for w in weights) if weights not in ("", None, ()) else None
    weight_map = ((float(seg.weight_map_w0), float(seg.weight_map_sigma))
                  if seg.weight_map else None)
    return cls(int(config.num_classes), terms, weights, str(seg.tta), int(seg.tta_shift),
               weight_map, int(seg.overlays), image_shape=tuple(config.data_info.image_shape))

  @property
  def metric_names(self) -> tuple[str, ...]:
    """What `finalize` reports (per-class IoU as iou_0 .. iou_{K-1})."""
    return ("loss", "pixel_accuracy", "pixel_error", "miou", "dice",
            *(f"iou_{k}" for k in range(self.num_classes)))

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Images and label maps (and the weight map when it is on)."""
    h, w = self.image_shape[:2]
    spec = {"image": image_spec(batch_size, self.image_shape),
            "label": jax.ShapeDtypeStruct((batch_size, h, w), np.int32)}
    if self.weight_map is not None:
      spec["weight"] = jax.ShapeDtypeStruct((batch_size, h, w), np.float32)
    return spec

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """The model sees the images."""
    return (batch["image"],), {}

  def prepare(self, batch: dict, *, train: bool) -> dict:
    """Training batches get the border weight map (computed on the host: distance transforms)."""
    if not train or self.weight_map is None:
      return batch
    w0, sigma = self.weight_map
    return add_weight_map(batch, w0, sigma, num_classes=self.num_classes)

  def check_outputs(self, outputs) -> None:
    """The model must give per-pixel logits (N, H, W, K), or one sigmoid channel for K = 2."""
    shape, k = tuple(getattr(outputs, "shape", ())), self.num_classes
    if len(shape) != 4 or shape[-1] not in ((k, 1) if k == 2 else (k,)):
      raise ValueError(
          f"the model outputs {shape or type(outputs).__name__}, but segmentation needs per-pixel "
          f"logits (N, H, W, {k})"
          + ("; choose a segmentation model such as unet_tiny" if len(shape) == 2 else ""))

  @property
  def num_pictures(self) -> int:
    """Eval examples drawn as overlays at the end of a run."""
    return self.overlays

  def save_pictures(self, path_prefix: str, batch: dict, predictions) -> list[str]:
    """image | prediction | errors overlays, one PNG per example."""
    return save_overlays(path_prefix, batch["image"], batch["label"], predictions)

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

  def predict(self, forward, batch: dict) -> jax.Array:
    """The logits that evaluation scores: one forward pass, or its test-time average."""
    if self.test_time_augment or self.test_time_shift:
      return tta_logits(forward, batch["image"], self.test_time_augment or "none",
                        self.test_time_shift)
    return forward(batch["image"])

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

  def finalize(self, sums: dict, examples: dict) -> dict[str, float]:
    """Exact metrics of the whole split from the summed `eval_sums`."""
    del examples
    count = max(int(np.asarray(sums["count"])), 1)
    loss = float(np.asarray(sums["pixel_loss"])) / count
    if "dice" in self.loss_terms:
      loss += float(losses.soft_dice_loss(
          np.asarray(sums["dice_intersection"]), np.asarray(sums["dice_prob"]),
          np.asarray(sums["dice_target"]),
      ))
    return {"loss": loss, **confusion_metrics(np.asarray(sums["confusion"]))}
