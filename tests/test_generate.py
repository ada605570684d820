"""Decoding: the key/value cache gives the logits of full recomputation, cached greedy equals
uncached greedy, beam search equals an exhaustive search on a tiny vocabulary, greedy equals
beam width 1, every decoder compiles once per shape, each sequence ends on its own, sampling
filters."""

import dataclasses
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.models import create_model
from jaxvision.text import DecodeOptions, beam_search, greedy, greedy_uncached, sample
from jaxvision.text.generate import filter_logits, generate, model_forward

BOS, EOS, PAD = 1, 2, 0


def numpy_params(model, seed=0, embedding_std=1.0):
  """Parameters made by numpy (no `init` to compile); embeddings of `embedding_std`: the larger,
  the further the next-token distributions are from uniform."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    if "kernel" in name:
      std = 1.0 / math.sqrt(math.prod(s.shape[:-1]))
    else:
      std = embedding_std if "embedding" in name else 1.0
    return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

  return {"params": jax.tree_util.tree_map_with_path(leaf, shapes["params"])}


def _model(vocab):
  # One block on each side: decoding is what is tested, and compiles stay short.
  return create_model("vit_gpt2_tiny", num_classes=vocab, encoder_size=(32, 1, 2, 64),
                      decoder_size=(32, 1, 2, 64), pooler=False)


def _images(n, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def small():
  model = _model(24)
  return model, numpy_params(model)


def test_cached_decoding_gives_the_logits_of_full_recomputation(small):
  model, variables = small
  images = _images(2)
  tokens = np.random.default_rng(3).integers(0, 24, (2, 7)).astype(np.int32)

  @jax.jit
  def both(variables):
    full = model.apply(variables, images, tokens)
    encoded = model.apply(variables, images, method="encode")
    cache = model.apply(variables, encoded, 7, method="init_cache")
    first, cache = model.apply(variables, tokens[:, :3], cache=cache, method="decode")  # prefill

    def one(cache, token):
      logits, cache = model.apply(variables, token[:, None], cache=cache, method="decode")
      return cache, logits[:, 0]

    cache, rest = jax.lax.scan(one, cache, tokens[:, 3:].T)
    return full, jnp.concatenate([first, rest.transpose(1, 0, 2)], 1), cache["index"]

  full, stepped, index = both(variables)
  assert int(index) == 7
  assert np.abs(full).max() > 1.0
  np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)


def test_greedy_cached_equals_uncached_equals_beam_width_1_and_compiles_once(small):
  model, variables = small
  options = DecodeOptions(max_len=8, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  beam1 = dataclasses.replace(options, method="beam", beam_width=1, length_penalty=0.0)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def decode_all(variables, images):
    forward = model_forward(model, variables)
    encoded = forward(images, method="encode")
    uncached = greedy_uncached(lambda seq: forward(seq, encoded, method="decode"),
                               images.shape[0], options)
    return generate(forward, images, options), uncached, generate(forward, images, beam1)

  cached, uncached, beam = decode_all(variables, _images(4))
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached, beam)
  assert len(np.unique(np.asarray(cached)[:, 0])) > 1  # the images lead to different captions
  # Same shapes, other values: no second trace (assert_max_traces would raise).
  again = decode_all(jax.tree.map(lambda x: x * 1.01, variables), _images(4, seed=1))
  assert again[0].shape == (4, 8)


def _sequence_logprob(logprobs: np.ndarray, seq: tuple[int, ...]) -> float:
  return float(sum(logprobs[i, t] for i, t in enumerate(seq)))


def test_beam_search_is_exhaustive_search_on_a_tiny_vocabulary():
  # Vocabulary {pad, bos, eos, w}: 1 + 3 + 36 sequences of at most 3 tokens, and 16 beams hold
  # every prefix, so beam search must find the best hypothesis of them all, whatever the
  # length penalty (these weights make the best one differ between the penalties).
  vocab, length, width, penalties = 4, 3, 16, (0.0, 2.0)
  model = _model(vocab)
  variables = numpy_params(model, seed=6, embedding_std=0.3)
  images = _images(2, seed=7)
  sequences = [s for n in range(1, length + 1) for s in itertools.product(range(vocab), repeat=n)
               if (EOS not in s[:-1]) and (s[-1] == EOS or n == length)]
  assert len(sequences) == 1 + 3 + 36
  inputs = np.full((len(sequences), length), PAD, np.int32)
  for row, s in enumerate(sequences):
    inputs[row, :len(s)] = (BOS, *s[:-1])

  @jax.jit
  def run(variables):
    forward = model_forward(model, variables)
    encoded = forward(images, method="encode")
    cache = forward(jnp.repeat(encoded, width, axis=0), length, method="init_cache")
    step = lambda tokens, cache: forward(tokens, cache=cache, method="decode")
    found = [beam_search(step, cache, 2, DecodeOptions(
        max_len=length, bos_id=BOS, eos_id=EOS, pad_id=PAD, method="beam", beam_width=width,
        length_penalty=penalty)) for penalty in penalties]
    every = [jax.nn.log_softmax(forward(jnp.asarray(inputs), jnp.broadcast_to(
        encoded[b], (len(sequences), *encoded.shape[1:])), method="decode")) for b in range(2)]
    return found, jnp.stack(every)

  found, logprobs = jax.device_get(run(variables))
  bests = set()
  for (tokens, scores), penalty in zip(found, penalties, strict=True):
    for b in range(2):
      normalized = [_sequence_logprob(logprobs[b, row], s) / len(s) ** penalty
                    for row, s in enumerate(sequences)]
      best = int(np.argmax(normalized))
      bests.add(sequences[best])
      expected = np.full(length, PAD)
      expected[:len(sequences[best])] = sequences[best]
      np.testing.assert_array_equal(tokens[b, 0], expected)
      np.testing.assert_allclose(scores[b, 0], normalized[best], rtol=1e-5)
      # The finished pool is sorted best first and holds real hypotheses only.
      assert np.all(np.diff(scores[b]) <= 0) and scores[b, -1] > -1e8
  assert len(bests) > 1 and any(len(s) < length for s in bests)


def _scripted_step(ends_at):
  """A step function whose row r says 'word 3' until step ends_at[r], then the end token."""
  ends_at = jnp.asarray(ends_at)

  def step(tokens, t):
    del tokens
    logits = jnp.where((t == ends_at)[:, None], jax.nn.one_hot(EOS, 5), jax.nn.one_hot(3, 5))
    return (logits * 10.0)[:, None], t + 1

  return step


def test_each_sequence_ends_on_its_own_with_padding_after_its_end():
  options = DecodeOptions(max_len=6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  tokens = jax.jit(lambda: greedy(_scripted_step([1, 3, 9]), jnp.zeros((), jnp.int32), 3,
                                  options))()
  np.testing.assert_array_equal(tokens, [[3, EOS, PAD, PAD, PAD, PAD],
                                         [3, 3, 3, EOS, PAD, PAD],
                                         [3, 3, 3, 3, 3, 3]])
  # Beam search too (two beams per sequence; the cache is a step counter per beam).
  beam = dataclasses.replace(options, method="beam", beam_width=2, length_penalty=0.0)
  step = _scripted_step(jnp.repeat(jnp.array([1, 3]), 2))
  found, _ = jax.jit(lambda: beam_search(step, jnp.zeros((4,), jnp.int32), 2, beam,
                                         reorder=lambda c, rows: c[rows]))()
  np.testing.assert_array_equal(found[:, 0], [[3, EOS, PAD, PAD, PAD, PAD],
                                              [3, 3, 3, EOS, PAD, PAD]])


def test_sampling_filters_and_is_reproducible():
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  kept = jax.jit(lambda x: [jnp.isfinite(filter_logits(x, **kw)) for kw in (
      dict(top_k=2), dict(top_p=0.7), dict(top_p=0.1), dict(top_k=3, top_p=0.6))])(logits)
  np.testing.assert_array_equal(kept, [[[0, 1, 0, 1]], [[0, 1, 0, 1]], [[0, 1, 0, 0]],
                                       [[0, 1, 0, 1]]])
  table = jnp.log(jnp.array([0.1, 0.05, 0.05, 0.4, 0.4]))  # two likely words, 3 and 4

  def step(tokens, cache):
    return jnp.broadcast_to(table, (tokens.shape[0], 1, 5)), cache

  options = DecodeOptions(max_len=12, bos_id=BOS, eos_id=EOS, pad_id=PAD, method="sample",
                          top_k=2)
  draw = jax.jit(lambda rng: sample(step, (), 64, options, rng))
  a, b, c = draw(jax.random.key(0)), draw(jax.random.key(0)), draw(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert set(np.unique(np.asarray(a))) == {3, 4}  # top-2: never the end token
  with pytest.raises(ValueError, match="method='top'"):
    DecodeOptions(max_len=3, bos_id=1, eos_id=2, method="top")
  with pytest.raises(ValueError, match="top_p=0"):
    DecodeOptions(max_len=3, bos_id=1, eos_id=2, top_p=0)
