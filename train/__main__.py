"""python -m train --config configs/NAME.py[:arg] --workdir DIR [--config.key=value ...]

Trains the experiment that the config file describes and evaluates it on its held-out split.
Every key is listed, with its meaning, in configs/base.py; override any of them on the command
line, e.g. --config.batch_size=256 --config.learning_rate=0.1 --config.parallel=pmap. Model
constructor arguments go in --model_kwargs=KEY=VALUE,... (merged into config.model_kwargs).

Examples:
  python -m train --config configs/lenet_digits.py --workdir runs/lenet_digits   # no download
  python -m train --config configs/unet_membrane.py:cpu --workdir runs/unet      # ':cpu' = preset

The workdir receives metrics.jsonl (one JSON row per log/eval step), TensorBoard events,
checkpoints/ (Orbax: the latest and the best by config.best_metric) and, for segmentation,
overlay PNGs. Rerunning the same command resumes from the latest complete checkpoint; SIGTERM
(preemption) saves and exits 0.

Multi-host: pass --coordinator_address, --num_processes and --process_id (GPU clusters, or
several processes on one machine), or --multihost alone to let JAX detect the cluster (TPU
pods, SLURM). Errors in the config, the data or a checkpoint end the run with one line naming
the culprit and exit status 2, leaving the workdir as it was.
"""
from __future__ import annotations

# SIGTERM and Ctrl-C are routed to the trainer before anything else runs, so a preemption notice
# that arrives while the imports below take their seconds still ends the run cleanly (exit 0).
from train import signals  # isort: skip

signals.install(exit_at_once=True)

import logging
import os
import sys
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from train import dry_run
from train.checkpoint import CheckpointError
from train.loop import NonFiniteLossError, train_and_evaluate
from train.model_kwargs import parse_model_kwargs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/lenet_digits.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_MODEL_KWARGS = flags.DEFINE_string(
    "model_kwargs", "",
    "Model constructor arguments merged into config.model_kwargs, e.g. 'width=32,upsample=resize' "
    "(--config.model_kwargs.KEY works only for keys the config file already sets).",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Initialise JAX's distributed runtime by auto-detection (TPU pods, SLURM)."
)
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout", 60,
    "Multi-process runs: seconds after which a process that stopped answering counts as dead and "
    "the others end too.",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False,
    "Build the run from abstract shapes, compile its train and eval steps ahead of time for "
    "--target (default: this machine's devices) and report the memory per device and whether it "
    "fits; no parameter is initialised and no data is loaded beyond its shapes. Exit status 0 "
    "when it fits, 2 when it does not.",
)
_TARGET = flags.DEFINE_string(
    "target", "",
    "With --dry_run: compile for these devices instead of this machine's, e.g. 'tpu:v5e:1x1' "
    "(a Colab v5e-1), 'tpu:v4:2x2x1', 'tpu:v5p:2x2x1', 'tpu:v6e:2x2' (needs libtpu: "
    "pip install 'jaxvision[tpu]').",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.join("~", ".cache", "jaxvision", "xla"),
    "Directory of JAX's persistent compilation cache: a rerun of the same programs (a resumed "
    "run, another learning rate) loads its compiled steps instead of compiling them again. '' "
    "turns it off; JAX_COMPILATION_CACHE_DIR, when set, is used instead.",
)
flags.mark_flags_as_required(["config"])


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad flag, override or config file is reported in one line (exit 2).

  A help request prints the flags and exits 0 (absl exits 1 for it).
  """
  if any(a in _HELP for a in argv[1:]):
    try:
      flags.FLAGS(argv)
    except SystemExit:
      pass
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_first_line(e)}", file=sys.stderr)
  except Exception as e:  # noqa: BLE001 - the config file is user code: anything can go wrong in it
    in_config = _config_file_line(e, argv)
    if in_config:
      print(f"error: --config {in_config}: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
    elif isinstance(e, OSError):  # ml_collections' "failed loading config file ..."
      lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
      print(f"error: --config could not be loaded: {lines[-1]}", file=sys.stderr)
    elif isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
      overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
      # ml_collections names only the offending key; the overrides given help find it. It wraps
      # a KeyError, whose text is the repr of its message: take the message itself, on one line.
      while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
      text = str(e.args[0]) if e.args else str(e)
      text = "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())
      print(f"error: config override rejected: {text} (no such key, or a value of the wrong "
            f"type; overrides given: {', '.join(overrides) or 'none'})", file=sys.stderr)
    else:
      raise
  sys.exit(2)


def _config_file_line(error: BaseException, argv: list[str]) -> str:
  """'FILE line N' when `error` was raised by the --config file's own code, else ''."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if not path:
    return ""
  path = os.path.abspath(path.split(":")[0])
  if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == path:
    return f"{error.filename} line {error.lineno}"
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == path]
  return f"{frames[-1].filename} line {frames[-1].lineno}" if frames else ""


