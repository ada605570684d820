"""The one-stage detectors (SSD, RetinaNet, FCOS) and the FPN layer: pinned parameter counts
(torchvision's for the full-size models), output shapes against the anchors, the dtype policy
and frozen BatchNorm (all abstract, via jax.eval_shape), PyTorch's nearest upsampling, and the
torchvision converter's round trips and accepted layouts. Agreement of the outputs with
torchvision itself is in tests/parity/test_torchvision_detection_parity.py; real forward and
backward passes are in tests/test_detection_task.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.convert import from_torch, to_torch
from jaxvision.convert.torchvision_detection import state_dict_layout
from jaxvision.detection.anchors import fcos_scale_ranges
from jaxvision.layers.fpn import FPN, nearest_indices, upsample_nearest
from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.detection_backbone import FrozenBatchNorm

# Parameters (the `params` collection) at the registered number of classes: torchvision's
# `num_params` of its COCO weights for the full-size models (91 classes).
PINNED = {
    "ssd300_vgg16": 35_641_826,
    "retinanet_resnet50_fpn": 34_014_999,
    "fcos_resnet50_fpn": 32_269_600,
    "ssd_tiny": 86_816,
    "retinanet_tiny": 185_312,
    "fcos_tiny": 167_361,
}
# Frozen BatchNorm arrays (scale, bias, mean, var) of the ResNet bodies, outside `params`.
FROZEN = {"retinanet_resnet50_fpn": 4 * 26_560, "fcos_resnet50_fpn": 4 * 26_560,
          "retinanet_tiny": 4 * 360, "fcos_tiny": 4 * 360}
FAMILIES = ("ssd*", "retinanet*", "fcos*")
HEADS = {"ssd": ("bbox_regression", "cls_logits"), "retinanet": ("bbox_regression", "cls_logits"),
         "fcos": ("bbox_ctrness", "bbox_regression", "cls_logits")}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, shape, **kwargs):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, **kwargs), x)


def _variables(name: str, seed: int = 0, **kwargs) -> dict:
  """Random float32 variables with the variant's structure (numpy, no init compile)."""
  model = create_model(name, **kwargs)
  _, abstract = _abstract(model, (1, *model_info(name).input_shape))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


def test_every_detector_variant_has_a_pinned_count():
  registered = {n for pattern in FAMILIES for n in list_models(pattern)}
  assert sorted(registered ^ set(PINNED)) == []


@pytest.mark.parametrize("name", sorted(PINNED))
def test_count_outputs_and_bf16_policy(name):
  """One abstract init on a non-square input: pinned count, frozen BN outside params, head
  outputs over the anchors level by level, float32 variables, bf16 in every submodule."""
  info = model_info(name)
  h, w = info.input_shape[0], info.input_shape[1] * 5 // 4
  model = create_model(name, dtype=jnp.bfloat16)
  outputs, variables = _abstract(model, (2, h, w, 3), train=False, capture_intermediates=True,
                                 mutable=True)
  assert _count(variables["params"]) == PINNED[name]
  assert _count(variables.get("batch_stats", {})) == FROZEN.get(name, 0)
  anchors = model.anchors((h, w))
  n = len(anchors)
  per_location = np.broadcast_to(model.num_anchors, len(anchors.level_sizes))
  assert list(anchors.level_sizes) == [
      fh * fw * a for (fh, fw), a in zip(model.level_shapes((h, w)), per_location, strict=True)]
  assert anchors.boxes.shape == (n, 4) and anchors.boxes.dtype == np.float32
  assert sorted(outputs) == sorted(HEADS[model.family])
  assert outputs["cls_logits"].shape == (2, n, info.num_classes)
  assert outputs["bbox_regression"].shape == (2, n, 4)
  assert {v.dtype for v in outputs.values()} == {jnp.dtype(jnp.bfloat16)}
  stored = [variables["params"], variables.get("batch_stats", {})]
  assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.float32)}
  computed = {leaf.dtype for leaf in jax.tree.leaves(variables["intermediates"])}
  assert computed == {jnp.dtype(jnp.bfloat16)}, "a submodule does not compute in bf16"


