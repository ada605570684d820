"""Parity of the one-stage detectors with torchvision, without importing it: our float32 head
outputs against the goldens make_torchvision_detection_goldens.py saved from torchvision's
`backbone` + `head`, on the same seed-made weights and input, and our converter against the
saved torchvision state-dict layouts (every key, every shape).

Regenerate the goldens with that script on any machine where torchvision imports.
"""

import json

import jax
import make_torchvision_detection_goldens as gen
import numpy as np
import pytest

from jaxvision.convert import from_torch, to_torch
from jaxvision.convert.torchvision_detection import state_dict_layout
from jaxvision.models import create_model

LAYOUTS = gen.GOLDENS / gen.LAYOUTS_FILE
# LLVM's cheap passes cut the compile time; optimization level 1 keeps VGG's 35 GFLOPs fast.
FAST_COMPILE = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}
# The ResNet-50 detectors compile for ~20 s each on a 2-core CPU; SSD's VGG runs by default.
SLOW = {"retinanet_resnet50_fpn", "fcos_resnet50_fpn"}


def _layout(lines) -> dict[str, str]:
  return dict(str(line).rsplit(":", 1) for line in lines)


def _golden(case: str):
  path = gen.GOLDENS / f"{gen.PREFIX}{case}.npz"
  assert path.exists(), f"{path.name} missing: run make_torchvision_detection_goldens.py"
  return np.load(path)


def head_output_errors(case: str) -> dict[str, float]:
  """Max |ours - torchvision| over the golden's sampled positions, per head output (and for
  the anchors of the input size)."""
  golden = _golden(case)
  meta = json.loads(str(golden["meta"]))
  name, (h, w) = meta["model"], meta["input_hw"]
  variables = gen.deterministic_variables(name, meta["seed"])
  x = gen.deterministic_input(h, w, meta["batch"], meta["seed"])
  model = create_model(name)
  compiled = jax.jit(model.apply).lower(variables, x).compile(FAST_COMPILE)
  outputs = jax.tree.map(np.asarray, compiled(variables, x))
  outputs["anchors"] = model.anchors((h, w)).boxes
  return sampled_errors(outputs, golden, meta["seed"])


def sampled_errors(outputs: dict, golden, seed: int) -> dict[str, float]:
  """Per output: the checksums asserted, then max |ours - golden| over the golden's sampled
  positions ('KEY') and the largest |golden| sampled ('KEY/scale')."""
  keys = sorted({k.split("/")[0] for k in golden.files if "/" in k})
  assert sorted(outputs) == keys
  errors = {}
  for key in keys:
    ours = outputs[key]
    assert ours.shape == tuple(golden[f"{key}/shape"]), key
    flat = ours.reshape(-1).astype(np.float64)
    expected, scale = golden[f"{key}/sample"], golden[f"{key}/abs_sum"]
    # The checksums cover every value, the sample pins them one by one.
    assert abs(flat.sum() - golden[f"{key}/sum"]) <= 1e-5 * scale, key
    assert abs(np.abs(flat).sum() - scale) <= 1e-5 * scale, key
    # The golden's sample size gives its positions (the R-CNN goldens keep fewer values).
    sample = flat[gen.sample_positions(flat.size, seed, count=len(expected))]
    errors[key] = float(np.abs(sample - expected).max())
    errors[key + "/scale"] = float(np.abs(expected).max())
  return errors


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else []) for c in gen.CASES])
def test_head_outputs_match_torchvision(case):
  errors = head_output_errors(case)
  for key in [k for k in errors if not k.endswith("/scale")]:
    assert errors[key + "/scale"] > 0, key
    assert errors[key] <= 1e-4, (key, errors[key], errors[key + "/scale"])


@pytest.mark.parametrize("case", sorted(gen.CASES))
def test_converter_matches_torchvision_layout(case):
  """Our state dict has torchvision's keys and shapes, and torchvision's layout loads whole."""
  name, _, _ = gen.CASES[case]
  expected = _layout(np.load(LAYOUTS)[name])
  ours = {k: "x".join(map(str, v)) for k, v in state_dict_layout(name).items()}
  assert sorted(set(ours) ^ set(expected)) == []
  assert ours == expected
  # A state dict with exactly torchvision's keys converts with none missing or left over, and
  # back. Distinct values in every tensor (exact in float32) show a transpose or a swap.
  state_dict = {}
  for i, (k, v) in enumerate(sorted(expected.items())):
    shape = [int(d) for d in v.split("x") if d]
    state_dict[k] = (np.arange(np.prod(shape), dtype=np.float32) + i).reshape(shape)
  variables = from_torch(name, state_dict)
  back = to_torch(name, variables)
  assert sorted(back) == sorted(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(back[k], v)


def test_every_case_has_a_golden():
  present = {p.stem.removeprefix(gen.PREFIX) for p in gen.GOLDENS.glob(gen.PREFIX + "*.npz")}
  assert present == set(gen.CASES) | {"layouts"}
