"""Attention: the worked example, the explicit path against an einsum reference, fused == explicit,
the sown weights, attention dropout, and (when torch is installed) torch's functional ops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.layers.attention import (
    Attend,
    MultiHeadSelfAttention,
    dot_product_attention_weights,
    explicit_attention,
    fused_qkv_init,
)

# "When you play the game of thrones": raw scores Q K^T of the seeds' worked example.
SCORES = np.array([
    [89, 20, 41, 10, 55, 10, 59],
    [20, 90, 81, 22, 70, 15, 72],
    [41, 81, 95, 10, 90, 30, 92],
    [10, 22, 10, 92, 88, 40, 89],
    [55, 70, 90, 88, 98, 44, 87],
    [10, 15, 30, 40, 44, 85, 59],
    [59, 72, 92, 90, 95, 59, 99],
], np.float32)
# The seeds' softmax rows to 2 decimals; 'game' (row 4) is left out: the seeds' row for it does
# not follow from its own raw scores.
EXPECTED_ROWS = {
    0: [1.00, 0, 0, 0, 0, 0, 0],  # When
    1: [0, 0.97, 0.03, 0, 0, 0, 0],  # you
    2: [0, 0, 0.68, 0, 0.10, 0, 0.22],  # play
    3: [0, 0, 0, 0.65, 0.14, 0, 0.21],  # the
    5: [0, 0, 0, 0, 0, 1.00, 0],  # of
    6: [0, 0, 0.05, 0.03, 0.17, 0, 0.75],  # thrones
}


def _qkv(seed=0, b=2, n=5, h=3, d=4, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, n, h, d), dtype) for k in ks]


def test_worked_example_game_of_thrones():
  # Q = scores, K = identity gives Q K^T = scores with d_k = 7, the example's key size.
  q = jnp.asarray(SCORES)[None, :, None, :]
  k = jnp.eye(7, dtype=jnp.float32)[None, :, None, :]
  w = np.asarray(dot_product_attention_weights(q, k))[0, 0]
  chex.assert_shape(w, (7, 7))
  for row, expected in EXPECTED_ROWS.items():
    np.testing.assert_allclose(w[row], expected, atol=0.005 + 1e-6, err_msg=f"row {row}")
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


def _reference(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.exp(s - s.max(-1, keepdims=True))
  w = s / s.sum(-1, keepdims=True)
  return w, np.einsum("bhqk,bkhd->bqhd", w, v)


def test_explicit_path_matches_einsum_reference():
  q, k, v = _qkv()
  w = dot_product_attention_weights(q, k)
  ref_w, ref_out = _reference(q, k, v)
  np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(explicit_attention(w, v), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "xla"])
def test_fused_and_explicit_agree_fp32(impl):
  q, k, v = _qkv(seed=1, n=9)
  fused = Attend(impl).apply({}, q, k, v)
  explicit = Attend("explicit").apply({}, q, k, v)
  np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(fused, _reference(q, k, v)[1], atol=1e-5, rtol=1e-5)


def test_self_attention_module_paths_agree_and_sow_weights():
  x = jax.random.normal(jax.random.key(2), (2, 6, 12))
  fused = MultiHeadSelfAttention(num_heads=3, impl="fused")
  params = fused.init(jax.random.key(0), x)
  chex.assert_shape(params["params"]["qkv"]["kernel"], (12, 36))
  out_fused = fused.apply(params, x)
  out_explicit, state = MultiHeadSelfAttention(num_heads=3, impl="explicit").apply(
      params, x, mutable=["intermediates"])
  np.testing.assert_allclose(out_fused, out_explicit, atol=1e-5, rtol=1e-5)
  (w,) = state["intermediates"]["attend"]["attention_weights"]
  chex.assert_shape(w, (2, 3, 6, 6))
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)

  # Reference: the qkv output is laid out (3, heads, head_dim).
  p = params["params"]
  qkv = np.asarray(x) @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
  q, k, v = qkv.reshape(2, 6, 3, 3, 4).transpose(2, 0, 1, 3, 4)
  ref = _reference(q, k, v)[1].reshape(2, 6, 12)
  ref = ref @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
  np.testing.assert_allclose(out_fused, ref, atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_in_train_mode():
  q, k, v = _qkv(seed=3)
  layer = Attend("fused", attention_dropout=0.5)
  eval_out = layer.apply({}, q, k, v, train=False)
  np.testing.assert_allclose(eval_out, _reference(q, k, v)[1], atol=1e-5, rtol=1e-5)
  a = layer.apply({}, q, k, v, train=True, rngs={"dropout": jax.random.key(0)})
  b = layer.apply({}, q, k, v, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, eval_out) and not np.allclose(a, b)


def test_fused_qkv_init_bounds_each_part_as_its_own_layer():
  kernel = fused_qkv_init()(jax.random.key(0), (64, 192))
  bound = np.sqrt(6.0 / (64 + 64))  # xavier-uniform of one 64 x 64 projection
  assert float(jnp.max(jnp.abs(kernel))) <= bound
  assert float(jnp.max(jnp.abs(kernel))) > 0.9 * bound
  parts = np.split(np.asarray(kernel), 3, axis=1)
  assert not np.allclose(parts[0], parts[1])


def test_bad_arguments_name_the_culprit():
  x = jnp.zeros((1, 4, 10))
  with pytest.raises(ValueError, match="num_heads=3"):
    MultiHeadSelfAttention(num_heads=3).init(jax.random.key(0), x)
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="impl='flash'"):
    Attend("flash").apply({}, q, k, v)


def test_bf16_explicit_softmax_rows_sum_to_one():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  w = dot_product_attention_weights(q, k)
  assert w.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(w, np.float32).sum(-1), 1.0, atol=2e-2)


def test_against_torch_functional_ops():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = jax.random.normal(jax.random.key(4), (2, 7, 16))
  layer = MultiHeadSelfAttention(num_heads=4)
  p = layer.init(jax.random.key(5), x)["params"]
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  # timm's Attention.forward: Linear qkv -> (B, N, 3, H, d) -> SDPA -> Linear proj.
  qkv = F.linear(t(x), t(p["qkv"]["kernel"]).T, t(p["qkv"]["bias"]))
  q, k, v = qkv.reshape(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
  y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 16)
  y = F.linear(y, t(p["proj"]["kernel"]).T, t(p["proj"]["bias"]))
  np.testing.assert_allclose(layer.apply({"params": p}, x), y.numpy(), atol=1e-5, rtol=1e-5)
