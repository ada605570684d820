"""Faster / Mask R-CNN training: targets, samplers and losses against torchvision's own Python
code (goldens from tests/parity/make_rcnn_loss_goldens.py, no torch here), the sampler's
counts and randomness, and the jitted train step of the tiny Mask R-CNN."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision.detection import rcnn_losses, rcnn_targets
from jaxvision.detection.coders import DeltaCoder
from jaxvision.detection.rcnn_train import rcnn_loss, rcnn_train_forward

GOLDEN = pathlib.Path(__file__).resolve().parent / "parity" / "goldens" / "rcnn_losses.npz"
TOL = 1e-5

match = jax.jit(rcnn_targets.match, static_argnames=("high", "low", "allow_low_quality"))
rpn_targets = jax.jit(rcnn_targets.rpn_targets)
rpn_sampled_loss = jax.jit(rcnn_losses.rpn_sampled_loss)
rpn_loss = jax.jit(rcnn_losses.rpn_loss)
sample_rois = jax.jit(rcnn_targets.sample_rois,
                      static_argnames=("num_samples", "positive_fraction", "fg_iou", "bg_iou"))
sample_balanced = jax.jit(rcnn_targets.sample_balanced,
                          static_argnames=("batch_size_per_image", "positive_fraction"))
mask_targets = jax.jit(rcnn_targets.mask_targets, static_argnames=("size", "sampling_ratio"))
maskrcnn_loss = jax.jit(rcnn_losses.maskrcnn_loss)


@pytest.fixture(scope="module")
def goldens():
  with np.load(GOLDEN) as f:
    # Box coordinates and noise are stored as float16 where that is exact; compute in float32.
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in f.items()}


# --- Against torchvision -------------------------------------------------------------------


def test_match_equals_torchvision_matcher(goldens):
  g = goldens
  iou = np.asarray(rcnn_targets.batch_iou(g["matcher_gt_boxes"], g["matcher_anchors"]))
  valid = g["matcher_gt_valid"]
  assert np.abs(np.where(valid[..., None], iou - g["matcher_iou"], 0)).max() <= 1e-6
  for name, (high, low, low_quality) in zip(g["matcher_cases"], g["matcher_args"], strict=True):
    got = np.asarray(match(g["matcher_iou"], valid, high=float(high), low=float(low),
                           allow_low_quality=bool(low_quality)))
    np.testing.assert_array_equal(got, g[f"matcher_{name}_matches"], err_msg=name)
  # The low-quality rule mattered, ties included: some gt's best IoU, below the high
  # threshold, is shared by duplicated anchors, and every one of them is rescued by it.
  strict = np.asarray(match(g["matcher_iou"], valid, high=0.7, low=0.3, allow_low_quality=False))
  rescued = (g["matcher_rpn_matches"] >= 0) & (strict < 0)
  best = np.where(valid, g["matcher_iou"].max(axis=2), np.inf)
  tied = g["matcher_iou"] == best[..., None]  # [B, M, N]
  tied_rescued = [tied[i, j].sum() >= 2 and rescued[i][tied[i, j]].all()
                  for i, j in zip(*np.nonzero(valid & (best < 0.7)), strict=True)]
  assert any(tied_rescued)


def test_encode_equals_torchvision_box_coder(goldens):
  for tag, weights in (("rpn", rcnn_targets.RPN_WEIGHTS), ("roi", rcnn_targets.ROI_WEIGHTS)):
    got = DeltaCoder(weights).encode(goldens["encode_references"], goldens["encode_proposals"])
    assert np.abs(got - goldens[f"encode_{tag}"]).max() <= TOL, tag


@pytest.mark.parametrize("case", ["small", "large"])
def test_rpn_targets_and_loss_equal_torchvision(goldens, case):
  g = {k[len(f"rpn_{case}_"):]: v for k, v in goldens.items() if k.startswith(f"rpn_{case}_")}
  labels, targets = rpn_targets(g["anchors"], g["gt_boxes"], g["gt_valid"])
  np.testing.assert_array_equal(labels, g["labels"])
  fg = g["labels"][..., None] == 1
  assert np.abs(np.where(fg, targets - g["regression_targets"], 0)).max() <= TOL
  # Fed torchvision's sample, the loss is torchvision's compute_loss.
  got = rpn_sampled_loss(g["objectness"], g["deltas"], labels, targets, g["positive"],
                         g["negative"])
  want = dict(zip(["loss_objectness", "loss_rpn_box_reg"], g["losses"], strict=True))
  for key, value in want.items():
    assert abs(float(got[key]) - value) <= TOL, (key, float(got[key]), value)
  if case == "small":
    # Fewer candidates than the sampler takes: any key samples all of them, as torchvision.
    for seed in (0, 1):
      full = rpn_loss(g["objectness"], g["deltas"], g["anchors"], g["gt_boxes"], g["gt_valid"],
                      jax.random.key(seed))
      for key, value in want.items():
        assert abs(float(full[key]) - value) <= TOL, (seed, key)


def _roi_golden(goldens, case):
  return {k[len(f"roi_{case}_"):]: v for k, v in goldens.items() if k.startswith(f"roi_{case}_")}


def _sample(g, seed=0, **kw):
  out = sample_rois(g["proposals"], g["proposal_valid"], g["gt_boxes"], g["gt_classes"],
                    g["gt_valid"], jax.random.key(seed), **kw)
  return {k: np.asarray(v) for k, v in out.items()}


def _check_layout(out, num_positive, num_sampled):
  slot = np.arange(out["valid"].shape[1])[None, :]
  np.testing.assert_array_equal(out["positive"], slot < num_positive[:, None])
  np.testing.assert_array_equal(out["valid"], slot < num_sampled[:, None])
  np.testing.assert_array_equal(out["positive"], out["valid"] & (out["labels"] > 0))


def test_sample_rois_equals_torchvision_when_all_are_taken(goldens):
  g = _roi_golden(goldens, "small")
  out = _sample(g)
  _check_layout(out, g["num_positive"], g["num_sampled"])
  for i, n in enumerate(g["num_sampled"]):
    # The same set (torchvision keeps index order, here positives come first): sort both.
    ours = np.lexsort(out["rois"][i, :n].T[::-1])
    theirs = np.lexsort(g["sampled_rois"][i, :n].T[::-1])
    np.testing.assert_array_equal(out["rois"][i, :n][ours], g["sampled_rois"][i, :n][theirs])
    np.testing.assert_array_equal(out["labels"][i, :n][ours], g["sampled_labels"][i, :n][theirs])
    np.testing.assert_array_equal(out["matched"][i, :n][ours],
                                  g["sampled_matched"][i, :n][theirs])
    diff = out["regression_targets"][i, :n][ours] - g["sampled_targets"][i, :n][theirs]
    assert np.abs(diff).max() <= TOL


def _candidate_rows(candidates, rois):
  """Index of each roi among the candidates (they are exact copies)."""
  hits = np.all(candidates[None, :, :] == rois[:, None, :], axis=-1)
  assert (hits.sum(axis=1) >= 1).all()
  return hits.argmax(axis=1)


def test_sample_rois_counts_and_assignments_equal_torchvision(goldens):
  g = _roi_golden(goldens, "large")
  out = _sample(g, seed=3)
  np.testing.assert_array_equal(g["num_positive"], [128, 128])  # the case is fg- and bg-rich
  _check_layout(out, g["num_positive"], g["num_sampled"])
  shared_positives = 0
  for i in range(len(g["num_sampled"])):
    # torchvision's candidates: the image's proposals, then its gt boxes. A sampled padding
    # proposal (a random box) would be found in neither.
    candidates = np.concatenate([g["proposals"][i][g["proposal_valid"][i]],
                                 g["gt_boxes"][i][g["gt_valid"][i]]])
    rows = _candidate_rows(candidates, out["rois"][i])
    assert len(set(rows)) == len(rows)
    np.testing.assert_array_equal(out["labels"][i], g["candidate_labels"][i, rows])
    np.testing.assert_array_equal(out["matched"][i], g["candidate_matched"][i, rows])
    # Regression targets where torchvision sampled the same positive.
    theirs = {tuple(r): t for r, t, lab in zip(g["sampled_rois"][i], g["sampled_targets"][i],
                                               g["sampled_labels"][i], strict=True) if lab > 0}
    for roi, target in zip(out["rois"][i][out["positive"][i]],
                           out["regression_targets"][i][out["positive"][i]], strict=True):
      if tuple(roi) in theirs:
        shared_positives += 1
        assert np.abs(target - theirs[tuple(roi)]).max() <= TOL
  assert shared_positives > 20


def test_fastrcnn_loss_equals_torchvision(goldens):
  g = goldens
  got = jax.jit(rcnn_losses.fastrcnn_loss)(g["fastrcnn_class_logits"], g["fastrcnn_box_regression"],
                                  g["fastrcnn_labels"], g["fastrcnn_regression_targets"],
                                  g["fastrcnn_valid"])
  assert np.abs(np.array([float(x) for x in got]) - g["fastrcnn_losses"]).max() <= TOL


def test_maskrcnn_loss_equals_torchvision(goldens):
  g = goldens
  got = maskrcnn_loss(g["mask_logits"], g["mask_targets_adaptive"], g["mask_labels"],
                      g["mask_positive"])
  assert abs(float(got) - float(g["mask_loss"])) <= TOL
  none = maskrcnn_loss(g["mask_logits"], g["mask_targets_adaptive"], g["mask_labels"],
                       np.zeros_like(g["mask_positive"]))
  assert float(none) == 0.0


@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
def test_mask_targets_equal_project_masks_on_boxes(goldens, ratio):
  g = goldens
  got = np.asarray(mask_targets(g["mask_gt_masks"], g["mask_rois"], g["mask_matched"],
                                sampling_ratio=ratio))
  positive = g["mask_positive"]
  assert np.abs(got - g[f"mask_targets_ratio{ratio}"])[positive].max() <= TOL


def test_mask_targets_against_torchvision_adaptive_sampling(goldens):
  # torchvision samples ceil(roi_size / 28) points per bin (1 to 5 here, RoIs of 16-128 px);
  # the fixed MASK_SAMPLING_RATIO (2) differs only along mask edges. Measured on these masks:
  # max 0.170, mean 0.0019 per target pixel, and the mask loss moves by 3.2e-4 (of 1.22).
  g = goldens
  positive = g["mask_positive"]
  got = mask_targets(g["mask_gt_masks"], g["mask_rois"], g["mask_matched"])
  diff = np.abs(np.asarray(got) - g["mask_targets_adaptive"])[positive]
  loss = maskrcnn_loss(g["mask_logits"], got, g["mask_labels"], positive)
  loss_diff = abs(float(loss) - float(g["mask_loss"]))
  print(f"\nfixed ratio {rcnn_targets.MASK_SAMPLING_RATIO} vs adaptive: max |diff| "
        f"{diff.max():.4f}, mean {diff.mean():.5f}; mask loss diff {loss_diff:.2e}")
  assert 0 < diff.max() <= 0.2 and diff.mean() <= 0.003 and loss_diff <= 1e-3


# --- The sampler ---------------------------------------------------------------------------


def _labels(num_fg, num_bg, length=1600, seed=0):
  """Shuffled labels: num_fg 1s, num_bg 0s, the rest -1 (ignored); one length, one compile."""
  labels = np.array([1] * num_fg + [0] * num_bg + [-1] * (length - num_fg - num_bg), np.int32)
  return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("num_fg,num_bg,want_pos,want_neg", [
    (10, 1000, 10, 246),  # foreground-scarce: all of it, the rest background
    (500, 50, 128, 50),  # background-scarce: the positive cap, then every background
    (500, 1000, 128, 128),  # both plenty: exactly half and half
    (0, 0, 0, 0),  # nothing to sample
])
def test_sampler_counts(num_fg, num_bg, want_pos, want_neg):
  labels = np.stack([_labels(num_fg, num_bg, seed=seed) for seed in range(3)])
  pos, neg = sample_balanced(labels, jax.random.key(0), batch_size_per_image=256,
                             positive_fraction=0.5)
  pos, neg = np.asarray(pos), np.asarray(neg)
  np.testing.assert_array_equal(pos.sum(axis=1), want_pos)
  np.testing.assert_array_equal(neg.sum(axis=1), want_neg)
  assert (labels[pos] == 1).all() and (labels[neg] == 0).all()


def test_sampler_is_deterministic_per_key_and_differs_between_keys():
  labels = np.stack([_labels(300, 1200, seed=seed) for seed in range(3)])
  kw = dict(batch_size_per_image=256, positive_fraction=0.5)
  a = sample_balanced(labels, jax.random.key(7), **kw)
  b = sample_balanced(labels, jax.random.key(7), **kw)
  c = sample_balanced(labels, jax.random.key(8), **kw)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_sampler_is_uniform():
  # 2000 independent rows (the batch axis) choosing 32 of 128 foreground and 96 of 256
  # background candidates: each is chosen with probability 1/4 and 3/8, whatever its index.
  trials = 2000
  labels = np.tile(np.array([1] * 128 + [0] * 256, np.int32), (trials, 1))
  pos, neg = sample_balanced(labels, jax.random.key(0), batch_size_per_image=128,
                             positive_fraction=0.25)
  freq_pos = np.asarray(pos).mean(axis=0)[:128]
  freq_neg = np.asarray(neg).mean(axis=0)[128:]
  for freq, p in ((freq_pos, 0.25), (freq_neg, 0.375)):
    sigma = np.sqrt(p * (1 - p) / trials)
    assert np.abs(freq - p).max() <= 5 * sigma
    # No preference for low (or high) indices: the halves' means agree to a few sigma / sqrt(n).
    half = len(freq) // 2
    assert abs(freq[:half].mean() - freq[half:].mean()) <= 5 * sigma / np.sqrt(half)


def test_sample_rois_layout_and_validation():
  rng = np.random.default_rng(0)
  gt = np.array([[[10, 10, 50, 50], [60, 60, 90, 100], [0, 0, 0, 0]]], np.float32)
  near = gt[0, :2][rng.integers(0, 2, 300)] + rng.uniform(-3, 3, (300, 4)).astype(np.float32)
  far = np.concatenate([rng.uniform(0, 60, (300, 2)), rng.uniform(70, 120, (300, 2))], 1)
  proposals = np.concatenate([near, far]).astype(np.float32)[None]
  valid = np.ones((1, 600), bool)
  out = sample_rois(proposals, valid, gt, np.array([[2, 4, 0]]), np.array([[True, True, False]]),
                    jax.random.key(0), num_samples=64)
  _check_layout({k: np.asarray(v) for k, v in out.items()}, np.array([16]), np.array([64]))
  assert set(np.asarray(out["labels"][0, :16])) <= {3, 5}
  with pytest.raises(ValueError, match="proposals"):
    rcnn_targets.sample_rois(proposals[:, :, :3], valid, gt, np.zeros((1, 3)), valid[:, :3],
                             jax.random.key(0))


# --- The train step of the tiny Mask R-CNN -------------------------------------------------


def _batch():
  """A 64 x 64 batch of 2 with 3 and 1 ground-truth boxes (padded to 4) and ellipse masks."""
  b, m, size = 2, 4, 64
  boxes = np.zeros((b, m, 4), np.float32)
  boxes[0, :3] = [[4, 6, 30, 40], [20, 20, 60, 50], [40, 2, 62, 20]]
  boxes[1, :1] = [[10, 10, 50, 54]]
  valid = np.zeros((b, m), bool)
  valid[0, :3] = valid[1, :1] = True
  classes = np.array([[0, 1, 2, 0], [2, 0, 0, 0]], np.int32)
  yy, xx = np.mgrid[:size, :size] + 0.5
  masks = np.zeros((b, m, size, size), np.uint8)
  for i, j in zip(*np.nonzero(valid), strict=True):
    x0, y0, x1, y1 = boxes[i, j]
    masks[i, j] = (((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2
                   + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1)
  images = np.random.default_rng(0).standard_normal((b, size, size, 3)).astype(np.float32)
  for i, j in zip(*np.nonzero(valid), strict=True):  # objects brighter than the background
    images[i][masks[i, j] > 0] += 2.0
  return images, boxes, classes, valid, masks


def _init_every_stage(module, images):
  """Creates every parameter without the inference path's proposals and NMS (cheap to trace)."""
  feature_maps = module.features(images)
  module.rpn_head(feature_maps)
  rois = jnp.tile(jnp.array([[[0.0, 0.0, 16.0, 16.0]]]), (images.shape[0], 1, 1))
  module.box_head(feature_maps, rois, images.shape[1:3])
  module.mask_head(feature_maps, rois, images.shape[1:3])


