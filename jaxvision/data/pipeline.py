"""Batching, process sharding and host-side prefetch over an in-memory source.

Training order is a pure function of (seed, step): epoch e visits a permutation drawn from
(seed, e), and step s reads rows [s*B, (s+1)*B) of it. The data position is therefore part of
the train state (the step), a resumed run continues exactly where it stopped, and the global
batch is the same whatever the number of processes: process p reads its rows p*b..(p+1)*b of it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from jaxvision.data.decode import size_pair
from jaxvision.data.source import ArraySource
from jaxvision.data.task_transforms import build_transform
from jaxvision.data.transforms import Transform
from jaxvision.imbalance import balanced_epoch_order


class ArrayInput:
  """Train and eval batches of one split for this process.

  Attributes:
    source: the split's examples.
    global_batch_size: examples per step over all processes.
    image_size: side of the square images the transform delivers, or their (height, width).
    process_index / process_count: this process's rank, and how many read in parallel.
    balanced: draw each epoch's order class-balanced (with replacement) instead of uniformly.
    prepare: host-side additions applied after the transform (`Task.prepare`), in the
      prefetch thread; the trainer sets it once the task is built.
  """

  def __init__(
      self,
      source: ArraySource,  # or any source with len() and get_batch (e.g. files.FileSource)
      *,
      global_batch_size: int,
      transform: Transform,
      image_size: int | tuple[int, int],
      seed: int = 0,
      process_index: int = 0,
      process_count: int = 1,
      prefetch: int = 2,
      balanced: bool = False,
  ):
    if global_batch_size % process_count:
      raise ValueError(
          f"batch_size={global_batch_size} does not divide over {process_count} processes"
      )
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.transform = transform
    self.image_size = image_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.prefetch = prefetch
    self.balanced = balanced
    self.prepare = lambda batch: batch

  @classmethod
  def from_config(cls, config, source, *, train: bool, process_index: int = 0,
                  process_count: int = 1) -> ArrayInput:
    """The input of `source` with the run config's batch size, transform, seed and prefetch."""
    size = ((int(config.image_size), int(config.image_width)) if config.image_width
            else int(config.image_size))
    if not train and config.eval_batch_size < 1:
      raise ValueError(f"config.eval_batch_size={config.eval_batch_size}: set it, or resolve the "
                       "config first (train.resolve), which makes it batch_size")
    return cls(
        source,
        global_batch_size=config.batch_size if train else config.eval_batch_size,
        transform=build_transform(
            config.data, train=train, task=source.task, image_size=size,
            max_boxes=int(config.detection.max_boxes),
        ),
        image_size=size,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
        prefetch=config.data.prefetch,
        balanced=train and bool(config.data.balanced_sampling),
    )

  @property
  def num_examples(self) -> int:
    """Examples in the split (before batching or padding)."""
    return len(self.source)

  @property
  def num_classes(self) -> int:
    """The source's number of classes."""
    return self.source.num_classes

  @property
  def task(self) -> str:
    """The source's task ('classification', 'segmentation', ...)."""
    return self.source.task

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the training images the transform delivers."""
    return (*size_pair(self.image_size), int(self.source.channels))

  @property
  def class_counts(self) -> np.ndarray | None:
    """Examples per class of the split (None for labels that are not one class per image)."""
    labels = np.asarray(self.source.labels)
    if labels.ndim != 1:
      return None
    return np.bincount(labels, minlength=self.source.num_classes)

  @property
  def class_names(self) -> tuple[str, ...]:
    """The source's class names ((): unknown)."""
    return tuple(self.source.class_names)

  @property
  def skipped(self) -> list[str]:
    """Files of the split left out as unreadable (data.skip_bad); the trainer logs the count."""
    return list(getattr(self.source, "skipped", []))

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches per epoch (the remainder of each epoch's permutation is dropped)."""
    return max(1, len(self.source) // self.global_batch_size)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    n = len(self.source)
    if self.balanced:
      order = balanced_epoch_order(self.source.labels, self.source.num_classes, self.seed, epoch)
    else:
      order = np.random.default_rng([self.seed, epoch]).permutation(n)
    if n < self.global_batch_size:  # tiny datasets: repeat to fill one batch
      order = np.resize(order, self.global_batch_size)
    return order

  def train_indices(self, step: int) -> np.ndarray:
    """Source rows this process reads at `step`."""
    epoch, within = divmod(step, self.steps_per_epoch)
    rows = self._epoch_order(epoch)[within * self.global_batch_size:][: self.global_batch_size]
    lo = self.process_index * self.local_batch_size
    return rows[lo: lo + self.local_batch_size]

  def _train_batch(self, step: int) -> dict[str, np.ndarray]:
    batch = self.source.get_batch(self.train_indices(step))
    rng = np.random.default_rng([self.seed, step, self.process_index, 1])
    return self.prepare(self.transform(batch, rng))

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from `start_step` on, prepared in a background thread."""
    step = start_step
    def produce():
      nonlocal step
      batch = self._train_batch(step)
      step += 1
      return batch
    return prefetch_in_thread(produce, self.prefetch)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the split; the last batch is padded and `valid` marks the real examples.

    Every example is counted exactly once, whatever the number of processes and devices.
    """
    n = len(self.source)
    num_batches = -(-n // self.global_batch_size)
    rng = np.random.default_rng([self.seed, 2])
    for b in range(num_batches):
      lo = b * self.global_batch_size + self.process_index * self.local_batch_size
      rows = np.arange(lo, lo + self.local_batch_size)
      valid = rows < n
      batch = self.source.get_batch(np.where(valid, rows, 0))
      batch = self.prepare(self.transform(batch, rng))
      batch["valid"] = valid
      yield batch


def prefetch_in_thread(produce, size: int) -> Iterator:
  """Runs `produce()` in a daemon thread, keeping up to `size` results ready."""
  if size <= 0:
    while True:
      yield produce()
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def worker():
    try:
      while not stop.is_set():
        item = produce()
        while not stop.is_set():
          try:
            buffer.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced in the consumer, with the original message
      buffer.put(e)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
