"""jaxvision.convert for the CNN families: exact round trips, the layout transforms (conv kernel
transpose, CHW->HWC flatten permutation), options read from the weights, and errors that name
the key. Agreement with torchvision itself is in tests/parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.convert import from_torch, to_torch
from jaxvision.convert.torchvision_cnn import state_dict_layout
from jaxvision.models import create_model, model_info

TINY = ["alexnet_tiny", "vgg_tiny", "googlenet_tiny", "resnet_tiny", "resnext_tiny",
        "densenet_tiny"]
TORCHVISION = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
               "vgg19_bn", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101",
               "resnet152", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "densenet161",
               "densenet169", "densenet201"]


def _variables(name: str, seed: int = 0, channels: int | None = None, **kwargs) -> dict:
  """Random float32 variables with the variant's structure (numpy, no init compile)."""
  model = create_model(name, **kwargs)
  h, w, c = model_info(name).input_shape
  x = jax.ShapeDtypeStruct((1, h, w, channels or c), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in TINY] + [
    ("googlenet_tiny", {"aux_logits": True}),
    ("resnet_tiny", {"stem": "small"}),
    ("densenet_tiny", {"stem": "small", "num_classes": 0}),
    ("vgg_tiny", {"num_classes": 3}),
])
def test_round_trip_from_variables_is_exact(name, kwargs):
  variables = _variables(name, **kwargs)
  state_dict = to_torch(name, variables)
  assert all(isinstance(v, np.ndarray) for v in state_dict.values())
  back = from_torch(name, state_dict)
  chex.assert_trees_all_equal(back, variables)
  chex.assert_trees_all_equal_dtypes(back, variables)


def test_round_trip_with_other_input_channels():
  variables = _variables("resnet_tiny", channels=1)
  state_dict = to_torch("resnet_tiny", variables)
  assert state_dict["conv1.weight"].shape == (8, 1, 7, 7)
  chex.assert_trees_all_equal(from_torch("resnet_tiny", state_dict), variables)


def test_round_trip_from_state_dict_is_exact():
  state_dict = to_torch("densenet_tiny", _variables("densenet_tiny"))
  state_dict["features.norm0.num_batches_tracked"] = np.array(7, np.int64)
  back = to_torch("densenet_tiny", from_torch("densenet_tiny", state_dict))
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):  # Flax keeps no count: exported as int64 0
      assert back[key].dtype == np.int64 and back[key] == 0
    else:
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_num_batches_tracked_may_be_absent():
  state_dict = to_torch("resnet_tiny", _variables("resnet_tiny"))
  trimmed = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  chex.assert_trees_all_equal(from_torch("resnet_tiny", trimmed),
                              from_torch("resnet_tiny", state_dict))


def test_layouts_follow_torchvision_names():
  """Spot checks of the mapping rules (the full layouts are checked against torchvision in
  tests/parity)."""
  resnet = state_dict_layout("resnext_tiny")
  assert resnet["layer2.0.downsample.0.weight"] == (64, 32, 1, 1)
  assert resnet["layer2.0.conv2.weight"] == (16, 8, 3, 3)  # 2 groups: in/groups channels
  assert resnet["fc.weight"] == (10, 64 * 4)
  densenet = state_dict_layout("densenet_tiny")
  assert densenet["features.denseblock2.denselayer2.norm1.running_var"] == (12,)
  assert densenet["features.transition1.conv.weight"] == (8, 16, 1, 1)
  assert densenet["classifier.weight"] == (10, 16)
  googlenet = state_dict_layout("googlenet", aux_logits=True)
  assert googlenet["inception3a.branch3.1.conv.weight"] == (32, 16, 3, 3)  # the "5x5" is 3x3
  assert googlenet["aux2.fc1.weight"] == (1024, 2048)
  vgg = state_dict_layout("vgg11_bn")
  assert vgg["features.25.weight"] == (512, 512, 3, 3)  # conv8 after 7 conv-bn-relu + 4 pools
  assert vgg["features.26.running_mean"] == (512,)
  assert vgg["classifier.0.weight"] == (4096, 512 * 7 * 7)
  assert state_dict_layout("alexnet")["features.10.weight"] == (256, 256, 3, 3)


