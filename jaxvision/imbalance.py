"""Imbalanced classes: loss weights per class, and class-balanced sampling orders.

Two remedies for a training split where some classes are rare:

  * re-weighting: `class_weights(labels, num_classes)` gives per-class weights for the
    cross-entropy (`config.class_weights`, see jaxvision.tasks.classification);
  * re-sampling: `balanced_epoch_order(labels, num_classes, seed, epoch)` draws an epoch's
    example order in which every class is equally likely; `config.data.balanced_sampling` puts
    it in place of the input pipeline's uniform permutation (same (seed, epoch) determinism,
    so resumed runs continue exactly).

Judge the result per class (`jaxvision.interpret.per_class_metrics`, `python -m train.viz
confusion`): overall accuracy hides a minority class the model never predicts.
"""

from __future__ import annotations

import numpy as np

WEIGHTINGS = ("inverse", "sqrt_inverse", "effective")


def class_counts(labels, num_classes: int) -> np.ndarray:
  """(K,) examples per class; a clear error for labels outside [0, num_classes)."""
  labels = np.asarray(labels).reshape(-1)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(f"label {int(bad)} out of range for {num_classes} classes")
  return np.bincount(labels.astype(np.int64), minlength=num_classes)


def class_weights(
    labels, num_classes: int, method: str = "inverse", beta: float = 0.999
) -> np.ndarray:
  """(K,) float32 loss weights that undo the class frequencies, averaging 1 over the examples.

  'inverse': 1 / n_k (each class contributes equally to the expected loss); 'sqrt_inverse':
  1 / sqrt(n_k) (a milder correction); 'effective': (1 - beta) / (1 - beta^n_k), the
  effective-number weighting of Cui et al. (2019). Absent classes get weight 0. Scaling so that
  sum_k n_k w_k = N keeps the loss (and so the learning rate) on its unweighted scale.
  """
  if method not in WEIGHTINGS:
    raise ValueError(f"class weighting {method!r}; choose from {WEIGHTINGS}")
  counts = class_counts(labels, num_classes).astype(np.float64)
  present = counts > 0
  if not present.any():
    raise ValueError("class_weights: no labels")
  raw = np.zeros(num_classes)
  if method == "inverse":
    raw[present] = 1.0 / counts[present]
  elif method == "sqrt_inverse":
    raw[present] = 1.0 / np.sqrt(counts[present])
  else:
    if not 0.0 < beta < 1.0:
      raise ValueError(f"effective-number beta={beta} must be in (0, 1)")
    raw[present] = (1.0 - beta) / (1.0 - beta ** counts[present])
  raw *= counts.sum() / np.sum(raw * counts)
  return raw.astype(np.float32)


def balanced_sampling_weights(labels, num_classes: int) -> np.ndarray:
  """(N,) probabilities of drawing each example so that every present class is equally likely."""
  labels = np.asarray(labels).reshape(-1)
  counts = class_counts(labels, num_classes)
  present = np.count_nonzero(counts)
  if not present:
    raise ValueError("balanced sampling: no labels")
  return (1.0 / (present * counts[labels])).astype(np.float64)


def balanced_epoch_order(labels, num_classes: int, seed: int, epoch: int,
                         size: int | None = None) -> np.ndarray:
  """An epoch's example indices drawn with replacement from `balanced_sampling_weights`.

  Deterministic in (seed, epoch), like the pipeline's uniform permutation; `size` defaults to
  the number of examples, so an epoch keeps its length and the step count its meaning.
  """
  labels = np.asarray(labels).reshape(-1)
  p = balanced_sampling_weights(labels, num_classes)
  rng = np.random.default_rng([seed, epoch, 0xBA1])
  return rng.choice(len(labels), size=len(labels) if size is None else size, replace=True, p=p)


def parse_class_weights(value, num_classes: int) -> tuple[float, ...] | None:
  """`config.class_weights` -> K floats, or None when unset ('' / () / None)."""
  if value is None or (isinstance(value, str) and not value.strip()) or (
      not isinstance(value, str) and len(value) == 0):
    return None
  if isinstance(value, str):
    try:
      value = [float(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    except ValueError:
      raise ValueError(
          f"config.class_weights={value!r}: expected comma-separated numbers") from None
  weights = tuple(float(v) for v in value)
  if len(weights) != num_classes:
    raise ValueError(f"config.class_weights has {len(weights)} values for {num_classes} classes")
  if not all(np.isfinite(w) and w >= 0 for w in weights):
    raise ValueError(f"config.class_weights={weights}: weights must be finite and >= 0")
  return weights
