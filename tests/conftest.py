"""Test setup: CPU only, with 4 fake devices so data/model parallel paths run on one machine.

XLA reads these flags when JAX initialises its backend, so they are set before any test
imports jax. Tests that need another device count run in a subprocess.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
  return REPO


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


# Every run of a module compiles the same few programs: a persistent compilation cache lets all
# but the first load them (about 1 s instead of 10 s of CPU per run on 2 cores). A module opts in
# with `pytestmark = pytest.mark.usefixtures("compile_cache")`; its subprocesses get the cache
# through `cached_env`.
_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """The cache directory, in use by this process while the module's tests run."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  path = str(tmp_path_factory.mktemp("jax_cache"))
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield path
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def cached_env(cache_dir: str, devices: int = 4) -> dict[str, str]:
  """The environment of a CPU subprocess with `devices` devices that shares the cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def read_metrics(workdir, split: str = "train") -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl for `split`."""
  import json

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]
