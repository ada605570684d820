"""ViT: pinned parameter counts and output shapes of every variant (eval_shape), the embeddings
and layers, real forward/backward on the tiny variant, scan == loop, remat, resolution change."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.layers.embed import (
    PatchEmbed,
    fixed_posemb,
    resample_posemb,
    sincos_posemb_1d,
    sincos_posemb_2d,
)
from jaxvision.layers.transformer import DropPath, LayerScale, Mlp
from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.vit import attention_maps, load_at_image_size, stack_blocks, unstack_blocks

# 224 px, 1000 classes, class token, learned position embeddings. The nine paper sizes equal
# timm 1.0.31's counts of vit_{tiny,small,base}_patch16_224, vit_small_patch8_224,
# vit_base_patch{32,8}_224, vit_large_patch{16,32}_224 and vit_huge_patch14_224 built with
# num_classes=1000 (counted on meta tensors when the goldens were made).
PINNED = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "vit_b32": 88_224_232,
    "vit_l16": 304_326_632,
    "vit_h14": 632_045_800,
    "vit_s8": 22_055_272,
    "vit_b8": 86_576_872,
    "vit_l32": 306_535_400,
    "vit_tiny": 24_234,
}
# The ViT image-captioning encoder-decoders (vit_gpt2*) are pinned in test_gpt2.py.
VARIANTS = [n for n in list_models("vit_*") if not n.startswith("vit_gpt2")]


def _abstract(name, batch=2, **kwargs):
  model = create_model(name, **kwargs)
  x = jax.ShapeDtypeStruct((batch, *model_info(name).input_shape), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
  return model, out, variables


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_every_variant_has_a_pinned_count():
  assert set(VARIANTS) == set(PINNED), "pin the parameter count of every registered ViT"


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_parameter_count_and_output_shape(name):
  _, out, variables = _abstract(name)
  assert _count(variables["params"]) == PINNED[name]
  chex.assert_shape(out, (2, model_info(name).num_classes))


def test_features_dtype_policy_and_keyword_overrides():
  _, out, variables = _abstract("vit_b16", num_classes=0, dtype=jnp.bfloat16)
  chex.assert_shape(out, (2, 768))
  assert out.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  model, out, variables = _abstract("vit_tiny", width=48, depth=3, num_heads=4, mlp_dim=96,
                                    pool="gap", posemb="sincos2d", num_classes=7)
  chex.assert_shape(out, (2, 7))
  p = variables["params"]
  assert "pos_embed" not in p and "cls_token" not in p and sorted(p).count("blocks_2") == 1
  chex.assert_shape(p["blocks_2"]["mlp"]["fc1"]["kernel"], (48, 96))


def test_bad_options_and_input_size_raise_value_errors():
  x = jnp.zeros((1, 32, 32, 3))
  for kwargs, match in [(dict(pool="max"), "pool='max'"), (dict(posemb="rope"), "posemb='rope'"),
                        (dict(attention_impl="flash"), "impl='flash'"),
                        (dict(num_heads=5), "num_heads=5"), (dict(patch_size=5), "patch_size=5")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda x, kw=kwargs: create_model("vit_tiny", **kw).init(
          jax.random.key(0), x), x)
  with pytest.raises(ValueError, match="image_size=32"):
    jax.eval_shape(lambda x: create_model("vit_tiny").init(jax.random.key(0), x),
                   jnp.zeros((1, 48, 48, 3)))


# --- Embeddings ---------------------------------------------------------------------------------


def test_patch_embed_is_a_strided_conv_flattened_row_major():
  x = jax.random.normal(jax.random.key(0), (1, 8, 12, 3))
  layer = PatchEmbed(width=5, patch_size=4)
  params = layer.init(jax.random.key(1), x)
  tokens = layer.apply(params, x)
  chex.assert_shape(tokens, (1, 6, 5))
  kernel, bias = (np.asarray(params["params"]["proj"][k]) for k in ("kernel", "bias"))
  # Token (row 1, col 2) is patch x[4:8, 8:12] dotted with the kernel.
  patch = np.asarray(x)[0, 4:8, 8:12]
  np.testing.assert_allclose(tokens[0, 1 * 3 + 2], np.einsum("hwc,hwcd->d", patch, kernel) + bias,
                             rtol=1e-5, atol=1e-5)


def test_sincos_1d_is_the_transformer_formula():
  pe = sincos_posemb_1d(50, 16)
  pos, i = 37, 3
  np.testing.assert_allclose(pe[pos, 2 * i], np.sin(pos / 10000 ** (2 * i / 16)), rtol=1e-5)
  np.testing.assert_allclose(pe[pos, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 16)), rtol=1e-5)
  np.testing.assert_array_equal(pe[0, 0::2], 0.0)
  np.testing.assert_array_equal(pe[0, 1::2], 1.0)


def test_sincos_2d_encodes_row_then_column():
  rows, cols, d = 3, 4, 16
  pe = sincos_posemb_2d((rows, cols), d).reshape(rows, cols, d)
  row_part, col_part = pe[..., : d // 2], pe[..., d // 2:]
  np.testing.assert_allclose(row_part, np.broadcast_to(sincos_posemb_1d(rows, d // 2)[:, None],
                                                       row_part.shape), rtol=1e-6)
  np.testing.assert_allclose(col_part, np.broadcast_to(sincos_posemb_1d(cols, d // 2)[None],
                                                       col_part.shape), rtol=1e-6)
  full = fixed_posemb("sincos2d", (rows, cols), d, num_prefix_tokens=1)
  chex.assert_shape(full, (1, 1 + rows * cols, d))
  np.testing.assert_array_equal(full[0, 0], 0.0)
  with pytest.raises(ValueError, match="divisible by 4"):
    sincos_posemb_2d((2, 2), 6)


def test_resample_posemb_identity_and_class_token_kept():
  posemb = jax.random.normal(jax.random.key(0), (1, 1 + 4 * 4, 8))
  assert resample_posemb(posemb, (4, 4)) is posemb
  up = resample_posemb(posemb, (7, 7), method="bicubic")
  chex.assert_shape(up, (1, 1 + 49, 8))
  np.testing.assert_array_equal(up[:, 0], posemb[:, 0])
  # A constant field stays constant; a field varying along columns only still does.
  ramp = jnp.tile(jnp.arange(4.0)[None, :, None], (4, 1, 8)).reshape(1, 16, 8)
  resized = np.asarray(resample_posemb(ramp, (6, 10), num_prefix_tokens=0)).reshape(6, 10, 8)
  np.testing.assert_allclose(resized, np.broadcast_to(resized[:1], resized.shape), atol=1e-6)
  assert np.all(np.diff(resized[0, :, 0]) >= 0) and resized[0, -1, 0] > resized[0, 0, 0]
  with pytest.raises(ValueError, match="not a square"):
    resample_posemb(posemb[:, :-1], (4, 4))
  with pytest.raises(ValueError, match="method='nearest'"):
    resample_posemb(posemb, (4, 4), method="nearest")


# --- Layers -------------------------------------------------------------------------------------


def test_mlp_matches_reference_with_exact_gelu():
  from scipy.special import erf

  x = jax.random.normal(jax.random.key(0), (3, 5, 6))
  layer = Mlp(hidden_dim=10)
  p = layer.init(jax.random.key(1), x)["params"]
  h = np.asarray(x) @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  ref = h @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
  np.testing.assert_allclose(layer.apply({"params": p}, x), ref, rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
  x = jnp.ones((4000, 3, 2))
  layer = DropPath(rate=0.25)
  np.testing.assert_array_equal(layer.apply({}, x, train=False), x)
  y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(4000, -1)
  kept = per_sample != 0
  np.testing.assert_allclose(per_sample[kept], 1 / 0.75, rtol=1e-6)
  assert 0.2 < 1 - kept.all(1).mean() < 0.3  # about a quarter of the samples dropped
  assert np.all(per_sample.min(1) == per_sample.max(1))  # all or nothing per sample
  assert abs(y.mean() - 1.0) < 0.05
  with pytest.raises(ValueError, match="rate=1.0"):
    DropPath(rate=1.0).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})


def test_layer_scale_starts_at_its_init_value():
  x = jnp.ones((2, 3, 4))
  p = LayerScale(0.1).init(jax.random.key(0), x)
  np.testing.assert_allclose(p["params"]["gamma"], np.full(4, 0.1))


# --- The tiny variant, for real -----------------------------------------------------------------


def _images(n=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _random_params(model, input_shape, seed=0):
  """Random parameters of the right shapes without compiling `init` (slow on a 2-core CPU)."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny():
  """vit_tiny with real parameters (jit init: eager init dispatches op by op, slowly)."""
  model = create_model("vit_tiny")
  return model, jax.jit(model.init)(jax.random.key(0), _images())


