"""Box-aware geometry and colour augmentation for detection, NumPy / PIL on the host.

The geometric ops never resample twice. They only decide an affine map `View` from original
pixels to the size x size output (per axis p -> p * scale + offset; a horizontal flip makes
scale_x negative), and `render` then produces the output with ONE PIL resize of the visible
part of the image, pasted at whole-pixel positions. Before rendering, the view is snapped so
the image's edges fall on whole output pixels; boxes are mapped with that same snapped view, so
a box covers exactly the pixels of its object after any combination of ops.

The `data.augment` names for task 'detection' (each at most once; the order is fixed):

  photometric                 SSD's colour distortion: brightness, contrast, saturation, hue,
                              each with p = 0.5 (torchvision RandomPhotometricDistort)
  zoom_out(max_ratio=4)       with p = 0.5, the image placed at random in a canvas up to
                              max_ratio x its size, filled with the mean colour (RandomZoomOut)
  iou_crop                    SSD's random crop whose IoU with some box reaches a random
                              minimum in {0, .1, .3, .5, .7, .9, none}; boxes whose centers
                              fall outside are dropped (torchvision RandomIoUCrop)
  scale_jitter(min=0.5, max=1.5)
                              the fit-to-size scale multiplied by a random factor in
                              [min, max]: a random window when larger, a random place when
                              smaller
  flip                        horizontal flip, p = 0.5

Every image is then resized with its aspect ratio kept to fit size x size and padded (right
and bottom) with the mean colour: the eval transform does only that.

Instance masks (`render_masks`) take the image's path exactly: the same window of the same
view, resized by the same PIL bilinear filter from 0/255 planes and thresholded at 128, then the
same flip. A mask pixel is then on exactly where the resampled image is at least half object,
so masks and pixels agree along every edge; nearest-neighbour sampling would instead shift
edges by up to half a source pixel and, when shrinking, drop thin parts at random.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from jaxvision.data.augment import OPS_OF_TASK

DETECTION_OPS: dict[str, tuple[float, ...]] = {
    "photometric": (),
    "zoom_out": (4.0,),
    "iou_crop": (),
    "scale_jitter": (0.5, 1.5),
    "flip": (),
}
# The augment parser knows each task's ops through this table.
OPS_OF_TASK.setdefault("detection", DETECTION_OPS)

IOU_CROP_OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # 1.0: leave the image as it is


def check_detection_ops(spec: str, ops: dict[str, tuple[float, ...]]) -> None:
  """Range checks of the detection ops' arguments (a ValueError names the op)."""
  if "zoom_out" in ops and ops["zoom_out"][0] < 1:
    raise ValueError(f"data.augment={spec!r}: zoom_out(max_ratio) needs max_ratio >= 1")
  if "scale_jitter" in ops:
    lo, hi = ops["scale_jitter"]
    if not 0 < lo <= hi:
      raise ValueError(f"data.augment={spec!r}: scale_jitter(min, max) needs 0 < min <= max")


@dataclasses.dataclass(frozen=True)
class View:
  """Original pixels -> output pixels: x' = x * sx + ox, y' = y * sy + oy.

  Attributes:
    sx / sy: scale per axis (sx < 0 after a horizontal flip).
    ox / oy: offset per axis, in output pixels.
  """

  sx: float
  sy: float
  ox: float
  oy: float

  def boxes(self, boxes: np.ndarray) -> np.ndarray:
    """xyxy boxes [n, 4] mapped to the output (corners kept in order under a flip)."""
    x1, x2 = boxes[:, 0] * self.sx + self.ox, boxes[:, 2] * self.sx + self.ox
    y1, y2 = boxes[:, 1] * self.sy + self.oy, boxes[:, 3] * self.sy + self.oy
    return np.stack([np.minimum(x1, x2), y1, np.maximum(x1, x2), y2], axis=1).astype(np.float32)

  def flipped(self, size: int) -> View:
    """The view followed by a horizontal flip of the size-wide output."""
    return View(-self.sx, self.sy, size - self.ox, self.oy)


def _edge_snap(scale: float, offset: float, extent: int) -> tuple[float, float]:
  # The image spans [offset, offset + scale * extent] in the output; rounding both ends to
  # whole pixels lets one resize fill exactly that span.
  lo, hi = round(offset), round(offset + scale * extent)
  return (hi - lo) / extent, float(lo)


