"""What a Vision Transformer looks at: class-token attention per layer and head, and rollout.

The ViT's explicit attention path sows each block's weights (B, heads, N, N), rows summing to 1
over the keys. `attention_weights` runs a model with that path on, whatever `attention_impl`
it was built with. From the weights:

  * `cls_attention`: the class token's row in every layer and head, without the prefix tokens,
    reshaped to the patch grid: (layers, B, heads, rows, cols).
  * `attention_rollout` (Abnar & Zuidema, 2020): how attention flows from the output tokens to
    the input tokens through all layers. Each layer's head-mean attention is mixed with the
    identity for the residual connection, 0.5 * A + 0.5 * I, rows renormalised, and the layers
    multiplied: R = A_L ... A_1. Every row of R sums to 1.
  * `rollout_map`: the class token's row of R over the patch grid (or, for models without a
    class token, the mean row), which `jaxvision.interpret.plots.overlay_grid` draws on the image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvision.models.vit import VisionTransformer, attention_maps

HEAD_FUSIONS = ("mean", "max", "min")


def attention_weights(model, variables: dict, images: jax.Array) -> list[jax.Array]:
  """Per-block attention weights (B, heads, N, N) of a ViT, in depth order, as float32."""
  if not isinstance(model, VisionTransformer):
    raise ValueError(f"attention maps need a VisionTransformer, got {type(model).__name__}")
  explicit = model.clone(attention_impl="explicit")
  _, state = explicit.apply(variables, jnp.asarray(images), train=False, mutable=["intermediates"])
  return [w.astype(jnp.float32) for w in attention_maps(state["intermediates"])]


def _stack(weights) -> jax.Array:
  weights = jnp.stack(list(weights)) if isinstance(weights, (list, tuple)) else jnp.asarray(weights)
  if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
    raise ValueError("attention weights must be (layers, B, heads, N, N) or a list of "
                     f"(B, heads, N, N); got shape {tuple(weights.shape)}")
  return weights.astype(jnp.float32)


def _to_grid(rows: jax.Array, grid: tuple[int, int], num_prefix_tokens: int) -> jax.Array:
  n = rows.shape[-1] - num_prefix_tokens
  if n != grid[0] * grid[1]:
    raise ValueError(f"{rows.shape[-1]} tokens minus {num_prefix_tokens} prefix tokens do not "
                     f"fill a {grid[0]}x{grid[1]} patch grid")
  return rows[..., num_prefix_tokens:].reshape(rows.shape[:-1] + tuple(grid))


def cls_attention(weights, grid: tuple[int, int], num_prefix_tokens: int = 1) -> jax.Array:
  """Class-token attention to the patches: (layers, B, heads, rows, cols)."""
  if num_prefix_tokens < 1:
    raise ValueError("cls_attention needs a class token (num_prefix_tokens >= 1); use rollout_map")
  return _to_grid(_stack(weights)[:, :, :, 0, :], grid, num_prefix_tokens)


def attention_rollout(weights, *, head_fusion: str = "mean", residual: bool = True) -> jax.Array:
  """Attention rollout R = A_L ... A_1 over the layers: (B, N, N), each row summing to 1."""
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f"head_fusion={head_fusion!r}; choose from {HEAD_FUSIONS}")
  weights = _stack(weights)
  fused = getattr(jnp, head_fusion)(weights, axis=2)  # (layers, B, N, N)
  n = fused.shape[-1]
  if residual:
    # The residual connection carries each token's own value past the attention.
    fused = 0.5 * fused + 0.5 * jnp.eye(n, dtype=fused.dtype)
  fused = fused / jnp.sum(fused, axis=-1, keepdims=True)

  def step(rollout, layer):
    return layer @ rollout, None

  init = jnp.broadcast_to(jnp.eye(n, dtype=fused.dtype), fused.shape[1:])
  rollout, _ = jax.lax.scan(step, init, fused)
  return rollout


def rollout_map(rollout: jax.Array, grid: tuple[int, int], num_prefix_tokens: int = 1) -> jax.Array:
  """The class token's rollout row over the patch grid (the mean row without a class token),
  scaled so each map's maximum is 1: (B, rows, cols)."""
  rows = rollout[:, 0, :] if num_prefix_tokens else jnp.mean(rollout, axis=1)
  maps = _to_grid(rows, grid, num_prefix_tokens)
  return maps / jnp.maximum(jnp.max(maps, axis=(1, 2), keepdims=True), 1e-12)


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(..., rows, cols) patch maps -> (..., H, W), each patch's value spread over its pixels."""
  lead = maps.shape[:-2]
  # Nearest: one value per patch is what attention gives; smoothing would invent detail.
  return jax.image.resize(maps, (*lead, *size), method="nearest")
