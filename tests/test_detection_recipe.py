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
  terms = ({"loss_ce", "loss_bbox", "loss_giou"} if preset == "detr"
           else {"loss_classification", "loss_bbox_regression"})
  assert terms <= set(train_row)
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


@pytest.mark.slow
def test_cells_maskrcnn_trains_evaluates_masks_and_predicts_them(tmp_path):
  """A 1-step run of configs/cells_maskrcnn.py on generated ISBI-style slices: box and mask AP,
  pictures with instance masks, and `train.predict` masks at each file's own resolution."""
  from configs import cells_maskrcnn
  from jaxvision.tasks.two_stage import MASK_METRICS
  from train import predict

  config = cells_maskrcnn.get_config()
  with config.unlocked():
    for key, value in (_smoke_overrides("cells_maskrcnn", tmp_path) | {"progress": "none"}).items():
      *parents, leaf = key.split(".")
      target = config
      for p in parents:
        target = target[p]
      target[leaf] = value
  workdir = tmp_path / "run"
  metrics = loop.train_and_evaluate(config, str(workdir))
  assert set(metrics) == set(METRICS) | set(MASK_METRICS)
  assert all(-1.0 <= v <= 1.0 for v in metrics.values())
  (train_row,) = read_metrics(workdir)
  assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
          "loss_mask"} <= set(train_row)
  assert sorted(p.name for p in (workdir / "overlays").glob("eval_*.png")) == ["eval_0.png"]

  args = viz.parse_args(["boxes", "--workdir", str(workdir), "--num", "1", "--min-score", "0"])
  (picture,) = viz.run("boxes", args)
  assert Image.open(picture).size[0] >= viz._BOXES_MIN_SIDE

  image = tmp_path / "cells" / "cells" / "val" / "2.png"
  args = predict.parse_args(["--workdir", str(workdir), str(image), "--min-score", "0"])
  predictor = predict.Predictor.from_run(str(workdir))
  records = []
  assert predict.predict_files(predictor, [str(image)], args, records.append, print) == 0
  (record,) = records
  assert (record["height"], record["width"]) == (64, 64)
  for detection in record["detections"]:
    x0, y0, x1, y1 = detection["box"]
    assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 64 and detection["class"] == "cell"
    assert detection["segmentation"]["size"] == [64, 64]
