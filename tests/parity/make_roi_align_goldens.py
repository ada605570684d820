"""Writes goldens/roi_align.npz: torchvision's RoIAlign on fixed random feature maps and boxes,
which tests/test_roi_align.py compares `jaxvision.detection.roi_align` against without torch.
Run it wherever torchvision imports (CPU is enough):

    PYTHONPATH=/path/to/torch python tests/parity/make_roi_align_goldens.py

The reference is torchvision's pure-Python `torchvision.ops.roi_align._roi_align` (its compiled
operator need not load), called uncompiled. That function differs from torchvision's compiled
CPU/CUDA kernel in one place: the kernel gives 0 for a sample more than one pixel outside the
map ([-1, H] x [-1, W]), the Python version clamps it onto the edge. The goldens follow the
kernel, which is what `torchvision.ops.roi_align` runs: the Python version's per-sample
bilinear step is wrapped to zero exactly those samples, everything else is torchvision's code.
Bins holding such a sample are marked in `CONFIG_outside`; on every other bin the golden is
the unmodified Python reference, bit for bit (checked here).
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "goldens" / "roi_align.npz"
SEED = 0
NUM_BOXES = 14

# Feature maps: name -> (images, channels, height, width).
MAPS = {"a": (2, 3, 13, 17), "b": (2, 3, 16, 20)}
# Configurations: name -> (map, spatial_scale, aligned, sampling_ratio, (out_h, out_w)).
CONFIGS = {}
for _aligned in (True, False):
  _tag = "al" if _aligned else "legacy"
  for _sr in (1, 2, 3):
    CONFIGS[f"s1_{_tag}_sr{_sr}_7x7"] = ("a", 1.0, _aligned, _sr, (7, 7))
    CONFIGS[f"s1_{_tag}_sr{_sr}_3x5"] = ("a", 1.0, _aligned, _sr, (3, 5))
  CONFIGS[f"s05_{_tag}_sr2_7x7"] = ("a", 0.5, _aligned, 2, (7, 7))
  CONFIGS[f"s05_{_tag}_sr3_3x5"] = ("a", 0.5, _aligned, 3, (3, 5))
  CONFIGS[f"s025_{_tag}_sr2_7x7"] = ("b", 0.25, _aligned, 2, (7, 7))
  CONFIGS[f"s025_{_tag}_sr1_3x5"] = ("b", 0.25, _aligned, 1, (3, 5))


def random_boxes(rng, n: int, image_h: float, image_w: float) -> np.ndarray:
  """n float32 xyxy boxes in an image_h x image_w image, with the awkward cases up front."""
  wh = np.array([image_w, image_h])
  special = np.array([
      [0, 0, image_w, image_h],                    # the whole image: every border
      [image_w - 3, image_h - 4, image_w, image_h],  # on the bottom-right border
      [0, 2, 2.5, image_h],                        # on the left border
      [-6, -5, 0.4 * image_w, 0.3 * image_h],      # partly outside, top-left
      [0.6 * image_w, 0.5 * image_h, image_w + 7, image_h + 9],  # partly outside, bottom-right
      [-9, 0.2 * image_h, image_w + 9, 0.4 * image_h],  # wider than the image
      [3.3, 4.1, 3.6, 4.3],                        # tiny: under a pixel
      [5.0, 2.0, 5.0, 2.0],                        # zero size
  ], np.float64)
  m = n - len(special)
  size = rng.uniform(0.05, 0.6, (m, 2)) * wh
  xy = rng.uniform(0.0, 1.0, (m, 2)) * (wh - size)  # inside: the special rows cover the rest
  rand = np.concatenate([xy, xy + size], axis=1)
  return np.concatenate([special, rand]).astype(np.float32)


def main() -> None:
  sys.path.insert(0, str(HERE))
  import torch
  from make_torchvision_goldens import import_torchvision

  torchvision = import_torchvision()
  import importlib

  module = importlib.import_module("torchvision.ops.roi_align")
  # lazy_compile wraps the function in torch.compile on first call; the plain function is kept.
  python_roi_align = module._roi_align.__wrapped__
  bilinear = module._bilinear_interpolate
  seen = {}

  def kernel_bilinear(input, roi_batch_ind, y, x, ymask, xmask):
    # The compiled kernel's rule, applied per sample: y [K, PH, IY], x [K, PW, IX].
    _, _, height, width = input.shape
    y_in = (y >= -1.0) & (y <= height)
    x_in = (x >= -1.0) & (x <= width)
    seen["outside"] = (~y_in.all(-1))[:, :, None] | (~x_in.all(-1))[:, None, :]  # [K, PH, PW]
    val = bilinear(input, roi_batch_ind, y, x, ymask, xmask)  # [K, C, PH, PW, IY, IX]
    keep = y_in[:, None, :, None, :, None] & x_in[:, None, None, :, None, :]
    return torch.where(keep, val, torch.zeros((), dtype=val.dtype))

  rng = np.random.default_rng(SEED)
  out: dict[str, np.ndarray] = {}
  for name, (n, c, h, w) in MAPS.items():
    out[f"features_{name}"] = rng.standard_normal((n, h, w, c), dtype=np.float32)  # NHWC
  for scale in sorted({cfg[1] for cfg in CONFIGS.values()}, reverse=True):
    map_name = next(cfg[0] for cfg in CONFIGS.values() if cfg[1] == scale)
    _, _, h, w = MAPS[map_name]
    key = f"{scale:g}".replace(".", "")
    out[f"boxes_s{key}"] = random_boxes(rng, NUM_BOXES, h / scale, w / scale)
    out[f"box_indices_s{key}"] = rng.integers(0, MAPS[map_name][0], NUM_BOXES).astype(np.int32)

  worst_python = {}
  for name, (map_name, scale, aligned, sr, (ph, pw)) in CONFIGS.items():
    key = f"{scale:g}".replace(".", "")
    feats = torch.from_numpy(out[f"features_{map_name}"]).permute(0, 3, 1, 2).contiguous()
    boxes, idx = out[f"boxes_s{key}"], out[f"box_indices_s{key}"]
    rois = torch.from_numpy(np.concatenate([idx[:, None].astype(np.float32), boxes], axis=1))
    module._bilinear_interpolate = bilinear
    plain = python_roi_align(feats, rois, scale, ph, pw, sr, aligned).permute(0, 2, 3, 1).numpy()
    module._bilinear_interpolate = kernel_bilinear
    try:
      golden = python_roi_align(feats, rois, scale, ph, pw, sr, aligned).permute(0, 2, 3, 1)
    finally:
      module._bilinear_interpolate = bilinear
    golden = golden.numpy()
    outside = seen.pop("outside").numpy()
    if not np.array_equal(golden[~outside], plain[~outside]):
      raise AssertionError(f"{name}: the kernel rule changed a bin with no outside sample")
    worst_python[name] = float(np.abs(golden - plain).max())
    out[f"{name}_output"] = golden
    out[f"{name}_outside"] = outside
    # (map, boxes) keys and static arguments, so the test needs nothing but this file.
    out[f"{name}_inputs"] = np.array([f"features_{map_name}", f"s{key}"])
    out[f"{name}_args"] = np.array([scale, aligned, sr, ph, pw], np.float64)
  out["configs"] = np.array(list(CONFIGS))
  out["torchvision_version"] = np.asarray(torchvision.__version__)
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, **out)
  for name, diff in worst_python.items():
    print(f"{name}: {int(out[f'{name}_outside'].sum())} bins with outside samples, "
          f"kernel vs Python reference max |diff| {diff:.3g}")
  print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
