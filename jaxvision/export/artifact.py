"""What every export format shares: the model as a pure function with its weights and
metadata (`Exportable`), the preprocessing block, and metadata.json."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from jaxvision.data.transforms import normalization

FORMATS = ("stablehlo", "onnx", "savedmodel")
METADATA_NAME = "metadata.json"


@dataclasses.dataclass(frozen=True)
class Exportable:
  """A model ready to export: a pure function of (weights, images), its weights and metadata.

  Attributes:
    fn: fn(weights, images) -> tuple of output arrays, in `metadata['outputs']` order; `weights`
      is a list of arrays like `weights`.
    weights: the model's variables as a flat list of numpy arrays (see `metadata['weights']`).
    input_shape: (H, W, C) of one preprocessed image.
    metadata: JSON-ready description (see the module docstring).
  """

  fn: Callable[[list, jax.Array], tuple]
  weights: list[np.ndarray]
  input_shape: tuple[int, int, int]
  metadata: dict

  @classmethod
  def build(cls, model, variables: Mapping, *, input_shape: Sequence[int], name: str,
            task=None, task_name: str = "classification", preprocessing: Mapping | None = None,
            class_names: Sequence[str] = (), source: str = "") -> Exportable:
    """Wraps `model` (eval mode, through `task.predict` when a task is given) and
    `variables`; see the module docstring for the metadata it records."""
    tree = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(str(getattr(p, "key", p)) for p in path) for path, _ in flat]
    shape = tuple(int(d) for d in input_shape)

    def predict(weights, images):
      bound = jax.tree_util.tree_unflatten(treedef, list(weights))

      def forward(*args, method=None, **kwargs):
        return model.apply(bound, *args, train=False, method=method, **kwargs)

      return forward(images) if task is None else task.predict(forward, {"image": images})

    leaves = [np.asarray(leaf) for _, leaf in flat]
    example = jax.eval_shape(predict, leaves, jax.ShapeDtypeStruct((1, *shape), np.float32))
    outputs = dict(example) if isinstance(example, Mapping) else {"logits": example}
    names = sorted(outputs)

    def fn(weights, images):
      out = predict(weights, images)
      return tuple(out[k] for k in names) if isinstance(out, Mapping) else (out,)

    metadata = {
        "model": name, "task": task_name, "source": source,
        "input": {"name": "images", "shape": ["batch", *shape], "dtype": "float32",
                  "layout": "NHWC"},
        "preprocessing": dict(preprocessing or {}),
        "class_names": [str(n) for n in class_names],
        "outputs": [{"name": k, "shape": ["batch", *(int(d) for d in outputs[k].shape[1:])],
                     "dtype": str(outputs[k].dtype)} for k in names],
        "weights": paths,
    }
    return cls(fn, leaves, shape, metadata)

  @property
  def output_names(self) -> list[str]:
    """Names of the outputs, in the order `fn` returns them."""
    return [o["name"] for o in self.metadata["outputs"]]

  def baked(self) -> Callable[[jax.Array], tuple]:
    """images -> outputs with the weights as constants (what ONNX and SavedModel embed)."""
    weights = [jax.numpy.asarray(w) for w in self.weights]
    return lambda images: self.fn(weights, images)


def preprocessing_of(*, image_size, normalize: str, eval_crop: float,
                     interpolation: str = "bilinear") -> dict:
  """The metadata's preprocessing block from a run's (or pretrained config's) settings."""
  mean, std = normalization(normalize)
  return {"image_size": image_size, "normalize": normalize, "mean": list(mean),
          "std": list(std), "eval_crop": float(eval_crop), "interpolation": interpolation,
          "resize": "center square of eval_crop x the shorter side, resized to image_size; "
                    "pixels scaled to [0, 1], then (x - mean) / std"}


def write_metadata(out_dir: str, metadata: Mapping, fmt: str) -> str:
  """Writes OUT/metadata.json (with the format named); returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, METADATA_NAME)
  with open(path, "w") as f:
    json.dump({**metadata, "format": fmt}, f, indent=2)
  return path
