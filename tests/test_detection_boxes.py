"""Boxes, coders and anchors: hand-computed cases, plain NumPy references written from
torchvision's formulas, and torchvision's own numbers (goldens/detection_core.npz, made by
tests/parity/make_detection_core_goldens.py)."""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.detection import anchors as A
from jaxvision.detection import boxes as B
from jaxvision.detection.coders import SSD_WEIGHTS, DeltaCoder, LTRBCoder

GOLDEN = pathlib.Path(__file__).parent / "parity" / "goldens" / "detection_core.npz"


@pytest.fixture(scope="module")
def golden():
  return np.load(GOLDEN)


def random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(0.5, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def naive_iou_giou(a, b):
  """Pairwise IoU and GIoU, one pair at a time in float64."""
  iou = np.zeros((len(a), len(b)))
  giou = np.zeros((len(a), len(b)))
  for i, (x1, y1, x2, y2) in enumerate(a.astype(np.float64)):
    for j, (u1, v1, u2, v2) in enumerate(b.astype(np.float64)):
      inter = max(0.0, min(x2, u2) - max(x1, u1)) * max(0.0, min(y2, v2) - max(y1, v1))
      union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
      hull = (max(x2, u2) - min(x1, u1)) * (max(y2, v2) - min(y1, v1))
      iou[i, j] = inter / union
      giou[i, j] = inter / union - (hull - union) / hull
  return iou, giou


# --- Boxes ---------------------------------------------------------------------------------


def test_formats_hand_example_and_round_trips():
  xyxy = np.array([[1.0, 2.0, 4.0, 6.0]])
  np.testing.assert_array_equal(B.convert(xyxy, "xyxy", "xywh"), [[1, 2, 3, 4]])
  np.testing.assert_array_equal(B.convert(xyxy, "xyxy", "cxcywh"), [[2.5, 4, 3, 4]])
  boxes = random_boxes(np.random.default_rng(0), 50).astype(np.float64)
  for fmt in ("xywh", "cxcywh"):
    back = B.convert(B.convert(boxes, "xyxy", fmt), fmt, "xyxy")
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-12)
    np.testing.assert_allclose(B.convert(B.convert(boxes, "xyxy", fmt), fmt, "cxcywh"),
                               B.convert(boxes, "xyxy", "cxcywh"), atol=1e-12)
  with pytest.raises(ValueError, match="box format 'yxyx'"):
    B.convert(xyxy, "yxyx", "xyxy")
  with pytest.raises(ValueError, match=r"\[..., 4\]"):
    B.convert(np.zeros((3, 5)), "xyxy", "xywh")


def test_iou_and_giou_hand_example():
  a = np.array([[0.0, 0, 2, 2]])
  b = np.array([[1.0, 1, 3, 3], [5.0, 5, 6, 6], [0.0, 0, 2, 2]])
  # Overlap 1, union 7, hull 9; disjoint: IoU 0, hull 36, union 5; identical: 1 and 1.
  np.testing.assert_allclose(B.pairwise_iou(a, b), [[1 / 7, 0, 1]])
  np.testing.assert_allclose(B.pairwise_giou(a, b), [[1 / 7 - 2 / 9, -31 / 36, 1]])
  np.testing.assert_allclose(B.area(b), [4, 1, 4])
  np.testing.assert_array_equal(B.area(np.array([[3.0, 3, 1, 5]])), [0])  # inverted: empty
  # Two empty boxes: 0, not NaN.
  assert float(B.elementwise_iou(np.zeros(4), np.zeros(4))) == 0.0


