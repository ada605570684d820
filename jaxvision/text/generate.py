"""Caption decoding with static shapes: greedy, beam search and top-k / top-p sampling, all
traceable (`lax.while_loop`), so they run inside a jitted eval step and compile once per shape.

Every decoder works on a step function and its cache,

    step(tokens [N, 1] int32, cache) -> (logits [N, 1, V], cache)

(`VitGpt2.decode` with a cache from `VitGpt2.init_cache`: one decoder step per new token), and
returns `max_len` generated tokens per sequence after the start token: the end token where a
sequence ends, `pad_id` after it. `generate(forward, images, ...)` wires a model in:
`forward(*args, method=..., **kwargs)` is `model.apply(variables, *args, train=False, ...)`, as
the trainer's eval step passes it to a task.

Beam search scores a finished hypothesis as Hugging Face does: sum of log-probabilities /
length ** length_penalty (length = generated tokens, end token included; a hypothesis cut at
max_len counts as finished), keeps the 2 * beam_width best continuations per step, moves the ended
ones among the best beam_width to the finished pool, and continues the others. It stops only
when no running beam can still beat the worst finished one (Hugging Face's
`early_stopping='never'`), so with a beam as wide as the search space it is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.models import create_model

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
METHODS = ("greedy", "beam", "sample")
NEG = -1.0e9  # the score of an empty slot, as Hugging Face's beam search uses


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode.

  Attributes:
    max_len: tokens generated per sequence (the end token included).
    bos_id / eos_id / pad_id: start, end and padding token ids.
    method: 'greedy', 'beam' or 'sample'.
    beam_width: hypotheses kept by beam search.
    length_penalty: beam search divides a hypothesis's log-probability by length ** this.
    temperature: sampling divides the logits by this.
    top_k: sampling keeps the k most likely tokens (0: all).
    top_p: sampling keeps the smallest set of tokens whose probability reaches p (1: all).
  """

  max_len: int
  bos_id: int
  eos_id: int
  pad_id: int = 0
  method: str = "greedy"
  beam_width: int = 4
  length_penalty: float = 1.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"decode method={self.method!r}; choose from {METHODS}")
    if self.max_len < 1 or self.beam_width < 1 or self.top_k < 0:
      raise ValueError(f"decode max_len={self.max_len}, beam_width={self.beam_width}, "
                       f"top_k={self.top_k}: need max_len >= 1, beam_width >= 1, top_k >= 0")
    if self.temperature <= 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"decode temperature={self.temperature}, top_p={self.top_p}: need "
                       "temperature > 0 and 0 < top_p <= 1")


def _last_logits(step: StepFn, tokens: jax.Array, cache):
  logits, cache = step(tokens[:, None], cache)
  return logits[:, 0].astype(jnp.float32), cache


def _decode_loop(step: StepFn, cache, batch_size: int, options: DecodeOptions, choose):
  """The loop greedy decoding and sampling share: `choose(logits, t) -> next tokens`."""
  tokens = jnp.full((batch_size, options.max_len), options.pad_id, jnp.int32)
  last = jnp.full((batch_size,), options.bos_id, jnp.int32)
  done = jnp.zeros((batch_size,), bool)

  def cond(state):
    t, _, _, done, _ = state
    return (t < options.max_len) & ~jnp.all(done)

  def body(state):
    t, tokens, last, done, cache = state
    logits, cache = _last_logits(step, last, cache)
    nxt = jnp.where(done, options.pad_id, choose(logits, t)).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, t))
    return t + 1, tokens, nxt, done | (nxt == options.eos_id), cache

  state = (jnp.zeros((), jnp.int32), tokens, last, done, cache)
  return jax.lax.while_loop(cond, body, state)[1]


