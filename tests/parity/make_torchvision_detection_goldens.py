"""Writes the torchvision detector goldens that tests/parity/test_torchvision_detection_parity.py
checks.

Run it wherever torchvision imports (no GPU, and none of torchvision's compiled operators: NMS
is never called):

    python tests/parity/make_torchvision_detection_goldens.py          # every case + layouts
    python tests/parity/make_torchvision_detection_goldens.py ssd300_vgg16

For each case it fills the jaxvision detector with deterministic weights made by OUR code from
a seed (`deterministic_variables`, numpy only), converts them with `to_torch`, loads them
strictly into torchvision's detector (built with frozen BatchNorm, as torchvision builds its
pretrained ones), runs `model.backbone` then `model.head` on a fixed non-square input and saves
the raw head outputs, and the anchors of `model.anchor_generator` for that input, to
goldens/torchvision_det_CASE.npz. The outputs are large, so the file
keeps, per output, its shape, float64 sum and absolute sum, and the values at a fixed random
sample of positions. goldens/torchvision_det_layouts.npz holds the state-dict keys and shapes of
the three torchvision builders (frozen BatchNorm, 91 classes).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import zlib

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_torchvision_goldens as cnn  # noqa: E402

GOLDENS = cnn.GOLDENS
SEED = cnn.SEED
PREFIX = "torchvision_det_"
LAYOUTS_FILE = PREFIX + "layouts.npz"
SAMPLE = 4096  # values kept per output (all of them when the output is smaller)

# case -> (jaxvision variant, (height, width) of the input, batch). Non-square inputs catch
# swapped axes; 144 x 176 px gives odd pyramid levels (18x22 ... 2x2, with a non-2x upsample
# 5 -> 9); SSD needs ~270 px for its 1x1 last map, and one image of it is already 35 GFLOPs.
CASES = {
    "ssd300_vgg16": ("ssd300_vgg16", (276, 300), 1),
    "retinanet_resnet50_fpn": ("retinanet_resnet50_fpn", (144, 176), 2),
    "fcos_resnet50_fpn": ("fcos_resnet50_fpn", (144, 176), 2),
}


def deterministic_variables(name: str, seed: int = SEED, **kwargs) -> dict:
  """Variables of variant `name` with non-trivial, seed-determined values: the CNN goldens'
  rules per leaf kind, SSD's conv4_3 scale drawn around its initial 20, and two changes that
  keep the activations O(1) (frozen BatchNorm does not normalise, so the 16 residual sums of
  ResNet-50 and the five-conv heads would otherwise reach ~1e4, where 1e-4 is below float32
  resolution): each bottleneck's last BatchNorm scale x0.3, FPN and head kernels at gain 1."""
  import jax
  import jax.numpy as jnp

  from jaxvision.models import create_model, model_info

  model = create_model(name, **kwargs)
  h, w, c = model_info(name).input_shape
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False))

  def fill(path, leaf):
    label = "/".join(p.key for p in path)
    if label.endswith("/l2_scale"):
      rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
      return (10 + 20 * rng.random(leaf.shape)).astype(np.float32)
    value = cnn._leaf_values(label, tuple(leaf.shape), seed)
    if re.search(r"/layer\d_\d+/bn3/scale$", label):
      value = value * np.float32(0.3)
    elif re.match(r"params/(cls_head|reg_head|backbone/fpn)/.*/kernel$", label):
      value = value * np.float32(np.sqrt(0.5))
    return value

  return jax.tree_util.tree_map_with_path(fill, abstract)


def deterministic_input(height: int, width: int, batch: int, seed: int = SEED) -> np.ndarray:
  """A fixed NHWC float32 batch of `batch` images."""
  rng = np.random.default_rng([seed, height, width, batch])
  return rng.standard_normal((batch, height, width, 3), dtype=np.float32)


def sample_positions(size: int, seed: int = SEED, count: int = SAMPLE) -> np.ndarray:
  """The fixed flat positions (`count` of them, or all) an output of `size` values is compared
  at."""
  if size <= count:
    return np.arange(size)
  return np.sort(np.random.default_rng([seed, size]).choice(size, count, replace=False))


def summarize(outputs: dict[str, np.ndarray], seed: int = SEED,
              count: int = SAMPLE) -> dict[str, np.ndarray]:
  """Per output: shape, float64 sum and absolute sum, and the values at `sample_positions`."""
  out = {}
  for key, value in outputs.items():
    value = np.asarray(value, np.float32)
    flat = value.reshape(-1)
    out[f"{key}/shape"] = np.array(value.shape)
    out[f"{key}/sum"] = np.float64(flat.astype(np.float64).sum())
    out[f"{key}/abs_sum"] = np.float64(np.abs(flat.astype(np.float64)).sum())
    out[f"{key}/sample"] = flat[sample_positions(flat.size, seed, count)]
  return out


def torchvision_detector(torchvision, name: str, num_classes: int = 91):
  """torchvision's detector `name` with frozen BatchNorm and no pretrained weights, in eval mode."""
  from torchvision.models import detection
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7
  from torchvision.ops.misc import FrozenBatchNorm2d

  if name == "ssd300_vgg16":
    model = detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
  else:
    # What `retinanet_resnet50_fpn` / `fcos_resnet50_fpn` build around pretrained weights.
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    cls = {"retinanet_resnet50_fpn": detection.RetinaNet, "fcos_resnet50_fpn": detection.FCOS}
    model = cls[name](backbone, num_classes)
  return model.eval()


def make_case(case: str, torchvision) -> pathlib.Path:
  """Runs one case through torchvision and writes goldens/torchvision_det_CASE.npz."""
  import torch
  from torchvision.models.detection.image_list import ImageList

  from jaxvision.convert import to_torch

  name, (height, width), batch = CASES[case]
  variables = deterministic_variables(name)
  state_dict = {k: torch.from_numpy(np.ascontiguousarray(v))
                for k, v in to_torch(name, variables).items()}
  model = torchvision_detector(torchvision, name)
  model.load_state_dict(state_dict, strict=True)
  x = torch.from_numpy(deterministic_input(height, width, batch).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    features = list(model.backbone(x).values())
    outputs = {k: v.numpy() for k, v in model.head(features).items()}
    images = ImageList(x, [(height, width)] * batch)
    outputs["anchors"] = model.anchor_generator(images, features)[0].numpy()
  path = GOLDENS / f"{PREFIX}{case}.npz"
  np.savez_compressed(
      path, **summarize(outputs),
      meta=np.array(json.dumps({
          "model": name, "input_hw": [height, width], "batch": batch, "seed": SEED,
          "sample": SAMPLE, "torch": torch.__version__,
          "torchvision": torchvision.__version__})))
  return path


def make_layouts(torchvision) -> pathlib.Path:
  """Writes the state-dict layout of each torchvision detector jaxvision mirrors."""
  layouts = {name: cnn._layout_lines(torchvision_detector(torchvision, name).state_dict())
             for name, _, _ in CASES.values()}
  path = GOLDENS / LAYOUTS_FILE
  np.savez_compressed(path, **layouts)
  return path


def main(argv: list[str]) -> None:
  """Writes the requested cases (all when none are named) and the layouts file."""
  unknown = [c for c in argv if c not in CASES]
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
  torchvision = cnn.import_torchvision()
  GOLDENS.mkdir(exist_ok=True)
  for case in argv or CASES:
    print(make_case(case, torchvision), flush=True)
  if not argv:
    print(make_layouts(torchvision), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, for jaxvision
  main(sys.argv[1:])
