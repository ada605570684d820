"""Every Orbax call of the trainer lives here.

Checkpoints are written asynchronously under WORKDIR/checkpoints/<step>/ and only appear under
their final name once complete (Orbax writes to `<step>.orbax-checkpoint-tmp` and renames it),
so a kill at any moment never leaves a half-written checkpoint that a resume would pick up; the
temporary directory of an interrupted save is removed when the next run opens the manager.
Each checkpoint holds the train state and a small JSON record of the run (model, step, metrics).

A checkpoint damaged afterwards is found on resume: a truncated or deleted file fails to read,
and a changed byte fails the per-array checksums saved in the record (Orbax keeps none, and
would restore it silently). It is reported by name, moved aside to `<step>.unreadable` (kept for
inspection, and out of the way of the save that will reach that step again), and the previous
checkpoint is used.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store

from train.workdir import check_room, state_bytes

log = logging.getLogger("train")

UNREADABLE_SUFFIX = ".unreadable"

# Orbax spreads the writing of a replicated array over the devices that hold a copy, slicing it
# on device first: one small compile per array shape, seconds at the first save of a run on
# CPU, for no gain on small arrays (Orbax's own default turns it off on GPU). Large arrays
# still use it.
_MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),  # as Orbax's default handler has
      min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns of every override, a deliberate one too
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class CheckpointError(ValueError):
  """A checkpoint that cannot be used for this run (another model, other shapes, ...)."""


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
  # Handlers known up front, so a checkpoint's metadata can be read before restoring it.
  handlers = {"state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers, options=options)


def save(
    manager: ocp.CheckpointManager, step: int, state, record: dict, metrics: dict | None = None,
    *, force: bool = False,
) -> None:
  """Starts an asynchronous save of `state` and `record` at `step`.

  A full disk is found before the save starts (it would leave a half-written temporary
  directory and surface only at the next save); a save that fails all the same, this one or the
  previous asynchronous one, is a CheckpointError naming the directory and its free space.
  """
  directory = str(manager.directory)
  try:  # on every process: the workdir is shared, so all reach the same verdict
    check_room(directory, state_bytes(state))
  except OSError as e:
    raise CheckpointError(f"cannot save checkpoint {step}: {e}; the last complete checkpoint "
                          "is kept") from None
  # Orbax keeps no checksum of the arrays: a bit flipped on disk would restore silently.
  record = {**record, "checksums": checksums(state)}
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
  best = {k: float(v) for k, v in (metrics or {}).items()} or None
  try:
    manager.save(step, args=args, metrics=best, force=force)
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
    raise _save_failed(directory, step, e) from None


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending saves are on disk (CheckpointError when one failed)."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _save_failed(str(manager.directory), manager.latest_step(), e) from None


def _save_failed(directory: str, step, error: BaseException) -> CheckpointError:
  free = shutil.disk_usage(directory).free / 2**20
  return CheckpointError(f"saving checkpoint {step} in {directory} failed ({free:.1f} MiB free): "
                         f"{_describe(error)}; the last complete checkpoint is kept")


def read_record(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record saved with `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
  return dict(restored["record"])


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  """The directory of checkpoint `step`."""
  return os.path.join(str(manager.directory), str(step))


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *, run: dict):
  """(state, step, record) from the newest usable checkpoint, or (None, 0, {}) when there is none.

  An unreadable checkpoint (truncated or deleted files) is reported by name, set aside and the
  previous one tried; a checkpoint of another run (a `run` value its record states differently:
  model, dataset, split, batch size, seed) or of other parameter shapes is an error
  (CheckpointError), not a fallback: resuming it would be wrong, and so would ignoring it.
  """
  model = run["model"]
  _install_quiet_hook()
  wanted = _leaf_shapes(abstract_state)
  for step in sorted(manager.all_steps(), reverse=True):
    path = step_dir(manager, step)
    try:
      record = read_record(manager, step)
      saved = _leaf_shapes(_state_metadata(manager, step))
      error = None
    except Exception as e:  # noqa: BLE001 - whatever makes a checkpoint unreadable
      error = e
    if _any_process(error is not None):
      _set_aside(manager, step, error)
      continue
    for key, value in run.items():
      if key in record and record[key] != value:
        raise CheckpointError(
            f"checkpoint {path} was saved with {key}={record[key]!r}, but this run has "
            f"{key}={value!r}; resume with the same {key} or use another --workdir")
    problem = _first_difference(saved, wanted)
    if problem:
      raise CheckpointError(
          f"checkpoint {path} does not fit this run's {model!r}: {problem} (model_kwargs, "
          "num_classes, optimizer or ema_decay changed?); use another --workdir"
      )
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )
      _verify(restored["state"], record)
      error = None
    except Exception as e:  # noqa: BLE001
      error = e
    if _any_process(error is not None):
      _set_aside(manager, step, error)
      continue
    return restored["state"], step, record
  return None, 0, {}


def restore_params(directory: str, step: int | None = None) -> tuple[dict, dict, int]:
  """(params, batch_stats, step) of a checkpoint directory written by this trainer, on the host
  (fine-tuning, viz, predict, export); `step` None: the latest."""
  manager = create_manager(directory, keep=1, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint found in {directory}")
  # Onto one local device, whatever topology wrote it (a bare restore insists on the same one).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        _state_metadata(manager, step))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  state = restored["state"]
  try:
    _verify(state, read_record(manager, step))
  except CheckpointCorrupted as e:
    raise CheckpointError(f"checkpoint {step_dir(manager, step)}: {e}") from None
  to_host = lambda tree: jax.tree.map(lambda x: jax.device_get(x), tree)
  return to_host(state["params"]), to_host(state.get("batch_stats", {}) or {}), int(step)


def _state_metadata(manager: ocp.CheckpointManager, step: int):
  metadata = manager.item_metadata(step)["state"]
  if metadata is None:
    raise FileNotFoundError(f"{step_dir(manager, step)}/state/_METADATA is missing or unreadable")
  return metadata


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'params/conv1/kernel': shape, ...}, alike for a live state and a checkpoint's metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in leaves}


class CheckpointCorrupted(ValueError):
  """Restored arrays that differ from what was saved."""


def checksums(state) -> dict[str, int]:
  """{leaf name: 32-bit checksum of its bits}; a flipped bit always changes its leaf's value.

  On CPU, arrays this process holds whole are summed with numpy (no compile: a short run would
  otherwise spend a second compiling this reduction). Elsewhere, and for arrays sharded over
  processes, one small reduction per leaf runs on device, so only the numbers reach the host.
  Both give the same numbers.
  """
  leaves = jax.tree_util.tree_leaves(state)
  if not leaves:
    return {}
  if all(getattr(x, "is_fully_addressable", True)
         and all(d.platform == "cpu" for d in getattr(x, "devices", lambda: ())())
         for x in leaves):
    values = [_host_fingerprint(np.asarray(x)) for x in jax.device_get(leaves)]
  else:
    sharding = getattr(leaves[0], "sharding", None)
    replicated = None
    if isinstance(sharding, jax.sharding.NamedSharding):
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    values = jax.device_get(_fingerprint(replicated)(leaves))
  return dict(zip(_leaf_shapes(state), (int(v) for v in values), strict=True))


# Odd weights that depend on the position: a changed bit or two swapped values always show.
_WEIGHT = 2654435761


def _host_fingerprint(x: np.ndarray) -> int:
  flat = np.ascontiguousarray(x).reshape(-1)
  # As on device: booleans count as 0/1, 8-byte values as their two 32-bit words.
  bits = flat.view(np.uint8 if x.dtype == np.bool_ else _UNSIGNED[x.dtype.itemsize])
  bits = bits.astype(np.uint32)
  weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(_WEIGHT) | np.uint32(1)
  return int(np.sum(bits * weights, dtype=np.uint32))


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


@functools.cache
def _fingerprint(out_sharding):
  def leaf_sum(x):
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
      bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(_WEIGHT) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)

  return jax.jit(lambda leaves: jnp.stack([leaf_sum(x) for x in leaves]),
                 out_shardings=out_sharding)


def _verify(state, record: dict) -> None:
  """Raises CheckpointCorrupted naming the first leaf whose checksum differs from the saved one."""
  saved = record.get("checksums")
  if not saved:  # written before checksums were recorded
    return
  for name, value in checksums(state).items():
    if name in saved and saved[name] != value:
      raise CheckpointCorrupted(f"{name} does not match the checksum saved with it (the file "
                                "changed after it was written)")


def _first_difference(saved: dict, wanted: dict) -> str:
  # Parameters first: they say what changed (the optimizer state only follows them).
  for name in sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith("params/"), n)):
    if name not in wanted:
      return f"it holds {name} {saved[name]}, which this run does not have"
    if name not in saved:
      return f"it lacks {name} {wanted[name]}"
    if saved[name] != wanted[name]:
      return f"{name} has shape {saved[name]} there, {wanted[name]} here"
  return ""


def _any_process(flag: bool) -> bool:
  """True on every process when it is true on any (all processes must skip the same steps)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _set_aside(manager: ocp.CheckpointManager, step: int, error: BaseException | None) -> None:
  """Warns about an unreadable checkpoint, and renames it so that it is not tried again."""
  path = step_dir(manager, step)
  reason = _describe(error) if error is not None else "unreadable on another process"
  if manager._options.read_only:  # noqa: SLF001 - Orbax has no public accessor for it
    log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, reason)
    return
  _barrier(f"jaxvision: set aside checkpoint {step}")  # every process has looked at it
  aside, n = path + UNREADABLE_SUFFIX, 0
  while os.path.exists(aside):
    n += 1
    aside = f"{path}{UNREADABLE_SUFFIX}.{n}"
  _barrier(f"jaxvision: named the place for checkpoint {step}")
  if jax.process_index() == 0:
    os.rename(path, aside)
  _barrier(f"jaxvision: moved checkpoint {step}")
  manager.reload()
  log.warning("checkpoint %s is unreadable (%s); moved it to %s, resuming from the previous one",
              path, reason, aside)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _describe(error: BaseException) -> str:
  """One readable line for an Orbax/TensorStore error (their messages embed whole JSON specs)."""
  text = str(error)
  array = re.search(r"""['"]path['"]:\s*['"]([^/'"][^'"]*?)/?['"]""", text)
  line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
  line = re.split(r"\s*(?:See full TensorStore details|\[tensorstore_spec=)", line)[0]
  if array and array.group(1) not in line:
    line += f" (array {array.group(1)})"
  return f"{type(error).__name__}: {line}"[:400]


def _install_quiet_hook() -> None:
  """Drops the echoes Orbax/TensorStore leave behind when a checkpoint file is damaged.

  The read error itself is raised and reported in one line, but the abandoned read coroutines
  ("Encountered error while reading array index") and TensorStore callbacks that arrive after
  Orbax closed its event loop ("Event loop is closed") also print tracebacks, sometimes
  hundreds of lines, some after the restore returned. Only those two are dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_jaxvision_quiet", False):
    return

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if text.startswith(_ECHOES):
      return
    previous(unraisable)

  hook._jaxvision_quiet = True
  sys.unraisablehook = hook


_ECHOES = ("Encountered error while reading array index", "Event loop is closed")
