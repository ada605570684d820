"""Pretrained weights: one test per source kind, each through the code path a download takes
(a Hugging Face cache the test writes, read with HF_HUB_OFFLINE=1), outputs equal to the source
model's, the model fitted to what the caller asks, and one-line errors for bad files."""

import functools
import importlib.util
import json
import logging

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxvision
from conftest import small_config
from jaxvision.convert import to_torch
from jaxvision.convert.hub import is_spec, read_weights
from jaxvision.pretrained import (
  DEFAULT_WEIGHTS,
  PretrainedConfig,
  _family,
  load_pretrained,
  save_pretrained,
)
from train import loop
from train.checkpoint import restore_params

REV = "0123456789abcdef0123456789abcdef01234567"
X = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)


def _random_variables(model, seed=0, x=X):
  """Non-trivial variables (BatchNorm statistics included) of `model` for inputs like `x`."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    # 1/sqrt(fan-in) keeps the logits O(1), where float32 rounding stays far below 1e-5.
    fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 25
    return (rng.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def resnet():
  model = jaxvision.create_model("resnet_tiny")
  variables = _random_variables(model)
  return model, variables, _outputs(model, variables)


@pytest.fixture(scope="module")
def vit():
  # A class token with mean pooling: timm's `global_pool='avg'` that only config.json tells.
  model = jaxvision.create_model("vit_tiny", pool="gap", class_token=True)
  variables = _random_variables(model, seed=1)
  return model, variables, _outputs(model, variables)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """A Hugging Face cache in tmp_path, offline; returns publish(repo, state_dict, config)."""
  from huggingface_hub import constants

  cache = tmp_path / "hub"
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

  def publish(repo, state_dict, config=None, revision=REV):
    base = cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True)
    _save(state_dict, snapshot / "model.safetensors")
    if config is not None:
      (snapshot / "config.json").write_text(json.dumps(config))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    return snapshot

  return publish


def _timm_config(architecture, **pretrained_cfg):
  return {"architecture": architecture, "num_classes": 10, "num_features": 64,
          "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic",
                             "crop_pct": 0.95, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
                             **pretrained_cfg},
          "label_names": [f"n{i:04d}" for i in range(10)],
          "label_descriptions": {f"n{i:04d}": f"class {i}" for i in range(10)}}


def _save(state_dict, path):
  # safetensors writes an array's buffer as it lies in memory: transposed views must be copied.
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  # Modules hash by their fields: equal models share one compiled forward pass.
  return model.apply(variables, x)


def _outputs(model, variables):
  return np.asarray(_apply(model, variables, X))


def test_hub_timm_cnn(hub_cache, resnet):
  source, variables, expected = resnet
  hub_cache("timm/resnet_tiny.test_in1k", to_torch("resnet_tiny", variables),
            _timm_config("resnet_tiny"))
  for spec in ("hf-hub:timm/resnet_tiny.test_in1k", f"hf-hub:timm/resnet_tiny.test_in1k@{REV}"):
    model, loaded, cfg = load_pretrained("resnet_tiny", spec)
    np.testing.assert_allclose(_outputs(model, loaded), expected, atol=1e-5, rtol=0)
  assert cfg.mean == (0.4, 0.5, 0.6) and cfg.std == (0.2, 0.25, 0.3)
  assert (cfg.input_size, cfg.crop_pct, cfg.interpolation) == ((32, 32, 3), 0.95, "bicubic")
  assert cfg.class_names == tuple(f"class {i}" for i in range(10))
  assert cfg.overrides() == {"image_size": 32, "data.normalize": "(0.4,0.5,0.6),(0.2,0.25,0.3)",
                             "data.eval_crop": 0.95}
  # create_model(pretrained=...) gives the module bound to the same variables.
  bound = jaxvision.create_model("resnet_tiny", pretrained="hf-hub:timm/resnet_tiny.test_in1k")
  np.testing.assert_allclose(np.asarray(jax.jit(lambda x: bound(x))(X)), expected, atol=1e-5,
                             rtol=0)
  chex.assert_trees_all_equal(bound.unbind()[1], loaded)


def test_hub_timm_vit_pool_from_config_and_resolution(hub_cache, vit):
  source, variables, expected = vit
  hub_cache("timm/vit_tiny.test", to_torch("vit_tiny", variables),
            {**_timm_config("vit_tiny", mean=[0.5] * 3, std=[0.5] * 3), "global_pool": "avg"})
  model, loaded, cfg = load_pretrained("vit_tiny", "hf-hub:timm/vit_tiny.test")
  assert (model.pool, model.class_token, model.image_size) == ("gap", True, 32)
  np.testing.assert_allclose(_outputs(model, loaded), expected, atol=1e-5, rtol=0)
  assert cfg.normalize == "half" and cfg.num_classes == 10
  model, loaded, cfg = load_pretrained("vit_tiny", "hf-hub:timm/vit_tiny.test", image_size=48)
  assert model.image_size == 48 and cfg.input_size == (48, 48, 3)
  chex.assert_shape(loaded["params"]["pos_embed"], (1, 1 + 6 * 6, 32))


def test_other_class_count_replaces_the_head(hub_cache, resnet, caplog):
  _, variables, _ = resnet
  hub_cache("timm/resnet_tiny.test_in1k", to_torch("resnet_tiny", variables),
            _timm_config("resnet_tiny"))
  with caplog.at_level(logging.WARNING, logger="jaxvision"):
    model, loaded, cfg = load_pretrained("resnet_tiny", "hf-hub:timm/resnet_tiny.test_in1k",
                                         num_classes=3)
  assert "head replaced: 10 -> 3 classes" in caplog.text
  assert _outputs(model, loaded).shape == (2, 3) and cfg.num_classes == 3
  assert cfg.class_names == ()  # the names were the old head's
  chex.assert_trees_all_equal(loaded["params"]["layer1_0"], variables["params"]["layer1_0"])
  chex.assert_trees_all_equal(loaded["batch_stats"], variables["batch_stats"])


def test_local_safetensors_torch_layout(tmp_path, resnet):
  _, variables, expected = resnet
  path = tmp_path / "resnet.safetensors"
  _save(to_torch("resnet_tiny", variables), path)
  model, loaded, cfg = load_pretrained("resnet_tiny", str(path))
  np.testing.assert_allclose(_outputs(model, loaded), expected, atol=1e-5, rtol=0)
  assert cfg.normalize == "imagenet" and cfg.class_names == ()  # no config.json: torchvision's


def test_local_npz_jaxvision_layout(tmp_path, resnet):
  from jaxvision.convert.hub import flatten

  _, variables, expected = resnet
  path = tmp_path / "run.npz"
  np.savez(path, **{k: np.asarray(v) for k, v in flatten(variables).items()})
  model, loaded, _ = load_pretrained("resnet_tiny", str(path))
  np.testing.assert_allclose(_outputs(model, loaded), expected, atol=1e-5, rtol=0)
  # A family without a torch counterpart loads its own layout as it is.
  unet = jaxvision.create_model("unet_tiny")
  unet_vars = _random_variables(unet, seed=3, x=X[..., :1])
  np.savez(tmp_path / "unet.npz", **{k: np.asarray(v) for k, v in flatten(unet_vars).items()})
  model, loaded, cfg = load_pretrained("unet_tiny", str(tmp_path / "unet.npz"))
  np.testing.assert_allclose(np.asarray(_apply(model, loaded, X[:1, :, :, :1])),
                             np.asarray(_apply(unet, unet_vars, X[:1, :, :, :1])), atol=1e-5)
  assert cfg.normalize == "none" and cfg.input_size == (32, 32, 1)


def _official_vit_npz(params, depth=2, heads=2):
  """vit_jax naming (the paper's release) of jaxvision vit_tiny params."""
  p = jax.tree.map(np.asarray, params)
  d = p["cls_token"].shape[-1]
  out = {"embedding/kernel": p["patch_embed"]["proj"]["kernel"],
         "embedding/bias": p["patch_embed"]["proj"]["bias"], "cls": p["cls_token"],
         "Transformer/posembed_input/pos_embedding": p["pos_embed"],
         "Transformer/encoder_norm/scale": p["norm"]["scale"],
         "Transformer/encoder_norm/bias": p["norm"]["bias"],
         "head/kernel": p["head"]["kernel"], "head/bias": p["head"]["bias"]}
  for i in range(depth):
    blk, b = f"Transformer/encoderblock_{i}", p[f"blocks_{i}"]
    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[f"{blk}/{theirs}/scale"], out[f"{blk}/{theirs}/bias"] = (b[ours]["scale"],
                                                                   b[ours]["bias"])
    attn = f"{blk}/MultiHeadDotProductAttention_1"
    kernel = b["attn"]["qkv"]["kernel"].reshape(d, 3, heads, d // heads)
    bias = b["attn"]["qkv"]["bias"].reshape(3, heads, d // heads)
    for j, name in enumerate(("query", "key", "value")):
      out[f"{attn}/{name}/kernel"], out[f"{attn}/{name}/bias"] = kernel[:, j], bias[j]
    out[f"{attn}/out/kernel"] = b["attn"]["proj"]["kernel"].reshape(heads, d // heads, d)
    out[f"{attn}/out/bias"] = b["attn"]["proj"]["bias"]
    for k, fc in enumerate(("fc1", "fc2")):
      out[f"{blk}/MlpBlock_3/Dense_{k}/kernel"] = b["mlp"][fc]["kernel"]
      out[f"{blk}/MlpBlock_3/Dense_{k}/bias"] = b["mlp"][fc]["bias"]
  return out


def test_official_vit_npz(tmp_path):
  source = jaxvision.create_model("vit_tiny")
  variables = _random_variables(source, seed=5)
  path = tmp_path / "ViT-tiny.npz"
  np.savez(path, **_official_vit_npz(variables["params"]))
  assert read_weights(str(path)).layout == "vit_npz"
  model, loaded, cfg = load_pretrained("vit_tiny", str(path))
  np.testing.assert_allclose(_outputs(model, loaded), _outputs(source, variables), atol=1e-5,
                             rtol=0)
  assert cfg.normalize == "half"  # Google's checkpoints see [-1, 1] inputs


def test_torch_checkpoint(tmp_path, resnet):
  _, variables, expected = resnet
  path = tmp_path / "resnet.pth"
  if importlib.util.find_spec("torch") is None:
    path.write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"resnet\.pth is a PyTorch checkpoint.*pip install torch"
                       ) as err:
      load_pretrained("resnet_tiny", str(path))
    assert "\n" not in str(err.value)
    return
  import torch

  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v))
                             for k, v in to_torch("resnet_tiny", variables).items()}}, path)
  model, loaded, _ = load_pretrained("resnet_tiny", str(path))
  np.testing.assert_allclose(_outputs(model, loaded), expected, atol=1e-5, rtol=0)


