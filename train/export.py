"""python -m train.export --workdir RUN --format stablehlo|onnx|savedmodel --out DIR

Exports a trained run (its latest checkpoint, or --step) for serving outside JAX's trainer:

  stablehlo    jax.export: OUT/model.jax_export + OUT/weights.npz (runs with jax alone)
  onnx         jax2onnx: OUT/model.onnx (ONNX Runtime; pip install 'jaxvision[export]')
  savedmodel   jax2tf: a TensorFlow SavedModel in OUT (pip install 'jaxvision[tfds]')

The exported function is the run's eval-mode prediction (the task's `predict`) on a batch of
preprocessed float32 NHWC images, of any batch size. OUT/metadata.json (also inside the ONNX
model's metadata_props and the SavedModel's assets) says how to preprocess: image size, center
crop, mean / std, and names the classes and the outputs. After writing, the export is run on a
few inputs and compared with JAX; the printed JSON line has the largest difference.

    python -m train.export --workdir runs/lenet_digits --format onnx --out exports/lenet_onnx
    python -m train.export --model resnet50 --pretrained True --format stablehlo --out r50
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from jaxvision.export import FORMATS


def from_run(workdir: str, step: int | None = None):
  """The Exportable of the run in `workdir` (its preprocessing from its config.json)."""
  from jaxvision.export import Exportable, preprocessing_of
  from train.build import load_run

  run = load_run(workdir, step)
  config = run.config
  info = config.data_info
  preprocessing = preprocessing_of(image_size=config.image_size,
                                   normalize=config.data.normalize,
                                   eval_crop=config.data.eval_crop)
  return Exportable.build(run.model, run.variables, input_shape=tuple(info.image_shape),
                          name=config.model, task=run.task, task_name=config.task,
                          preprocessing=preprocessing, class_names=tuple(info.class_names),
                          source=f"{workdir}@{run.step}")


def from_pretrained(name: str, spec, model_kwargs: dict | None = None):
  """The Exportable of registry model `name` with pretrained weights `spec`."""
  from jaxvision.export import Exportable, preprocessing_of
  from jaxvision.models.pretrained import load_pretrained

  model, variables, cfg = load_pretrained(name, spec, **(model_kwargs or {}))
  preprocessing = preprocessing_of(image_size=cfg.image_size, normalize=cfg.normalize,
                                   eval_crop=cfg.crop_pct, interpolation=cfg.interpolation)
  return Exportable.build(model, variables, input_shape=cfg.input_size, name=name,
                          preprocessing=preprocessing, class_names=cfg.class_names,
                          source=str(cfg.source))


def check_inputs(exportable, count: int, seed: int = 0) -> np.ndarray:
  """`count` random images in [0, 1], normalized as the export's metadata says."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(count, *exportable.input_shape)).astype(np.float32)
  pre = exportable.metadata["preprocessing"]
  mean = np.asarray(pre.get("mean", (0.0,)), np.float32)
  std = np.asarray(pre.get("std", (1.0,)), np.float32)
  return (images - mean) / std


def parse_spec(value: str):
  """--pretrained: 'True' for the default weights, else the spec as given."""
  return True if value in ("True", "true", "default") else value


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line of `python -m train.export`."""
  parser = argparse.ArgumentParser(
      prog="python -m train.export", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="trainer workdir (config.json, checkpoints/)")
  source.add_argument("--model", help="registry model name (with --pretrained)")
  parser.add_argument("--pretrained", default="", help="weights spec for --model: True, "
                      "hf-hub:ORG/REPO[@REV] or a weights file")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--format", required=True, choices=FORMATS, help="what to export to")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--check", type=int, default=4,
                      help="compare the export with JAX on this many inputs (0: skip)")
  args = parser.parse_args(argv)
  if args.model and not args.pretrained:
    parser.error("--model needs --pretrained (True, hf-hub:ORG/REPO or a weights file)")
  if args.check < 0:
    parser.error(f"--check={args.check} must be >= 0")
  return args


def run(args) -> dict:
  """Exports as `args` say; returns the summary printed as JSON."""
  from jaxvision.export import export, max_difference

  exportable = (from_run(args.workdir, args.step) if args.workdir
                else from_pretrained(args.model, parse_spec(args.pretrained)))
  paths = export(exportable, args.format, args.out)
  summary = {"format": args.format, "out": args.out, "files": paths,
             "model": exportable.metadata["model"], "input_shape": list(exportable.input_shape)}
  if args.check:
    images = check_inputs(exportable, args.check)
    summary["max_abs_diff"] = max_difference(exportable, args.format, args.out, images)
  return summary


def main(argv: list[str] | None = None) -> int:
  """Entry point: writes the export, prints one JSON line; one-line errors, exit status 2."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices are not news
  try:
    summary = run(args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
