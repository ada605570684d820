"""RoIAlign against torchvision's goldens (tests/parity/make_roi_align_goldens.py), no torch."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.detection.roi_align import roi_align

GOLDEN = pathlib.Path(__file__).resolve().parent / "parity" / "goldens" / "roi_align.npz"
# Eager dispatch compiles every primitive separately; one jit per shape configuration, with
# spatial_scale and aligned traced so that configurations differing only in them share one
# compilation, keeps the file fast.
crop = jax.jit(roi_align, static_argnames=("output_size", "sampling_ratio"))


@pytest.fixture(scope="module")
def goldens():
  with np.load(GOLDEN) as f:
    return dict(f)


def test_matches_torchvision_every_config(goldens):
  worst = {}
  for name in goldens["configs"]:
    features_key, boxes_key = goldens[f"{name}_inputs"]
    scale, aligned, sr, ph, pw = goldens[f"{name}_args"]
    got = crop(goldens[features_key], goldens[f"boxes_{boxes_key}"],
               goldens[f"box_indices_{boxes_key}"], (int(ph), int(pw)),
               spatial_scale=float(scale), sampling_ratio=int(sr), aligned=bool(aligned))
    want = goldens[f"{name}_output"]
    assert got.shape == want.shape, name
    worst[name] = float(np.abs(np.asarray(got) - want).max())
    # Both the zeroed (more than a pixel outside) and the ordinary bins must be exercised.
    outside = goldens[f"{name}_outside"]
    assert outside.any() and not outside.all(), name
  print("\n".join(f"{k}: max |ours - torchvision| {v:.2g}" for k, v in worst.items()))
  assert max(worst.values()) <= 1e-5, {k: v for k, v in worst.items() if v > 1e-5}


def test_jit_compiles_once_for_a_batch_of_boxes():
  traces = []

  @functools.partial(jax.jit, static_argnames=("output_size",))
  def crop(features, boxes, box_indices, output_size):
    traces.append(1)
    return roi_align(features, boxes, box_indices, output_size, sampling_ratio=2)

  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.standard_normal((2, 10, 12, 4), dtype=np.float32))
  for _ in range(3):
    xy = rng.uniform(0, 6, (32, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(1, 5, (32, 2))], 1), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 2, 32), jnp.int32)
    out = crop(features, boxes, idx, 7)
    assert out.shape == (32, 7, 7, 4)
  assert len(traces) == 1


@pytest.mark.parametrize("ratio", [0, -1])
def test_adaptive_sampling_ratio_is_refused(ratio):
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32), 2,
              sampling_ratio=ratio)


def test_linear_ramp_closed_form():
  # Bilinear interpolation reproduces a linear function exactly, so inside the map each bin's
  # average is the ramp at the bin centre: f(y, x) = 2y + 3x + 1 on pixel-centre coordinates.
  h, w = 8, 10
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ramp = (2.0 * yy + 3.0 * xx + 1.0).astype(np.float32)
  features = jnp.asarray(np.stack([ramp, -ramp], -1)[None])  # [1, H, W, 2]
  # aligned=True: image box [2, 1, 8, 5] -> map coordinates [1.5, 0.5, 7.5, 4.5], bins 3 x 2.
  out = crop(features, jnp.asarray([[2.0, 1.0, 8.0, 5.0]]), jnp.asarray([0]), (2, 3),
             sampling_ratio=3, aligned=True)
  centres_y = 0.5 + (np.arange(2) + 0.5) * 2.0
  centres_x = 1.5 + (np.arange(3) + 0.5) * 2.0
  want = 2.0 * centres_y[:, None] + 3.0 * centres_x[None, :] + 1.0
  np.testing.assert_allclose(np.asarray(out[0, :, :, 0]), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0, :, :, 1]), -want, atol=1e-5)
  # A box far outside the map samples nothing: zeros, not edge values.
  far = crop(features, jnp.asarray([[30.0, 30.0, 40.0, 40.0]]), jnp.asarray([0]), (2, 3),
              sampling_ratio=3, aligned=True)
  np.testing.assert_array_equal(np.asarray(far), 0.0)


def test_gradient_reaches_the_features_only():
  """RoIAlign is linear in the features, so the gradient of <crops, G> applied to any H is
  <crops of H, G>; the boxes get none, as in torchvision."""
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.standard_normal((2, 9, 11, 3), dtype=np.float32))
  other = jnp.asarray(rng.standard_normal((2, 9, 11, 3), dtype=np.float32))
  xy = rng.uniform(-2, 8, (6, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(0.5, 6, (6, 2))], 1), jnp.float32)
  idx = jnp.asarray([0, 1, 1, 0, 1, 0], jnp.int32)
  probe = jnp.asarray(rng.standard_normal((6, 4, 5, 3), dtype=np.float32))
  inner = lambda f, b: jnp.vdot(crop(f, b, idx, (4, 5), spatial_scale=0.8, sampling_ratio=2,
                                     aligned=False), probe)
  grad_features, grad_boxes = jax.grad(inner, argnums=(0, 1))(features, boxes)
  np.testing.assert_allclose(float(jnp.vdot(grad_features, other)), float(inner(other, boxes)),
                             rtol=1e-5)
  assert float(jnp.abs(grad_features).sum()) > 0
  np.testing.assert_array_equal(np.asarray(grad_boxes), 0.0)