def test_fcos_with_a_stride_4_level():
  """min_level=2 adds P2 (C2's lateral): one more level of outputs, anchors from stride 4, and
  the stride-4 level takes the small objects (regression distances up to 8 x 4 px)."""
  model = create_model("fcos_tiny", min_level=2, anchor_sizes=(4, 8, 16, 32, 64, 128))
  outputs, variables = _abstract(model, (1, 64, 96, 3))
  assert model.level_shapes((64, 96)) == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
  anchors = model.anchors((64, 96))
  assert outputs["cls_logits"].shape[1] == len(anchors) == 16 * 24 + 8 * 12 + 24 + 6 + 2 + 1
  assert anchors.boxes[:2].tolist() == [[-2.0, -2.0, 2.0, 2.0], [2.0, -2.0, 6.0, 2.0]]
  assert "inner_3" in variables["params"]["backbone"]["fpn"]
  lower, upper = fcos_scale_ranges(anchors)
  assert (lower[0], upper[0]) == (0.0, 32.0)
  with pytest.raises(ValueError, match="anchor_sizes"):
    create_model("fcos_tiny", min_level=2).anchors((64, 96))


def test_ssd300_has_the_papers_8732_default_boxes():
  model = create_model("ssd300_vgg16")
  assert model.level_shapes((300, 300)) == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
  assert len(model.anchors((300, 300))) == 8732


def test_ssd_input_too_small_is_an_error():
  with pytest.raises(ValueError, match="too small"):
    create_model("ssd300_vgg16").level_shapes((200, 300))


def test_frozen_batchnorm_stays_out_of_params():
  model = create_model("retinanet_tiny")
  _, variables = _abstract(model, (1, 64, 64, 3))
  body = variables["params"]["backbone"]["body"]
  assert "bn1" not in body and "bn1" not in body["layer1_0"]
  assert sorted(variables["batch_stats"]["backbone"]["body"]["bn1"]) == [
      "bias", "mean", "scale", "var"]


def test_frozen_batchnorm_applies_fixed_statistics_in_train_mode():
  bn = FrozenBatchNorm(epsilon=1e-3)
  x = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
  stats = {"scale": np.array([1.0, 2.0, 0.5, 1.0], np.float32),
           "bias": np.array([0.0, 1.0, -1.0, 0.5], np.float32),
           "mean": np.array([0.1, -0.2, 0.3, 0.0], np.float32),
           "var": np.array([1.0, 4.0, 0.25, 2.0], np.float32)}
  apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  y, mutated = apply({"batch_stats": stats}, x)
  expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(mutated["batch_stats"], stats)


def test_unknown_fpn_extra_is_an_error():
  with pytest.raises(ValueError, match="extra='p8'"):
    create_model("retinanet_tiny", extra="p8").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("size_in,size_out", [(5, 9), (3, 5), (4, 8), (7, 7), (6, 13)])
def test_nearest_indices_follow_pytorch(size_in, size_out):
  # PyTorch: src = min(floor(dst * (in / out)), in - 1), the scale in float32.
  scale = np.float32(size_in) / np.float32(size_out)
  expected = [min(int(np.floor(np.float32(i) * scale)), size_in - 1) for i in range(size_out)]
  assert nearest_indices(size_in, size_out).tolist() == expected


def test_upsample_nearest_repeats_rows_and_columns():
  x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(1, 2, 3, 2)
  up = upsample_nearest(x, (4, 6))
  np.testing.assert_array_equal(up, np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))
  odd = np.asarray(upsample_nearest(x, (3, 5)))
  np.testing.assert_array_equal(odd, np.asarray(x)[:, [0, 0, 1]][:, :, [0, 0, 1, 1, 2]])


@pytest.mark.parametrize("extra,levels,p6_in", [("none", 3, None), ("pool", 4, None),
                                               ("p6p7_p5", 5, 16), ("p6p7_c5", 5, 40)])
def test_fpn_levels_and_extra_blocks(extra, levels, p6_in):
  inputs = [jax.ShapeDtypeStruct((1, s, s + 1, c), jnp.float32)
            for s, c in ((17, 10), (9, 20), (5, 40))]
  fpn = FPN(16, extra)
  outputs, variables = jax.eval_shape(
      lambda *xs: fpn.init_with_output(jax.random.key(0), list(xs)), *inputs)
  assert len(outputs) == levels
  assert [o.shape[1:3] for o in outputs[:3]] == [(17, 18), (9, 10), (5, 6)]
  assert all(o.shape[-1] == 16 for o in outputs)
  if levels > 3:
    assert outputs[3].shape[1:3] == (3, 3)
  params = variables["params"]
  assert params["inner_2"]["kernel"].shape == (1, 1, 40, 16)
  assert (params["p6"]["kernel"].shape[2] if "p6" in params else None) == p6_in


