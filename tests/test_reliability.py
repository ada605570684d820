"""Damaged checkpoints, the data position across a resume, and bitwise determinism.

(Kills and preemption: test_kill_resume.py; topology changes on resume: test_train.py;
multi-process runs: test_multiprocess.py; bad input: test_bad_input.py.)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import final_params, small_config, xla_flags
from train import checkpoint as ckpt
from train import loop

pytestmark = pytest.mark.usefixtures("compile_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("images_per_sec", "data_wait_ms")  # wall-clock measurements, not results


def config_with(**overrides):
  """A 30-step LeNet run on digits, with `overrides` ('mesh.num_devices' style keys too)."""
  return small_config(**{"total_steps": 30, **overrides})


def _last_row_per_step(workdir):
  return {(r["step"], r["split"]): r for r in metric_rows(workdir)}


def metric_rows(workdir):
  """metrics.jsonl rows without their timing fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in map(json.loads, f)]


# --- a damaged latest checkpoint ------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 30-step run, and one stopped at step 20 (checkpoints 10 and 20)."""
  root = tmp_path_factory.mktemp("damaged")
  loop.train_and_evaluate(config_with(), str(root / "straight"))
  loop.train_and_evaluate(config_with(stop_at_step=20), str(root / "stopped"))
  assert sorted(os.listdir(root / "stopped" / "checkpoints")) == ["10", "20"]
  return root


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


DAMAGE = {  # name -> what to do to checkpoint 20
    "truncated_array_file": lambda d: _truncate(_largest_array_file(d)),
    # Orbax itself restores this one without a word, and wrong: the trainer's checksums catch it.
    "flipped_bit_in_array_file": lambda d: _flip_a_bit(_largest_array_file(d)),
    "deleted_array_file": lambda d: os.remove(_largest_array_file(d)),
    "deleted_state_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "truncated_state_metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "deleted_ocdbt_manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "deleted_record": lambda d: os.remove(os.path.join(d, "record", "metadata")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_previous(runs, tmp_path, caplog, capsys, damage):
  workdir = tmp_path / "w"
  shutil.copytree(runs / "stopped", workdir)
  bad = str(workdir / "checkpoints" / "20")
  DAMAGE[damage](bad)
  with caplog.at_level(logging.WARNING, logger="train"):
    loop.train_and_evaluate(config_with(progress="lines"), str(workdir))
  warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warnings) == 1 and f"checkpoint {bad} is unreadable" in warnings[0], warnings
  assert "(resumed from step 10)" in capsys.readouterr().out
  # Kept for inspection under another name, out of the way of the new save at step 20.
  assert os.path.isdir(bad + ".unreadable")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20", "20.unreadable", "30"]
  # The redone steps 11..20 give the losses they gave before, and the run the straight one's.
  assert _last_row_per_step(workdir) == _last_row_per_step(runs / "straight")
  step_a, a = final_params(runs / "straight")
  step_b, b = final_params(workdir)
  assert step_a == step_b == 30
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


def test_host_and_device_checksums_agree_on_every_dtype():
  """A checkpoint written by a single process (host checksums) verifies where its arrays are
  sharded over processes (device checksums), and back."""
  rng = np.random.default_rng(0)
  leaves = [
      jax.numpy.asarray(rng.normal(size=(3, 5)).astype(np.float32)),
      jax.numpy.asarray(rng.normal(size=(4,))).astype(jax.numpy.bfloat16),
      jax.numpy.asarray(rng.integers(-5, 5, (7,)).astype(np.int32)),
      jax.numpy.asarray(rng.integers(0, 255, (9,)).astype(np.uint8)),
      jax.numpy.asarray([True, False, True]),
      jax.numpy.int32(-1),
  ]
  on_device = [int(v) for v in jax.device_get(ckpt._fingerprint(None)(leaves))]
  on_host = [ckpt._host_fingerprint(np.asarray(x)) for x in leaves]
  assert on_host == on_device
  assert len(set(on_host)) == len(on_host)


