"""The trainer end to end: outputs, CLI errors, resume, NaN guard, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import final_params, read_metrics, small_config, xla_flags
from train import loop
from train.build import build_model
from train.optim import create_optimizer
from train.resolve import resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_devices=4, timeout=240):
  env = dict(os.environ, XLA_FLAGS=xla_flags(env_devices),
             JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=timeout,
  )


def test_outputs_and_eval(tmp_path):
  c = small_config(eval_every=10)
  metrics = loop.train_and_evaluate(c, str(tmp_path))
  assert set(metrics) >= {"loss", "accuracy", "top5"}
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 21))
  for key in ("loss", "accuracy", "images_per_sec", "data_wait_ms", "learning_rate"):
    assert key in rows[0]
  evals = read_metrics(tmp_path, "eval")
  assert [r["step"] for r in evals] == [10, 20]
  config = json.load(open(tmp_path / "config.json"))
  assert config["num_classes"] == 10 and config["task"] == "classification"
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  assert os.listdir(tmp_path / "tensorboard")


def test_stop_and_resume_equals_uninterrupted(tmp_path):
  loop.train_and_evaluate(small_config(), str(tmp_path / "straight"))
  loop.train_and_evaluate(small_config(stop_at_step=7), str(tmp_path / "resumed"))
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["7"]
  loop.train_and_evaluate(small_config(), str(tmp_path / "resumed"))
  step_a, a = final_params(tmp_path / "straight")
  step_b, b = final_params(tmp_path / "resumed")
  assert step_a == step_b == 20
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), a, b)
  losses = [r["loss"] for r in read_metrics(tmp_path / "resumed")]
  straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
  np.testing.assert_allclose(losses, straight, rtol=1e-6)


def test_resume_drops_rows_logged_past_the_checkpoint(tmp_path):
  """A run killed after logging step 9 but saving step 5 relogs 6..9 once, not twice."""
  workdir = tmp_path / "run"
  loop.train_and_evaluate(small_config(stop_at_step=5, log_every=1), str(workdir))
  with open(workdir / "metrics.jsonl", "a") as f:  # what a killed attempt left past step 5
    for step in range(6, 10):
      f.write(json.dumps({"step": step, "split": "train", "loss": -1.0}) + "\n")
    f.write('{"step": 10, "spl')  # and a half-written line
  loop.train_and_evaluate(small_config(log_every=1), str(workdir))
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == list(range(1, 21))
  assert all(r["loss"] > 0 for r in read_metrics(workdir))


def test_vit_is_built_for_the_data_image_size():
  config, _, _ = resolve(small_config(model="vit_tiny", image_size=48))
  assert config.model_kwargs.image_size == 48 and build_model(config).grid == (6, 6)
  explicit = small_config(model="vit_tiny", image_size=48, **{"model_kwargs.image_size": 32})
  config, _, _ = resolve(explicit)
  assert build_model(config).image_size == 32  # an explicit size wins


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = small_config(optimizer="sgd", learning_rate=1e4, checkpoint_every=1, total_steps=50)
  with c.unlocked():
    c.model_kwargs.activation = "relu"  # sigmoid saturates instead of overflowing
  with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step (\d+)"):
    loop.train_and_evaluate(c, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  bad_rows = [r for r in read_metrics(tmp_path) if not isinstance(r["loss"], float)]
  assert saved and bad_rows
  assert max(saved) < bad_rows[0]["step"]
  _, params = final_params(tmp_path)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_cli_unknown_key_is_one_line_error(tmp_path):
  result = run_cli("--config", "configs/lenet_digits.py", "--workdir", str(tmp_path / "w"),
                   "--config.bogus_key=1")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "bogus_key" in lines[0]
  assert not (tmp_path / "w").exists()


def test_help_exits_zero_and_a_misspelt_key_is_one_plain_line(tmp_path):
  shown = run_cli("--help")
  assert shown.returncode == 0 and "--config" in shown.stdout + shown.stderr
  result = run_cli("--config", "configs/lenet_digits.py", "--workdir", str(tmp_path / "w"),
                   "--config.bach_size=1")
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: config override rejected: 'bach_size'; Did you mean "
                         '"batch_size" instead of "bach_size"?')
  assert "\\" not in line


def test_cli_keeps_its_compiled_programs_in_the_users_cache(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu", HOME=str(tmp_path))
  env.pop("JAX_COMPILATION_CACHE_DIR")
  result = subprocess.run(
      [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py", "--workdir",
       str(tmp_path / "w"), "--config.total_steps=1", "--config.eval_split="],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr
  # At least the parameter init, the train step and the checkpoint checksums.
  assert len(list((tmp_path / ".cache" / "jaxvision" / "xla").iterdir())) >= 3


def test_cli_indivisible_batch_is_one_line_error(tmp_path):
  result = run_cli("--config", "configs/lenet_digits.py", "--workdir", str(tmp_path / "w"),
                   "--config.batch_size=30")
  assert result.returncode == 2
  err = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
  assert err == ["error: batch_size=30 does not divide over 4 devices"]
  assert not (tmp_path / "w").exists()


# 15 s; -m slow.
@pytest.mark.slow
def test_host_dispatches_at_most_two_steps_ahead(tmp_path, monkeypatch):
  # Between log steps nothing syncs the host, so without a bound it queues up to log_every steps
  # (each pinning a batch on the device, and each delaying a SIGTERM's checkpoint).
  outputs, ahead = [], []
  create = loop.create_executor

  def spying_executor(*args, **kwargs):
    executor = create(*args, **kwargs)
    train_step = executor.train_step

    def step(state, batch, key):
      # Steps dispatched whose results are not ready yet, just before this one is dispatched.
      ahead.append(sum(not x.is_ready() for x in (jax.tree.leaves(m)[0] for m in outputs)))
      state, metrics = train_step(state, batch, key)
      outputs.append(metrics)
      return state, metrics

    executor.train_step = step
    return executor

  monkeypatch.setattr(loop, "create_executor", spying_executor)
  loop.train_and_evaluate(small_config(total_steps=40, log_every=40, batch_size=256,
                                       checkpoint_every=0), str(tmp_path))
  assert len(ahead) == 40 and max(ahead) <= loop.MAX_STEPS_AHEAD


# 14 s (a subprocess run); -m slow.
@pytest.mark.slow
def test_cli_model_kwargs_reach_the_model(tmp_path):
  # --model_kwargs adds keys the config file does not set (--config.model_kwargs.KEY cannot).
  result = run_cli("--config", "configs/lenet_digits.py", "--workdir", str(tmp_path),
                   "--config.total_steps=2", "--config.eval_split=", "--config.progress=none",
                   "--model_kwargs=pool=max,activation=relu")
  assert result.returncode == 0, result.stderr
  config = json.load(open(tmp_path / "config.json"))
  assert config["model_kwargs"] == {"pool": "max", "activation": "relu"}


def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = tmp_path / "w"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py", "--workdir",
       str(workdir), "--config.total_steps=100000", "--config.log_every=10",
       "--config.checkpoint_every=0", "--config.eval_every=0", "--config.progress=lines"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )
  for line in proc.stdout:  # wait until training is under way
    if "train step 20/" in line:
      break
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert time.time() - t0 < 15
  steps = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(steps) == 1 and 20 <= steps[0] < 100000
  resumed = run_cli("--config", "configs/lenet_digits.py", "--workdir", str(workdir),
                    f"--config.total_steps={steps[0] + 5}", "--config.progress=lines",
                    "--config.eval_every=0", "--config.log_every=5", env_devices=1)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from step {steps[0]}" in resumed.stdout


def test_lenet_mnist_end_to_end_on_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from configs import lenet_mnist

  c = lenet_mnist.get_config()
  with c.unlocked():
    c.update(total_steps=6, num_epochs=0, log_every=2, eval_every=3, checkpoint_every=3,
             batch_size=16, progress="none")
  with tfds.testing.mock_data(num_examples=64):
    metrics = loop.train_and_evaluate(c, str(tmp_path))
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
  assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]
  assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [3, 6]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_scaled_lr_params_take_scaled_updates(optimizer):
  config = small_config(optimizer=optimizer, learning_rate=0.5, schedule="constant",
                        warmup_steps=0, weight_decay=0.01, scaled_lr_params="^backbone/",
                        scaled_lr_factor=0.1)
  params = {"backbone": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((3, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = create_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  # The first update is -lr * (1 + weight_decay * param) either way: SGD adds the L2 decay to
  # the unit gradient, AdamW's first normalised step is the gradient's sign.
  head_update = -0.5 * 1.01
  assert float(updates["head"]["kernel"][0, 0]) == pytest.approx(head_update, rel=1e-4)
  assert float(updates["backbone"]["kernel"][0, 0]) == pytest.approx(0.1 * head_update, rel=1e-4)
