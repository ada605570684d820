"""Segmenter: pinned counts and shapes of every variant, decoder parameter counts by hand, both
decoders against a numpy reference, real forward/backward, other input sizes, sliding-window
inference, ViT weights into the encoder, and the mask transformer's per-class maps."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from jaxvision.interpret import mask_attention
from jaxvision.layers.embed import resample_posemb
from jaxvision.layers.transformer import EncoderBlock
from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.segmenter import jit_forward, predict_sliding, segmenter_from_vit
from jaxvision.models.vit import SIZES
from train import transfer
from train.state import TrainState

# 512 px, 150 classes (ADE20K, the paper's benchmark): params only.
PINNED = {
    "segmenter_linear_ti16": 5_712_342,
    "segmenter_linear_ti8": 6_191_574,
    "segmenter_linear_s16": 22_041_366,
    "segmenter_linear_s8": 22_999_830,
    "segmenter_linear_b16": 86_549_910,
    "segmenter_linear_b8": 88_466_838,
    "segmenter_mask_ti16": 6_713_388,
    "segmenter_mask_ti8": 7_192_620,
    "segmenter_mask_s16": 26_033_964,
    "segmenter_mask_s8": 26_992_428,
    "segmenter_mask_b16": 102_497_580,
    "segmenter_mask_b8": 104_414_508,
    "segmenter_linear_tiny": 24_003,
    "segmenter_mask_tiny": 52_582,
}
VARIANTS = list_models("segmenter_*")
# LLVM's cheap settings for the tests' own compiles: on a small CPU compiling is nearly all the
# time these tests take (the numbers do not change). XLA's RngBitGenerator key for dropout
# compiles faster than threefry's.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DROPOUT_KEY = jax.random.key(3, impl="rbg")


def _run(fn, *args):
  """fn(*args) compiled with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _abstract(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)


def _random_params(model, shape, seed=0):
  """Random parameters in the model's shapes, without compiling `init` (slow on a small CPU)."""
  abstract = _abstract(model, shape)[1]["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), abstract)


def _images(n, h, w, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)), jnp.float32)


def encoder_count(width: int, depth: int, patch: int, grid_tokens: int) -> int:
  """The ViT encoder without a head, MLP 4 * width, RGB input."""
  d = width
  return (patch * patch * 3 * d + d  # patch_embed: a patch x patch x 3 -> d convolution
          + d  # cls_token
          + (1 + grid_tokens) * d  # pos_embed: class token and every patch
          + depth * (12 * d * d + 13 * d)  # blocks, as in mask_decoder_count
          + 2 * d)  # the final norm


def linear_decoder_count(width: int, k: int) -> int:
  """The linear decoder: one (width, K) kernel and K biases."""
  return width * k + k


def mask_decoder_count(width: int, k: int, layers: int) -> int:
  """The mask transformer at decoder width d = encoder width, MLP 4d."""
  d, mlp = width, 4 * width
  block = (2 * d  # norm1 scale and bias
           + d * 3 * d + 3 * d  # qkv kernel and bias
           + d * d + d  # attention output projection
           + 2 * d  # norm2
           + d * mlp + mlp  # fc1
           + mlp * d + d)  # fc2
  return (width * d + d  # proj_dec: encoder tokens -> decoder width
          + k * d  # cls_emb: one embedding per class
          + layers * block
          + 2 * d  # decoder_norm
          + 2 * d * d  # proj_patch and proj_classes (no bias)
          + 2 * k)  # mask_norm: a LayerNorm over the K classes


def test_every_variant_has_a_pinned_count():
  assert set(VARIANTS) == set(PINNED), "pin the parameter count of every registered Segmenter"


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_parameter_count_output_shape_and_decoder_by_hand(name):
  info = model_info(name)
  model = create_model(name)
  logits, variables = _abstract(model, (2, *info.input_shape))
  params = variables["params"]
  chex.assert_shape(logits, (2, *info.input_shape[:2], info.num_classes))
  assert _count(params) == PINNED[name]
  k, d = info.num_classes, model.width
  if model.decoder == "linear":
    decoder = linear_decoder_count(d, k)
  else:
    decoder = mask_decoder_count(d, k, model.decoder_layers)
  assert _count(params["decoder"]) == decoder
  if not name.endswith("_tiny"):
    size = {"ti": "Ti", "s": "S", "b": "B"}[name.split("_")[-1].rstrip("0123456789")]
    assert (model.width, model.depth, model.num_heads, model.mlp_dim) == SIZES[size]
    assert model.mlp_dim == 4 * d
  rows, cols = model.grid
  encoder = encoder_count(d, model.depth, model.patch_size, rows * cols)
  if name.endswith("_tiny"):  # MLP 2d, not 4d: fc1 and fc2 lose 2 * (2d * d) weights, 2d biases
    encoder -= model.depth * (4 * d * d + 2 * d)
  assert _count(params) - _count(params["decoder"]) == encoder
  assert PINNED[name] == encoder + decoder


