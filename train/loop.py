"""`train_and_evaluate(config, workdir)`: the training loop, assembled from small pieces."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.data import create_input
from jaxvision.models import create_model
from jaxvision.tasks import get_task
from train import checkpoint as ckpt
from train.configuration import check_model_fits, validate
from train.optim import create_optimizer, create_schedule
from train.parallel import create_executor, prefetch_to_device
from train.report import Reporter

log = logging.getLogger("train")

# How many train steps the host may dispatch beyond the last one known finished. Unbounded, JAX's
# asynchronous dispatch lets the host run up to log_every steps ahead of the device: every queued
# step pins its input batch in device memory, and a SIGTERM (a preemption notice gives ~30 s)
# would wait for the whole queue before the checkpoint. Two keep the device fed.
MAX_STEPS_AHEAD = 2


class NonFiniteLossError(RuntimeError):
  """The loss or gradients became NaN/Inf; the run stops, the last good checkpoint stays."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit 0)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def resolve(config, train_input):
  """Fills the keys left to the data (num_classes, task) and returns the run's total steps."""
  with config.unlocked():
    if not config.num_classes:
      config.num_classes = int(train_input.num_classes)
    if config.task == "auto":
      config.task = train_input.task
    if config.num_epochs:
      config.total_steps = int(round(config.num_epochs * train_input.steps_per_epoch))
  return int(config.total_steps)


def _peek_input_shape(train_input) -> tuple[int, ...]:
  if hasattr(train_input, "image_shape"):
    return (1, *train_input.image_shape)
  batches = train_input.train_batches(0)
  try:
    image = next(iter(batches))["image"]
  finally:
    if hasattr(batches, "close"):
      batches.close()
  return (1, *image.shape[1:])


def build_model(config, input_shape: tuple[int, ...] | None = None):
  """The registry model for `config`, with a one-line error for a bad keyword.

  Models whose parameters depend on the input size (ViT's position embedding) are built for
  `input_shape` (N, H, W, C), the data's, unless `config.model_kwargs.image_size` says otherwise.
  """
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[config.dtype]
  kwargs = dict(config.model_kwargs.to_dict())
  try:
    model = create_model(config.model, num_classes=config.num_classes, dtype=dtype, **kwargs)
  except TypeError as e:
    raise ValueError(
        f"config.model_kwargs={kwargs} do not fit model {config.model!r}: {e}") from None
  sized = "image_size" in {f.name for f in dataclasses.fields(model)}
  if input_shape is not None and sized and "image_size" not in kwargs:
    height, width = (int(d) for d in input_shape[1:3])
    model = model.clone(image_size=height if height == width else (height, width))
  return model


