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

import json
import os
from collections.abc import Callable

import jax
import numpy as np

from jaxvision.export import onnx, savedmodel, stablehlo
from jaxvision.export.artifact import (
    FORMATS,
    METADATA_NAME,
    Exportable,
    preprocessing_of,
    write_metadata,
)


def export(exportable: Exportable, fmt: str, out_dir: str) -> list[str]:
  """Exports to `fmt` ('stablehlo' | 'onnx' | 'savedmodel') under `out_dir`; returns the paths
  written."""
  exporters = {"stablehlo": stablehlo.export_stablehlo, "onnx": onnx.export_onnx,
               "savedmodel": savedmodel.export_savedmodel}
  if fmt not in exporters:
    raise ValueError(f"export format {fmt!r} is unknown; choose from {', '.join(FORMATS)}")
  return exporters[fmt](exportable, out_dir)


def load_exported(fmt: str, out_dir: str) -> Callable[[np.ndarray], tuple]:
  """images -> tuple of numpy outputs (metadata order), running an export in its own runtime:
  jax.export, ONNX Runtime or TensorFlow."""
  with open(os.path.join(out_dir, METADATA_NAME)) as f:
    names = [o["name"] for o in json.load(f)["outputs"]]
  if fmt == "stablehlo":
    run = stablehlo.load_stablehlo(out_dir)
    return lambda images: tuple(np.asarray(o) for o in run(images))
  if fmt == "onnx":
    session = onnx.onnx_session(os.path.join(out_dir, onnx.MODEL_NAME))
    return lambda images: tuple(session.run(names, {session.get_inputs()[0].name: images}))
  if fmt == "savedmodel":
    tf = savedmodel.tensorflow()
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
