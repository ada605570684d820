"""python -m train.bench: throughput, MFU, compile time and memory of the trainer's own step.

    python -m train.bench --model resnet50 --batch-size 256 --dtype bfloat16 --mode train
    python -m train.bench --model lenet --batch-size 128 --dtype float32 --compare torch

It times exactly what `python -m train` runs: the config comes from configs/base.py, the step is
the executor's jitted `train_step` (same shardings, same donated state, same optimizer), fed one
synthetic batch that stays on the device, so the input pipeline (measured separately) is out of
the picture. Compile time is `lower(...).compile()` on its own; the timed windows start after
warm-up and end with `jax.block_until_ready`; the median window is reported. MFU divides the
compiled step's FLOPs (XLA cost analysis, per device; for scan/remat models, those of the same
network without them) by the step time and the device's dense bf16 peak.

With --compare torch the PyTorch side (train.bench_torch) runs the same network, batch, optimizer
and loss. On a CPU host both run in this process with alternating windows, so load from other
processes hits both alike; on an accelerator PyTorch runs first in a subprocess, then JAX, each
with the device to itself.

Output: one JSON object per measurement with the keys of RESULT_KEYS (shared/DESIGN.md), and with
--compare torch a last line with `ratio_jax_over_torch` (images/s of JAX over PyTorch). Notes
(per-window wall and process CPU times, FLOPs per step, XLA's memory estimate) go to stderr. Bad
arguments end with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import base
from jaxvision.models import model_info
from train import bench_torch, parallel, step
from train.bench_common import (
  OPTIMIZERS,
  Prepared,
  device_label,
  measure,
  mfu,
  peak_flops,
  result_row,
)
from train.build import build_model, build_task
from train.configuration import validate
from train.model_kwargs import parse_model_kwargs
from train.optim import create_optimizer
from train.parallel import create_executor
from train.state import create_train_state

# Model options under which XLA's FLOP count is not the model's (see _plain_model_flops).
_FLOP_HIDING_KWARGS = ("scan", "remat")

# --- JAX side ------------------------------------------------------------------------------------


def build_config(args) -> ml_collections.FrozenConfigDict:
  """The resolved trainer config of this benchmark (configs/base.py + flags), frozen.

  There is no dataset to resolve it from, so the benchmark writes the data description itself:
  synthetic images of the model's registered input (or --image-size).
  """
  info = model_info(args.model)
  height, width, channels = info.input_shape
  if args.image_size:
    height = width = args.image_size
  config = base.get_config()
  config.model = args.model
  config.model_kwargs = ml_collections.ConfigDict(parse_model_kwargs(args.model_kwargs))
  config.num_classes = args.num_classes or info.num_classes
  config.dtype = args.dtype
  config.batch_size = config.eval_batch_size = args.batch_size
  config.image_size = height
  config.optimizer = args.optimizer
  config.learning_rate = args.learning_rate
  config.total_steps = args.warmup + args.steps * args.repeats
  config.parallel = args.parallel
  config.eval_split = ""
  config.dataset = f"synthetic:{height}x{width}x{channels}:{config.num_classes}"  # for the record
  config.data_info.image_shape = (height, width, channels)
  validate(config)
  if "image_size" in {f.name for f in dataclasses.fields(build_model(config))}:
    # Models with a fixed token grid (ViT) are built for the benchmark's input size.
    config.model_kwargs.image_size = height
  config.task = _task_of(build_model(config), (1, height, width, channels))
  return ml_collections.FrozenConfigDict(config)


def _task_of(model, input_shape: tuple[int, ...]) -> str:
  """'segmentation' when the model maps images to per-pixel logits, else 'classification'."""

  def forward():
    x = jnp.zeros(input_shape, jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return model.init_with_output(rngs, x, train=False)[0]

  out = jax.eval_shape(forward)
  if isinstance(out, dict) and "cls_logits" in out:  # a one-stage detector's raw head outputs
    return "detection"
  if not hasattr(out, "ndim") or out.ndim not in (2, 4):
    shape = getattr(out, "shape", None) or type(out).__name__
    raise ValueError(f"model {model.__class__.__name__} returns {shape}; train.bench handles "
                     "classification (B, K) and segmentation (B, H, W, K) outputs")
  return "segmentation" if out.ndim == 4 else "classification"


def synthetic_batch(task, config, put) -> dict:
  """A random training batch of the task's input spec (labels within the class count), placed
  by the executor's `put_batch`; it is made once and reused by every step."""
  rng = np.random.default_rng(0)
  batch = {}
  for key, spec in task.input_spec(config.batch_size).items():
    if np.issubdtype(spec.dtype, np.integer):
      batch[key] = rng.integers(0, config.num_classes, spec.shape, dtype=spec.dtype)
    else:
      batch[key] = rng.standard_normal(spec.shape, dtype=np.float32).astype(spec.dtype)
  if "boxes" in batch:
    batch.update(synthetic_boxes(batch["image"].shape, batch["boxes"].shape[1],
                                 task.num_classes, rng))
  return put(batch)