def evaluate(executor, state, eval_input, task, prefetch: int) -> dict[str, float]:
  """Exact metrics over the whole eval split (sums over batches, then one division)."""
  sums = None
  for batch in prefetch_to_device(eval_input.eval_batches(), prefetch, executor.put_batch):
    batch_sums = executor.eval_step(state, batch)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  return task.finalize(jax.device_get(sums))


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise PermissionError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir} is not writable")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final eval
  metrics."""
  validate(config)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0

  # Everything that can reject the input runs before anything is written to the workdir.
  train_input = create_input(
      config, config.train_split, train=True, process_index=process_index,
      process_count=process_count,
  )
  eval_input = None
  if config.eval_split:
    eval_input = create_input(
        config, config.eval_split, train=False, process_index=process_index,
        process_count=process_count,
    )
  total_steps = resolve(config, train_input)
  if config.task == "segmentation" and config.seg.weight_map:
    _add_weight_maps(train_input, config)
  input_shape = _peek_input_shape(train_input)
  model = build_model(config, input_shape)
  task = get_task(config.task, num_classes=config.num_classes, config=config)
  tx = create_optimizer(config, total_steps)
  check_model_fits(model, config, input_shape)
  executor = create_executor(config, model, tx, task, input_shape)

  if is_main:
    _check_workdir(workdir)
  manager = ckpt.create_manager(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
      best_metric=config.best_metric if eval_input is not None else "", best_mode=config.best_mode,
  )
  state, start_step, _ = ckpt.restore_latest(
      manager, executor.abstract_checkpoint, model=config.model
  )
  if is_main:  # only now: a run that refuses the workdir's checkpoint leaves its config alone
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  base_key = jax.random.key(config.seed)
  if state is None:
    state = executor.init_state(jax.random.fold_in(base_key, 0x1217))
    if config.init_from:
      from train.transfer import initialize_from

      state = executor.from_checkpoint(
          initialize_from(executor.to_checkpoint(state), config.init_from, config)
      )
  else:
    state = executor.from_checkpoint(state)
  step_key = jax.random.fold_in(base_key, 0x57E9)

  reporter = Reporter(workdir, total_steps, enabled=is_main, progress=config.progress,
                      start_step=start_step)
  if start_step:
    reporter.message(f"resumed from step {start_step} ({manager.directory})")
  schedule = create_schedule(config, total_steps)
  record = {"model": config.model, "dataset": config.dataset}
  skipped = getattr(train_input, "skipped", None)
  if skipped:
    reporter.message(f"skipped {len(skipped)} unreadable training images (data.skip_bad)")

  def save(step: int, metrics=None, force=False):
    _check_finite(executor, state, reporter)
    ckpt.save(manager, step, executor.to_checkpoint(state), {**record, "step": step}, metrics,
              force=force)

  eval_metrics: dict[str, float] = {}
  batches = prefetch_to_device(
      train_input.train_batches(start_step), config.data.prefetch, executor.put_batch
  )
  pending: list[dict] = []
  window_start, data_wait = time.perf_counter(), 0.0
  step = start_step
  try:
    with _Preemption() as preemption:
      while step < total_steps:
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        state, metrics = executor.train_step(state, batch, step_key)
        pending.append(metrics)
        if len(pending) > MAX_STEPS_AHEAD:
          jax.block_until_ready(pending[-1 - MAX_STEPS_AHEAD])
        step += 1
        last = step == total_steps

        if step % config.log_every == 0 or last:
          # The only host sync of the train loop: once per log interval.
          fetched = jax.device_get(pending)
          elapsed = time.perf_counter() - window_start
          row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
          row["learning_rate"] = float(schedule(step - 1))
          row["images_per_sec"] = len(fetched) * config.batch_size / max(elapsed, 1e-9)
          row["data_wait_ms"] = 1000.0 * data_wait / len(fetched)
          reporter.write(step, "train", row)
          _check_finite(executor, state, reporter)  # after the row, so the NaN is on record
          pending, window_start, data_wait = [], time.perf_counter(), 0.0

        evaluated = False
        eval_due = config.eval_every and step % config.eval_every == 0
        if eval_input is not None and (eval_due or last):
          eval_metrics = evaluate(executor, state, eval_input, task, config.data.prefetch)
          reporter.write(step, "eval", eval_metrics)
          evaluated = True
          window_start = time.perf_counter()  # eval time is not training throughput

        stopping = bool(config.stop_at_step and step >= config.stop_at_step)
        # Across processes the flag is agreed at log steps only (it costs a collective).
        preempted = preemption.requested if process_count == 1 else (
            (step % config.log_every == 0 or last) and _agree(preemption.requested, process_count))
        checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0
        if checkpoint_due or last or stopping or preempted:
          save(step, eval_metrics if evaluated else None, force=True)
        if preempted:
          reporter.message(f"SIGTERM: saved step {step}, exiting")
          break
        if stopping:
          reporter.message(f"stop_at_step: stopped at step {step}")
          break
  finally:
    batches.close()
    ckpt.wait(manager)
    manager.close()
    reporter.close()
  if is_main and eval_metrics:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **eval_metrics}, f, indent=2)
    if (config.task == "segmentation" and step == total_steps and process_count == 1
        and config.seg.overlays):
      _save_overlays(model, task, executor.to_checkpoint(state), eval_input, workdir,
                     max_images=int(config.seg.overlays))
  return eval_metrics


def _add_weight_maps(train_input, config) -> None:
  """Adds the U-Net paper's border weight map to every training batch (host side)."""
  from jaxvision.segmentation import add_weight_map

  transform = train_input.transform
  w0, sigma = float(config.seg.weight_map_w0), float(config.seg.weight_map_sigma)
  train_input.transform = lambda batch, rng: add_weight_map(
      transform(batch, rng), w0, sigma, num_classes=config.num_classes
  )


def _save_overlays(model, task, state, eval_input, workdir: str, max_images: int = 8) -> None:
  """WORKDIR/overlays/eval_NNN.png: image | prediction | errors, for the first eval images."""
  from jaxvision.segmentation import save_overlays

  variables = jax.device_get(state.variables(state.eval_params))
  predict = jax.jit(lambda x: task.eval_logits(
      lambda images: model.apply(variables, images, train=False), x))
  images, labels, predictions = [], [], []
  for batch in eval_input.eval_batches():
    keep = batch["valid"]
    for i in range(0, int(keep.sum()), 2):  # two at a time keeps host memory small
      x = batch["image"][keep][i:i + 2]
      predictions.append(np.asarray(predict(x)).argmax(-1))
      images.append(x)
      labels.append(batch["label"][keep][i:i + 2])
    if sum(len(p) for p in predictions) >= max_images:
      break
  if predictions:
    save_overlays(os.path.join(workdir, "overlays", "eval_"), np.concatenate(images)[:max_images],
                  np.concatenate(labels)[:max_images], np.concatenate(predictions)[:max_images])


def _check_finite(executor, state, reporter) -> None:
  bad = int(np.asarray(executor.host_scalar(state.nonfinite_step)).ravel()[0])
  if bad >= 0:
    raise NonFiniteLossError(
        f"loss or gradients became NaN/Inf at step {bad + 1}; stopped, the last good "
        f"checkpoint is kept"
    )


def _agree(flag: bool, process_count: int) -> bool:
  """True on every process when any process got the flag (SIGTERM reaches hosts at different
  times)."""
  if process_count == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
