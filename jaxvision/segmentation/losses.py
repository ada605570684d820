"""Pixel-wise segmentation losses: weighted softmax cross-entropy, binary cross-entropy, soft Dice.

Every function computes in float32 whatever the logits' dtype. Pixel losses return a [..., h, w]
map so that class weights, the U-Net weight map and the padding mask multiply in one place;
soft Dice is built from per-class sums so it is exact over any split into batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def class_probabilities(logits: jax.Array) -> jax.Array:
  """[..., K] probabilities; a single channel is a sigmoid logit for class 1 (K = 2)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits)
    return jnp.concatenate([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per pixel [..., h, w]; labels outside [0, K) give 0 (ignored)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:  # a sigmoid logit: the two-class softmax of (0, logit)
    logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jax.nn.one_hot(labels, logits.shape[-1]) * log_probs, axis=-1)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Sigmoid cross-entropy per pixel [..., h, w].

  One channel: the logit of class 1 against labels in {0, 1}. K channels: one sigmoid per
  class against the one-hot target (one-vs-rest), summed over the classes.
  """
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    targets = (labels == 1).astype(jnp.float32)[..., None]
  else:
    targets = jax.nn.one_hot(labels, logits.shape[-1])
  # log(1 + exp(-|x|)) form: stable for large |x|.
  loss = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(loss, axis=-1)


def pixel_weights(
    labels: jax.Array, class_weights: jax.Array | None = None, weight_map: jax.Array | None = None
) -> jax.Array:
  """Per-pixel weight: class weight of the true class times the (U-Net) weight map."""
  w = jnp.ones(labels.shape, jnp.float32)
  if class_weights is not None:
    cw = jnp.asarray(class_weights, jnp.float32)
    w = w * cw[jnp.clip(labels, 0, cw.shape[0] - 1)]
  if weight_map is not None:
    w = w * weight_map.astype(jnp.float32)
  return w


def dice_sums(
    logits: jax.Array, labels: jax.Array, num_classes: int, mask: jax.Array
) -> dict[str, jax.Array]:
  """Per-class soft-Dice sums over the masked pixels: sum p*g, sum p, sum g (each [K])."""
  probs = class_probabilities(logits)
  onehot = jax.nn.one_hot(labels, num_classes)
  m = mask.astype(jnp.float32)[..., None]
  axes = tuple(range(labels.ndim))
  return {
      "dice_intersection": jnp.sum(probs * onehot * m, axis=axes),
      "dice_prob": jnp.sum(probs * m, axis=axes),
      "dice_target": jnp.sum(onehot * m, axis=axes),
  }


def soft_dice_loss(
    intersection: jax.Array, prob: jax.Array, target: jax.Array, smooth: float = 1.0
) -> jax.Array:
  """1 - mean over classes of (2 sum p*g + s) / (sum p + sum g + s), from `dice_sums`."""
  return 1.0 - jnp.mean((2.0 * intersection + smooth) / (prob + target + smooth))