def test_every_checkpoint_damaged_starts_afresh(runs, tmp_path, caplog):
  workdir = tmp_path / "w"
  shutil.copytree(runs / "stopped", workdir)
  for step in ("10", "20"):
    DAMAGE["deleted_array_file"](str(workdir / "checkpoints" / step))
  with caplog.at_level(logging.WARNING, logger="train"):
    loop.train_and_evaluate(config_with(), str(workdir))
  assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
  _, a = final_params(runs / "straight")
  _, b = final_params(workdir)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


# --- the data position is part of the state -------------------------------------------------------


def _recording_ids(monkeypatch):
  """Records the example ids of every batch the loop trains on, in order."""
  seen: list[np.ndarray] = []
  create = loop.create_executor

  def create_recording(*args, **kwargs):
    executor = create(*args, **kwargs)
    train_step = executor.train_step

    def recording_step(state, batch, rng):
      seen.append(np.asarray(batch["id"]).ravel())
      return train_step(state, batch, rng)

    executor.train_step = recording_step
    return executor

  monkeypatch.setattr(loop, "create_executor", create_recording)
  return seen


# 23 s (three runs); test_train's stop-and-resume checks the same in the default suite.
@pytest.mark.slow
def test_resume_neither_repeats_nor_skips_examples(tmp_path, monkeypatch):
  # digits: 1437 training examples, 32 per step: epoch 0 is steps 1..44, then epoch 1 begins.
  total, stop = 60, 30
  seen = _recording_ids(monkeypatch)
  loop.train_and_evaluate(config_with(total_steps=total), str(tmp_path / "straight"))
  straight = list(seen)
  seen.clear()
  loop.train_and_evaluate(config_with(total_steps=total, stop_at_step=stop), str(tmp_path / "r"))
  first = list(seen)
  seen.clear()
  # The rest on 2 devices and under pmap: the data position does not depend on the topology.
  loop.train_and_evaluate(
      config_with(total_steps=total, parallel="pmap", **{"mesh.num_devices": 2}),
      str(tmp_path / "r"))
  second = list(seen)

  assert len(straight) == total and len(first) == stop and len(second) == total - stop
  for step, (a, b) in enumerate(zip(straight, first + second, strict=True), start=1):
    np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
  per_epoch = 1437 // 32
  epoch0_before = np.concatenate(first)
  epoch0_after = np.concatenate(second[: per_epoch - stop])
  assert len(np.unique(epoch0_before)) == len(epoch0_before)  # nothing repeated before the stop,
  assert len(np.unique(epoch0_after)) == len(epoch0_after)  # nor after it,
  assert not np.intersect1d(epoch0_before, epoch0_after).size  # nor across it,
  epoch0 = np.concatenate([epoch0_before, epoch0_after])
  assert len(np.unique(epoch0)) == per_epoch * 32  # and every step drew a full batch of new ones
  epoch1 = np.concatenate(second[per_epoch - stop:])
  assert len(np.unique(epoch1)) == len(epoch1)  # a new epoch starts over, without repeats


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_gives_bitwise_identical_metrics(tmp_path):
  """One run in this process, one through the CLI: the same metrics.jsonl, bit for bit.

  The CLI run does not share the compilation cache: it compiles its own programs.
  """
  settings = dict(total_steps=30, log_every=5, eval_every=15, checkpoint_every=15)
  loop.train_and_evaluate(config_with(**settings), str(tmp_path / "a"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4))
  result = subprocess.run(
      [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py",
       "--workdir", str(tmp_path / "b"), "--config.batch_size=32", "--config.progress=none",
       *[f"--config.{k}={v}" for k, v in settings.items()]],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  a, b = metric_rows(tmp_path / "a"), metric_rows(tmp_path / "b")
  assert len(a) == 8 and {r["split"] for r in a} == {"train", "eval"}
  assert a == b  # JSON floats round-trip exactly: equal rows are equal bits
  _, params_a = final_params(tmp_path / "a")
  _, params_b = final_params(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