def test_tiny_forward_backward_finite_nonzero_grads():
  model = create_model("vit_tiny", pool="map", layer_scale=0.1, dropout=0.1,
                       attention_dropout=0.1, drop_path=0.1)
  x, labels = _images(4), jnp.array([0, 1, 2, 3])
  params = _random_params(model, x.shape)

  def loss(p):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f"zero gradient at {jax.tree_util.keystr(path)}"


# 29 s on a 2-core CPU (three compiled layouts); -m slow.
@pytest.mark.slow
def test_scan_and_remat_equal_the_loop(tiny):
  x = _images(2, seed=1)
  loop, variables = tiny
  params = variables["params"]
  stacked = stack_blocks(params)
  chex.assert_shape(stacked["blocks"]["attn"]["qkv"]["kernel"], (2, 32, 96))
  chex.assert_trees_all_equal(unstack_blocks(stacked), params)

  def run(model, p):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(p)

  ref_value, ref_grads = run(loop, params)
  value, grads = run(create_model("vit_tiny", scan=True, remat=True), stacked)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  chex.assert_trees_all_close(unstack_blocks(grads), ref_grads, atol=1e-5, rtol=1e-4)
  value, grads = run(create_model("vit_tiny", remat=True), params)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_explicit_attention_maps_per_block_and_head(tiny):
  x = _images(2, seed=2)
  fused, variables = tiny
  explicit = create_model("vit_tiny", attention_impl="explicit")
  out, state = explicit.apply(variables, x, mutable=["intermediates"])
  np.testing.assert_allclose(out, fused.apply(variables, x), atol=1e-5, rtol=1e-5)
  maps = attention_maps(state["intermediates"])
  assert len(maps) == 2
  for m in maps:
    chex.assert_shape(m, (2, 2, 17, 17))  # batch, heads, 1 + 4*4 tokens
    np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="explicit"):
    attention_maps(fused.apply(variables, x, mutable=["intermediates"])[1]["intermediates"])


