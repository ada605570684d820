"""Parity of Faster / Mask R-CNN with torchvision, without importing it: our float32 FPN maps,
RPN head, anchors, box head and mask head (on the same RoIs) against the goldens
make_rcnn_goldens.py saved from torchvision on the same seed-made weights and input; `propose`
and `two_stage_detections` against torchvision's filter_proposals and postprocess_detections on
the same synthetic inputs; and our converter against torchvision's state-dict layouts (every
key, every shape) and parameter counts.

Regenerate the goldens with that script on any machine where torchvision imports.
"""

import json

import jax
import jax.numpy as jnp
import make_rcnn_goldens as gen
import numpy as np
import pytest
from test_torchvision_detection_parity import sampled_errors

from jaxvision.convert import from_torch, to_torch
from jaxvision.convert.torchvision_rcnn import state_dict_layout
from jaxvision.detection.rpn import propose, two_stage_detections
from jaxvision.models import create_model

# LLVM's cheap passes cut the compile time (the values are the same).
FAST_COMPILE = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}
# The ResNet-50 models compile for ~10 s each on a 2-core CPU; maskrcnn_tiny covers every
# module type by default. The slow post-processing cases repeat a default one at other sizes.
SLOW = {*gen.FULL, "fasterrcnn_tiny", "tiny_default", "coco_default", "tiny"}


def _cases(cases):
  return [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else []) for c in sorted(cases)]


def _golden(name: str):
  path = gen.GOLDENS / name
  assert path.exists(), f"{path.name} missing: run make_rcnn_goldens.py"
  return np.load(path)


def stage_outputs(model, variables, images, rois) -> dict[str, np.ndarray]:
  """Our stage-by-stage outputs, named as the goldens."""
  image_hw = images.shape[1:3]

  def run(variables, images, rois):
    maps = model.apply(variables, images, method="features")
    objectness, deltas = model.apply(variables, maps, method="rpn_head")
    class_logits, box_regression = model.apply(variables, maps, rois, image_hw, method="box_head")
    out = {f"features_{i}": m for i, m in enumerate(maps)}
    out.update(objectness=objectness, rpn_deltas=deltas, class_logits=class_logits,
               box_regression=box_regression)
    if model.has_masks:
      out["mask_logits"] = model.apply(variables, maps, rois, image_hw, method="mask_head")
    return out

  compiled = jax.jit(run).lower(variables, images, rois).compile(FAST_COMPILE)
  return jax.tree.map(np.asarray, compiled(variables, images, rois))


def model_errors(case: str) -> dict[str, float]:
  """Max |ours - torchvision| over the golden's sampled positions, per output."""
  golden = _golden(f"{gen.PREFIX}{case}.npz")
  meta = json.loads(str(golden["meta"]))
  name, (h, w), batch, seed = meta["model"], meta["input_hw"], meta["batch"], meta["seed"]
  model = create_model(name)
  images = gen.deterministic_input(h, w, batch, seed)
  rois = gen.deterministic_rois(batch, meta["rois_per_image"], h, w, seed)
  outputs = stage_outputs(model, gen.deterministic_variables(name, seed), images, rois)
  outputs["anchors"] = model.rpn_anchors((h, w)).boxes
  return sampled_errors(outputs, golden, seed)


@pytest.mark.parametrize("case", _cases(gen.CASES))
def test_stage_outputs_match_torchvision(case):
  errors = model_errors(case)
  print({k: f"{v:.2g}" for k, v in errors.items()})
  for key in [k for k in errors if not k.endswith("/scale")]:
    assert errors[key + "/scale"] > 0, key
    assert errors[key] <= 1e-4, (key, errors[key], errors[key + "/scale"])


def _per_image(golden, prefix: str, count: int, fields) -> list[dict]:
  return [{f: golden[f"{prefix}/{i}/{f}"] for f in fields} for i in range(count)]


def _tie_order(rows: dict) -> np.ndarray:
  """Descending score, equal scores by their boxes: the order both sides agree on (torchvision
  sorts equal scores in no fixed order)."""
  boxes = np.round(rows["boxes"].astype(np.float64), 2)
  return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -rows["scores"]))


def _assert_same_kept(ours: dict, expected: list[dict], fields, tolerances) -> int:
  """Our valid slots equal torchvision's kept rows, image by image, in descending score order
  (equal scores aside)."""
  kept = 0
  for i, want in enumerate(expected):
    valid = np.asarray(ours["valid"][i])
    n = len(want["scores"])
    assert valid.sum() == n and valid[:n].all(), (i, int(valid.sum()), n)
    got = {f: np.asarray(ours[f][i][:n]) for f in fields}
    assert (np.diff(got["scores"]) <= 0).all()
    mine, theirs = _tie_order(got), _tie_order(want)
    for field in fields:
      np.testing.assert_allclose(got[field][mine], want[field][theirs],
                                 **tolerances.get(field, {}), err_msg=field)
    kept += n
  return kept


