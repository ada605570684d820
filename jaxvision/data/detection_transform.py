"""The detection batch transform: decode, box-aware augmentation, resize + pad, normalise, pad
the boxes to max_boxes.

Input: a `DetectionSource.get_batch` dict (per-example lists of images and boxes). Output, the
batch contract of task 'detection' (host NumPy):

    image      float32 [B, S, S, C]  normalised as data.normalize says
    boxes      float32 [B, M, 4]     xyxy in pixels of the transformed image
    classes    int32 [B, M]          contiguous class index
    box_valid  bool [B, M]           real boxes (the rest is padding)
    box_ignore bool [B, M]           crowd / difficult: ignored by evaluation and training
    id         int64 [B]
    orig_size  int32 [B, 2]          (H, W) of the original image
    scale      float32 [B, 2]        a point p of the original maps to p * scale + offset
    offset     float32 [B, 2]        ((x, y); scale_x < 0 after a flip)
    box_area   float32 [B, M]        only with include_area: the annotations' own areas
                                     (COCO's segment areas) in original pixels
    masks      uint8 [B, M, S, S]    only with data.masks: each box's instance mask (0/1) in
                                     pixels of the transformed image, 0 for padding boxes

M is max_boxes: an image with more boxes keeps its first M (a warning, once). Evaluation keeps
every box; training drops boxes a crop emptied (and, after iou_crop, those whose centers it cut
off). See jaxvision.data.box_augment for the ops; masks follow the image through the same
resize, letterbox, crop and flip (bilinear, then thresholded at one half: render_masks says why).
"""

from __future__ import annotations

import logging

import numpy as np

from jaxvision.data import box_augment as ops_lib
from jaxvision.data.augment import parse_augment
from jaxvision.data.decode import EncodedImage, decode, default_workers, parallel_map
from jaxvision.data.detection_source import masks_wanted
from jaxvision.data.transforms import Normalize, normalization

log = logging.getLogger(__name__)
DEFAULT_MAX_BOXES = 100


def _decoded(item, mode_channels: int, skip_bad: bool, size: int):
  if isinstance(item, EncodedImage):
    try:
      return decode(item), None
    except ValueError as e:
      if not skip_bad:
        raise
      # Header fine, pixels corrupt (found only now): a gray image without boxes keeps the
      # batch shape.
      log.warning("data.skip_bad: replacing %s by a gray image without boxes", e)
      return np.full((size, size, mode_channels), 128, np.uint8), item.name
  image = np.asarray(item)
  if image.dtype != np.uint8:
    image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  return (image[..., None] if image.ndim == 2 else image), None


