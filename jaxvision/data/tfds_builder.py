"""The TFDS builder of a dataset and what it says about the data (the `[tfds]` extra; TensorFlow
is imported here only, and only on first use)."""

from __future__ import annotations


class MissingDependencyError(ImportError, ValueError):
  """An optional dependency is not installed (a ValueError too, so the trainer prints one line)."""


def import_tf():
  """(tensorflow, tensorflow_datasets), imported on first use, with TF kept off the GPUs."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError:
    raise MissingDependencyError(
        "dataset 'tfds:...' needs TensorFlow Datasets: pip install 'jaxvision[tfds]'"
    ) from None
  try:
    # JAX owns the accelerators; TF only reads and decodes on the CPU.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (a second call): nothing to do
    pass
  return tf, tfds


def get_builder(name: str, data_config):
  """The TFDS builder of `name` (with its data_dir from data.tfds_dir)."""
  if not name:
    raise ValueError("dataset 'tfds:' needs a dataset name, e.g. tfds:mnist")
  _, tfds = import_tf()
  data_dir = data_config.tfds_dir or None
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"dataset tfds:{name}: TFDS has no dataset {name!r}") from None


def feature_keys(builder) -> tuple[str, str]:
  """(image key, label key) of a classification dataset."""
  info = builder.info
  keys = info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  if "image" in info.features and "label" in info.features:
    return "image", "label"
  raise ValueError(
      f"dataset tfds:{builder.name}: no (image, label) features; it has {sorted(info.features)}"
  )


def split_sizes(builder) -> dict[str, int]:
  """{split: examples} from the dataset info (empty when the info does not know, e.g. mocked)."""
  return {name: int(s.num_examples) for name, s in builder.info.splits.items()}


def as_dataset(builder, split: str, **kwargs):
  """builder.as_dataset, with a one-line error when the dataset was never prepared."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError as e:  # TFDS asserts when the dataset was never prepared
    raise FileNotFoundError(
        f"dataset tfds:{builder.name} is not prepared in {builder.data_dir} "
        f"(run `tfds build {builder.name}` or set data.tfds_dir): {str(e).splitlines()[0]}"
    ) from None


def num_classes_of(builder) -> int:
  """The class count of the label feature (0 when it has none)."""
  feature = builder.info.features[feature_keys(builder)[1]]
  return int(getattr(feature, "num_classes", 0) or 0)


def class_names_of(builder) -> tuple[str, ...]:
  """The label feature's class names ((): a label without names)."""
  feature = builder.info.features[feature_keys(builder)[1]]
  return tuple(getattr(feature, "names", None) or ())
