"""Writes goldens/rcnn_losses.npz: torchvision's Faster / Mask R-CNN training pieces on fixed
random inputs, which tests/test_rcnn_training.py compares jaxvision.detection.rcnn_targets and
rcnn_losses against without torch. Run it wherever torchvision imports (CPU is enough):

    PYTHONPATH=/path/to/torch python tests/parity/make_rcnn_loss_goldens.py

Everything comes from torchvision's own Python code: `Matcher`, `BoxCoder.encode_single`,
`RegionProposalNetwork.assign_targets_to_anchors` + `compute_loss`,
`RoIHeads.select_training_samples`, `fastrcnn_loss`, `project_masks_on_boxes` and
`maskrcnn_loss`. The samplers are random, so torchvision's own sampler (seeded) picks the
samples, which are saved; the losses are then torchvision's on those samples, and the test feeds
the same masks to jaxvision. In the `*_small` cases every candidate is sampled (fewer than the
sampler takes), so there the whole random pipeline must agree outright.

RoIAlign, which project_masks_on_boxes calls, is torchvision's pure-Python `_roi_align` with the
compiled kernel's out-of-map rule (a sample more than one pixel outside the map is 0), as in
make_roi_align_goldens.py; the masks are cropped one RoI at a time because the Python version's
adaptive sampling (sampling_ratio=-1, what torchvision uses) materialises every row and column
of the map as candidate samples.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "goldens" / "rcnn_losses.npz"
SEED = 0
IMAGE = 128  # side of the square image the box cases live in
MATCHER_CASES = {"rpn": (0.7, 0.3, True), "roi": (0.5, 0.5, False), "retina": (0.5, 0.4, True)}
MASK_IMAGE = 112  # masks: RoIs up to ~110 px, so adaptive sampling takes 1 to 4 per bin
MASK_FIXED_RATIOS = (1, 2, 3, 4)


def on_grid(x):
  """float32 x rounded to 1/8: every box coordinate is then exact in float16, which halves the
  golden file, and the test reads back the very values torchvision saw."""
  return (np.round(np.asarray(x, np.float64) * 8) / 8).astype(np.float32)


def quantized(rng, shape, scale):
  """float32 noise: integers in [-127, 127] / scale, exact in float16 (and cheap to store)."""
  return (rng.integers(-127, 128, shape) / scale).astype(np.float32)


def random_boxes(rng, n, lo, hi, image=IMAGE):
  """n float32 xyxy boxes with sides in [lo, hi) inside an image x image square."""
  size = rng.uniform(lo, hi, (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (image - size)
  return on_grid(np.concatenate([xy, xy + size], 1))


def jitter(rng, boxes, n, scale):
  """n float32 copies of random rows of boxes, each side moved by up to scale x the box size."""
  rows = boxes[rng.integers(0, len(boxes), n)]
  wh = np.concatenate([rows[:, 2:] - rows[:, :2]] * 2, 1)
  return on_grid(rows + rng.uniform(-scale, scale, rows.shape) * wh)


def pad(arrays, length, fill=0):
  """[len(arrays), length, ...] stack of arrays padded with `fill` along their first axis."""
  out = np.full((len(arrays), length) + arrays[0].shape[1:], fill, arrays[0].dtype)
  for i, a in enumerate(arrays):
    out[i, :len(a)] = a
  return out


def valid_mask(counts, length):
  return np.arange(length)[None, :] < np.asarray(counts)[:, None]


def matcher_cases(torch, det_utils, box_ops, rng, out):
  counts = [4, 2]
  m = max(counts)
  anchors = random_boxes(rng, 270, 8, 60)
  anchors = np.concatenate([anchors, anchors[:30]])  # exact duplicates: ties of every IoU
  gts = []
  for count in counts:
    gt = random_boxes(rng, count, 10, 70)
    a = anchors[rng.integers(0, 30)]
    # A 3 px box inside a duplicated anchor: its best IoU is tiny and shared by two anchors,
    # the low-quality rule's tie case.
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    gt[-1] = [cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5]
    gts.append(gt)
  ious = [box_ops.box_iou(torch.from_numpy(g), torch.from_numpy(anchors)).numpy() for g in gts]
  out["matcher_anchors"] = anchors
  out["matcher_gt_boxes"] = pad(gts, m)
  out["matcher_gt_valid"] = valid_mask(counts, m)
  out["matcher_iou"] = pad(ious, m)
  for name, (high, low, low_quality) in MATCHER_CASES.items():
    matcher = det_utils.Matcher(high, low, allow_low_quality_matches=low_quality)
    out[f"matcher_{name}_matches"] = np.stack(
        [matcher(torch.from_numpy(iou)).numpy() for iou in ious]).astype(np.int32)
  out["matcher_cases"] = np.array(list(MATCHER_CASES))
  out["matcher_args"] = np.array(list(MATCHER_CASES.values()), np.float64)


def encode_cases(torch, det_utils, rng, out):
  references = random_boxes(rng, 50, 4, 90)
  proposals = jitter(rng, references, 50, 0.3)
  proposals[:, 2:] = np.maximum(proposals[:, 2:], proposals[:, :2] + 1)
  out["encode_references"], out["encode_proposals"] = references, proposals
  for tag, weights in (("rpn", (1.0, 1.0, 1.0, 1.0)), ("roi", (10.0, 10.0, 5.0, 5.0))):
    coder = det_utils.BoxCoder(weights)
    out[f"encode_{tag}"] = coder.encode_single(torch.from_numpy(references),
                                               torch.from_numpy(proposals)).numpy()


def grid_anchors(stride, sizes, ratios):
  """torchvision-style anchors: every (size, ratio) cell anchor at every stride position."""
  cells = []
  for ratio in ratios:
    for size in sizes:
      h, w = size * np.sqrt(ratio), size / np.sqrt(ratio)
      cells.append([-w / 2, -h / 2, w / 2, h / 2])
  shifts = np.arange(0, IMAGE, stride) + stride / 2
  sx, sy = np.meshgrid(shifts, shifts)
  shift = np.stack([sx, sy, sx, sy], -1).reshape(-1, 1, 4)
  return (shift + np.round(np.array(cells))[None]).reshape(-1, 4).astype(np.float32)


def rpn_cases(torch, rpn_module, rng, out):
  rpn = rpn_module.RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 1},
                                         {"training": 1}, 0.7)
  cases = {
      # 144 anchors: fewer than 256 per image, so the sampler takes every non-ignored anchor.
      "small": (grid_anchors(32, (24, 48, 80), (0.5, 1.0, 2.0))[:144], [3, 1, 0]),
      "large": (grid_anchors(8, (16, 32, 64), (0.5, 1.0, 2.0)), [6, 2]),
  }
  for name, (anchors, counts) in cases.items():
    m = max(counts)
    gts = [random_boxes(rng, c, 12, 100) for c in counts]
    targets = [{"boxes": torch.from_numpy(g)} for g in gts]
    a = torch.from_numpy(anchors)
    labels, matched = rpn.assign_targets_to_anchors([a] * len(counts), targets)
    regression = rpn.box_coder.encode(matched, [a] * len(counts))
    torch.manual_seed(SEED)
    positive, negative = rpn.fg_bg_sampler(labels)
    objectness = quantized(rng, (len(counts), len(anchors)), 16)
    deltas = quantized(rng, (len(counts), len(anchors), 4), 64)
    sampler = rpn.fg_bg_sampler
    rpn.fg_bg_sampler = lambda _labels, p=positive, n=negative: (p, n)
    try:
      loss_objectness, loss_box = rpn.compute_loss(
          torch.from_numpy(objectness).reshape(-1, 1), torch.from_numpy(deltas).reshape(-1, 4),
          labels, regression)
    finally:
      rpn.fg_bg_sampler = sampler
    p = f"rpn_{name}_"
    out[p + "anchors"], out[p + "gt_boxes"] = anchors, pad(gts, m)
    out[p + "gt_valid"] = valid_mask(counts, m)
    out[p + "objectness"], out[p + "deltas"] = objectness, deltas
    out[p + "labels"] = torch.stack(labels).numpy().astype(np.int32)
    # Only the foreground's targets are read by a loss (the rest encode gt 0 or nothing).
    labels_np = torch.stack(labels).numpy()
    out[p + "regression_targets"] = np.where(labels_np[..., None] == 1,
                                             torch.stack(regression).numpy(), 0)
    out[p + "positive"] = torch.stack(positive).numpy().astype(bool)
    out[p + "negative"] = torch.stack(negative).numpy().astype(bool)
    out[p + "losses"] = np.array([loss_objectness.item(), loss_box.item()], np.float64)


def roi_cases(torch, roi_heads_module, rng, out):
  heads = roi_heads_module.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
  cases = {
      # At most 62 candidates per image and 128 positives: every candidate is sampled.
      "small": ([40, 30, 20], [4, 2, 0], 0.25),
      "large": ([800, 700], [5, 3], 0.15),
  }
  for name, (num_proposals, counts, near) in cases.items():
    m, p_max = max(counts), max(num_proposals)
    gts, classes, proposals = [], [], []
    for n, c in zip(num_proposals, counts, strict=True):
      gt = random_boxes(rng, c, 12, 90)
      close = int(n * 0.4) if c else 0
      props = np.concatenate([jitter(rng, gt, close, near) if c else np.zeros((0, 4), np.float32),
                              random_boxes(rng, n - close, 6, 100)])
      gts.append(gt)
      classes.append(rng.integers(0, 6, c).astype(np.int64))  # data classes 0..5
      proposals.append(props)
    targets = [{"boxes": torch.from_numpy(g), "labels": torch.from_numpy(k + 1)}
               for g, k in zip(gts, classes, strict=True)]
    # Every candidate's assignment (the sampled ones are looked up in it by the test).
    candidates = [torch.cat([torch.from_numpy(p), t["boxes"]])
                  for p, t in zip(proposals, targets, strict=True)]
    all_matched, all_labels = heads.assign_targets_to_proposals(
        candidates, [t["boxes"] for t in targets], [t["labels"] for t in targets])
    torch.manual_seed(SEED)
    sampled, matched, labels, regression = heads.select_training_samples(
        [torch.from_numpy(p) for p in proposals], targets)
    pre = f"roi_{name}_"
    # Padding rows hold random boxes: the test checks they are never sampled.
    out[pre + "proposals"] = np.stack([
        np.concatenate([p, random_boxes(rng, p_max - len(p), 6, 100)]) for p in proposals])
    out[pre + "proposal_valid"] = valid_mask(num_proposals, p_max)
    out[pre + "gt_boxes"] = pad(gts, m)
    out[pre + "gt_classes"] = pad([k.astype(np.int32) for k in classes], m)
    out[pre + "gt_valid"] = valid_mask(counts, m)
    out[pre + "candidate_labels"] = pad([x.numpy().astype(np.int32) for x in all_labels],
                                        p_max + m, -9)
    out[pre + "candidate_matched"] = pad([x.numpy().astype(np.int32) for x in all_matched],
                                         p_max + m, -9)
    n_sampled = [len(s) for s in sampled]
    out[pre + "num_positive"] = np.array([int((x > 0).sum()) for x in labels], np.int32)
    out[pre + "num_sampled"] = np.array(n_sampled, np.int32)
    out[pre + "sampled_rois"] = pad([s.numpy() for s in sampled], max(n_sampled))
    out[pre + "sampled_labels"] = pad([x.numpy().astype(np.int32) for x in labels], max(n_sampled))
    out[pre + "sampled_matched"] = pad([x.numpy().astype(np.int32) for x in matched],
                                       max(n_sampled))
    positive_targets = [np.where(x.numpy()[:, None] > 0, t.numpy(), 0)
                        for x, t in zip(labels, regression, strict=True)]
    out[pre + "sampled_targets"] = pad(positive_targets, max(n_sampled))


def fastrcnn_case(torch, roi_heads_module, rng, out):
  b, s, c, counts = 2, 24, 4, [20, 15]
  valid = valid_mask(counts, s)
  labels = np.where(rng.uniform(size=(b, s)) < 0.4, rng.integers(1, c, (b, s)), 0)
  labels = np.where(valid, labels, rng.integers(0, c, (b, s))).astype(np.int32)  # junk padding
  class_logits = quantized(rng, (b, s, c), 32)
  box_regression = quantized(rng, (b, s, c * 4), 64)
  targets = quantized(rng, (b, s, 4), 256)
  loss_classifier, loss_box = roi_heads_module.fastrcnn_loss(
      torch.from_numpy(class_logits[valid]), torch.from_numpy(box_regression[valid]),
      [torch.from_numpy(labels[i, :n].astype(np.int64)) for i, n in enumerate(counts)],
      [torch.from_numpy(targets[i, :n]) for i, n in enumerate(counts)])
  out.update(fastrcnn_class_logits=class_logits, fastrcnn_box_regression=box_regression,
             fastrcnn_labels=labels, fastrcnn_regression_targets=targets, fastrcnn_valid=valid,
             fastrcnn_losses=np.array([loss_classifier.item(), loss_box.item()], np.float64))


def ellipse_masks(rng, n, size):
  """n uint8 [size, size] masks, each one random ellipse, and their xyxy boxes."""
  yy, xx = np.mgrid[:size, :size] + 0.5
  masks, boxes = [], []
  for i in range(n):
    # The first mask is large: adaptive sampling then takes up to 4 samples per bin.
    rx, ry = rng.uniform(0.36, 0.48, 2) * size if i == 0 else rng.uniform(0.08, 0.3, 2) * size
    cx, cy = rng.uniform(rx, size - rx), rng.uniform(ry, size - ry)
    masks.append((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8))
    boxes.append([cx - rx, cy - ry, cx + rx, cy + ry])
  return np.stack(masks), on_grid(boxes)


def kernel_roi_align(torch, module):
  """torchvision's Python _roi_align with the compiled kernel's out-of-map rule."""
  python_roi_align = module._roi_align.__wrapped__
  bilinear = module._bilinear_interpolate

  def kernel_bilinear(input, roi_batch_ind, y, x, ymask, xmask):
    _, _, height, width = input.shape
    y_in = (y >= -1.0) & (y <= height)
    x_in = (x >= -1.0) & (x <= width)
    val = bilinear(input, roi_batch_ind, y, x, ymask, xmask)
    keep = y_in[:, None, :, None, :, None] & x_in[:, None, None, :, None, :]
    return torch.where(keep, val, torch.zeros((), dtype=val.dtype))

  def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    module._bilinear_interpolate = kernel_bilinear
    try:
      rows = [python_roi_align(input, boxes[i:i + 1], spatial_scale, output_size[0],
                               output_size[1], sampling_ratio, aligned) for i in range(len(boxes))]
    finally:
      module._bilinear_interpolate = bilinear
    return torch.cat(rows)

  return roi_align


def mask_case(torch, roi_heads_module, roi_align_module, rng, out):
  b, r, c, counts, positives = 2, 6, 3, [3, 2], [5, 3]
  masks, gt_labels, rois, matched = [], [], [], []
  for count, pos in zip(counts, positives, strict=True):
    image_masks, image_boxes = ellipse_masks(rng, count, MASK_IMAGE)
    idx = rng.integers(0, count, pos)
    idx[:2] = 0  # the large mask, once exactly and once jittered
    # Jittered gt boxes, some past the image border as positive proposals can be, and one
    # exact gt box.
    image_rois = jitter(rng, image_boxes[idx], pos, 0.2)
    image_rois[0] = image_boxes[idx[0]]
    masks.append(image_masks)
    gt_labels.append(rng.integers(1, c, count))  # maskrcnn_loss reads labels off the gts
    rois.append(image_rois)
    matched.append(idx.astype(np.int32))
  m = max(counts)
  labels = [g[idx].astype(np.int32) for g, idx in zip(gt_labels, matched, strict=True)]
  logits = quantized(rng, (b, r, 28, 28, c), 32)
  aligned_rois = kernel_roi_align(torch, roi_align_module)
  roi_heads_module.roi_align = aligned_rois  # what project_masks_on_boxes calls
  targets = {}
  for ratio in (-1,) + MASK_FIXED_RATIOS:
    per_image = []
    for image_masks, image_rois, idx in zip(masks, rois, matched, strict=True):
      rows = torch.cat([torch.from_numpy(idx.astype(np.float32))[:, None],
                        torch.from_numpy(image_rois)], 1)
      crop = aligned_rois(torch.from_numpy(image_masks)[:, None].float(), rows, (28, 28), 1.0,
                          ratio, False)[:, 0]
      per_image.append(crop.numpy())
    targets[ratio] = pad(per_image, r)
  # torchvision's own project_masks_on_boxes (adaptive) must be what was cropped above.
  projected = roi_heads_module.project_masks_on_boxes(
      torch.from_numpy(masks[0]), torch.from_numpy(rois[0]), torch.from_numpy(matched[0]), 28)
  assert np.array_equal(projected.numpy(), targets[-1][0, :positives[0]])
  positive = valid_mask(positives, r)
  loss = roi_heads_module.maskrcnn_loss(
      torch.from_numpy(logits[positive]).permute(0, 3, 1, 2), [torch.from_numpy(x) for x in rois],
      [torch.from_numpy(x) for x in masks], [torch.from_numpy(x) for x in gt_labels],
      [torch.from_numpy(x.astype(np.int64)) for x in matched])
  out["mask_gt_masks"] = pad(masks, m)
  out["mask_rois"] = pad(rois, r)
  out["mask_matched"] = pad(matched, r)
  out["mask_labels"] = pad(labels, r)
  out["mask_positive"] = positive
  out["mask_logits"] = logits
  out["mask_targets_adaptive"] = targets[-1].astype(np.float32)
  for ratio in MASK_FIXED_RATIOS:
    out[f"mask_targets_ratio{ratio}"] = targets[ratio].astype(np.float32)
  out["mask_loss"] = np.array(loss.item(), np.float64)
  sides = np.concatenate([x[:, 2:] - x[:, :2] for x in rois])
  print(f"mask RoIs: sides {sides.min():.0f}..{sides.max():.0f} px")


def main() -> None:
  sys.path.insert(0, str(HERE))
  import importlib

  import torch
  from make_torchvision_goldens import import_torchvision

  torchvision = import_torchvision()
  det_utils = importlib.import_module("torchvision.models.detection._utils")
  rpn_module = importlib.import_module("torchvision.models.detection.rpn")
  roi_heads_module = importlib.import_module("torchvision.models.detection.roi_heads")
  roi_align_module = importlib.import_module("torchvision.ops.roi_align")
  box_ops = torchvision.ops.boxes
  rng = np.random.default_rng(SEED)
  out: dict[str, np.ndarray] = {}
  matcher_cases(torch, det_utils, box_ops, rng, out)
  encode_cases(torch, det_utils, rng, out)
  rpn_cases(torch, rpn_module, rng, out)
  roi_cases(torch, roi_heads_module, rng, out)
  fastrcnn_case(torch, roi_heads_module, rng, out)
  mask_case(torch, roi_heads_module, roi_align_module, rng, out)
  out["torchvision_version"] = np.asarray(torchvision.__version__)
  GOLDEN.parent.mkdir(exist_ok=True)
  # float32 arrays whose values are exact in float16 are stored as float16 (the test widens).
  small = {k: v.astype(np.float16) if v.dtype == np.float32
           and np.array_equal(v.astype(np.float16).astype(np.float32), v) else v
           for k, v in out.items()}
  np.savez_compressed(GOLDEN, **small)
  for name in ("small", "large"):
    print(f"rpn_{name}: {out[f'rpn_{name}_positive'].sum(1)} positive, "
          f"{out[f'rpn_{name}_negative'].sum(1)} negative anchors sampled")
    print(f"roi_{name}: {out[f'roi_{name}_num_positive']} positive of "
          f"{out[f'roi_{name}_num_sampled']} sampled")
  print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