def detection_transform(data_config, *, train: bool, image_size: int,
                        max_boxes: int = DEFAULT_MAX_BOXES, include_area: bool = False):
  """The host transform `fn(batch, rng) -> batch` of a detection split (module docstring)."""
  if not image_size or image_size < 1:
    raise ValueError(f"image_size={image_size}: detection needs a positive input size")
  if max_boxes < 1:
    raise ValueError(f"max_boxes={max_boxes}: must be at least 1")
  spec = data_config.augment if train else ""
  ops = parse_augment(spec, "detection")
  ops_lib.check_detection_ops(spec, ops)
  workers = default_workers(int(data_config.workers))
  norm = Normalize(*normalization(data_config.normalize), workers=workers)
  mean_u8 = np.clip(np.round(np.asarray(norm.mean) * 255), 0, 255).astype(np.uint8)
  skip_bad = bool(data_config.skip_bad)
  size = int(image_size)
  with_masks = masks_wanted(data_config)
  state = {"reported": False}

  def one(item, boxes, classes, ignore, areas, orig_size, rng, masks):
    image, bad = _decoded(item, 1 if getattr(item, "mode", "RGB") == "L" else 3, skip_bad, size)
    if bad is not None:
      boxes = boxes[:0]
      classes, ignore, areas = classes[:0], ignore[:0], areas[:0]
      masks = None if masks is None else np.zeros((0,) + image.shape[:2], np.uint8)
    elif tuple(image.shape[:2]) != tuple(int(v) for v in orig_size):
      # Boxes are in the annotation's pixels: a file of another size would misplace them all.
      raise ValueError(f"image {getattr(item, 'name', '')} is {image.shape[1]}x{image.shape[0]} "
                       f"but its annotation says {int(orig_size[1])}x{int(orig_size[0])}")
    h, w, c = image.shape
    frame = (0.0, 0.0, float(w), float(h))
    keep = np.ones(len(boxes), bool)
    if "zoom_out" in ops and rng.random() < 0.5:
      frame = ops_lib.zoom_out_frame(h, w, rng, ops["zoom_out"][0])
    if "iou_crop" in ops:
      frame, inside = ops_lib.iou_crop_frame(frame, boxes, rng)
      if inside is not None:
        keep &= inside
    if "scale_jitter" in ops:
      view = ops_lib.fit_view(frame, size, rng.uniform(*ops["scale_jitter"]), rng)
    else:
      view = ops_lib.fit_view(frame, size)
    view = ops_lib.snap(view, h, w)
    out, (x0, y0, x1, y1) = ops_lib.render(image, view, size, np.resize(mean_u8, c))
    if "photometric" in ops:
      out[y0:y1, x0:x1] = ops_lib.photometric(out[y0:y1, x0:x1], rng)
    if masks is not None:
      masks = ops_lib.render_masks(masks[keep], view, size)
    if "flip" in ops and rng.random() < 0.5:
      out = out[:, ::-1]
      masks = None if masks is None else masks[:, :, ::-1]
      view = view.flipped(size)
    mapped = np.clip(view.boxes(boxes.reshape(-1, 4)), 0, size)
    kept = keep
    if train:  # boxes a crop emptied are no longer objects of this image
      kept = keep & (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
    if masks is not None:
      masks = masks[kept[keep]]
    return (np.ascontiguousarray(out), mapped[kept], classes[kept], ignore[kept], areas[kept],
            (view.sx, view.sy), (view.ox, view.oy), masks)

  def instance_masks(batch, i, num_boxes):
    if not with_masks:
      return None
    if "masks" not in batch:
      raise ValueError("data.masks=True, but this dataset has no instance masks (the coco: "
                       "reader has them, from each annotation's segmentation)")
    item = batch["masks"][i]
    masks = item.decode() if hasattr(item, "decode") else np.asarray(item, np.uint8)
    h, w = (int(v) for v in batch["orig_size"][i])
    if masks.shape != (num_boxes, h, w):
      name = batch["name"][i] if "name" in batch else f"example {i}"
      raise ValueError(f"{name}: instance masks {masks.shape} for {num_boxes} boxes of a "
                       f"{w}x{h} image (expected {(num_boxes, h, w)})")
    return masks

  def transform(batch, rng):
    b = len(batch["id"])
    example_rngs = rng.spawn(b)

    def example(i):
      boxes = np.asarray(batch["boxes"][i], np.float32)
      return one(batch["image"][i], boxes, np.asarray(batch["classes"][i], np.int32),
                 np.asarray(batch["ignore"][i], bool), np.asarray(batch["area"][i], np.float32),
                 batch["orig_size"][i], example_rngs[i],
                 instance_masks(batch, i, len(boxes.reshape(-1, 4))))

    results = parallel_map(example, range(b), workers)
    channels = {r[0].shape[-1] for r in results}
    if len(channels) > 1:
      raise ValueError(f"images of one batch have {sorted(channels)} channels "
                       f"({', '.join(str(n) for n in batch.get('name', [])[:3])}, ...)")
    out = {
        "image": norm(np.stack([r[0] for r in results])),
        "boxes": np.zeros((b, max_boxes, 4), np.float32),
        "classes": np.zeros((b, max_boxes), np.int32),
        "box_valid": np.zeros((b, max_boxes), bool),
        "box_ignore": np.zeros((b, max_boxes), bool),
        "id": np.asarray(batch["id"], np.int64),
        "orig_size": np.asarray(batch["orig_size"], np.int32).reshape(b, 2),
        "scale": np.asarray([r[5] for r in results], np.float32).reshape(b, 2),
        "offset": np.asarray([r[6] for r in results], np.float32).reshape(b, 2),
    }
    if include_area:
      out["box_area"] = np.zeros((b, max_boxes), np.float32)
    if with_masks:
      out["masks"] = np.zeros((b, max_boxes, size, size), np.uint8)
    for i, (_, boxes, classes, ignore, areas, _, _, masks) in enumerate(results):
      n = len(boxes)
      if n > max_boxes and not state["reported"]:
        state["reported"] = True
        name = batch["name"][i] if "name" in batch else f"id {int(out['id'][i])}"
        log.warning("%s has %d boxes, more than max_boxes=%d: the first %d are kept (reported "
                    "once; raise detection.max_boxes to keep them all)", name, n, max_boxes,
                    max_boxes)
      n = min(n, max_boxes)
      out["boxes"][i, :n] = boxes[:n]
      out["classes"][i, :n] = classes[:n]
      out["box_valid"][i, :n] = True
      out["box_ignore"][i, :n] = ignore[:n]
      if include_area:
        out["box_area"][i, :n] = areas[:n]
      if with_masks:
        out["masks"][i, :n] = masks[:n]
    return out

  return transform
