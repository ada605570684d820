"""Host-side batch transforms: crops and resizes, augmentation, scaling and normalization.

`build_transform(data_config, train=..., task=..., image_size=...)` returns
`fn(batch, np_rng) -> batch`. Its output is the batch contract: `image` float32 [b, S, S, C]
normalized (segmentation eval keeps the full image size). All randomness comes from `np_rng`
(the pipeline derives it from seed, step and process), and per-example generators are drawn
from it before any work is spread over threads, so results do not depend on thread timing.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from jaxvision.data import seg_augment
from jaxvision.data.augment import parse_augment
from jaxvision.data.decode import decode_crop_resize, default_workers, parallel_map
from jaxvision.data.randaugment import rand_augment

log = logging.getLogger(__name__)

# Per-channel statistics presets, for inputs scaled to [0, 1].
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0,), (1.0,)),
    "half": ((0.5,), (0.5,)),  # maps [0, 1] to [-1, 1]
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

Transform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per channel, on float images in [0, 1]."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) / std


class Normalize:
  """Per-channel normalization, `Normalize(mean, std)(image)`, in the units of [0, 1] images.

  uint8 images (0..255) are scaled to [0, 1] in the same pass: one fused multiply-add per pixel
  instead of four passes over a float copy (the difference shows at 224 px; see BENCHMARKS.md).

  Attributes:
    mean: per-channel means (one value applies to every channel).
    std: per-channel standard deviations.
    workers: threads sharing a large batch (NumPy releases the GIL in the arithmetic).
  """

  def __init__(self, mean: Sequence[float], std: Sequence[float], workers: int = 1):
    if len(mean) != len(std) or not len(mean):
      raise ValueError(f"Normalize: mean {tuple(mean)} and std {tuple(std)} differ in length")
    if min(std) <= 0:
      raise ValueError(f"Normalize: std {tuple(std)} must be positive")
    self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    self.workers = workers

  def __call__(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    channels = image.shape[-1] if image.ndim else 1
    if len(self.mean) not in (1, channels):
      raise ValueError(
          f"normalization has {len(self.mean)} channels but the images have {channels}"
      )
    mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
    scale = (1.0 / (std * 255.0) if image.dtype == np.uint8 else 1.0 / std).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    out = np.empty(image.shape[:-1] + (max(channels, len(self.mean)),), np.float32)

    def rows(chunk: slice):
      np.multiply(image[chunk], scale, out=out[chunk], dtype=np.float32, casting="unsafe")
      out[chunk] += offset

    if self.workers > 1 and image.ndim == 4 and image.nbytes >= 1 << 22:
      bounds = np.linspace(0, len(image), self.workers + 1).astype(int)
      parallel_map(rows, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                   self.workers)
    else:
      rows(slice(None))
    return out


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [0, 1]; float input is passed through."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) * np.float32(1 / 255)
  return image.astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [0, 1] -> uint8 [0, 255] (for the PIL-based ops); uint8 is passed through."""
  if image.dtype == np.uint8:
    return image
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


_NUMBERS = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_EXPLICIT = (re.compile(r"^\s*\((.*)\)\s*,\s*\((.*)\)\s*$"), re.compile(r"^([^/]*)/([^/]*)$"))


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Mean and std of a preset, or of an explicit '(m1,m2,m3),(s1,s2,s3)' / 'm1,m2,m3/s1,s2,s3'."""
  if name in NORMALIZE_PRESETS:
    return NORMALIZE_PRESETS[name]
  for pattern in _EXPLICIT:
    match = pattern.match(name or "")
    if match:
      mean = tuple(float(v) for v in _NUMBERS.findall(match[1]))
      std = tuple(float(v) for v in _NUMBERS.findall(match[2]))
      if mean and len(mean) == len(std) and min(std) > 0:
        return mean, std
  raise ValueError(
      f"data.normalize={name!r} is not a preset ({', '.join(NORMALIZE_PRESETS)}) nor "
      "'(mean, ...),(std, ...)' with positive std"
  )


# --- Crop boxes (left, top, right, bottom) -----------------------------------------------------


def inception_box(width: int, height: int, rng: np.random.Generator, min_area: float = 0.08,
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)):
  """A random box covering [min_area, 1] of the image with aspect ratio in `ratio`."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return (left, top, left + w, top + h)
  # Fallback after 10 misses: the largest centered box whose aspect ratio is within range.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return (left, top, left + w, top + h)


def center_box(width: int, height: int, fraction: float = 0.875):
  """The centered square of side `fraction` x the shorter side."""
  side = min(width, height) * fraction
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


# --- Classification ---------------------------------------------------------------------------


