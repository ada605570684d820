"""mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on device, inside the jitted train step.

One mixing coefficient per batch (as timm's default 'batch' mode). Each example is mixed with its
neighbour in the batch (`roll` by one): the batch order is already random, so the pairing is as
random as a permutation, and under a sharded batch a roll moves only one row across each device
boundary instead of gathering the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _partner(x: jax.Array) -> jax.Array:
  return jnp.roll(x, 1, axis=0)


def mixup(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
  """lam * x + (1 - lam) * partner, for images and soft targets alike; lam ~ Beta(alpha, alpha)."""
  lam = jax.random.beta(rng, alpha, alpha)
  mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * _partner(images)
  return mixed, lam * targets + (1 - lam) * _partner(targets)


def cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
  """Pastes a box of the partner image (area ~ 1 - lam); targets mix by the pasted area."""
  lam_key, y_key, x_key = jax.random.split(rng, 3)
  lam = jax.random.beta(lam_key, alpha, alpha)
  h, w = images.shape[1], images.shape[2]
  cut = jnp.sqrt(1.0 - lam)
  cy = jax.random.uniform(y_key) * h
  cx = jax.random.uniform(x_key) * w
  y0, y1 = jnp.clip(jnp.round(cy - cut * h / 2), 0, h), jnp.clip(jnp.round(cy + cut * h / 2), 0, h)
  x0, x1 = jnp.clip(jnp.round(cx - cut * w / 2), 0, w), jnp.clip(jnp.round(cx + cut * w / 2), 0, w)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  mixed = jnp.where(box[None, :, :, None], _partner(images), images)
  # The box was clipped at the border: weight the labels by the area actually pasted.
  kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  return mixed, kept * targets + (1 - kept) * _partner(targets)


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Mixed images [B, H, W, C] and soft targets [B, K]; with both alphas > 0, one of the two at
  random per batch (probability 1/2 each)."""
  targets = targets.astype(jnp.float32)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    choice, key = jax.random.split(rng)
    return jax.lax.cond(
        jax.random.bernoulli(choice),
        lambda: cutmix(key, images, targets, cutmix_alpha),
        lambda: mixup(key, images, targets, mixup_alpha),
    )
  if cutmix_alpha > 0:
    return cutmix(rng, images, targets, cutmix_alpha)
  if mixup_alpha > 0:
    return mixup(rng, images, targets, mixup_alpha)
  return images, targets
