"""The Task protocol: a new task trains through the unchanged trainer, and training learns
(absolute targets, not only agreement between two runs)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import read_metrics, small_config
from jaxvision import tasks
from jaxvision.tasks import Task, TaskBase, image_spec
from train import loop

pytestmark = pytest.mark.usefixtures("compile_cache")


@dataclasses.dataclass(frozen=True)
class BrightnessTask(TaskBase):
  """Regress how much of each image is ink from a one-output model: a task the trainer has
  never heard of, registered for one test."""

  image_shape: tuple[int, int, int]

  @classmethod
  def from_config(cls, config):
    return cls(tuple(config.data_info.image_shape))

  @property
  def metric_names(self):
    return ("mse", "target_variance")

  def input_spec(self, batch_size):
    return {"image": image_spec(batch_size, self.image_shape)}

  def model_inputs(self, batch):
    return (batch["image"],), {}

  @staticmethod
  def _target(batch):
    # The share of the image's pixels above mid-grey, in percent: how much ink a digit has.
    return 100.0 * jnp.mean(batch["image"] > 0.0, axis=(1, 2, 3))

  def loss(self, outputs, batch):
    error = outputs[:, 0] - self._target(batch)
    return jnp.mean(error**2), {"mae": jnp.mean(jnp.abs(error))}

  def predict(self, forward, batch):
    return forward(batch["image"])[:, 0]

  def eval_sums(self, predictions, batch):
    valid = batch["valid"].astype(jnp.float32)
    target = self._target(batch)
    return {"sq_error": jnp.sum((predictions - target) ** 2 * valid), "count": jnp.sum(valid),
            "target": jnp.sum(target * valid), "target_sq": jnp.sum(target**2 * valid)}

  def eval_examples(self, predictions, batch):
    return {"prediction": predictions, "valid": batch["valid"]}

  def finalize(self, sums, examples):
    n = float(sums["count"])
    mean = float(sums["target"]) / n
    # The gathered per-example outputs cover every eval example exactly once.
    assert int(np.sum(examples["valid"])) == int(n)
    return {"mse": float(sums["sq_error"]) / n,
            "target_variance": float(sums["target_sq"]) / n - mean * mean}

  def check_outputs(self, outputs):
    if outputs.ndim != 2 or outputs.shape[-1] != 1:
      raise ValueError(f"brightness regression needs (N, 1) outputs, got {outputs.shape}")


def test_a_new_task_trains_without_touching_the_step(tmp_path, monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "brightness", f"{__name__}:BrightnessTask")
  assert isinstance(BrightnessTask((8, 8, 1)), Task)
  config = small_config(task="brightness", num_classes=1, best_metric="", total_steps=150,
                        batch_size=32, learning_rate=3e-3, log_every=50,
                        **{"model_kwargs.activation": "relu", "model_kwargs.pool": "max"})
  metrics = loop.train_and_evaluate(config, str(tmp_path))
  # A model that predicts the mean ink of the eval set scores mse == variance (0.23 measured).
  assert metrics["mse"] < 0.4 * metrics["target_variance"]
  assert len(read_metrics(tmp_path)) == 3


def test_classification_on_digits_reaches_a_set_accuracy(tmp_path):
  metrics = loop.train_and_evaluate(
      small_config(total_steps=300, batch_size=64, log_every=100), str(tmp_path))
  assert metrics["accuracy"] >= 0.9  # 0.1 at chance


def _blob_segfolder(root) -> str:
  """Ten 32x32 images of smooth noise, labelled bright (1) where above the median."""
  rng = np.random.default_rng(0)
  (root / "image").mkdir(parents=True)
  (root / "label").mkdir()
  kernel = np.ones(5) / 5
  for i in range(10):
    x = rng.uniform(size=(32, 32))
    for axis in (0, 1):
      x = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, x)
    image = (255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)
    Image.fromarray(image).save(root / "image" / f"{i}.png")
    Image.fromarray(np.where(x > np.median(x), 255, 0).astype(np.uint8)).save(
        root / "label" / f"{i}.png")
  return f"segfolder:{root}"


@pytest.mark.slow  # test_segmentation trains the same task on a synthetic set by default
def test_segmentation_loss_falls(tmp_path):
  config = small_config(
      model="unet_tiny", dataset=_blob_segfolder(tmp_path / "data"), train_split="train[:8]",
      eval_split="train[8:]", image_size=32, batch_size=4, eval_batch_size=4, total_steps=60,
      log_every=10, learning_rate=1e-2, best_metric="pixel_error", best_mode="min",
      **{"seg.overlays": 0})
  metrics = loop.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
  assert losses[-1] < 0.6 * losses[0]
  assert metrics["pixel_error"] < 0.25  # 0.5 at chance