def _random_erase(image: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
  """Erases one random rectangle (area 2%..1/3, aspect 0.3..3.3) with N(0, 1) noise, prob. p."""
  if rng.random() >= p:
    return image
  h, w, c = image.shape
  for _ in range(10):
    target = h * w * rng.uniform(0.02, 1 / 3)
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
    eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < eh < h and 0 < ew < w:
      top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
      image = image.copy()
      # Noise in normalized units: the erased patch carries no signal about the class.
      image[top:top + eh, left:left + ew] = rng.standard_normal((eh, ew, c), dtype=np.float32)
      return image
  return image


def pad_crop(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """[B, H, W, C] images each shifted by up to `pad` pixels: zero-padded, then a random H x W
  crop."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  tops = rng.integers(0, 2 * pad + 1, size=b)
  lefts = rng.integers(0, 2 * pad + 1, size=b)
  return np.stack([padded[i, t:t + h, s:s + w]
                   for i, (t, s) in enumerate(zip(tops, lefts, strict=True))])


def _channels(item) -> int:
  return item.shape[-1] if isinstance(item, np.ndarray) else (1 if item.mode == "L" else 3)


def _flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  mask = rng.random(len(images)) < 0.5
  # A plain copy, then only the chosen examples mirrored: a whole-batch np.where costs a
  # strided read of every pixel (3x slower at 224 px). The copy keeps the caller's arrays intact.
  images = images.copy()
  images[mask] = images[mask][:, :, ::-1]
  return images


def classification_transform(
    data_config, *, train: bool, image_size: int | None, geometry: bool = True,
) -> Transform:
  """The classification transform: crop/resize, pad-crop, flip, RandAugment, normalize, erase."""
  ops = parse_augment(data_config.augment, "classification") if train else {}
  workers = default_workers(int(data_config.workers))
  norm = Normalize(*normalization(data_config.normalize), workers=workers)
  skip_bad = bool(data_config.skip_bad)
  eval_crop = float(data_config.eval_crop)
  if not 0 < eval_crop <= 1:
    raise ValueError(f"data.eval_crop={eval_crop}: must be in (0, 1]")
  min_area = ops["inception_crop"][0] if "inception_crop" in ops else None
  randaug = ops.get("randaug")

  def needs_geometry(images) -> bool:
    if not geometry or image_size is None:
      return False
    if isinstance(images, list) or min_area is not None:
      return True
    return images.shape[1] != image_size or images.shape[2] != image_size

  def transform(batch, rng):
    images = batch["image"]
    b = len(batch["label"])
    crop = needs_geometry(images)
    # Per-example generators first, so threads never share (or race on) one generator.
    example_rngs = rng.spawn(b) if (crop or randaug) else None

    if crop or randaug:
      def one(i):
        item = images[i]
        if crop:
          if isinstance(item, np.ndarray) and item.dtype != np.uint8:
            item = to_uint8(item)
          if min_area is not None:
            box_fn = lambda w, h: inception_box(w, h, example_rngs[i], min_area)
          else:  # images already at image_size are used as they are (data.eval_crop's contract)
            box_fn = lambda w, h: (0, 0, w, h) if w == h == image_size else center_box(
                w, h, eval_crop)
          try:
            item = decode_crop_resize(item, box_fn, image_size)
          except ValueError as e:
            if not skip_bad:
              raise
            # A file whose header read fine but whose pixels are corrupt (found only now, in a
            # large folder decoded on the fly): a gray image keeps the batch shape.
            log.warning("data.skip_bad: replacing %s by a gray image", e)
            item = np.full((image_size, image_size, _channels(images[i])), 128, np.uint8)
        if randaug:
          item = rand_augment(to_uint8(np.asarray(item)), example_rngs[i], *randaug)
        return item

      images = np.stack(parallel_map(one, range(b), workers))
    if "pad_crop" in ops and int(ops["pad_crop"][0]):
      images = pad_crop(np.asarray(images), int(ops["pad_crop"][0]), rng)
    if "flip" in ops:
      images = _flip(np.asarray(images), rng)
    images = norm(images)
    if "erase" in ops and ops["erase"][0] > 0:
      p = ops["erase"][0]
      images = np.stack([_random_erase(x, r, p) for x, r in zip(images, rng.spawn(b), strict=True)])
    return {**batch, "image": images}

  return transform


# --- Segmentation -----------------------------------------------------------------------------


def segmentation_transform(data_config, *, train: bool, image_size: int | None) -> Transform:
  """Joint crop, flips, rot90, elastic deformation (train), intensity jitter, normalize.

  Training batches are image_size crops (random with 'crop', else centered); evaluation sees
  the full images, so held-out metrics cover every pixel.
  """
  ops = parse_augment(data_config.augment, "segmentation") if train else {}
  norm = Normalize(*normalization(data_config.normalize))
  workers = default_workers(int(data_config.workers))

  def one(image, mask, rng):
    image = to_float(image)
    if train and image_size:
      image, mask = seg_augment.crop(image, mask, image_size, rng if "crop" in ops else None)
    if "flip" in ops:
      image, mask = seg_augment.flip(image, mask, rng)
    elif "hflip" in ops:
      image, mask = seg_augment.hflip(image, mask, rng)
    if "rot90" in ops:
      image, mask = seg_augment.rot90(image, mask, rng)
    if "elastic" in ops and ops["elastic"][0] > 0:
      image, mask = seg_augment.elastic(image, mask, rng, *ops["elastic"])
    if "jitter" in ops and ops["jitter"][0] > 0:
      image = seg_augment.jitter(image, rng, ops["jitter"][0])
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)

  def transform(batch, rng):
    images, labels = batch["image"], batch["label"]
    if not ops and not (train and image_size):
      return {**batch, "image": norm(images)}
    rngs = rng.spawn(len(labels))
    pairs = parallel_map(lambda i: one(images[i], labels[i], rngs[i]), range(len(labels)), workers)
    return {
        **batch,
        "image": norm(np.stack([p[0] for p in pairs])),
        "label": np.stack([p[1] for p in pairs]).astype(np.int32),
    }

  return transform
