"""On-device NMS and post-processing against plain NumPy references: a greedy NMS written out
one box at a time (torchvision.ops.nms semantics: IoU > threshold suppresses, equal scores in
index order), and torchvision's postprocess_detections re-written with NumPy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.detection import anchors as A
from jaxvision.detection import postprocess as P
from jaxvision.detection.coders import SSD_WEIGHTS, DeltaCoder, LTRBCoder
from jaxvision.detection.nms import batched_nms, nms


def iou_one(box, boxes):
  w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
  h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
  inter = w * h
  union = ((box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0])
           * (boxes[:, 3] - boxes[:, 1]) - inter)
  with np.errstate(invalid="ignore"):  # two empty boxes: NaN, which suppresses nothing
    return inter / union


def greedy_nms(boxes, scores, threshold, classes=None, valid=None):
  """Kept indices in score order (stable), one box at a time."""
  boxes = boxes.astype(np.float32)
  order = np.argsort(-scores, kind="stable")
  suppressed = np.zeros(len(boxes), bool) if valid is None else ~valid
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(int(i))
    hit = iou_one(boxes[i], boxes) > threshold
    if classes is not None:
      hit &= classes == classes[i]
    suppressed |= hit
    suppressed[i] = True
  return keep


def random_problem(seed, n=300, num_classes=None, tie_levels=None):
  rng = np.random.default_rng(seed)
  # Clusters of jittered boxes around 25 "objects", as a detector's raw output looks.
  centers = np.concatenate([rng.uniform(0, 150, (25, 2)), rng.uniform(8, 50, (25, 2))], 1)
  pick = centers[rng.integers(0, 25, n)]
  xy = pick[:, :2] + rng.normal(0, 0.08, (n, 2)) * pick[:, 2:]
  wh = pick[:, 2:] * np.exp(rng.normal(0, 0.1, (n, 2)))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  scores = rng.random(n).astype(np.float32)
  if tie_levels:  # many equal scores: the order among them must still be deterministic
    scores = (np.floor(scores * tie_levels) / tie_levels).astype(np.float32)
  classes = None if num_classes is None else rng.integers(0, num_classes, n).astype(np.int32)
  return boxes, scores, classes


N = 300  # every NMS problem is padded to N boxes, so each max_outputs compiles once


@functools.lru_cache
def jitted_nms(max_outputs):
  def run(boxes, scores, threshold, classes, valid):
    pad = N - len(scores)
    boxes = jnp.pad(jnp.asarray(boxes), ((0, pad), (0, 0)))
    scores = jnp.pad(jnp.asarray(scores), (0, pad))
    classes = jnp.pad(jnp.asarray(classes), (0, pad))
    valid = jnp.pad(jnp.asarray(valid), (0, pad))  # padding is never kept
    return nms(boxes, scores, iou_threshold=threshold, max_outputs=max_outputs, classes=classes,
               valid=valid)
  return jax.jit(run)


@pytest.mark.parametrize("seed", range(4))
def test_nms_equals_greedy_reference(seed):
  threshold = (0.3, 0.5, 0.7, 0.5)[seed]
  boxes, scores, classes = random_problem(seed, n=N, num_classes=4 if seed % 2 else None,
                                          tie_levels=20 if seed >= 2 else None)
  # Without classes every box is class 0: plain NMS.
  cls = classes if classes is not None else np.zeros(N, np.int32)
  expected = greedy_nms(boxes, scores, threshold, classes)
  assert 10 < len(expected) < 0.75 * N  # plenty suppressed, plenty kept
  # Enough slots for every survivor, then fewer: the first slots are the same boxes.
  for max_outputs in (N, 10):
    idx, ok = jitted_nms(max_outputs)(boxes, scores, threshold, cls, np.ones(N, bool))
    n = min(max_outputs, len(expected))
    assert int(ok.sum()) == n and ok[:n].all()
    np.testing.assert_array_equal(np.asarray(idx)[:n], expected[:n])


def test_nms_valid_mask_threshold_semantics_and_batching():
  rng = np.random.default_rng(7)
  boxes, scores, classes = random_problem(11, n=120, num_classes=3)
  valid = rng.random(120) < 0.6
  idx, ok = jitted_nms(N)(boxes, scores, 0.5, classes, valid)
  expected = greedy_nms(boxes, scores, 0.5, classes, valid)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], expected)
  assert valid[np.asarray(idx)[np.asarray(ok)]].all()
  # IoU exactly 0.5 does not suppress at threshold 0.5 (torchvision: IoU > threshold).
  pair = np.array([[0.0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
  s, one, both = np.array([0.9, 0.8], np.float32), np.zeros(2, np.int32), np.ones(2, bool)
  _, ok = jitted_nms(10)(pair, s, 0.5, one, both)
  assert np.asarray(ok).tolist() == [True, True] + [False] * 8
  _, ok = jitted_nms(10)(pair, s, 0.49, one, both)
  assert np.asarray(ok).tolist() == [True] + [False] * 9
  # Batched: each image on its own.
  b2, s2, c2 = random_problem(12, n=120, num_classes=3)
  stack = lambda *a: jnp.stack([jnp.asarray(x) for x in a])  # noqa: E731
  fn = jax.jit(functools.partial(batched_nms, iou_threshold=0.5, max_outputs=30))
  idx, ok = fn(stack(boxes, b2), stack(scores, s2), classes=stack(classes, c2))
  for i, (b, s, c) in enumerate(((boxes, scores, classes), (b2, s2, c2))):
    np.testing.assert_array_equal(np.asarray(idx[i])[np.asarray(ok[i])],
                                  greedy_nms(b, s, 0.5, c)[:30])


# --- Post-processing -----------------------------------------------------------------------


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def reference_sigmoid_postprocess(logits, regression, anchors, level_sizes, hw, thr, top_k,
                                  iou, max_det, ctrness=None):
  """torchvision RetinaNet / FCOS postprocess_detections for one image, in NumPy."""
  coder = DeltaCoder() if ctrness is None else LTRBCoder()
  boxes_all, scores_all, labels_all, start = [], [], [], 0
  k = logits.shape[-1]
  for size in level_sizes:
    scores = sigmoid(logits[start:start + size].astype(np.float64))
    if ctrness is not None:
      scores = np.sqrt(scores * sigmoid(ctrness[start:start + size].astype(np.float64)))
    scores = scores.reshape(-1)
    idx = np.nonzero(scores > thr)[0]
    order = np.argsort(-scores[idx], kind="stable")[:top_k]
    idx = idx[order]
    anchor = start + idx // k
    boxes = coder.decode(regression[anchor].astype(np.float32), anchors[anchor])
    boxes = np.stack([np.clip(boxes[:, 0], 0, hw[1]), np.clip(boxes[:, 1], 0, hw[0]),
                      np.clip(boxes[:, 2], 0, hw[1]), np.clip(boxes[:, 3], 0, hw[0])], 1)
    boxes_all.append(boxes)
    scores_all.append(scores[idx])
    labels_all.append(idx % k)
    start += size
  boxes, scores, labels = (np.concatenate(x) for x in (boxes_all, scores_all, labels_all))
  keep = greedy_nms(boxes, scores, iou, labels)[:max_det]
  return boxes[keep], scores[keep], labels[keep]


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_sigmoid_detections_equal_reference_and_to_original(family):
  anchor_set = (A.retinanet_anchors if family == "retinanet" else A.fcos_anchors)(64)
  rng = np.random.default_rng(3)
  b, n, k = 2, len(anchor_set), 3
  logits = rng.normal(-3 if family == "retinanet" else 0, 1.5, (b, n, k)).astype(np.float32)
  regression = rng.normal(0, 0.3, (b, n, 4)).astype(np.float32)
  ctr = None
  if family == "fcos":
    regression = np.abs(regression) * 4
    ctr = rng.normal(0, 1, (b, n, 1)).astype(np.float32)
  kw = dict(image_size=(64, 64), score_threshold=0.2, pre_nms_top_k=50, iou_threshold=0.5,
            max_detections=40)
  if family == "retinanet":
    fn = jax.jit(lambda c, r, _: P.sigmoid_detections(c, r, anchor_set.boxes,
                                                      anchor_set.level_sizes, **kw))
  else:
    fn = jax.jit(lambda c, r, t: P.fcos_detections(c, r, t, anchor_set.boxes,
                                                   anchor_set.level_sizes, **kw))
  out = fn(logits, regression, ctr)
  assert out["boxes"].shape == (b, 40, 4) and out["classes"].dtype == jnp.int32
  for i in range(b):
    boxes, scores, labels = reference_sigmoid_postprocess(
        logits[i], regression[i], anchor_set.boxes, anchor_set.level_sizes, (64, 64), 0.2, 50,
        0.5, 40, None if ctr is None else ctr[i])
    valid = np.asarray(out["valid"][i])
    assert valid.sum() == len(scores) > 5
    np.testing.assert_allclose(np.asarray(out["boxes"][i])[valid], boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["scores"][i])[valid], scores, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["classes"][i])[valid], labels)
    assert (np.asarray(out["scores"][i])[~valid] == 0).all()
  if family == "fcos":
    return
  # Back to an original image of 32 x 48 (H x W) that was scaled by 64 / 48.
  scale = np.full((b, 2), 64 / 48, np.float32)
  back = jax.jit(P.to_original)(out, scale, np.zeros((b, 2), np.float32),
                                np.array([[32, 48]] * b))
  expect = np.asarray(out["boxes"]) / (64 / 48)
  expect = np.minimum(expect, np.array([48, 32, 48, 32]))
  expect = expect * np.asarray(out["valid"])[..., None]
  np.testing.assert_allclose(np.asarray(back["boxes"]), expect, rtol=1e-5, atol=1e-4)


def test_softmax_detections_per_class_topk_equal_reference():
  anchor_set = A.ssd_default_boxes(64, feature_sizes=(8, 4), aspect_ratios=((2,), (2, 3)),
                                   scales=(0.2, 0.5, 0.9), steps=(8, 16))
  rng = np.random.default_rng(4)
  b, n, c = 2, len(anchor_set), 4  # background + 3 classes
  logits = rng.normal(0, 2, (b, n, c)).astype(np.float32)
  regression = rng.normal(0, 1, (b, n, 4)).astype(np.float32)
  fn = jax.jit(lambda x, r: P.softmax_detections(
      x, r, anchor_set.boxes, image_size=(64, 64), score_threshold=0.3, pre_nms_top_k=20,
      iou_threshold=0.45, max_detections=30))
  out = fn(logits, regression)
  coder = DeltaCoder(SSD_WEIGHTS)
  for i in range(b):
    e = np.exp(logits[i] - logits[i].max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    boxes = np.clip(coder.decode(regression[i], anchor_set.boxes), 0, 64)
    cand_boxes, cand_scores, cand_labels = [], [], []
    for label in range(1, c):
      idx = np.nonzero(probs[:, label] > 0.3)[0]
      idx = idx[np.argsort(-probs[idx, label], kind="stable")[:20]]
      cand_boxes.append(boxes[idx])
      cand_scores.append(probs[idx, label])
      cand_labels.append(np.full(len(idx), label - 1))
    cb, cs, cl = (np.concatenate(x) for x in (cand_boxes, cand_scores, cand_labels))
    keep = greedy_nms(cb, cs, 0.45, cl)[:30]
    valid = np.asarray(out["valid"][i])
    assert valid.sum() == len(keep) > 5
    np.testing.assert_allclose(np.asarray(out["scores"][i])[valid], cs[keep], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["classes"][i])[valid], cl[keep])
    np.testing.assert_allclose(np.asarray(out["boxes"][i])[valid], cb[keep], rtol=1e-5,
                               atol=1e-4)
