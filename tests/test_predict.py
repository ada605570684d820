"""python -m train.predict: a real (tiny) run on a folder of PNGs written here, with the run's own
eval preprocessing; segmentation masks by overlap-tiles; pretrained weights; bad files."""

import argparse
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import jaxvision
from configs import base
from conftest import small_config
from jaxvision.data.task_transforms import build_transform
from jaxvision.segmentation import predict_tiled
from train import predict

pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from train import loop

  workdir = str(tmp_path_factory.mktemp("lenet_run"))
  # Three steps, no evaluation: a real checkpoint and config.json, cheaply.
  config = small_config(total_steps=3, checkpoint_every=3, eval_split="", best_metric="")
  loop.train_and_evaluate(config, workdir)
  return workdir


def _pngs(folder, n=5, seed=0, size=(28, 28)):
  """Random grayscale PNGs; one of another size, in a subfolder, so the eval crop is used."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
  paths = []
  for i in range(n):
    shape = (40, 31) if i == n - 1 else size
    path = os.path.join(folder, "sub" if i == n - 1 else "", f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L").save(path)
    paths.append(path)
  return sorted(paths)


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_predict_a_folder_with_the_runs_preprocessing(run, tmp_path, capsys):
  from train.build import load_run

  images = str(tmp_path / "images")
  paths = _pngs(images)
  (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
  out = str(tmp_path / "preds.jsonl")
  code = predict.main(["--workdir", run, images, "--topk", "3", "--output", out])
  err = capsys.readouterr().err
  assert code == 1  # one unreadable file, the others predicted
  assert f"error: cannot read image {images}/broken.png" in err
  assert "1 of 6 files could not be read" in err
  rows = _rows(out)
  assert [r["file"] for r in rows] == sorted(paths)
  # The same numbers from the run's model on its own eval transform of the same files.
  r = load_run(run)
  transform = build_transform(r.config.data, train=False, task="classification",
                              image_size=r.config.image_size)
  from jaxvision.data.decode import EncodedImage

  batch = transform({"image": [EncodedImage(p, mode="L") for p in sorted(paths)],
                     "label": np.zeros(len(paths), np.int32)}, np.random.default_rng(0))
  probs = np.asarray(jax.nn.softmax(r.model.apply(r.variables, batch["image"])))
  for row, p in zip(rows, probs, strict=True):
    top = np.argsort(-p)[:3]
    assert [t["index"] for t in row["topk"]] == [int(i) for i in top]
    assert [t["class"] for t in row["topk"]] == [str(int(i)) for i in top]  # the run's names
    np.testing.assert_allclose([t["prob"] for t in row["topk"]], p[top], atol=1e-5)
  # stdout when no --output; every file readable: exit 0.
  assert predict.main(["--workdir", run, paths[0], "--topk", "1"]) == 0
  line = json.loads(capsys.readouterr().out.strip())
  assert line["file"] == paths[0] and len(line["topk"]) == 1


def _variables(model, shape, seed=0):
  """Random variables from the abstract init (no compile): fast on a shared CPU."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, *shape))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key in ("var", "scale"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if path[-1].key == "kernel" else 25
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _seg_predictor(batch_size=4):
  from jaxvision.tasks.segmentation import SegmentationTask

  model = jaxvision.create_model("unet_tiny")
  variables = _variables(model, (32, 32, 1))
  data = base.get_config().data
  data.normalize = "half"
  task = SegmentationTask(2, image_shape=(32, 32, 1))
  return predict.Predictor(model, variables, task, "segmentation", (32, 32, 1), data,
                           ("background", "cell"), 2, batch_size)


def test_segmentation_masks_with_overlap_tiles(tmp_path):
  predictor = _seg_predictor()
  rng = np.random.default_rng(1)
  big, exact = tmp_path / "big.png", tmp_path / "exact.png"
  pixels = {big: rng.integers(0, 256, (50, 70), dtype=np.uint8),
            exact: rng.integers(0, 256, (32, 32), dtype=np.uint8)}
  for path, image in pixels.items():
    Image.fromarray(image, "L").save(path)
  args = argparse.Namespace(mask_dir=str(tmp_path / "masks"), workers=2, topk=5)
  rows = []
  failed = predict.predict_files(predictor, [str(big), str(exact)], args, rows.append,
                                 pytest.fail)
  assert failed == 0 and [r["file"] for r in rows] == [str(big), str(exact)]
  normalize = lambda a: (a[..., None].astype(np.float32) / 255 - 0.5) / 0.5
  apply = predictor.predict_fn()  # the same compiled forward pass: the test adds no compile
  expected = {  # overlap-tiles beyond the training size, one pass at it
      big: np.argmax(predict_tiled(apply, normalize(pixels[big]), 16, 8, batch_size=4), -1),
      exact: np.argmax(np.asarray(apply(normalize(pixels[exact])[None]))[0], -1)}
  for row, path in zip(rows, (big, exact), strict=True):
    mask = np.asarray(Image.open(row["mask"]))
    assert mask.shape == pixels[path].shape == (row["height"], row["width"])
    np.testing.assert_array_equal(mask, expected[path])
    assert set(row["fractions"]) == {"background", "cell"}
    assert abs(sum(row["fractions"].values()) - 1) < 1e-6


def test_pretrained_model_with_the_weights_config(tmp_path, capsys):
  from jaxvision.convert import to_torch

  model = jaxvision.create_model("resnet_tiny")
  variables = _variables(model, (32, 32, 3), seed=2)
  weights = tmp_path / "weights"
  weights.mkdir()
  save_file({k: np.ascontiguousarray(v) for k, v in to_torch("resnet_tiny", variables).items()},
            str(weights / "model.safetensors"))
  names = [f"thing {i}" for i in range(10)]
  (weights / "config.json").write_text(json.dumps({
      "architecture": "resnet_tiny", "num_classes": 10, "label_names": names,
      "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                         "crop_pct": 1.0}}))
  picture = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(
      picture)
  assert predict.main(["--model", "resnet_tiny", "--pretrained",
                       str(weights / "model.safetensors"), str(picture), "--topk", "2"]) == 0
  row = json.loads(capsys.readouterr().out.strip())
  # The center 32x32 of the 48x32 picture (crop_pct 1.0), normalized with the weights' mean/std.
  crop = np.asarray(Image.open(picture))[8:40].astype(np.float32) / 255
  logits = np.asarray(jax.jit(model.apply)(variables, ((crop - 0.5) / 0.25)[None]))[0]
  top = np.argsort(-logits)[:2]
  assert [t["class"] for t in row["topk"]] == [names[i] for i in top]


def test_errors_are_one_line(tmp_path, capsys):
  predictor = _seg_predictor()
  predictor.task_name = "regression"
  with pytest.raises(ValueError, match="no output format for task 'regression'"):
    predict.predict_files(predictor, ["x.png"], argparse.Namespace(workers=1), print, print)
  assert predict.main(["--workdir", str(tmp_path), "x.png"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "config.json not found" in err and "\n" not in err
  with pytest.raises(SystemExit):
    predict.main(["--model", "resnet_tiny", "x.png"])  # --pretrained missing
  assert "--model needs --pretrained" in capsys.readouterr().err