def test_built_at_224_loaded_at_384_runs():
  small = create_model("vit_tiny", image_size=224)
  params = _random_params(small, (1, 224, 224, 3))
  large = create_model("vit_tiny", image_size=384)
  assert load_at_image_size(params, small)["pos_embed"] is params["pos_embed"]
  resized = load_at_image_size(params, large, method="bicubic")
  chex.assert_shape(resized["pos_embed"], (1, 1 + 48 * 48, 32))
  out = jax.jit(large.apply)({"params": resized}, jnp.ones((1, 384, 384, 3)))
  chex.assert_shape(out, (1, 10))
  assert np.all(np.isfinite(out))


def test_vit_b16_at_384_from_224_weights_shapes():
  model_224, _, variables = _abstract("vit_b16")
  model_384 = create_model("vit_b16", image_size=384)
  x = jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32)
  out = jax.eval_shape(
      lambda p, x: model_384.apply({"params": load_at_image_size(p, model_384)}, x),
      variables["params"], x)
  chex.assert_shape(out, (1, 1000))
  del model_224


def test_train_mode_needs_a_dropout_rng_only_with_dropout():
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  for kwargs in [dict(scan=True), dict()]:
    model, _, variables = _abstract("vit_tiny", **kwargs)
    out = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=True), variables, x)
    chex.assert_shape(out, (2, 10))
  model, _, variables = _abstract("vit_tiny", scan=True, drop_path=0.1)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)
  rngs = {"dropout": jax.random.key(0)}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x)
  chex.assert_shape(out, (2, 10))


def test_tokens_mode_returns_every_token_and_resamples_posemb_at_other_sizes():
  model = create_model("vit_tiny")  # 32 px: 4x4 grid, class token first
  large = create_model("vit_tiny", image_size=48)
  params = _random_params(model, (2, 32, 32, 3), seed=3)
  x, x48 = _images(2, seed=3), _images(2, size=48, seed=4)

  @jax.jit
  def run(p):
    return (model.apply({"params": p}, x), model.apply({"params": p}, x, tokens=True),
            model.apply({"params": p}, x48, tokens=True),
            large.apply({"params": load_at_image_size(p, large)}, x48, tokens=True))

  logits, tokens, tokens48, reference48 = run(params)
  chex.assert_shape(tokens, (2, 1 + 16, 32))
  head = params["head"]
  np.testing.assert_allclose(tokens[:, 0] @ head["kernel"] + head["bias"], logits, atol=1e-4,
                             rtol=1e-4)
  # At 48 px the 4x4 embedding is resampled to 6x6, as load_at_image_size would store it.
  chex.assert_shape(tokens48, (2, 1 + 36, 32))
  np.testing.assert_allclose(tokens48, reference48, atol=1e-5, rtol=1e-5)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x48, tokens=True))["params"]
  assert "head" not in abstract and abstract["pos_embed"].shape == (1, 17, 32)
  with pytest.raises(ValueError, match="image_size=32"):
    model.apply({"params": params}, x48)  # logits still need the size the model was built for
  with pytest.raises(ValueError, match="patch_size=8"):
    model.apply({"params": params}, _images(1, size=44), tokens=True)
