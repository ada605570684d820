"""Segmentation metrics from a confusion matrix summed over batches, devices and processes.

Counts are int32 and added, never averaged, so pixel accuracy, IoU and Dice over a split are
exact whatever the batching. Rows are the true class, columns the predicted class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def predict(logits: jax.Array) -> jax.Array:
  """Class map [..., h, w] from logits [..., h, w, K]; one channel means a sigmoid logit (> 0)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def label_mask(labels: jax.Array, num_classes: int, valid: jax.Array | None = None) -> jax.Array:
  """Pixels that count: labels in [0, K) (others, e.g. 255, are ignored) of valid examples."""
  mask = (labels >= 0) & (labels < num_classes)
  if valid is not None:
    mask = mask & valid.reshape(valid.shape + (1,) * (labels.ndim - valid.ndim)).astype(bool)
  return mask


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, mask: jax.Array | None = None
) -> jax.Array:
  """[K, K] int32 counts of (true class, predicted class) over the pixels where `mask` is set."""
  k = num_classes
  if mask is None:
    mask = label_mask(labels, k)
  index = jnp.clip(labels, 0, k - 1) * k + jnp.clip(predictions, 0, k - 1)
  # Scatter-add of int32 counts: exact, and memory independent of K (no [pixels, K*K] one-hot).
  counts = jnp.zeros((k * k,), jnp.int32).at[index.reshape(-1)].add(
      mask.reshape(-1).astype(jnp.int32)
  )
  return counts.reshape(k, k)


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
  """Pixel accuracy / error, per-class and mean IoU and Dice from a summed confusion matrix.

  A class that appears neither in the labels nor in the predictions has no IoU or Dice
  (reported as NaN) and is left out of the means.
  """
  c = np.asarray(confusion, np.float64)
  if c.ndim != 2 or c.shape[0] != c.shape[1]:
    raise ValueError(f"confusion matrix must be [K, K], got shape {c.shape}")
  total = c.sum()
  tp = np.diag(c)
  true, pred = c.sum(axis=1), c.sum(axis=0)
  union = true + pred - tp
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    dice = np.where(true + pred > 0, 2 * tp / (true + pred), np.nan)
  accuracy = float(tp.sum() / total) if total else float("nan")
  out = {
      "pixel_accuracy": accuracy,
      "pixel_error": 1.0 - accuracy,
      "miou": _nanmean(iou),
      "dice": _nanmean(dice),
  }
  out.update({f"iou_{k}": float(v) for k, v in enumerate(iou)})
  out.update({f"dice_{k}": float(v) for k, v in enumerate(dice)})
  return out


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")
