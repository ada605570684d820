"""Transfer learning: init_from (workdir, .npz, .msgpack), new heads, frozen backbones, ViT
position-embedding resampling, normalisation warnings."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from configs import base
from conftest import small_config
from jaxvision import init
from jaxvision.models import create_model
from jaxvision.tasks.classification import ClassificationTask
from train import loop, transfer
from train.build import load_config
from train.checkpoint import restore_params
from train.state import TrainState, create_train_state


def short_config(**overrides):
  """Three LeNet steps on digits, no eval or intermediate checkpoint."""
  return small_config(**{"total_steps": 3, "log_every": 3, "checkpoint_every": 0, **overrides})


def flat(tree):
  return {k: np.asarray(v) for k, v in transfer.flatten(tree).items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A LeNet trained a few steps on digits: the source of every transfer below."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  loop.train_and_evaluate(short_config(eval_split=""), workdir)
  return workdir


@functools.lru_cache
def _init_fn(model_name, ema, kwargs):
  model = create_model(model_name, **dict(kwargs))
  side = dict(kwargs).get("image_size", 28 if model_name == "lenet" else 32)
  task = ClassificationTask(model.num_classes,
                            image_shape=(side, side, 1 if model_name == "lenet" else 3))
  return jax.jit(lambda rng: create_train_state(model, optax.adam(1e-3), task, rng, ema=ema))


def fresh_state(model_name="lenet", ema=True, rng=None, **model_kwargs):
  """A freshly initialised train state (compiled once per model)."""
  rng = jax.random.key(42) if rng is None else rng
  return _init_fn(model_name, ema, tuple(sorted(model_kwargs.items())))(rng)


def test_finetune_with_frozen_backbone_and_a_new_head(pretrained, tmp_path, caplog):
  source, _, _ = restore_params(f"{pretrained}/checkpoints")
  caplog.set_level(logging.WARNING, logger="train")
  config = short_config(init_from=pretrained, freeze="^(?!head/)", num_classes=12,
                        learning_rate=1e-2, eval_split="")
  loop.train_and_evaluate(config, str(tmp_path))
  tuned, _, _ = restore_params(str(tmp_path / "checkpoints"))
  before, after = flat(source), flat(tuned)
  assert after["head/kernel"].shape == (84, 12) and after["head/bias"].shape == (12,)
  for path, value in after.items():
    if not path.startswith("head/"):
      assert value.tobytes() == before[path].tobytes(), f"frozen {path} changed"
  # The new head was trained away from the trainer's initialisation (train.loop's init key).
  loop_key = jax.random.fold_in(jax.random.key(0), 0x1217)
  initial = flat(fresh_state(num_classes=12, ema=False, rng=loop_key).params)
  assert initial["head/kernel"].shape == (84, 12)
  assert not np.array_equal(after["head/kernel"], initial["head/kernel"])
  assert "kept 2 as initialised" in caplog.text
  assert "head/kernel (shape (84, 10) there" in caplog.text


def test_init_from_round_trips_through_workdir_npz_and_msgpack(pretrained, tmp_path):
  params, _, _ = restore_params(f"{pretrained}/checkpoints")
  npz = transfer.export_npz(str(tmp_path / "w.npz"), params)
  packed = tmp_path / "w.msgpack"
  packed.write_bytes(serialization.msgpack_serialize({"params": jax.tree.map(np.asarray, params)}))
  config = short_config(ema_decay=0.9)
  for source in (pretrained, f"{pretrained}/checkpoints", npz, str(packed)):
    state = transfer.initialize_from(fresh_state(ema=True), source, config)
    for tree in (state.params, state.ema_params):  # EMA starts at the loaded weights
      got = flat(tree)
      for path, value in flat(params).items():
        assert got[path].tobytes() == value.tobytes(), f"{source}: {path}"


def random_params(model, shape, seed):
  """Random values in the shapes of `model`'s parameters (no compiled init needed)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def test_vit_posemb_is_resampled_and_block_layouts_convert(tmp_path):
  small = create_model("vit_tiny")  # 32 px, 8-px patches: 4x4 grid
  params = random_params(small, (1, 32, 32, 3), 0)
  npz = transfer.export_npz(str(tmp_path / "vit.npz"), params)
  config = base.get_config()
  config.model, config.image_size, config.num_classes = "vit_tiny", 48, 10
  config.model_kwargs = {"image_size": 48, "scan": True}
  fresh = random_params(create_model("vit_tiny", image_size=48, scan=True), (1, 48, 48, 3), 1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=fresh, batch_stats={}, opt_state=(),
                     ema_params={}, nonfinite_step=jnp.full((), -1), apply_fn=None, tx=None)
  loaded = transfer.initialize_from(state, npz, config)
  pe = np.asarray(loaded.params["pos_embed"])
  assert pe.shape == (1, 1 + 36, 32)
  np.testing.assert_array_equal(pe[0, 0], np.asarray(params["pos_embed"])[0, 0])  # class token
  np.testing.assert_allclose(pe[0, 1:].mean(0), np.asarray(params["pos_embed"])[0, 1:].mean(0),
                             atol=0.02)
  # Loop-layout blocks_0 / blocks_1 land in the scan layout's stacked 'blocks'.
  np.testing.assert_array_equal(loaded.params["blocks"]["attn"]["qkv"]["kernel"][1],
                                params["blocks_1"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(loaded.params["head"]["kernel"], params["head"]["kernel"])


def test_vit_fine_tuned_at_another_size_gets_the_resampled_posemb(tmp_path, caplog):
  """vit_tiny weights for 32 px (4x4 patches), fine-tuned at 48 px without model_kwargs.image_size:
  the run's model is built for the 6x6 grid, and the report says what the state holds."""
  source = transfer.export_npz(str(tmp_path / "vit_tiny_32.npz"), init(
      create_model("vit_tiny", num_classes=10, image_size=32), (1, 32, 32, 1))["params"])
  caplog.set_level(logging.WARNING, logger="train")
  tuned = str(tmp_path / "tuned")
  loop.train_and_evaluate(short_config(model="vit_tiny", image_size=48, init_from=source,
                                       eval_split=""), tuned)
  params, _, _ = restore_params(f"{tuned}/checkpoints")
  assert params["pos_embed"].shape == (1, 1 + 36, 32)
  assert "pos_embed (1, 17, 32) -> (1, 37, 32)" in caplog.text
  assert load_config(tuned).model_kwargs.image_size == 48


def test_bad_init_from_is_a_clear_error(tmp_path):
  config = short_config()
  with pytest.raises(FileNotFoundError, match="no such file"):
    transfer.initialize_from(fresh_state(), str(tmp_path / "nope"), config)
  np.savez(tmp_path / "other.npz", **{"params/dense/kernel": np.zeros((3, 3))})
  with pytest.raises(ValueError, match="none of its 1 arrays fits model 'lenet'"):
    transfer.initialize_from(fresh_state(), str(tmp_path / "other.npz"), config)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither a trainer workdir"):
    transfer.initialize_from(fresh_state(), str(tmp_path / "empty"), config)
  (tmp_path / "w.txt").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"expected a trainer workdir.*\.npz"):
    transfer.initialize_from(fresh_state(), str(tmp_path / "w.txt"), config)


def test_normalization_mismatch_is_reported(pretrained, caplog):
  caplog.set_level(logging.WARNING, logger="train")
  config = short_config()
  config.data.normalize = "mnist"  # the source run used 'half'
  transfer.initialize_from(fresh_state(), pretrained, config)
  assert "data.normalize='half' but this run uses 'mnist'" in caplog.text
  assert transfer.pretrained_normalization("torchvision") == "imagenet"
  with pytest.raises(ValueError, match="unknown weight source"):
    transfer.pretrained_normalization("nope")


def test_init_skip_leaves_matching_layers_as_initialised(pretrained):
  params, _, _ = restore_params(f"{pretrained}/checkpoints")
  fresh = fresh_state()
  config = short_config(init_skip="^(fc1|fc2|head)/")
  state = transfer.initialize_from(fresh, pretrained, config)
  got, source, initial = flat(state.params), flat(params), flat(fresh.params)
  for path in got:
    expected = initial[path] if path.split("/")[0] in ("fc1", "fc2", "head") else source[path]
    assert got[path].tobytes() == expected.tobytes(), path
  with pytest.raises(ValueError, match="init_skip"):
    transfer.initialize_from(fresh, pretrained, short_config(init_skip="(("))
