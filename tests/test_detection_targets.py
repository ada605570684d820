"""Matchers and losses: hand-made cases, NumPy references of the formulas, and torchvision's
own matches and losses on a small RetinaNet / SSD / FCOS problem (goldens/detection_core.npz,
made by tests/parity/make_detection_core_goldens.py from padded ground truth whose padding rows
hold garbage boxes, one image without boxes)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.detection import anchors as A
from jaxvision.detection import losses as L
from jaxvision.detection import matchers as M

GOLDEN = pathlib.Path(__file__).parent / "parity" / "goldens" / "detection_core.npz"
# Compiled once per signature: far cheaper than dispatching every op eagerly.
iou_matcher = jax.jit(M.iou_matcher, static_argnums=(3, 4, 5))
ssd_matcher = jax.jit(M.ssd_matcher, static_argnums=(3,))
fcos_matcher = jax.jit(M.fcos_matcher)


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDEN))


def gt_of(golden):
  return golden["gt_boxes"], golden["gt_classes"], golden["gt_valid"]


# --- Matchers ------------------------------------------------------------------------------


def test_iou_matcher_hand_example():
  anchors = jnp.array([[0.0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 4.5], [50, 50, 60, 60],
                       [20, 20, 30, 30]])
  gt = jnp.array([[0.0, 0, 10, 10], [52, 52, 60, 70], [0, 0, 10, 10]])
  valid = jnp.array([True, True, False])  # the third row is padding
  # IoUs with gt 0: 1, 0.6, 0.45, 0, 0; with gt 1: anchor 3 has 48 / (100 + 144 - 48).
  m = iou_matcher(gt, valid, anchors, 0.5, 0.4, False)
  np.testing.assert_array_equal(m, [0, 0, -2, -1, -1])
  m = iou_matcher(gt, valid, anchors, 0.5, 0.4, True)
  np.testing.assert_array_equal(m, [0, 0, -2, 1, -1])  # anchor 3 is box 1's best
  none = iou_matcher(gt, jnp.zeros(3, bool), anchors, 0.5, 0.4, True)
  np.testing.assert_array_equal(none, [-1] * 5)
  with pytest.raises(ValueError, match="low_threshold"):
    M.iou_matcher(gt, valid, anchors, 0.4, 0.5)


def test_ssd_matcher_forces_best_anchor_and_fcos_matcher_hand_example():
  anchors = jnp.array([[0.0, 0, 10, 10], [40, 40, 50, 50], [41, 41, 51, 51]])
  gt = jnp.array([[30.0, 30, 52, 52], [0, 0, 9, 9], [0, 0, 1, 1]])
  valid = jnp.array([True, True, False])
  # Box 0 overlaps anchors 1 and 2 by < 0.5 (100/484, 100/484 -> anchor 1 first): forced.
  np.testing.assert_array_equal(ssd_matcher(gt, valid, anchors, 0.5), [1, 0, -1])
  # FCOS: 8 px anchors (points at their centers); the point (4, 4) lies in both boxes below,
  # within 1.5 x 8 px of both centers, at a distance in (0, 64): the smaller box wins.
  points = jnp.array([[0.0, 0, 8, 8], [96, 96, 104, 104]])
  boxes = jnp.array([[0.0, 0, 20, 20], [1, 1, 9, 9]])
  lower, upper = jnp.zeros(2), jnp.full(2, 64.0)
  np.testing.assert_array_equal(fcos_matcher(boxes, jnp.array([True, True]), points, lower,
                                               upper), [1, -1])
  np.testing.assert_array_equal(fcos_matcher(boxes, jnp.array([True, False]), points, lower,
                                               upper), [0, -1])
  # Out of the scale range (upper 5 < largest distance 16 for box 0, 5 for box 1): no match.
  np.testing.assert_array_equal(fcos_matcher(boxes, jnp.array([True, True]), points, lower,
                                               jnp.full(2, 5.0)), [-1, -1])


def test_matchers_equal_torchvision(golden):
  boxes, _, valid = gt_of(golden)
  anchors = golden["small_retinanet_anchors"]
  retina = jax.jit(jax.vmap(lambda b, v: M.iou_matcher(b, v, anchors, 0.5, 0.4, True)))(
      boxes, valid)
  np.testing.assert_array_equal(retina, golden["retinanet_matches"])
  ssd = jax.jit(jax.vmap(lambda b, v: M.ssd_matcher(b, v, anchors, 0.5)))(boxes, valid)
  np.testing.assert_array_equal(ssd, golden["ssd_matches"])
  fcos_set = A.fcos_anchors(64)
  np.testing.assert_array_equal(fcos_set.boxes, golden["small_fcos_anchors"])
  lower, upper = A.fcos_scale_ranges(fcos_set)
  fcos = jax.jit(jax.vmap(lambda b, v: M.fcos_matcher(b, v, fcos_set.boxes, lower, upper)))(
      boxes, valid)
  np.testing.assert_array_equal(fcos, golden["fcos_matches"])
  # The golden problem exercises every kind of match.
  assert (golden["retinanet_matches"] == -2).any() and (golden["fcos_matches"] >= 0).sum() > 10


# --- Elementwise losses --------------------------------------------------------------------


def test_elementwise_losses_match_formulas(golden):
  x, t = golden["focal_inputs"], golden["focal_targets"]
  focal = jax.jit(L.sigmoid_focal_loss, static_argnums=(2, 3))
  np.testing.assert_allclose(focal(x, t), golden["focal"], rtol=1e-5, atol=1e-7)
  p = 1 / (1 + np.exp(-x.astype(np.float64)))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  ref = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
  np.testing.assert_allclose(focal(x, t), ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(focal(x, t, -1.0, 2.0), ce * (1 - p_t) ** 2,
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(jax.jit(L.giou_loss)(golden["giou_boxes1"], golden["giou_boxes2"]),
                             golden["giou_loss"], rtol=1e-6, atol=1e-6)
  d = np.array([-3.0, -0.5, 0.0, 0.2, 2.0])
  np.testing.assert_allclose(L.smooth_l1_loss(d, 0.0, beta=1.0), [2.5, 0.125, 0, 0.02, 1.5],
                             rtol=1e-6)
  np.testing.assert_allclose(L.smooth_l1_loss(d, 0.0, beta=0.0), np.abs(d))
  np.testing.assert_allclose(L.l1_loss(d, 1.0), np.abs(d - 1))
  logits = np.array([[2.0, 0.0, -1.0]])
  ref_ce = -np.log(np.exp(logits[0, 1]) / np.exp(logits[0]).sum())
  np.testing.assert_allclose(L.softmax_cross_entropy(logits, np.array([1])), [ref_ce], rtol=1e-6)
  # Centerness: a point 1 from the left and 3 from the right, 2 from top and bottom.
  np.testing.assert_allclose(L.centerness_targets(np.array([1.0, 2, 3, 2])), np.sqrt(1 / 3))


def test_hard_negatives_take_the_highest_losses_three_per_positive():
  loss = jnp.array([[0.1, 5.0, 0.7, 0.3, 0.9, 0.2, 0.8, 0.05],
                    [0.4, 0.3, 0.2, 0.1, 0.6, 0.5, 0.9, 0.8]])
  fg = jnp.array([[False, True, False, False, False, False, False, False], [False] * 8])
  mask = jax.jit(L.hard_negatives)(loss, fg)
  np.testing.assert_array_equal(mask[0], [0, 0, 1, 0, 1, 0, 1, 0])  # 0.9, 0.8, 0.7
  assert not mask[1].any()  # no foreground: no negatives either


# --- Complete losses against torchvision ---------------------------------------------------


def test_complete_losses_equal_torchvision_with_finite_gradients(golden):
  """Values equal torchvision's compute_loss; gradients are finite and non-zero although the
  padding rows hold garbage and one image has no boxes."""
  boxes, classes, valid = (jnp.asarray(a) for a in gt_of(golden))
  anchors = golden["small_retinanet_anchors"]
  fcos_set = A.fcos_anchors(64)
  lower, upper = A.fcos_scale_ranges(fcos_set)
  cases = {
      "retinanet": (lambda c, r: L.retinanet_loss(c, r, anchors, boxes, classes, valid),
                    ("retinanet_logits", "retinanet_regression"),
                    ("classification", "bbox_regression")),
      "ssd": (lambda c, r: L.ssd_loss(c, r, anchors, boxes, classes, valid),
              ("ssd_logits", "retinanet_regression"), ("bbox_regression", "classification")),
      "fcos": (lambda c, r, t: L.fcos_loss(c, r, t, fcos_set.boxes, lower, upper, boxes,
                                           classes, valid),
               ("fcos_logits", "fcos_regression", "fcos_ctrness"),
               ("classification", "bbox_regression", "bbox_ctrness")),
  }
  for name, (fn, inputs, keys) in cases.items():
    args = [jnp.asarray(golden[k]) for k in inputs]
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True))
    (total, parts), grads = step(*args)
    np.testing.assert_allclose([parts[k] for k in keys], golden[f"{name}_loss"], rtol=2e-6,
                               err_msg=name)
    np.testing.assert_allclose(total, sum(parts.values()), rtol=1e-6)
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in grads), name
  with pytest.raises(ValueError, match="anchors for"):
    L.retinanet_loss(golden["retinanet_logits"], golden["retinanet_regression"], anchors[:-1],
                     boxes, classes, valid)
