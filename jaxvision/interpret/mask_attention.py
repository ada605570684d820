"""What the Segmenter mask transformer's class embeddings see, per class, over the image.

Two views of a `segmenter_mask_*` model, each `(model, variables, images) -> maps [N, K, H, W]`
(bilinearly upsampled from the patch grid to the image size, like the logits):

  * `class_masks`: the decoder's masks before the mask norm, the cosine similarity in [-1, 1] of
    every projected, L2-normalised patch embedding with every class embedding. The mask norm (a
    LayerNorm over the K classes of each patch) turns them into the logits; where a class's
    similarity stands out from the other classes', that class is predicted.
  * `class_attention`: in one of the decoder's layers (default: the last), the attention of each
    class embedding, as the query, over the patch tokens, averaged over the heads: where the
    class reads its evidence from. Each class's row also spends weight on the K class
    embeddings, so a map sums to at most 1 over the patches.

`mask_attention_figure` draws either over the images: one row per image, one column per class.
Images of another size than the model's `image_size` go through it in one pass, with the position
embedding resampled (a model's `eval_margin` windows are not used), so pass training-size crops
to see exactly what the trained model sees.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.interpret.plots import display_image, new_figure
from jaxvision.models.segmenter import Segmenter, upsample_logits


def check_model(model) -> None:
  """A one-line error unless `model` is a Segmenter with the mask-transformer decoder."""
  if not isinstance(model, Segmenter) or model.decoder != "mask":
    name = type(model).__name__ + (f"(decoder={model.decoder!r})"
                                   if isinstance(model, Segmenter) else "")
    raise ValueError(f"mask attention needs a Segmenter with decoder='mask', got {name}")


def _check(model, images) -> jax.Array:
  check_model(model)
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"mask attention expects [N, H, W, C] images, got shape {images.shape}")
  return images


@functools.lru_cache(maxsize=8)
def _intermediates_fn(model):
  # One pass over the whole image: windowed evaluation would sow one set of maps per window.
  model = model.clone(eval_margin=None)

  def run(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    return state["intermediates"]

  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _decoder_attention_fn(model, grid: tuple[int, int]):
  decoder = model.decoder_module(attention_impl="explicit")

  def run(decoder_params, tokens):
    _, state = decoder.apply({"params": decoder_params}, tokens, grid, train=False,
                             mutable=["intermediates"])
    return [state["intermediates"][f"blocks_{i}"]["attn"]["attend"]["attention_weights"][0]
            for i in range(model.decoder_layers)]

  return jax.jit(run)


def _to_image(grid_maps: jax.Array, height: int, width: int, patch_size: int) -> np.ndarray:
  """[N, K, rows, cols] -> [N, K, H, W]: upsampled to the padded input, padding cropped."""

  rows, cols = grid_maps.shape[2:]
  maps = jnp.transpose(grid_maps.astype(jnp.float32), (0, 2, 3, 1))
  maps = upsample_logits(maps, rows * patch_size, cols * patch_size)[:, :height, :width]
  return np.asarray(jnp.transpose(maps, (0, 3, 1, 2)))


def class_masks(model, variables: dict, images) -> np.ndarray:
  """Patch x class cosine similarities before the mask norm, at image size: [N, K, H, W]."""
  images = _check(model, images)
  masks = _intermediates_fn(model)(variables, images)["decoder"]["masks"][0]  # [N, r, c, K]
  return _to_image(jnp.transpose(masks, (0, 3, 1, 2)), *images.shape[1:3], model.patch_size)


def class_attention(model, variables: dict, images, *, layer: int = -1) -> np.ndarray:
  """Head-mean attention of each class embedding over the patches in decoder layer `layer`
  (negative counts from the last), at image size: [N, K, H, W]."""
  images = _check(model, images)
  if not -model.decoder_layers <= layer < model.decoder_layers:
    raise ValueError(f"layer={layer}: the decoder has {model.decoder_layers} layers")
  intermediates = _intermediates_fn(model)(variables, images)
  tokens = intermediates["encoded"][0][:, model.num_prefix_tokens:]
  p = model.patch_size
  grid = (-(-images.shape[1] // p), -(-images.shape[2] // p))
  weights = _decoder_attention_fn(model, grid)(variables["params"]["decoder"], tokens)[layer]
  n = grid[0] * grid[1]
  # Rows n: are the class queries, columns :n the patch keys.
  per_class = jnp.mean(weights[:, :, n:, :n].astype(jnp.float32), axis=1)
  per_class = per_class.reshape((per_class.shape[0], model.num_classes, *grid))
  return _to_image(per_class, *images.shape[1:3], p)


def mask_attention_figure(
    images, maps, *, class_names: Sequence[str] | None = None, alpha: float = 0.55,
    cell_inches: float = 1.4, dpi: int = 100, title: str | None = None,
):
  """One row per image: the image, then each class's map [N, K, H, W] blended on top.

  Maps with negative values (`class_masks`) share a diverging scale symmetric about 0; others
  (`class_attention`) a sequential scale from 0 to their maximum.
  """
  images, maps = np.asarray(images), np.asarray(maps, np.float32)
  if maps.ndim != 4 or len(maps) != len(images) or maps.shape[2:] != images.shape[1:3]:
    raise ValueError(f"maps {maps.shape} must be [N, K, H, W] for images {images.shape}")
  n, k = maps.shape[:2]
  names = [str(c) for c in (class_names if class_names is not None else range(k))]
  if len(names) != k:
    raise ValueError(f"{len(names)} class names for {k} maps per image")
  peak = max(float(np.abs(maps).max()), 1e-12)
  if maps.min() < 0:
    cmap, vmin, vmax = "RdBu_r", -peak, peak
  else:
    cmap, vmin, vmax = "jet", 0.0, peak
  width = (k + 1) * cell_inches
  # The title wraps to the figure's width (about 13 characters an inch at 9 pt).
  title = textwrap.fill(title, max(20, int(width * 13))) if title else None
  title_inches = 0.16 * (title.count("\n") + 1) if title else 0.0
  fig = new_figure(width, n * cell_inches + 0.25 + title_inches, dpi)
  for i in range(n):
    shown = display_image(images[i])
    gray = "gray" if shown.ndim == 2 else None
    for j in range(k + 1):
      ax = fig.add_subplot(n, k + 1, i * (k + 1) + j + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.imshow(shown, cmap=gray, vmin=0, vmax=1)
      if j:
        ax.imshow(maps[i, j - 1], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
      if i == 0:
        ax.set_title("image" if j == 0 else names[j - 1], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - (0.05 + title_inches) / fig.get_size_inches()[1]
                                  if title else 1))
  return fig
