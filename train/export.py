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
    python -m train.export --bench resnet50,vit_b16    # export fidelity and CPU latency
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import jax
import numpy as np

from jaxvision.export import (
  FORMATS,
  Exportable,
  export,
  load_exported,
  max_difference,
  preprocessing_of,
)
from jaxvision.models import create_model, model_info
from jaxvision.pretrained import load_pretrained
from train.build import load_run


def from_run(workdir: str, step: int | None = None):
  """The Exportable of the run in `workdir` (its preprocessing from its config.json)."""
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


def random_variables(model, input_shape, seed: int = 0) -> dict:
  """Variables of `model` with He-scaled random weights and BatchNorm statistics near one, made
  in numpy from the abstract init (no init compile): what benchmarks need."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               np.zeros((1, *input_shape), np.float32)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" and len(leaf.shape) > 1 else 0
    scale = np.sqrt(2.0 / fan_in) if fan_in else 0.02
    return (rng.standard_normal(leaf.shape) * scale).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _median_ms(fn, images, repeats: int) -> float:
  fn(images)  # warm-up: compilation, first-run allocations
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(images)
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def bench(names: list[str], batch_sizes=(1, 32), repeats: int = 10, out_dir: str = ""):
  """Per model: ONNX and StableHLO exports of random weights, their largest logit difference
  from JAX, and the median latency per image of JAX (jit), ONNX Runtime (CPU) and StableHLO at
  each batch size, on the same eval-normalized inputs. Yields one dict per measurement."""
  for name in names:
    model = create_model(name)
    shape = model_info(name).input_shape
    normalize = "imagenet" if shape[-1] == 3 else "half"
    exportable = Exportable.build(
        model, random_variables(model, shape), input_shape=shape, name=name,
        preprocessing=preprocessing_of(image_size=shape[0], normalize=normalize,
                                       eval_crop=0.875))
    images = check_inputs(exportable, max(batch_sizes), seed=1)
    jax_fn = jax.jit(exportable.fn)
    weights = jax.device_put(exportable.weights)  # once: no host copy of the weights per call
    reference = np.asarray(jax_fn(weights, images)[0])
    runners = {"jax": lambda x, f=jax_fn, w=weights: jax.block_until_ready(f(w, x))}
    folder = out_dir or tempfile.mkdtemp()
    for fmt in ("onnx", "stablehlo"):
      path = f"{folder}/{name}_{fmt}"
      export(exportable, fmt, path)
      run = load_exported(fmt, path)
      diff = float(np.abs(run(images)[0] - reference).max())
      yield {"model": name, "format": fmt, "max_abs_logit_diff": diff,
             "max_abs_logit": float(np.abs(reference).max())}
      runners["onnxruntime" if fmt == "onnx" else "stablehlo"] = run
    for batch in batch_sizes:
      for runtime, run in runners.items():
        ms = _median_ms(run, images[:batch], repeats)
        yield {"model": name, "runtime": runtime, "batch_size": batch,
               "ms_per_image": ms / batch, "ms_per_batch": ms}


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
  source.add_argument("--bench", help="comma-separated registry models: export random weights "
                      "to ONNX and StableHLO, print their logit difference from JAX and the CPU "
                      "latency of each runtime (one JSON line per measurement)")
  parser.add_argument("--pretrained", default="", help="weights spec for --model: True, "
                      "hf-hub:ORG/REPO[@REV] or a weights file")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--format", choices=FORMATS, help="what to export to")
  parser.add_argument("--out", default="", help="output directory")
  parser.add_argument("--repeats", type=int, default=10, help="--bench: timed runs per batch")
  parser.add_argument("--check", type=int, default=4,
                      help="compare the export with JAX on this many inputs (0: skip)")
  args = parser.parse_args(argv)
  if not args.bench and (not args.format or not args.out):
    parser.error("--format and --out are required (except with --bench)")
  if args.model and not args.pretrained:
    parser.error("--model needs --pretrained (True, hf-hub:ORG/REPO or a weights file)")
  if args.check < 0:
    parser.error(f"--check={args.check} must be >= 0")
  return args


def run(args) -> dict:
  """Exports as `args` say; returns the summary printed as JSON."""
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
  if args.bench:
    for row in bench(args.bench.split(","), repeats=args.repeats, out_dir=args.out):
      print(json.dumps(row), flush=True)
    return 0
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
