"""Parity with Hugging Face transformers without importing it: our float32 logits against the
golden logits make_hf_caption_goldens.py saved from `VisionEncoderDecoderModel` on the same
seed-made weights and inputs, the converted state dicts' exact layouts (both key layouts), and
the full-size parameter counts and layout transformers reported.

The cases are the golden files present (goldens/hf_vit_gpt2_*.npz); regenerate them with that
script wherever transformers imports.
"""

import json
import math

import jax
import make_hf_caption_goldens as gen
import numpy as np
import pytest

from jaxvision.convert import from_hf, to_hf
from jaxvision.convert.hf_vit_gpt2 import config_kwargs, hf_shapes
from jaxvision.models import create_model

CASE_FILES = sorted(p for p in gen.GOLDENS.glob(f"{gen.PREFIX}*.npz") if p.name != gen.FULL_FILE)


def _layout(lines) -> dict[str, str]:
  return dict(str(line).rsplit(":", 1) for line in lines)


def _shapes(state_dict) -> dict[str, str]:
  return {k: "x".join(map(str, v.shape)) for k, v in state_dict.items()}


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_logits_and_layouts_match_transformers(path):
  golden = np.load(path)
  meta = json.loads(str(golden["meta"]))
  name, kwargs = meta["model"], meta["kwargs"]
  model = create_model(name, **kwargs)
  params = gen.deterministic_params(name, kwargs, meta["seed"])
  # The same number of parameters as transformers' model ...
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(params)) == meta["parameters"]
  # ... converted to exactly its keys and shapes, in both layouts ...
  for layout, key in (("transformers5", "module_layout"), ("checkpoint", "checkpoint_layout")):
    state_dict = to_hf(name, {"params": params}, layout=layout)
    assert _shapes(state_dict) == _layout(golden[key]), layout
    # ... and back, exactly.
    back = from_hf(name, state_dict, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, back["params"], params)
  # The same weights give the same logits.
  images, tokens = gen.deterministic_inputs(model, meta["seed"])
  logits = np.asarray(jax.jit(model.apply)({"params": params}, images, tokens))
  expected = golden["logits"]
  assert logits.shape == expected.shape
  assert np.abs(expected).max() > 1.0  # the test can tell a wrong model from a right one
  assert np.abs(logits - expected).max() <= 1e-4


def test_full_size_counts_and_layout_match_transformers():
  golden = np.load(gen.GOLDENS / gen.FULL_FILE)
  meta = json.loads(str(golden["meta"]))
  assert set(meta["counts"]) == set(gen.FULL_VARIANTS)
  for name, count in meta["counts"].items():
    layout = "transformers5" if name == "vit_gpt2" else "checkpoint"
    shapes = hf_shapes(create_model(name), layout=layout)
    tied = math.prod(shapes["decoder.lm_head.weight"])  # the tied head counts once
    assert sum(math.prod(s) for s in shapes.values()) - tied == count
    if name == "vit_gpt2":
      assert {k: "x".join(map(str, s)) for k, s in shapes.items()} == \
          _layout(golden["module_layout"])


def test_every_case_has_a_golden():
  assert sorted(p.stem for p in CASE_FILES) == sorted(gen.PREFIX + c for c in gen.CASES)
  assert (gen.GOLDENS / gen.FULL_FILE).exists()


def test_config_kwargs_rebuild_the_golden_model():
  config = {"encoder": dict(image_size=48, patch_size=16, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, layer_norm_eps=1e-12),
            "decoder": dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=97,
                            n_positions=24)}
  name, kwargs = gen.CASES["reduced"]
  assert create_model(name, **config_kwargs(config)) == create_model(name, **kwargs)
  with pytest.raises(ValueError, match="no 'decoder'"):
    config_kwargs({"encoder": config["encoder"]})


def test_strict_conversion_names_every_bad_key():
  name, kwargs = gen.CASES["reduced"]
  state_dict = to_hf(name, {"params": gen.deterministic_params(name, kwargs)})
  bad = dict(state_dict)
  del bad["encoder.pooler.dense.bias"]
  bad["decoder.transformer.h.0.extra"] = np.zeros(3, np.float32)
  bad["decoder.lm_head.weight"] = bad["decoder.lm_head.weight"] + 1.0
  with pytest.raises(ValueError) as err:
    from_hf(name, bad, **kwargs)
  message = str(err.value)
  assert "missing ['encoder.pooler.dense.bias']" in message
  assert "unexpected ['decoder.transformer.h.0.extra']" in message
  assert "not tied" in message
  with pytest.raises(ValueError, match="not a ViT"):
    from_hf(name, {"foo": np.zeros(1)})
