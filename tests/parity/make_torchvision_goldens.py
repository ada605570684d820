"""Writes the torchvision golden files that tests/parity/test_torchvision_parity.py checks.

Run it wherever torchvision imports (it needs no GPU):

    python tests/parity/make_torchvision_goldens.py            # every case and the layouts
    python tests/parity/make_torchvision_goldens.py resnet18   # some cases

For each case it builds the jaxvision variant with deterministic weights made by OUR code from a
seed (`deterministic_variables`, numpy only, so every machine makes the same bits), converts them
with `to_torch`, loads them strictly into the torchvision model, runs it in eval mode on a fixed
input (`deterministic_input`) and saves its logits, with the state dict's keys and shapes, to
goldens/torchvision_CASE.npz. It also saves goldens/torchvision_layouts.npz: the state-dict
keys and shapes of every torchvision builder jaxvision has a variant for, with torchvision's
defaults.

A torchvision wheel built for CUDA beside a CPU-only torch cannot load its C operators and fails
on import; the classification models never use those operators, so in that case the two
operator schemas its import needs are declared first (see `import_torchvision`).
"""

from __future__ import annotations

import json
import pathlib
import sys
import zlib

import numpy as np

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
SEED = 0
BATCH = 2
PREFIX = "torchvision_"  # the goldens folder is shared with other reference libraries
LAYOUTS_FILE = PREFIX + "layouts.npz"
_KEEP_ALIVE: list = []

# case -> (jaxvision variant, kwargs for both jaxvision and torchvision, input size). At least
# one case per torchvision family; the sizes keep the goldens small and the CI run fast while
# still exercising ceil-mode pools (GoogLeNet) and overlapping adaptive-pool bins (VGG at 96 px).
CASES = {
    "alexnet": ("alexnet", {}, 64),
    "vgg11": ("vgg11", {}, 64),
    "vgg11_bn": ("vgg11_bn", {}, 96),
    "googlenet_aux": ("googlenet", {"aux_logits": True, "transform_input": True}, 64),
    "resnet18": ("resnet18", {}, 64),
    "resnet50": ("resnet50", {}, 64),
    "resnext50_32x4d": ("resnext50_32x4d", {}, 64),
    "wide_resnet50_2": ("wide_resnet50_2", {}, 64),
    "densenet121": ("densenet121", {}, 64),
}

# Every torchvision classification builder jaxvision mirrors (the layouts file covers them all).
TORCHVISION_VARIANTS = (
    "alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "wide_resnet50_2", "densenet121", "densenet161", "densenet169", "densenet201",
)


def _leaf_values(path: str, shape: tuple, seed: int) -> np.ndarray:
  """Values of one leaf, from its own stream so they do not depend on traversal order."""
  rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    # He-normal over fan-in keeps activations O(1) through deep stacks; the head is gentler.
    fan_in = int(np.prod(shape[:-1]))
    gain = 1.0 if path.startswith(("params/head/", "params/aux1/fc2", "params/aux2/fc2")) else 2.0
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(gain / fan_in))
  low, high = {"scale": (0.75, 1.15),  # ~unit gain per BatchNorm with the variances below
               "var": (0.5, 1.5), "bias": (-0.1, 0.1), "mean": (-0.1, 0.1)}.get(leaf, (0, 0))
  if low == high:
    raise ValueError(f"deterministic_variables: no rule for leaf {path!r}")
  return np.float32(low) + np.float32(high - low) * rng.random(shape, dtype=np.float32)


def deterministic_variables(name: str, kwargs: dict, seed: int = SEED) -> dict:
  """Variables of variant `name` with non-trivial, seed-determined values (BatchNorm statistics
  included, so a swapped scale/variance mapping cannot pass)."""
  import jax
  import jax.numpy as jnp

  from jaxvision.models import create_model, model_info

  model = create_model(name, **kwargs)
  h, w, c = model_info(name).input_shape
  rng = jax.random.key(0)
  abstract = jax.eval_shape(
      lambda: model.init({"params": rng, "dropout": rng}, jnp.zeros((1, h, w, c)), train=False))

  def fill(path, leaf):
    label = "/".join(p.key for p in path)
    return _leaf_values(label, tuple(leaf.shape), seed)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def deterministic_input(size: int, seed: int = SEED) -> np.ndarray:
  """A fixed NHWC float32 batch of BATCH images."""
  rng = np.random.default_rng([seed, size])
  return rng.standard_normal((BATCH, size, size, 3), dtype=np.float32)


def import_torchvision():
  """torchvision, declaring the C operators its import registers when they cannot be loaded."""
  import torch

  try:
    import torchvision
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[mod]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(lib)  # the schemas live as long as the Library object
    import torchvision
  return torchvision


def _torchvision_model(torchvision, name: str, kwargs: dict):
  kwargs = dict(kwargs)
  if name == "googlenet":
    # torchvision builds aux heads unless told otherwise; init_weights=False skips its slow
    # truncated-normal init, which is overwritten anyway.
    kwargs.setdefault("aux_logits", False)
    kwargs.setdefault("init_weights", False)
  return getattr(torchvision.models, name)(**kwargs).eval()


def _layout_lines(state_dict) -> np.ndarray:
  return np.array([f"{k}:{'x'.join(map(str, v.shape))}" for k, v in state_dict.items()])


def make_case(case: str, torchvision) -> pathlib.Path:
  """Runs one case through torchvision and writes goldens/torchvision_CASE.npz."""
  import torch

  from jaxvision.convert import to_torch

  name, kwargs, size = CASES[case]
  variables = deterministic_variables(name, kwargs)
  state_dict = {k: torch.from_numpy(np.ascontiguousarray(v))
                for k, v in to_torch(name, variables).items()}
  model = _torchvision_model(torchvision, name, kwargs)
  model.load_state_dict(state_dict, strict=True)
  x = deterministic_input(size)
  with torch.no_grad():
    logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  path = GOLDENS / f"{PREFIX}{case}.npz"
  np.savez_compressed(
      path, logits=logits.astype(np.float32), layout=_layout_lines(model.state_dict()),
      meta=np.array(json.dumps({
          "model": name, "kwargs": kwargs, "input_size": size, "batch": BATCH, "seed": SEED,
          "torch": torch.__version__, "torchvision": torchvision.__version__})))
  return path


def make_layouts(torchvision) -> pathlib.Path:
  """Writes the state-dict layout of every mirrored torchvision builder."""
  layouts = {name: _layout_lines(_torchvision_model(torchvision, name, {}).state_dict())
             for name in TORCHVISION_VARIANTS}
  path = GOLDENS / LAYOUTS_FILE
  np.savez_compressed(path, **layouts)
  return path


def main(argv: list[str]) -> None:
  """Writes the requested cases (all when none are named) and the layouts file."""
  unknown = [c for c in argv if c not in CASES]
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
  torchvision = import_torchvision()
  GOLDENS.mkdir(exist_ok=True)
  for case in argv or CASES:
    print(make_case(case, torchvision), flush=True)
  if not argv:
    print(make_layouts(torchvision), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, for jaxvision
  main(sys.argv[1:])
