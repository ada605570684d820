"""Caption tokenizers: the word vocabulary (lowercase, punctuation split, min count, special
tokens, frequency order), JSON save/load, a Hugging Face tokenizers BPE file trained here with
the tokenizers library, padding and truncation, encode/decode round trips, bad files."""

import json

import numpy as np
import pytest

from jaxvision.text import (
    SPECIALS,
    HFTokenizer,
    WordTokenizer,
    build_word_tokenizer,
    load_tokenizer,
    pad_captions,
    words,
)

CAPTIONS = ["A dog runs on the grass.", "The dog, a puppy, sleeps.", "a cat sleeps",
            "Two dogs run!"]


def test_words_lowercase_and_split_punctuation():
  assert words("The dog, a PUPPY, sleeps.") == ["the", "dog", ",", "a", "puppy", ",", "sleeps",
                                                 "."]


def test_word_vocabulary_min_count_order_and_round_trip(tmp_path):
  tok = build_word_tokenizer(CAPTIONS, min_count=2)
  assert tok.vocab[:4] == SPECIALS == ("<pad>", "<bos>", "<eos>", "<unk>")
  # a x3, dog x2, the x2, sleeps x2, . x2, ',' x2 (most frequent first, ties alphabetical).
  assert tok.vocab[4:] == ("a", ",", ".", "dog", "sleeps", "the")
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  ids = tok.encode("The dog sleeps on a sofa.")
  assert ids == [9, 7, 8, tok.unk_id, 4, tok.unk_id, 6]
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, 5, 5]) == "the dog sleeps <unk> a <unk> ."
  assert tok.decode([7, 0, 8]) == "dog sleeps"  # padding is dropped
  path = tmp_path / "vocab.json"
  tok.save(str(path))
  assert load_tokenizer(str(path)) == tok
  everything = build_word_tokenizer(CAPTIONS)
  assert everything.decode(everything.encode(CAPTIONS[1])) == "the dog , a puppy , sleeps ."
  assert build_word_tokenizer(CAPTIONS, max_size=6).vocab == SPECIALS + ("a", ",")


def test_padding_truncation_and_mask():
  tok = build_word_tokenizer(CAPTIONS)
  padded = pad_captions(tok, ["a dog", "the dog , a puppy , sleeps ."], max_len=5)
  assert padded.tokens.shape == (2, 6) and padded.tokens.dtype == np.int32
  a, dog = tok.encode("a dog")
  np.testing.assert_array_equal(padded.tokens[0], [1, a, dog, 2, 0, 0])
  np.testing.assert_array_equal(padded.mask[0], [1, 1, 1, 1, 0, 0])
  # Cut to max_len - 1 tokens, the end token kept.
  assert padded.truncated == 1
  np.testing.assert_array_equal(padded.tokens[1], [1, *tok.encode("the dog , a"), 2])
  assert padded.mask[1].all()
  with pytest.raises(ValueError, match="max_len=1"):
    pad_captions(tok, ["a"], max_len=1)


def _train_bpe(path, specials):
  """A byte-level BPE like GPT-2's, trained on CAPTIONS by the tokenizers library itself."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers

  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(CAPTIONS * 5, trainer)
  bpe.save(str(path))
  return bpe


def test_hugging_face_bpe_file(tmp_path):
  path = tmp_path / "tokenizer.json"
  reference = _train_bpe(path, SPECIALS)
  tok = load_tokenizer(str(path))
  assert isinstance(tok, HFTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == reference.get_vocab_size()
  ids = tok.encode("a dog sleeps")
  assert ids == reference.encode("a dog sleeps").ids and len(ids) >= 3
  padded = pad_captions(tok, ["a dog sleeps", "two dogs run"], max_len=12)
  assert padded.truncated == 0
  assert [tok.decode(row) for row in padded.tokens] == ["a dog sleeps", "two dogs run"]


def test_gpt2_style_single_special_token(tmp_path):
  # GPT-2's tokenizer.json has one special token, <|endoftext|>, for start, end and padding.
  path = tmp_path / "gpt2ish.json"
  _train_bpe(path, ("<|endoftext|>",))
  tok = HFTokenizer(str(path))
  assert tok.pad_id == tok.bos_id == tok.eos_id
  row = pad_captions(tok, ["a cat sleeps"], max_len=10).tokens[0]
  assert row[0] == tok.bos_id and tok.decode(row) == "a cat sleeps"


def test_bad_tokenizer_files_raise_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_tokenizer(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not a readable JSON"):
    load_tokenizer(str(bad))
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"hello": 1}))
  with pytest.raises(ValueError, match="neither a jaxvision word vocabulary"):
    load_tokenizer(str(other))
  with pytest.raises(ValueError, match="must start with"):
    WordTokenizer(("a", "b"))
  with pytest.raises(ValueError, match="lists 'a' twice"):
    WordTokenizer(SPECIALS + ("a", "a"))
  with pytest.raises(ValueError, match="min_count=9"):
    build_word_tokenizer(CAPTIONS, min_count=9)
