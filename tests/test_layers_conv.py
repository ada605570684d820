"""jaxvision.layers.conv: convolution semantics (cross-correlation, padding, strides, groups),
PyTorch-compatible pooling, BatchNorm modes, and dtype policy."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.layers.conv import (
    ConvNormAct,
    adaptive_avg_pool,
    batch_norm,
    global_avg_pool,
    max_pool,
    pool_output_size,
)

SEED_INPUT = np.arange(9, dtype=np.float32).reshape(3, 3)
SEED_KERNEL = np.array([[0, 1], [2, 3]], np.float32)


def _conv2d(x, kernel, padding, strides):
  """The seed example through ConvNormAct with a given single-channel kernel."""
  layer = ConvNormAct(1, kernel.shape, strides, padding, norm="none", act=None)
  variables = {"params": {"conv": {"kernel": jnp.asarray(kernel)[:, :, None, None]}}}
  return np.asarray(layer.apply(variables, jnp.asarray(x)[None, :, :, None]))[0, :, :, 0]


def test_conv_is_cross_correlation():
  np.testing.assert_array_equal(_conv2d(SEED_INPUT, SEED_KERNEL, 0, 1), [[19, 25], [37, 43]])


def test_conv_zero_padding():
  np.testing.assert_array_equal(
      _conv2d(SEED_INPUT, SEED_KERNEL, 1, 1),
      [[0, 3, 8, 4], [9, 19, 25, 10], [21, 37, 43, 16], [6, 7, 8, 0]],
  )


def test_conv_padding_and_unequal_strides():
  np.testing.assert_array_equal(_conv2d(SEED_INPUT, SEED_KERNEL, 1, (3, 2)), [[0, 8], [6, 8]])


@pytest.mark.parametrize(
    "n,k,pad,s", [(8, 3, 1, 1), (8, 3, 1, 2), (7, 3, 0, 2), (224, 7, 3, 2), (5, 2, 0, 3),
                  (28, 5, 2, 1), (9, 4, 1, 3)])
def test_conv_output_shape_formula(n, k, pad, s):
  layer = ConvNormAct(4, k, s, pad, norm="none")
  x = jax.ShapeDtypeStruct((1, n, n + 1, 2), jnp.float32)
  y = jax.eval_shape(lambda x: layer.init_with_output(jax.random.key(0), x)[0], x)
  p = 2 * pad  # total padding
  assert y.shape == (1, (n - k + p + s) // s, (n + 1 - k + p + s) // s, 4)


def _reference_conv(x, kernel, strides, pad, groups):
  """Direct NHWC cross-correlation with zero padding and feature groups."""
  n, h, w, cin = x.shape
  kh, kw, cin_g, cout = kernel.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (h + 2 * pad - kh) // strides + 1, (w + 2 * pad - kw) // strides + 1
  out = np.zeros((n, oh, ow, cout), np.float64)
  cout_g = cout // groups
  for g, i, j in itertools.product(range(groups), range(oh), range(ow)):
    patch = xp[:, i * strides:i * strides + kh, j * strides:j * strides + kw,
               g * cin_g:(g + 1) * cin_g]
    out[:, i, j, g * cout_g:(g + 1) * cout_g] = np.einsum(
        "nhwc,hwco->no", patch, kernel[..., g * cout_g:(g + 1) * cout_g])
  return out


@pytest.mark.parametrize("strides,pad,groups", [(1, 1, 1), (2, 1, 2), (2, 0, 4)])
def test_conv_matches_reference(strides, pad, groups):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 8)).astype(np.float32)
  layer = ConvNormAct(8, 3, strides, pad, groups=groups, norm="none", act=None)
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert shapes["params"]["conv"]["kernel"].shape == (3, 3, 8 // groups, 8)
  kernel = rng.standard_normal((3, 3, 8 // groups, 8)).astype(np.float32)
  y = jax.jit(layer.apply)({"params": {"conv": {"kernel": kernel}}}, x)
  np.testing.assert_allclose(y, _reference_conv(x, kernel, strides, pad, groups), atol=1e-5)


def _reference_max_pool(x, window, stride, pad, ceil_mode):
  n, h, w, c = x.shape
  oh = pool_output_size(h, window, stride, pad, ceil_mode)
  ow = pool_output_size(w, window, stride, pad, ceil_mode)
  xp = np.full((n, h + 2 * pad + window, w + 2 * pad + window, c), -np.inf, np.float32)
  xp[:, pad:pad + h, pad:pad + w] = x
  out = np.empty((n, oh, ow, c), np.float32)
  for i, j in itertools.product(range(oh), range(ow)):
    out[:, i, j] = xp[:, i * stride:i * stride + window, j * stride:j * stride + window].max((1, 2))
  return out


@pytest.mark.parametrize("size,window,stride,pad,ceil_mode", [
    (8, 2, 2, 0, False), (7, 3, 2, 0, False), (7, 3, 2, 0, True), (112, 3, 2, 1, False),
    (16, 3, 2, 0, True), (14, 3, 1, 1, True), (5, 2, 2, 0, True), (6, 3, 2, 1, True),
    (5, 2, 2, 1, True), (7, 2, 2, 0, False), (9, 3, 3, 0, False)])
def test_max_pool_matches_torch_semantics(size, window, stride, pad, ceil_mode):
  x = np.random.default_rng(size).standard_normal((2, size, size + 1, 3)).astype(np.float32)
  y = max_pool(jnp.asarray(x), window, stride, pad, ceil_mode=ceil_mode)
  np.testing.assert_array_equal(y, _reference_max_pool(x, window, stride, pad, ceil_mode))


def test_max_pool_over_disjoint_tiles_has_reduce_windows_gradient():
  # window == stride takes the reshape-and-max path; with distinct values its gradient must be
  # the one XLA's select-and-scatter gives.
  x = jnp.asarray(np.random.default_rng(0).permutation(2 * 10 * 11 * 3).reshape(2, 10, 11, 3),
                  jnp.float32)
  v = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 5, 3)), jnp.float32)

  def reference(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                 ((0, 0), (0, 0), (0, 0), (0, 0)))[:, :5, :5]

  np.testing.assert_array_equal(max_pool(x, 2), reference(x))
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.vdot(max_pool(x, 2), v))(x),
                                jax.grad(lambda x: jnp.vdot(reference(x), v))(x))


def test_pool_output_size_ceil_mode_rule():
  # ceil((n + 2p - k) / s) + 1, less one when the last window would start in the padding.
  assert pool_output_size(112, 3, 2, 0, True) == 56
  assert pool_output_size(7, 2, 2, 0, True) == 4
  assert pool_output_size(6, 3, 2, 1, True) == 4  # the 4th window starts on the last pixel
  assert pool_output_size(5, 2, 2, 1, True) == 3  # a 4th would start in the right padding
  assert pool_output_size(7, 3, 2, 0, False) == 3


def test_max_pool_too_small_input_is_an_error():
  with pytest.raises(ValueError, match="too small"):
    max_pool(jnp.zeros((1, 2, 2, 1)), 3, 2)


def _reference_adaptive(x, out):
  n, h, w, c = x.shape
  y = np.empty((n, out, out, c), np.float64)
  for i, j in itertools.product(range(out), range(out)):
    hs, he = (i * h) // out, -(-((i + 1) * h) // out)
    ws, we = (j * w) // out, -(-((j + 1) * w) // out)
    y[:, i, j] = x[:, hs:he, ws:we].mean((1, 2))
  return y


@pytest.mark.parametrize("size,out", [(6, 6), (14, 7), (5, 7), (3, 7), (1, 6), (10, 4), (13, 6)])
def test_adaptive_avg_pool_matches_torch_bins(size, out):
  x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), out), _reference_adaptive(x, out),
                             atol=1e-6)


def test_pools_keep_dtype():
  x = jnp.ones((1, 9, 9, 2), jnp.bfloat16)
  assert max_pool(x, 3, 2, 1, ceil_mode=True).dtype == jnp.bfloat16
  assert adaptive_avg_pool(x, 4).dtype == jnp.bfloat16
  assert global_avg_pool(x).dtype == jnp.bfloat16


def test_pooling_has_no_parameters():
  class Pools(nn.Module):
    @nn.compact
    def __call__(self, x):
      return global_avg_pool(adaptive_avg_pool(max_pool(x, 3, 2, 1, ceil_mode=True), 3))

  x = jnp.ones((1, 12, 12, 2))
  assert jax.tree.leaves(Pools().init(jax.random.key(0), x)) == []


def test_batch_norm_train_updates_running_stats_eval_uses_them():
  x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4, 4, 3)).astype(np.float32)
  bn_train, bn_eval = batch_norm(True), batch_norm(False)
  variables = bn_eval.init(jax.random.key(0), x)
  _, updated = bn_train.apply(variables, x, mutable=["batch_stats"])
  # torch's momentum 0.1 = Flax's 0.9: running = 0.9 * running + 0.1 * batch statistic.
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * x.var((0, 1, 2)),
                             rtol=1e-5)
  y, unchanged = bn_eval.apply(variables, x, mutable=["batch_stats"])
  chex.assert_trees_all_equal(unchanged["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)  # running mean 0, var 1


def test_conv_norm_act_dtype_policy():
  layer = ConvNormAct(4, 3, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.float32)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  y, _ = jax.eval_shape(
      lambda v, x: layer.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert y.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_conv_norm_act_rejects_unknown_norm():
  with pytest.raises(ValueError, match="norm='group'"):
    ConvNormAct(4, norm="group").init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