def synthetic_boxes(image_shape, max_boxes: int, num_classes: int, rng) -> dict:
  """The ground truth of a detection batch: 8 (or max_boxes) boxes per image of 5-30% of its
  side inside the image, classes of the data (0 .. K-1), nothing ignored, the identity map back
  to the original pixels. Random floats would give inverted boxes and a loss of NaN."""
  b, h, w = image_shape[:3]
  n = min(8, max_boxes)
  size = rng.uniform(0.05, 0.3, (b, n, 2)) * (w, h)
  corner = rng.uniform(0, 1, (b, n, 2)) * ((w, h) - size)
  boxes = np.zeros((b, max_boxes, 4), np.float32)
  boxes[:, :n] = np.concatenate([corner, corner + size], -1)
  valid = np.zeros((b, max_boxes), bool)
  valid[:, :n] = True
  return {"boxes": boxes, "classes": rng.integers(0, num_classes, (b, max_boxes), np.int32),
          "box_valid": valid, "box_ignore": np.zeros((b, max_boxes), bool),
          "orig_size": np.tile(np.int32([h, w]), (b, 1)), "scale": np.ones((b, 2), np.float32),
          "offset": np.zeros((b, 2), np.float32)}


def flops_of(stage) -> float | None:
  """FLOPs of one call of a lowered or compiled step (per device), from XLA's cost analysis."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per executable
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _memory_note(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - optional on some backends
    return "n/a"
  if m is None:
    return "n/a"
  gb = 1e9
  return (f"arguments {m.argument_size_in_bytes / gb:.4f} GB, outputs "
          f"{m.output_size_in_bytes / gb:.4f} GB, aliased {m.alias_size_in_bytes / gb:.4f} GB, "
          f"temporaries {m.temp_size_in_bytes / gb:.4f} GB")


def peak_memory_gb(devices: Sequence) -> float | None:
  """The allocator's peak bytes in use over `devices`, in GB (1e9); None where unreported (CPU)."""
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - unsupported backends raise instead of returning None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 1e9 if peaks else None


def prepare_jax(args: argparse.Namespace) -> Prepared:
  """Compiles the trainer's step (train) or the model's forward pass (infer) in JAX."""
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  config = build_config(args)
  model, task = build_model(config), build_task(config)
  tx = create_optimizer(config)
  executor = create_executor(config, model, tx, task)
  state = executor.init_state(jax.random.key(config.seed))
  batch = synthetic_batch(task, config, executor.put_batch)
  rng = jax.random.key(1)

  if args.mode == "train":
    # The executor's jitted (or pmapped) step: the exact function `python -m train` calls.
    step_fn = executor.compiled_train_step
    if not args.donate:
      step_fn = _without_donation(executor, config, task)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch, rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    call = lambda s: compiled(s, batch, rng)
  else:
    forward = lambda variables, images: model.apply(variables, images, train=False)
    forward = jax.pmap(forward) if config.parallel == "pmap" else jax.jit(forward)
    variables = state.variables(state.params)
    start = time.perf_counter()
    lowered = forward.lower(variables, batch["image"])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # The state is passed through unchanged so the timing loop is the same for both modes.
    call = lambda s: (s, compiled(variables, batch["image"]))

  holder = {"state": state}

  def window(n: int) -> float:
    s = holder["state"]
    start = time.perf_counter()
    for _ in range(n):
      s, out = call(s)
    jax.block_until_ready((s, out))  # the only sync: the steps themselves run back to back
    elapsed = time.perf_counter() - start
    holder["state"] = s
    return elapsed

  def finish(step_s: float) -> dict:
    # The compiled module's count; where a backend leaves an op uncounted (a library call it
    # cannot see into), the count falls to 0 and the unoptimised module's count stands in.
    flops = flops_of(compiled) or flops_of(lowered)
    if _loops_or_recomputes(config):
      plain = _plain_model_flops(config, task, tx, args.mode)
      flops = plain / executor.num_devices if plain else None
    devices = jax.devices()[: executor.num_devices]
    kind = devices[0].device_kind
    print(f"# jax {args.model} {args.mode}: model FLOPs/step per device {flops or 0:.4g} "
          f"(XLA counts {flops_of(compiled) or 0:.4g} compiled, {flops_of(lowered) or 0:.4g} "
          f"before optimisation); XLA memory estimate: {_memory_note(compiled)}", file=sys.stderr)
    return result_row(
        model=args.model, framework="jax", mode=args.mode, batch_size=args.batch_size,
        dtype=args.dtype, images_per_sec=args.batch_size / step_s, step_ms=1000.0 * step_s,
        mfu=mfu(flops, step_s, peak_flops(kind)), compile_s=compile_s,
        peak_mem_gb=peak_memory_gb(devices), device=device_label(kind, len(devices)),
    )

  return Prepared("jax", window, finish)


