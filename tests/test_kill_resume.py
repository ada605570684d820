"""Kill -9 and SIGTERM of `python -m train`, then the same command again: nothing is lost.

One workdir goes through four interruptions of the same command, then a run to the end:
  1. SIGKILL between checkpoints (steps after the last checkpoint are lost, and redone),
  2. SIGKILL in the middle of an asynchronous checkpoint save (its temporary directory is on
     disk, half written: the rerun must not trip on it),
  3. SIGKILL while the rerun is restoring and compiling, before its first step,
  4. SIGTERM (preemption notice): saves the current step and exits 0 within seconds,
and the final parameters equal those of an uninterrupted run, as do all logged losses.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import lenet_digits
from conftest import cached_env, final_params
from train import loop

pytestmark = pytest.mark.usefixtures("compile_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# log_every=1: a train row is the mean over its log window, and a run resumed inside a window
# averages only the steps it ran; per-step rows compare exactly whatever the resume points.
SETTINGS = dict(total_steps=240, checkpoint_every=20, log_every=1, eval_every=80,
                keep_checkpoints=3, batch_size=32)
TIMEOUT = 300  # seconds for any one wait; generous for a loaded 2-core machine


def command(workdir: str) -> list[str]:
  """The one command every run of the test repeats."""
  return [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py",
          "--workdir", workdir, "--config.progress=lines",
          *[f"--config.{k}={v}" for k, v in SETTINGS.items()]]


class Run:
  """`python -m train` in the background, its output lines collected as they come."""

  def __init__(self, workdir: str, cache_dir: str):
    self.proc = subprocess.Popen(command(workdir), cwd=REPO, env=cached_env(cache_dir),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line.rstrip("\n"))
    self._queue.put(None)

  def wait_for(self, pattern: str) -> re.Match:
    """The first output line matching `pattern` (read after the ones already seen)."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
      try:
        line = self._queue.get(timeout=1)
      except queue.Empty:
        continue
      if line is None:
        break
      self.lines.append(line)
      if match := re.search(pattern, line):
        return match
    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

  def kill(self, sig=signal.SIGKILL) -> int:
    self.proc.send_signal(sig)
    return self.finish()

  def finish(self) -> int:
    self.proc.wait(timeout=TIMEOUT)
    while (line := self._queue.get(timeout=TIMEOUT)) is not None:
      self.lines.append(line)
    return self.proc.returncode


def finished_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints (final names only)."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def save_in_progress(workdir: str) -> list[str]:
  """Array files of a checkpoint save that has not been renamed to its final name yet."""
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*", "state*",
                                "ocdbt.process_0", "d", "*"))




def logged(workdir: str) -> dict[tuple[int, str], list[float]]:
  """{(step, split): every loss logged for it}; a resume drops the rows past its step first."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      rows.setdefault((row["step"], row["split"]), []).append(row["loss"])
  return rows


@pytest.mark.slow  # a minute of subprocesses; test_train's SIGTERM and resume tests run by default
def test_kill_and_sigterm_then_resume_equals_uninterrupted(tmp_path, compile_cache):
  config = lenet_digits.get_config()
  with config.unlocked():
    config.update(SETTINGS, progress="none")
  loop.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = str(tmp_path / "interrupted")
  resume = r"resumed from step (\d+)"

  # 1. SIGKILL mid-training, some steps after a checkpoint.
  run = Run(workdir, compile_cache)
  run.wait_for(r"train step (5\d|6\d)/")
  assert run.kill() == -signal.SIGKILL
  complete = finished_steps(workdir)
  assert complete, "no checkpoint before the first kill"

  # 2. SIGKILL while an asynchronous save is writing its arrays.
  run = Run(workdir, compile_cache)
  assert int(run.wait_for(resume)[1]) == complete[-1]
  deadline = time.time() + TIMEOUT
  while not (partial := save_in_progress(workdir)) and run.proc.poll() is None:
    assert time.time() < deadline, "never saw a save in progress"
    time.sleep(0.002)
  assert run.kill() == -signal.SIGKILL, "the run ended before a save could be interrupted"
  assert save_in_progress(workdir), f"the interrupted save left nothing behind ({partial})"
  complete = finished_steps(workdir)

  # 3. SIGKILL during restore and compilation, before the first new step: the half-written
  #    save of kill 2 is skipped (and cleaned up), the last complete checkpoint is used.
  run = Run(workdir, compile_cache)
  assert int(run.wait_for(resume)[1]) == complete[-1]
  assert run.kill() == -signal.SIGKILL

  # 4. SIGTERM: the step in progress is finished, saved, and the run exits 0 within seconds.
  run = Run(workdir, compile_cache)
  assert int(run.wait_for(resume)[1]) == complete[-1]
  run.wait_for(r"train step \d+/")
  sent = time.time()
  assert run.kill(signal.SIGTERM) == 0, "\n".join(run.lines)
  assert time.time() - sent < 15
  saved = int(re.search(r"SIGTERM: saved step (\d+)", "\n".join(run.lines))[1])
  assert finished_steps(workdir)[-1] == saved < SETTINGS["total_steps"]

  # The same command once more, to the end.
  run = Run(workdir, compile_cache)
  assert int(run.wait_for(resume)[1]) == saved
  assert run.finish() == 0, "\n".join(run.lines)
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))

  step_a, straight = final_params(str(tmp_path / "straight"))
  step_b, resumed = final_params(workdir)
  assert step_a == step_b == SETTINGS["total_steps"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), straight, resumed)
  # Every logged loss, redone steps included, is the uninterrupted run's.
  reference, interrupted = logged(str(tmp_path / "straight")), logged(workdir)
  assert interrupted.keys() == reference.keys()
  for key, losses in interrupted.items():
    # Exactly once: the rows a killed attempt logged past its last checkpoint were dropped.
    assert len(losses) == 1, f"{key} logged {len(losses)} times"
    np.testing.assert_allclose(losses, reference[key], rtol=1e-6, err_msg=str(key))
