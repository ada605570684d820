"""ViT conversion: timm key names and layouts, exact round trips, the strict key check, scan
layout and resolution change, and numerics against independent references written from the
timm and vit_jax/big_vision architectures (numpy; torch's functional ops when torch is present).
"""

import chex
import jax
import numpy as np
import pytest
from scipy.special import erf

from jaxvision.convert.timm_vit import expected_params, from_torch, to_torch, unflatten
from jaxvision.convert.vit_npz import from_vit_npz
from jaxvision.models import create_model

D, HEADS, MLP, PATCH, IMAGE, CLASSES = 32, 2, 64, 8, 32, 10  # vit_tiny


def _random_params(model, seed=0):
  rng = np.random.default_rng(seed)
  flat = {p: rng.normal(0, 0.3, s).astype(np.float32) for p, s in expected_params(model).items()}
  return unflatten(flat)


def _images(n=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


# --- numpy references -----------------------------------------------------------------------------


def _ln(x, w, b):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * w + b


def _gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _attend(q, k, v):  # (B, H, N, d) each
  s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  s = np.exp(s - s.max(-1, keepdims=True))
  return (s / s.sum(-1, keepdims=True)) @ v


def _heads(t):  # (B, N, D) -> (B, H, N, d)
  b, n, _ = t.shape
  return t.reshape(b, n, HEADS, -1).transpose(0, 2, 1, 3)


def _merge(t):  # (B, H, N, d) -> (B, N, D)
  b, _, n, _ = t.shape
  return t.transpose(0, 2, 1, 3).reshape(b, n, -1)


def _timm_forward(sd, x, depth=2, global_pool="token"):
  """timm VisionTransformer.forward (eval) from a state dict, NCHW conv semantics in numpy."""
  lin = lambda t, name: t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
  b = x.shape[0]
  img = x.transpose(0, 3, 1, 2)  # NCHW, as torch sees it
  g = IMAGE // PATCH
  patches = img.reshape(b, 3, g, PATCH, g, PATCH)
  t = np.einsum("bcipjq,dcpq->bijd", patches, sd["patch_embed.proj.weight"]).reshape(b, g * g, D)
  t = t + sd["patch_embed.proj.bias"]
  if "cls_token" in sd:
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, D)), t], 1)
  t = t + sd["pos_embed"]
  for i in range(depth):
    p = f"blocks.{i}"
    ls = lambda y, n, p=p: y * sd[f"{p}.{n}.gamma"] if f"{p}.{n}.gamma" in sd else y
    y = lin(_ln(t, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"]), f"{p}.attn.qkv")
    q, k, v = y.reshape(b, -1, 3, HEADS, D // HEADS).transpose(2, 0, 3, 1, 4)
    t = t + ls(lin(_merge(_attend(q, k, v)), f"{p}.attn.proj"), "ls1")
    y = _ln(t, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"])
    t = t + ls(lin(_gelu(lin(y, f"{p}.mlp.fc1")), f"{p}.mlp.fc2"), "ls2")
  if "norm.weight" in sd:  # timm's fc_norm models normalise after the pooling instead
    t = _ln(t, sd["norm.weight"], sd["norm.bias"])
  if "attn_pool.latent" in sd:  # timm AttentionPoolLatent
    q = _heads(lin(np.broadcast_to(sd["attn_pool.latent"], (b, 1, D)), "attn_pool.q"))
    k, v = lin(t, "attn_pool.kv").reshape(b, -1, 2, HEADS, D // HEADS).transpose(2, 0, 3, 1, 4)
    y = lin(_merge(_attend(q, k, v)), "attn_pool.proj")
    y = y + lin(_gelu(lin(_ln(y, sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"]),
                          "attn_pool.mlp.fc1")), "attn_pool.mlp.fc2")
    pooled = y[:, 0]
  elif "fc_norm.weight" in sd or global_pool == "avg":
    pooled = t[:, 1 if "cls_token" in sd else 0:].mean(1)
    if "fc_norm.weight" in sd:
      pooled = _ln(pooled, sd["fc_norm.weight"], sd["fc_norm.bias"])
  else:
    pooled = t[:, 0] if "cls_token" in sd else t.mean(1)
  return lin(pooled, "head")


def _mhdpa(npz, prefix, xq, xkv):
  """flax MultiHeadDotProductAttention with DenseGeneral (D, heads, d) kernels."""
  proj = lambda t, n: np.einsum("bnd,dhk->bhnk", t, npz[f"{prefix}/{n}/kernel"]) + \
      npz[f"{prefix}/{n}/bias"][:, None]
  o = _attend(proj(xq, "query"), proj(xkv, "key"), proj(xkv, "value"))
  return np.einsum("bhnk,hkd->bnd", o, npz[f"{prefix}/out/kernel"]) + npz[f"{prefix}/out/bias"]


def _npz_forward(npz, x, depth=2, style="vit_jax"):
  """The official ViT forward (eval) from `.npz` names: vit_jax or big_vision (with MAP)."""
  ln0, mha, ln1, mlp = (("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                         "MlpBlock_3") if style == "vit_jax" else
                        ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                         "MlpBlock_0"))
  ln = lambda t, n: _ln(t, npz[f"{n}/scale"], npz[f"{n}/bias"])
  dense = lambda t, n: t @ npz[f"{n}/kernel"] + npz[f"{n}/bias"]
  b, g = x.shape[0], IMAGE // PATCH
  t = np.einsum("bipjqc,pqcd->bijd", x.reshape(b, g, PATCH, g, PATCH, 3), npz["embedding/kernel"])
  t = t.reshape(b, g * g, D) + npz["embedding/bias"]
  if "cls" in npz:
    t = np.concatenate([np.broadcast_to(npz["cls"], (b, 1, D)), t], 1)
  t = t + npz.get("Transformer/posembed_input/pos_embedding", npz.get("pos_embedding"))
  for i in range(depth):
    blk = f"Transformer/encoderblock_{i}"
    y = ln(t, f"{blk}/{ln0}")
    t = t + _mhdpa(npz, f"{blk}/{mha}", y, y)
    y = ln(t, f"{blk}/{ln1}")
    t = t + dense(_gelu(dense(y, f"{blk}/{mlp}/Dense_0")), f"{blk}/{mlp}/Dense_1")
  t = ln(t, "Transformer/encoder_norm")
  if "MAPHead_0/probe" in npz:
    y = _mhdpa(npz, "MAPHead_0/MultiHeadDotProductAttention_0",
               np.broadcast_to(npz["MAPHead_0/probe"], (b, 1, D)), t)
    y = y + dense(_gelu(dense(ln(y, "MAPHead_0/LayerNorm_0"), "MAPHead_0/MlpBlock_0/Dense_0")),
                  "MAPHead_0/MlpBlock_0/Dense_1")
    pooled = y[:, 0]
  else:
    pooled = t[:, 0]
  return dense(pooled, "head")


def _random_npz(style="vit_jax", depth=2, seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  dh = D // HEADS
  mha = lambda p: {**{f"{p}/{n}/kernel": r(D, HEADS, dh) for n in ("query", "key", "value")},
                   **{f"{p}/{n}/bias": r(HEADS, dh) for n in ("query", "key", "value")},
                   f"{p}/out/kernel": r(HEADS, dh, D), f"{p}/out/bias": r(D)}
  ln = lambda p: {f"{p}/scale": 1 + r(D), f"{p}/bias": r(D)}
  mlp = lambda p: {f"{p}/Dense_0/kernel": r(D, MLP), f"{p}/Dense_0/bias": r(MLP),
                   f"{p}/Dense_1/kernel": r(MLP, D), f"{p}/Dense_1/bias": r(D)}
  names = (("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
           if style == "vit_jax" else
           ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
  n_tokens = (IMAGE // PATCH) ** 2
  npz = {"embedding/kernel": r(PATCH, PATCH, 3, D), "embedding/bias": r(D),
         **ln("Transformer/encoder_norm"), "head/kernel": r(D, CLASSES), "head/bias": r(CLASSES)}
  if style == "vit_jax":
    npz.update({"cls": r(1, 1, D),
                "Transformer/posembed_input/pos_embedding": r(1, 1 + n_tokens, D)})
  else:
    npz.update({"pos_embedding": r(1, n_tokens, D), "MAPHead_0/probe": r(1, 1, D),
                **mha("MAPHead_0/MultiHeadDotProductAttention_0"), **ln("MAPHead_0/LayerNorm_0"),
                **mlp("MAPHead_0/MlpBlock_0")})
  for i in range(depth):
    blk = f"Transformer/encoderblock_{i}"
    npz.update({**ln(f"{blk}/{names[0]}"), **mha(f"{blk}/{names[1]}"), **ln(f"{blk}/{names[2]}"),
                **mlp(f"{blk}/{names[3]}")})
  return npz


# --- timm ---------------------------------------------------------------------------------------


def test_to_torch_uses_timm_names_and_layouts():
  model = create_model("vit_tiny")
  sd = to_torch("vit_tiny", {"params": _random_params(model)})
  block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
           "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
           "mlp.fc2.weight", "mlp.fc2.bias"]
  expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "norm.weight", "norm.bias", "head.weight", "head.bias"]
  expected += [f"blocks.{i}.{k}" for i in range(2) for k in block]
  assert sorted(sd) == sorted(expected)
  assert sd["patch_embed.proj.weight"].shape == (D, 3, PATCH, PATCH)
  assert sd["blocks.1.attn.qkv.weight"].shape == (3 * D, D)
  assert sd["blocks.0.mlp.fc1.weight"].shape == (MLP, D)
  assert sd["pos_embed"].shape == (1, 17, D) and sd["head.weight"].shape == (CLASSES, D)


@pytest.mark.parametrize("kwargs", [{}, dict(pool="gap", layer_scale=0.1),
                                    dict(pool="map", num_classes=0)])
def test_timm_round_trip_is_exact(kwargs):
  model = create_model("vit_tiny", **kwargs)
  params = _random_params(model)
  sd = to_torch("vit_tiny", {"params": params})
  back = from_torch("vit_tiny", sd, **{k: v for k, v in kwargs.items() if k != "num_classes"})
  chex.assert_trees_all_equal(back["params"], params)


def test_strict_key_check_names_missing_unexpected_and_wrong_shapes():
  sd = to_torch("vit_tiny", {"params": _random_params(create_model("vit_tiny"))})
  del sd["blocks.1.norm2.bias"]
  sd["blocks.0.attn.q_bias"] = np.zeros(D, np.float32)
  sd["blocks.0.mlp.fc2.bias"] = np.zeros(D + 1, np.float32)
  with pytest.raises(ValueError) as err:
    from_torch("vit_tiny", sd)
  msg = str(err.value)
  assert "blocks.1.norm2.bias" in msg and "blocks.0.attn.q_bias" in msg
  assert "blocks.0.mlp.fc2.bias (33,)" in msg


def test_scan_layout_and_resolution_change():
  model = create_model("vit_tiny")
  params = _random_params(model)
  sd = to_torch("vit_tiny", {"params": params})
  scanned = from_torch("vit_tiny", sd, scan=True)["params"]
  chex.assert_shape(scanned["blocks"]["mlp"]["fc1"]["kernel"], (2, D, MLP))
  assert to_torch("vit_tiny", {"params": scanned}).keys() == sd.keys()
  chex.assert_trees_all_equal(to_torch("vit_tiny", scanned), sd)  # params alone are accepted
  at_64 = from_torch("vit_tiny", sd, image_size=64)["params"]
  chex.assert_shape(at_64["pos_embed"], (1, 1 + 8 * 8, D))
  np.testing.assert_array_equal(at_64["pos_embed"][:, 0], params["pos_embed"][:, 0])


@pytest.fixture(scope="module")
def timm_case():
  """vit_tiny with layer-scale: random weights, the timm state dict and our logits."""
  model = create_model("vit_tiny", layer_scale=0.5)
  params = _random_params(model, seed=1)
  x = _images()
  logits = np.asarray(jax.jit(model.apply)({"params": params}, x))
  return to_torch("vit_tiny", {"params": params}), x, logits


def test_matches_timm_reference_forward(timm_case):
  sd, x, logits = timm_case
  np.testing.assert_allclose(logits, _timm_forward(sd, x), rtol=1e-4, atol=1e-4)


def test_map_pool_matches_timm_reference_forward():
  model = create_model("vit_tiny", pool="map")
  params = _random_params(model, seed=2)
  x = _images(seed=3)
  logits = jax.jit(model.apply)({"params": params}, x)
  sd = to_torch("vit_tiny", {"params": params})
  np.testing.assert_allclose(logits, _timm_forward(sd, x), rtol=1e-4, atol=1e-4)


def test_matches_torch_functional_forward(timm_case):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  sd, x, logits = timm_case
  w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  lin = lambda t, n: F.linear(t, w[f"{n}.weight"], w[f"{n}.bias"])
  norm = lambda t, n: F.layer_norm(t, (D,), w[f"{n}.weight"], w[f"{n}.bias"], eps=1e-6)
  t = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), w["patch_embed.proj.weight"],
               w["patch_embed.proj.bias"], stride=PATCH)
  t = t.flatten(2).transpose(1, 2)
  t = torch.cat([w["cls_token"].expand(2, -1, -1), t], 1) + w["pos_embed"]
  for i in range(2):
    p = f"blocks.{i}"
    q, k, v = lin(norm(t, f"{p}.norm1"), f"{p}.attn.qkv").reshape(2, -1, 3, HEADS, D // HEADS) \
        .permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, -1, D)
    t = t + w[f"{p}.ls1.gamma"] * lin(y, f"{p}.attn.proj")
    y = lin(F.gelu(lin(norm(t, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    t = t + w[f"{p}.ls2.gamma"] * y
  out = lin(norm(t, "norm")[:, 0], "head")
  np.testing.assert_allclose(logits, out.numpy(), rtol=1e-4, atol=1e-4)


# --- official .npz ------------------------------------------------------------------------------


def test_vit_jax_npz_matches_its_reference_forward():
  npz = _random_npz("vit_jax")
  params = from_vit_npz("vit_tiny", npz)["params"]
  assert "cls_token" in params and "attn_pool" not in params
  sd = to_torch("vit_tiny", params)
  x = _images(seed=4)
  # npz semantics == timm semantics of the converted weights (numpy); timm == jaxvision above.
  np.testing.assert_allclose(_timm_forward(sd, x), _npz_forward(npz, x), rtol=1e-4, atol=1e-4)


def test_big_vision_map_npz_scanned_or_not_matches_its_reference_forward():
  npz = _random_npz("big_vision", seed=5)
  params = from_vit_npz("vit_tiny", npz)["params"]
  assert "attn_pool" in params and "cls_token" not in params
  x = _images(seed=6)
  np.testing.assert_allclose(_timm_forward(to_torch("vit_tiny", params), x),
                             _npz_forward(npz, x, style="big_vision"), rtol=1e-4, atol=1e-4)
  # The scanned layout: one encoderblock with a leading depth axis, under a 'params/' prefix.
  blocks = [k for k in npz if k.startswith("Transformer/encoderblock_0/")]
  scanned = {f"params/{k}": v for k, v in npz.items()
             if not k.startswith("Transformer/encoderblock_")}
  for k in blocks:
    rest = k.removeprefix("Transformer/encoderblock_0/")
    scanned[f"params/Transformer/encoderblock/{rest}"] = np.stack(
        [npz[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
  chex.assert_trees_all_equal(from_vit_npz("vit_tiny", scanned)["params"], params)
  model = create_model("vit_tiny", pool="map", scan=True)
  stacked = from_vit_npz(model, scanned)["params"]
  chex.assert_shape(stacked["blocks"]["attn"]["qkv"]["kernel"], (2, D, 3 * D))


def test_npz_strict_check_and_resolution_change():
  npz = _random_npz("vit_jax")
  with pytest.raises(ValueError, match="pre_logits/kernel"):
    from_vit_npz("vit_tiny", {**npz, "pre_logits/kernel": np.zeros((D, D), np.float32)})
  broken = dict(npz)
  del broken["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
  with pytest.raises(ValueError, match="blocks_1/mlp/fc1/bias"):
    from_vit_npz("vit_tiny", broken)
  at_48 = from_vit_npz(create_model("vit_tiny", image_size=48), npz)["params"]
  chex.assert_shape(at_48["pos_embed"], (1, 1 + 6 * 6, D))
  assert from_vit_npz("vit_tiny", npz, num_classes=CLASSES)["params"]["head"]["kernel"].shape == \
      (D, CLASSES)


@pytest.mark.parametrize("class_token", [False, True])
def test_fc_norm_pooling_matches_timm_reference_forward(class_token):
  model = create_model("vit_tiny", pool="gap", fc_norm=True, class_token=class_token)
  params = _random_params(model, seed=7)
  assert "fc_norm" in params and "norm" not in params
  x = _images(seed=8)
  sd = to_torch("vit_tiny", {"params": params})
  assert "fc_norm.weight" in sd and ("cls_token" in sd) == class_token
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x), _timm_forward(sd, x),
                             rtol=1e-4, atol=1e-4)
  # The pooling, class token and fc_norm are read from the keys alone.
  chex.assert_trees_all_equal(from_torch("vit_tiny", sd)["params"], params)


def test_pool_layer_scale_and_qkv_bias_are_read_from_the_keys():
  from jaxvision.convert.timm_vit import infer_kwargs

  for kwargs in (dict(pool="map"), dict(pool="gap"), dict(layer_scale=0.1, qkv_bias=False)):
    model = create_model("vit_tiny", **kwargs)
    params = _random_params(model, seed=9)
    sd = to_torch("vit_tiny", {"params": params})
    inferred = infer_kwargs(sd, {})
    assert all(bool(inferred.get(k)) == bool(v) for k, v in kwargs.items()), (kwargs, inferred)
    chex.assert_trees_all_equal(from_torch("vit_tiny", sd)["params"], params)
  # A class token with mean pooling (timm's global_pool='avg', no fc_norm) needs pool='gap'.
  model = create_model("vit_tiny", pool="gap", class_token=True)
  params = _random_params(model, seed=10)
  sd = to_torch("vit_tiny", {"params": params})
  x = _images(seed=11)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x),
                             _timm_forward(sd, x, global_pool="avg"), rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_equal(from_torch("vit_tiny", sd, pool="gap")["params"], params)


def test_fc_norm_needs_mean_pooling():
  with pytest.raises(ValueError, match="fc_norm=True needs pool='gap'"):
    create_model("vit_tiny", fc_norm=True).init(jax.random.key(0), _images(1))
  with pytest.raises(ValueError, match="class_token=False contradicts it"):
    create_model("vit_tiny", class_token=False).init(jax.random.key(0), _images(1))


def test_dispatcher_from_vit_npz_takes_model_kwargs():
  from jaxvision import convert

  npz = _random_npz("vit_jax")
  at_48 = convert.from_vit_npz("vit_tiny", npz, image_size=48)["params"]
  chex.assert_shape(at_48["pos_embed"], (1, 1 + 6 * 6, D))


def test_dispatcher_routes_vit_names():
  from jaxvision import convert

  model = create_model("vit_tiny")
  params = _random_params(model)
  sd = convert.to_torch("vit_tiny", {"params": params})
  chex.assert_trees_all_equal(convert.from_torch("vit_tiny", sd)["params"], params)
