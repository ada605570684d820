"""mixup / CutMix on device: label mixing, the pasted area, and jit."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.data.mix import mix_batch


def _batch(b=8, h=16, w=12, k=5):
  images = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, h, w, 3))
  targets = jax.nn.one_hot(jnp.arange(b) % k, k)
  return images, targets


@functools.cache
def _compiled(fn, **alphas):
  """`fn` over a batch of keys, compiled once per setting (Beta sampling is slow to compile)."""
  return jax.jit(jax.vmap(lambda key, images, targets: fn(key, images, targets, **alphas),
                          in_axes=(0, None, None)))


def _keys(n):
  return jax.random.split(jax.random.key(0), n)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_labels_sum_to_one(mixup_alpha, cutmix_alpha):
  images, targets = _batch()
  fn = _compiled(mix_batch, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
  mixed, soft = fn(_keys(20), images, targets)
  chex.assert_shape(mixed, (20, *images.shape))
  chex.assert_shape(soft, (20, *targets.shape))
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  assert float(soft.min()) >= 0


def test_mixup_mixes_images_and_labels_by_the_same_weight():
  """Example i is mixed with example i-1 by the same weight for pixels and labels."""
  images, targets = _batch()
  mixed, soft = _compiled(mix_batch, mixup_alpha=0.2, cutmix_alpha=0.0)(_keys(20), images, targets)
  mixed, soft = mixed[3], soft[3]
  lam = float(mixed[1, 0, 0, 0] - 0.0)  # i=1, partner 0
  order = np.arange(8)
  np.testing.assert_allclose(mixed[:, 0, 0, 0], lam * order + (1 - lam) * np.roll(order, 1),
                             rtol=1e-5)
  np.testing.assert_allclose(soft, lam * targets + (1 - lam) * jnp.roll(targets, 1, axis=0),
                             rtol=1e-5)


def test_cutmix_label_weight_equals_the_pasted_area():
  images, targets = _batch()
  all_mixed, all_soft = _compiled(mix_batch, mixup_alpha=0.0, cutmix_alpha=1.0)(
      _keys(20), images, targets)
  for mixed, soft in zip(all_mixed, all_soft, strict=True):
    # Pixels of example 1 that came from its partner (example 0).
    pasted = float(jnp.mean(mixed[1, ..., 0] == 0.0))
    partner_weight = float(jnp.sum(soft[1] * targets[0]))
    np.testing.assert_allclose(partner_weight, pasted, atol=1e-6)
    # The pasted region is one axis-aligned box.
    ys, xs = np.nonzero(np.asarray(mixed[1, ..., 0] == 0.0))
    if len(ys):
      assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_both_alphas_choose_each_method_sometimes():
  images, targets = _batch()
  kinds = set()
  both = _compiled(mix_batch, mixup_alpha=0.8, cutmix_alpha=1.0)
  for mixed in both(_keys(20), images, targets)[0]:
    values = np.unique(np.asarray(mixed[1, ..., 0]))
    # CutMix leaves only the two original values; mixup blends them into one new value.
    kinds.add("cutmix" if set(values.tolist()) <= {0.0, 1.0} else "mixup")
  assert kinds == {"cutmix", "mixup"}


def test_no_alpha_is_identity():
  images, targets = _batch()
  mixed, soft = mix_batch(jax.random.key(0), images, targets)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(soft, targets)
