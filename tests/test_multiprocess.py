"""Two processes x two CPU devices on JAX's distributed runtime train like one process x four.

The workers are `python -m train` with --coordinator_address/--num_processes/--process_id on
127.0.0.1, run through this file's `__main__` block, which only adds a record of the example
ids each process reads. Checked: each process reads its own half of every global batch, the
losses and eval metrics equal the single-process run's, metrics.jsonl, TensorBoard events and
checkpoints are written once, and a checkpoint written by the two processes resumes in one.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import lenet_digits
from conftest import xla_flags
from train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(total_steps=20, log_every=5, eval_every=10, checkpoint_every=10, batch_size=32)
TIMEOUT = 300


def config_with(**overrides):
  """The run's config for an in-process run."""
  c = lenet_digits.get_config()
  with c.unlocked():
    c.update({**SETTINGS, "progress": "none", **overrides})
  return c


def metrics(workdir):
  """The rows of metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def record_train_ids(loop_module, seen: list) -> None:
  """Makes every executor record the ids of the training batches this process puts on device."""
  create = loop_module.create_executor

  def create_recording(*args, **kwargs):
    executor = create(*args, **kwargs)
    put = executor.put_batch

    def recording_put(batch):
      if "valid" not in batch:  # eval batches carry a validity mask; training batches do not
        seen.append(np.asarray(batch["id"]))
      return put(batch)

    executor.put_batch = recording_put
    return executor

  loop_module.create_executor = create_recording


def free_port() -> int:
  """A TCP port nobody listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_workers(root, workdir: str, settings: dict) -> list[subprocess.Popen]:
  """Process 0 and 1 of a run on 127.0.0.1, each with 2 CPU devices; output in root/log{i}."""
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=xla_flags(2))
  procs = []
  for i in range(2):
    with open(root / f"log{i}", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), str(root / f"ids{i}.npy"),
           "--config", "configs/lenet_digits.py", "--workdir", workdir,
           "--config.progress=lines", *[f"--config.{k}={v}" for k, v in settings.items()],
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def finish_workers(root, procs: list[subprocess.Popen]) -> list[str]:
  """Their outputs, once both exited 0."""
  deadline = time.time() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:  # one that failed leaves the other waiting for it forever
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [(root / f"log{i}").read_text() for i in range(2)]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n" + "\n\n".join(
        f"--- process {j} ---\n{out[-3000:]}" for j, out in enumerate(outputs))
  return outputs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """(workdir, [ids read by process 0, by process 1], [stdout of each]) of the 2-process run."""
  root = tmp_path_factory.mktemp("multiprocess")
  workdir = str(root / "w")
  outputs = finish_workers(root, start_workers(root, workdir, SETTINGS))
  ids = [np.load(root / f"ids{i}.npy")[: SETTINGS["total_steps"]] for i in range(2)]
  return workdir, ids, outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """(workdir, global batch ids per step) of the same run in this process, on 4 devices."""
  workdir = str(tmp_path_factory.mktemp("one_process") / "w")
  seen: list = []
  original = loop.create_executor
  record_train_ids(loop, seen)
  try:
    loop.train_and_evaluate(config_with(), workdir)
  finally:
    loop.create_executor = original
  return workdir, np.stack(seen)[: SETTINGS["total_steps"]]


def test_each_process_reads_its_own_half_of_every_batch(two_processes, one_process):
  _, (ids0, ids1), _ = two_processes
  _, global_ids = one_process
  half = SETTINGS["batch_size"] // 2
  assert ids0.shape == ids1.shape == (SETTINGS["total_steps"], half)
  for step in range(SETTINGS["total_steps"]):
    assert not np.intersect1d(ids0[step], ids1[step]).size
    # Together, in process order, they are exactly the single-process global batch.
    np.testing.assert_array_equal(np.concatenate([ids0[step], ids1[step]]), global_ids[step])


def test_two_processes_match_one(two_processes, one_process):
  a, b = metrics(two_processes[0]), metrics(one_process[0])
  key = lambda r: (r["step"], r["split"])
  assert [key(r) for r in a] == [key(r) for r in b]  # every row once: only process 0 writes
  for ra, rb in zip(a, b, strict=True):
    for name in ("loss", "accuracy", *(("top5",) if ra["split"] == "eval" else ())):
      np.testing.assert_allclose(ra[name], rb[name], rtol=1e-5, err_msg=f"{key(ra)} {name}")


