"""Caption metrics: BLEU-1..4 and CIDEr-D equal to pycocoevalcap on random corpora (random
vocabularies, lengths and reference counts, including empty and one-word captions), exact
match, token accuracy, normalization and bad input."""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from jaxvision.captioning import (
    bleu,
    caption_metrics,
    cider_d,
    exact_match,
    normalize,
    token_accuracy,
)


def _corpus(rng, images: int, vocab: int, max_len: int, min_len: int = 0):
  words = [f"w{i}" for i in range(vocab)]

  def sentence():
    return " ".join(rng.choice(words, rng.integers(min_len, max_len + 1)))

  candidates = [sentence() for _ in range(images)]
  references = [[sentence() for _ in range(rng.integers(1, 6))] for _ in range(images)]
  # Some candidates copy (part of) a reference, so higher n-grams match too.
  for i in range(0, images, 3):
    ref = references[i][0].split()
    candidates[i] = " ".join(ref[: rng.integers(0, len(ref) + 1)] + ["w0"])
  return candidates, references


@pytest.mark.parametrize("seed,images,vocab,max_len", [
    (0, 40, 6, 12), (1, 25, 30, 8), (2, 60, 3, 5), (3, 7, 12, 20), (4, 1, 4, 6)])
def test_bleu_and_cider_equal_pycocoevalcap(seed, images, vocab, max_len):
  rng = np.random.default_rng(seed)
  candidates, references = _corpus(rng, images, vocab, max_len, min_len=1 if seed == 1 else 0)
  gts = {i: refs for i, refs in enumerate(references)}
  res = {i: [c] for i, c in enumerate(candidates)}
  want_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  got_bleu = bleu(candidates, references)
  np.testing.assert_allclose(got_bleu, want_bleu, rtol=1e-12, atol=0)
  want_cider, want_each = Cider().compute_score(gts, res)
  got_cider, got_each = cider_d(candidates, references)
  np.testing.assert_allclose(got_each, want_each, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(got_cider, want_cider, rtol=1e-12, atol=1e-15)
  if images > 1:
    assert 0 < got_bleu[0] < 1 and got_cider > 0  # non-trivial corpora


def test_perfect_captions_score_one_and_known_values():
  refs = [["a dog runs on the grass"], ["two cats sleep"]]
  scores = caption_metrics(["A dog runs on the grass.", "two cats sleep"], refs)
  np.testing.assert_allclose([scores[f"bleu{k}"] for k in range(1, 5)], 1.0, rtol=1e-9)
  assert scores["exact_match"] == 1.0 and scores["token_accuracy"] == 1.0
  # One word of four right, one reference of the same length: BLEU-1 is 1/4, no brevity penalty.
  np.testing.assert_allclose(bleu(["a b c d"], [["a x y z"]])[0], 0.25, rtol=1e-9)
  # A candidate half as long as its reference: BLEU-1 = exp(1 - 2) * 1.
  np.testing.assert_allclose(bleu(["a b"], [["a b c d"]])[0], np.exp(-1.0), rtol=1e-9)


def test_exact_match_token_accuracy_and_normalize():
  assert normalize("A Dog, running!  Fast.") == "a dog running fast"
  refs = [["a dog runs", "the dog runs"], ["a cat"]]
  assert exact_match(["the dog runs", "a cat sits"], refs) == 0.5
  # 'the dog sits' vs 'the dog runs': the, dog and the end agree, 3 of 4 positions; 'a cat sits'
  # vs 'a cat': a and cat agree, 'sits' vs the end and the end vs nothing do not, 2 of 4.
  np.testing.assert_allclose(token_accuracy(["the dog sits", "a cat sits"], refs), 0.625)


def test_bad_input_raises_value_errors():
  with pytest.raises(ValueError, match="2 candidates but 1"):
    bleu(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="candidate 0 needs a non-empty list"):
    cider_d(["a"], [[]])
  with pytest.raises(ValueError, match="candidate 0 needs a non-empty list"):
    exact_match(["a"], ["a"])
  with pytest.raises(ValueError, match="at least one"):
    token_accuracy([], [])