def _loops_or_recomputes(config) -> bool:
  return any(bool(config.model_kwargs.get(k, False)) for k in _FLOP_HIDING_KWARGS)


def _plain_model_flops(config, task, tx, mode: str) -> float | None:
  """FLOPs of the same step for the network without scan / remat (abstract lowering, no compile).

  XLA's cost analysis counts a scanned loop body once, not once per layer, and counts
  rematerialised work twice; MFU is defined on the model's own FLOPs, so they come from the
  unrolled, non-recomputing network.
  """
  plain = ml_collections.ConfigDict(config.to_dict())
  for key in _FLOP_HIDING_KWARGS:
    if key in plain.model_kwargs:
      plain.model_kwargs[key] = False
  model = build_model(plain)
  state = jax.eval_shape(functools.partial(
      create_train_state, model, tx, task, ema=bool(config.ema_decay)), jax.random.key(0))
  batch = task.input_spec(config.batch_size)
  if mode == "infer":
    forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    return flops_of(forward.lower(state.variables(state.params), batch["image"]))
  train = jax.jit(functools.partial(step.train_step, task=task, **parallel.step_kwargs(config)))
  return flops_of(train.lower(state, batch, jax.random.key(1)))


def run_jax(args: argparse.Namespace) -> dict:
  """Benchmarks JAX alone: compile, warm up, time."""
  return measure([prepare_jax(args)], steps=args.steps, repeats=args.repeats,
                 warmup=args.warmup)[0]


def _without_donation(executor, config, task):
  """The executor's train step jitted again with the same shardings but no donated state (A/B)."""
  if config.parallel != "mesh":
    raise ValueError("--no-donate is implemented for --parallel mesh only")
  return jax.jit(
      functools.partial(step.train_step, task=task, **parallel.step_kwargs(config)),
      in_shardings=(executor.state_sharding, executor.batch_sharding, executor.replicated),
      out_shardings=(executor.state_sharding, executor.replicated),
  )


# --- PyTorch side ------------------------------------------------------------------------------


def torch_command(args: argparse.Namespace) -> list[str]:
  """The `python -m train.bench_torch` command line for the same model, batch and settings."""
  cmd = [args.torch_python or sys.executable, "-m", "train.bench_torch", "--model", args.model,
         "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--mode", args.mode,
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
         "--optimizer", args.optimizer, "--learning-rate", str(args.learning_rate),
         "--compile", args.torch_compile, "--channels-last", args.torch_channels_last]
  info = model_info(args.model)
  cmd += ["--image-size", str(args.image_size or info.input_shape[0]),
          "--in-chans", str(info.input_shape[2]),
          "--num-classes", str(args.num_classes or info.num_classes)]
  if args.model_kwargs:
    cmd += ["--model-kwargs", args.model_kwargs]
  return cmd


def run_torch_subprocess(args: argparse.Namespace) -> dict:
  """Runs the PyTorch side in a subprocess (the device to itself) and returns its JSON row."""
  try:
    proc = subprocess.run(torch_command(args), capture_output=True, text=True, check=False)
  except OSError as e:
    raise ValueError(f"--torch-python {args.torch_python!r} cannot run: {e.strerror}") from None
  sys.stderr.write(proc.stderr)
  if proc.returncode:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}"
    raise ValueError(f"--compare torch: the PyTorch side failed: {last}")
  rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if not rows:
    raise ValueError("--compare torch: the PyTorch side printed no result")
  return rows[-1]


