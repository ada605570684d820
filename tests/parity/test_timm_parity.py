"""Parity with timm without importing it: our float32 logits against the golden logits that
make_timm_goldens.py saved from timm, on the same seed-made weights and input.

The cases are the golden files present (goldens/vit_*.npz); with none, the parametrized test
collects nothing (it does not pass). Regenerate them with that script wherever timm imports.
"""

import json

import jax
import make_timm_goldens as gen
import numpy as np
import pytest

from jaxvision.convert import to_torch
from jaxvision.models import create_model
from jaxvision.models.vit import stack_blocks

GOLDEN_FILES = sorted(gen.GOLDENS.glob("vit_*.npz"))


def _layout(lines) -> dict[str, str]:
  return dict(str(line).rsplit(":", 1) for line in lines)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_logits_match_timm(path):
  golden = np.load(path)
  meta = json.loads(str(golden["meta"]))
  name, kwargs = meta["model"], meta["kwargs"]
  params = gen.deterministic_params(name, kwargs, meta["seed"])
  # The converted state dict has exactly timm's keys and shapes ...
  state_dict = to_torch(name, {"params": params})
  assert {k: "x".join(map(str, v.shape)) for k, v in state_dict.items()} == \
      _layout(golden["layout"])
  # ... and the same weights give the same logits. Deep cases run scanned: one compiled block
  # instead of twelve (scan == loop is tested in test_vit.py).
  model = create_model(name, **kwargs)
  if model.depth > 4:
    model, params = model.clone(scan=True), stack_blocks(params)
  x = gen.deterministic_input(meta["input_size"], meta["seed"])
  logits = np.asarray(jax.jit(model.apply)({"params": params}, x))
  expected = golden["logits"]
  assert logits.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0
  assert np.abs(logits - expected).max() <= 1e-4 * scale


def test_every_case_has_a_golden():
  assert sorted(p.stem for p in GOLDEN_FILES) == sorted(gen.CASES)


def test_deterministic_params_are_reproducible_and_shaped_like_the_model():
  a = gen.deterministic_params("vit_tiny", {"pool": "map"}, seed=3)
  b = gen.deterministic_params("vit_tiny", {"pool": "map"}, seed=3)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = gen.deterministic_params("vit_tiny", {"pool": "map"}, seed=4)
  assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])
  np.testing.assert_array_less(np.abs(a["norm"]["scale"] - 1.0), 0.2 + 1e-6)