@pytest.mark.parametrize("case", _cases(gen.PROPOSE_CASES))
def test_propose_matches_filter_proposals(case):
  name, pre, post, nms_thresh, score_thresh = gen.PROPOSE_CASES[case]
  golden = _golden(gen.POSTPROCESS_FILE)
  anchors = create_model(name).rpn_anchors(gen.IMAGE_HW)
  objectness, deltas = gen.rpn_inputs(len(anchors), len(gen.IMAGE_SIZES))
  run = jax.jit(lambda o, d, hw: propose(o, d, anchors, hw, pre_nms_top_n=pre,
                                         post_nms_top_n=post, nms_thresh=nms_thresh,
                                         score_thresh=score_thresh))
  boxes, scores, valid = run(objectness, deltas, np.asarray(gen.IMAGE_SIZES, np.float32))
  assert boxes.shape == (2, post, 4) and scores.shape == valid.shape == (2, post)
  expected = _per_image(golden, f"propose/{case}", 2, ("boxes", "scores"))
  kept = _assert_same_kept({"boxes": boxes, "scores": scores, "valid": valid}, expected,
                           ("boxes", "scores"), {"boxes": {"atol": 1e-3, "rtol": 1e-5},
                                                 "scores": {"atol": 1e-6, "rtol": 1e-6}})
  assert kept > 10
  assert not np.asarray(boxes)[~np.asarray(valid)].any()


@pytest.mark.parametrize("case", _cases(gen.DETECT_CASES))
def test_two_stage_detections_match_postprocess_detections(case):
  classes, rois, valid_rois, score_thresh, nms_thresh, per_img = gen.DETECT_CASES[case]
  golden = _golden(gen.POSTPROCESS_FILE)
  logits, regression, boxes = gen.box_head_inputs(classes, rois, len(gen.IMAGE_SIZES))
  roi_valid = np.arange(rois)[None, :] < np.asarray(valid_rois)[:, None]
  run = jax.jit(lambda *a: two_stage_detections(*a, score_thresh=score_thresh,
                                                nms_thresh=nms_thresh,
                                                detections_per_img=per_img))
  ours = run(logits, regression, boxes, roi_valid, np.asarray(gen.IMAGE_SIZES, np.float32))
  assert ours["boxes"].shape == (2, per_img, 4) and ours["classes"].dtype == jnp.int32
  expected = _per_image(golden, f"detect/{case}", 2, ("boxes", "scores", "labels"))
  for want in expected:
    want["classes"] = want.pop("labels") - 1  # torchvision's labels count the background
  kept = _assert_same_kept(ours, expected, ("boxes", "scores", "classes"),
                           {"boxes": {"atol": 1e-3, "rtol": 1e-5},
                            "scores": {"atol": 1e-6, "rtol": 1e-5}})
  assert kept > 10


def _layout(lines) -> dict[str, str]:
  return dict(str(line).rsplit(":", 1) for line in lines)


@pytest.mark.parametrize(
    "name", [pytest.param("fasterrcnn_resnet50_fpn", marks=pytest.mark.slow),
             "maskrcnn_resnet50_fpn"])
def test_converter_matches_torchvision_layout(name):
  """Our state dict has torchvision's keys and shapes, and torchvision's layout converts whole
  and back; distinct values in every tensor (exact in float32) show a transpose or a swap."""
  expected = _layout(_golden(gen.LAYOUTS_FILE)[name])
  ours = {k: "x".join(map(str, v)) for k, v in state_dict_layout(name).items()}
  assert sorted(set(ours) ^ set(expected)) == []
  assert ours == expected
  state_dict = {}
  for i, (k, v) in enumerate(sorted(expected.items())):
    shape = [int(d) for d in v.split("x") if d]
    state_dict[k] = (np.arange(np.prod(shape), dtype=np.float32) + i).reshape(shape)
  back = to_torch(name, from_torch(name, state_dict))
  assert sorted(back) == sorted(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(back[k], v)


def test_every_case_has_a_golden():
  present = {p.stem.removeprefix(gen.PREFIX) for p in gen.GOLDENS.glob(gen.PREFIX + "*.npz")}
  assert present == set(gen.CASES) | {"layouts", "postprocess"}