@functools.lru_cache(maxsize=1)
def _tiny_mask_rcnn():
  from jaxvision.models import create_model

  model = create_model("maskrcnn_tiny", num_classes=4)
  images = _batch()[0]
  variables = jax.jit(functools.partial(model.init, method=_init_every_stage))(
      jax.random.key(0), images)
  return model, variables


def _check_train_step(trainable):
  """One trace for two ground-truth layouts and keys, finite non-zero gradients of every
  parameter under `trainable` (top-level names; None: all), and 8 Adam steps on one batch (the
  same sampling key each time) bringing the loss below 0.7 of its start."""
  model, variables = _tiny_mask_rcnn()
  images, boxes, classes, valid, masks = _batch()
  params = dict(variables["params"])
  names = tuple(params) if trainable is None else trainable
  traces = []

  @jax.jit
  def loss_and_grads(trained, images, boxes, classes, valid, masks, key):
    traces.append(1)

    def loss_fn(trained):
      outputs, _ = model.apply({**variables, "params": {**params, **trained}}, images, boxes,
                               classes, valid, masks, train=True, rngs={"dropout": key},
                               mutable=["batch_stats"], method=rcnn_train_forward)
      return rcnn_loss(outputs)

    return jax.value_and_grad(loss_fn, has_aux=True)(trained)

  trained = {k: params[k] for k in names}
  (total, parts), grads = loss_and_grads(trained, images, boxes, classes, valid, masks,
                                         jax.random.key(1))
  assert set(parts) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                        "loss_rpn_box_reg"}
  assert np.isfinite(float(total)) and all(float(v) > 0 for v in parts.values()), parts
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.isfinite(np.asarray(g)).all() for _, g in leaves)
  zero = [jax.tree_util.keystr(p) for p, g in leaves if not np.asarray(g).any()]
  assert not zero, zero

  # Other ground truth (one box fewer) and another key: the same compiled step.
  valid2 = valid.copy()
  valid2[0, 2] = False
  loss_and_grads(trained, images, boxes, classes, valid2, masks * valid2[..., None, None],
                 jax.random.key(2))
  assert len(traces) == 1

  optimizer = optax.adam(3e-3)
  state = optimizer.init(trained)
  update = jax.jit(optimizer.update)
  key = jax.random.key(1)
  first = float(total)
  for _ in range(8):
    (total, _), grads = loss_and_grads(trained, images, boxes, classes, valid, masks, key)
    updates, state = update(grads, state, trained)
    trained = optax.apply_updates(trained, updates)
  (last, parts), _ = loss_and_grads(trained, images, boxes, classes, valid, masks, key)
  print(f"\n{'+'.join(names)}: loss {first:.3f} -> {float(last):.3f} after 8 steps: "
        + ", ".join(f"{k} {float(v):.3f}" for k, v in parts.items()))
  assert float(last) < 0.7 * first
  assert len(traces) == 1


