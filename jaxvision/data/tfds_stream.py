"""Streaming a TFDS split with tf.data, one pipeline per process (for data too large for memory).

Process p reads the contiguous slice [p*N/P, (p+1)*N/P) of the selection. Training: records
(cached in memory when they fit) -> shuffle seeded by (seed, epoch, process) -> decode with the
crop (inception crop seeded by the example's position in the epoch) -> batch; then the NumPy
host transform (flip, RandAugment, normalize, erase) seeded by (seed, step, process). An epoch
is a fixed number of steps, so step s is epoch s // steps_per_epoch, and a resumed run skips
only the records of the current epoch (undecoded) to continue exactly where it stopped.
Evaluation: every process yields the same number of padded batches; `valid` marks real rows.
"""

from __future__ import annotations

import math

import numpy as np

from jaxvision.data import tfds as tfds_source
from jaxvision.data.augment import parse_augment
from jaxvision.data.pipeline import ArrayInput, prefetch_in_thread
from jaxvision.data.source import check_num_classes
from jaxvision.data.splits import split_indices
from jaxvision.data.task_transforms import build_transform


def _seed(*values: int) -> int:
  """A 31-bit seed mixed from integers (TF wants a Python int, NumPy mixes well)."""
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0] & 0x7FFFFFFF)


