"""TensorFlow SavedModel export with `jax.experimental.jax2tf`.

    OUT/saved_model.pb, OUT/variables/   signature 'serving_default': images float32
                                         [batch, H, W, C] -> {output name: tensor}
    OUT/assets/metadata.json             the metadata, also beside it as OUT/metadata.json

    import tensorflow as tf
    served = tf.saved_model.load('OUT')
    logits = served.signatures['serving_default'](images=images)['logits']

The weights are tf.Variables (not constants folded into the graph), as jax2tf recommends for
large models. Needs TensorFlow: pip install 'jaxvision[tfds]'.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jaxvision.export.artifact import METADATA_NAME, Exportable, write_metadata


def tensorflow():
  try:
    import tensorflow as tf
  except ImportError:
    raise ImportError("SavedModel export needs TensorFlow: pip install 'jaxvision[tfds]' "
                      "(tensorflow-cpu)") from None
  return tf


def export_savedmodel(exportable: Exportable, out_dir: str) -> list[str]:
  """Writes the SavedModel (metadata among its assets) and metadata.json to `out_dir`."""
  tf = tensorflow()
  from jax.experimental import jax2tf

  h, w, c = exportable.input_shape
  names = exportable.output_names
  converted = jax2tf.convert(exportable.fn, polymorphic_shapes=[None, f"(b, {h}, {w}, {c})"],
                             with_gradient=False)
  module = tf.Module()
  module.weights = [tf.Variable(x, trainable=False) for x in exportable.weights]

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="images")])
  def serve(images):
    outputs = converted(module.weights, images)
    return dict(zip(names, outputs, strict=True))

  module.serve = serve
  # The metadata travels inside the SavedModel as an asset, so a copied model keeps it.
  staging = tempfile.mkdtemp()
  try:
    module.metadata = tf.saved_model.Asset(
        write_metadata(staging, exportable.metadata, "savedmodel"))
    tf.saved_model.save(module, out_dir, signatures={"serving_default": serve})
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  beside = write_metadata(out_dir, {**exportable.metadata,
                                    "files": {"assets": f"assets/{METADATA_NAME}"}}, "savedmodel")
  return [os.path.join(out_dir, "saved_model.pb"), beside]
