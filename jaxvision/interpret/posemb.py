"""Position-embedding similarity of a Vision Transformer (the ViT paper's figure 7, centre).

For each patch position, the cosine similarity of its embedding with every other position's,
laid out as a (rows, cols) map; all the maps together form a (rows, cols, rows, cols) array that
`jaxvision.interpret.plots.heatmap_grid` draws as a grid of small maps. A position is always
most similar to itself (1); learned embeddings show the 2-D structure they picked up.
"""

from __future__ import annotations

import numpy as np

from jaxvision.layers.embed import fixed_posemb
from jaxvision.models.vit import VisionTransformer


def model_posemb(model, params: dict) -> np.ndarray:
  """A ViT's patch position embeddings (rows * cols, D), learned or fixed, prefix tokens dropped."""
  if not isinstance(model, VisionTransformer):
    raise ValueError(f"position embeddings need a VisionTransformer, got {type(model).__name__}")
  if model.posemb == "learn":
    if "pos_embed" not in params:
      raise ValueError("params have no 'pos_embed' for a ViT with posemb='learn'")
    pe = np.asarray(params["pos_embed"], np.float32)
  else:
    pe = fixed_posemb(model.posemb, model.grid, model.width, model.num_prefix_tokens)
  return pe[0, model.num_prefix_tokens:]


def posemb_similarity(posemb, grid: tuple[int, int]) -> np.ndarray:
  """Cosine similarities (rows, cols, rows, cols) between the (rows * cols, D) embeddings."""
  pe = np.asarray(posemb, np.float64)
  if pe.ndim == 3 and pe.shape[0] == 1:
    pe = pe[0]
  rows, cols = grid
  if pe.ndim != 2 or pe.shape[0] != rows * cols:
    raise ValueError(f"position embeddings of shape {pe.shape} do not fit a {rows}x{cols} grid "
                     "(drop the class token first)")
  unit = pe / np.maximum(np.linalg.norm(pe, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).astype(np.float32).reshape(rows, cols, rows, cols)
