"""One run per workdir, nothing destroyed before a run is known to be good, no silent no-ops, and
stop signals honoured from the first instruction to the last (real processes where it matters).

Every CLI case ends with exactly one `error:` line (or none), the exit status it states, and the
workdir as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import cached_env, read_metrics, small_config
from train import checkpoint, loop, workdir

pytestmark = pytest.mark.usefixtures("compile_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
SHORT = ["--config.total_steps=20", "--config.log_every=10", "--config.eval_every=0",
         "--config.checkpoint_every=10", "--config.batch_size=32", "--config.progress=lines"]


def command(workdir_path, *overrides) -> list[str]:
  return [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py", "--workdir",
          str(workdir_path), *SHORT, *overrides]


def run(cache, workdir_path, *overrides, devices=1):
  return subprocess.run(command(workdir_path, *overrides), cwd=REPO, capture_output=True,
                        text=True, timeout=TIMEOUT, env=cached_env(cache, devices))


def error_lines(result) -> list[str]:
  return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def snapshot(path) -> dict[str, bytes]:
  """Every file under `path` (but the lock file), by relative path."""
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      if name != workdir.LOCK_FILE:
        files[os.path.relpath(full, path)] = open(full, "rb").read()
  return files


@pytest.fixture(scope="module")
def finished(tmp_path_factory, compile_cache):
  """A workdir whose 20-step run finished."""
  path = tmp_path_factory.mktemp("finished") / "w"
  result = run(compile_cache, path)
  assert result.returncode == 0, result.stderr
  return path


def _start(cache, workdir_path, *overrides):
  log = open(str(workdir_path) + ".log", "w")
  proc = subprocess.Popen(command(workdir_path, *overrides), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True, env=cached_env(cache, 1))
  return proc, str(workdir_path) + ".log"


def _wait_for(log: str, text: str, proc) -> None:
  deadline = time.time() + TIMEOUT
  while text not in open(log).read():
    assert proc.poll() is None, open(log).read()
    assert time.time() < deadline, f"no {text!r} in {log}"
    time.sleep(0.1)


def second_trainer_is_refused(cache, path) -> None:
  """The first trainer runs until the second was refused, then is preempted (SIGTERM): its
  metrics are every row once, up to the step it saved."""
  first, log = _start(cache, path, "--config.total_steps=100000", "--config.checkpoint_every=0")
  try:
    _wait_for(log, "train step 10/", first)
    second = run(cache, path, "--config.total_steps=100000", "--config.checkpoint_every=0")
    assert second.returncode == 2
    assert error_lines(second) == [
        f"error: workdir {path} is in use by another trainer (pid {first.pid} on host "
        f"{os.uname().nodename}); wait for it to finish or use another --workdir"]
  finally:
    first.send_signal(signal.SIGTERM)
    assert first.wait(TIMEOUT) == 0, open(log).read()
  (saved,) = [int(s) for s in os.listdir(os.path.join(path, "checkpoints"))]
  rows = [(r["step"], r["split"]) for r in read_metrics(path, "train")]
  assert rows == [(s, "train") for s in range(10, saved // 10 * 10 + 1, 10)]


@pytest.mark.slow  # 18-24 s: two trainer processes
def test_a_second_trainer_on_the_workdir_is_refused(tmp_path, compile_cache):
  second_trainer_is_refused(compile_cache, tmp_path / "w")


@pytest.mark.slow
def test_a_second_trainer_is_refused_twenty_times_in_twenty(tmp_path, compile_cache):
  for i in range(20):
    second_trainer_is_refused(compile_cache, tmp_path / f"w{i}")


def test_the_lock_of_a_killed_trainer_is_free(tmp_path, compile_cache):
  path = tmp_path / "w"
  first, log = _start(compile_cache, path, "--config.total_steps=400", "--config.log_every=1")
  _wait_for(log, "train step 1/", first)  # the lock is taken before the first step
  first.kill()
  first.wait()
  result = run(compile_cache, path, "--config.total_steps=2", "--config.eval_split=")
  assert result.returncode == 0, result.stderr


def test_checkpoints_that_is_not_a_directory_touches_nothing(tmp_path, compile_cache, finished):
  path = tmp_path / "w"
  shutil.copytree(finished, path)
  shutil.rmtree(path / "checkpoints")
  (path / "checkpoints").write_text("")
  before = snapshot(path)
  result = run(compile_cache, path)
  assert result.returncode == 2
  assert error_lines(result) == [f"error: {path}/checkpoints is not a directory; move it away "
                                 "(the run keeps its checkpoints there)"]
  assert snapshot(path) == before


def test_rerunning_a_finished_run_finishes_its_job(tmp_path, compile_cache, finished):
  path = tmp_path / "w"
  shutil.copytree(finished, path)
  os.remove(path / "final_metrics.json")  # killed right after its last checkpoint
  result = run(compile_cache, path)
  assert result.returncode == 0, result.stderr
  assert "the run was already complete at step 20: evaluated it again" in result.stdout
  assert json.load(open(path / "final_metrics.json"))["step"] == 20
  evals = [r["step"] for r in read_metrics(path, "eval")]
  assert evals == [20]  # logged once, not again


@pytest.mark.parametrize("override,message", [
    ("--config.total_steps=10", "is at step 20, past total_steps=10; set total_steps >= 20"),
    ("--config.batch_size=16", "was saved with batch_size=32, but this run has batch_size=16"),
    ("--config.seed=3", "was saved with seed=0, but this run has seed=3"),
    ("--config.train_split=train[:70%]", "was saved with train_split='train[:80%]'"),
])
def test_a_resume_that_would_undo_or_change_the_run_is_refused(tmp_path, compile_cache, finished,
                                                               override, message):
  path = tmp_path / "w"
  shutil.copytree(finished, path)
  before = snapshot(path)
  result = run(compile_cache, path, override)
  assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr
  assert message in error_lines(result)[0]
  assert snapshot(path) == before


def test_a_longer_run_resumes_and_says_so(tmp_path, compile_cache, finished):
  path = tmp_path / "w"
  shutil.copytree(finished, path)
  result = run(compile_cache, path, "--config.total_steps=30")
  assert result.returncode == 0, result.stderr
  assert "with total_steps=30 (the checkpoint's run had 20)" in result.stdout
  assert json.loads((path / "config.json").read_text())["total_steps"] == 30


@pytest.mark.parametrize("override,message", [
    ("--config.best_metric=miou", "config.best_metric='miou' is not a metric of task "
     "'classification' (loss, accuracy, top5)"),
    ("--config.freeze=^backbone/", "config.freeze='^backbone/' matches no parameter of 'lenet'"),
    ("--config.init_skip=((", "config.init_skip='((' is not a regular expression"),
    ("--config.num_epochs=0.001", "config.num_epochs=0.001 is 0 steps of"),
    ("--config.image_size=8", "model 'lenet' cannot take input (1, 8, 8, 1)"),
])
def test_names_and_sizes_that_cannot_work_are_one_line(tmp_path, compile_cache, override, message):
  result = run(compile_cache, tmp_path / "w", override)
  assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr
  assert message in error_lines(result)[0]
  assert not (tmp_path / "w").exists()


def test_a_full_disk_stops_at_the_save_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  path = tmp_path / "w"
  real = shutil.disk_usage
  saves = []

  def shrinking(directory):
    usage = real(directory)
    if str(directory).endswith("checkpoints"):
      saves.append(directory)
      if len(saves) >= 2:  # room for the first checkpoint, not the second
        return usage._replace(free=1000)
    return usage

  monkeypatch.setattr(workdir.shutil, "disk_usage", shrinking)
  with pytest.raises(checkpoint.CheckpointError, match=r"cannot save checkpoint 20: .*checkpoints "
                     r"has 0\.0 MiB free, but a checkpoint of this run takes about"):
    loop.train_and_evaluate(small_config(), str(path))
  assert sorted(os.listdir(path / "checkpoints")) == ["10"]


def _wait_for_handlers(proc) -> None:
  """Returns once `proc` catches SIGTERM (its SigCgt mask in /proc): `python -m train` installs
  its handlers before its heavy imports, so from then on the run is in its start-up, and a
  fixed delay would instead race a fast host's first step."""
  if not os.path.exists(f"/proc/{proc.pid}/status"):
    proc.kill()
    pytest.skip("needs Linux's /proc to see when the trainer's signal handlers are in place")
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline and proc.poll() is None:
    with open(f"/proc/{proc.pid}/status") as f:
      caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    if caught & (1 << (signal.SIGTERM - 1)):
      return
    time.sleep(0.005)
  raise AssertionError("the trainer never installed its SIGTERM handler")


