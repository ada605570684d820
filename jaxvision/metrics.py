"""Metrics accumulated as sums (counts, confusion matrices), so they are exact over batches,
devices and processes rather than averages of batch averages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.losses import onehot, softmax_cross_entropy


def classification_sums(
    logits: jax.Array, labels: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
  """Sums over the valid examples of a batch: loss, correct top-1/top-5, count."""
  valid = valid.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  loss = softmax_cross_entropy(logits, onehot(labels, logits.shape[-1]))
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  # Correct in top-k when fewer than k classes score strictly higher than the true one.
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  top5 = (jnp.sum(logits > true_logit, axis=-1) < k).astype(jnp.float32)
  return {
      "loss": jnp.sum(loss * valid),
      "accuracy": jnp.sum(top1 * valid),
      "top5": jnp.sum(top5 * valid),
      "count": jnp.sum(valid),
  }


def finalize_sums(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Divides every summed metric by the example count."""
  count = max(float(sums["count"]), 1.0)
  return {k: float(v) / count for k, v in sums.items() if k != "count"}
