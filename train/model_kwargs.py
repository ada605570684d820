"""Model constructor kwargs written on a command line: `key=value,key=value`.

Shared by `python -m train --model_kwargs` and the benchmarks; standard library only, so the
PyTorch side of the benchmark can import it in an environment without JAX.
"""

from __future__ import annotations

import ast


def parse_model_kwargs(text: str) -> dict:
  """'stem=small,widths=(8,16,32,64),remat=True' -> dict; values are Python literals or strings."""
  kwargs: dict = {}
  if not text:
    return kwargs
  parts, depth, current = [], 0, ""
  for ch in text:  # split on the commas outside brackets
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += ch
  parts.append(current)
  for part in parts:
    key, sep, value = part.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
      raise ValueError(f"model kwargs entry {part!r} is not key=value")
    try:
      kwargs[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      kwargs[key] = value.strip()
  return kwargs