def greedy(step: StepFn, cache, batch_size: int, options: DecodeOptions) -> jax.Array:
  """[B, max_len] tokens, the most likely one at each step."""
  return _decode_loop(step, cache, batch_size, options, lambda logits, t: jnp.argmax(logits, -1))


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """`logits` [..., V] with the tokens outside the top-k and the top-p nucleus set to -inf."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays when the mass before it is below p: the most likely one always stays.
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample(step: StepFn, cache, batch_size: int, options: DecodeOptions,
           rng: jax.Array) -> jax.Array:
  """[B, max_len] tokens drawn from softmax(logits / temperature) within top-k / top-p; the
  draw at step t uses fold_in(rng, t), so it is reproducible."""

  def choose(logits, t):
    logits = filter_logits(logits / options.temperature, options.top_k, options.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

  return _decode_loop(step, cache, batch_size, options, choose)


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, K, ...] at beams index [B, J] -> [B, J, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def beam_search(step: StepFn, cache, batch_size: int, options: DecodeOptions,
                reorder: Callable[[Any, jax.Array], Any] | None = None):
  """(tokens [B, W, max_len], scores [B, W]): the beam_width best finished hypotheses per
  sequence, best first. `cache` holds the B * W beams of sequence b at rows b*W .. b*W+W-1;
  `reorder(cache, rows)` gathers its rows (default: `reorder_cache`)."""
  b, w, length = batch_size, options.beam_width, options.max_len
  lp, eos = options.length_penalty, options.eos_id
  reorder = reorder or reorder_cache
  run_seq = jnp.full((b, w, length), options.pad_id, jnp.int32)
  # Only beam 0 is live at first, so the first step does not pick the same token W times.
  run_score = jnp.where(jnp.arange(w) == 0, 0.0, NEG) * jnp.ones((b, 1), jnp.float32)
  fin_seq, fin_score = run_seq, jnp.full((b, w), NEG, jnp.float32)
  last = jnp.full((b, w), options.bos_id, jnp.int32)
  open_ = jnp.ones((b,), bool)  # the finished pool can still improve

  def cond(state):
    t, *_, open_, _ = state
    return (t < length) & jnp.any(open_)

  def body(state):
    t, run_seq, run_score, fin_seq, fin_score, last, open_, cache = state
    logits, cache = _last_logits(step, last.reshape(b * w), cache)
    vocab = logits.shape[-1]
    scores = run_score[..., None] + jax.nn.log_softmax(logits).reshape(b, w, vocab)
    top_score, top_index = jax.lax.top_k(scores.reshape(b, w * vocab), 2 * w)
    beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seq = _gather_beams(run_seq, beam).at[:, :, t].set(token)
    ended = (token == eos) | (t == length - 1)
    # Running beams: the best W continuations that did not end.
    alive = jnp.where(ended, top_score + NEG, top_score)
    keep = jax.lax.top_k(alive, w)[1]
    run_seq, run_score = _gather_beams(seq, keep), _gather_beams(alive, keep)
    last = _gather_beams(token, keep)
    rows = (jnp.arange(b)[:, None] * w + _gather_beams(beam, keep)).reshape(b * w)
    cache = reorder(cache, rows)
    # Finished pool: ended continuations among the best W, scored with the length penalty.
    normalized = top_score / (t + 1).astype(jnp.float32) ** lp
    # (A continuation of an empty slot is no hypothesis, whatever its length makes of NEG.)
    eligible = ended & (jnp.arange(2 * w) < w) & open_[:, None] & (top_score > NEG / 2)
    merged_score = jnp.concatenate([fin_score, jnp.where(eligible, normalized, NEG)], 1)
    merged_seq = jnp.concatenate([fin_seq, seq], 1)
    fin_score, best = jax.lax.top_k(merged_score, w)
    fin_seq = _gather_beams(merged_seq, best)
    # The best a running beam can still reach: no more log-probability lost, at the length the
    # penalty favours most (max_len when it rewards length, the next step otherwise).
    best_length = jnp.where(lp > 0, length, t + 2).astype(jnp.float32)
    bound = run_score[:, 0] / best_length ** lp
    open_ = open_ & (bound > fin_score[:, -1])
    return t + 1, run_seq, run_score, fin_seq, fin_score, last, open_, cache

  state = (jnp.zeros((), jnp.int32), run_seq, run_score, fin_seq, fin_score, last, open_, cache)
  _, _, _, fin_seq, fin_score, *_ = jax.lax.while_loop(cond, body, state)
  return fin_seq, fin_score


def reorder_cache(cache: dict, rows: jax.Array) -> dict:
  """A `GPT2Decoder` cache with its self-attention rows gathered (beam search); the image
  tokens' keys and values are the same for every beam of an image, so they stay."""
  return {**cache, "self": jax.tree.map(lambda x: x[rows], cache["self"])}


def greedy_uncached(logits_fn: Callable[[jax.Array], jax.Array], batch_size: int,
                    options: DecodeOptions) -> jax.Array:
  """Greedy decoding that recomputes the whole sequence every step (no cache), for comparison:
  `logits_fn(tokens [B, max_len]) -> [B, max_len, V]` on the padded sequence so far."""
  seq = jnp.full((batch_size, options.max_len), options.pad_id, jnp.int32).at[:, 0].set(
      options.bos_id)
  out = jnp.full((batch_size, options.max_len), options.pad_id, jnp.int32)
  done = jnp.zeros((batch_size,), bool)

  def cond(state):
    t, _, _, done = state
    return (t < options.max_len) & ~jnp.all(done)

  def body(state):
    t, seq, out, done = state
    logits = jax.lax.dynamic_index_in_dim(logits_fn(seq), t, axis=1, keepdims=False)
    nxt = jnp.where(done, options.pad_id, jnp.argmax(logits, -1)).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
    seq = jnp.where((jnp.arange(options.max_len) == t + 1)[None], nxt[:, None], seq)
    return t + 1, seq, out, done | (nxt == options.eos_id)

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), seq, out, done))[2]


