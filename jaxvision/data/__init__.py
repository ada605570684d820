"""Datasets by URI (``digits``, ``tfds:NAME``, ``idx:DIR``, ``folder:DIR``, ``segfolder:DIR``,
``synthetic:HxWxC:K``; detection ``coco:DIR``, ``voc:DIR``, ``yolo:DIR``), split slicing,
transforms and batching.

    train_input = create_input(config, config.train_split, train=True)
    for batch in train_input.train_batches(start_step): ...
"""

from __future__ import annotations

import importlib

from configs import base
from jaxvision.data.pipeline import ArrayInput
from jaxvision.data.source import ArraySource, check_num_classes, select_split
from jaxvision.data.splits import split_indices
from jaxvision.data.task_transforms import build_transform
from jaxvision.data.transforms import Normalize

# scheme -> module with load(arg, split, image_size=None, data_config=None) returning
# {split name: source}.
SCHEMES = {
    "digits": "jaxvision.data.digits",
    "synthetic": "jaxvision.data.synthetic",
    "tfds": "jaxvision.data.tfds",
    "idx": "jaxvision.data.idx",
    "folder": "jaxvision.data.folder",
    "segfolder": "jaxvision.data.segfolder",
    "coco": "jaxvision.data.coco",
    "voc": "jaxvision.data.voc",
    "yolo": "jaxvision.data.yolo",
    "coco_captions": "jaxvision.data.coco_captions",
    "flickr": "jaxvision.data.flickr",
}


# Schemes whose module also has create_input(arg, config, split, ...): sources that build their
# own pipeline (an object with ArrayInput's methods), e.g. to stream data too large for memory.
STREAMING = {"tfds": "jaxvision.data.tfds_stream"}


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
  """The examples of `split` of dataset `uri` (in host memory, or image files decoded on demand).

  `data_config` is a run config's `data` section (default: configs/base.py's).
  """
  module, arg = source_module(uri)
  data_config = base.get_config().data if data_config is None else data_config
  splits = module.load(arg, split, image_size=image_size, data_config=data_config)
  return select_split(splits, split)


def create_input(
    config, split: str, *, train: bool, process_index: int = 0, process_count: int = 1
):
  """The input of one split for this process, built from the run's config."""
  scheme, arg = parse_uri(config.dataset)
  if scheme in STREAMING:
    return importlib.import_module(STREAMING[scheme]).create_input(
        arg, config, split, train=train, process_index=process_index, process_count=process_count
    )
  source = load_source(config.dataset, split, image_size=config.image_size, data_config=config.data)
  check_num_classes(source, config)
  return ArrayInput.from_config(
      config, source, train=train, process_index=process_index, process_count=process_count
  )


__all__ = [
    "SCHEMES", "STREAMING", "ArrayInput", "ArraySource", "Normalize", "build_transform",
    "check_num_classes", "create_input", "load_source", "parse_uri", "select_split",
    "split_indices",
]
