"""Faster / Mask R-CNN: pinned parameter counts (torchvision's for the ResNet-50 models), the
stage methods' shapes and the dtype policy (abstract, via jax.eval_shape), a real forward of the
whole inference path and a backward pass through the RoI heads of the tiny Mask R-CNN, the
multi-level RoIAlign against single-level crops, the freeze pattern, the converter's old
layouts and bad-input errors. Agreement with torchvision itself is in
tests/parity/test_torchvision_rcnn_parity.py."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.convert import from_torch, to_torch
from jaxvision.detection.roi_align import multiscale_roi_align, roi_align, roi_levels
from jaxvision.detection.rpn import propose, two_stage_detections
from jaxvision.models import create_model, list_models
from jaxvision.models.rcnn import frozen_backbone_pattern

# Parameters (the `params` collection) at the registered number of classes. The ResNet-50
# counts are torchvision 0.28's sum(p.numel() for p in model.parameters()) of its models with
# frozen BatchNorm (as built around pretrained weights; 91 classes), printed and saved to
# goldens/torchvision_rcnn_layouts.npz by
#     PYTHONPATH=/work/sidepkgs python tests/parity/make_rcnn_goldens.py layouts
# With weights=None torchvision builds trainable BatchNorm2d instead, whose 2 x 26,560 affine
# parameters make 41,808,406 and 44,454,513; here those are frozen statistics (FROZEN).
PINNED = {
    "fasterrcnn_resnet50_fpn": 41_755_286,
    "maskrcnn_resnet50_fpn": 44_401_393,
    "fasterrcnn_tiny": 234_496,
    "maskrcnn_tiny": 257_285,
}
FROZEN = {"fasterrcnn_resnet50_fpn": 4 * 26_560, "maskrcnn_resnet50_fpn": 4 * 26_560,
          "fasterrcnn_tiny": 4 * 360, "maskrcnn_tiny": 4 * 360}
FAST_COMPILE = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}
SUBMODULES = ("backbone", "rpn", "box_heads", "mask_heads")
LAYOUTS = pathlib.Path(__file__).parent / "parity" / "goldens" / "torchvision_rcnn_layouts.npz"


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, shape, **kwargs):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, **kwargs), x)


def _variables(name: str, shape, seed: int = 0) -> dict:
  """Random float32 variables with the variant's structure (numpy, no init compile)."""
  _, abstract = _abstract(create_model(name), shape)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if path[-1].key == "var":  # frozen BatchNorm variances must be positive
      return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
    return (0.2 * rng.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def test_every_rcnn_variant_has_a_pinned_count():
  registered = set(list_models("fasterrcnn*")) | set(list_models("maskrcnn*"))
  assert sorted(registered ^ set(PINNED)) == []
  layouts = np.load(LAYOUTS)
  for name in ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"):
    assert int(layouts[f"{name}/num_params"]) == PINNED[name]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_count_outputs_and_bf16_policy(name):
  """One abstract init on a non-square input: pinned count, frozen BN outside params, static
  detection shapes, float32 variables, bf16 in every submodule."""
  model = create_model(name, dtype=jnp.bfloat16)
  assert model.family == "rcnn" and model.has_masks == name.startswith("maskrcnn")
  outputs, variables = _abstract(model, (2, 96, 128, 3), capture_intermediates=True,
                                 mutable=True)
  assert _count(variables["params"]) == PINNED[name]
  assert _count(variables["batch_stats"]) == FROZEN[name]
  d = model.box_detections_per_img
  want = {"boxes": ((2, d, 4), jnp.float32), "scores": ((2, d), jnp.float32),
          "classes": ((2, d), jnp.int32), "valid": ((2, d), jnp.bool_)}
  if model.has_masks:
    want["mask_probs"] = ((2, d, 28, 28), jnp.float32)
  assert {k: (v.shape, v.dtype) for k, v in outputs.items()} == want
  stored = [variables["params"], variables["batch_stats"]]
  assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.float32)}
  inner = [variables["intermediates"][k] for k in SUBMODULES if k in variables["intermediates"]]
  assert len(inner) == 3 + model.has_masks
  assert {leaf.dtype for leaf in jax.tree.leaves(inner)} == {jnp.dtype(jnp.bfloat16)}