def test_iou_giou_match_naive_reference_numpy_and_jit():
  rng = np.random.default_rng(1)
  a, b = random_boxes(rng, 17), random_boxes(rng, 23)
  iou, giou = naive_iou_giou(a, b)
  np.testing.assert_allclose(B.pairwise_iou(a, b), iou, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(B.pairwise_giou(a, b), giou, rtol=1e-5, atol=1e-6)
  assert isinstance(B.pairwise_iou(a, b), np.ndarray)  # host code stays in NumPy
  fn = jax.jit(lambda x, y: (B.pairwise_iou(x, y), B.pairwise_giou(x, y)))
  jiou, jgiou = fn(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_allclose(jiou, iou, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jgiou, giou, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(B.elementwise_iou(a[:5], b[:5]), np.diag(iou[:5, :5]), rtol=1e-5)
  np.testing.assert_allclose(B.elementwise_giou(a[:5], b[:5]), np.diag(giou[:5, :5]), rtol=1e-5)


def test_clip_and_back_to_original_pixels():
  boxes = np.array([[-5.0, 3, 120, 50], [10, -2, 20, 200]])
  np.testing.assert_array_equal(B.clip(boxes, 100, 110), [[0, 3, 110, 50], [10, 0, 20, 100]])
  np.testing.assert_array_equal(B.is_nonempty(np.array([[0.0, 0, 1, 1], [0, 0, 0, 5]])),
                                [True, False])
  orig = np.array([[10.0, 20, 30, 60]])
  scale, offset = np.array([0.5, 0.25]), np.array([3.0, -4.0])
  moved = np.concatenate([orig[:, :2] * scale + offset, orig[:, 2:] * scale + offset], 1)
  np.testing.assert_allclose(B.to_original(moved, scale, offset), orig)
  # A horizontal flip of a 100 px image: x -> 100 - x, i.e. scale -1, offset 100.
  flipped = np.array([[70.0, 20, 90, 60]])
  np.testing.assert_allclose(B.to_original(flipped, np.array([-1.0, 1]), np.array([100.0, 0])),
                             [[10, 20, 30, 60]])


# --- Coders --------------------------------------------------------------------------------


def reference_encode(gt, anchors, w):
  """torchvision's encode_boxes, written out in NumPy (float64)."""
  gt, anchors = gt.astype(np.float64), anchors.astype(np.float64)
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
  return np.stack([w[0] * (gx - ax) / aw, w[1] * (gy - ay) / ah, w[2] * np.log(gw / aw),
                   w[3] * np.log(gh / ah)], 1)


def test_delta_coder_matches_reference_and_round_trips():
  rng = np.random.default_rng(2)
  anchors, gt = random_boxes(rng, 40), random_boxes(rng, 40)
  for weights in (SSD_WEIGHTS, (1.0, 1.0, 1.0, 1.0)):
    coder = DeltaCoder(weights)
    deltas = coder.encode(gt, anchors)
    np.testing.assert_allclose(deltas, reference_encode(gt, anchors, weights), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(coder.decode(deltas, anchors), gt, rtol=1e-5, atol=1e-4)
    jd = jax.jit(coder.decode)(jnp.asarray(deltas), jnp.asarray(anchors))
    np.testing.assert_allclose(jd, gt, rtol=1e-5, atol=1e-4)
  # Decoding clamps log-size ratios at log(1000 / 16): a huge dw gives a width of 62.5 x the
  # anchor's, not exp(20) x.
  big = DeltaCoder().decode(np.array([[0.0, 0, 20, 0]], np.float32),
                            np.array([[0.0, 0, 10, 10]], np.float32))
  np.testing.assert_allclose(big[0, 2] - big[0, 0], 10 * 1000 / 16, rtol=1e-5)


def test_ltrb_coder_hand_example_and_round_trip():
  anchor = np.array([[8.0, 8, 16, 16]])  # center (12, 12), size 8
  box = np.array([[4.0, 10, 20, 30]])
  np.testing.assert_allclose(LTRBCoder().encode(box, anchor), [[1.0, 0.25, 1.0, 2.25]])
  np.testing.assert_allclose(LTRBCoder(normalize_by_size=False).encode(box, anchor),
                             [[8, 2, 8, 18]])
  np.testing.assert_allclose(LTRBCoder().decode(LTRBCoder().encode(box, anchor), anchor), box)


def test_coders_equal_torchvision(golden):
  ref, gt, deltas = golden["coder_anchors"], golden["coder_boxes"], golden["coder_deltas"]
  for name, weights in (("ssd", SSD_WEIGHTS), ("retinanet", (1.0, 1.0, 1.0, 1.0))):
    coder = DeltaCoder(weights)
    np.testing.assert_allclose(coder.encode(jnp.asarray(gt), jnp.asarray(ref)),
                               golden[f"encode_{name}"], rtol=1e-6, atol=2e-6)
    decoded = coder.decode(deltas * np.float32(weights[0]), ref)
    np.testing.assert_allclose(decoded, golden[f"decode_{name}"], rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(LTRBCoder().encode(gt, ref), golden["encode_ltrb"])
  np.testing.assert_array_equal(LTRBCoder().decode(np.abs(deltas), ref), golden["decode_ltrb"])


# --- Anchors -------------------------------------------------------------------------------


def reference_ssd300():
  """SSD300's default boxes from the paper's recipe (torchvision's DefaultBoxGenerator)."""
  scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
  ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
  out = []
  for k, (f, step) in enumerate(zip([38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300],
                                    strict=True)):
    s, s2 = scales[k], math.sqrt(scales[k] * scales[k + 1])
    wh = [(s, s), (s2, s2)]
    for r in ratios[k]:
      wh += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
    for i in range(f):
      for j in range(f):
        cx, cy = (j + 0.5) * step / 300, (i + 0.5) * step / 300
        for w, h in wh:
          w, h = min(w, 1.0), min(h, 1.0)
          out.append([(cx - w / 2) * 300, (cy - h / 2) * 300, (cx + w / 2) * 300,
                      (cy + h / 2) * 300])
  return np.asarray(out)


def reference_grid(image_hw, shapes, sizes, ratios):
  """torchvision's AnchorGenerator: rounded cell anchors shifted by (column, row) x stride."""
  out = []
  for (fh, fw), level_sizes in zip(shapes, sizes, strict=True):
    sy, sx = image_hw[0] // fh, image_hw[1] // fw
    cells = []
    for r in ratios:
      for s in level_sizes:
        w, h = s / math.sqrt(r), s * math.sqrt(r)
        cells.append(np.round(np.array([-w, -h, w, h]) / 2))
    for i in range(fh):
      for j in range(fw):
        out += [c + [j * sx, i * sy, j * sx, i * sy] for c in cells]
  return np.asarray(out)


def test_ssd300_default_boxes(golden):
  boxes = A.ssd_default_boxes()
  assert len(boxes) == 8732 and boxes.level_sizes == (5776, 2166, 600, 150, 36, 4)
  assert boxes.per_location == (4, 6, 6, 6, 4, 4)
  np.testing.assert_allclose(boxes.boxes, reference_ssd300(), rtol=0, atol=1e-4)
  np.testing.assert_array_equal(boxes.boxes, golden["ssd300_anchors"])


def test_retinanet_and_fcos_anchors(golden):
  hw = tuple(int(v) for v in golden["retinanet_hw"])  # (96, 160): strides differ per axis
  shapes = A.feature_shapes(hw, A.RETINANET_STRIDES)
  assert shapes == ((12, 20), (6, 10), (3, 5), (2, 3), (1, 2))
  assert A.feature_shapes(100, (8,)) == ((13, 13),)
  retina = A.retinanet_anchors(hw)
  assert A.RETINANET_SIZES[0] == (32, 40, 50) and retina.per_location == (9,) * 5
  reference = reference_grid(hw, shapes, A.RETINANET_SIZES, A.RETINANET_ASPECT_RATIOS)
  np.testing.assert_array_equal(retina.boxes, reference)
  np.testing.assert_array_equal(retina.boxes, golden["retinanet_anchors"])
  fcos = A.fcos_anchors(hw)
  np.testing.assert_array_equal(fcos.boxes, golden["fcos_anchors"])
  np.testing.assert_array_equal(A.anchor_centers(fcos.boxes)[:2], [[0, 0], [8, 0]])
  lower, upper = A.fcos_scale_ranges(fcos)
  n0, n4 = fcos.level_sizes[0], fcos.level_sizes[-1]
  assert lower[0] == 0 and upper[0] == 64 and lower[n0] == 64 and upper[n0] == 128
  assert np.isinf(upper[-n4:]).all() and lower[-1] == 512
  np.testing.assert_array_equal(np.bincount(fcos.level_of), fcos.level_sizes)
  with pytest.raises(ValueError, match="not a power of 2"):
    A.feature_shapes(64, (12,))
