"""The CNN zoo: pinned parameter counts, shapes and dtype policy of every registered CNN variant
(abstractly, via jax.eval_shape), and a real tiny forward + backward per family."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.resnet import ResNet

# Parameters of every CNN variant at its registered input shape and number of classes (224 px
# and 1000 classes for the full-size ones, where they equal torchvision's counts).
PINNED = {
    "lenet": 61_706,  # 28x28x1, 10 classes
    "lenet_multitask": 61_791,  # LeNet features + 10-way and regression heads (a dict output)
    "alexnet": 61_100_840,
    "alexnet_tiny": 59_450,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "vgg_tiny": 129_994,
    "nin": 7_439_608,
    "googlenet": 6_624_904,  # without the auxiliary heads
    "googlenet_tiny": 38_262,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet101_2": 126_886_696,
    "resnet_tiny": 78_962,
    "resnext_tiny": 106_482,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet_tiny": 3_170,
}
# The names that start with these are pinned in other files (ViT in the ViT tests, U-Net and FCN
# in theirs); every other registered variant must be pinned here.
# Families pinned in their own test files (test_vit, test_unet, test_fcn, test_detection_models,
# test_segmenter, test_rcnn_models; the vit_gpt2 captioners in test_gpt2).
PINNED_ELSEWHERE = ("vit", "unet", "fcn", "ssd", "retinanet", "fcos", "segmenter", "detr",
                    "fasterrcnn", "maskrcnn")

# One real forward + backward per family: variant, input size, extra kwargs.
TINY = {
    "lenet": ("lenet", 28, {}),
    "alexnet": ("alexnet_tiny", 64, {}),
    "vgg": ("vgg_tiny", 32, {}),
    "nin": ("nin", 96, {"num_classes": 5}),
    "googlenet": ("googlenet_tiny", 32, {"aux_logits": True}),
    "resnet": ("resnext_tiny", 32, {}),  # bottlenecks, groups, projections (basic: the goldens)
    "densenet": ("densenet_tiny", 32, {}),
}
# Width of the features each tiny variant returns with num_classes=0.
FEATURE_DIMS = {"lenet": 84, "alexnet_tiny": 64, "vgg_tiny": 64, "nin": 384,
                "googlenet_tiny": 128, "resnet_tiny": 64, "resnext_tiny": 256, "densenet_tiny": 16}
# XLA's RngBitGenerator keys: initialising under jit then compiles several times faster on CPU
# than with threefry keys.
RNGS = {"params": jax.random.key(0, impl="rbg"), "dropout": jax.random.key(1, impl="rbg")}
# Compile the real runs with LLVM's cheap settings: on CPU that cuts compile time by ~40%,
# which is nearly all the time these tests take.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
  """fn(*args) compiled with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _random_variables(model, x) -> dict:
  """Variables shaped by `model.init`, filled from numpy: He-normal kernels, BatchNorm scales and
  variances in [0.5, 1.5), biases and means in [-0.1, 0.1). Skips compiling `init`, a third of
  a real run's cost (test_zero_init_residual runs a real `init`)."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    shape, name = leaf.shape, path[-1].key
    if name == "kernel":
      return rng.standard_normal(shape, np.float32) * np.sqrt(2 / np.prod(shape[:-1]))
    low, high = (0.5, 1.5) if name in ("scale", "var") else (-0.1, 0.1)
    return rng.uniform(low, high, shape).astype(np.float32)

  abstract = jax.eval_shape(functools.partial(model.init, train=False), RNGS, x)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_every_cnn_variant_has_a_pinned_count():
  registered = {n for n in list_models() if not n.startswith(PINNED_ELSEWHERE)}
  assert sorted(registered - set(PINNED)) == [], "registered variants without a pinned count"
  assert sorted(set(PINNED) - registered) == [], "pinned variants that are not registered"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_count_shape_and_bf16_policy(name):
  """One abstract init: pinned count, output shape, float32 params, bf16 at every submodule."""
  info = model_info(name)
  model = create_model(name, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, *info.input_shape), jnp.float32)
  logits, variables = jax.eval_shape(
      lambda x: model.init_with_output(RNGS, x, train=False, capture_intermediates=True,
                                       mutable=True), x)
  assert _count(variables["params"]) == PINNED[name]
  if isinstance(logits, dict):  # a multi-task model: the class logits and the other heads
    assert all(v.dtype == jnp.bfloat16 for v in logits.values())
    logits = logits["logits"]
  assert logits.shape == (2, info.num_classes)
  assert logits.dtype == jnp.bfloat16
  stored = [variables["params"], variables.get("batch_stats", {})]
  assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.float32)}
  computed = {leaf.dtype for leaf in jax.tree.leaves(variables["intermediates"])}
  assert computed == {jnp.dtype(jnp.bfloat16)}, "a submodule does not compute in bf16"


# GoogLeNet with its auxiliary heads compiles for 20 s on a 2-core CPU: -m slow (its parity test
# runs the aux heads by default).
@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.slow) if f == "googlenet" else f for f in sorted(TINY)])
def test_tiny_forward_backward_and_batch_stats(family):
  name, size, kwargs = TINY[family]
  model = create_model(name, **kwargs)
  channels = model_info(name).input_shape[-1]
  x = jax.random.normal(jax.random.key(2), (4, size, size, channels))
  labels = jnp.arange(4) % model.num_classes
  variables = _random_variables(model, x)
  params, stats = variables["params"], variables.get("batch_stats", {})

  def loss_fn(params):
    logits, mutated = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  rngs={"dropout": RNGS["dropout"]},
                                  mutable=["batch_stats", "aux"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    for (aux,) in mutated.get("aux", {}).values():  # GoogLeNet's auxiliary heads
      loss += 0.3 * optax.softmax_cross_entropy_with_integer_labels(aux, labels).mean()
    return loss, mutated.get("batch_stats", {})

  def run(params):  # one compilation for the train-mode gradient and the eval-mode forward
    train = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return train, model.apply({"params": params, "batch_stats": stats}, x, train=False,
                              mutable=["batch_stats"])

  ((loss, new_stats), grads), (logits, after_eval) = _run(run, params)
  assert np.isfinite(loss)
  chex.assert_tree_all_finite(grads)
  dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert dead == [], f"parameters with an all-zero gradient: {dead}"
  # BatchNorm statistics move in train mode, every one of them, and stay put in eval mode.
  for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats), strict=True):
    assert not np.allclose(old, new)
  assert logits.shape == (4, model.num_classes)
  chex.assert_trees_all_equal(after_eval.get("batch_stats", {}), stats)


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_num_classes_zero_returns_features(name):
  model = create_model(name, num_classes=0)
  size = {"nin": 96}.get(name, model_info(name).input_shape[0])
  x = jax.ShapeDtypeStruct((3, size, size, model_info(name).input_shape[-1]), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(RNGS, x), x)
  assert out.shape == (3, FEATURE_DIMS[name])
  assert "head" not in variables["params"]


@pytest.mark.parametrize("name,maps", [
    ("alexnet_tiny", ["act1", "act2", "act3", "act4", "act5", "feature_map"]),
    ("vgg_tiny", ["feature_map", "stage1", "stage2", "stage3", "stage4", "stage5"]),
    ("nin", ["feature_map", "stage1", "stage2", "stage3"]),
    ("googlenet_tiny", ["feature_map", "stage3", "stage4", "stage5", "stem"]),
    ("resnet_tiny", ["feature_map", "layer1", "layer2", "layer3", "layer4", "stem"]),
    ("densenet_tiny", ["block1", "block2", "feature_map", "stem"]),
    ("lenet", ["feature_map", "stage1", "stage2"]),
])
def test_feature_maps_are_sown(name, maps):
  model = create_model(name)
  size = {"nin": 96}.get(name, model_info(name).input_shape[0])
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(RNGS, x), x)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x)
  sown = state["intermediates"]
  assert sorted(sown) == sorted(maps)
  assert all(sown[k][0].ndim == 4 for k in maps)  # (N, H, W, C) feature maps


@pytest.mark.parametrize("name,stem_channels", [("resnet_tiny", 8), ("densenet_tiny", 8)])
def test_small_stem_keeps_resolution(name, stem_channels):
  model = create_model(name, stem="small", num_classes=10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(RNGS, x), x)
  conv = variables["params"]["conv1" if name.startswith("resnet") else "conv0"]["kernel"]
  assert conv.shape == (3, 3, 3, stem_channels)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x)
  assert logits.shape == (2, 10)
  assert state["intermediates"]["stem"][0].shape == (2, 32, 32, stem_channels)


@pytest.mark.parametrize("name", ["resnet_tiny", "densenet_tiny"])
def test_unknown_stem_is_an_error(name):
  model = create_model(name, stem="tiny")
  with pytest.raises(ValueError, match="stem='tiny'"):
    jax.eval_shape(lambda x: model.init(RNGS, x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_too_small_input_is_an_error():
  model = create_model("alexnet_tiny")
  with pytest.raises(ValueError, match="too small"):
    jax.eval_shape(lambda x: model.init(RNGS, x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_googlenet_aux_heads():
  model = create_model("googlenet", aux_logits=True)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(RNGS, x, train=False), x)
  assert _count(variables["params"]) == 13_004_888  # torchvision's googlenet(aux_logits=True)
  assert set(variables) == {"params", "batch_stats"}
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, rngs=RNGS, mutable=["batch_stats", "aux"]),
      variables, x)
  assert logits.shape == (2, 1000)
  assert {k: v[0].shape for k, v in state["aux"].items()} == {
      "aux1_logits": (2, 1000), "aux2_logits": (2, 1000)}
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["aux"]), variables, x)
  assert state == {}  # eval mode skips them


@pytest.mark.parametrize("block,last", [("basic", "bn2"), ("bottleneck", "bn3")])
def test_zero_init_residual(block, last):
  model = ResNet(layers=(1, 1), block=block, widths=(4, 8), zero_init_residual=True)
  params = _run(model.init, RNGS, jnp.zeros((1, 16, 16, 3)))["params"]
  assert "downsample_bn" in params["layer2_0"]
  for stage in (1, 2):
    bns = params[f"layer{stage}_0"]
    assert not np.any(bns[last]["scale"])
    assert np.all(bns["bn1"]["scale"] == 1)
    assert np.all(bns.get("downsample_bn", {"scale": 1})["scale"] == 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet", "vgg16_bn", "googlenet", "resnet50", "densenet121"])
def test_full_size_forward(name):
  model = create_model(name)
  x = jax.random.normal(jax.random.key(0), (1, 224, 224, 3))
  variables = model.init(RNGS, x)
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (1, 1000)
  chex.assert_tree_all_finite(logits)
