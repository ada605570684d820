"""One step, several executions: pmap and mesh, FSDP, gradient accumulation, and checkpoints
that move between device counts give the losses of a plain 4-device mesh run."""

import functools

import jax
import numpy as np
import pytest

from conftest import final_params, read_metrics, small_config
from train import loop
from train.build import build_model, build_task
from train.optim import create_optimizer
from train.parallel import create_executor
from train.resolve import resolve

# The event JAX records each time it lowers a jitted program (jax.monitoring).
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@pytest.mark.parametrize("parallel,num_devices", [
    ("pmap", 4), pytest.param("mesh", 1, marks=pytest.mark.slow)])
def test_parallel_modes_match_mesh(tmp_path, parallel, num_devices):
  ref = small_config()
  loop.train_and_evaluate(ref, str(tmp_path / "mesh4"))
  other = small_config(parallel=parallel, **{"mesh.num_devices": num_devices})
  loop.train_and_evaluate(other, str(tmp_path / "other"))
  a = [r["loss"] for r in read_metrics(tmp_path / "mesh4")]
  b = [r["loss"] for r in read_metrics(tmp_path / "other")]
  assert len(a) == len(b) == 20
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_fsdp_matches_replicated(tmp_path):
  loop.train_and_evaluate(small_config(total_steps=5), str(tmp_path / "rep"))
  loop.train_and_evaluate(small_config(total_steps=5, **{"mesh.fsdp": 2}), str(tmp_path / "fsdp"))
  a = [r["loss"] for r in read_metrics(tmp_path / "rep")]
  b = [r["loss"] for r in read_metrics(tmp_path / "fsdp")]
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_grad_accumulation_equals_big_batch(tmp_path):
  big = small_config(total_steps=5, checkpoint_every=5)
  accum = small_config(total_steps=5, checkpoint_every=5, grad_accum_steps=2)
  loop.train_and_evaluate(big, str(tmp_path / "big"))
  loop.train_and_evaluate(accum, str(tmp_path / "accum"))
  _, p_big = final_params(tmp_path / "big")
  _, p_acc = final_params(tmp_path / "accum")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_big, p_acc)
  np.testing.assert_allclose(
      [r["loss"] for r in read_metrics(tmp_path / "big")],
      [r["loss"] for r in read_metrics(tmp_path / "accum")], rtol=1e-5)


@pytest.mark.parametrize("num_devices,parallel", [
    pytest.param(1, "mesh", marks=pytest.mark.slow), (2, "mesh"),
    pytest.param(2, "pmap", marks=pytest.mark.slow)])
def test_checkpoint_from_4_devices_restores_elsewhere(tmp_path, num_devices, parallel):
  loop.train_and_evaluate(small_config(), str(tmp_path / "ref"))
  loop.train_and_evaluate(small_config(stop_at_step=10), str(tmp_path / "moved"))
  loop.train_and_evaluate(
      small_config(parallel=parallel, **{"mesh.num_devices": num_devices}), str(tmp_path / "moved")
  )
  ref = [r["loss"] for r in read_metrics(tmp_path / "ref")]
  moved = [r["loss"] for r in read_metrics(tmp_path / "moved")]
  np.testing.assert_allclose(moved, ref, rtol=1e-5)


@pytest.mark.parametrize("parallel", ["mesh", "pmap"])
def test_the_step_compiled_in_the_background_is_the_one_every_step_runs(parallel):
  # The loop compiles the train step on a thread while the state is initialised; the steps
  # must then lower nothing again (pmap once lowered a second program for the state its own
  # first step returned, placed under another axis name).
  config, train_input, _ = resolve(small_config(parallel=parallel, eval_split=""),
                                   process_index=0, process_count=1)
  task = build_task(config)
  train_input.prepare = functools.partial(task.prepare, train=True)
  executor = create_executor(config, build_model(config), create_optimizer(config), task)
  batch = executor.put_batch(next(iter(train_input.train_batches(0))))
  key = jax.random.key(1)
  compiling = executor.compile_train_step(batch, key)
  state = executor.init_state(jax.random.key(0))
  compiling.result()
  lowerings = []
  listener = lambda event, duration, **kwargs: lowerings.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(3):
      state, metrics = executor.compiled_train_step(state, batch, key)
    jax.block_until_ready(metrics)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert LOWERING_EVENT not in lowerings, lowerings