def test_stage_methods_shapes():
  """features -> [P2 ... P6] at strides 4 ... 64; rpn_head in rpn_anchors' order; the RoI
  heads' outputs per RoI (abstract)."""
  model = create_model("maskrcnn_tiny")
  h, w = 100, 136
  variables = _abstract(model, (1, h, w, 3))[1]
  images = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  rois = jax.ShapeDtypeStruct((2, 7, 4), jnp.float32)

  def stages(variables, images, rois):
    maps = model.apply(variables, images, method="features")
    return (maps, model.apply(variables, maps, method="rpn_head"),
            model.apply(variables, maps, rois, (h, w), method="box_head"),
            model.apply(variables, maps, rois, (h, w), method="mask_head"))

  maps, (objectness, deltas), (logits, regression), masks = jax.eval_shape(
      stages, variables, images, rois)
  assert [m.shape for m in maps] == [(2, 25, 34, 32), (2, 13, 17, 32), (2, 7, 9, 32),
                                     (2, 4, 5, 32), (2, 2, 3, 32)]
  anchors = model.rpn_anchors((h, w))
  assert anchors.level_sizes == tuple(3 * m.shape[1] * m.shape[2] for m in maps)
  assert objectness.shape == (2, len(anchors)) and deltas.shape == (2, len(anchors), 4)
  assert logits.shape == (2, 7, 5) and regression.shape == (2, 7, 20)
  assert masks.shape == (2, 7, 28, 28, 5)
  with pytest.raises(ValueError, match="no mask head"):
    jax.eval_shape(lambda v, m, r: create_model("fasterrcnn_tiny").apply(
        v, m, r, (h, w), method="mask_head"), variables, maps, rois)


def test_torchvision_defaults():
  model = create_model("maskrcnn_resnet50_fpn")
  assert (model.rpn_pre_nms_top_n_train, model.rpn_pre_nms_top_n_test,
          model.rpn_post_nms_top_n_train, model.rpn_post_nms_top_n_test) == (2000, 1000, 2000,
                                                                             1000)
  assert (model.rpn_nms_thresh, model.box_score_thresh, model.box_nms_thresh,
          model.box_detections_per_img) == (0.7, 0.05, 0.5, 100)
  anchors = model.rpn_anchors((800, 800))
  assert anchors.per_location == (3,) * 5 and anchors.strides[0] == (4, 4)
  np.testing.assert_array_equal(anchors.boxes[:3], [[-23, -11, 23, 11], [-16, -16, 16, 16],
                                                    [-11, -23, 11, 23]])


@pytest.fixture(scope="module")
def tiny_mask_rcnn():
  """maskrcnn_tiny, random variables, images, and its compiled __call__'s detections."""
  shape = (2, 64, 96, 3)
  images = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  # A higher score threshold than torchvision's 0.05 leaves some of the 50 slots unused.
  model = create_model("maskrcnn_tiny", box_score_thresh=0.5)
  variables = _variables("maskrcnn_tiny", shape)
  detections = jax.jit(model.apply).lower(variables, images).compile(FAST_COMPILE)(variables,
                                                                                     images)
  return model, variables, images, jax.tree.map(np.asarray, detections)


def test_tiny_forward(tiny_mask_rcnn):
  """The whole inference path compiles and runs: detections inside the image, data classes,
  and mask_probs the sigmoid of each detection's class channel of mask_head."""
  model, variables, images, out = tiny_mask_rcnn
  hw = images.shape[1:3]
  valid = out["valid"]
  assert valid.any() and not valid.all()
  boxes = out["boxes"][valid]
  assert (boxes >= 0).all() and (boxes[:, 2] <= hw[1]).all() and (boxes[:, 3] <= hw[0]).all()
  assert (out["boxes"][~valid] == 0).all()
  assert set(out["classes"][valid]) <= set(range(model.num_classes - 1))
  assert (np.diff(np.where(valid, out["scores"], -1), axis=1) <= 0).all()
  masks_of = jax.jit(lambda v, x, boxes: model.apply(
      v, model.apply(v, x, method="features"), boxes, hw, method="mask_head"))
  masks = np.asarray(masks_of(variables, images, out["boxes"]))
  chosen = np.take_along_axis(masks, (out["classes"] + 1)[:, :, None, None, None], -1)[..., 0]
  np.testing.assert_allclose(out["mask_probs"][valid], jax.nn.sigmoid(chosen)[valid], atol=1e-5)
  assert (out["mask_probs"][~valid] == 0).all()