def generate(forward: Callable[..., Any], images: jax.Array, options: DecodeOptions,
             rng: jax.Array | None = None, *, return_encoded: bool = False):
  """Captions [B, max_len] of NHWC `images` by `options.method`, through a model's `encode`,
  `init_cache` and `decode` (see the module docstring); with `return_encoded`, (captions,
  image tokens) so a caller can reuse them."""
  encoded = forward(images, method="encode")
  batch = images.shape[0]
  if options.method == "beam":
    beams = jnp.repeat(encoded, options.beam_width, axis=0)
    cache = forward(beams, options.max_len, method="init_cache")
    tokens = beam_search(_model_step(forward), cache, batch, options)[0][:, 0]
  else:
    cache = forward(encoded, options.max_len, method="init_cache")
    if options.method == "greedy":
      tokens = greedy(_model_step(forward), cache, batch, options)
    else:
      if rng is None:
        raise ValueError("decode method='sample' needs an rng")
      tokens = sample(_model_step(forward), cache, batch, options, rng)
  return (tokens, encoded) if return_encoded else tokens


def _model_step(forward) -> StepFn:
  return lambda tokens, cache: forward(tokens, cache=cache, method="decode")


def model_forward(model, variables) -> Callable[..., Any]:
  """`forward(*args, **kwargs)` = `model.apply(variables, *args, train=False, **kwargs)`."""
  return functools.partial(_apply, model, variables)


def _apply(model, variables, *args, **kwargs):
  return model.apply(variables, *args, train=False, **kwargs)


def jit_generate(model, options: DecodeOptions) -> Callable[..., jax.Array]:
  """A jitted `fn(variables, images, rng=None) -> captions [B, max_len]` for `model`; it
  compiles once per image batch shape."""

  @jax.jit
  def fn(variables, images, rng=None):
    return generate(model_forward(model, variables), images, options, rng)

  return fn


def benchmark(model_name: str = "vit_gpt2", batch_size: int = 8, new_tokens: int = 20,
              repeats: int = 3, seed: int = 0) -> dict[str, Any]:
  """Greedy decoding speed of `model_name` with random weights: new tokens per second of the
  decoding loop with the key/value cache and without it (every step recomputes the whole
  fixed-length sequence), the seconds of encoding the images (and filling the cache's
  image keys/values) that both share, and each one's compile seconds; medians of `repeats`
  timed runs after one compile."""
  model = create_model(model_name)
  size = model.image_size
  shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 1), jnp.int32))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: jnp.asarray(
      0.02 * rng.standard_normal(s.shape, dtype=np.float32), s.dtype), shapes)
  images = jnp.asarray(rng.standard_normal((batch_size, size, size, 3), dtype=np.float32))
  # An end id no token has: every run generates exactly new_tokens tokens.
  options = DecodeOptions(max_len=new_tokens, bos_id=0, eos_id=-1, pad_id=0)

  def prepare(variables, images):
    forward = model_forward(model, variables)
    encoded = forward(images, method="encode")
    return encoded, forward(encoded, new_tokens, method="init_cache")

  def cached(variables, cache):
    step = _model_step(model_forward(model, variables))
    return greedy(step, cache, batch_size, options)

  def uncached(variables, encoded):
    forward = model_forward(model, variables)
    return greedy_uncached(lambda seq: forward(seq, encoded, method="decode"), batch_size,
                           options)

  def measure(fn, *args):
    jitted = jax.jit(fn)
    start = time.perf_counter()
    out = jax.block_until_ready(jitted(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(jitted(*args))
      times.append(time.perf_counter() - start)
    return out, compile_s, statistics.median(times)

  (encoded, cache), _, encode_s = measure(prepare, variables, images)
  result = {"model": model_name, "batch_size": batch_size, "new_tokens": new_tokens,
            "device": jax.devices()[0].device_kind, "encode_s": encode_s}
  for name, fn, arg in (("cached", cached, cache), ("uncached", uncached, encoded)):
    _, compile_s, seconds = measure(fn, variables, arg)
    result[f"{name}_tokens_per_s"] = batch_size * new_tokens / seconds
    result[f"{name}_compile_s"] = compile_s
  result["speedup"] = result["cached_tokens_per_s"] / result["uncached_tokens_per_s"]
  return result
