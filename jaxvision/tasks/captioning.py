"""Image captioning: image -> a sentence, with a ViT + GPT-2 style encoder-decoder
(`jaxvision.models.vit_gpt2`).

    resolve     builds the word vocabulary from the training captions (or reads caption.tokenizer)
                into config.caption.vocab and sets num_classes to the vocabulary size
    prepare     (host) tokenizes each example's caption: `tokens` [B, L+1] = bos .. eos pad,
                `token_mask`
    loss        teacher forcing: cross-entropy of tokens[:, 1:] given tokens[:, :-1] over the
                caption's tokens (label smoothing from config.label_smoothing); batch metric
                token_accuracy (next-token argmax)
    predict     jitted greedy or beam decoding (caption.decode) with the key/value cache, and the
                cross-attention of the generated words over the image patches (for pictures)
    finalize    (host) BLEU-1..4, CIDEr-D, exact match and token accuracy of the decoded
                captions against every reference caption of each image, looked up by id

The references of the eval split are read once, on first use, through the same loader as the
eval input (`caption_references`, no image decoded), or given with
`with_references`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvision.captioning.metrics import caption_metrics
from jaxvision.data import load_source
from jaxvision.models.vit_gpt2 import cross_attention_maps
from jaxvision.segmentation.overlay import to_display
from jaxvision.tasks.base import TaskBase, image_spec
from jaxvision.text.generate import DecodeOptions, generate
from jaxvision.text.tokenizer import (
  Tokenizer,
  WordTokenizer,
  build_word_tokenizer,
  load_tokenizer,
  pad_captions,
)

log = logging.getLogger(__name__)
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "exact_match", "token_accuracy")
DECODE_METHODS = ("greedy", "beam")
_GLOW = (255, 140, 0)  # colour of the attended patches in the pictures


def tokenizer_of(config) -> Tokenizer:
  """The run's tokenizer: the word vocabulary `resolve` wrote (config.caption.vocab), else the
  file config.caption.tokenizer names."""
  caption = config.caption
  if caption.vocab:
    return WordTokenizer(tuple(caption.vocab))
  if caption.tokenizer:
    return load_tokenizer(str(caption.tokenizer))
  raise ValueError("config.caption has no vocab and no tokenizer: resolve the config first "
                   "(train.resolve) or set caption.tokenizer")


def sequence_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                  label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, mean next-token accuracy) over the positions where `mask` is True;
  smoothing spreads that mass uniformly over the vocabulary, as `losses.onehot` does."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, -1)
  m = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m), 1.0)
  hits = (jnp.argmax(logp, -1) == targets).astype(jnp.float32)
  return jnp.sum(nll * m) / count, jnp.sum(hits * m) / count


@dataclasses.dataclass(frozen=True)
class CaptioningTask(TaskBase):
  """Image -> caption.

  Attributes:
    tokenizer: the run's tokenizer (word-level or a Hugging Face tokenizers file).
    vocab_size: the model's output size (num_classes; at least the tokenizer's vocabulary).
    image_shape: (H, W, C) of the images.
    max_len: caption tokens per example: the model reads bos + max_len - 1 tokens and predicts
      max_len (the end token included); decoding generates at most max_len.
    decode: 'greedy' or 'beam'.
    beam_width: hypotheses kept by beam search.
    length_penalty: beam search's length ** penalty divisor (as Hugging Face).
    label_smoothing: mass spread over the vocabulary in the training targets.
    pictures: eval examples `save_pictures` draws.
    references_from: () -> {example id: captions}, read on first use (see the module docstring).
  """

  tokenizer: Any
  vocab_size: int
  image_shape: tuple[int, int, int] = (32, 32, 3)
  max_len: int = 20
  decode: str = "greedy"
  beam_width: int = 3
  length_penalty: float = 1.0
  label_smoothing: float = 0.0
  pictures: int = 8
  references_from: Callable[[], Mapping[int, tuple[str, ...]]] | None = None
  _references: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    if self.decode not in DECODE_METHODS:
      raise ValueError(f"caption.decode={self.decode!r}; choose from {DECODE_METHODS}")
    if self.max_len < 2:
      raise ValueError(f"caption.max_len={self.max_len} must be >= 2")
    if self.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"num_classes={self.vocab_size} is smaller than the tokenizer's "
                       f"{self.tokenizer.vocab_size} tokens")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")

  # -- built from the config ------------------------------------------------------------------
  @classmethod
  def resolve(cls, config, train_input) -> None:
    """Builds the word vocabulary from the training captions into config.caption.vocab (unless
    caption.tokenizer names a file), sets num_classes to the vocabulary size when it is 0 and
    logs how many training captions exceed caption.max_len."""
    source = getattr(train_input, "source", None)
    if not hasattr(source, "all_captions"):
      raise ValueError(f"task 'captioning' needs a caption dataset (coco_captions:, flickr:), "
                       f"not {config.dataset!r}")
    caption = config.caption
    captions = source.all_captions()
    if caption.tokenizer:
      tokenizer = load_tokenizer(str(caption.tokenizer))
    else:
      tokenizer = build_word_tokenizer(captions, int(caption.min_count),
                                       int(caption.max_vocab))
      caption.vocab = tokenizer.vocab
    if not config.num_classes:
      config.num_classes = tokenizer.vocab_size
    truncated = pad_captions(tokenizer, captions, int(caption.max_len)).truncated
    if truncated:
      log.warning("%d of %d training captions are longer than caption.max_len=%d tokens "
                  "(the end token included) and are truncated", truncated, len(captions),
                  int(caption.max_len))

  @classmethod
  def from_config(cls, config) -> CaptioningTask:
    """The task as the resolved run config (`config.caption`) describes it."""
    caption = config.caption
    dataset, split, data = str(config.dataset), str(config.eval_split), config.data
    return cls(
        tokenizer=tokenizer_of(config), vocab_size=int(config.num_classes),
        image_shape=tuple(config.data_info.image_shape), max_len=int(caption.max_len),
        decode=str(caption.decode), beam_width=int(caption.beam_width),
        length_penalty=float(caption.length_penalty),
        label_smoothing=float(config.label_smoothing), pictures=int(caption.pictures),
        references_from=(lambda: caption_references(dataset, split, data)) if split else None)

  def with_references(self, references: Mapping[int, tuple[str, ...]]) -> CaptioningTask:
    """The task scoring against `references` ({example id: captions}) instead of reading them."""
    return dataclasses.replace(self, references_from=lambda: references, _references={})

  @property
  def references(self) -> dict[int, tuple[str, ...]]:
    """{example id: reference captions} of the eval split (read once)."""
    if "all" not in self._references:
      if self.references_from is None:
        raise ValueError("the captioning task has no eval split to take references from")
      self._references["all"] = {int(k): tuple(v) for k, v in self.references_from().items()}
    return self._references["all"]

  @property
  def decode_options(self) -> DecodeOptions:
    """How `predict` decodes."""
    t = self.tokenizer
    return DecodeOptions(max_len=self.max_len, bos_id=t.bos_id, eos_id=t.eos_id, pad_id=t.pad_id,
                         method=self.decode, beam_width=self.beam_width,
                         length_penalty=self.length_penalty)

  # -- the contract with the trainer ----------------------------------------------------------
  @property
  def metric_names(self) -> tuple[str, ...]:
    """BLEU-1..4, CIDEr-D, exact match and token accuracy."""
    return METRICS

  @property
  def num_pictures(self) -> int:
    """Eval examples drawn with their caption and per-word attention."""
    return self.pictures

  def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Images, caption tokens (bos .. eos pad) and their mask."""
    length = self.max_len + 1
    return {"image": image_spec(batch_size, self.image_shape),
            "tokens": jax.ShapeDtypeStruct((batch_size, length), np.int32),
            "token_mask": jax.ShapeDtypeStruct((batch_size, length), np.bool_)}

  def prepare(self, batch: dict, *, train: bool) -> dict:
    """Tokenizes the transform's `caption` per example; the caption strings leave the batch."""
    del train
    if "caption" not in batch:
      raise ValueError("a captioning batch needs the transform's 'caption' (task 'captioning' "
                       "reads coco_captions: or flickr: data)")
    padded = pad_captions(self.tokenizer, list(batch["caption"]), self.max_len)
    out = {k: v for k, v in batch.items() if k not in ("caption", "captions")}
    out["tokens"], out["token_mask"] = padded.tokens, padded.mask
    return out

  def model_inputs(self, batch: dict) -> tuple[tuple, dict]:
    """The model sees the images and the caption without its last token."""
    return (batch["image"], batch["tokens"][:, :-1]), {}

  def loss(self, outputs: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced cross-entropy of the next tokens, and their accuracy."""
    loss, accuracy = sequence_loss(outputs, batch["tokens"][:, 1:], batch["token_mask"][:, 1:],
                                   self.label_smoothing)
    return loss, {"token_accuracy": accuracy}

  def predict(self, forward, batch: dict) -> dict[str, jax.Array]:
    """Generated tokens [B, max_len] and, for pictures, the cross-attention of each generated
    token over the image tokens [B, max_len, N] (mean over layers and heads)."""

    tokens, encoded = generate(forward, batch["image"], self.decode_options,
                               return_encoded=True)
    inputs = jnp.concatenate(
        [jnp.full((tokens.shape[0], 1), self.tokenizer.bos_id, tokens.dtype), tokens[:, :-1]], 1)
    _, state = forward(inputs, encoded, method="decode", mutable=["intermediates"])
    maps = cross_attention_maps(state["intermediates"])
    attention = jnp.mean(jnp.stack([m.astype(jnp.float32) for m in maps]), axis=(0, 2))
    return {"tokens": tokens, "attention": attention}

  def eval_sums(self, predictions: dict, batch: dict) -> dict[str, jax.Array]:
    """The count of valid examples (every metric is computed on the host in `finalize`)."""
    del predictions
    return {"count": jnp.sum(batch["valid"].astype(jnp.float32))}

  def eval_examples(self, predictions: dict, batch: dict) -> dict[str, jax.Array]:
    """Generated tokens, example ids and the valid mask, gathered to the host."""
    return {"tokens": predictions["tokens"], "id": batch["id"], "valid": batch["valid"]}

  def finalize(self, sums: dict, examples: dict) -> dict[str, float]:
    """The caption metrics of the valid examples against all their references."""
    del sums
    valid = np.asarray(examples["valid"]).astype(bool)
    tokens, ids = np.asarray(examples["tokens"])[valid], np.asarray(examples["id"])[valid]
    if not len(ids):
      raise ValueError("captioning evaluation got no valid example")
    references = self.references
    missing = [int(i) for i in ids if int(i) not in references]
    if missing:
      raise ValueError(f"no reference captions for eval example ids {missing[:5]} (of "
                       f"{len(missing)}): the references do not come from the eval split")
    candidates = [self.tokenizer.decode(t) for t in tokens]
    return caption_metrics(candidates, [references[int(i)] for i in ids])

  def check_outputs(self, outputs) -> None:
    """The model must give next-token logits (B, L, vocab_size)."""
    shape = tuple(getattr(outputs, "shape", ()))
    if len(shape) != 3 or shape[-1] != self.vocab_size:
      got = shape if hasattr(outputs, "shape") else type(outputs).__name__
      raise ValueError(f"the model outputs {got}, but captioning needs next-token logits "
                       f"(batch, length, {self.vocab_size}) from (images, tokens): use a "
                       "captioner such as vit_gpt2")

  def save_pictures(self, path_prefix: str, batch: dict, predictions: dict) -> list[str]:
    """One PNG per example: the image with its generated caption, then per word the image
    tinted by that word's cross-attention over the patches."""
    paths = []
    for i in range(min(self.pictures, len(batch["image"]))):
      tokens = np.asarray(predictions["tokens"][i])
      picture = attention_picture(batch["image"][i], tokens, np.asarray(
          predictions["attention"][i]), self.tokenizer)
      path = f"{path_prefix}{i:03d}.png"
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      picture.save(path)
      paths.append(path)
    return paths


def _grid(num_tokens: int, height: int, width: int) -> tuple[int, int, int]:
  """(prefix tokens, rows, cols) of the image tokens: a class token when N - 1 tiles the image's
  aspect ratio as a grid, else none."""
  for prefix in (1, 0):
    n = num_tokens - prefix
    for rows in range(1, n + 1):
      if n % rows == 0 and math.isclose(rows / (n // rows), height / width, rel_tol=0.3):
        return prefix, rows, n // rows
  return 0, 1, num_tokens


def attention_picture(image: np.ndarray, tokens: np.ndarray, attention: np.ndarray,
                      tokenizer: Tokenizer, panel: int = 96):
  """A PIL image: `image` captioned with `tokens`' text, and one panel per generated token
  showing its `attention` [T, N] over the image tokens (the class token left out)."""
  from PIL import Image, ImageDraw

  rgb = to_display(np.asarray(image))
  h, w = rgb.shape[:2]
  scale = panel / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  base = Image.fromarray(rgb).resize(size, Image.NEAREST)
  ids = [int(t) for t in tokens]
  end = ids.index(tokenizer.eos_id) if tokenizer.eos_id in ids else len(ids)
  words = [tokenizer.decode([t]) or "?" for t in ids[:end]] + ["<end>"] * (end < len(ids))
  prefix, rows, cols = _grid(attention.shape[-1], h, w)
  text_h = 14
  canvas = Image.new("RGB", (max(size[0] * max(len(words), 1), size[0] * 3),
                             size[1] * 2 + 3 * text_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  canvas.paste(base, (0, 0))
  draw.text((size[0] + 6, 4), tokenizer.decode(ids), fill=(0, 0, 0))
  for k, word in enumerate(words):
    weights = attention[k, prefix:prefix + rows * cols].reshape(rows, cols)
    weights = weights / max(float(weights.max()), 1e-12)
    heat = Image.fromarray((weights * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    heat = np.asarray(heat, np.float32)[..., None] / 255.0
    # The attended patches keep their colours and glow orange, the rest fades: the "attention
    # filter" (the glow shows attention on dark backgrounds too).
    glow = heat * np.array(_GLOW, np.float32)
    tinted = np.clip(np.asarray(base, np.float32) * (0.3 + 0.7 * heat) * 0.6 + 0.4 * glow, 0, 255)
    tinted = tinted.astype(np.uint8)
    x, y = k * size[0], size[1] + text_h
    canvas.paste(Image.fromarray(tinted), (x, y))
    draw.text((x + 2, y + size[1] + 1), word[:12], fill=(0, 0, 0))
  return canvas


def caption_references(uri: str, split: str, data_config) -> dict[int, tuple[str, ...]]:
  """{example id: captions} of `split` of caption dataset `uri`, with the ids its input gives
  (the same loader, bad-record handling and slicing); images are not decoded."""
  data_config = ml_collections.ConfigDict(dict(data_config.items()))
  data_config.cache_mb = 0  # captions only: no image is decoded
  source = load_source(uri, split, data_config=data_config)
  if not hasattr(source, "references"):
    raise ValueError(f"dataset {uri} has no captions (task 'captioning' needs coco_captions:, "
                     "flickr: or another caption source)")
  return source.references()
