"""The detect_digits recipe through the real trainer: each preset trains on a tiny COCO-format
set of canvases of scikit-learn digits (read by the `coco:` reader), evaluates COCO AP on the
held-out canvases, draws its eval detections at the end of the run, and
`python -m train.viz boxes` draws them again from the saved run."""

import json
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image
from test_configs import _smoke_overrides

from configs import detect_digits
from conftest import read_metrics
from jaxvision.tasks.detection import METRICS
from train import loop, viz

# 50 s and more each on a 2-core CPU: slow cases (test_detection_task trains each detector family
# through the trainer in the default suite).
PRESETS = [pytest.param(p, marks=pytest.mark.slow) for p in detect_digits.PRESETS]
SIZE = 64


def _run(preset: str, tmp_path) -> tuple:
  """A 1-step run of `preset` on the stand-in canvases (12 train, 4 val), with the settings of
  test_configs' smoke run, so that for the default preset the two share their compiled programs
  through the session's compilation cache: (workdir, final metrics)."""
  config = detect_digits.get_config(preset)
  with config.unlocked():
    for key, value in (_smoke_overrides("detect_digits", tmp_path) | {"progress": "none"}).items():
      *parents, leaf = key.split(".")
      target = config
      for p in parents:
        target = target[p]
      target[leaf] = value
  workdir = tmp_path / "run"
  return workdir, loop.train_and_evaluate(config, str(workdir))


def _colours(path) -> set:
  pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
  return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_evaluates_and_draws_its_detections(preset, tmp_path):
  workdir, metrics = _run(preset, tmp_path)
  assert set(metrics) == set(METRICS)
  for name in ("ap", "ap50", "ap75", "ar100"):
    assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
  (train_row,) = read_metrics(workdir)
  assert train_row["step"] == 1 and np.isfinite(train_row["loss"]) and train_row["loss"] > 0
  assert {"loss_classification", "loss_bbox_regression"} <= set(train_row)
  assert [r["step"] for r in read_metrics(workdir, "eval")] == [1]
  assert json.loads((workdir / "final_metrics.json").read_text())["ap"] == metrics["ap"]
  config = json.loads((workdir / "config.json").read_text())
  assert config["data_info"]["class_names"] == [str(k) for k in range(10)]

  pictures = sorted((workdir / "overlays").glob("eval_*.png"))
  assert [p.name for p in pictures] == [f"eval_{i}.png" for i in range(4)]  # every val canvas
  assert Image.open(pictures[0]).size == (SIZE, SIZE)

  args = viz.parse_args(["boxes", "--workdir", str(workdir), "--num", "3", "--min-score", "0"])
  paths = viz.run("boxes", args)
  assert [p.rsplit("/", 1)[-1] for p in paths] == [f"boxes_{i:03d}.png" for i in range(3)]
  zoom = -(-viz._BOXES_MIN_SIDE // SIZE)
  for path in paths:
    image = Image.open(path)
    assert image.size == (SIZE * zoom, SIZE * zoom)
    colours = _colours(path)
    # Grey canvas pixels, the white ground truth, and the detections' class colours.
    assert (255, 255, 255) in colours
    assert any(max(c) - min(c) > 100 for c in colours), "no detection was drawn"


def test_boxes_figure_refuses_a_run_of_another_task():
  run = types.SimpleNamespace(config=ml_collections.ConfigDict({"task": "classification"}),
                              task=None, model=None, variables=None)
  with pytest.raises(ValueError, match="boxes needs a detection run; the run's task is "
                                       "'classification'"):
    viz.detection_pictures(run, "val", 2, "unused", 0.3)
