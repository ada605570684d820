"""Caption metrics on the host: BLEU-1..4 and CIDEr-D exactly as the COCO caption evaluation
(`pycocoevalcap`) computes them, exact match and token accuracy.

Captions are strings of space-separated tokens (`normalize` makes them from raw text: lowercase,
punctuation dropped, as COCO's PTB tokenization does); each candidate has one or more
references.

BLEU (`pycocoevalcap.bleu`): corpus-level, clipped n-gram counts summed over the corpus, the
brevity penalty against the summed closest reference lengths (the shorter one on a tie), and its
smoothing: 1e-15 added to every match count and 1e-9 to every guess count, so a corpus without a
4-gram match scores a tiny positive number, not zero.

CIDEr-D (`pycocoevalcap.cider`): tf-idf n-gram vectors (n = 1..4) with document frequencies
from the references of the evaluated set, the hypothesis's counts clipped by each reference's,
a Gaussian length penalty (sigma 6) between hypothesis and reference, averaged over n and the
references, times 10. Its "length" counts bigrams (a quirk of the reference code that every
published CIDEr-D number shares, so it is kept).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np

from jaxvision.text.tokenizer import words

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap.bleu's smoothing constants


def normalize(text: str) -> str:
  """Lowercase words of `text` joined by single spaces, punctuation dropped."""
  return " ".join(w for w in words(text) if any(ch.isalnum() for ch in w))


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  counts: collections.Counter = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
  if not candidates:
    raise ValueError("caption metrics need at least one candidate")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not len(refs):
      raise ValueError(f"candidate {i} needs a non-empty list of references, got {refs!r}")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]],
         n: int = 4) -> list[float]:
  """Corpus BLEU-1..n of `candidates` against their `references` (pycocoevalcap's numbers)."""
  _check(candidates, references)
  guess, correct = [0] * n, [0] * n
  test_total = ref_total = 0
  for cand, refs in zip(candidates, references, strict=True):
    test = cand.split()
    max_counts: dict = {}
    lengths = []
    for ref in refs:
      tokens = ref.split()
      lengths.append(len(tokens))
      for gram, count in _ngrams(tokens, n).items():
        max_counts[gram] = max(max_counts.get(gram, 0), count)
    testlen = len(test)
    test_total += testlen
    ref_total += min((abs(length - testlen), length) for length in lengths)[1]
    for k in range(n):
      guess[k] += max(0, testlen - k)
    for gram, count in _ngrams(test, n).items():
      correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
  scores, product = [], 1.0
  for k in range(n):
    product *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (test_total + _TINY) / (ref_total + _SMALL)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def _tfidf(counts: collections.Counter, df: dict, log_n: float, n: int):
  vec = [dict() for _ in range(n)]
  norm = [0.0] * n
  length = 0
  for gram, tf in counts.items():
    k = len(gram) - 1
    vec[k][gram] = float(tf) * (log_n - np.log(max(1.0, df.get(gram, 0.0))))
    norm[k] += pow(vec[k][gram], 2)
    if k == 1:  # pycocoevalcap's length: the number of bigrams
      length += tf
  return vec, [np.sqrt(v) for v in norm], length


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
  """(CIDEr-D of the corpus, per candidate) with document frequencies from `references`."""
  _check(candidates, references)
  cooked_refs = [[_ngrams(r.split(), n) for r in refs] for refs in references]
  df: dict = collections.defaultdict(float)
  for refs in cooked_refs:
    for gram in {g for ref in refs for g in ref}:
      df[gram] += 1
  log_n = np.log(float(len(references)))
  scores = []
  for cand, refs in zip(candidates, cooked_refs, strict=True):
    vec, norm, length = _tfidf(_ngrams(cand.split(), n), df, log_n, n)
    total = np.array([0.0] * n)
    for ref in refs:
      vec_r, norm_r, length_r = _tfidf(ref, df, log_n, n)
      delta = float(length - length_r)
      val = np.array([0.0] * n)
      for k in range(n):
        for gram in vec[k]:
          ref_value = vec_r[k].get(gram, 0.0)
          val[k] += min(vec[k][gram], ref_value) * ref_value
        if norm[k] != 0 and norm_r[k] != 0:
          val[k] /= norm[k] * norm_r[k]
        val[k] *= np.e ** (-(delta**2) / (2 * sigma**2))
      total += val
    score = np.mean(total)
    score /= len(refs)
    score *= 10.0
    scores.append(score)
  scores = np.array(scores)
  return float(np.mean(scores)), scores


def exact_match(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of candidates equal to one of their references."""
  _check(candidates, references)
  return float(np.mean([c in set(refs) for c, refs in zip(candidates, references, strict=True)]))


def token_accuracy(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Mean over candidates of the best, over its references, fraction of aligned positions that
  agree (the end of the caption counts as a token; the longer of the two sets the length)."""
  _check(candidates, references)
  per_candidate = []
  for cand, refs in zip(candidates, references, strict=True):
    c = [*cand.split(), None]
    best = 0.0
    for ref in refs:
      r = [*ref.split(), None]
      agree = sum(a == b for a, b in zip(c, r, strict=False))  # up to the shorter one
      best = max(best, agree / max(len(c), len(r)))
    per_candidate.append(best)
  return float(np.mean(per_candidate))


def caption_metrics(candidates: Sequence[str],
                    references: Sequence[Sequence[str]]) -> dict[str, float]:
  """bleu1..bleu4, cider (CIDEr-D), exact_match and token_accuracy of normalized captions."""
  candidates = [normalize(c) for c in candidates]
  references = [[normalize(r) for r in refs] for refs in references]
  scores = bleu(candidates, references)
  out = {f"bleu{k + 1}": float(s) for k, s in enumerate(scores)}
  out["cider"] = cider_d(candidates, references)[0]
  out["exact_match"] = exact_match(candidates, references)
  out["token_accuracy"] = token_accuracy(candidates, references)
  return out
