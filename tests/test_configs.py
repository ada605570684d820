"""Experiment configs: they restate nothing their parent says, and a run's saved config.json alone
rebuilds its exact model."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import base
from conftest import small_config
from train import loop
from train.build import build_model, build_task, load_config
from train.checkpoint import restore_params
from train.state import init_variables

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "base"))


def _dotted(target: ast.expr) -> str | None:
  """'data.normalize' for the target `c.data.normalize`, else None."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.append(target.attr)
    target = target.value
  return ".".join(reversed(parts)) if isinstance(target, ast.Name) and parts else None


def _unconditional_assignments(module_name: str) -> tuple[str, list[str]]:
  """(parent config module, keys that get_config assigns a literal outside any branch).

  A computed value (`0.1 * c.batch_size / 256`) states a rule, not a value, and is not counted.
  """
  tree = ast.parse((CONFIGS / f"{module_name}.py").read_text())
  function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config")
  parent, keys = "base", []
  for statement in function.body:
    if isinstance(statement, ast.Assign):
      call = statement.value
      if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
          and call.func.attr == "get_config" and isinstance(call.func.value, ast.Name)):
        parent = call.func.value.id
      try:
        ast.literal_eval(statement.value)
      except ValueError:
        continue
      for target in statement.targets:
        key = _dotted(target)
        if key:
          keys.append(key)
  return parent, keys


_ABSENT = object()


def _value(config, key: str):
  for part in key.split("."):
    if part not in config:
      return _ABSENT
    config = config[part]
  return config.to_dict() if hasattr(config, "to_dict") else config


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_restates_nothing_its_parent_says(name):
  parent_name, keys = _unconditional_assignments(name)
  parent = (base if parent_name == "base"
            else importlib.import_module(f"configs.{parent_name}")).get_config()
  config = importlib.import_module(f"configs.{name}").get_config()
  restated = [k for k in keys if _value(config, k) == _value(parent, k)]
  assert not restated, f"configs/{name}.py sets {restated} to configs/{parent_name}.py's values"


def _caption_strips(root: pathlib.Path) -> str:
  """Twelve train and four val strips of scikit-learn digits, captioned with the digit words."""
  from jaxvision.data.digits import read_digits
  from jaxvision.data.make_caption_sets import digit_strips, write_coco_captions

  images, labels = read_digits()
  images = np.round(images * (255 / 16)).astype(np.uint8)
  rng = np.random.default_rng(0)
  for split, count in (("train", 12), ("val", 4)):
    write_coco_captions(str(root), split, *digit_strips(images, labels, count, rng))
  return f"coco_captions:{root}"


def digit_canvases(root: pathlib.Path) -> str:
  """Twelve train and four val 64x64 canvases of scikit-learn digits in COCO's layout."""
  from jaxvision.data.digits import read_digits
  from jaxvision.data.make_digit_canvases import make_dataset

  images, labels = read_digits()
  images = np.round(images * (255 / 16)).astype(np.uint8)
  make_dataset(images, labels, str(root), train=12, val=4, train_range=(0, 1500),
               val_range=(1500, 1797), canvas_size=64, max_digits=3, min_side=12, max_side=24)
  return f"coco:{root}"


