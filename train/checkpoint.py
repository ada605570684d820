"""Every Orbax call of the trainer lives here.

Checkpoints are written asynchronously under WORKDIR/checkpoints/<step>/ and only appear under
their final name once complete (Orbax writes to a temporary directory and renames it), so a
kill at any moment never leaves a half-written checkpoint that a resume would pick up.
Each holds the train state and a small JSON record of the run (model, step, eval metrics).
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger("train")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used for this run (wrong model, unreadable, ...)."""


def create_manager(
    directory: str, *, keep: int, best_metric: str = "", best_mode: str = "max",
    read_only: bool = False,
) -> ocp.CheckpointManager:
  """A manager keeping the `keep` latest checkpoints plus the best by `best_metric`."""
  policies = [checkpoint_managers.LatestN(n=max(int(keep), 1))]
  if best_metric:
    policies.append(
        checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric],
            reverse=best_mode == "min",
            n=1,
            keep_checkpoints_without_metrics=False,
        )
    )
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, record: dict, metrics: dict | None = None,
         *, force: bool = False) -> None:
  """Starts an asynchronous save of `state` and `record` at `step`."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
  best = {k: float(v) for k, v in (metrics or {}).items()} or None
  manager.save(step, args=args, metrics=best, force=force)


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending saves are on disk."""
  manager.wait_until_finished()


def read_record(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record saved with `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
  return dict(restored["record"])


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *, model: str):
  """(state, step, record) from the newest usable checkpoint, or (None, 0, {}) when there is none.

  A checkpoint that cannot be read (truncated or deleted files) is reported by name and the
  previous one is tried; a checkpoint of another model is an error, not a fallback.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    path = os.path.join(str(manager.directory), str(step))
    try:
      record = read_record(manager, step)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped with a warning
      log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, _one_line(e))
      continue
    if record.get("model") != model:
      raise CheckpointError(
          f"checkpoint {path} is of model {record.get('model')!r}, but this run's model is "
          f"{model!r}; use another --workdir"
      )
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )
    except Exception as e:  # noqa: BLE001
      message = _one_line(e)
      if "shape" in message.lower() or "structure" in message.lower() or "tree" in message.lower():
        raise CheckpointError(f"checkpoint {path} does not fit this run's model: {message}") from e
      log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, message)
      continue
    return restored["state"], step, record
  return None, 0, {}


def restore_params(directory: str, step: int | None = None) -> tuple[dict, dict]:
  """(params, batch_stats) of a checkpoint directory written by this trainer, for fine-tuning."""
  manager = create_manager(directory, keep=1, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"init_from: no checkpoint found in {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  to_host = lambda tree: jax.tree.map(lambda x: jax.device_get(x), tree)
  return to_host(state["params"]), to_host(state.get("batch_stats", {}) or {})


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]