@pytest.mark.slow
def test_tiny_forward_is_the_stage_composition(tiny_mask_rcnn):
  """__call__ equals features -> rpn_head -> propose -> box_head -> two_stage_detections run
  one by one."""
  model, variables, images, out = tiny_mask_rcnn
  hw = images.shape[1:3]

  def by_hand(variables, images):
    maps = model.apply(variables, images, method="features")
    objectness, deltas = model.apply(variables, maps, method="rpn_head")
    proposals, _, proposal_valid = propose(
        objectness, deltas, model.rpn_anchors(hw), hw,
        pre_nms_top_n=model.rpn_pre_nms_top_n_test, post_nms_top_n=model.rpn_post_nms_top_n_test)
    logits, regression = model.apply(variables, maps, proposals, hw, method="box_head")
    return two_stage_detections(logits, regression, proposals, proposal_valid, hw,
                                score_thresh=0.5, nms_thresh=0.5, detections_per_img=50)

  ref = jax.jit(by_hand).lower(variables, images).compile(FAST_COMPILE)(variables, images)
  np.testing.assert_array_equal(out["valid"], ref["valid"])
  np.testing.assert_array_equal(out["classes"], ref["classes"])
  np.testing.assert_allclose(out["boxes"], ref["boxes"], atol=2e-3, rtol=1e-4)
  np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-4)


