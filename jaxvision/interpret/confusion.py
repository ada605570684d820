"""Confusion matrix and per-class precision / recall: the view of a classifier that imbalanced
data needs (overall accuracy hides a minority class the model never predicts)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int, valid=None) -> np.ndarray:
  """(K, K) int64 counts; row = true class, column = predicted class."""
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
  keep = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
  for name, values in (("label", labels[keep]), ("prediction", predictions[keep])):
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise ValueError(f"{name} {int(bad[0])} out of range for {num_classes} classes")
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels[keep], predictions[keep]), 1)
  return confusion


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """precision, recall, f1 and support per class; NaN where a class is never predicted / present."""
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion matrix must be square, got shape {confusion.shape}")
  tp = np.diag(confusion)
  predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(predicted > 0, tp / predicted, np.nan)
    recall = np.where(support > 0, tp / support, np.nan)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1)
  return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}
