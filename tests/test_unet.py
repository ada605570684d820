"""U-Net: pinned sizes, the paper's 572 -> 388 geometry, transposed convolutions, real steps."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.layers.conv import NonOverlappingConvTranspose
from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.unet import UNet, conv_transpose_padding, unet_output_size, valid_input_size

# Every registered U-Net variant: parameter count (params only, BatchNorm statistics excluded).
PINNED_PARAMS = {
    "unet": 31_030_658,  # the paper: 1 input channel, 2 classes, biases, no BatchNorm
    "unet_small": 1_942_306,
    "unet_tiny": 7_482,
}


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract(model, shape):
  return jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  )


def numpy_variables(model, shape, seed=0):
  """Variables of `model` drawn with numpy (He-normal kernels): no compile of a random init,
  which costs seconds per layer on a small CPU."""
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


def test_every_unet_variant_is_pinned():
  assert sorted(list_models("unet*")) == sorted(PINNED_PARAMS)


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_variant_parameter_count_and_output_shape(name):
  info = model_info(name)
  model = create_model(name)
  logits, variables = _abstract(model, (2, *info.input_shape))
  assert _count(variables["params"]) == PINNED_PARAMS[name]
  h, w, _ = info.input_shape
  expected = unet_output_size(h, model.depth, model.padding), unet_output_size(w, model.depth,
                                                                               model.padding)
  chex.assert_shape(logits, (2, *expected, info.num_classes))


def test_paper_unet_valid_maps_572_to_388_and_same_keeps_size():
  logits, _ = _abstract(create_model("unet"), (1, 572, 572, 1))
  chex.assert_shape(logits, (1, 388, 388, 2))
  logits, variables = _abstract(create_model("unet", padding="same"), (1, 512, 512, 1))
  chex.assert_shape(logits, (1, 512, 512, 2))
  assert _count(variables["params"]) == PINNED_PARAMS["unet"]  # padding changes no weight


def test_output_size_arithmetic_and_errors():
  assert unet_output_size(572, 4, "valid") == 388
  assert unet_output_size(256, 4, "same") == 256
  assert valid_input_size(572, 4) == 572
  assert valid_input_size(500, 4) == 508 and unet_output_size(508, 4, "valid") == 324
  accepted = []
  for size in range(1, 200):
    try:
      unet_output_size(size, 2, "valid")
      accepted.append(size)
    except ValueError:
      pass
  for at_least in range(1, 180):
    assert valid_input_size(at_least, 2) == min(s for s in accepted if s >= at_least)
  with pytest.raises(ValueError, match="odd"):
    unet_output_size(512, 4, "valid")
  with pytest.raises(ValueError, match="multiple of 16"):
    unet_output_size(100, 4, "same")
  with pytest.raises(ValueError, match="padding"):
    unet_output_size(64, 2, "full")
  with pytest.raises(ValueError, match="multiple of 4"):
    create_model("unet_tiny").init(jax.random.key(0), jnp.zeros((1, 30, 32, 1)))


# -- transposed convolution: the seeds' example --------------------------------------------------

def _conv_transpose(x, kernel, stride, padding):
  layer = nn.ConvTranspose(1, kernel.shape, strides=(stride, stride), use_bias=False,
                           padding=conv_transpose_padding(kernel.shape[0], padding),
                           transpose_kernel=True)
  y = layer.apply({"params": {"kernel": kernel[:, :, None, None]}}, x[None, :, :, None])
  return y[0, :, :, 0]


def test_transposed_convolution_seeds_example():
  x = jnp.array([[0.0, 1.0], [2.0, 3.0]])
  k = jnp.array([[0.0, 1.0], [2.0, 3.0]])
  full = jnp.array([[0, 0, 0, 1], [0, 0, 2, 3], [0, 2, 0, 3], [4, 6, 6, 9]], jnp.float32)
  np.testing.assert_array_equal(_conv_transpose(x, k, 2, 0), full)
  # Padding 1 removes the first and last rows and columns of the full output.
  np.testing.assert_array_equal(_conv_transpose(x, k, 2, 1), full[1:-1, 1:-1])


@pytest.mark.parametrize("k", [2, 3])
def test_non_overlapping_conv_transpose_is_flax_conv_transpose(k):
  # U-Net's up-convolution is computed as a matrix product; it must be nn.ConvTranspose with
  # transpose_kernel=True: same parameter shapes, same initial values, same outputs.
  x = jnp.asarray(np.random.default_rng(k).normal(size=(2, 5, 4, 6)), jnp.float32)
  fast = NonOverlappingConvTranspose(3, k)
  flax_layer = nn.ConvTranspose(3, (k, k), strides=(k, k), padding=conv_transpose_padding(k, 0),
                                transpose_kernel=True)
  params = fast.init(jax.random.key(1), x)
  reference_params = flax_layer.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(params, reference_params)
  params = {"params": {"kernel": jnp.asarray(np.random.default_rng(9).normal(size=(k, k, 3, 6)),
                                             jnp.float32),
                       "bias": jnp.arange(3, dtype=jnp.float32)}}
  y = fast.apply(params, x)
  chex.assert_shape(y, (2, 5 * k, 4 * k, 3))
  np.testing.assert_allclose(y, flax_layer.apply(params, x), atol=1e-5)
  # The seeds' example through the fast layer.
  seeds = {"params": {"kernel": jnp.array([[0.0, 1.0], [2.0, 3.0]])[:, :, None, None]}}
  y = NonOverlappingConvTranspose(1, 2, use_bias=False).apply(
      seeds, jnp.array([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None])
  np.testing.assert_array_equal(
      y[0, :, :, 0], [[0, 0, 0, 1], [0, 0, 2, 3], [0, 2, 0, 3], [4, 6, 6, 9]])


def test_transposed_convolution_restores_shape_and_is_the_adjoint_of_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 16, 16, 10)), jnp.float32)
  conv = nn.Conv(20, (5, 5), strides=(3, 3), padding=2, use_bias=False)
  params = {"params": {"kernel": jnp.asarray(rng.normal(size=(5, 5, 10, 20)), jnp.float32)}}
  y = conv.apply(params, x)
  chex.assert_shape(y, (1, 6, 6, 20))
  tconv = nn.ConvTranspose(10, (5, 5), strides=(3, 3), padding=conv_transpose_padding(5, 2),
                           use_bias=False, transpose_kernel=True)
  back = tconv.apply(params, y)  # the same kernel array: [5, 5, 10, 20]
  chex.assert_shape(back, x.shape)
  # <conv(x), y> == <x, conv_transpose(y)>: the textbook transposed convolution.
  v = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  np.testing.assert_allclose(jnp.vdot(conv.apply(params, x), v),
                             jnp.vdot(x, tconv.apply(params, v)), rtol=1e-4)
  with pytest.raises(ValueError, match="padding"):
    conv_transpose_padding(2, 2)


def test_upconv_kernel_layout():
  model = UNet(num_classes=2, depth=1, width=2, padding="same")
  _, variables = _abstract(model, (1, 8, 8, 1))
  up = variables["params"]["up0"]["conv"]
  chex.assert_shape(up["kernel"], (2, 2, 2, 4))  # transpose_kernel: [kh, kw, out, in]
  assert "bias" in up


# -- real compute on tiny variants ----------------------------------------------------------------

def test_tiny_forward_backward_finite_nonzero_grads_and_batch_stats():
  model = create_model("unet_tiny")
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  labels = (x[..., 0] > 0).astype(jnp.int32)
  variables = numpy_variables(model, x.shape)

  def loss_fn(params):
    logits, mutated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"])
    onehot = jax.nn.one_hot(labels, 2)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), mutated

  (loss, mutated), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  assert np.isfinite(loss)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), mutated["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_intermediates_features_mode_and_dtype_policy():
  model = create_model("unet_tiny", dtype=jnp.bfloat16)
  x = jnp.ones((1, 32, 32, 1))
  variables = numpy_variables(model, x.shape)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  logits, state = model.apply(variables, x, mutable=["intermediates"])
  assert logits.dtype == jnp.bfloat16
  names = set(state["intermediates"])
  assert names == {"skip0", "skip1", "bottom", "decoder1", "decoder0"}
  chex.assert_shape(state["intermediates"]["skip1"][0], (1, 16, 16, 8))
  chex.assert_shape(state["intermediates"]["decoder0"][0], (1, 32, 32, 4))
  chex.assert_shape(state["intermediates"]["bottom"][0], (1, 8, 8, 16))
  features = create_model("unet_tiny", num_classes=0).apply(variables, x)
  chex.assert_shape(features, (1, 32, 32, 4))


def test_valid_padding_crops_skips_and_resize_upsampling():
  size = valid_input_size(40, 2)  # 44 -> 4: every skip is center-cropped
  model = create_model("unet_tiny", padding="valid", batch_norm=False)
  x = jax.random.normal(jax.random.key(0), (1, size, size, 1))
  variables = numpy_variables(model, x.shape)
  logits = model.apply(variables, x)
  out = unet_output_size(size, 2, "valid")
  chex.assert_shape(logits, (1, out, out, 2))
  # Unpadded convolutions are translation-equivariant: dropping 2**depth input rows and columns
  # drops as many output rows and columns; this holds only if every skip is center-cropped.
  bigger = jax.random.normal(jax.random.key(1), (1, size + 4, size + 4, 1))
  big_logits = model.apply(variables, bigger)
  small_logits = model.apply(variables, bigger[:, 4:, 4:])
  chex.assert_shape(small_logits, (1, out, out, 2))
  np.testing.assert_allclose(big_logits[:, 4:, 4:], small_logits, atol=1e-5)
  resize = create_model("unet_tiny", upsample="resize")
  logits, variables = _abstract(resize, (1, 32, 32, 1))
  chex.assert_shape(logits, (1, 32, 32, 2))
  chex.assert_shape(variables["params"]["up0"]["conv"]["kernel"], (3, 3, 8, 4))
  with pytest.raises(ValueError, match="upsample"):
    create_model("unet_tiny", upsample="nearest").init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))


@pytest.mark.slow
def test_paper_unet_real_forward():
  model = create_model("unet")
  x = jnp.ones((1, 572, 572, 1))
  variables = model.init(jax.random.key(0), x)
  logits = model.apply(variables, x)
  chex.assert_shape(logits, (1, 388, 388, 2))
  assert np.all(np.isfinite(logits))