def snap(view: View, height: int, width: int) -> View:
  """`view` adjusted (by under a pixel) so the image's edges land on whole output pixels."""
  if view.sx < 0:
    raise ValueError("snap: flip after snapping (View.flipped)")
  sx, ox = _edge_snap(view.sx, view.ox, width)
  sy, oy = _edge_snap(view.sy, view.oy, height)
  return View(sx, sy, ox, oy)


def fit_view(frame: tuple[float, float, float, float], size: int, factor: float = 1.0,
             rng: np.random.Generator | None = None) -> View:
  """The view that shows `frame` (x0, y0, x1, y1 in original pixels) scaled to fit size x
  size times `factor`: top-left without `rng`; with it, a random window of a larger frame or a
  random place for a smaller one."""
  x0, y0, x1, y1 = frame
  scale = size / max(x1 - x0, y1 - y0) * factor
  w, h = (x1 - x0) * scale, (y1 - y0) * scale
  shift_x = shift_y = 0.0
  if rng is not None:
    shift_x = rng.uniform(min(0.0, size - w), max(0.0, size - w))
    shift_y = rng.uniform(min(0.0, size - h), max(0.0, size - h))
  return View(scale, scale, shift_x - x0 * scale, shift_y - y0 * scale)


def zoom_out_frame(height: int, width: int, rng: np.random.Generator, max_ratio: float):
  """RandomZoomOut's canvas, as a frame in original pixels (the image somewhere inside)."""
  ratio = rng.uniform(1.0, max_ratio)
  canvas_w, canvas_h = int(width * ratio), int(height * ratio)
  left = int((canvas_w - width) * rng.random())
  top = int((canvas_h - height) * rng.random())
  return (-float(left), -float(top), float(canvas_w - left), float(canvas_h - top))


def _iou_with(boxes: np.ndarray, crop: tuple[float, float, float, float]) -> np.ndarray:
  w = np.clip(np.minimum(boxes[:, 2], crop[2]) - np.maximum(boxes[:, 0], crop[0]), 0, None)
  h = np.clip(np.minimum(boxes[:, 3], crop[3]) - np.maximum(boxes[:, 1], crop[1]), 0, None)
  inter = w * h
  union = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
           + (crop[2] - crop[0]) * (crop[3] - crop[1]) - inter)
  return inter / np.maximum(union, 1e-12)


def iou_crop_frame(frame, boxes: np.ndarray, rng: np.random.Generator, *, min_scale=0.3,
                   max_scale=1.0, min_aspect=0.5, max_aspect=2.0, trials=40, max_draws=50):
  """SSD's IoU-constrained crop of `frame` (torchvision RandomIoUCrop's sampling): returns
  (new frame, [n] bool boxes kept: centers inside the crop), or (frame, None) when the draw
  leaves the image as it is."""
  if not len(boxes):  # nothing to constrain the crop with: keep the image
    return frame, None
  fx0, fy0, fx1, fy1 = frame
  fw, fh = fx1 - fx0, fy1 - fy0
  cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
  cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
  # torchvision loops until it succeeds; a bounded number of option draws keeps a pathological
  # image (no feasible crop) from hanging the input pipeline.
  for _ in range(max_draws):
    min_iou = IOU_CROP_OPTIONS[int(rng.integers(0, len(IOU_CROP_OPTIONS)))]
    if min_iou >= 1.0:
      return frame, None
    for _ in range(trials):
      r = min_scale + (max_scale - min_scale) * rng.random(2)
      new_w, new_h = int(fw * r[0]), int(fh * r[1])
      if new_h == 0 or not min_aspect <= new_w / new_h <= max_aspect:
        continue
      r = rng.random(2)
      left, top = int((fw - new_w) * r[0]), int((fh - new_h) * r[1])
      if new_w == 0:
        continue
      crop = (fx0 + left, fy0 + top, fx0 + left + new_w, fy0 + top + new_h)
      inside = (crop[0] < cx) & (cx < crop[2]) & (crop[1] < cy) & (cy < crop[3])
      if not inside.any():
        continue
      if _iou_with(boxes[inside], crop).max() < min_iou:
        continue
      return crop, inside
  return frame, None


