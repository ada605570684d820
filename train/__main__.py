"""python -m train --config configs/NAME.py[:arg] --workdir DIR [--config.key=value ...]

The only file that defines flags. Multi-host: pass --coordinator_address, --num_processes and
--process_id (GPU clusters, or several processes on one machine), or --multihost alone to let
JAX detect the cluster (TPU pods, SLURM). Errors in the config, the data or a checkpoint end
the run with one line naming the culprit and exit status 2.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/lenet_digits.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Initialise JAX's distributed runtime by auto-detection (TPU pods, SLURM)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad --config override reported in one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    # ml_collections names only the offending key; the overrides given help find it.
    print(f"error: config override rejected: {str(e).strip(chr(34))} (no such key, or a value of the "
          f"wrong type; overrides given: {', '.join(overrides) or 'none'})", file=sys.stderr)
  sys.exit(2)


def main(argv):
  logging.getLogger("absl").setLevel(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
  elif _MULTIHOST.value:
    jax.distributed.initialize()

  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use
  except Exception as e:  # noqa: BLE001 - a config file that fails to load or to run
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    print(f"error: --config could not be loaded: {lines[-1] if lines else type(e).__name__}",
          file=sys.stderr)
    sys.exit(2)

  from train.checkpoint import CheckpointError
  from train.loop import NonFiniteLossError, train_and_evaluate

  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError,
          NonFiniteLossError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
