"""Parity with torchvision without importing it: our float32 logits against the golden logits that
make_torchvision_goldens.py saved from torchvision, on the same seed-made weights and input.

The cases are the golden files present; with none, the parametrized tests collect nothing (they
do not pass). Regenerate the goldens with that script on any machine where torchvision imports.
"""

import json

import jax
import make_torchvision_goldens as gen
import numpy as np
import pytest

from jaxvision.convert import to_torch
from jaxvision.convert.torchvision_cnn import state_dict_layout
from jaxvision.models import create_model

# The detection goldens (torchvision_det_*, torchvision_rcnn_*) have their own tests:
# test_torchvision_detection_parity, test_torchvision_rcnn_parity.
GOLDEN_FILES = sorted(
    p for p in gen.GOLDENS.glob(gen.PREFIX + "*.npz")
    if p.name != gen.LAYOUTS_FILE
    and not p.name.startswith(("torchvision_det_", "torchvision_rcnn_")))
CASE_OF = {p: p.stem.removeprefix(gen.PREFIX) for p in GOLDEN_FILES}
LAYOUTS = gen.GOLDENS / gen.LAYOUTS_FILE
# One case per family runs by default; the others add block types already covered there.
SLOW = {"vgg11", "resnet50", "wide_resnet50_2"}


def _layout(lines) -> dict[str, str]:
  return dict(str(line).rsplit(":", 1) for line in lines)


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=CASE_OF[p], marks=[pytest.mark.slow] if CASE_OF[p] in SLOW else [])
             for p in GOLDEN_FILES])
def test_logits_match_torchvision(path):
  golden = np.load(path)
  meta = json.loads(str(golden["meta"]))
  name, kwargs = meta["model"], meta["kwargs"]
  variables = gen.deterministic_variables(name, kwargs, meta["seed"])
  # The converted state dict has exactly torchvision's keys and shapes ...
  state_dict = to_torch(name, variables)
  ours = {k: "x".join(map(str, v.shape)) for k, v in state_dict.items()}
  assert ours == _layout(golden["layout"])
  # ... and the same weights give the same logits.
  x = gen.deterministic_input(meta["input_size"], meta["seed"])
  model = create_model(name, **kwargs)
  # LLVM's cheap settings cut the compile time that dominates these runs on CPU by ~40%.
  compiled = jax.jit(model.apply).lower(variables, x).compile(
      {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
  logits = np.asarray(compiled(variables, x))
  expected = golden["logits"]
  assert logits.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0
  assert np.abs(logits - expected).max() <= 1e-4 * scale


def test_every_case_has_a_golden():
  assert sorted(CASE_OF.values()) == sorted(gen.CASES)


@pytest.mark.parametrize("name", gen.TORCHVISION_VARIANTS)
def test_state_dict_layout_matches_torchvision(name):
  if not LAYOUTS.exists():
    pytest.skip(f"{LAYOUTS.name} not generated yet")
  expected = _layout(np.load(LAYOUTS)[name])
  ours = {k: "x".join(map(str, v)) for k, v in state_dict_layout(name).items()}
  assert sorted(set(ours) ^ set(expected)) == []
  assert ours == expected