def test_hand_count_arithmetic_for_seg_b16_mask():
  # Seg-B/16 mask transformer, 150 classes, written out: proj_dec 768*768+768, cls_emb 150*768,
  # 2 blocks of 12*768^2 + 13*768, decoder_norm 2*768, proj_patch/classes 2*768^2, mask_norm 300.
  expected = (589_824 + 768) + 115_200 + 2 * (7_077_888 + 9_984) + 1_536 + 1_179_648 + 300
  assert mask_decoder_count(768, 150, 2) == expected == 16_063_020
  assert linear_decoder_count(768, 150) == 115_350


def test_dtype_policy_bad_options_and_names():
  logits, variables = _abstract(create_model("segmenter_mask_tiny", dtype=jnp.bfloat16),
                                (1, 32, 32, 3))
  assert logits.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  params = variables["params"]
  assert set(params) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1", "norm",
                         "decoder"}
  assert set(params["decoder"]) == {"proj_dec", "cls_emb", "blocks_0", "blocks_1",
                                    "decoder_norm", "proj_patch", "proj_classes", "mask_norm"}
  chex.assert_shape(params["decoder"]["cls_emb"], (1, 3, 32))
  scanned = _abstract(create_model("segmenter_linear_tiny", scan=True), (1, 32, 32, 3))[1]
  assert set(scanned["params"]) == {"patch_embed", "cls_token", "pos_embed", "blocks", "norm",
                                    "decoder"}
  for kwargs, shape, match in [
      (dict(decoder="conv"), (1, 32, 32, 3), "decoder='conv'"),
      (dict(), (32, 32, 3), "NHWC"),
      (dict(image_size=30), (1, 32, 32, 3), "patch_size=8"),
      (dict(num_heads=3), (1, 32, 32, 3), "num_heads=3"),
  ]:
    with pytest.raises(ValueError, match=match):
      _abstract(create_model("segmenter_mask_tiny", **kwargs), shape)


