"""The captioning recipes (configs/caption_digits.py, configs/caption_shapes.py) through the real
trainer on tiny generated sets of their own kind: the run resolves a vocabulary of the data's
words into config.json, trains, evaluates every caption metric, writes one picture per example
(the caption and a panel per word), and `python -m train.viz captions` draws them again from the
checkpoint. The recipes' own model sizes train for real, smoke-sized, in test_configs; here the
transformers are one block each, on one device, so that the runs compile quickly."""

import json
import os
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import read_metrics, small_config
from jaxvision.captioning.metrics import caption_metrics
from jaxvision.data.digits import read_digits
from jaxvision.data.make_caption_sets import (
  COLOURS,
  DIGIT_WORDS,
  SHAPES,
  digit_strips,
  shape_scenes,
  write_coco_captions,
)
from jaxvision.tasks.captioning import METRICS
from train import loop, predict, viz

pytestmark = pytest.mark.usefixtures("compile_cache")
PANEL = 96  # attention_picture's panel side


def _digit_set(root: str) -> set[str]:
  images, labels = read_digits()
  images = np.round(images * (255 / 16)).astype(np.uint8)
  rng = np.random.default_rng(0)
  for split, count in (("train", 24), ("val", 5)):
    write_coco_captions(root, split, *digit_strips(images, labels, count, rng))
  return set(DIGIT_WORDS)


def _shape_set(root: str) -> set[str]:
  rng = np.random.default_rng(0)
  for split, count in (("train", 24), ("val", 5)):
    write_coco_captions(root, split, *shape_scenes(count, rng, size=32))
  return {*COLOURS, *SHAPES, "a", "of", "left", "right", "above", "below", "there", "is"}


@pytest.mark.parametrize("name,make,height,width", [
    # 20-40 s each on a 2-core CPU (test_captioning_task trains the task in the default suite).
    # The digit strips keep their shape (8 x 40 here, as the recipe keeps 28 x 140).
    pytest.param("caption_digits", _digit_set, 8, 40, marks=pytest.mark.slow),
    # The same code path again (test_configs runs this recipe's own model for a step as well).
    pytest.param("caption_shapes", _shape_set, 16, 0, marks=pytest.mark.slow)])
def test_recipe_trains_evaluates_and_draws_its_attention(name, make, height, width, tmp_path):
  data = str(tmp_path / "data")
  words = make(data)
  workdir = str(tmp_path / "run")
  config = small_config(
      name, dataset=f"coco_captions:{data}", total_steps=4, batch_size=8, eval_batch_size=4,
      log_every=2, eval_every=0, checkpoint_every=0, warmup_steps=0, image_size=height,
      image_width=width,
      **{"model_kwargs.patch_size": 4, "model_kwargs.encoder_size": (32, 1, 2, 64),
         "model_kwargs.decoder_size": (32, 1, 2, 64), "caption.min_count": 1,
         "caption.pictures": 3, "data.prefetch": 0, "mesh.num_devices": 1})
  final = loop.train_and_evaluate(config, workdir)

  saved = json.load(open(os.path.join(workdir, "config.json")))
  vocab = saved["caption"]["vocab"]
  assert set(vocab[4:]) <= words and words - set(vocab) <= {"there", "is"}
  assert saved["num_classes"] == len(vocab) and saved["task"] == "captioning"
  train = read_metrics(workdir)
  assert [r["step"] for r in train] == [2, 4]
  assert all(np.isfinite(r["loss"]) and 0 <= r["token_accuracy"] <= 1 for r in train)
  (row,) = read_metrics(workdir, "eval")
  assert set(METRICS) <= set(row) and row["step"] == 4
  assert all(0 <= row[k] <= 1 for k in METRICS if k != "cider")
  assert final == {k: row[k] for k in final}
  assert json.load(open(os.path.join(workdir, "final_metrics.json")))["step"] == 4

  # The trainer's pictures of the first 3 eval examples: the image and its caption above, one
  # attention panel per generated word (the end token included) below.
  pictures = sorted(os.listdir(os.path.join(workdir, "overlays")))
  assert pictures == ["eval_000.png", "eval_001.png", "eval_002.png"]
  panel_w = PANEL  # the longer side
  panel_h = round(PANEL * height / width) if width else PANEL
  assert saved["model_kwargs"]["image_size"] == ([height, width] if width else height)
  with Image.open(os.path.join(workdir, "overlays", "eval_000.png")) as first:
    assert first.height == 2 * panel_h + 42 and first.width % panel_w == 0
    assert first.width >= 3 * panel_w
    drawn = np.asarray(first.convert("RGB"))
  assert drawn[panel_h + 14:2 * panel_h + 14].std() > 0  # the panels show the image, not blank

  out = str(tmp_path / "viz")
  assert viz.main(["captions", "--workdir", workdir, "--num", "2", "--out", out]) == 0
  assert sorted(os.listdir(out)) == ["caption_000.png", "caption_001.png"]
  with Image.open(os.path.join(out, "caption_000.png")) as again:
    # The same checkpoint and image: the same caption, so the same picture.
    assert np.array_equal(np.asarray(again.convert("RGB")), drawn)

  # train.predict on the held-out image files: the captions the evaluation scored.
  source = json.load(open(os.path.join(data, "annotations", "captions_val.json")))
  files = [os.path.join(data, "val", im["file_name"]) for im in source["images"]]
  lines = str(tmp_path / "captions.jsonl")
  assert predict.main(["--workdir", workdir, "--output", lines, *files]) == 0
  captions = {r["file"]: r["caption"] for r in map(json.loads, open(lines))}
  assert sorted(captions) == sorted(files)
  assert all(c and set(c.split()) <= set(vocab) for c in captions.values()), captions
  references = [[a["caption"] for a in source["annotations"] if a["image_id"] == im["id"]]
                for im in source["images"]]
  again = caption_metrics([captions[f] for f in files], references)
  assert again == pytest.approx({k: row[k] for k in again}, abs=1e-9)


def test_viz_captions_refuses_a_run_of_another_task(tmp_path):
  run = types.SimpleNamespace(config=ml_collections.ConfigDict({"task": "classification"}))
  with pytest.raises(ValueError, match="captions needs a captioning run; the run's task is "
                                       "'classification'"):
    viz.caption_pictures(run, "val", 2, str(tmp_path))
