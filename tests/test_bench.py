"""train.bench: the JSON contract on CPU with a tiny model, flag errors, and the PyTorch side."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from train import bench
from train.bench_common import RESULT_KEYS
from train.build import build_model, build_task
from train.optim import create_optimizer

TINY = ["--model", "lenet", "--batch-size", "8", "--dtype", "float32", "--steps", "2",
        "--repeats", "2", "--warmup", "1"]


def _rows(capsys) -> list[dict]:
  out = capsys.readouterr().out
  return [json.loads(line) for line in out.splitlines() if line.strip()]


def _check_row(row: dict, *, framework: str, mode: str, batch_size: int = 8) -> None:
  assert tuple(row) == RESULT_KEYS
  assert row["model"] == "lenet" and row["framework"] == framework and row["mode"] == mode
  assert row["batch_size"] == batch_size and row["dtype"] == "float32"
  assert row["images_per_sec"] > 0 and row["step_ms"] > 0
  assert math.isclose(row["images_per_sec"], 1000.0 * batch_size / row["step_ms"], rel_tol=1e-9)
  assert row["device"].startswith("cpu")
  assert row["mfu"] is None and row["peak_mem_gb"] is None  # no peak FLOPs / memory stats on CPU


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_prints_one_row_with_the_design_keys(capsys, mode):
  assert bench.main([*TINY, "--mode", mode]) == 0
  rows = _rows(capsys)
  assert len(rows) == 1
  _check_row(rows[0], framework="jax", mode=mode)
  assert rows[0]["compile_s"] > 0


@pytest.mark.slow
def test_bench_pmap_execution(capsys):
  assert bench.main([*TINY, "--parallel", "pmap"]) == 0
  (row,) = _rows(capsys)
  _check_row(row, framework="jax", mode="train")


@pytest.mark.slow
def test_bench_segmentation_model(capsys):
  args = ["--model", "unet_tiny", "--batch-size", "4", "--dtype", "float32", "--image-size", "16",
          "--steps", "1", "--repeats", "1", "--warmup", "0"]
  assert bench.main(args) == 0
  (row,) = _rows(capsys)
  assert row["model"] == "unet_tiny" and row["images_per_sec"] > 0


@pytest.mark.slow
def test_bench_detection_model(capsys):
  args = ["--model", "retinanet_tiny", "--batch-size", "2", "--dtype", "float32",
          "--image-size", "64", "--num-classes", "3", "--steps", "1", "--repeats", "1",
          "--warmup", "0", "--optimizer", "adam"]
  assert bench.main(args) == 0
  (row,) = _rows(capsys)
  assert row["model"] == "retinanet_tiny" and row["images_per_sec"] > 0


def test_synthetic_detection_boxes_are_proper_boxes_inside_the_image():
  rng = np.random.default_rng(0)
  truth = bench.synthetic_boxes((2, 40, 60, 3), max_boxes=12, num_classes=3, rng=rng)
  boxes = truth["boxes"][truth["box_valid"]]
  assert truth["box_valid"].sum() == 16 and len(boxes) == 16
  assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
  assert (boxes >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
  assert set(np.unique(truth["classes"])) <= {0, 1, 2}


def test_synthetic_batch_has_the_task_s_labels():
  args = bench.parse_args(["--model", "unet_tiny", "--batch-size", "4", "--image-size", "16"])
  config = bench.build_config(args)
  batch = bench.synthetic_batch(build_task(config), config, put=lambda b: b)
  assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].dtype == "float32"
  assert batch["label"].shape == (4, 16, 16) and batch["label"].max() < config.num_classes
  args = bench.parse_args(["--model", "lenet", "--batch-size", "4", "--num-classes", "3"])
  config = bench.build_config(args)
  batch = bench.synthetic_batch(build_task(config), config, put=lambda b: b)
  assert batch["image"].shape == (4, 28, 28, 1) and batch["label"].shape == (4,)
  assert set(batch["label"].tolist()) <= {0, 1, 2}


def test_build_config_uses_the_base_config_and_detects_the_task():
  args = bench.parse_args(["--model", "unet_tiny", "--batch-size", "4", "--image-size", "16",
                           "--optimizer", "adam"])
  config = bench.build_config(args)
  assert config.data_info.image_shape == (16, 16, 1)
  assert config.task == "segmentation" and config.num_classes == 2
  assert config.optimizer == "adam" and config.batch_size == 4 and config.dtype == "bfloat16"
  args = bench.parse_args(["--model", "vit_tiny", "--batch-size", "4", "--image-size", "16"])
  config = bench.build_config(args)
  assert config.task == "classification" and config.model_kwargs.image_size == 16


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_net", "--batch-size", "8"], "unknown model 'no_such_net'"),
    (["--model", "lenet", "--batch-size", "8", "--model-kwargs", "activation=gelu"], "gelu"),
    (["--model", "lenet", "--batch-size", "6", "--dtype", "float32"], "batch_size=6"),
    (["--model", "lenet", "--batch-size", "8", "--model-kwargs", "oops"], "not key=value"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
  assert bench.main([*argv, "--steps", "1", "--repeats", "1", "--warmup", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and message in err[-1]


def test_bad_counts_are_usage_errors(capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--model", "lenet", "--batch-size", "0"])
  assert e.value.code == 2
  assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_model_kwargs_parser():
  got = bench.parse_model_kwargs("stem=small,widths=(8, 16),remat=True,rate=0.5")
  assert got == {"stem": "small", "widths": (8, 16), "remat": True, "rate": 0.5}
  assert bench.parse_model_kwargs("") == {}


def test_peak_flops_table():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 800e12
  assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert bench.peak_flops("TPU v5 lite") == 197e12
  assert bench.peak_flops("TPU v5p") == 459e12
  assert bench.peak_flops("cpu") is None
  assert bench.mfu(4e14, 1.0, 800e12) == 0.5
  assert bench.mfu(None, 1.0, 800e12) is None


@pytest.mark.parametrize("interleave", ["on", "off"])  # in this process / in a subprocess
def test_compare_torch_adds_a_torch_row_and_the_ratio(capsys, interleave):
  pytest.importorskip("torch")
  assert bench.main([*TINY, "--compare", "torch", "--interleave", interleave]) == 0
  jax_row, torch_row, ratio = _rows(capsys)
  _check_row(jax_row, framework="jax", mode="train")
  _check_row(torch_row, framework="torch-eager", mode="train")
  assert torch_row["compile_s"] is None  # eager: nothing compiled
  assert ratio["ratio_jax_over_torch"] == pytest.approx(
      jax_row["images_per_sec"] / torch_row["images_per_sec"])


def test_model_flops_ignore_scan_and_remat():
  """XLA counts a scanned body once and recomputed work twice; MFU uses the plain network's."""
  def flops(kwargs: str, mode: str) -> tuple[float, float]:
    args = bench.parse_args(["--model", "vit_tiny", "--batch-size", "2", "--image-size", "16",
                             "--dtype", "float32", "--model-kwargs", kwargs])
    config = bench.build_config(args)
    task, tx, model = build_task(config), create_optimizer(config), build_model(config)
    shape = (1, *config.data_info.image_shape)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros(shape)))
    own = bench.flops_of(jax.jit(lambda v, x: model.apply(v, x)).lower(
        variables, jax.ShapeDtypeStruct((2, *shape[1:]), "float32")))
    return own, bench._plain_model_flops(config, task, tx, mode)

  plain_own, plain = flops("remat=False", "infer")
  assert plain_own == pytest.approx(plain)
  scan_own, scan_plain = flops("scan=True", "infer")
  assert scan_own < 0.75 * plain and scan_plain == pytest.approx(plain)
  _, train_plain = flops("scan=True,remat=True", "train")
  assert train_plain > 2 * plain  # forward + backward