def _one_line_error(call, *fragments):
  with pytest.raises(ValueError) as err:
    call()
  message = str(err.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_corrupt_files_are_one_line_errors(tmp_path):
  for name in ("bad.safetensors", "bad.npz"):
    (tmp_path / name).write_bytes(b"\x00garbage" * 10)
    _one_line_error(lambda n=name: load_pretrained("resnet_tiny", str(tmp_path / n)),
                    str(tmp_path / name), "not a readable")
  _one_line_error(lambda: load_pretrained("resnet_tiny", str(tmp_path / "missing.safetensors")),
                  "missing.safetensors", "no such file")


def test_mismatched_weights_name_the_file_and_first_key(hub_cache, tmp_path, resnet):
  _, variables, _ = resnet
  snapshot = hub_cache("timm/resnet_tiny.test_in1k", to_torch("resnet_tiny", variables))
  _one_line_error(lambda: load_pretrained("resnext_tiny", "hf-hub:timm/resnet_tiny.test_in1k"),
                  str(snapshot / "model.safetensors"), "not weights of resnext_tiny",
                  "the model expects")
  # A ViT of another width: the first parameter that differs is named with both shapes.
  wide = jaxvision.create_model("vit_tiny", width=48, num_heads=2)
  path = tmp_path / "wide.safetensors"
  _save(to_torch("vit_tiny", _random_variables(wide)), path)
  message = _one_line_error(lambda: load_pretrained("vit_tiny", str(path)), str(path))
  assert "has shape (48,), the model expects (32,)" in message or "(1, 1, 48)" in message
  # A dropped key is named too.
  sd = to_torch("resnet_tiny", variables)
  del sd["layer2.0.conv1.weight"]
  _save(sd, tmp_path / "short.safetensors")
  _one_line_error(lambda: load_pretrained("resnet_tiny", str(tmp_path / "short.safetensors")),
                  "layer2.0.conv1.weight (16, 8, 3, 3) is missing")


def test_hub_errors(hub_cache):
  _one_line_error(lambda: load_pretrained("resnet_tiny", "hf-hub:timm/not_cached"),
                  "hf-hub:timm/not_cached", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
  _one_line_error(lambda: load_pretrained("resnet_tiny", "hf-hub:no-slash"), "hf-hub:ORG/REPO")
  _one_line_error(lambda: load_pretrained("lenet"), "no default pretrained weights")


def test_save_pretrained_folder_round_trip(tmp_path, vit):
  source, variables, expected = vit
  cfg = PretrainedConfig("mine", "vit_tiny", (0.5,) * 3, (0.5,) * 3, (32, 32, 3),
                         num_classes=10, class_names=tuple("abcdefghij"))
  folder = save_pretrained(str(tmp_path / "repo"), "vit_tiny", variables, cfg)
  assert is_spec(folder)
  model, loaded, back = load_pretrained("vit_tiny", folder, pool="gap", class_token=True)
  np.testing.assert_allclose(_outputs(model, loaded), expected, atol=1e-5, rtol=0)
  assert back.class_names == cfg.class_names and back.normalize == "half"
  assert PretrainedConfig.from_dict(json.loads(json.dumps(back.to_dict()))) == back


def test_default_weights_table():
  for name, spec in DEFAULT_WEIGHTS.items():
    assert name in jaxvision.list_models() and _family(name) in ("cnn", "vit"), name
    assert spec.startswith("hf-hub:timm/") and is_spec(spec)
  assert not is_spec("runs/lenet_digits") and not is_spec("")


@pytest.mark.slow  # 17-29 s: a trainer run
def test_trainer_init_from_a_hub_spec_fits_the_head(hub_cache, resnet, tmp_path, caplog):
  """config.init_from takes the same specs: the trunk loads, the head fits the run's classes."""
  _, variables, _ = resnet
  hub_cache("timm/resnet_tiny.test_in1k", to_torch("resnet_tiny", variables),
            _timm_config("resnet_tiny"))
  config = small_config(model="resnet_tiny", dataset="synthetic:32x32x3:10", train_split="train",
                        image_size=32, total_steps=1, eval_split="", learning_rate=0.0,
                        init_from="hf-hub:timm/resnet_tiny.test_in1k",
                        **{"data.normalize": "(0.4,0.5,0.6),(0.2,0.25,0.3)"})
  caplog.set_level(logging.WARNING)
  loop.train_and_evaluate(config, str(tmp_path))
  params, _, _ = restore_params(str(tmp_path / "checkpoints"))
  source = variables["params"]
  np.testing.assert_array_equal(params["conv1"]["kernel"], source["conv1"]["kernel"])
  assert params["head"]["kernel"].shape[-1] == 10  # the data's 10 classes (the weights' too)
  assert "expects data.normalize" not in caplog.text