def test_tiny_heads_backward(tiny_mask_rcnn):
  """Gradients through the box and mask heads (and their RoI crops) are finite and reach every
  head parameter and the pyramid level the RoIs are cropped from."""
  model, variables, images, _ = tiny_mask_rcnn
  hw = images.shape[1:3]
  rng = np.random.default_rng(4)
  maps = [rng.standard_normal((2, -(-hw[0] // s), -(-hw[1] // s), 32)).astype(np.float32)
          for s in (4, 8, 16, 32, 64)]
  rois = jnp.asarray([[[4, 4, 40, 30], [0, 0, 96, 64], [10, 20, 30, 60]]] * 2, jnp.float32)

  def loss(params, maps):
    v = {**variables, "params": params}
    logits, regression = model.apply(v, maps, rois, hw, method="box_head")
    masks = model.apply(v, maps, rois, hw, method="mask_head")
    return sum(jnp.mean(jnp.square(a)) for a in (logits, regression, masks))

  grads, map_grads = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      variables["params"], maps).compile(FAST_COMPILE)(variables["params"], maps)
  for key in ("box_heads", "mask_heads"):
    for path, g in jax.tree_util.tree_flatten_with_path(grads[key])[0]:
      assert np.isfinite(g).all() and np.abs(g).max() > 0, (key, path)
  # RoIs of 31-78 px are cropped from P2 (LevelMapper), so only P2 gets a gradient.
  assert np.isfinite(map_grads[0]).all() and np.abs(map_grads[0]).max() > 0
  assert all(not np.asarray(g).any() for g in map_grads[1:])


@pytest.mark.slow
def test_multiscale_roi_align_crops_each_box_from_its_level():
  """Each box's crop is roi_align's on the level LevelMapper picks (P2-P5 all used); the
  default suite checks the same against torchvision's MultiScaleRoIAlign (parity, maskrcnn_tiny
  RoIs of every level)."""
  rng = np.random.default_rng(2)
  hw = (256, 320)
  maps = [rng.standard_normal((2, -(-hw[0] // s), -(-hw[1] // s), 3)).astype(np.float32)
          for s in (4, 8, 16, 32)]
  sizes = np.array([20, 90, 130, 200, 300, 420, 500, 900], np.float32)
  xy = rng.uniform(0, 200, (2, len(sizes), 2)).astype(np.float32)
  boxes = np.concatenate([xy, xy + sizes[None, :, None] * np.float32(0.8)], -1)
  flat, images = boxes.reshape(-1, 4), np.repeat(np.arange(2), len(sizes))

  def both(maps, boxes):
    per_level = [roi_align(m, flat, images, (5, 4), spatial_scale=1 / 2 ** (i + 2),
                           aligned=False) for i, m in enumerate(maps)]
    return multiscale_roi_align(maps, boxes, hw, (5, 4)), jnp.stack(per_level)

  crops, per_level = jax.jit(both)(maps, boxes)
  levels = np.asarray(roi_levels(boxes, 2, 5)).reshape(-1)
  assert set(levels) == {0, 1, 2, 3}
  want = np.asarray(per_level)[levels, np.arange(len(levels))]
  np.testing.assert_allclose(np.asarray(crops).reshape(want.shape), want, atol=1e-5)


def test_frozen_backbone_pattern_is_torchvisions_choice():
  paths = ["backbone/body/conv1/kernel", "backbone/body/layer1_0/conv1/kernel",
           "backbone/body/layer2_0/conv1/kernel", "backbone/fpn/inner_0/kernel", "rpn/conv/kernel"]
  frozen = lambda n: [bool(re.search(frozen_backbone_pattern(n), p)) for p in paths]
  assert frozen(3) == [True, True, False, False, False]
  assert frozen(2) == [True, True, True, False, False]
  assert frozen_backbone_pattern(5) == ""
  with pytest.raises(ValueError, match="trainable_layers"):
    frozen_backbone_pattern(6)


def test_converter_reads_the_published_checkpoints_layout():
  """The pre-0.13 key names of torchvision's COCO checkpoints, with trainable-BN counters,
  convert to the same variables as the current layout; num_classes comes from the classifier."""
  shape = (1, 96, 96, 3)
  variables = _variables("maskrcnn_tiny", shape, seed=3)
  sd = to_torch("maskrcnn_tiny", variables)
  old = {}
  for key, value in sd.items():
    key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
    key = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.",
                 lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", key)
    key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
    old[key] = value
  old["backbone.body.bn1.num_batches_tracked"] = np.zeros((), np.int64)
  assert set(old) != set(sd)
  back = from_torch("maskrcnn_tiny", old)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))
  more = _variables("fasterrcnn_tiny", shape)
  more["params"]["box_heads"]["cls_score"]["kernel"] = np.zeros((64, 8), np.float32)
  more["params"]["box_heads"]["cls_score"]["bias"] = np.zeros((8,), np.float32)
  more["params"]["box_heads"]["bbox_pred"]["kernel"] = np.zeros((64, 32), np.float32)
  more["params"]["box_heads"]["bbox_pred"]["bias"] = np.zeros((32,), np.float32)
  sd = to_torch("fasterrcnn_tiny", more)
  assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (8, 64)
  assert from_torch("fasterrcnn_tiny", sd)["params"]["box_heads"]["bbox_pred"]["kernel"].shape \
      == (64, 32)
  with pytest.raises(ValueError, match="missing keys: rpn.head.bbox_pred.weight"):
    from_torch("fasterrcnn_tiny", {k: v for k, v in sd.items() if k != "rpn.head.bbox_pred.weight"})


def test_bad_inputs_name_the_culprit():
  anchors = create_model("fasterrcnn_tiny").rpn_anchors((64, 64))
  n = len(anchors)
  with pytest.raises(ValueError, match="deltas"):
    propose(jnp.zeros((1, n)), jnp.zeros((1, n, 3)), anchors, (64, 64), pre_nms_top_n=10,
            post_nms_top_n=5)
  with pytest.raises(ValueError, match="anchors"):
    propose(jnp.zeros((1, n + 1)), jnp.zeros((1, n + 1, 4)), anchors, (64, 64),
            pre_nms_top_n=10, post_nms_top_n=5)
  with pytest.raises(ValueError, match="box_regression"):
    two_stage_detections(jnp.zeros((1, 3, 5)), jnp.zeros((1, 3, 16)), jnp.zeros((1, 3, 4)),
                         jnp.ones((1, 3), bool), (64, 64), score_thresh=0.05, nms_thresh=0.5,
                         detections_per_img=4)
  with pytest.raises(ValueError, match="num_classes"):
    _abstract(create_model("fasterrcnn_tiny", num_classes=1), (1, 64, 64, 3))
  with pytest.raises(ValueError, match="image_hw"):
    create_model("fasterrcnn_tiny").rpn_anchors((1, 2, 3))
  model = create_model("fasterrcnn_tiny")
  variables = _abstract(model, (1, 64, 64, 3))[1]
  maps = [jnp.zeros((1, 64 // s, 64 // s, 32)) for s in (4, 8, 16, 32)]
  with pytest.raises(ValueError, match="image_hw must be static"):
    jax.eval_shape(lambda v, hw: model.apply(v, maps, jnp.zeros((1, 2, 4)), hw,
                                             method="box_head"), variables, jnp.asarray([64, 64]))