# --- Real compute on the tiny variants -----------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """torch F.interpolate(mode='bilinear', align_corners=False) along one axis, as a matrix."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  lo = np.floor(src).astype(int)
  hi, frac = np.minimum(lo + 1, n_in - 1), src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_both_decoders_match_a_numpy_reference_on_a_padded_input():
  # 30x37 is padded to 32x40 (a 4x5 patch grid); the upsampled logits are cropped back.
  x = _images(2, 30, 37, seed=1)
  linear, mask = create_model("segmenter_linear_tiny"), create_model("segmenter_mask_tiny")
  p_lin, p_mask = _random_params(linear, (1, 32, 32, 3), 1), _random_params(mask, (1, 32, 32, 3), 2)

  def run(p_lin, p_mask):
    out_lin, s_lin = linear.apply({"params": p_lin}, x, mutable=["intermediates"])
    out_mask, s_mask = mask.apply({"params": p_mask}, x, mutable=["intermediates"])
    return out_lin, s_lin["intermediates"], out_mask, s_mask["intermediates"]

  out_lin, s_lin, out_mask, s_mask = jax.tree.map(np.asarray, _run(run, p_lin, p_mask))
  chex.assert_shape([out_lin, out_mask], (2, 30, 37, 3))
  up_h, up_w = _bilinear_matrix(4, 32)[:30], _bilinear_matrix(5, 40)[:37]

  def upsample(grid_logits):
    return np.einsum("Hh,Ww,bhwk->bHWk", up_h, up_w, grid_logits)

  # Linear: the class token dropped, one linear layer per patch token, upsampled.
  head = p_lin["decoder"]["head"]
  per_patch = s_lin["encoded"][0][:, 1:] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(out_lin, upsample(per_patch.reshape(2, 4, 5, 3)), atol=1e-4)

  # Mask transformer: proj_dec, class embeddings appended after the 20 patches, two blocks...
  dec = p_mask["decoder"]
  tokens = s_mask["encoded"][0][:, 1:]
  seq = tokens @ np.asarray(dec["proj_dec"]["kernel"]) + np.asarray(dec["proj_dec"]["bias"])
  seq = np.concatenate([seq, np.broadcast_to(np.asarray(dec["cls_emb"]), (2, 3, 32))], 1)
  block = EncoderBlock(num_heads=2, mlp_dim=128, ln_epsilon=1e-5)
  seq = _run(lambda s, p0, p1: block.apply({"params": p1}, block.apply({"params": p0}, s)), seq,
             dec["blocks_0"], dec["blocks_1"])
  np.testing.assert_allclose(seq, s_mask["decoder"]["blocks_1"]["out"][0], atol=1e-4)
  # ... decoder_norm, projections, L2 norms, scalar products, mask norm over the classes.
  seq = _layer_norm(np.asarray(seq, np.float64), dec["decoder_norm"], 1e-5)
  patches = seq[:, :20] @ np.asarray(dec["proj_patch"])
  classes = seq[:, 20:] @ np.asarray(dec["proj_classes"])
  patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
  classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
  masks = np.einsum("bnd,bkd->bnk", patches, classes)
  np.testing.assert_allclose(s_mask["decoder"]["masks"][0], masks.reshape(2, 4, 5, 3), atol=1e-4)
  logits = _layer_norm(masks, dec["mask_norm"], 1e-5).reshape(2, 4, 5, 3)
  np.testing.assert_allclose(out_mask, upsample(logits), atol=1e-4)


@pytest.mark.slow  # dropout everywhere: the slowest compile of this file
def test_tiny_forward_backward_finite_nonzero_grads_with_dropout():
  # Dropout and stochastic depth on (attention dropout in the decoder; the ViT tests cover the
  # encoder's); the mask model with one block in the encoder and one in the decoder, as each
  # block with dropout adds seconds to the compile on a small CPU.
  dropout = dict(dropout=0.1, drop_path=0.1)
  models = [create_model("segmenter_linear_tiny", **dropout),
            create_model("segmenter_mask_tiny", depth=1, decoder_layers=1, decoder_dropout=0.1,
                         decoder_drop_path=0.1, **dropout)]
  x = _images(4, 32, 32, seed=2)
  labels = (x[..., 0] > 0).astype(jnp.int32) + (x[..., 1] > 1).astype(jnp.int32)
  params = [_random_params(m, x.shape, seed=i) for i, m in enumerate(models)]

  def loss(p, model):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": DROPOUT_KEY})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

  results = _run(lambda ps: [jax.value_and_grad(loss)(p, m)
                             for p, m in zip(ps, models, strict=True)], params)
  for (value, grads), model in zip(results, models, strict=True):
    assert np.isfinite(value), model.decoder
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      name = f"{model.decoder}: {jax.tree_util.keystr(path)}"
      assert np.all(np.isfinite(g)), name
      assert np.any(g != 0), f"zero gradient at {name}"


def test_other_input_sizes_resample_the_posemb_and_pad_with_zeros():
  model = create_model("segmenter_linear_tiny")  # built for 32x32: a 4x4 position embedding
  built = create_model("segmenter_linear_tiny", image_size=(48, 40))
  params = _random_params(model, (1, 32, 32, 3), seed=4)
  resampled = {**params, "pos_embed": resample_posemb(params["pos_embed"], (6, 5))}
  x = _images(2, 48, 40, seed=5).at[:, 45:].set(0.0).at[:, :, 37:].set(0.0)

  def run(params, resampled):
    return (model.apply({"params": params}, x), built.apply({"params": resampled}, x),
            model.apply({"params": params}, x[:, :45, :37]))

  at_48x40, reference, cropped = _run(run, params, resampled)
  # Documented behaviour: at another size the learned embedding is resampled bilinearly, which
  # is the model built at that size holding the resampled embedding.
  chex.assert_shape(at_48x40, (2, 48, 40, 3))
  np.testing.assert_allclose(at_48x40, reference, atol=1e-5, rtol=1e-5)
  # 45x37 is padded with zeros to 48x40 at the bottom/right, and the logits are cropped.
  chex.assert_shape(cropped, (2, 45, 37, 3))
  np.testing.assert_allclose(cropped, at_48x40[:, :45, :37], atol=1e-5, rtol=1e-5)


