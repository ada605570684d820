"""Grad-CAM (Selvaraju et al., 2017) for any CNN of the registry, with no change to the model.
(Vision Transformers have no spatial feature map: see jaxvision.interpret.attention.)

The class score's gradient with respect to a layer's activations A (B, h, w, C), averaged over
the positions, gives one weight per channel; the weighted sum of the channels, rectified, is the
map of where the evidence for the class lies. It is upsampled to the image and scaled to [0, 1].

A layer is named in one of two ways:

  * a submodule, by its '/'-joined path (`conv2` in LeNet, `layer3_0` in a ResNet, `block2`):
    A is its output. To get dA without editing the model, a method interceptor
    (`flax.linen.intercept_methods`) adds a zero tensor `delta` to that output and `jax.grad`
    is taken with respect to `delta`: d score / d delta = d score / d A at delta = 0. Feature
    maps that a parent computes inline (an activation after a conv submodule) are not
    submodules; Grad-CAM then sees the conv's pre-activation output.
  * a perturbation point: a model that writes `x = self.perturb(name, x)` next to
    `self.sow('intermediates', name, x)` exposes exactly that (post-activation) map; the
    gradient comes from Flax's 'perturbations' collection. These points are preferred.

The coarse map is placed over the image by its measured receptive-field centres
(`receptive_field_centers`), not stretched edge to edge, which is off for 'VALID' convolutions.

    layers = feature_layers(model, variables, images)      # [(path, (B, h, w, C)), ...]
    result = gradcam(model, variables, images)             # the last layer with h * w > 1
    result.heatmaps                                        # (B, H, W) in [0, 1]
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvision.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class GradCAM:
  """What `gradcam` returns.

  Attributes:
    heatmaps: (B, H, W) float32 maps at the image size, each scaled to [0, 1] (all zeros when no
      position has positive evidence).
    coarse: (B, h, w) the same maps at the layer's resolution, before upsampling and scaling.
    class_index: (B,) the class whose score was explained.
    logits: (B, K) the model's logits.
    layer: path of the explained layer.
  """

  heatmaps: jax.Array
  coarse: jax.Array
  class_index: jax.Array
  logits: jax.Array
  layer: str


def _logits_of(output) -> jax.Array:
  """A model's class logits: the array itself, or the 'logits' entry of a multi-head dict."""
  if isinstance(output, dict):
    if "logits" not in output:
      raise ValueError(f"model output is a dict without 'logits' (keys {sorted(output)})")
    return output["logits"]
  return output


def _module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _flatten(tree) -> dict[str, object]:
  return traverse_util.flatten_dict(dict(tree), sep="/")


def perturbation_layers(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, tuple]:
  """{path: shape} of the (B, h, w, C) maps a model marks with `self.perturb(name, x)`."""
  def forward(variables, images):
    return model.apply(variables, images, train=False, mutable=["perturbations"])[1]

  created = jax.eval_shape(forward, variables, images).get("perturbations", {})
  return {path: tuple(leaf.shape) for path, leaf in _flatten(dict(created)).items()
          if len(leaf.shape) == 4}


def module_layers(model: nn.Module, variables: dict, images: jax.Array) -> list[tuple[str, tuple]]:
  """Submodules whose output is a (B, h, w, C) feature map, in the order they finish; no compute."""
  found: list[tuple[str, tuple]] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and getattr(out, "ndim", 0) == 4:
      found.append((_module_path(context.module), tuple(out.shape)))
    return out

  def forward(variables, images):
    with nn.intercept_methods(record):
      return model.apply(variables, images, train=False)

  jax.eval_shape(forward, variables, images)
  return found


def feature_layers(model: nn.Module, variables: dict, images: jax.Array) -> list[tuple[str, tuple]]:
  """Every layer Grad-CAM can explain: perturbation points first, then submodule outputs."""
  perturbed = perturbation_layers(model, variables, images)
  modules = [(p, s) for p, s in module_layers(model, variables, images) if p not in perturbed]
  return list(perturbed.items()) + modules


def default_layer(model: nn.Module, variables: dict, images: jax.Array, *, table=None) -> str:
  """The last feature map with more than one position (perturbation points preferred): the
  usual Grad-CAM choice."""
  perturbed, shapes = table or layer_table(model, variables, images)
  modules = [(p, s) for p, s in shapes.items() if p not in perturbed]
  for layers in (list(perturbed.items()), modules):
    spatial = [path for path, shape in layers if shape[1] * shape[2] > 1]
    if spatial:
      return spatial[-1]
  raise ValueError(f"{type(model).__name__} has no (B, h, w, C) feature map of more than one "
                   f"position at input shape {tuple(images.shape)}")