def _first_line(error: BaseException) -> str:
  if isinstance(error, SyntaxError) and error.msg:
    return error.msg
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  return lines[0] if lines else type(error).__name__


def main(argv):
  """Validates the config, trains, and turns bad input into one `error:` line and exit 2."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  # JAX logs its backend probing (e.g. no TPU found) at INFO; keep the terminal for the run.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are --name=value; see --help)",
          file=sys.stderr)
    sys.exit(2)
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use
  except Exception as e:  # noqa: BLE001 - a config file that fails to load or to run
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    print(f"error: --config could not be loaded: {lines[-1] if lines else type(e).__name__}",
          file=sys.stderr)
    sys.exit(2)
  if _MODEL_KWARGS.value:
    try:
      extra = parse_model_kwargs(_MODEL_KWARGS.value)
    except ValueError as e:
      print(f"error: --model_kwargs: {e}", file=sys.stderr)
      sys.exit(2)
    with config.unlocked():
      config.model_kwargs.update(extra)

  # After the config: a bad one ends this process before it waits for the others. A peer that
  # dies stops sending heartbeats; the coordination service then ends the others after
  # --peer_timeout seconds instead of letting them wait in a collective.
  timeouts = dict(heartbeat_timeout_seconds=_PEER_TIMEOUT.value,
                  shutdown_timeout_seconds=_PEER_TIMEOUT.value)
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        **timeouts,
    )
  elif _MULTIHOST.value:
    jax.distributed.initialize(**timeouts)

  logging.getLogger("absl").setLevel(logging.WARNING)
  if _COMPILATION_CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_COMPILATION_CACHE.value))
    # Every program the trainer compiles, also the sub-second ones: together they are the
    # seconds before a short run's first step.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if _DRY_RUN.value:
    try:
      sys.exit(dry_run.dry_run(config, target=_TARGET.value))
    except (ValueError, OSError) as e:
      print(f"error: {_first_line(e)}", file=sys.stderr, flush=True)
      sys.exit(2)
  if _TARGET.value:
    print("error: --target is for --dry_run (training runs on this machine's devices)",
          file=sys.stderr)
    sys.exit(2)
  if not _WORKDIR.value:
    print("error: --workdir is required (where checkpoints, metrics and logs go)",
          file=sys.stderr)
    sys.exit(2)
  try:
    train_and_evaluate(config, _WORKDIR.value)
  except signals.StopRequested as e:
    print(str(e), file=sys.stderr, flush=True)
    _exit(0)
  except KeyboardInterrupt:
    print(signals.SECOND_CTRL_C, file=sys.stderr, flush=True)
    _exit(130)
  except (ValueError, OSError, ImportError, CheckpointError, NonFiniteLossError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    _exit(2)


def _exit(status: int) -> None:
  """Ends the process now: a failed or stopped run may leave library threads behind (Orbax's
  signalling threads wait minutes), and no process is to outlive its last line."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
