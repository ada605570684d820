"""Reading image files with PIL: header probes, full decodes, and crop-aware JPEG decoding.

Every failure becomes a one-line ValueError that names the file, including an image too large
to decode: each open checks the header's size against a pixel limit (`data.max_image_pixels`,
by default PIL's decompression-bomb limit) before any pixel is decoded, so a 20000x20000 file
is refused (or skipped with data.skip_bad) instead of exhausting memory.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL modes that hold one intensity per pixel: such files load as 1-channel 'L' images.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  """An image not decoded yet: a file path or the encoded bytes, and the mode to decode it to.

  Attributes:
    path: file path ('' when `data` holds the bytes).
    data: encoded bytes (None when reading `path`).
    mode: 'L' (1 channel) or 'RGB' (3 channels).
    max_pixels: the largest width x height it may have (0: PIL's limit, see `pixel_limit`).
  """

  path: str = ""
  data: bytes | None = None
  mode: str = "RGB"
  max_pixels: int = 0

  @property
  def name(self) -> str:
    """The file path, or '<bytes>' for in-memory data: what error messages name."""
    return self.path or "<bytes>"

  def open(self) -> Image.Image:
    """The lazily opened PIL image (header read and size checked, pixels not decoded yet)."""
    return open_image(self.path if self.data is None else io.BytesIO(self.data), self.name,
                      self.max_pixels)


def _reason(error: BaseException) -> str:
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def pixel_limit(max_pixels: int = 0) -> int:
  """The most pixels an image may have: `max_pixels`, or for 0 PIL's own decompression-bomb
  limit (`PIL.Image.MAX_IMAGE_PIXELS`; 0 when that is None, i.e. no limit)."""
  if max_pixels > 0:
    return int(max_pixels)
  return int(Image.MAX_IMAGE_PIXELS or 0)


def allow_pixels(max_pixels: int) -> None:
  """Lets PIL open images of up to `max_pixels` (a data.max_image_pixels above PIL's limit).

  PIL refuses, at open, any image over twice its `MAX_IMAGE_PIXELS` (and warns over it): a run
  that asks for larger images raises that process-wide limit to its own (never lowers it), and
  `open_image` enforces the run's limit itself.
  """
  if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _too_large(what: str, name: str, pixels: int, limit: int, size: str = "") -> str:
  shape = f"is {size} ({pixels:,} pixels)" if size else f"has {pixels:,} pixels"
  return (f"{what} {name} {shape}, over the limit of {limit:,}; raise data.max_image_pixels to "
          "read it, or skip such files with data.skip_bad=True")


def open_image(source, name: str, max_pixels: int = 0, what: str = "image") -> Image.Image:
  """`Image.open(source)`, with every failure and an image over `pixel_limit(max_pixels)` a
  one-line ValueError naming `name` (`what` says what the file is: 'image', 'mask')."""
  limit = pixel_limit(max_pixels)
  try:
    image = Image.open(source)
  except Image.DecompressionBombError as e:
    # PIL refuses before the header reaches us: its message has the pixel count, not the size.
    found = re.search(r"\((\d+) pixels\)", str(e))
    if not found:
      raise ValueError(f"{what} {name} is too large to decode: {_reason(e)}") from None
    pixels = int(found.group(1))
    pil_limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
    limit = min(limit, pil_limit) if limit else pil_limit
    raise ValueError(_too_large(what, name, pixels, limit)) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read {what} {name}: {_reason(e)}") from None
  width, height = image.size
  if limit and width * height > limit:
    image.close()
    raise ValueError(_too_large(what, name, width * height, limit, f"{width}x{height}"))
  return image


@dataclasses.dataclass(frozen=True)
class ImageHeader:
  """What a file's header says, without decoding its pixels.

  Attributes:
    width / height: size in pixels.
    mode: the file's PIL mode ('L', 'RGB', 'P', ...).
  """

  width: int
  height: int
  mode: str


def probe(path: str, max_pixels: int = 0) -> ImageHeader:
  """Reads the header of `path`; a ValueError names the file when it is not a readable image
  or has more than `pixel_limit(max_pixels)` pixels."""
  with open_image(path, path, max_pixels) as im:
    return ImageHeader(im.width, im.height, im.mode)


def decode_mode(headers: Sequence[ImageHeader]) -> str:
  """'L' when every file is grayscale, else 'RGB' (one channel count for the whole dataset)."""
  return "L" if headers and all(h.mode in GRAY_MODES for h in headers) else "RGB"


def to_mode(image: Image.Image, mode: str) -> Image.Image:
  """`image` converted to 'L' or 'RGB'; 16-bit and float grayscale are rescaled to 0..255."""
  if image.mode == mode:
    return image
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    array = np.asarray(image, dtype=np.float32)
    top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
    image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    return image if mode == "L" else image.convert(mode)
  return image.convert(mode)


def decode(item: EncodedImage) -> np.ndarray:
  """The full image as uint8 [H, W, C]; a ValueError names the file when it is corrupt."""
  try:
    with item.open() as im:
      array = np.asarray(to_mode(im, item.mode))
  except (OSError, SyntaxError) as e:  # truncated data, bad Huffman tables, ...
    raise ValueError(f"cannot read image {item.name}: {_reason(e)}") from None
  return array[..., None] if array.ndim == 2 else array


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels


def size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
  """(height, width) of an output size given as a side or as (height, width)."""
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode_crop_resize(
    item: EncodedImage | np.ndarray, box_fn: Callable[[int, int], Box],
    size: int | tuple[int, int],
) -> np.ndarray:
  """Decodes `item`, crops the box `box_fn(width, height)` and resizes it to size x size (or
  to `size`'s (height, width)).

  JPEG files are decoded at a reduced DCT scale (PIL's draft mode) when the crop is at least
  twice the output size: a 4000x3000 photo cropped to 224 never decodes at full resolution.
  """
  if isinstance(item, np.ndarray):
    image = Image.fromarray(item[..., 0] if item.shape[-1] == 1 else item)
    return _resize(image, box_fn(image.width, image.height), size, item.shape[-1])
  try:
    with item.open() as im:
      width, height = im.size
      box = box_fn(width, height)
      if im.format == "JPEG":
        out_h, out_w = size_pair(size)
        scale_w = out_w / max(box[2] - box[0], 1)
        scale_h = out_h / max(box[3] - box[1], 1)
        im.draft(item.mode, (int(np.ceil(width * scale_w)), int(np.ceil(height * scale_h))))
        fx, fy = im.size[0] / width, im.size[1] / height
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
      return _resize(to_mode(im, item.mode), box, size, 1 if item.mode == "L" else 3)
  except (OSError, SyntaxError) as e:
    raise ValueError(f"cannot read image {item.name}: {_reason(e)}") from None


def _resize(image: Image.Image, box: Box, size: int | tuple[int, int], channels: int) -> np.ndarray:
  # One PIL call crops and resizes (with antialiasing), without an intermediate copy.
  height, width = size_pair(size)
  out = np.asarray(image.resize((width, height), Image.BILINEAR, box=box))
  return out[..., None] if channels == 1 and out.ndim == 2 else out


def default_workers(workers: int) -> int:
  """`data.workers`, with 0 meaning one thread per CPU core available to this process."""
  if workers > 0:
    return workers
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def thread_pool(workers: int) -> ThreadPoolExecutor:
  """A shared pool of `workers` threads (PIL and NumPy release the GIL while they decode/copy)."""
  if workers not in _POOLS:
    _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="jaxvision-data")
  return _POOLS[workers]


def parallel_map(fn: Callable, items: Sequence, workers: int) -> list:
  """[fn(x) for x in items], over `workers` threads (in order; the first error is raised)."""
  if workers <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  return list(thread_pool(workers).map(fn, items))