def cell_instances(root: pathlib.Path) -> str:
  """Three 64x64 ISBI-style slices (membrane lines every 16 px around 15 x 15 cells, shifted
  per slice) as make_cell_instances' COCO set: 2 train, 1 val."""
  from jaxvision.data.make_cell_instances import make_cell_instances

  for sub in ("train/image", "train/label"):
    (root / "isbi" / sub).mkdir(parents=True)
  for n in range(3):
    label = np.full((64, 64), 255, np.uint8)
    label[(np.arange(64) + 5 * n) % 16 == 0, :] = 0
    label[:, (np.arange(64) + 3 * n) % 16 == 0] = 0
    Image.fromarray(label).save(root / "isbi" / "train" / "label" / f"{n}.png")
    Image.fromarray(label // 2 + 60).save(root / "isbi" / "train" / "image" / f"{n}.png")
  make_cell_instances(str(root / "isbi"), str(root / "cells"), train_slices=2)
  return f"coco:{root / 'cells'}"


def _segfolder(root: pathlib.Path, channels: int = 1) -> str:
  """Six 64x64 image/mask pairs: bright discs on a dark ground, masks 0 / 255."""
  rng = np.random.default_rng(0)
  (root / "image").mkdir(parents=True)
  (root / "label").mkdir()
  yy, xx = np.mgrid[:64, :64]
  for i in range(6):
    cy, cx = rng.integers(16, 48, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 100
    image = np.where(disc, 200, 40).astype(np.uint8)
    Image.fromarray(image if channels == 1 else np.stack([image] * 3, -1)).save(
        root / "image" / f"{i}.png")
    Image.fromarray(np.where(disc, 255, 0).astype(np.uint8)).save(root / "label" / f"{i}.png")
  return f"segfolder:{root}"


# Smoke-sized stand-ins for each experiment's data (a fresh clone has no downloads), so the
# experiment's own model, task and model_kwargs go through a real run. The heavy models are
# the slow cases.
HEAVY = {"resnet50_imagenet", "vit_b16_imagenet"}


def _smoke_overrides(name: str, tmp_path) -> dict:
  config = importlib.import_module(f"configs.{name}").get_config()
  size = 32 if name in HEAVY else min(int(config.image_size), 64)
  patch = int(config.model_kwargs.get("patch_size", 1))
  size = size // patch * patch  # a ViT's input is a whole number of patches
  if config.task == "segmentation" or config.dataset.startswith("segfolder:"):
    dataset, splits = _segfolder(tmp_path / "seg"), ("train[:4]", "train[4:]")
  elif config.dataset.startswith("coco_captions:"):
    dataset, splits = _caption_strips(tmp_path / "captions"), ("train", "val")
  elif config.dataset.startswith("coco:") and config.data.masks:
    dataset, splits = cell_instances(tmp_path / "cells"), ("train", "val")
  elif config.dataset.startswith("coco:"):
    dataset, splits = digit_canvases(tmp_path / "canvases"), ("train", "val")
  elif name.startswith("resnet") or name.startswith("vit_b16"):
    dataset, splits = f"synthetic:{size}x{size}x3:{config.num_classes or 10}", ("train", "test")
  else:
    dataset, splits = "digits", ("train[:80%]", "train[80%:]")
  overrides = {"dataset": dataset, "train_split": splits[0], "eval_split": splits[1],
               "image_size": size, "total_steps": 1, "num_epochs": 0.0, "batch_size": 4,
               "eval_batch_size": 4, "init_from": "", "checkpoint_every": 0, "eval_every": 0,
               "warmup_steps": 0, "dtype": "float32", "log_every": 1}
  if "image_size" in config.model_kwargs:
    overrides["model_kwargs.image_size"] = size
  return overrides


# The default suite rebuilds the light experiments; the rest compile a full-size step each (20-70
# s on a 2-core CPU) and run with -m slow, as do the detection and captioning recipes'
# end-to-end runs (test_detection_recipe / test_caption_recipes).
LIGHT = {"lenet_digits", "lenet_mnist"}


@pytest.mark.parametrize("name", [
    n if n in LIGHT else pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS])
def test_saved_config_json_alone_rebuilds_the_trained_model(name, tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(small_config(name, **_smoke_overrides(name, tmp_path)), str(workdir))
  config = load_config(str(workdir))
  assert json.loads((workdir / "config.json").read_text())["data_info"]["image_shape"]
  params, _, _ = restore_params(str(workdir / "checkpoints"))
  rebuilt = jax.eval_shape(lambda: init_variables(build_model(config), build_task(config),
                                                  jax.random.key(0)))["params"]
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  assert shapes(rebuilt) == shapes(params)
