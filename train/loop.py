"""`train_and_evaluate(config, workdir)`: resolve -> freeze -> build -> run.

The config is completed from the data once (train.resolve) and frozen; the model, the task,
the optimizer and the executor are built from it (train.build); then the loop runs the task's
steps and never looks inside a batch or a model output.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from train import checkpoint as ckpt
from train import signals
from train.build import build_model, build_task, check_model
from train.optim import create_optimizer, create_schedule
from train.parallel import create_executor, prefetch_to_device
from train.report import Reporter, run_summary
from train.resolve import resolve
from train.transfer import flatten, initialize_from
from train.workdir import WorkdirError, WorkdirLock, check_layout, state_bytes

log = logging.getLogger("train")

# How many train steps the host may dispatch beyond the last one known finished. Unbounded, JAX's
# asynchronous dispatch lets the host run up to log_every steps ahead of the device: every queued
# step pins its input batch in device memory, and a SIGTERM (a preemption notice gives ~30 s)
# would wait for the whole queue before the checkpoint. Two keep the device fed.
MAX_STEPS_AHEAD = 2


class NonFiniteLossError(RuntimeError):
  """The loss or gradients became NaN/Inf; the run stops, the last good checkpoint stays."""


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
  with signals.handled():
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict[str, float]:
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
  check_names(config, task, executor.abstract_state.params, evaluated=eval_input is not None)
  total_steps = int(config.total_steps)
  _stop_if_requested("during start-up", process_count)

  lock = WorkdirLock(workdir)
  _on_main_then_all(is_main, process_count, lambda: (_check_workdir(workdir), lock.acquire()))
  try:
    return _run(config, workdir, train_input, eval_input, model, task, executor, total_steps)
  finally:
    lock.release()


def _run(config, workdir, train_input, eval_input, model, task, executor,
         total_steps: int) -> dict[str, float]:
  """The run once the workdir is held: restore or initialise, train, evaluate, save."""
  process_count = jax.process_count()
  is_main = jax.process_index() == 0
  _on_main_then_all(is_main, process_count, lambda: check_layout(
      workdir, state_bytes(executor.abstract_checkpoint)))
  manager = ckpt.create_manager(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
      best_metric=config.best_metric if eval_input is not None else "", best_mode=config.best_mode,
  )
  try:
    record = {k: config[k] for k in RESUME_KEYS}
    state, start_step, saved = ckpt.restore_latest(manager, executor.abstract_checkpoint,
                                                   run=record)
    notes = _check_resumed_steps(saved, start_step, total_steps, manager)
    _stop_if_requested(f"after restoring step {start_step}" if start_step else
                       "during start-up", process_count)
  except BaseException:
    manager.close()
    raise
  if is_main:  # only now: a run that refuses the workdir's checkpoint leaves its config alone
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  base_key = jax.random.key(config.seed)
  source = prefetch_to_device(
      train_input.train_batches(start_step), config.data.prefetch, executor.put_batch
  )
  try:
    first = next(source) if start_step < total_steps else None
    step_key = jax.random.fold_in(base_key, 0x57E9)
    compiling = executor.compile_train_step(first, step_key) if first is not None else None
    if state is None:
      state = executor.init_state(jax.random.fold_in(base_key, 0x1217))
      if config.init_from:
        state = executor.from_checkpoint(
            initialize_from(executor.to_checkpoint(state), config.init_from, config)
        )
    else:
      state = executor.from_checkpoint(state)
    if compiling is not None:
      compiling.result()
  except BaseException:
    source.close()
    manager.close()
    raise
  batches = itertools.chain([first] if first is not None else [], source)

  reporter = Reporter(workdir, total_steps, enabled=is_main, progress=config.progress,
                      start_step=start_step)
  parameters = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(executor.abstract_state.params))
  reporter.message(run_summary(config, devices=executor.describe(), parameters=parameters,
                               workdir=workdir, start_step=start_step))
  for note in notes:
    reporter.message(note)
  schedule = create_schedule(config)
  if train_input.skipped:
    reporter.message(f"skipped {len(train_input.skipped)} unreadable training images "
                     "(data.skip_bad)")

  def save(step: int, metrics=None, force=False):
    _check_finite(executor, state)
    ckpt.save(manager, step, executor.to_checkpoint(state),
              {**record, "step": step, "total_steps": total_steps}, metrics, force=force)

  eval_metrics: dict[str, float] = {}
  evaluated_at = -1
  pending: list[dict] = []
  window_start, data_wait = time.perf_counter(), 0.0
  step = start_step
  try:
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
        evaluated, evaluated_at = True, step
        window_start = time.perf_counter()  # eval time is not training throughput

      stopping = bool(config.stop_at_step and step >= config.stop_at_step)
      # Across processes the flag is agreed at log steps only (it costs a collective).
      requested = signals.requested()
      preempted = bool(requested) if process_count == 1 else (
          (step % config.log_every == 0 or last) and _agree(bool(requested)))
      checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0
      if checkpoint_due or last or stopping or preempted:
        save(step, eval_metrics if evaluated else None, force=True)
      if preempted:
        reporter.message(f"{requested or 'stop signal'}: saved step {step}, exiting")
        break
      if stopping:
        reporter.message(f"stop_at_step: stopped at step {step}")
        break
    if step == total_steps and eval_input is not None and evaluated_at != step:
      # A rerun of a finished run (killed after its last checkpoint): finish its job.
      eval_metrics = evaluate(executor, state, eval_input, task, config.data.prefetch)
      if not reporter.has_row(step, "eval"):
        reporter.write(step, "eval", eval_metrics)
      reporter.message(f"the run was already complete at step {step}: evaluated it again")
  finally:
    source.close()
    try:
      ckpt.wait(manager)
    finally:
      manager.close()
      reporter.close()
  if is_main and eval_metrics:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **eval_metrics}, f, indent=2)
    if step == total_steps and process_count == 1 and task.num_pictures:
      save_pictures(model, task, executor.to_checkpoint(state), eval_input,
                    os.path.join(workdir, "overlays", "eval_"))
  return eval_metrics


# What a checkpoint records of its run, and a resumed run must share with it.
RESUME_KEYS = ("model", "dataset", "train_split", "batch_size", "seed")


def check_names(config, task, params, *, evaluated: bool) -> None:
  """One-line errors for config keys that name something the run does not have: the best
  metric (a metric of the task), the freeze / init_skip / scaled_lr_params patterns
  (parameter paths)."""
  if evaluated and config.best_metric and config.best_metric not in task.metric_names:
    raise ValueError(f"config.best_metric={config.best_metric!r} is not a metric of task "
                     f"{config.task!r} ({', '.join(task.metric_names)}); '' keeps no best")
  paths = list(flatten(params))
  for key in ("freeze", "init_skip", "scaled_lr_params"):
    pattern = config[key]
    if pattern and not any(re.search(pattern, p) for p in paths):
      raise ValueError(f"config.{key}={pattern!r} matches no parameter of {config.model!r} "
                       f"(paths such as {', '.join(paths[:3])})")


def _check_resumed_steps(record: dict, start_step: int, total_steps: int, manager) -> list[str]:
  """Notes on a resume that changes the schedule; an error when it would undo steps."""
  if not start_step:
    return []
  if start_step > total_steps:
    raise ckpt.CheckpointError(
        f"checkpoint {ckpt.step_dir(manager, start_step)} is at step {start_step}, past "
        f"total_steps={total_steps}; set total_steps >= {start_step} or use another --workdir")
  before = record.get("total_steps")
  if before is not None and before != total_steps:
    return [f"resuming at step {start_step} with total_steps={total_steps} (the checkpoint's "
            f"run had {before}): the learning-rate schedule follows the new length"]
  return []


def _stop_if_requested(where: str, process_count: int) -> None:
  """Ends the set-up (exit 0) when SIGTERM or Ctrl-C arrived; every process agrees."""
  signals.exit_if_requested(where)
  if process_count > 1 and _agree(False):
    raise signals.StopRequested(f"a peer process was stopped {where}; exiting")


def _on_main_then_all(is_main: bool, process_count: int, check) -> None:
  """`check()` on process 0; its error, if any, ends every process alike (no process waits
  for a peer that has already stopped)."""
  error = None
  if is_main:
    try:
      check()
    except (OSError, ValueError) as e:
      error = e
  if process_count > 1 and _agree(error is not None) and error is None:
    raise WorkdirError("process 0 refused the workdir (its error line says why)")
  if error is not None:
    raise error


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
