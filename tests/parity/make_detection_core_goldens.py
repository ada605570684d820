"""Writes goldens/detection_core.npz: torchvision's anchors, box coders, matchers and detection
losses on fixed random inputs, which tests/test_detection_targets.py compares against without
torch. Run it wherever torchvision imports (CPU is enough):

    PYTHONPATH=/path/to/torch python tests/parity/make_detection_core_goldens.py

The inputs are drawn here from a fixed seed and saved with the outputs, so the test needs
nothing but the file. torchvision's compiled operators (NMS) are not used: the anchor
generators, coders, matchers and `compute_loss` methods are plain tensor code.
"""

from __future__ import annotations

import pathlib
import sys
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "goldens" / "detection_core.npz"
SEED = 0
NUM_CLASSES = 3  # foreground classes; SSD adds a background column


def random_boxes(rng, n, size, min_side=4.0, max_side=None):
  """n float32 xyxy boxes inside a size x size image."""
  max_side = max_side or size / 2
  wh = rng.uniform(min_side, max_side, (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (size - wh)
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def padded_targets(rng, counts, size, m):
  """Per-image boxes/classes padded to m rows, with a valid mask (a count of 0: no boxes)."""
  b = len(counts)
  boxes = np.zeros((b, m, 4), np.float32)
  classes = np.zeros((b, m), np.int32)
  valid = np.zeros((b, m), bool)
  for i, c in enumerate(counts):
    # Valid rows are scattered among padding rows, so a matcher that assumes a prefix fails.
    rows = np.sort(rng.choice(m, c, replace=False))
    boxes[i, rows] = random_boxes(rng, c, size, min_side=6, max_side=size * 0.7)
    classes[i, rows] = rng.integers(0, NUM_CLASSES, c)
    valid[i, rows] = True
    boxes[i, ~valid[i]] = rng.uniform(0, size, (m - c, 4))  # garbage that must be ignored
  return boxes, classes, valid


def main() -> None:
  sys.path.insert(0, str(HERE))
  import torch
  from make_torchvision_goldens import import_torchvision

  torchvision = import_torchvision()
  from torchvision.models.detection import _utils as det_utils
  from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
  from torchvision.models.detection.fcos import FCOS, FCOSHead
  from torchvision.models.detection.image_list import ImageList
  from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetHead,
    _default_anchorgen,
  )
  from torchvision.models.detection.ssd import SSD
  from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

  from jaxvision.detection.anchors import feature_shapes

  rng = np.random.default_rng(SEED)
  out: dict[str, np.ndarray] = {}
  t = torch.from_numpy

  def anchors_of(generator, image_hw, shapes):
    images = ImageList(torch.zeros(1, 3, *image_hw), [tuple(image_hw)])
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    return generator(images, feats)[0].numpy()

  # --- Anchors: SSD300, RetinaNet and FCOS on a non-square input --------------------------
  ssd_gen = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                steps=[8, 16, 32, 64, 100, 300])
  out["ssd300_anchors"] = anchors_of(ssd_gen, (300, 300), [(s, s) for s in (38, 19, 10, 5, 3, 1)])
  hw = (96, 160)
  shapes = feature_shapes(hw, (8, 16, 32, 64, 128))
  out["retinanet_hw"] = np.asarray(hw)
  out["retinanet_anchors"] = anchors_of(_default_anchorgen(), hw, shapes)
  fcos_gen = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
  out["fcos_anchors"] = anchors_of(fcos_gen, hw, shapes)

  # --- Coders --------------------------------------------------------------------------------
  ref = random_boxes(rng, 64, 200)
  gt = random_boxes(rng, 64, 200)
  deltas = rng.normal(0, 1, (64, 4)).astype(np.float32)
  deltas[:4, 2:] = 8.0  # beyond log(1000/16) after the weights: the clamp must act
  out["coder_anchors"], out["coder_boxes"], out["coder_deltas"] = ref, gt, deltas
  for name, weights in (("ssd", (10.0, 10.0, 5.0, 5.0)), ("retinanet", (1.0, 1.0, 1.0, 1.0))):
    coder = det_utils.BoxCoder(weights)
    out[f"encode_{name}"] = coder.encode_single(t(gt), t(ref)).numpy()
    out[f"decode_{name}"] = coder.decode_single(t(deltas * np.float32(weights[0])), t(ref)).numpy()
  linear = det_utils.BoxLinearCoder(normalize_by_size=True)
  out["encode_ltrb"] = linear.encode(t(ref), t(gt)).numpy()
  out["decode_ltrb"] = linear.decode(t(np.abs(deltas)), t(ref)).numpy()

  # --- Matchers and losses on a small RetinaNet / FCOS / SSD problem ---------------------------
  size, m = 64, 6
  counts = [3, 0, 5]  # the second image has no boxes
  gt_boxes, gt_classes, gt_valid = padded_targets(rng, counts, size, m)
  out["gt_boxes"], out["gt_classes"], out["gt_valid"] = gt_boxes, gt_classes, gt_valid
  targets = [{"boxes": t(gt_boxes[i][gt_valid[i]]),
              "labels": t(gt_classes[i][gt_valid[i]].astype(np.int64))} for i in range(len(counts))]
  b = len(counts)

  # RetinaNet: 0.5 / 0.4 with low-quality matches, focal + L1 normalised per image.
  anchors = anchors_of(_default_anchorgen(), (size, size), feature_shapes(size, (8, 16, 32, 64,
                                                                                   128)))
  n = len(anchors)
  out["small_retinanet_anchors"] = anchors
  logits = rng.normal(-2, 1.5, (b, n, NUM_CLASSES)).astype(np.float32)
  regression = rng.normal(0, 0.5, (b, n, 4)).astype(np.float32)
  out["retinanet_logits"], out["retinanet_regression"] = logits, regression
  matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  matches = []
  for i in range(b):
    if not counts[i]:
      matches.append(np.full(n, -1, np.int64))
      continue
    matches.append(matcher(box_iou(targets[i]["boxes"], t(anchors))).numpy())
  out["retinanet_matches"] = _to_padded_rows(np.stack(matches), gt_valid)
  head = RetinaNetHead(8, 9, NUM_CLASSES)
  stub = types.SimpleNamespace(proposal_matcher=matcher, head=head)
  head_outputs = {"cls_logits": t(logits), "bbox_regression": t(regression)}
  losses = RetinaNet.compute_loss(stub, targets, head_outputs, [t(anchors)] * b)
  out["retinanet_loss"] = np.asarray([float(losses["classification"]),
                                      float(losses["bbox_regression"])])

  # SSD: SSDMatcher(0.5), smooth-L1 on (10, 10, 5, 5) deltas, CE with 3:1 hard negatives.
  ssd_logits = rng.normal(0, 2, (b, n, NUM_CLASSES + 1)).astype(np.float32)
  out["ssd_logits"] = ssd_logits
  ssd_matcher = det_utils.SSDMatcher(0.5)
  ssd_matches = []
  for i in range(b):
    if not counts[i]:
      ssd_matches.append(torch.full((n,), -1, dtype=torch.int64))
      continue
    ssd_matches.append(ssd_matcher(box_iou(targets[i]["boxes"], t(anchors))))
  out["ssd_matches"] = _to_padded_rows(np.stack([x.numpy() for x in ssd_matches]), gt_valid)
  ssd_targets = [{"boxes": x["boxes"], "labels": x["labels"] + 1} for x in targets]
  stub = types.SimpleNamespace(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)),
                               neg_to_pos_ratio=3.0)
  losses = SSD.compute_loss(stub, ssd_targets, {"cls_logits": t(ssd_logits),
                                                "bbox_regression": t(regression)},
                            [t(anchors)] * b, ssd_matches)
  out["ssd_loss"] = np.asarray([float(losses["bbox_regression"]), float(losses["classification"])])

  # FCOS: center sampling 1.5, scale ranges, focal + GIoU + centerness over the batch.
  fcos_shapes = feature_shapes(size, (8, 16, 32, 64, 128))
  fcos_anchors = anchors_of(fcos_gen, (size, size), fcos_shapes)
  nf = len(fcos_anchors)
  per_level = [h * w for h, w in fcos_shapes]
  out["small_fcos_anchors"] = fcos_anchors
  fcos_logits = rng.normal(-2, 1.5, (b, nf, NUM_CLASSES)).astype(np.float32)
  fcos_regression = np.abs(rng.normal(1, 0.5, (b, nf, 4))).astype(np.float32)
  fcos_ctr = rng.normal(0, 1, (b, nf, 1)).astype(np.float32)
  out["fcos_logits"], out["fcos_regression"], out["fcos_ctrness"] = (fcos_logits,
                                                                     fcos_regression, fcos_ctr)
  captured = {}
  fcos_head = FCOSHead(32, 1, NUM_CLASSES)

  def capture(targets_, head_outputs, anchors_, matched_idxs):
    captured["matches"] = [x.numpy() for x in matched_idxs]
    return fcos_head.compute_loss(targets_, head_outputs, anchors_, matched_idxs)

  stub = types.SimpleNamespace(center_sampling_radius=1.5,
                               head=types.SimpleNamespace(compute_loss=capture))
  losses = FCOS.compute_loss(stub, targets, {"cls_logits": t(fcos_logits),
                                             "bbox_regression": t(fcos_regression),
                                             "bbox_ctrness": t(fcos_ctr)},
                             [t(fcos_anchors)] * b, per_level)
  out["fcos_matches"] = _to_padded_rows(np.stack(captured["matches"]), gt_valid)
  out["fcos_loss"] = np.asarray([float(losses[k]) for k in ("classification", "bbox_regression",
                                                            "bbox_ctrness")])

  # --- Elementwise terms -----------------------------------------------------------------------
  x = rng.normal(0, 3, (200,)).astype(np.float32)
  y = (rng.random(200) < 0.3).astype(np.float32)
  out["focal_inputs"], out["focal_targets"] = x, y
  out["focal"] = sigmoid_focal_loss(t(x), t(y)).numpy()
  b1, b2 = random_boxes(rng, 100, 50), random_boxes(rng, 100, 50)
  b1[:5] = b1[:5, [0, 1, 0, 1]]  # degenerate predictions (zero size)
  out["giou_boxes1"], out["giou_boxes2"] = b1, b2
  out["giou_loss"] = generalized_box_iou_loss(t(b1), t(b2)).numpy()

  out["torchvision_version"] = np.asarray(torchvision.__version__)
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, **out)
  print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


def _to_padded_rows(matches: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """torchvision indexes the valid boxes only; map its indices to rows of the padded array."""
  out = matches.copy()
  for i in range(len(matches)):
    rows = np.nonzero(valid[i])[0]
    fg = matches[i] >= 0
    out[i, fg] = rows[matches[i, fg]]
  return out.astype(np.int32)


if __name__ == "__main__":
  main()
