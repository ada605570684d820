"""Writes goldens/paste_masks.npz: torchvision's `paste_masks_in_image` (Mask R-CNN's last step)
on fixed random mask probabilities and boxes, which tests/test_instance_masks.py compares
`jaxvision.detection.masks.paste_mask_probs` and `paste_masks_numpy` against without torch.
Run it wherever torchvision imports (CPU is enough):

    PYTHONPATH=/path/to/torch python tests/parity/make_paste_masks_goldens.py

`paste_masks_in_image` is plain Python over torch ops (pad, box arithmetic, F.interpolate), so
the import needs only the two operator schemas `import_torchvision` declares. The pasted
probabilities are small images, mostly zeros outside the boxes: they are stored whole.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "goldens" / "paste_masks.npz"
SEED = 0

# Cases: name -> (mask size m, image (H, W), number of boxes).
CASES = {"m28": (28, (37, 53), 20), "m14": (14, (48, 40), 16), "m7": (7, (25, 31), 12)}


def random_boxes(rng, n: int, height: int, width: int) -> np.ndarray:
  """n float32 xyxy boxes: the awkward cases first (border crossing, outside, tiny, zero-size,
  whole image, larger than the image), then random boxes inside the image."""
  special = np.array([
      [0, 0, width, height],                          # the whole image
      [-7.3, -4.6, 0.4 * width, 0.35 * height],       # crosses the top-left corner
      [0.55 * width, 0.6 * height, width + 6.2, height + 3.9],  # crosses the bottom-right
      [-12, 0.3 * height, width + 11, 0.5 * height],  # wider than the image
      [3.3, 4.1, 3.6, 4.3],                           # under a pixel
      [6.0, 2.0, 6.0, 2.0],                           # zero size
      [width - 1.5, height - 1.2, width - 0.2, height - 0.1],  # tiny, at the border
      [-20, -15, -2, -1],                             # wholly outside
  ], np.float64)
  m = n - len(special)
  wh = np.array([width, height], np.float64)
  size = rng.uniform(0.08, 0.7, (m, 2)) * wh
  xy = rng.uniform(0.0, 1.0, (m, 2)) * (wh - size)
  return np.concatenate([special, np.concatenate([xy, xy + size], 1)]).astype(np.float32)


def main() -> None:
  sys.path.insert(0, str(HERE))
  import torch
  from make_torchvision_goldens import import_torchvision

  torchvision = import_torchvision()
  from torchvision.models.detection.roi_heads import paste_masks_in_image

  rng = np.random.default_rng(SEED)
  out: dict[str, np.ndarray] = {}
  for name, (m, (h, w), n) in CASES.items():
    # Probabilities of a smooth blob plus noise: realistic masks that cross 0.5 inside the box.
    yy, xx = np.mgrid[0:m, 0:m] / (m - 1) - 0.5
    blob = np.exp(-(xx**2 + yy**2) / rng.uniform(0.03, 0.2, (n, 1, 1)))
    probs = np.clip(blob + rng.normal(0, 0.15, (n, m, m)), 0, 1).astype(np.float32)
    boxes = random_boxes(rng, n, h, w)
    pasted = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes),
                                  (h, w), padding=1)[:, 0].numpy()
    out[f"{name}_mask_probs"] = probs
    out[f"{name}_boxes"] = boxes
    out[f"{name}_pasted"] = pasted.astype(np.float32)
    out[f"{name}_image_hw"] = np.array([h, w], np.int32)
  out["cases"] = np.array(list(CASES))
  out["torchvision_version"] = np.asarray(torchvision.__version__)
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, **out)
  for name in CASES:
    pasted = out[f"{name}_pasted"]
    print(f"{name}: {pasted.shape}, {int((pasted > 0).sum())} pixels with probability > 0")
  print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