def _forward(model, variables, images, layer: str, perturbed: dict, delta=None):
  """(model output, activations of `layer`), with `delta` added to those activations."""
  if layer in perturbed:
    variables = dict(variables)
    if delta is not None:
      zeros = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), perturbed)
      zeros[layer] = delta
      variables["perturbations"] = traverse_util.unflatten_dict(zeros, sep="/")
    output, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    sown = _flatten(dict(state.get("intermediates", {}))).get(layer)
    if isinstance(sown, tuple):  # sow appends to a tuple
      sown = sown[0] if sown else None
    if sown is None:
      raise ValueError(f"layer {layer!r} is perturbed but not sown under 'intermediates' with the "
                       "same name; Grad-CAM needs both")
    return output, sown
  seen = []

  def add_delta(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and _module_path(context.module) == layer:
      if seen:
        raise ValueError(f"layer {layer!r} is called more than once; pick a layer used once")
      seen.append(out)
      if delta is not None:
        out = out + delta.astype(out.dtype)
    return out

  with nn.intercept_methods(add_delta):
    output = model.apply(variables, images, train=False)
  return output, seen[0]


def layer_table(model: nn.Module, variables: dict, images: jax.Array) -> tuple[dict, dict]:
  """({perturbation path: shape}, {every explainable layer: shape}); shapes only, no compute."""
  perturbed = perturbation_layers(model, variables, images)
  shapes = dict(module_layers(model, variables, images))
  shapes.update(perturbed)
  return perturbed, shapes


def _check_layer(model, variables, images, layer: str, table=None) -> tuple[tuple, dict]:
  perturbed, shapes = table or layer_table(model, variables, images)
  if layer not in shapes:
    known = ", ".join(shapes) or "none"
    raise ValueError(f"layer {layer!r} is neither a perturbation point nor a submodule with a "
                     f"(B, h, w, C) output; feature layers: {known}")
  return shapes[layer], perturbed


def layer_gradients(
    model: nn.Module, variables: dict, images: jax.Array, layer: str, class_index=None, *,
    table=None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(activations, d score / d activations, class_index, logits) at `layer`.

  The score of example b is its logit of `class_index[b]` (default: the predicted class).
  `table` is `layer_table`'s answer, when the caller has it already.
  """
  shape, perturbed = _check_layer(model, variables, images, layer, table)

  def score(delta, variables, images, class_index):
    output, activations = _forward(model, variables, images, layer, perturbed, delta)
    logits = _logits_of(output).astype(jnp.float32)
    chosen = jnp.argmax(logits, -1) if class_index is None else jnp.broadcast_to(
        jnp.asarray(class_index, jnp.int32), logits.shape[:1])
    picked = jnp.take_along_axis(logits, chosen[:, None], axis=-1)
    # Examples are independent (eval mode), so the gradient of the sum is each one's own.
    return jnp.sum(picked), (activations.astype(jnp.float32), chosen, logits)

  # One compiled program: op-by-op dispatch of a whole network's backward pass is slow.
  grad_fn = jax.jit(jax.grad(score, has_aux=True))
  delta = jnp.zeros(shape, jnp.float32)
  grads, (activations, chosen, logits) = grad_fn(delta, variables, images, class_index)
  return activations, grads, chosen, logits


def cam_from_gradients(activations: jax.Array, grads: jax.Array) -> jax.Array:
  """ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d score / d A_k: (B, h, w)."""
  alpha = jnp.mean(grads, axis=(1, 2))  # (B, C)
  return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", activations, alpha))


def layer_activations(
    model: nn.Module, variables: dict, images: jax.Array, layer: str
) -> jax.Array:
  """The activations of `layer` for `images`, as a function jax can differentiate."""
  _, perturbed = _check_layer(model, variables, images, layer)
  return _forward(model, variables, images, layer, perturbed)[1].astype(jnp.float32)


def receptive_field_centers(
    model: nn.Module, variables: dict, images: jax.Array, layer: str, *, table=None
) -> tuple[float, float, float, float]:
  """(stride_y, offset_y, stride_x, offset_x): layer position i sits over image pixel
  offset + stride * i.

  Resizing a map as if it covered the image edge to edge is wrong for 'VALID' convolutions
  (LeNet's conv2 at 28 px is off by up to 3.6 pixels). The geometry is measured instead: the
  receptive field of two interior positions per axis is the set of pixels where
  d A[i, j] / d image is non-zero for some example and channel, and its centre is the middle of
  that set. An axis whose receptive field reaches the image border (deep networks) cannot be
  measured this way and keeps the edge-to-edge mapping.
  """
  images = jnp.asarray(images, jnp.float32)[:16]
  height, width = images.shape[1:3]
  shape, perturbed = _check_layer(model, variables, images, layer, table)
  h, w = shape[1:3]
  lo_i, hi_i, lo_j, hi_j = h // 4, h - 1 - h // 4, w // 4, w - 1 - w // 4

  @jax.jit
  def supports(variables, images):
    act, vjp = jax.vjp(
        lambda x: _forward(model, variables, x, layer, perturbed)[1].astype(jnp.float32), images)
    masks = []
    for i, j in ((lo_i, lo_j), (hi_i, hi_j)):
      (g,) = vjp(jnp.zeros_like(act).at[:, i, j, :].set(1.0))
      masks.append(jnp.sum(jnp.abs(g), axis=(0, 3)) > 0)
    return masks

  def extent(support):
    support = np.asarray(support)
    return np.nonzero(support.any(axis=1))[0], np.nonzero(support.any(axis=0))[0]

  def axis(lo, hi, n_in, n_out, spans):
    stride, offset = n_in / n_out, 0.5 * n_in / n_out - 0.5  # edge to edge
    if hi <= lo or any(len(s) == 0 or s[0] == 0 or s[-1] == n_in - 1 for s in spans):
      return stride, offset
    c_lo, c_hi = (0.5 * (s[0] + s[-1]) for s in spans)
    stride = (c_hi - c_lo) / (hi - lo)
    return stride, c_lo - stride * lo

  support_lo, support_hi = supports(variables, images)
  rows_lo, cols_lo = extent(support_lo)
  rows_hi, cols_hi = extent(support_hi)
  return (*axis(lo_i, hi_i, height, h, (rows_lo, rows_hi)),
          *axis(lo_j, hi_j, width, w, (cols_lo, cols_hi)))


def upsample_maps(
    maps: jax.Array, size: tuple[int, int], centers: tuple[float, float, float, float] | None = None
) -> jax.Array:
  """(B, h, w) -> (B, H, W) bilinear, each map scaled so its maximum is 1 (zeros stay zeros).

  `centers` = (stride_y, offset_y, stride_x, offset_x) places map position i over image pixel
  offset + stride * i (see `receptive_field_centers`); None spreads the map edge to edge.
  """
  maps = maps.astype(jnp.float32)
  if centers is None:
    maps = jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")
  else:
    sy, oy, sx, ox = centers
    ys = (jnp.arange(size[0], dtype=jnp.float32) - oy) / sy
    xs = (jnp.arange(size[1], dtype=jnp.float32) - ox) / sx
    coords = jnp.meshgrid(ys, xs, indexing="ij")
    sample = lambda m: jax.scipy.ndimage.map_coordinates(m, coords, order=1, mode="nearest")
    maps = jax.vmap(sample)(maps)
  maps = jnp.maximum(maps, 0.0)
  peak = jnp.max(maps, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


def gradcam(
    model: nn.Module, variables: dict, images: jax.Array, *, layer: str | None = None,
    class_index=None, align: bool = True,
) -> GradCAM:
  """Grad-CAM maps of `images` (B, H, W, C) for `class_index` (default: the predicted class).

  `align` places the coarse map over the image by measured receptive-field centres (see
  `receptive_field_centers`); False resizes it edge to edge, as most implementations do.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {tuple(images.shape)}")
  if isinstance(model, VisionTransformer):
    # Its blocks hold token sequences and (B, heads, N, N) attention weights, not feature maps:
    # a "heat map" of either is an artefact (streaks along the token order).
    raise ValueError("Grad-CAM needs a CNN's spatial feature map and a Vision Transformer has "
                     "none; use `python -m train.viz rollout` or `attention` for a ViT")
  table = layer_table(model, variables, images)
  layer = layer or default_layer(model, variables, images, table=table)
  activations, grads, chosen, logits = layer_gradients(
      model, variables, images, layer, class_index, table=table)
  coarse = cam_from_gradients(activations, grads)
  centers = receptive_field_centers(model, variables, images, layer, table=table) if align else None
  heatmaps = upsample_maps(coarse, images.shape[1:3], centers)
  return GradCAM(heatmaps, coarse, chosen, logits, layer)


def peak_positions(heatmaps: jax.Array) -> jax.Array:
  """(B, 2) (row, col) of each map's maximum."""
  b, _, w = heatmaps.shape
  flat = jnp.argmax(heatmaps.reshape(b, -1), axis=-1)
  return jnp.stack([flat // w, flat % w], axis=-1)