def test_dense_after_flatten_is_permuted_from_chw():
  """torchvision's fc1 applied to the NCHW-flattened map equals ours on the NHWC-flattened one."""
  variables = _variables("alexnet_tiny")
  weight = to_torch("alexnet_tiny", variables)["classifier.1.weight"]  # (64, 16 * 6 * 6)
  x = np.random.default_rng(1).standard_normal((2, 6, 6, 16)).astype(np.float32)
  ours = x.reshape(2, -1) @ variables["params"]["fc1"]["kernel"]
  theirs = x.transpose(0, 3, 1, 2).reshape(2, -1) @ weight.T
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_conv_kernel_is_transposed_to_oihw():
  variables = _variables("resnet_tiny")
  kernel = variables["params"]["layer1_0"]["conv2"]["kernel"]  # (kh, kw, in, out)
  weight = to_torch("resnet_tiny", variables)["layer1.0.conv2.weight"]  # (out, in, kh, kw)
  assert weight[5, 3, 0, 2] == kernel[0, 2, 3, 5]


def test_from_torch_names_missing_unexpected_and_misshaped_keys():
  state_dict = to_torch("resnet_tiny", _variables("resnet_tiny"))
  missing = {k: v for k, v in state_dict.items() if k != "layer3.0.bn2.running_var"}
  with pytest.raises(ValueError, match=r"missing keys: layer3\.0\.bn2\.running_var"):
    from_torch("resnet_tiny", missing)
  with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
    from_torch("resnet_tiny", {**state_dict, "layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))})
  bad = {**state_dict, "layer2.0.conv1.weight": np.zeros((16, 8, 5, 5), np.float32)}
  with pytest.raises(ValueError, match=r"mis-shaped keys: layer2\.0\.conv1\.weight \(16, 8, 5, 5\) "
                                       r"\(expected \(16, 8, 3, 3\)\)"):
    from_torch("resnet_tiny", bad)


def test_to_torch_names_missing_and_unexpected_entries():
  variables = _variables("vgg_tiny")
  del variables["batch_stats"]["bn3"]["var"]
  with pytest.raises(ValueError, match="missing keys: batch_stats/bn3/var"):
    to_torch("vgg_tiny", variables)
  variables = _variables("vgg_tiny")
  variables["params"]["conv9"] = {"kernel": np.zeros((3, 3, 1, 1), np.float32)}
  with pytest.raises(ValueError, match="unexpected keys: params/conv9/kernel"):
    to_torch("vgg_tiny", variables)
  with pytest.raises(ValueError, match="no 'params'"):
    to_torch("vgg_tiny", {"batch_stats": {}})


def test_model_kwargs_override_what_the_weights_suggest():
  variables = _variables("resnet_tiny", widths=(4, 8, 8, 8))
  with pytest.raises(ValueError, match="mis-shaped keys"):
    to_torch("resnet_tiny", variables)
  state_dict = to_torch("resnet_tiny", variables, widths=(4, 8, 8, 8))
  assert state_dict["layer4.0.conv1.weight"].shape == (8, 8, 3, 3)
  back = from_torch("resnet_tiny", state_dict, widths=(4, 8, 8, 8))
  chex.assert_trees_all_equal(back, variables)


@pytest.mark.parametrize("name", ["lenet", "nin"])
def test_variants_without_torchvision_counterpart_are_refused(name):
  with pytest.raises(ValueError, match="no torchvision counterpart"):
    from_torch(name, {})
  with pytest.raises(ValueError, match="no torchvision counterpart"):
    to_torch(name, {"params": {}})


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_full_size_round_trip_is_exact(name):
  variables = _variables(name)
  back = from_torch(name, to_torch(name, variables))
  chex.assert_trees_all_equal(back, variables)
