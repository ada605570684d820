"""Caption tokenizers: a word-level vocabulary built from training captions, or a Hugging Face
`tokenizers` JSON file (e.g. GPT-2's BPE `tokenizer.json`), behind one small interface:

    tokenizer.encode(text) -> [ids]          (no special tokens)
    tokenizer.decode(ids) -> text            (stops at the end token, drops pad / bos)
    tokenizer.pad_id, bos_id, eos_id, vocab_size
    pad_captions(tokenizer, captions, max_len) -> PaddedCaptions (tokens, mask, truncated)

Word-level text is lowercased and punctuation is split off as its own token
(`words("A dog, running.") == ['a', 'dog', ',', 'running', '.']`); ids 0..3 are the special
tokens `<pad>`, `<bos>`, `<eos>`, `<unk>`, then words by falling count (ties alphabetical).
Either kind is saved to / loaded from a JSON file (`save`, `load_tokenizer`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
WORD_FORMAT = "jaxvision-word-tokenizer"
_TOKEN = re.compile(r"\w+|[^\w\s]")
# Special-token spellings of common Hugging Face tokenizers, tried in order.
_HF_SPECIALS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"),
    "bos": ("<bos>", "<s>", "[CLS]", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "[SEP]", "<|endoftext|>"),
}


def words(text: str) -> list[str]:
  """Lowercased word and punctuation tokens of `text`."""
  return _TOKEN.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Word-level vocabulary; unknown words map to `<unk>`.

  Attributes:
    vocab: every token in id order, the four special tokens first.
  """

  vocab: tuple[str, ...]
  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3  # class constants: the SPECIALS' positions

  def __post_init__(self):
    vocab = tuple(str(w) for w in self.vocab)
    if vocab[:len(SPECIALS)] != SPECIALS:
      raise ValueError(f"word vocabulary must start with {SPECIALS}, got {vocab[:4]}")
    if len(set(vocab)) != len(vocab):
      dup = next(w for w, n in collections.Counter(vocab).items() if n > 1)
      raise ValueError(f"word vocabulary lists {dup!r} twice")
    object.__setattr__(self, "vocab", vocab)
    object.__setattr__(self, "_index", {w: i for i, w in enumerate(vocab)})

  @property
  def vocab_size(self) -> int:
    """Tokens in the vocabulary, special tokens included."""
    return len(self.vocab)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no start or end token)."""
    return [self._index.get(w, self.unk_id) for w in words(text)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` (a leading start token skipped) up to the first end token, without
    padding."""
    out = []
    for i in _content(ids, self):
      out.append(self.vocab[i] if 0 <= i < len(self.vocab) else SPECIALS[self.unk_id])
    return " ".join(out)

  def to_json(self) -> dict:
    """The JSON object `save` writes."""
    return {"format": WORD_FORMAT, "vocab": list(self.vocab)}

  def save(self, path: str) -> None:
    """Writes the vocabulary to `path` (JSON)."""
    with open(path, "w") as f:
      json.dump(self.to_json(), f)


