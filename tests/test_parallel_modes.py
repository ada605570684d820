"""One step, several executions: pmap and mesh, FSDP, gradient accumulation, and checkpoints
that move between device counts give the losses of a plain 4-device mesh run."""

import jax
import numpy as np
import pytest

from conftest import final_params, read_metrics, small_config
from train import loop


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
