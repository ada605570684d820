"""Parity with Hugging Face transformers' DETR without importing it: our float32 outputs
against the goldens make_hf_detr_goldens.py saved from `DetrForObjectDetection` (ResNet
backbone from transformers) on the same seed-made weights and inputs, with and without a pixel
mask; the converted state dicts' exact layouts (both key layouts) and parameter counts; and
transformers' DETR loss (scipy Hungarian matching) and post-processing on random outputs.

Regenerate the goldens with that script wherever transformers imports.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import make_hf_detr_goldens as gen
import numpy as np
import pytest

from jaxvision.convert import from_hf, to_hf
from jaxvision.convert.hf_detr import hf_shapes, infer_kwargs
from jaxvision.detection.detr_loss import detr_detections, detr_loss
from jaxvision.models import create_model

SLOW = {"resnet50"}
# Forward passes in the slow suite: the full size, and two tiny variants whose conversion is
# checked in the default suite ('tiny' runs the forward there).
SLOW_OUTPUTS = SLOW | {"tiny_hf_aux", "detr_tiny"}
TOLERANCE = 1e-4
# facebook/detr-resnet-50 (91 labels): transformers' parameters(), frozen BatchNorm buffers
# aside, and our `params` (the frozen statistics are `batch_stats`).
DETR_RESNET50_PARAMS = 41_524_768


def _layout(lines) -> dict[str, str]:
  return dict(str(line).rsplit(":", 1) for line in lines)


def _shapes(state_dict) -> dict[str, str]:
  return {k: "x".join(map(str, v.shape)) for k, v in state_dict.items()}


def _count(tree) -> int:
  return sum(math.prod(v.shape) for v in jax.tree.leaves(tree))


def _golden(case):
  golden = np.load(gen.GOLDENS / f"{gen.PREFIX}{case}.npz")
  return golden, json.loads(str(golden["meta"]))


@pytest.mark.parametrize("case", list(gen.CASES))
def test_counts_and_layouts_match_transformers(case):
  """Every case, without computing: parameter count, both state-dict layouts, round trip."""
  golden, meta = _golden(case)
  name, kwargs = meta["model"], meta["kwargs"]
  model = create_model(name, **kwargs)
  images = jax.ShapeDtypeStruct((1, *gen.IMAGE_SHAPE[1:]), jnp.float32)
  abstract = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), images)
  assert _count(abstract["params"]) == meta["parameters"]
  for layout, key in (("transformers5", "module_layout"), ("checkpoint", "checkpoint_layout")):
    shapes = {k: "x".join(map(str, s)) for k, s in hf_shapes(model, layout).items()}
    assert shapes == _layout(golden[key]), layout
  if case in SLOW:  # full-size weights: the layouts above are what a round trip could check
    return
  variables = gen.deterministic_variables(name, kwargs, meta["seed"])
  for layout in ("transformers5", "checkpoint"):
    back = from_hf(name, to_hf(name, variables, layout=layout), num_heads=model.num_heads,
                   hf_auxiliary_norm=model.hf_auxiliary_norm)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_OUTPUTS else [])
             for c in gen.CASES])
def test_outputs_match_transformers(case):
  """The same weights give transformers' outputs, with and without padding."""
  golden, meta = _golden(case)
  name, kwargs = meta["model"], meta["kwargs"]
  model = create_model(name, **kwargs)
  variables = gen.deterministic_variables(name, kwargs, meta["seed"])
  images, mask = gen.deterministic_inputs(meta["seed"])
  apply = jax.jit(model.apply)
  results = {"nomask": apply(variables, images), "mask": apply(variables, images, mask)}
  for tag, outputs in results.items():
    ours = gen.summaries(f"{tag}__", {k: np.asarray(outputs[k]) for k in gen.OUTPUTS},
                         meta["full"])
    assert set(ours) <= set(golden.files)
    for key, value in ours.items():
      expected = golden[key]
      assert value.shape == expected.shape, key
      # A sum over a query's row adds up that many entries' errors.
      summed = outputs[key.split("__")[1]].shape[-1] if key.endswith("__sum") else 1
      assert np.abs(value - expected).max() <= TOLERANCE * summed, key
  # The test can tell a wrong model from a right one: the logits are O(1), and padding
  # changes the padded image's outputs only.
  assert np.abs(results["mask"]["logits"]).max() > 0.5
  first = [np.asarray(results[t]["logits"][0]) for t in results]
  second = [np.asarray(results[t]["logits"][1]) for t in results]
  np.testing.assert_allclose(first[0], first[1], atol=1e-5)
  assert np.abs(second[0] - second[1]).max() > 1e-3


