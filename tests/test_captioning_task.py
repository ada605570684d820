"""The captioning task without the trainer: the masked, smoothed sequence loss against a NumPy
reference, resolve (vocabulary into the config) and from_config, finalize against every
reference by id, the output check, and "training learns": a tiny captioner trained for a few
dozen steps in a jitted optax loop on a tiny caption set memorizes it (the loss falls by a
large factor and greedy decoding gives back the training captions), with the pictures."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from jaxvision.captioning import caption_metrics
from jaxvision.data import create_input
from jaxvision.data.make_caption_sets import shape_scenes, write_coco_captions
from jaxvision.models import create_model
from jaxvision.tasks import create_task
from jaxvision.tasks.captioning import CaptioningTask, sequence_loss
from jaxvision.text import build_word_tokenizer
from jaxvision.text.generate import model_forward

# The config section the task reads (configs/base.py defines it; added here when absent).
CAPTION = dict(max_len=12, tokenizer="", vocab=(), min_count=1, max_vocab=0, decode="greedy",
               beam_width=3, length_penalty=1.0, pictures=2)


def _config(dataset: str):
  config = base.get_config()
  with config.unlocked():
    if "caption" not in config:
      config.caption = ml_collections.ConfigDict(CAPTION)
    config.caption.update(CAPTION)
  config.dataset, config.task = dataset, "captioning"
  config.train_split, config.eval_split = "train", "val"
  config.image_size, config.batch_size, config.eval_batch_size = 32, 8, 8
  config.data.prefetch = 0
  return config


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("scenes"))
  rng = np.random.default_rng(1)
  for split, n in (("train", 8), ("val", 3)):
    images, captions = shape_scenes(n, rng, size=32)
    write_coco_captions(root, split, images, [c[:1] for c in captions])  # one caption each
  return root


def test_sequence_loss_masks_and_smooths_like_the_reference():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 4, 6)).astype(np.float32)
  targets = rng.integers(0, 6, (2, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for smoothing in (0.0, 0.1):
    onehot = np.eye(6)[targets] * (1 - smoothing) + smoothing / 6
    per_token = -(onehot * logp).sum(-1)
    loss, accuracy = sequence_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                   smoothing)
    np.testing.assert_allclose(loss, per_token[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(accuracy, (logits.argmax(-1) == targets)[mask].mean())


def test_resolve_from_config_finalize_and_output_check(scenes):
  config = _config(f"coco_captions:{scenes}")
  train = create_input(config, "train", train=True)
  with config.unlocked():
    config.data_info.image_shape = (32, 32, 3)
    CaptioningTask.resolve(config, train)
  assert config.caption.vocab[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
  assert config.num_classes == len(config.caption.vocab)
  task = create_task(config)
  assert isinstance(task, CaptioningTask) and task.vocab_size == config.num_classes
  assert set(task.input_spec(8)) == {"image", "tokens", "token_mask"}
  references = task.references  # read from the eval split through the same loader
  assert sorted(references) == [0, 1, 2]
  tokens = np.zeros((4, 12), np.int32)
  for row, i in enumerate((0, 1, 2)):
    ids = task.tokenizer.encode(references[i][0])
    tokens[row, :len(ids) + 1] = [*ids, task.tokenizer.eos_id]
  examples = {"tokens": tokens, "id": np.array([0, 1, 2, 0]),
              "valid": np.array([True, True, True, False])}
  metrics = task.finalize({}, examples)
  assert set(metrics) == set(task.metric_names)
  # The valid rows only, decoded, against all references (words unseen in training are <unk>).
  decoded = [task.tokenizer.decode(t) for t in tokens[:3]]
  assert metrics == caption_metrics(decoded, [references[i] for i in (0, 1, 2)])
  known = ["<unk>" not in d for d in decoded]
  assert any(known) and math.isclose(metrics["exact_match"], np.mean(known))
  with pytest.raises(ValueError, match="no reference captions for eval example ids \\[99\\]"):
    task.finalize({}, {**examples, "id": np.array([0, 1, 99, 0])})
  task.check_outputs(jax.ShapeDtypeStruct((2, 12, config.num_classes), jnp.float32))
  with pytest.raises(ValueError, match="next-token logits"):
    task.check_outputs(jax.ShapeDtypeStruct((2, 10), jnp.float32))
  with pytest.raises(ValueError, match="caption.decode='nucleus'"):
    CaptioningTask(task.tokenizer, task.vocab_size, decode="nucleus")
  with pytest.raises(ValueError, match="needs a caption dataset"):
    CaptioningTask.resolve(_config("digits"), create_input(_config("digits"), "train",
                                                           train=True))


def _init_params(model, seed=0):
  """GPT-2-like initial values made by numpy: no `init` (nor threefry) to compile."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(s.shape, s.dtype)
    if "kernel" in name:
      return jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1])),
                         s.dtype)
    return jnp.asarray(0.02 * rng.standard_normal(s.shape) if "bias" not in name else
                       np.zeros(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes["params"])


@pytest.mark.parametrize("depth,decode", [
    (1, "greedy"),  # one block each side: the same code, half the compile
    pytest.param(2, "beam", marks=pytest.mark.slow),  # vit_gpt2_tiny as registered
])
def test_training_learns_the_captions(scenes, tmp_path, depth, decode):
  config = _config(f"coco_captions:{scenes}")
  train = create_input(config, "train", train=True)
  tokenizer = build_word_tokenizer(train.source.all_captions())
  task = CaptioningTask(tokenizer, tokenizer.vocab_size, (32, 32, 3), max_len=12, decode=decode,
                        pictures=2)
  task = task.with_references(train.source.references())
  batch = task.prepare(train._train_batch(0), train=True)  # all 8 scenes, one caption each
  model = create_model("vit_gpt2_tiny", num_classes=tokenizer.vocab_size,
                       encoder_size=(32, depth, 2, 64), decoder_size=(64, depth, 2, 128))
  optimizer = optax.adam(3e-3)
  params = _init_params(model)

  @jax.jit
  def train_steps(params, opt_state, batch):
    def step(carry, _):
      params, opt_state = carry

      def loss_fn(p):
        args, kwargs = task.model_inputs(batch)
        return task.loss(model.apply({"params": p}, *args, train=True, **kwargs), batch)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      norms = {k: optax.global_norm(v) for k, v in grads.items()}
      return (optax.apply_updates(params, updates), opt_state), (
          loss, metrics["token_accuracy"], norms)

    (params, opt_state), (losses, accuracy, norms) = jax.lax.scan(
        step, (params, opt_state), None, length=20)
    return params, opt_state, losses, accuracy, norms

  opt_state = optimizer.init(params)
  history = []
  for chunk in range(4):  # 80 steps, one compile
    params, opt_state, losses, accuracy, norms = train_steps(params, opt_state, batch)
    history += list(np.asarray(losses))
    if chunk == 0:  # a real backward pass: finite gradients reaching every part
      first = {k: float(v[0]) for k, v in norms.items()}
      assert all(np.isfinite(v) for v in first.values()), first
      assert min(first["encoder"], first["decoder"], first["enc_to_dec_proj"]) > 0, first
      assert first["encoder_pooler"] == 0  # kept for the checkpoint layout, read by nothing
  assert history[-1] < history[0] / 10, history[::10]
  assert float(accuracy[-1]) > 0.95

  predict = jax.jit(lambda p, b: task.predict(model_forward(model, {"params": p}), b))
  predictions = jax.device_get(predict(params, batch))
  examples = task.eval_examples(predictions, {**batch, "valid": np.ones(8, bool)})
  metrics = task.finalize({}, examples)
  assert metrics["exact_match"] >= 0.875, [tokenizer.decode(t) for t in predictions["tokens"]]
  assert metrics["cider"] > 5.0
  # Pictures: the caption and each word's attention over the 4x4 patches.
  assert predictions["attention"].shape == (8, 12, 17)
  np.testing.assert_allclose(predictions["attention"].sum(-1), 1.0, rtol=1e-4)
  paths = task.save_pictures(str(tmp_path / "pictures" / "caption_"),
                             {k: np.asarray(v) for k, v in batch.items()}, predictions)
  assert len(paths) == 2 and all(os.path.getsize(p) > 0 for p in paths)
