"""RandAugment (Cubuk et al. 2020) on uint8 images with PIL: n ops drawn uniformly, magnitude m.

Magnitude m is on the paper's 0..10 scale (10: the strongest setting of each op; larger values
extrapolate). Signed ops (rotate, shear, translate, enhancements) take a random sign.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = 128  # gray fill for pixels that geometric ops bring in from outside the image


def _affine(img: Image.Image, matrix) -> Image.Image:
  fill = _FILL if img.mode == "L" else (_FILL,) * 3
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=fill)


def _enhance(cls):
  return lambda img, s: cls(img).enhance(1.0 + 0.9 * s)


# op(img, signed_strength in [-m/10, m/10]) -> img.
OPS = {
    "identity": lambda img, s: img,
    "autocontrast": lambda img, s: ImageOps.autocontrast(img),
    "equalize": lambda img, s: ImageOps.equalize(img),
    "rotate": lambda img, s: img.rotate(
        30.0 * s, resample=Image.BILINEAR, fillcolor=_FILL if img.mode == "L" else (_FILL,) * 3),
    "solarize": lambda img, s: ImageOps.solarize(img, int(round(256 - 256 * min(abs(s), 1.0)))),
    "color": _enhance(ImageEnhance.Color),
    "posterize": lambda img, s: ImageOps.posterize(img, int(round(8 - 4 * min(abs(s), 1.0)))),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda img, s: _affine(img, (1, 0.3 * s, 0, 0, 1, 0)),
    "shear_y": lambda img, s: _affine(img, (1, 0, 0, 0.3 * s, 1, 0)),
    "translate_x": lambda img, s: _affine(img, (1, 0, 0.45 * s * img.width, 0, 1, 0)),
    "translate_y": lambda img, s: _affine(img, (1, 0, 0, 0, 1, 0.45 * s * img.height)),
}
_NAMES = tuple(OPS)


def rand_augment(image: np.ndarray, rng: np.random.Generator, n: int, m: float) -> np.ndarray:
  """`image` (uint8 [H, W, C]) after `n` random ops of magnitude `m`."""
  gray = image.shape[-1] == 1
  img = Image.fromarray(image[..., 0] if gray else image)
  for index in rng.integers(0, len(_NAMES), size=int(n)):
    sign = 1.0 if rng.random() < 0.5 else -1.0
    img = OPS[_NAMES[index]](img, sign * m / 10.0)
  out = np.asarray(img)
  return out[..., None] if gray else out
