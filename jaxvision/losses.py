"""Losses as pure functions of logits and targets; computed in float32 whatever the model dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def onehot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """Integer labels -> (optionally smoothed) one-hot targets in float32."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if smoothing:
    targets = targets * (1.0 - smoothing) + smoothing / num_classes
  return targets


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example cross-entropy against probability targets [..., K]; returns [...] float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)