def _signal_during_start_up(cache, path, signals_: list[int]):
  proc = subprocess.Popen(command(path), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=cached_env(cache, 1))
  _wait_for_handlers(proc)
  for i, sig in enumerate(signals_):
    if i:
      time.sleep(0.2)
    proc.send_signal(sig)
  out, err = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out, err


@pytest.mark.parametrize("signals_", [[signal.SIGTERM], [signal.SIGTERM, signal.SIGTERM],
                                      [signal.SIGINT]])
def test_stop_signals_during_start_up_exit_zero_and_write_nothing(tmp_path, compile_cache,
                                                                  signals_):
  code, _, err = _signal_during_start_up(compile_cache, tmp_path / "w", signals_)
  assert code == 0, err
  assert "during start-up: no step was trained, nothing to save; exiting" in err
  assert not error_lines(subprocess.CompletedProcess([], 0, "", err))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_sigterm_in_a_resumed_runs_start_up_leaves_its_checkpoint_untouched(tmp_path,
                                                                           compile_cache,
                                                                           finished):
  path = tmp_path / "w"
  shutil.copytree(finished, path)
  before = snapshot(path / "checkpoints")
  code, _, err = _signal_during_start_up(compile_cache, path, [signal.SIGTERM])
  assert code == 0, err
  assert "nothing to save; exiting" in err
  assert snapshot(path / "checkpoints") == before


def test_first_ctrl_c_saves_and_a_second_stops_at_once(tmp_path, compile_cache):
  path = tmp_path / "w"
  first, log = _start(compile_cache, path, "--config.total_steps=4000")
  _wait_for(log, "train step 10/", first)
  first.send_signal(signal.SIGINT)
  assert first.wait(TIMEOUT) == 0
  saved = max(int(s) for s in os.listdir(path / "checkpoints"))
  assert f"Ctrl-C: saved step {saved}, exiting" in open(log).read()
  again, log = _start(compile_cache, path, "--config.total_steps=4000")
  _wait_for(log, "resumed from step", again)
  _wait_for(log, "train step", again)
  again.send_signal(signal.SIGINT)
  time.sleep(0.05)
  again.send_signal(signal.SIGINT)
  assert again.wait(TIMEOUT) == 130
  text = open(log).read()
  assert "interrupted: a second Ctrl-C stops at once" in text and "Traceback" not in text
