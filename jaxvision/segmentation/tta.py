"""Test-time augmentation: predict flipped/rotated versions of the input, average.

The U-Net paper's ISBI 2012 entry (pixel error 0.0611) is "averaged over 7 rotated versions of
the input data". `dihedral_logits` does the same with all 8 symmetries of the square (4
rotations, each with and without a horizontal flip): every version's prediction is mapped back
to the input's orientation and the class probabilities are averaged. It returns log-probabilities,
so argmax, the cross-entropy and the confusion matrix of the averaged prediction follow as for
any logits. A one-channel (sigmoid) output stays a one-channel logit of the averaged probability.

`tta_logits(..., 'hflip')` averages the input and its horizontal mirror only: the choice for labels
that are not symmetric top to bottom (see configs/unet_membrane.py), where vertical flips and
rotations would average a systematic offset away.

`shift=s` also averages over the input translated by 0 or s pixels down and right (four
translations, the border mirrored in), each prediction moved back before the average. A model
that predicts per patch (Segmenter) sees its patch grid at four offsets: with s = half the patch
size the averaged map follows edges on a grid twice as fine.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Probabilities are clipped this far from 0 and 1 before the log, so no version's certainty
# becomes an infinite logit.
_EPS = 1e-7


def _transform(x: jax.Array, k: int, flip: bool) -> jax.Array:
  """[B, H, W, C] rotated by k quarter turns in the (H, W) plane after an optional flip."""
  if flip:
    x = x[:, :, ::-1]
  return jnp.rot90(x, k, axes=(1, 2))


def _untransform(y: jax.Array, k: int, flip: bool) -> jax.Array:
  """The inverse of `_transform`: undo the rotation, then the flip."""
  y = jnp.rot90(y, -k, axes=(1, 2))
  if flip:
    y = y[:, :, ::-1]
  return y


# The versions each choice averages, as (quarter turns, horizontal flip first).
TTA_VERSIONS: dict[str, tuple[tuple[int, bool], ...]] = {
    "dihedral": tuple((k, flip) for flip in (False, True) for k in range(4)),
    "hflip": ((0, False), (0, True)),
    "none": ((0, False),),
}


def _mean_probabilities(apply_fn, images: jax.Array, versions: str) -> jax.Array:
  """Class probabilities [B, h, w, K] averaged over the flipped/rotated `versions`."""
  total = None
  for k, flip in TTA_VERSIONS[versions]:
    logits = _untransform(apply_fn(_transform(images, k, flip)), k, flip).astype(jnp.float32)
    probs = jax.nn.sigmoid(logits) if logits.shape[-1] == 1 else jax.nn.softmax(logits, -1)
    total = probs if total is None else total + probs
  return total / len(TTA_VERSIONS[versions])


def _shifted_mean_probabilities(apply_fn, images: jax.Array, versions: str,
                                shift: int) -> jax.Array:
  """`_mean_probabilities` averaged over the translations (0|shift, 0|shift) of the input.

  A translated version has no prediction for the last `shift` rows/columns of the input; every
  pixel is averaged over the versions that cover it (the untranslated one covers all). The four
  translations run through one traced forward pass (`lax.map`), so the compile costs one.
  """
  padded = jnp.pad(images, ((0, 0), (shift, 0), (shift, 0), (0, 0)), mode="reflect")
  offsets = jnp.array([[0, 0], [0, shift], [shift, 0], [shift, shift]], jnp.int32)

  def moved_back(offset):
    dy, dx = offset[0], offset[1]
    # version[i, j] = images[i - dy, j - dx]: the content moves down and right.
    version = lax.dynamic_slice(padded, (0, shift - dy, shift - dx, 0), images.shape)
    probs = _mean_probabilities(apply_fn, version, versions)
    # Its output pixel (a + dy, b + dx) predicts the input's (a, b); beyond the edge: zeros.
    grown = jnp.pad(probs, ((0, 0), (0, shift), (0, shift), (0, 0)))
    return lax.dynamic_slice(grown, (0, dy, dx, 0), probs.shape)

  total = jnp.sum(lax.map(moved_back, offsets), 0)
  # The versions covering pixel (a, b): (1 + [a < h - shift]) * (1 + [b < w - shift]).
  h, w = total.shape[1:3]
  rows = 1.0 + (jnp.arange(h) < h - shift)
  cols = 1.0 + (jnp.arange(w) < w - shift)
  return total / (rows[:, None] * cols[None, :])[None, :, :, None]


def tta_logits(apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
               versions: str = "dihedral", shift: int = 0) -> jax.Array:
  """Log of the class probabilities averaged over the `versions` of `images` (TTA_VERSIONS),
  and with `shift` > 0 over its four translations by 0 or `shift` pixels (see the module doc).

  `apply_fn` maps [B, H, W, C] images to [B, h, w, K] logits; a 'valid' network's smaller,
  centred output is fine (the crop is symmetric). K = 1 means a sigmoid logit.
  """
  if versions not in TTA_VERSIONS:
    raise ValueError(f"test-time augmentation {versions!r}; choose from {tuple(TTA_VERSIONS)}")
  if images.ndim != 4:
    raise ValueError(f"tta_logits expects [B, H, W, C] images, got shape {images.shape}")
  if not 0 <= shift < min(images.shape[1:3]):
    raise ValueError(f"test-time shift {shift} must be >= 0 and below the image's "
                     f"{images.shape[1]}x{images.shape[2]} pixels")
  if shift:
    mean = _shifted_mean_probabilities(apply_fn, images, versions, shift)
  else:
    mean = _mean_probabilities(apply_fn, images, versions)
  mean = jnp.clip(mean, _EPS, 1.0 - _EPS)
  if mean.shape[-1] == 1:
    return jnp.log(mean) - jnp.log1p(-mean)
  return jnp.log(mean)


def dihedral_logits(apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
  """Log of the class probabilities averaged over the 8 dihedral versions of `images`."""
  return tta_logits(apply_fn, images, "dihedral")
