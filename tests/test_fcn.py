"""FCN on ResNet: pinned sizes, bilinear-initialised upsampling, backbone stages, real steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.fcn import FCN, BilinearUpsample, _run_backbone, bilinear_kernel
from jaxvision.models.resnet import ResNet

# Every registered FCN variant: parameter count (params only; BatchNorm statistics excluded).
# fcn32s_resnet18 = ResNet-18 features 11,176,512 + 1x1 scores 512*21+21; the final bilinear
# upsampling is fixed (no parameter), the x2 ones are [4, 4, 21, 21] kernels.
PINNED_PARAMS = {
    "fcn32s_resnet18": 11_187_285,
    "fcn16s_resnet18": 11_199_738,
    "fcn8s_resnet18": 11_209_503,
    "fcn32s_resnet50": 23_551_061,
    "fcn8s_resnet50": 23_597_471,
    "fcn8s_resnet101": 42_589_599,
    "fcn8s_tiny": 78_945,
}


def _abstract(model, shape):
  return jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  )


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def numpy_variables(model, shape, seed=0):
  """Variables drawn with numpy (no compile of a random init, which is slow on a small CPU)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) > 1:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    fill = 1.0 if ("'scale'" in name or "'var'" in name) else 0.0
    return jnp.full(leaf.shape, fill, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def test_every_fcn_variant_is_pinned():
  assert sorted(list_models("fcn*")) == sorted(PINNED_PARAMS)


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_variant_parameter_count_and_output_shape(name):
  info = model_info(name)
  logits, variables = _abstract(create_model(name), (2, *info.input_shape))
  assert _count(variables["params"]) == PINNED_PARAMS[name]
  chex.assert_shape(logits, (2, *info.input_shape[:2], info.num_classes))


def test_any_input_size_and_errors():
  model = create_model("fcn8s_tiny")
  for shape in ((1, 50, 70, 3), (1, 33, 97, 3)):
    logits, _ = _abstract(model, shape)
    chex.assert_shape(logits, (*shape[:3], 3))
  with pytest.raises(ValueError, match="backbone"):
    _abstract(FCN(backbone="vgg16"), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="stride"):
    _abstract(FCN(stride=4, backbone="resnet_tiny"), (1, 32, 32, 3))


def test_bilinear_kernel_and_upsampling_equal_bilinear_interpolation():
  np.testing.assert_allclose(bilinear_kernel(2, 1)[:, 0, 0, 0], [0.0625, 0.1875, 0.1875, 0.0625])
  k = bilinear_kernel(4, 3)
  assert np.all(k[:, :, 0, 1] == 0) and np.allclose(k[:, :, 2, 2], k[:, :, 0, 0])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 7, 3)), jnp.float32)
  for factor in (2, 8):
    reference = jax.image.resize(x, (2, 6 * factor, 7 * factor, 3), "bilinear")
    for learnable in (True, False):
      layer = BilinearUpsample(factor, learnable)
      variables = jax.jit(layer.init)(jax.random.key(0), x)
      assert _count(variables) == (4 * factor**2 * 9 if learnable else 0)
      y = jax.jit(layer.apply)(variables, x)
      chex.assert_shape(y, reference.shape)
      # Equal away from the border, where the transposed convolution sees zero padding.
      inner = (slice(None), slice(factor, -factor), slice(factor, -factor))
      np.testing.assert_allclose(y[inner], reference[inner], atol=1e-5)


def test_backbone_stages_are_the_resnets_own_feature_maps():
  backbone = ResNet((1, 1, 1, 1), "basic", num_classes=0, widths=(8, 16, 32, 64))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 40, 40, 3)), jnp.float32)
  variables = numpy_variables(backbone, x.shape)
  _, sown = jax.jit(lambda v, x: backbone.apply(v, x, mutable=["intermediates"]))(variables, x)
  stages = jax.jit(lambda v, x: backbone.apply(
      v, x, method=lambda m, x: _run_backbone(m, x, False)))(variables, x)
  for s in (1, 2, 3, 4):
    np.testing.assert_allclose(stages[s], sown["intermediates"][f"layer{s}"][0], atol=1e-6)
  assert [stages[s].shape[1] for s in (1, 2, 3, 4)] == [10, 5, 3, 2]  # strides 4, 8, 16, 32


def test_skip_scorers_start_at_zero():
  model = create_model("fcn8s_tiny")
  names = ("score_layer4", "score_layer3", "score_layer2", "upsample_to_layer3")
  # Only the head is returned, so XLA drops the backbone's (slow to compile) random init.
  params = jax.jit(lambda key: {n: model.init(key, jnp.zeros((1, 32, 32, 3)))["params"][n]
                                for n in names})(jax.random.key(0))
  for name in ("score_layer3", "score_layer2"):
    assert not np.any(params[name]["kernel"])
  assert np.any(params["score_layer4"]["kernel"])
  np.testing.assert_array_equal(params["upsample_to_layer3"]["conv"]["kernel"],
                                bilinear_kernel(2, 3))


def test_tiny_forward_backward_finite_nonzero_grads_and_dtype_policy():
  model = create_model("fcn8s_tiny")
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  labels = (x[..., 0] > 0).astype(jnp.int32)
  variables = numpy_variables(model, x.shape)

  def loss_fn(params):
    logits, mutated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"])
    onehot = jax.nn.one_hot(labels, 3)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), mutated

  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  assert np.isfinite(loss)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path
  low = create_model("fcn8s_tiny", dtype=jnp.bfloat16)
  logits, state = jax.jit(lambda v, x: low.apply(v, x, mutable=["intermediates"]))(variables, x)
  assert logits.dtype == jnp.bfloat16
  assert set(state["intermediates"]) == {"backbone", "scores32", "scores16", "scores8"}
