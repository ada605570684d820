"""Reading image files with PIL: header probes, full decodes, and crop-aware JPEG decoding.

Every failure becomes a one-line ValueError that names the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
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
  """

  path: str = ""
  data: bytes | None = None
  mode: str = "RGB"

  @property
  def name(self) -> str:
    """The file path, or '<bytes>' for in-memory data: what error messages name."""
    return self.path or "<bytes>"

  def open(self) -> Image.Image:
    """The lazily opened PIL image (header read, pixels not decoded yet)."""
    try:
      return Image.open(self.path if self.data is None else io.BytesIO(self.data))
    except (OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"cannot read image {self.name}: {_reason(e)}") from None


def _reason(error: BaseException) -> str:
  return str(error).splitlines()[0] if str(error) else type(error).__name__


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


def probe(path: str) -> ImageHeader:
  """Reads the header of `path`; a ValueError names the file when it is not a readable image."""
  try:
    with Image.open(path) as im:
      return ImageHeader(im.width, im.height, im.mode)
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {_reason(e)}") from None


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


def decode_crop_resize(
    item: EncodedImage | np.ndarray, box_fn: Callable[[int, int], Box], size: int,
) -> np.ndarray:
  """Decodes `item`, crops the box `box_fn(width, height)` and resizes it to size x size.

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
        scale_w = size / max(box[2] - box[0], 1)
        scale_h = size / max(box[3] - box[1], 1)
        im.draft(item.mode, (int(np.ceil(width * scale_w)), int(np.ceil(height * scale_h))))
        fx, fy = im.size[0] / width, im.size[1] / height
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
      return _resize(to_mode(im, item.mode), box, size, 1 if item.mode == "L" else 3)
  except (OSError, SyntaxError) as e:
    raise ValueError(f"cannot read image {item.name}: {_reason(e)}") from None


def _resize(image: Image.Image, box: Box, size: int, channels: int) -> np.ndarray:
  # One PIL call crops and resizes (with antialiasing), without an intermediate copy.
  out = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
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
