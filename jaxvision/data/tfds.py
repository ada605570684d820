"""`tfds:NAME`: TensorFlow Datasets (the `[tfds]` extra; TensorFlow is imported only here, lazily).

Two paths, chosen by `data.stream`:
  * in memory ('auto' when the images have one fixed shape and the selected examples fit
    data.cache_mb, e.g. mnist, cifar10): the selection is read once into an ArraySource and then
    shares everything with the local sources (ArrayInput: exact resume, every transform).
  * streaming (larger or variable-size data, e.g. imagenet2012): a tf.data pipeline per process,
    `jaxvision.data.tfds_stream.TfdsStream`.
"""

from __future__ import annotations

import math

import numpy as np

from jaxvision.data import tfds_detection
from jaxvision.data.source import ArraySource, select_split
from jaxvision.data.splits import named_splits, split_indices
from jaxvision.data.tfds_builder import (
    as_dataset,
    class_names_of,
    feature_keys,
    get_builder,
    import_tf,
    num_classes_of,
    split_sizes,
)


def read_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All (images, labels) of a TFDS split expression, decoded into NumPy arrays."""
  tf, _ = import_tf()
  image_key, label_key = feature_keys(builder)
  ds = as_dataset(builder, split, shuffle_files=False)
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = [], []
  for x, y in ds.batch(4096).prefetch(2).as_numpy_iterator():
    images.append(x)
    labels.append(y)
  if not images:
    raise ValueError(f"split {split!r} of tfds:{builder.name} selects no example")
  images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int32)
  return (images if images.ndim == 4 else images[..., None]), labels


def _named_sources(builder, split: str) -> dict[str, ArraySource]:
  known = split_sizes(builder)
  if known:  # a bad or empty selection fails before anything is read
    split_indices(split, known)
  wanted = named_splits(split)
  sources = {}
  for name in [n for n in known if n in wanted] if known else wanted:
    images, labels = read_arrays(builder, name)
    num_classes = num_classes_of(builder) or int(labels.max()) + 1
    sources[name] = ArraySource(images, labels, num_classes=num_classes,
                                class_names=class_names_of(builder))
  return sources


def load(
    arg: str, split: str, image_size: int | None = None, data_config=None
) -> dict[str, ArraySource]:
  """The named splits that `split` refers to, each read whole into an ArraySource."""
  del image_size
  builder = get_builder(arg, data_config)
  if tfds_detection.is_detection(builder):
    return tfds_detection.load(builder, split, data_config)
  return _named_sources(builder, split)


def materialise(builder, split: str, data_config=None) -> ArraySource:
  """The selection only (not the whole named splits), with the ids select_split would give."""
  if tfds_detection.is_detection(builder):
    return tfds_detection.materialise(builder, split, data_config)
  sizes = split_sizes(builder)
  if not sizes:  # sizes unknown (mocked info): read the named splits and slice here
    return select_split(_named_sources(builder, split), split)
  offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist(), strict=True))
  parts = []
  num_classes = num_classes_of(builder)
  for name, indices in split_indices(split, sizes):
    if not len(indices):
      continue
    start, end = int(indices[0]), int(indices[-1]) + 1
    images, labels = read_arrays(builder, f"{name}[{start}:{end}]")
    parts.append(ArraySource(images, labels, num_classes=num_classes or int(labels.max()) + 1,
                             ids=np.arange(start, end, dtype=np.int64) + offsets[name],
                             class_names=class_names_of(builder)))
  return ArraySource.concat(parts)


def use_stream(builder, split: str, data_config, image_size: int) -> bool:
  """Whether `split` is streamed (True) or read into memory (False), per data.stream."""
  if tfds_detection.is_detection(builder):  # read into memory, images kept encoded
    return False
  mode = data_config.stream
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"data.stream={mode!r}: choose 'auto', 'always' or 'never'")
  shape = builder.info.features[feature_keys(builder)[0]].shape
  fixed = all(d is not None for d in shape)
  if mode == "never":
    if not fixed:
      raise ValueError(
          f"data.stream='never' but tfds:{builder.name} images vary in size {shape}; they cannot "
          "be stacked in memory"
      )
    return False
  if mode == "always":
    return True
  sizes = split_sizes(builder)
  if not fixed:
    return True
  if not sizes:
    return False
  count = sum(len(i) for _, i in split_indices(split, sizes))
  return count * math.prod(shape) > float(data_config.cache_mb) * 2**20