def test_sliding_window_prediction_is_the_windows_stitched():
  model = create_model("segmenter_linear_tiny")  # windows of its image_size, 32x32
  variables = {"params": _random_params(model, (1, 32, 32, 3), seed=6)}
  forward = jit_forward(model)
  # Margin 0: the windows are the image's four 32x32 crops.
  image = np.asarray(_images(1, 64, 64, seed=7))[0]
  got = predict_sliding(model, variables, image, batch_size=4)
  crops = np.stack([image[y:y + 32, x:x + 32] for y in (0, 32) for x in (0, 32)])
  pieces = np.asarray(forward(variables, crops))
  want = np.concatenate([np.concatenate([pieces[0], pieces[1]], 1),
                         np.concatenate([pieces[2], pieces[3]], 1)], 0)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Margin 8: 16x16 tiles, each the centre of the 32x32 window around it in the image
  # mirrored by 8 pixels (edge pixel not repeated); 48x64 gives 3x4 tiles.
  image = np.asarray(_images(1, 48, 64, seed=8))[0]
  got = predict_sliding(model, variables, image, margin=8, batch_size=4)
  chex.assert_shape(got, (48, 64, 3))
  mirrored = np.pad(image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
  windows = np.stack([mirrored[16 * i:16 * i + 32, 16 * j:16 * j + 32]
                      for i in range(3) for j in range(4)])
  pieces = np.concatenate([np.asarray(forward(variables, windows[s:s + 4]))
                           for s in range(0, 12, 4)])
  want = np.zeros((48, 64, 3), np.float32)
  for n, (i, j) in enumerate((i, j) for i in range(3) for j in range(4)):
    want[16 * i:16 * i + 16, 16 * j:16 * j + 16] = pieces[n, 8:24, 8:24]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A model built with eval_margin=8 does the same inside its own (jitted) eval call.
  inside = create_model("segmenter_linear_tiny", eval_margin=8)
  np.testing.assert_allclose(_run(lambda v, x: inside.apply(v, x), variables, image[None])[0],
                             want, atol=1e-5)
  with pytest.raises(ValueError, match="margin=16"):
    predict_sliding(model, variables, image, margin=16)
  with pytest.raises(ValueError, match="eval_margin=16"):
    _abstract(create_model("segmenter_linear_tiny", eval_margin=16), (1, 32, 32, 3))


# --- ViT weights into the encoder ----------------------------------------------------------------


def _random_vit_params(seed=0):
  vit_model = create_model("vit_tiny")  # 32 px, 10-class head, loop layout
  abstract = jax.eval_shape(vit_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract["params"])


def test_segmenter_from_vit_fills_the_encoder_and_keeps_the_decoder():
  vit_params = _random_vit_params(0)
  model = create_model("segmenter_mask_tiny", image_size=48, scan=True)  # 6x6 grid, scan layout
  params = _random_params(model, (1, 48, 48, 3), seed=1)
  loaded = segmenter_from_vit(model, {"params": vit_params}, params)
  assert "head" not in loaded
  chex.assert_trees_all_equal(loaded["decoder"], params["decoder"])
  np.testing.assert_array_equal(loaded["blocks"]["attn"]["qkv"]["kernel"][1],
                                vit_params["blocks_1"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(loaded["patch_embed"]["proj"]["kernel"],
                                vit_params["patch_embed"]["proj"]["kernel"])
  chex.assert_shape(loaded["pos_embed"], (1, 1 + 36, 32))
  np.testing.assert_array_equal(loaded["pos_embed"][0, 0], vit_params["pos_embed"][0, 0])
  chex.assert_trees_all_equal_shapes(loaded, params)
  wider = create_model("segmenter_mask_tiny", width=64, num_heads=2)
  with pytest.raises(ValueError, match="do not fit the encoder"):
    segmenter_from_vit(wider, vit_params, _random_params(wider, (1, 32, 32, 3)))


def test_init_from_a_vit_npz_fills_the_encoder_and_leaves_the_decoder(tmp_path, caplog):
  # The encoder's parameters carry the ViT's names at the top level, so the trainer's
  # init_from (train.transfer) loads a ViT by path; its pos_embed is resampled to 6x6.
  vit_params = _random_vit_params(2)
  npz = transfer.export_npz(str(tmp_path / "vit.npz"), vit_params)
  config = base.get_config()
  config.model, config.image_size, config.num_classes = "segmenter_linear_tiny", 48, 3
  config.model_kwargs = {"image_size": 48}
  fresh = _random_params(create_model("segmenter_linear_tiny", image_size=48), (1, 48, 48, 3), 3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=fresh, batch_stats={}, opt_state=(),
                     ema_params={}, nonfinite_step=jnp.full((), -1), apply_fn=None, tx=None)
  caplog.set_level("WARNING", logger="train")
  loaded = transfer.initialize_from(state, npz, config).params
  np.testing.assert_array_equal(loaded["blocks_0"]["mlp"]["fc1"]["kernel"],
                                vit_params["blocks_0"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(loaded["cls_token"], vit_params["cls_token"])
  assert loaded["pos_embed"].shape == (1, 37, 32)
  np.testing.assert_array_equal(loaded["decoder"]["head"]["kernel"],
                                fresh["decoder"]["head"]["kernel"])
  assert "kept 2 as initialised: decoder/head/bias (not in init_from)" in caplog.text
  assert "unused 2: head/bias, head/kernel" in caplog.text


# --- The mask transformer's per-class maps -------------------------------------------------------


def test_class_masks_and_class_attention_maps_and_figure():
  model = create_model("segmenter_mask_tiny")
  variables = {"params": _random_params(model, (1, 32, 32, 3), seed=9)}
  images = _images(2, 32, 40, seed=10)
  masks = mask_attention.class_masks(model, variables, images)
  chex.assert_shape(masks, (2, 3, 32, 40))
  assert masks.min() >= -1.0 - 1e-5 and masks.max() <= 1.0 + 1e-5  # cosine similarities
  attention = mask_attention.class_attention(model, variables, images, layer=0)
  last = mask_attention.class_attention(model, variables, images)
  chex.assert_shape([attention, last], (2, 3, 32, 40))
  assert attention.min() >= 0 and not np.allclose(attention, last)
  # x8 bilinear upsampling keeps the mean, so on the 4x5 grid each class's attention to the 20
  # patches sums to mean * 20: positive, and at most 1 (the rest goes to the class embeddings).
  total = last.mean((2, 3)) * 20
  assert np.all(total > 0) and np.all(total <= 1.0 + 1e-5)
  fig = mask_attention.mask_attention_figure(images, masks, class_names=["a", "b", "c"],
                                             title="masks")
  assert len(fig.axes) == 2 * 4
  with pytest.raises(ValueError, match="decoder='linear'"):
    mask_attention.class_masks(create_model("segmenter_linear_tiny"), variables, images)
  with pytest.raises(ValueError, match="layer=2"):
    mask_attention.class_attention(model, variables, images, layer=2)


def test_viz_masks_draws_both_views_over_training_size_crops(tmp_path):
  import ml_collections

  from train import viz
  from train.build import Run

  model = create_model("segmenter_mask_tiny", num_classes=2, image_size=32)
  variables = {"params": _random_params(model, (1, 32, 32, 3), seed=11)}
  config = ml_collections.ConfigDict({"model": "segmenter_mask_tiny", "num_classes": 2,
                                      "data_info": {"class_names": ["membrane", "interior"]}})
  images = _images(2, 48, 40, seed=12)
  crops = viz._training_crops(images, model.image_size)
  np.testing.assert_array_equal(crops, images[:, 8:40, 4:36])  # centred 32x32 crops
  run = Run(config, model, None, variables, 0)
  paths = viz.class_mask_pictures(run, images, str(tmp_path), dpi=30)
  assert [os.path.basename(p) for p in paths] == ["masks_attention.png", "masks_similarity.png"]
  assert all(os.path.getsize(p) > 0 for p in paths)
  linear = Run(config, create_model("segmenter_linear_tiny", num_classes=2), None, variables, 0)
  with pytest.raises(ValueError, match="decoder='linear'"):
    viz.class_mask_pictures(linear, images, str(tmp_path), dpi=30)