def test_detr_resnet50_has_transformers_parameter_count():
  _, meta = _golden("resnet50")
  assert meta["parameters"] == DETR_RESNET50_PARAMS
  assert create_model("detr_resnet50") == create_model(meta["model"], **meta["kwargs"])


def test_every_case_has_a_golden():
  files = sorted(p.name for p in gen.GOLDENS.glob(f"{gen.PREFIX}*.npz"))
  assert files == sorted([f"{gen.PREFIX}{c}.npz" for c in gen.CASES] + [gen.LOSS_FILE])


def test_sizes_are_read_from_the_weights():
  name, kwargs, _ = gen.CASES["tiny"]
  state_dict = to_hf(name, gen.deterministic_variables(name, kwargs))
  read = infer_kwargs(state_dict, {"num_heads": kwargs["num_heads"]})
  assert create_model(name, **read) == create_model(name, **kwargs)


def test_strict_conversion_names_every_bad_key():
  _, meta = _golden("tiny")
  name, kwargs = meta["model"], meta["kwargs"]
  state_dict = to_hf(name, gen.deterministic_variables(name, kwargs), layout="transformers5")
  bad = dict(state_dict)
  del bad["model.decoder.layernorm.bias"]
  bad["model.encoder.layers.0.extra"] = np.zeros(3, np.float32)
  bad["model.input_projection.bias"] = np.zeros(5, np.float32)
  bad["model.backbone.model.embedder.embedder.normalization.num_batches_tracked"] = np.zeros(())
  with pytest.raises(ValueError) as err:
    from_hf(name, bad, num_heads=kwargs["num_heads"])
  message = str(err.value)
  assert "missing ['model.decoder.layernorm.bias']" in message
  assert "unexpected ['model.encoder.layers.0.extra']" in message
  assert "model.input_projection.bias (5,)" in message
  assert "num_batches_tracked" not in message  # a file's BatchNorm counter is ignored
  with pytest.raises(ValueError, match="not a DETR state dict"):
    from_hf(name, {"foo": np.zeros(1)})


def _loss_case():
  golden = np.load(gen.GOLDENS / gen.LOSS_FILE)
  return golden, json.loads(str(golden["meta"])), gen.loss_inputs()


def test_loss_matches_transformers():
  golden, meta, inputs = _loss_case()
  outputs = {"logits": inputs["logits"][-1], "pred_boxes": inputs["pred_boxes"][-1],
             "aux_logits": inputs["logits"][:-1], "aux_pred_boxes": inputs["pred_boxes"][:-1]}
  hw = tuple(int(v) for v in inputs["image_hw"])
  loss = jax.jit(lambda o, b, c, v: detr_loss(o, b, c, v, hw))
  total, parts = loss(outputs, inputs["gt_boxes"], inputs["gt_classes"], inputs["gt_valid"])
  assert sorted(parts) == meta["parts"]
  ours = np.array([float(parts[k]) for k in meta["parts"]])
  np.testing.assert_allclose(ours, golden["parts"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(float(total), float(golden["total"]), rtol=0, atol=1e-5)


def test_postprocess_matches_transformers():
  golden, meta, inputs = _loss_case()
  outputs = {"logits": inputs["logits"][-1], "pred_boxes": inputs["pred_boxes"][-1]}
  hw = tuple(int(v) for v in inputs["image_hw"])
  queries = outputs["logits"].shape[1]
  det = jax.tree.map(np.asarray, detr_detections(outputs, hw, max_detections=queries,
                                                 score_threshold=meta["threshold"]))
  for i in range(outputs["logits"].shape[0]):
    keep = det["valid"][i]
    # transformers keeps query order; ours is by score: compare in score order.
    order = np.argsort(-golden[f"post_{i}_scores"], kind="stable")
    np.testing.assert_allclose(det["scores"][i][keep], golden[f"post_{i}_scores"][order],
                               atol=1e-6)
    np.testing.assert_array_equal(det["classes"][i][keep], golden[f"post_{i}_labels"][order])
    np.testing.assert_allclose(det["boxes"][i][keep], golden[f"post_{i}_boxes"][order],
                               atol=1e-4)
  assert 0 < det["valid"].sum() < det["valid"].size  # the threshold kept some, not all
