"""Writes the timm golden files that tests/parity/test_timm_parity.py checks (goldens/vit_*.npz).

Run it wherever timm imports (no GPU needed):

    python tests/parity/make_timm_goldens.py              # every case
    python tests/parity/make_timm_goldens.py vit_tiny     # some cases

For each case it makes deterministic weights with OUR code from a seed (`deterministic_params`,
numpy only, so every machine makes the same bits), converts them with `to_torch`, loads them
strictly into the timm model (`pretrained=False`), runs it in eval mode on a fixed input
(`deterministic_input`) and saves its logits, the timm state dict's keys and shapes, and the
versions used. Nothing here is imported from timm at module level: the parity test imports the
case table and the weight/input makers without torch.

timm imports torchvision; a torchvision wheel built for CUDA beside a CPU-only torch fails on
import because it cannot register its C operators, which ViTs never call, so in that case their
two schemas are declared first (see `import_timm`).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import zlib

import numpy as np

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
SEED = 0
BATCH = 2
_KEEP_ALIVE: list = []

# vit_tiny's shape in timm's VisionTransformer arguments.
_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
             num_classes=10)

# case -> (jaxvision variant, its kwargs, timm model name or None, timm kwargs, input size).
# A registered timm ViT at full size (Ti/16, 12 blocks) and tiny custom ones for each pooling,
# layer-scale and fixed-vs-learned details.
CASES = {
    "vit_ti16": ("vit_ti16", {}, "vit_tiny_patch16_224", {}, 224),
    "vit_tiny": ("vit_tiny", {}, None, _TINY, 32),
    "vit_tiny_gap_layerscale": ("vit_tiny", {"pool": "gap", "layer_scale": 0.1}, None,
                                {**_TINY, "global_pool": "avg", "class_token": False,
                                 "fc_norm": False, "init_values": 0.1}, 32),
    "vit_tiny_map": ("vit_tiny", {"pool": "map"}, None,
                     {**_TINY, "global_pool": "map", "class_token": False}, 32),
}


def _uniform(path: str, shape: tuple, seed: int) -> np.ndarray:
  """U(-1, 1) values of one leaf, from its own stream: independent of traversal order."""
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  return (rng.random(shape) * 2.0 - 1.0).astype(np.float32)


def _leaf(path: str, shape: tuple, seed: int) -> np.ndarray:
  u = _uniform(path, shape, seed)
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel":  # unit-variance preserving: Var = 1 / fan_in
    return u * np.float32(math.sqrt(3.0 / math.prod(shape[:-1])))
  if leaf == "scale":  # LayerNorm around 1, so every channel still matters
    return 1.0 + 0.2 * u
  if leaf == "gamma":  # layer-scale, non-trivial but small
    return 0.1 + 0.05 * u
  return 0.1 * u  # biases, cls_token, pos_embed, attention-pool latent


def deterministic_params(name: str, kwargs: dict, seed: int = SEED) -> dict:
  """jaxvision params of variant `name` made from `seed` by numpy alone (same bits everywhere)."""
  from jaxvision.convert.timm_vit import expected_params, unflatten
  from jaxvision.models import create_model

  shapes = expected_params(create_model(name, **kwargs))
  return unflatten({p: _leaf("/".join(p), s, seed) for p, s in shapes.items()})


def deterministic_input(size: int, seed: int = SEED) -> np.ndarray:
  """A fixed NHWC batch in [-1, 1]."""
  return _uniform("input", (BATCH, size, size, 3), seed + 1)


def import_timm():
  """timm, declaring torchvision's C operator schemas first when its wheel cannot load them."""
  import torch

  try:
    import torchvision  # noqa: F401
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[mod]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(lib)  # the schemas live as long as the Library object
  import timm

  return timm


def _timm_model(timm, timm_name: str | None, timm_kwargs: dict):
  if timm_name is not None:
    return timm.create_model(timm_name, pretrained=False, **timm_kwargs)
  from timm.models.vision_transformer import VisionTransformer

  return VisionTransformer(**timm_kwargs)


def make_case(case: str, timm) -> pathlib.Path:
  """Runs one case through timm and writes goldens/CASE.npz."""
  import torch

  from jaxvision.convert import to_torch

  name, kwargs, timm_name, timm_kwargs, size = CASES[case]
  params = deterministic_params(name, kwargs)
  state_dict = {k: torch.from_numpy(v) for k, v in to_torch(name, {"params": params}).items()}
  model = _timm_model(timm, timm_name, timm_kwargs).eval()
  model.load_state_dict(state_dict, strict=True)
  x = torch.from_numpy(deterministic_input(size)).permute(0, 3, 1, 2)  # NCHW for torch
  with torch.no_grad():
    logits = model(x).numpy().astype(np.float32)
  layout = np.array([f"{k}:{'x'.join(map(str, v.shape))}" for k, v in model.state_dict().items()])
  meta = dict(case=case, model=name, kwargs=kwargs, timm_name=timm_name, timm_kwargs=timm_kwargs,
              input_size=size, seed=SEED, timm=timm.__version__, torch=torch.__version__)
  GOLDENS.mkdir(exist_ok=True)
  path = GOLDENS / f"{case}.npz"
  np.savez_compressed(path, logits=logits, layout=layout, meta=np.array(json.dumps(meta)))
  return path


def main(argv: list[str]) -> int:
  """Writes the goldens named in `argv` (all cases when none)."""
  cases = argv or list(CASES)
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    print(f"unknown cases {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
    return 2
  try:
    timm = import_timm()
  except ImportError as e:
    print(f"timm does not import here ({e}); run this where it does", file=sys.stderr)
    return 1
  for case in cases:
    print(f"{make_case(case, timm)}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, for jaxvision
  sys.exit(main(sys.argv[1:]))
