"""GPT-2 decoder and the ViT + GPT-2 captioner: pinned parameter counts and shapes of every
registered variant (eval_shape), the dtype policy, the GPT-2 details (tanh GELU, tied logits,
causal attention, Hugging Face's ViT epsilon) and one-line errors for bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.gpt2 import GPT2Decoder, Mlp
from jaxvision.models.vit_gpt2 import cross_attention_maps, parse_size

# vit_gpt2 and vit_gpt2_small equal transformers 5.24's VisionEncoderDecoderModel(ViTModel +
# GPT2LMHeadModel(add_cross_attention=True)) built from the same configs (counted on meta
# tensors when the goldens were made; tests/parity checks them against the golden file).
PINNED = {
    "vit_gpt2": 239_195_904,
    "vit_gpt2_small": 55_705_728,
    "vit_gpt2_tiny": 133_824,
}
VARIANTS = list_models("vit_gpt2*")


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _abstract(name, batch=2, length=5, **kwargs):
  model = create_model(name, **kwargs)
  images = jax.ShapeDtypeStruct((batch, *model_info(name).input_shape), jnp.float32)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  out, variables = jax.eval_shape(
      lambda x, t: model.init_with_output(jax.random.key(0), x, t), images, tokens)
  return model, out, variables


def numpy_params(shapes, seed=0):
  """Parameters of the shapes `shapes` made by numpy: no `init` to compile (and no threefry,
  slow to compile on a 2-core CPU). LayerNorm scales near 1, kernels of unit gain."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    std = 1.0 / math.sqrt(math.prod(s.shape[:-1])) if "kernel" in name else 0.5
    return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_params(model, seed=0, length=4):
  """numpy_params of a captioner `model`."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)
  return numpy_params(shapes["params"], seed)


def _normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_every_variant_has_a_pinned_count():
  assert set(VARIANTS) == set(PINNED), "pin the parameter count of every registered captioner"


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_parameter_count_and_output_shape(name):
  model, out, variables = _abstract(name)
  assert _count(variables["params"]) == PINNED[name]
  chex.assert_shape(out, (2, 5, model_info(name).num_classes))
  assert model.vocab_size == model_info(name).num_classes


def test_dtype_policy_vocab_from_num_classes_and_hf_layout():
  model, out, variables = _abstract("vit_gpt2_tiny", num_classes=11, dtype=jnp.bfloat16)
  chex.assert_shape(out, (2, 5, 11))
  assert out.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  p = variables["params"]
  assert sorted(p) == ["decoder", "enc_to_dec_proj", "encoder", "encoder_pooler"]
  assert sorted(p["decoder"]["h_0"]) == ["attn", "crossattention", "ln_1", "ln_2",
                                         "ln_cross_attn", "mlp"]
  chex.assert_shape(p["decoder"]["h_0"]["crossattention"]["c_attn"]["kernel"], (64, 128))
  chex.assert_shape(p["decoder"]["wte"]["embedding"], (11, 64))
  assert "lm_head" not in p["decoder"]  # tied to wte
  _, _, same_width = _abstract("vit_gpt2_tiny", decoder_size=(32, 2, 2), pooler=False)
  assert "enc_to_dec_proj" not in same_width["params"]
  assert "encoder_pooler" not in same_width["params"]
  assert create_model("vit_gpt2").encoder_ln_epsilon == 1e-12  # Hugging Face's ViTModel


def test_sizes_parse_and_bad_sizes_raise():
  assert parse_size("S", {"S": (384, 12, 6, 1536)}, "x") == (384, 12, 6, 1536)
  assert parse_size((64, 2, 4), {}, "x") == (64, 2, 4, 256)
  with pytest.raises(ValueError, match="encoder_size='Z'"):
    _ = create_model("vit_gpt2_tiny", encoder_size="Z").encoder_dims
  with pytest.raises(ValueError, match="width, depth, heads"):
    parse_size((64, 2), {}, "decoder_size")


def test_mlp_is_gpt2_tanh_gelu():
  x = _normal((2, 3, 6))
  layer = Mlp(hidden_dim=10)
  p = numpy_params(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
  out = jax.jit(layer.apply)({"params": p}, x)
  p = jax.tree.map(np.asarray, p)
  h = x @ p["c_fc"]["kernel"] + p["c_fc"]["bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  ref = h @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_decoder_alone_is_a_causal_language_model_with_tied_logits():
  decoder = GPT2Decoder(vocab_size=13, max_positions=8, width=16, depth=1, num_heads=2,
                        cross_attention=False)
  tokens = jnp.array([[1, 5, 7, 2, 3]])
  variables = {"params": numpy_params(
      jax.eval_shape(decoder.init, jax.random.key(0), tokens)["params"])}

  def final_hidden(m, t):
    return m.ln_f(m.h[0](m.wte(t) + m.wpe(jnp.arange(t.shape[1])[None]))[0])

  @jax.jit
  def run(variables):
    logits, state = decoder.apply(variables, tokens, mutable=["intermediates"])
    changed = decoder.apply(variables, tokens.at[0, 3].set(9))
    hidden = decoder.apply(variables, tokens, method=final_hidden)
    return logits, state, changed, hidden

  logits, state, changed, hidden = run(variables)
  chex.assert_shape(logits, (1, 5, 13))
  # Changing a later token leaves the earlier positions' logits as they were.
  np.testing.assert_allclose(changed[:, :3], logits[:, :3], atol=1e-6)
  assert np.abs(changed[:, 3:] - logits[:, 3:]).max() > 1e-4
  weights = state["intermediates"]["h_0"]["attn"]["attend"]["attention_weights"][0]
  np.testing.assert_array_equal(np.triu(np.asarray(weights[0, 0]), k=1), 0.0)
  # The head is the token embedding, transposed.
  embedding = variables["params"]["wte"]["embedding"]
  np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  model = create_model("vit_gpt2_tiny")
  return model, {"params": random_params(model)}


# Real forward + backward of vit_gpt2_tiny (finite, non-zero gradients) and its cross-attention
# maps run in tests/test_captioning_task.py's training test: one compile serves both.


def test_bad_input_raises_value_errors(tiny):
  model, variables = tiny
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="exceeds max_positions=32"):
    jax.eval_shape(lambda: model.apply(variables, images, jnp.zeros((1, 33), jnp.int32)))
  with pytest.raises(ValueError, match="tokens must be"):
    jax.eval_shape(lambda: model.apply(variables, images, jnp.zeros((5,), jnp.int32)))
  with pytest.raises(ValueError, match="image_size=32"):
    jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1, 48, 40, 3)),
                                       jnp.zeros((1, 3), jnp.int32)))
  with pytest.raises(ValueError, match="mutable"):
    cross_attention_maps({})
  encoded = jnp.zeros((1, 17, 64))
  with pytest.raises(ValueError, match="exceeds max_positions"):
    jax.eval_shape(lambda: model.apply(variables, encoded, 40, method="init_cache"))
  with pytest.raises(ValueError, match="num_heads=3"):
    jax.eval_shape(lambda: GPT2Decoder(vocab_size=5, width=16, depth=1, num_heads=3,
                                       cross_attention=False).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
