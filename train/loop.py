"""`train_and_evaluate(config, workdir)`: resolve -> freeze -> build -> run.

The config is completed from the data once (train.resolve) and frozen; the model, the task,
the optimizer and the executor are built from it (train.build); then the loop runs the task's
steps and never looks inside a batch or a model output.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from train import checkpoint as ckpt
from train.build import build_model, build_task, check_model
from train.optim import create_optimizer, create_schedule
from train.parallel import create_executor, prefetch_to_device
from train.report import Reporter, run_summary
from train.resolve import resolve
from train.transfer import initialize_from

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


def evaluate(executor, state, eval_input, task, prefetch: int) -> dict[str, float]:
  """Exact metrics over the whole eval split: sums over batches then one division, and the
  per-example outputs gathered in order for the metrics that are not sums."""
  sums, examples = None, []
  for batch in prefetch_to_device(eval_input.eval_batches(), prefetch, executor.put_batch):
    batch_sums, batch_examples = executor.eval_step(state, batch)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
    if batch_examples:
      examples.append(jax.device_get(batch_examples))
  gathered = jax.tree.map(lambda *parts: np.concatenate(parts), *examples) if examples else {}
  return task.finalize(jax.device_get(sums), gathered)


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
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0

  # Everything that can reject the input runs before anything is written to the workdir.
  config, train_input, eval_input = resolve(
      config, process_index=process_index, process_count=process_count)
  model, task = build_model(config), build_task(config)
  check_model(model, task, config)
  train_input.prepare = functools.partial(task.prepare, train=True)
  if eval_input is not None:
    eval_input.prepare = functools.partial(task.prepare, train=False)
  executor = create_executor(config, model, create_optimizer(config), task)
  total_steps = int(config.total_steps)

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
      state = executor.from_checkpoint(
          initialize_from(executor.to_checkpoint(state), config.init_from, config)
      )
  else:
    state = executor.from_checkpoint(state)
  step_key = jax.random.fold_in(base_key, 0x57E9)

  reporter = Reporter(workdir, total_steps, enabled=is_main, progress=config.progress,
                      start_step=start_step)
  parameters = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(executor.abstract_state.params))
  reporter.message(run_summary(config, devices=executor.describe(), parameters=parameters,
                               workdir=workdir, start_step=start_step))
  schedule = create_schedule(config)
  record = {"model": config.model, "dataset": config.dataset}
  if train_input.skipped:
    reporter.message(f"skipped {len(train_input.skipped)} unreadable training images "
                     "(data.skip_bad)")

  def save(step: int, metrics=None, force=False):
    _check_finite(executor, state)
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
        reporter.advance(step)
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
          _check_finite(executor, state)  # after the row, so the NaN is on record
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
            (step % config.log_every == 0 or last) and _agree(preemption.requested))
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
    if step == total_steps and process_count == 1 and task.num_pictures:
      save_pictures(model, task, executor.to_checkpoint(state), eval_input,
                    os.path.join(workdir, "overlays", "eval_"))
  return eval_metrics


def save_pictures(model, task, state, eval_input, path_prefix: str) -> list[str]:
  """The task's pictures of its first `num_pictures` eval examples, predicted two at a time
  (host memory stays small for large images)."""
  variables = jax.device_get(state.variables(state.eval_params))

  def forward(*args, **kwargs):
    return model.apply(variables, *args, train=False, **kwargs)

  predict = jax.jit(lambda batch: task.predict(forward, batch))
  parts, predictions, count = [], [], 0
  for batch in eval_input.eval_batches():
    keep = np.asarray(batch["valid"], bool)
    real = {k: np.asarray(v)[keep] for k, v in batch.items()}
    for i in range(0, int(keep.sum()), 2):
      chunk = {k: v[i:i + 2] for k, v in real.items()}
      parts.append(chunk)
      predictions.append(jax.device_get(predict(chunk)))
      count += len(chunk["valid"])
      if count >= task.num_pictures:
        break
    if count >= task.num_pictures:
      break
  if not parts:
    return []
  concat = lambda *xs: np.concatenate(xs)[:task.num_pictures]
  return task.save_pictures(path_prefix, jax.tree.map(concat, *parts),
                            jax.tree.map(concat, *predictions))


def _check_finite(executor, state) -> None:
  bad = int(executor.host_scalar(state.nonfinite_step))
  if bad >= 0:
    raise NonFiniteLossError(
        f"loss or gradients became NaN/Inf at step {bad + 1}; stopped, the last good "
        f"checkpoint is kept"
    )


def _agree(flag: bool) -> bool:
  """True on every process when any process got the flag (SIGTERM reaches hosts at different
  times)."""
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