@pytest.mark.slow  # half a minute of compiles alone, a minute beside the suite's other workers
def test_train_step_of_the_heads_jits_once_has_finite_grads_and_learns():
  # The backbone's backward doubles the compile time; the heads' step checks the rest.
  _check_train_step(("rpn", "box_heads", "mask_heads"))


@pytest.mark.slow
def test_train_step_jits_once_has_finite_grads_and_learns():
  _check_train_step(None)


@pytest.mark.slow
def test_full_size_train_forward_shapes():
  # torchvision's COCO sizes: 2000 proposals, 512 sampled RoIs, masks on the first 128 slots.
  from jaxvision.models import create_model

  model = create_model("maskrcnn_resnet50_fpn")
  b, m, size = 2, 5, 512
  images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method=_init_every_stage),
                             images)
  spec = jax.ShapeDtypeStruct
  gt = (spec((b, m, 4), jnp.float32), spec((b, m), jnp.int32), spec((b, m), jnp.bool_),
        spec((b, m, size, size), jnp.uint8))
  outputs, _ = jax.eval_shape(
      lambda v, x, *g: model.apply(v, x, *g, train=True, rngs={"dropout": jax.random.key(0)},
                                   mutable=["batch_stats"], method=rcnn_train_forward),
      variables, images, *gt)
  anchors = len(model.rpn_anchors((size, size)).boxes)
  assert outputs["rpn_objectness"].shape == (b, anchors)
  assert outputs["proposals"].shape == (b, 2000, 4)
  assert outputs["rois"].shape == (b, 512, 4)
  assert outputs["class_logits"].shape == (b, 512, 91)
  assert outputs["box_regression"].shape == (b, 512, 91 * 4)
  assert outputs["mask_logits"].shape == (b, 128, 28, 28, 91)
  assert outputs["mask_targets"].shape == (b, 128, 28, 28)
