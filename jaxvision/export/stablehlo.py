"""StableHLO export with `jax.export`: a serialized module with a symbolic batch dimension.

    OUT/model.jax_export   jax.export's serialization of fn(weights, images) -> outputs
    OUT/weights.npz        the weights, w0000, w0001, ... in the order the module takes them
    OUT/metadata.json      see jaxvision.export

Running it needs jax and numpy only, not jaxvision:

    import jax, numpy as np
    exported = jax.export.deserialize(open('OUT/model.jax_export', 'rb').read())
    with np.load('OUT/weights.npz') as w:
      weights = [w[k] for k in sorted(w.files)]
    logits, = exported.call(weights, images)     # images: float32 [b, H, W, C], any b

The weights sit beside the module rather than inside it: large constants would be embedded in
the StableHLO text, slowing every compile of it and doubling the artifact in memory.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxvision.export.artifact import Exportable, write_metadata

MODULE_NAME = "model.jax_export"
WEIGHTS_NAME = "weights.npz"


def exported_module(exportable: Exportable) -> jax.export.Exported:
  """The `jax.export.Exported` of `exportable` with a symbolic batch dimension 'b'."""
  h, w, c = exportable.input_shape
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, {c}"), np.float32)
  weights = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in exportable.weights]
  return jax.export.export(jax.jit(exportable.fn))(weights, images)


def export_stablehlo(exportable: Exportable, out_dir: str) -> list[str]:
  """Writes the module, the weights and metadata.json to `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  exported = exported_module(exportable)
  module = os.path.join(out_dir, MODULE_NAME)
  with open(module, "wb") as f:
    f.write(exported.serialize())
  weights = os.path.join(out_dir, WEIGHTS_NAME)
  np.savez(weights, **{f"w{i:04d}": x for i, x in enumerate(exportable.weights)})
  metadata = {**exportable.metadata, "files": {"module": MODULE_NAME, "weights": WEIGHTS_NAME},
              "platforms": list(exported.platforms)}
  return [module, weights, write_metadata(out_dir, metadata, "stablehlo")]


def load_stablehlo(out_dir: str):
  """images -> outputs (a tuple) of an export in `out_dir` (jax and numpy only)."""
  with open(os.path.join(out_dir, MODULE_NAME), "rb") as f:
    exported = jax.export.deserialize(f.read())
  with np.load(os.path.join(out_dir, WEIGHTS_NAME)) as data:
    weights = jax.device_put([data[k] for k in sorted(data.files)])  # on device once
  return lambda images: exported.call(weights, images)
