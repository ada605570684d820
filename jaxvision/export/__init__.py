"""A trained (or pretrained) model out of JAX: StableHLO, ONNX and TensorFlow SavedModel.

    exportable = Exportable.build(model, variables, input_shape=(224, 224, 3),
                                  preprocessing=..., class_names=...)
    export(exportable, 'stablehlo', 'out/')     # or 'onnx', 'savedmodel'

What is exported is the model's eval-mode forward pass (through the task's `predict` when there
is one: test-time averaging included) on a batch of preprocessed float32 NHWC images, with a
symbolic batch dimension. The preprocessing (resize, center crop, normalization) is described,
not baked in: `metadata.json` beside every export (and in the format's own metadata where it
has a place: ONNX `metadata_props`, SavedModel assets) holds the model name, the input shape,
mean / std / image size / crop fraction, the class names and the output names.

Per format (see the format's module): `stablehlo` (jax.export, weights in weights.npz beside the
serialized module), `onnx` (jax2onnx, pip install 'jaxvision[export]'), `savedmodel`
(jax.experimental.jax2tf, needs TensorFlow: pip install 'jaxvision[tfds]').
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

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
  from jaxvision.data.transforms import normalization

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


def export(exportable: Exportable, fmt: str, out_dir: str) -> list[str]:
  """Exports to `fmt` ('stablehlo' | 'onnx' | 'savedmodel') under `out_dir`; returns the paths
  written."""
  if fmt == "stablehlo":
    from jaxvision.export.stablehlo import export_stablehlo as run
  elif fmt == "onnx":
    from jaxvision.export.onnx import export_onnx as run
  elif fmt == "savedmodel":
    from jaxvision.export.savedmodel import export_savedmodel as run
  else:
    raise ValueError(f"export format {fmt!r} is unknown; choose from {', '.join(FORMATS)}")
  return run(exportable, out_dir)


def load_exported(fmt: str, out_dir: str) -> Callable[[np.ndarray], tuple]:
  """images -> tuple of numpy outputs (metadata order), running an export in its own runtime:
  jax.export, ONNX Runtime or TensorFlow."""
  with open(os.path.join(out_dir, METADATA_NAME)) as f:
    names = [o["name"] for o in json.load(f)["outputs"]]
  if fmt == "stablehlo":
    from jaxvision.export.stablehlo import load_stablehlo

    run = load_stablehlo(out_dir)
    return lambda images: tuple(np.asarray(o) for o in run(images))
  if fmt == "onnx":
    from jaxvision.export.onnx import MODEL_NAME, onnx_session

    session = onnx_session(os.path.join(out_dir, MODEL_NAME))
    return lambda images: tuple(session.run(names, {session.get_inputs()[0].name: images}))
  if fmt == "savedmodel":
    from jaxvision.export.savedmodel import _tensorflow

    tf = _tensorflow()
    serve = tf.saved_model.load(out_dir).signatures["serving_default"]
    return lambda images: tuple(serve(images=tf.constant(images))[k].numpy() for k in names)
  raise ValueError(f"export format {fmt!r} is unknown; choose from {', '.join(FORMATS)}")


def max_difference(exportable: Exportable, fmt: str, out_dir: str, images: np.ndarray) -> float:
  """Largest absolute difference between the export's outputs and JAX's on `images`."""
  expected = jax.jit(exportable.fn)(exportable.weights, images)
  got = load_exported(fmt, out_dir)(images)
  return max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
             for a, b in zip(got, expected, strict=True))


__all__ = ["FORMATS", "Exportable", "export", "load_exported", "max_difference",
           "preprocessing_of", "write_metadata"]
