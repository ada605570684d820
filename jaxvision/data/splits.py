"""TFDS slicing syntax for every source: ``train``, ``train[:80%]``, ``test[8000:]``, ``a+b``."""

from __future__ import annotations

import re

import numpy as np

_SLICE = re.compile(r"^\s*(?P<name>[\w-]+)\s*(\[(?P<start>[^:\]]*):(?P<end>[^\]]*)\])?\s*$")


def _boundary(text: str, n: int, default: int, split: str) -> int:
  text = text.strip()
  if not text:
    return default
  try:
    if text.endswith("%"):
      value = float(text[:-1])
      # Percent boundaries round to the closest example, as TFDS does by default.
      index = int(np.floor(abs(value) * n / 100 + 0.5))
      index = -index if value < 0 else index
    else:
      index = int(text)
  except ValueError:
    raise ValueError(f"split {split!r}: cannot read slice boundary {text!r}") from None
  if index < 0:
    index += n
  return min(max(index, 0), n)


def split_indices(split: str, sizes: dict[str, int]) -> list[tuple[str, np.ndarray]]:
  """Resolves `split` against the named splits' sizes into (split name, example indices) parts.

  Raises a ValueError naming the split when it is malformed, names an unknown split, or
  selects no example.
  """
  parts = []
  for piece in split.split("+"):
    match = _SLICE.match(piece)
    if not match:
      raise ValueError(f"split {split!r} is not TFDS slicing syntax (e.g. 'train[:80%]')")
    name = match["name"]
    if name not in sizes:
      raise ValueError(f"split {split!r}: unknown split {name!r}; this dataset has {sorted(sizes)}")
    n = sizes[name]
    start = _boundary(match["start"] or "", n, 0, split)
    end = _boundary(match["end"] or "", n, n, split)
    parts.append((name, np.arange(start, max(start, end))))
  if sum(len(idx) for _, idx in parts) == 0:
    raise ValueError(f"split {split!r} selects no example (sizes: {sizes})")
  return parts


_NAME = re.compile(r"^\s*([\w-]+)")


def named_splits(split: str) -> list[str]:
  """The split names a slicing expression refers to, in order ('train[:5]+test' -> train, test)."""
  names = []
  for piece in split.split("+"):
    match = _NAME.match(piece)
    if match and match[1] not in names:
      names.append(match[1])
  return names
