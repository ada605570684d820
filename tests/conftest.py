"""Test setup: CPU only, with 4 fake devices so data/model parallel paths run on one machine.

XLA reads these flags when JAX initialises its backend, so they are set before any test
imports jax. Tests that need another device count run in a subprocess.
"""

import os
import re
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, its subprocesses and its xdist workers
# (they inherit the environment): the same programs (LeNet on digits, the tiny models) are
# compiled by many tests, and all but the first load them.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvision-test-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
# Tests compile hundreds of small programs and run each for a few steps, so LLVM's full optimisation
# of the CPU code costs far more than it saves: without it a tiny ViT's forward/backward test
# takes half the time. The programs compute the same values (tolerances are unchanged); set the
# flag in XLA_FLAGS to test at another level.
_LEVEL = re.search(r"--xla_backend_optimization_level=\S+", os.environ["XLA_FLAGS"])
OPT_LEVEL_FLAG = _LEVEL.group(0) if _LEVEL else "--xla_backend_optimization_level=1"
if not _LEVEL:
  os.environ["XLA_FLAGS"] += " " + OPT_LEVEL_FLAG

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
  return REPO


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto`: one worker more than cores (pyproject's --maxprocesses caps it). A worker spends
  much of its time in single-threaded Python (imports, tracing, subprocess start-ups) between
  XLA compiles that use every core; a third worker on two cores keeps them busy (the default
  suite took 7:31 with three workers against 9:56 with two, back to back, 2026-12-01)."""
  del config
  return len(os.sched_getaffinity(0)) + 1


def small_config(config_module: str = "lenet_digits", **overrides):
  """A short run of `configs/<config_module>.py` (20 LeNet steps on digits by default):
  `overrides` are config keys, dotted for nested ones ('mesh.num_devices=2')."""
  import importlib

  c = importlib.import_module(f"configs.{config_module}").get_config()
  settings = dict(total_steps=20, log_every=1, eval_every=0, checkpoint_every=10, batch_size=32,
                  progress="none")
  settings.update(overrides)
  with c.unlocked():
    for key, value in settings.items():
      *parents, leaf = key.split(".")
      target = c
      for p in parents:
        target = target[p]
      target[leaf] = value
  return c


def pytest_sessionfinish(session, exitstatus):
  """Removes the run's compilation cache (in the process that made it)."""
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def compile_cache() -> str:
  """The run's persistent compilation cache directory (see the top of this file)."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def cached_env(cache_dir: str, devices: int = 4) -> dict[str, str]:
  """The environment of a CPU subprocess with `devices` devices that shares the cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS=xla_flags(devices))


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a CPU subprocess with `devices` devices, at the suite's optimisation level."""
  return f"--xla_force_host_platform_device_count={devices} {OPT_LEVEL_FLAG}"


def read_metrics(workdir, split: str = "train") -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl for `split`."""
  import json

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def final_params(workdir):
  """(latest step, its params as NumPy arrays) of WORKDIR's checkpoints."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from train.checkpoint import create_manager

  manager = create_manager(os.path.join(workdir, "checkpoints"), keep=5, read_only=True)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, restored["state"]["params"])