# --- the torchvision converter ---------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [("ssd_tiny", {}), ("retinanet_tiny", {}),
                                         ("fcos_tiny", {}), ("retinanet_tiny", {"num_classes": 7}),
                                         ("ssd_tiny", {"num_classes": 3})])
def test_round_trip_from_variables_is_exact(name, kwargs):
  variables = _variables(name, **kwargs)
  state_dict = to_torch(name, variables)
  assert all(isinstance(v, np.ndarray) for v in state_dict.values())
  back = from_torch(name, state_dict)  # the number of classes read from the classifier
  chex.assert_trees_all_equal(back, variables)
  chex.assert_trees_all_equal_dtypes(back, variables)


def test_layout_names_follow_torchvision():
  """Spot checks of the tiny variants' mapping (the full layouts are checked against
  torchvision in tests/parity)."""
  ssd = state_dict_layout("ssd_tiny")
  # One conv per VGG stage: features 0, 3, 6, 9 (conv, relu, pool), conv5 after pool4.
  assert ssd["backbone.features.9.weight"] == (32, 32, 3, 3)
  assert ssd["backbone.extra.0.1.weight"] == (32, 32, 3, 3)
  assert ssd["backbone.extra.0.3.1.weight"] == (32, 32, 3, 3)  # fc6 in the fc block
  assert ssd["backbone.extra.2.2.weight"] == (32, 16, 3, 3)
  assert ssd["backbone.scale_weight"] == (32,)
  assert ssd["head.classification_head.module_list.1.weight"] == (6 * 4, 32, 3, 3)
  fcos = state_dict_layout("fcos_tiny")
  assert fcos["head.classification_head.conv.1.weight"] == (32,)  # GroupNorm after conv 0
  assert fcos["backbone.body.bn1.running_var"] == (8,)
  assert fcos["backbone.fpn.extra_blocks.p6.weight"] == (32, 32, 3, 3)  # from P5
  retina = state_dict_layout("retinanet_tiny")
  assert retina["head.regression_head.conv.1.0.weight"] == (32, 32, 3, 3)
  assert retina["head.regression_head.bbox_reg.weight"] == (9 * 4, 32, 3, 3)


def test_published_checkpoint_layouts_load():
  """Pre-0.13 key names (what the published COCO files hold) and BatchNorm2d counters."""
  variables = _variables("retinanet_tiny")
  state_dict = to_torch("retinanet_tiny", variables)
  old = {}
  for key, value in state_dict.items():
    key = key.replace("inner_blocks.0.0.", "inner_blocks.0.").replace("layer_blocks.2.0.",
                                                                       "layer_blocks.2.")
    for i in range(2):
      key = key.replace(f"_head.conv.{i}.0.", f"_head.conv.{2 * i}.")
    old[key] = value
  old["backbone.body.bn1.num_batches_tracked"] = np.array(3, np.int64)
  assert "head.classification_head.conv.2.weight" in old
  chex.assert_trees_all_equal(from_torch("retinanet_tiny", old), variables)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("backbone.fpn.layer_blocks.1.0.bias"), "missing keys: backbone.fpn"),
    (lambda sd: sd.update({"head.extra.weight": np.zeros(1)}), "unexpected keys: head.extra"),
    (lambda sd: sd.update({"backbone.body.conv1.weight": np.zeros((8, 3, 3, 3))}),
     r"mis-shaped keys: backbone.body.conv1.weight \(8, 3, 3, 3\)"),
])
def test_bad_state_dict_names_the_key(edit, match):
  state_dict = to_torch("fcos_tiny", _variables("fcos_tiny"))
  edit(state_dict)
  with pytest.raises(ValueError, match=match):
    from_torch("fcos_tiny", state_dict)


def test_converting_another_family_is_an_error():
  with pytest.raises(ValueError, match="not an SSD, RetinaNet or FCOS"):
    state_dict_layout("resnet_tiny")


@pytest.mark.slow
@pytest.mark.parametrize("name,hw", [("ssd300_vgg16", (300, 300)),
                                     ("retinanet_resnet50_fpn", (512, 640)),
                                     ("fcos_resnet50_fpn", (512, 640))])
def test_full_size_forward(name, hw):
  model = create_model(name)
  x = jax.random.normal(jax.random.key(0), (1, *hw, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  outputs = jax.jit(model.apply)(variables, x)
  n = len(model.anchors(hw))
  assert outputs["cls_logits"].shape == (1, n, 91)
  chex.assert_tree_all_finite(outputs)