def _window(h: int, w: int, view: View, size: int):
  """(output window (x0, y0, x1, y1) an h x w image occupies under the snapped `view`, its
  preimage box in image pixels), or None when nothing of the image is visible."""
  x0, x1 = max(0, int(view.ox)), min(size, int(round(view.ox + view.sx * w)))
  y0, y1 = max(0, int(view.oy)), min(size, int(round(view.oy + view.sy * h)))
  if x1 <= x0 or y1 <= y0:
    return None
  # The window's preimage: inside the image up to rounding, which the clip removes.
  box = (min(max((x0 - view.ox) / view.sx, 0.0), w), min(max((y0 - view.oy) / view.sy, 0.0), h),
         min(max((x1 - view.ox) / view.sx, 0.0), w), min(max((y1 - view.oy) / view.sy, 0.0), h))
  return (x0, y0, x1, y1), box


def render(image: np.ndarray, view: View, size: int, fill) -> tuple[np.ndarray, tuple]:
  """(size x size x C uint8 output of `image` [H, W, C] under the snapped `view` (sx > 0),
  the output window (x0, y0, x1, y1) the image occupies); the rest is `fill` (C values)."""
  h, w, c = image.shape
  out = np.empty((size, size, c), np.uint8)
  out[...] = np.broadcast_to(np.asarray(fill, np.uint8), (c,))
  window = _window(h, w, view, size)
  if window is None:
    return out, (0, 0, 0, 0)
  (x0, y0, x1, y1), box = window
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  patch = np.asarray(pil.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=box))
  out[y0:y1, x0:x1] = patch.reshape(y1 - y0, x1 - x0, c)
  return out, (x0, y0, x1, y1)


def render_masks(masks: np.ndarray, view: View, size: int) -> np.ndarray:
  """uint8 [n, size, size] 0/1: instance masks [n, H, W] (0/1) under the snapped `view`, as
  `render` moves the image (module docstring); 0 outside the image's window."""
  n, h, w = masks.shape
  out = np.zeros((n, size, size), np.uint8)
  window = _window(h, w, view, size)
  if window is None or not n:
    return out
  (x0, y0, x1, y1), box = window
  for k in range(n):
    plane = Image.fromarray((masks[k] != 0).astype(np.uint8) * 255)
    patch = np.asarray(plane.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=box))
    out[k, y0:y1, x0:x1] = patch >= 128
  return out


# --- Colour --------------------------------------------------------------------------------

_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def photometric(image: np.ndarray, rng: np.random.Generator, *, brightness=(0.875, 1.125),
                contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.05, 0.05),
                p: float = 0.5) -> np.ndarray:
  """SSD's photometric distortion of a uint8 [H, W, C] image (saturation and hue only for
  colour images); contrast comes before or after the colour changes at random."""
  if image.size == 0:
    return image
  x = image.astype(np.float32) / 255.0
  color = x.shape[-1] == 3

  def gray(a):
    return (a @ _GRAY)[..., None] if color else a

  if rng.random() < p:
    x = x * rng.uniform(*brightness)
  contrast_first = rng.random() < 0.5
  if contrast_first and rng.random() < p:
    x = np.clip(x, 0, 1)
    x = (x - gray(x).mean()) * rng.uniform(*contrast) + gray(x).mean()
  if color and rng.random() < p:
    x = np.clip(x, 0, 1)
    g = gray(x)
    x = (x - g) * rng.uniform(*saturation) + g
  if color and rng.random() < p:
    x = _rotate_hue(np.clip(x, 0, 1), rng.uniform(*hue))
  if not contrast_first and rng.random() < p:
    x = np.clip(x, 0, 1)
    x = (x - gray(x).mean()) * rng.uniform(*contrast) + gray(x).mean()
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _rotate_hue(x: np.ndarray, turns: float) -> np.ndarray:
  # A rotation of the chroma plane in YIQ space: the hue shifts by `turns` of a full circle
  # while luma stays put (the HSV round trip, vectorised and without its branch per sector).
  to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    np.float32)
  angle = 2 * math.pi * turns
  rot = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)],
                  [0, math.sin(angle), math.cos(angle)]], np.float32)
  m = np.linalg.inv(to_yiq) @ rot @ to_yiq
  return x @ m.T.astype(np.float32)
