"""The `data.augment` spec: a comma-separated list of augmentation names with optional arguments.

    'inception_crop,flip,randaug(2,9),erase(0.25)'     classification
    'crop,flip,rot90,elastic,jitter'                   segmentation

Each name runs at most once, at a fixed place in the pipeline whatever its place in the string
(crops first, normalization before erasing), so a spec reads as a set of switches.

Classification:
  inception_crop(min_area=0.08)  random-resized crop: area in [min_area, 1] of the image, aspect
                                 ratio in [3/4, 4/3], resized to image_size (Szegedy et al. 2015)
  pad_crop(pad=4)                zero-pad by `pad` pixels, random image_size crop (CIFAR style)
  flip                           horizontal flip, p = 0.5
  randaug(n=2, m=9)              RandAugment (Cubuk et al. 2020): n random ops of magnitude m/10
  erase(p=0.25)                  random erasing (Zhong et al. 2020) of one rectangle, noise-filled
Segmentation (image and mask move together):
  crop                           random image_size crop (without it: the center crop)
  flip                           horizontal and vertical flips, p = 0.5 each
  hflip                          horizontal flip only, p = 0.5 (for labels that are not
                                 symmetric top to bottom, e.g. drawn half a pixel high)
  rot90                          rotation by a random multiple of 90 degrees
  elastic(sigma=10, grid=3)      U-Net elastic deformation: random displacements on a coarse
                                 grid x grid grid, std sigma pixels, bicubic in between
  jitter(strength=0.1)           brightness and contrast jitter of the image only
Captioning (no crop or flip: they change what a caption says):
  pad_crop(pad=4)                a random shift by up to `pad` pixels (zero-pad, then crop),
                                 which keeps every object and where it is beside the others
"""

from __future__ import annotations

import re

# name -> default arguments (the number of defaults is the number of arguments accepted).
CLASSIFICATION_OPS: dict[str, tuple[float, ...]] = {
    "inception_crop": (0.08,),
    "pad_crop": (4,),
    "flip": (),
    "randaug": (2, 9),
    "erase": (0.25,),
}
SEGMENTATION_OPS: dict[str, tuple[float, ...]] = {
    "crop": (),
    "flip": (),
    "hflip": (),
    "rot90": (),
    "elastic": (10.0, 3),
    "jitter": (0.1,),
}
CAPTIONING_OPS: dict[str, tuple[float, ...]] = {"pad_crop": (4,)}
OPS_OF_TASK = {"classification": CLASSIFICATION_OPS, "segmentation": SEGMENTATION_OPS,
               "captioning": CAPTIONING_OPS}

_ITEM = re.compile(r"^(?P<name>[a-z_0-9]+)\s*(\((?P<args>[^()]*)\))?$")


def _split_items(spec: str) -> list[str]:
  # Commas inside parentheses separate arguments, not items.
  items, depth, current = [], 0, ""
  for ch in spec:
    if ch == "," and depth == 0:
      items.append(current)
      current = ""
      continue
    depth += (ch == "(") - (ch == ")")
    current += ch
  items.append(current)
  return [i.strip() for i in items if i.strip()]


def parse_augment(spec: str, task: str) -> dict[str, tuple[float, ...]]:
  """{op name: arguments, defaults filled in} from a spec; a ValueError names a bad item."""
  known = OPS_OF_TASK.get(task)
  if known is None:
    raise ValueError(f"no augmentations for task {task!r}")
  ops: dict[str, tuple[float, ...]] = {}
  for item in _split_items(spec or ""):
    match = _ITEM.match(item)
    if not match:
      raise ValueError(
          f"data.augment={spec!r}: cannot read {item!r} (expected e.g. 'randaug(2,9)')"
      )
    name = match["name"]
    if name not in known:
      raise ValueError(
          f"data.augment={spec!r}: unknown {task} augmentation {name!r}; known: {', '.join(known)}"
      )
    if name in ops:
      raise ValueError(f"data.augment={spec!r}: {name!r} appears twice")
    defaults = known[name]
    raw = [a.strip() for a in (match["args"] or "").split(",") if a.strip()]
    if len(raw) > len(defaults):
      raise ValueError(
          f"data.augment={spec!r}: {name} takes at most {len(defaults)} arguments, got {len(raw)}"
      )
    try:
      values = tuple(float(a) for a in raw)
    except ValueError:
      raise ValueError(f"data.augment={spec!r}: arguments of {name} must be numbers") from None
    ops[name] = values + defaults[len(values):]
  _check_ranges(spec, ops)
  return ops


def _check_ranges(spec: str, ops: dict[str, tuple[float, ...]]) -> None:
  def need(ok: bool, what: str):
    if not ok:
      raise ValueError(f"data.augment={spec!r}: {what}")

  if "inception_crop" in ops:
    need(0 < ops["inception_crop"][0] <= 1, "inception_crop(min_area) needs 0 < min_area <= 1")
  need(not ("flip" in ops and "hflip" in ops), "'flip' already flips horizontally; drop 'hflip'")
  if "pad_crop" in ops:
    need(ops["pad_crop"][0] >= 0, "pad_crop(pad) needs pad >= 0")
  if "randaug" in ops:
    n, m = ops["randaug"]
    need(n >= 0 and n == int(n), "randaug(n, m) needs a whole n >= 0")
    need(0 <= m <= 30, "randaug(n, m) needs 0 <= m <= 30 (10 is the full strength)")
  if "erase" in ops:
    need(0 <= ops["erase"][0] <= 1, "erase(p) needs 0 <= p <= 1")
  if "elastic" in ops:
    need(ops["elastic"][0] >= 0, "elastic(sigma, grid) needs sigma >= 0")
    need(ops["elastic"][1] >= 2 and ops["elastic"][1] == int(ops["elastic"][1]),
         "elastic(sigma, grid) needs a whole grid >= 2")
  if "jitter" in ops:
    need(0 <= ops["jitter"][0] < 1, "jitter(strength) needs 0 <= strength < 1")
