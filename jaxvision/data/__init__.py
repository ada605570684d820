"""Datasets by URI (``digits``, ``tfds:NAME``, ``idx:DIR``, ``folder:DIR``, ``segfolder:DIR``,
``synthetic:HxWxC:K``), split slicing, transforms and batching.

    train_input = create_input(config, config.train_split, train=True)
    for batch in train_input.train_batches(start_step): ...
"""

from __future__ import annotations

import importlib

from jaxvision.data.pipeline import ArrayInput
from jaxvision.data.source import ArraySource, check_label_range, select_split
from jaxvision.data.splits import split_indices
from jaxvision.data.transforms import Normalize, build_transform

# scheme -> module with load(arg, split, image_size) returning {split name: ArraySource}
# (or, for streaming sources, create_input(...) returning an object with ArrayInput's methods).
SCHEMES = {
    "digits": "jaxvision.data.digits",
    "synthetic": "jaxvision.data.synthetic",
    "tfds": "jaxvision.data.tfds",
    "idx": "jaxvision.data.idx",
    "folder": "jaxvision.data.folder",
    "segfolder": "jaxvision.data.segfolder",
}


def parse_uri(uri: str) -> tuple[str, str]:
  """'idx:../data/mnist' -> ('idx', '../data/mnist'); unknown schemes list the known ones."""
  scheme, _, arg = uri.partition(":")
  if scheme not in SCHEMES:
    raise ValueError(f"dataset {uri!r}: unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
  return scheme, arg


def source_module(uri: str):
  """The module that reads `uri`'s scheme."""
  scheme, arg = parse_uri(uri)
  return importlib.import_module(SCHEMES[scheme]), arg


def load_source(
    uri: str, split: str, *, image_size: int | None = None, data_config=None
) -> ArraySource:
  """The examples of `split` of dataset `uri` (in host memory, or image files decoded on demand)."""
  module, arg = source_module(uri)
  kwargs = {"image_size": image_size}
  if data_config is not None and getattr(module, "TAKES_DATA_CONFIG", False):
    kwargs["data_config"] = data_config
  splits = module.load(arg, split, **kwargs)
  return select_split(splits, split)


def check_num_classes(source, num_classes: int, uri: str) -> None:
  """With an explicit config.num_classes, every label must be below it (one line naming it)."""
  if not num_classes or num_classes >= source.num_classes:
    return
  labels = source.labels
  names = getattr(source, "names", None)
  try:
    check_label_range(labels, num_classes, names, where=f" of {uri}")
  except ValueError as e:
    raise ValueError(f"{e} (config.num_classes={num_classes})") from None


def create_input(
    config, split: str, *, train: bool, process_index: int = 0, process_count: int = 1
):
  """The input of one split for this process, built from the run's config."""
  module, arg = source_module(config.dataset)
  if hasattr(module, "create_input"):  # streaming sources build their own pipeline
    return module.create_input(
        arg, config, split, train=train, process_index=process_index, process_count=process_count
    )
  source = load_source(config.dataset, split, image_size=config.image_size, data_config=config.data)
  check_num_classes(source, int(config.get("num_classes", 0) or 0), config.dataset)
  return ArrayInput.from_config(
      config, source, train=train, process_index=process_index, process_count=process_count
  )


__all__ = [
    "SCHEMES", "ArrayInput", "ArraySource", "Normalize", "build_transform", "check_num_classes",
    "create_input", "load_source", "parse_uri", "select_split", "split_indices",
]