class TfdsStream:
  """Train and eval batches of a TFDS split streamed with tf.data, for this process.

  Attributes:
    global_batch_size / local_batch_size: examples per step over all processes / this one.
    num_examples: size of the whole selection (all processes).
    num_classes / task / image_shape / class_names: what the trainer needs to build the model.
    skipped: always empty (data.skip_bad does not apply to TFDS records).
    prepare: host-side additions after the transform (`Task.prepare`), set by the trainer.
  """

  def __init__(self, builder, split: str, config, *, train: bool, process_index: int = 0,
               process_count: int = 1):
    tf, tfds = tfds_source.import_tf()
    self._tf, self._tfds = tf, tfds
    self.builder = builder
    sizes = tfds_source.split_sizes(builder)
    sizes = sizes or self._count(builder, tfds_source.named_splits(split))
    self.ranges = [(n, int(i[0]), int(i[-1]) + 1) for n, i in split_indices(split, sizes) if len(i)]
    self.num_examples = sum(end - start for _, start, end in self.ranges)
    batch = config.batch_size if train else config.eval_batch_size
    if batch % process_count:
      raise ValueError(f"batch_size={batch} does not divide over {process_count} processes")
    self.global_batch_size, self.local_batch_size = batch, batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self.lo = process_index * self.num_examples // process_count
    self.hi = (process_index + 1) * self.num_examples // process_count
    self.seed, self.prefetch, self.train = int(config.seed), int(config.data.prefetch), train
    self.image_key, self.label_key = tfds_source.feature_keys(builder)
    self.num_classes = tfds_source.num_classes_of(builder)
    if not self.num_classes:
      raise ValueError(f"tfds:{builder.name}: label feature {self.label_key!r} has no class count")
    if config.num_classes and config.num_classes < self.num_classes:
      raise ValueError(
          f"config.num_classes={config.num_classes} but tfds:{builder.name} has "
          f"{self.num_classes} classes"
      )
    self.task = "classification"
    self.class_names = tfds_source.class_names_of(builder)
    self.class_counts = None  # unknown without reading every record
    self.skipped: list[str] = []
    self.prepare = lambda batch: batch
    shape = builder.info.features[self.image_key].shape
    self.channels = int(shape[-1] or 3)
    self.image_size = int(config.image_size)
    self.image_shape = (self.image_size, self.image_size, self.channels)
    ops = parse_augment(config.data.augment, "classification") if train else {}
    self.min_area = ops["inception_crop"][0] if "inception_crop" in ops else None
    self.eval_crop = float(config.data.eval_crop)
    self.shuffle_buffer = int(config.data.shuffle_buffer)
    self.cache_bytes = float(config.data.cache_mb) * 2**20
    self.workers = int(config.data.workers)
    self.host_transform = build_transform(config.data, train=train, task="classification",
                                          image_size=self.image_size, geometry=False)
    self._records = None
    self._eval_ds = None

  def _count(self, builder, names: list[str]) -> dict[str, int]:
    """Split sizes from the records when the dataset info lacks them (e.g. under mock_data)."""
    sizes = {}
    for name in names:
      count = int(tfds_source.as_dataset(builder, name).cardinality())
      if count < 0:
        raise ValueError(f"tfds:{builder.name}: the size of split {name!r} is unknown")
      sizes[name] = count
    return sizes

  # --- tf.data pieces -----------------------------------------------------------------------

  @property
  def steps_per_epoch(self) -> int:
    """Steps per epoch; the smallest process shard sets it, so every process agrees."""
    return max(1, (self.num_examples // self.process_count) // self.local_batch_size)

  def shard_split(self) -> str:
    """This process's slice [lo, hi) of the selection as a TFDS split expression."""
    pieces, position = [], 0
    for name, start, end in self.ranges:
      a, b = max(self.lo, position), min(self.hi, position + end - start)
      if a < b:
        pieces.append(f"{name}[{start + a - position}:{start + b - position}]")
      position += end - start
    return "+".join(pieces)

  def _options(self):
    options = self._tf.data.Options()
    options.deterministic = True  # the same seed gives the same batches
    if self.workers:
      options.threading.private_threadpool_size = self.workers
    return options

  def records(self):
    """(global position, encoded image, label) of this shard, in file order; cached if small."""
    if self._records is None:
      tf, tfds = self._tf, self._tfds
      ds = tfds_source.as_dataset(
          self.builder, self.shard_split(), shuffle_files=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(options=self._options()),
      )
      lo = self.lo
      ds = ds.enumerate().map(
          lambda i, ex: (i + lo, ex[self.image_key], tf.cast(ex[self.label_key], tf.int32)),
          num_parallel_calls=tf.data.AUTOTUNE,
      )
      if self._shard_bytes() <= self.cache_bytes:
        ds = ds.cache()
      self._records = ds
    return self._records

  def _shard_bytes(self) -> float:
    splits = self.builder.info.splits
    if any(name not in splits for name, _, _ in self.ranges):
      return math.inf  # unknown size: do not cache
    total = sum(
        float(splits[name].num_bytes or 0) * (end - start) / max(1, splits[name].num_examples)
        for name, start, end in self.ranges
    )
    return total / self.process_count

  def _decode(self, data, seed=None):
    """Encoded bytes -> uint8 [S, S, C]: inception crop with `seed`, else the eval center crop."""
    tf = self._tf
    size, channels = self.image_size, self.channels

    def window(shape):
      h, w = shape[0], shape[1]
      if seed is not None:
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.stack([h, w, channels]), tf.zeros([1, 0, 4], tf.float32), seed=seed,
            min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(self.min_area, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True,
        )
        return tf.stack([begin[0], begin[1], extent[0], extent[1]])
      if_exact = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
      side = tf.cast(tf.cast(tf.minimum(h, w), tf.float32) * self.eval_crop, tf.int32)
      side = tf.where(if_exact, size, tf.maximum(side, 1))
      return tf.stack([(h - side) // 2, (w - side) // 2, side, side])

    def jpeg():
      crop = window(tf.image.extract_jpeg_shape(data))
      return tf.image.decode_and_crop_jpeg(data, crop, channels=channels)

    def other():
      image = tf.io.decode_image(data, channels=channels, expand_animations=False)
      crop = window(tf.shape(image))
      return tf.slice(image, [crop[0], crop[1], 0], [crop[2], crop[3], channels])

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

  def _train_epoch(self, epoch: int, skip: int):
    tf = self._tf
    b, steps = self.local_batch_size, self.steps_per_epoch
    need, have = steps * b, self.hi - self.lo
    if have == 0:
      raise ValueError(f"process {self.process_index} has no training example (split too small)")
    epoch_seed = _seed(self.seed, epoch, self.process_index)
    ds = self.records()
    if have < need:  # tiny splits: repeat to fill an epoch
      ds = ds.repeat(-(-need // have))
    ds = ds.shuffle(min(self.shuffle_buffer, need), seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(need).enumerate()
    if skip:
      ds = ds.skip(skip)  # a resumed run: records are skipped before they are decoded
    seed_base = _seed(self.seed, epoch, self.process_index, 7)

    def prepare(k, record):
      position, data, label = record
      seed = tf.stack([tf.constant(seed_base, tf.int64), k]) if self.min_area else None
      return {"image": self._decode(data, seed), "label": label, "id": position}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(self._options())

  def _eval_dataset(self):
    if self._eval_ds is None:
      tf = self._tf
      ds = self.records().map(
          lambda position, data, label: {
              "image": self._decode(data), "label": label, "id": position
          },
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
      )
      decoded = (self.hi - self.lo) * math.prod(self.image_shape)
      if decoded <= self.cache_bytes:  # eval crops are deterministic: decode once
        ds = ds.cache()
      self._eval_ds = ds.batch(self.local_batch_size).prefetch(tf.data.AUTOTUNE)
    return self._eval_ds

  # --- ArrayInput's interface ---------------------------------------------------------------

  def train_batches(self, start_step: int = 0):
    """Endless training batches from `start_step` on (see the module docstring for resume)."""

    def generate():
      step = start_step
      epoch, within = divmod(start_step, self.steps_per_epoch)
      while True:
        for batch in self._train_epoch(epoch, within * self.local_batch_size).as_numpy_iterator():
          rng = np.random.default_rng([self.seed, step, self.process_index, 1])
          yield self.prepare(self.host_transform(dict(batch), rng))
          step += 1
        epoch, within = epoch + 1, 0

    batches = generate()
    return prefetch_in_thread(lambda: next(batches), self.prefetch)

  def eval_batches(self):
    """One pass over the split; every process yields the same number of padded batches."""
    b = self.local_batch_size
    largest_shard = -(-self.num_examples // self.process_count)
    num_batches = -(-largest_shard // b)
    rng = np.random.default_rng([self.seed, 2])
    produced = 0
    if self.hi > self.lo:
      for batch in self._eval_dataset().as_numpy_iterator():
        yield self._padded(dict(batch), rng)
        produced += 1
    for _ in range(produced, num_batches):  # this process ran out before the others
      yield self._padded({"image": np.zeros((0, *self.image_shape), np.uint8),
                          "label": np.zeros((0,), np.int32), "id": np.zeros((0,), np.int64)}, rng)

  def _padded(self, batch: dict, rng) -> dict:
    n, b = len(batch["label"]), self.local_batch_size
    pad = b - n
    batch = {
        "image": np.concatenate([batch["image"], np.zeros((pad, *self.image_shape), np.uint8)]),
        "label": np.concatenate([batch["label"], np.zeros((pad,), np.int32)]),
        "id": np.concatenate([batch["id"].astype(np.int64), np.full((pad,), -1, np.int64)]),
    }
    batch = self.prepare(self.host_transform(batch, rng))
    batch["valid"] = np.arange(b) < n
    return batch


def create_input(arg: str, config, split: str, *, train: bool, process_index: int = 0,
                 process_count: int = 1):
  """An ArrayInput over the selection read into memory, or a TfdsStream (see the module doc of
  jaxvision.data.tfds for the choice)."""
  builder = tfds_source.get_builder(arg, config.data)
  if tfds_source.use_stream(builder, split, config.data, config.image_size):
    return TfdsStream(builder, split, config, train=train, process_index=process_index,
                      process_count=process_count)
  source = tfds_source.materialise(builder, split, config.data)
  check_num_classes(source, config)
  return ArrayInput.from_config(config, source, train=train, process_index=process_index,
                                process_count=process_count)