# --- Command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The benchmark's flags (this entry point defines its own, like train/__main__.py)."""
  p = argparse.ArgumentParser(
      prog="python -m train.bench",
      description=(
          "Times the trainer's own jitted train step (or the model's forward pass) on synthetic "
          "data kept on the device, and prints one JSON line per measurement: model, framework, "
          "mode, batch_size, dtype, images_per_sec, step_ms, mfu, compile_s, peak_mem_gb, device. "
          "With --compare torch, the same model, batch, optimizer and loss run in PyTorch "
          "(train.bench_torch) and a last line gives ratio_jax_over_torch."),
      epilog=("Examples:\n"
              "  python -m train.bench --model lenet --batch-size 128 --dtype float32 "
              "--compare torch\n"
              "  python -m train.bench --model resnet18 --image-size 32 --num-classes 10 "
              "--model-kwargs stem=small --batch-size 64 --dtype float32\n"
              "  python -m train.bench --model vit_b16 --batch-size 256 --dtype bfloat16 "
              "--mode infer --compare torch"),
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--model", required=True, help="registry name, see jaxvision.list_models()")
  p.add_argument("--batch-size", type=int, required=True, help="global batch (over all devices)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="computation dtype; parameters stay float32 (default: %(default)s)")
  p.add_argument("--mode", choices=("train", "infer"), default="train",
                 help="train: a full optimizer step; infer: the forward pass "
                      "(default: %(default)s)")
  p.add_argument("--compare", choices=("torch",), default=None,
                 help="also run the same model in PyTorch, then print the ratio")
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps per window (default: %(default)s)")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed windows; the median window is reported (default: %(default)s)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after compilation (default: %(default)s)")
  p.add_argument("--image-size", type=int, default=0,
                 help="input height = width (default: the model's registered input size)")
  p.add_argument("--num-classes", type=int, default=0,
                 help="classes (default: the model's registered number)")
  p.add_argument("--model-kwargs", default="",
                 help="constructor overrides, e.g. 'stem=small' or 'remat=True,scan=True'")
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum",
                 help="the same optimizer on both sides: SGD with momentum 0.9, plain SGD or Adam "
                      "(default: %(default)s)")
  p.add_argument("--learning-rate", type=float, default=0.01, help="(default: %(default)s)")
  p.add_argument("--parallel", choices=("mesh", "pmap"), default="mesh",
                 help="the trainer's execution: jit over a mesh or pmap (default: %(default)s)")
  p.add_argument("--no-donate", dest="donate", action="store_false",
                 help="A/B: compile the train step without donating the state (mesh only)")
  p.add_argument("--compilation-cache", default="",
                 help="A/B: JAX persistent compilation cache directory (compile_s of a second run "
                      "shows the cache hit)")
  p.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                 help="with --compare: alternate JAX and PyTorch windows in one process (auto: on "
                      "a CPU host, where load from other processes then hits both alike); off: "
                      "PyTorch first in a subprocess, then JAX (auto on accelerators)")
  p.add_argument("--torch-python", default="",
                 help="with --compare: run the PyTorch side with this interpreter (another virtual "
                      "environment, e.g. when jax[cuda12] and torch's CUDA wheels disagree on "
                      "cuDNN); implies --interleave off")
  p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                 help="PyTorch side: torch.compile on (CUDA default) or eager (CPU default)")
  p.add_argument("--torch-channels-last", choices=("on", "off"), default="on",
                 help="PyTorch side: channels_last memory format for 4-D tensors "
                      "(default: %(default)s)")
  args = p.parse_args(argv)
  for name in ("batch_size", "steps", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  for name in ("warmup", "image_size", "num_classes"):
    if getattr(args, name) < 0:
      p.error(f"--{name.replace('_', '-')} must be >= 0")
  return args


def _interleave(args: argparse.Namespace) -> bool:
  """Whether both frameworks run in this process with alternating windows (--interleave)."""
  if args.torch_python:
    return False  # another interpreter: necessarily a subprocess
  if args.interleave != "auto":
    return args.interleave == "on"
  # On a CPU both fit in one process and share the host's noise; on an accelerator each gets
  # the device to itself, one after the other.
  return jax.default_backend() == "cpu"


def compare_torch(args: argparse.Namespace) -> tuple[dict, dict]:
  """The JAX and PyTorch rows of the same model, batch, optimizer and loss.

  Sets XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set) so JAX does not take most of an
  accelerator's memory up front while PyTorch still needs it.
  """
  import importlib.util

  if not args.torch_python and importlib.util.find_spec("torch") is None:
    raise ValueError("--compare torch: PyTorch is not installed here (pip install torch)")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if _interleave(args):
    torch_prepared = bench_torch.prepare(bench_torch.parse_args(torch_command(args)[3:]))
    jax_row, torch_row = measure([prepare_jax(args), torch_prepared], steps=args.steps,
                                 repeats=args.repeats, warmup=args.warmup)
    return jax_row, torch_row
  torch_row = run_torch_subprocess(args)  # first, then JAX takes the device
  return run_jax(args), torch_row


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark and prints its JSON lines; a bad argument ends with one line, exit 2."""
  args = parse_args(argv)
  try:
    if args.compare == "torch":
      jax_row, torch_row = compare_torch(args)
    else:
      jax_row, torch_row = run_jax(args), None
  except ValueError as e:
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps(jax_row), flush=True)
  if torch_row is not None:
    print(json.dumps(torch_row), flush=True)
    print(json.dumps({
        "model": args.model, "mode": args.mode, "batch_size": args.batch_size, "dtype": args.dtype,
        "torch_framework": torch_row["framework"],
        "ratio_jax_over_torch": jax_row["images_per_sec"] / torch_row["images_per_sec"],
    }), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