def build_word_tokenizer(captions: Iterable[str], min_count: int = 1,
                         max_size: int = 0) -> WordTokenizer:
  """The vocabulary of `captions`: words seen at least `min_count` times, the most frequent
  first, at most `max_size` tokens in all (0: no limit)."""
  if min_count < 1:
    raise ValueError(f"caption min_count={min_count} must be >= 1")
  counts = collections.Counter(w for caption in captions for w in words(caption))
  kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                key=lambda w: (-counts[w], w))
  if max_size:
    kept = kept[:max(0, max_size - len(SPECIALS))]
  if not kept:
    raise ValueError(f"no caption word occurs min_count={min_count} times: the captions are "
                     "empty or min_count is too high")
  return WordTokenizer(SPECIALS + tuple(kept))


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file (the optional `text` extra).

  Attributes:
    path: the tokenizer.json file.
    pad_id / bos_id / eos_id: special token ids (found by their usual spellings, or given).
  """

  def __init__(self, path: str, *, pad_id: int | None = None, bos_id: int | None = None,
               eos_id: int | None = None):
    try:
      import tokenizers
    except ImportError:
      raise ValueError(f"caption tokenizer {path} needs the Hugging Face tokenizers package: "
                       "pip install 'jaxvision[text]'") from None
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception type with a message
      raise ValueError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
    self.path = path
    given = {"pad": pad_id, "bos": bos_id, "eos": eos_id}
    for kind, spellings in _HF_SPECIALS.items():
      if given[kind] is None:
        found = [self._tokenizer.token_to_id(s) for s in spellings]
        found = [i for i in found if i is not None]
        if not found:
          raise ValueError(f"tokenizer {path} has no {kind} token (tried {spellings}); pass "
                           f"{kind}_id")
        given[kind] = found[0]
    self.pad_id, self.bos_id, self.eos_id = (int(given[k]) for k in ("pad", "bos", "eos"))

  @property
  def vocab_size(self) -> int:
    """Tokens in the vocabulary, added tokens included."""
    return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no start or end token)."""
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` (a leading start token skipped) up to the first end token, without
    padding."""
    return self._tokenizer.decode(_content(ids, self), skip_special_tokens=True).strip()

  def save(self, path: str) -> None:
    """Writes the tokenizer to `path` (its tokenizers JSON)."""
    self._tokenizer.save(path)


Tokenizer = WordTokenizer | HFTokenizer


def _content(ids: Iterable[int], tokenizer) -> list[int]:
  """The caption's own ids: one leading start token skipped, cut at the first end token, no
  padding (GPT-2 uses one id for all three, hence the order of the checks)."""
  ids = [int(i) for i in ids]
  if ids and ids[0] == tokenizer.bos_id:
    ids = ids[1:]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return [i for i in ids if i != tokenizer.pad_id]


def load_tokenizer(path: str) -> Tokenizer:
  """A word-level vocabulary (saved by `WordTokenizer.save`) or a Hugging Face tokenizer.json."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"caption tokenizer {path}: no such file") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"caption tokenizer {path} is not a readable JSON file: {e}") from None
  if isinstance(data, dict) and data.get("format") == WORD_FORMAT:
    return WordTokenizer(tuple(data.get("vocab", ())))
  if isinstance(data, dict) and "model" in data:
    return HFTokenizer(path)
  raise ValueError(f"caption tokenizer {path} is neither a jaxvision word vocabulary nor a "
                   "Hugging Face tokenizers JSON file")


@dataclasses.dataclass(frozen=True)
class PaddedCaptions:
  """Captions as fixed-size token rows.

  Attributes:
    tokens: [N, max_len + 1] int32: bos, caption tokens, eos, then padding.
    mask: [N, max_len + 1] bool, True from bos through eos.
    truncated: how many captions were cut to fit (their eos is kept).
  """

  tokens: np.ndarray
  mask: np.ndarray
  truncated: int


def pad_captions(tokenizer: Tokenizer, captions: Sequence[str], max_len: int) -> PaddedCaptions:
  """`captions` as [N, max_len + 1] rows `bos w1 .. wn eos pad ..`: a model reads the first
  max_len columns and predicts the last max_len; longer captions keep their first max_len - 1
  tokens and the end token."""
  if max_len < 2:
    raise ValueError(f"caption max_len={max_len} must be >= 2 (a word and the end token)")
  tokens = np.full((len(captions), max_len + 1), tokenizer.pad_id, np.int32)
  lengths = np.zeros(len(captions), np.int64)
  truncated = 0
  for row, caption in enumerate(captions):
    ids = tokenizer.encode(caption)
    if len(ids) > max_len - 1:
      ids, truncated = ids[:max_len - 1], truncated + 1
    tokens[row, :len(ids) + 2] = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    lengths[row] = len(ids) + 2
  mask = np.arange(max_len + 1)[None, :] < lengths[:, None]
  return PaddedCaptions(tokens, mask, truncated)