def test_outputs_are_written_once(two_processes):
  workdir, _, outputs = two_processes
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert "train step 20/20" in outputs[0] and "train step" not in outputs[1]


def test_checkpoint_of_two_processes_resumes_in_one(two_processes, one_process, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(two_processes[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
  with open(os.path.join(workdir, "metrics.jsonl"), "w"):
    pass  # keep only what the resumed run logs
  loop.train_and_evaluate(config_with(), workdir)
  resumed = {(r["step"], r["split"]): r["loss"] for r in metrics(workdir)}
  reference = {(r["step"], r["split"]): r["loss"] for r in metrics(one_process[0])}
  assert sorted(resumed) == [(15, "train"), (20, "eval"), (20, "train")]
  for key, loss in resumed.items():
    np.testing.assert_allclose(loss, reference[key], rtol=1e-5, err_msg=str(key))


@pytest.mark.slow  # four more trainer processes (52 s)
def test_pmap_over_two_processes_saves_global_checkpoints_that_resume(one_process, tmp_path):
  """Under pmap each process holds its own copies of the state; the checkpoint is one global
  array per leaf, which the same two processes resume from."""
  workdir = str(tmp_path / "w")
  pmap = {**SETTINGS, "parallel": "pmap", "stop_at_step": 10}
  finish_workers(tmp_path, start_workers(tmp_path, workdir, pmap))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
  finish_workers(tmp_path, start_workers(tmp_path, workdir, {**pmap, "stop_at_step": 0}))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  resumed = {(r["step"], r["split"]): r["loss"] for r in metrics(workdir)}
  reference = {(r["step"], r["split"]): r["loss"] for r in metrics(one_process[0])}
  assert sorted(resumed) == sorted(reference)
  for key, loss in resumed.items():
    np.testing.assert_allclose(loss, reference[key], rtol=1e-5, err_msg=str(key))


@pytest.mark.slow  # two more trainer processes; one-process SIGTERM is in test_train.py
def test_sigterm_to_one_process_stops_both_with_a_checkpoint(tmp_path):
  """A preemption notice reaches hosts at different times: process 0 alone gets it here."""
  workdir = str(tmp_path / "w")
  settings = {**SETTINGS, "total_steps": 100000, "checkpoint_every": 0, "eval_every": 0}
  procs = start_workers(tmp_path, workdir, settings)
  deadline = time.time() + TIMEOUT
  # Process 0 reports progress: wait until training is under way.
  while "train step 10/" not in (tmp_path / "log0").read_text():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      finish_workers(tmp_path, procs)
      raise AssertionError("training did not get under way")
    time.sleep(0.2)
  procs[0].send_signal(signal.SIGTERM)
  sent = time.time()
  outputs = finish_workers(tmp_path, procs)
  assert time.time() - sent < 30
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(saved) == 1 and saved[0] % SETTINGS["log_every"] == 0  # agreed at a log step
  assert f"SIGTERM: saved step {saved[0]}" in outputs[0]
  # The same workdir continues in a single process (4 devices).
  resumed = loop.train_and_evaluate(
      config_with(total_steps=saved[0] + 5, eval_every=0, progress="none"), workdir)
  logged = [(r["step"], r["split"]) for r in metrics(workdir)]
  every = SETTINGS["log_every"]
  assert resumed and logged == [(s, "train") for s in range(every, saved[0] + 1, every)] + [
      (saved[0] + 5, "train"), (saved[0] + 5, "eval")]


if __name__ == "__main__":  # a worker: `python -m train ARGS`, recording the ids it reads
  ids_file = sys.argv.pop(1)
  from absl import app

  import train.__main__ as cli
  from train import loop as train_loop

  seen_ids: list = []
  record_train_ids(train_loop, seen_ids)
  atexit.register(lambda: np.save(ids_file, np.stack(seen_ids)))
  app.run(cli.main, flags_parser=cli._parse_flags)
