"""python -m train.memory_plan: the largest per-chip batch whose train step fits, per model and
TPU generation (the "TPU memory plan" table of BENCHMARKS.md).

    python -m train.memory_plan --out runs/memory_plan.jsonl
    python -m train.memory_plan --cases vit_b16 --generations v5e,v6e --out plan.jsonl
    python -m train.memory_plan --table runs/memory_plan.jsonl      # the Markdown table only

Each case is an experiment config as it trains (its optimizer, EMA, mixup, drop-path, bf16),
with its data described by a synthetic set of the same image shape and class count (ImageNet's
224x224x3 and 1000 classes) or its own small dataset (U-Net: the ISBI slices). The train step is
compiled by the dry run (`train.dry_run.compile_run`) for ONE chip of each generation (v4:1x1x1,
v5e:1x1, v5p:1x1x1, v6e:1x1): the memory per chip is what limits the per-chip batch, the global
batch is that times the chips (the gradient all-reduce adds no per-chip memory worth the
compile), and a single chip compiles fastest. "Fits" is the dry run's: arguments + outputs -
donated + temporaries + code + the queued input batches within the HBM the compiler makes
available.

The search compiles few batches, because compiles are slow (minutes each on a 2-core CPU):
memory is close to linear in the batch (state and code fixed, activations proportional), so
  1. the first compile of a case is at its `start` batch; a compile that fits gives the fixed
     part and the memory per image, and the batch predicted to fill the chip is tried next;
  2. with two fitting compiles the line through them predicts it; the search stops when a batch
     fits and the next one up (by `step`: 8, or 1 below 16) does not, bisecting between the
     largest fit and the smallest failure when the prediction misses;
  3. a case's memory per image carries over to the next generation as its first guess.
Every compile is one JSON line in --out (date, libtpu version, batch, fits, bytes, compile
time, FLOPs); a rerun with the same --out skips the compiles it already has.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from configs import resnet50_imagenet, unet_membrane, vit_b16_imagenet
from train import chips, dry_run

GENERATIONS = ("v5e", "v4", "v6e", "v5p")
# One chip of each generation: the smallest topology.
TOPOLOGY = {"v2": "1x1", "v3": "1x1", "v4": "1x1x1", "v5e": "1x1", "v5p": "1x1x1", "v6e": "1x1"}
MAX_COMPILES = 8  # per case and generation


def _imagenet(module, **model_kwargs):
  config = module.get_config()
  # ImageNet's shapes and class count, described by generated images (nothing to download).
  config.dataset = "synthetic:224x224x3:1000"
  config.train_split, config.eval_split = "train", ""
  config.model_kwargs.update(model_kwargs)
  return config


def _unet_paper():
  config = unet_membrane.get_config("paper")
  config.eval_split = ""
  config.dtype = "bfloat16"
  return config


@dataclasses.dataclass(frozen=True)
class Case:
  """A row group of the plan.

  Attributes:
    name: the row's label.
    config: builds the experiment config (the batch is set by the search).
    start: the first batch compiled.
  """

  name: str
  config: Callable[[], object]
  start: int


CASES = {c.name: c for c in (
    Case("resnet50", lambda: _imagenet(resnet50_imagenet), 128),
    Case("vit_b16", lambda: _imagenet(vit_b16_imagenet), 64),
    Case("vit_b16 remat", lambda: _imagenet(vit_b16_imagenet, remat=True), 128),
    Case("vit_b16 remat+scan", lambda: _imagenet(vit_b16_imagenet, remat=True, scan=True), 128),
    Case("unet", _unet_paper, 4),
)}


def libtpu_version() -> str:
  """The installed libtpu's version ('' when it is not installed)."""
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return ""


def compile_once(case: Case, generation: str, batch: int) -> dict:
  """One compile of `case`'s train step at per-chip `batch` for one chip of `generation`."""
  config = case.config()
  config.batch_size = config.eval_batch_size = batch
  target = f"tpu:{generation}:{TOPOLOGY[generation]}"
  start = time.perf_counter()
  run = dry_run.compile_run(config, target=target, evaluate=False)
  step = run.steps[0]
  limit = run.target.memory_bytes
  batch_bytes = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                    for s in dry_run.batch_spec(run.task, None, batch, train=True).values())
  flops = step.flops * run.executor.num_devices / batch if step.flops else None
  return {
      "case": case.name, "generation": generation, "target": target, "batch": batch,
      "fits": not step.error and step.total <= limit, "total": step.total or None,
      "temporaries": step.temporaries, "fixed": (step.arguments - batch_bytes + step.outputs
                                                 - step.aliased + step.code) if not step.error
      else None,
      "limit": limit, "compile_s": round(step.compile_s, 1),
      "wall_s": round(time.perf_counter() - start, 1),
      "flops_per_image": flops, "error": step.error,
      "date": datetime.date.today().isoformat(), "libtpu": libtpu_version(),
  }


def _step(batch: int) -> int:
  """The resolution of the search at `batch`."""
  return 8 if batch >= 16 else 1


def _round(batch: float) -> int:
  """A batch on the search's grid: multiples of 8 from 16 up."""
  batch = int(batch)
  return batch // 8 * 8 if batch >= 16 else max(batch, 1)


def memory_line(points: list[dict]) -> tuple[float, float] | None:
  """(fixed bytes, bytes per image) of the line through the fitting compiles: the two largest,
  or one and its own fixed part (what does not scale with the batch)."""
  fits = sorted((p for p in points if p["fits"]), key=lambda p: p["batch"])
  if len(fits) >= 2 and fits[-1]["total"] > fits[-2]["total"]:
    a, b = fits[-2], fits[-1]
    slope = (b["total"] - a["total"]) / (b["batch"] - a["batch"])
    return a["total"] - slope * a["batch"], slope
  if fits:
    p = fits[-1]
    return p["fixed"], (p["total"] - p["fixed"]) / p["batch"]
  return None


def next_batch(points: list[dict], limit: int, prior: tuple[float, float] | None) -> int | None:
  """The next batch to compile given the compiles so far (and the memory line of another
  generation, `prior`), or None when the answer is known."""
  fits = sorted(p["batch"] for p in points if p["fits"])
  fails = sorted(p["batch"] for p in points if not p["fits"])
  lo, hi = (fits[-1] if fits else 0), (fails[0] if fails else None)
  if hi is not None and (hi <= 1 or (lo and hi - lo <= _step(lo))):
    return None  # the answer is lo (0: not even one image fits)
  line = memory_line(points)
  if line is not None and sum(p["fits"] for p in points) == 1 and prior is not None:
    line = (line[0], prior[1])  # one point here: its fixed part, the other chip's slope
  line = line or prior
  guess = _round((limit - line[0]) / line[1]) if line and line[1] > 0 else None
  if guess is None:
    guess = max(hi // 2, 1) if hi else 2 * max(lo, 1)
  # Stay strictly between the largest fit and the smallest failure.
  if hi is not None and guess >= hi:
    guess = _round((lo + hi) / 2) if lo else max(hi // 2, 1)
  if guess <= lo:
    guess = lo + _step(lo)
  if hi is not None and guess >= hi:
    return None
  return guess


def search(case: Case, generation: str, done: list[dict], prior, write) -> dict:
  """The compiles of `case` on `generation` down to its largest fitting per-chip batch
  (compiling only what `done` lacks)."""
  points = [p for p in done if p["case"] == case.name and p["generation"] == generation]
  limit = chips.tpu_chip(generation).usable_bytes
  batch = case.start if not points and prior is None else next_batch(points, limit, prior)
  for _ in range(MAX_COMPILES):
    if batch is None:
      break
    point = compile_once(case, generation, batch)
    points.append(point)
    write(point)
    print(f"# {case.name} {generation} batch {batch}: "
          f"{'fits' if point['fits'] else 'does not fit'} "
          f"({dry_run._gib(point['total'] or 0)} of {dry_run._gib(limit)}; compile "
          f"{point['compile_s']}s)", file=sys.stderr, flush=True)
    batch = next_batch(points, limit, prior)
  return {"case": case.name, "generation": generation, "points": points}


def table(rows: Sequence[dict], own_flops: dict[str, float]) -> str:
  """The Markdown table: per case and generation, the largest fitting batch and its figures."""
  lines = ["| model | chip | largest batch per chip | memory at it / usable HBM | compile | "
           "compiled GFLOP/image | network's GFLOP/image | ratio |",
           "|---|---|---|---|---|---|---|---|"]
  grouped: dict[tuple[str, str], list[dict]] = {}
  for row in rows:
    grouped.setdefault((row["case"], row["generation"]), []).append(row)
  for (case, generation), points in grouped.items():
    fits = [p for p in points if p["fits"]]
    fails = [p["batch"] for p in points if not p["fits"]]
    if not fits:
      lines.append(f"| {case} | {generation} | none of {sorted(fails)} | | | | | |")
      continue
    best = max(fits, key=lambda p: p["batch"])
    above = min((b for b in fails if b > best["batch"]), default=None)
    bound = f" ({above} does not)" if above else " (largest tried)"
    own = own_flops.get(case)
    compiled = best["flops_per_image"]
    ratio = f"{compiled / own:.2f}" if own and compiled else ""
    lines.append(
        f"| {case} | {generation} | {best['batch']}{bound} | {dry_run._gib(best['total'])} / "
        f"{dry_run._gib(best['limit'])} | {best['compile_s']:.0f} s | "
        f"{compiled / 1e9 if compiled else 0:.2f} | {own / 1e9 if own else 0:.2f} | {ratio} |")
  return "\n".join(lines)


def network_flops(case: Case) -> float | None:
  """The case's own training FLOPs per image (3x the unrolled forward pass, unoptimised)."""
  config = case.config()
  config.batch_size = config.eval_batch_size = 8
  resolved, _, _ = dry_run.describe(config)
  from train.build import build_task

  return dry_run.model_flops_per_image(resolved, build_task(resolved))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The plan's flags."""
  p = argparse.ArgumentParser(prog="python -m train.memory_plan", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", default=",".join(CASES),
                 help=f"comma-separated, from: {', '.join(CASES)} (default: all)")
  p.add_argument("--generations", default=",".join(GENERATIONS),
                 help="comma-separated TPU generations (default: %(default)s)")
  p.add_argument("--out", default="", help="JSON-lines file of every compile (appended; a "
                 "rerun skips what it holds)")
  p.add_argument("--table", default="", help="print the table of an --out file and exit")
  args = p.parse_args(argv)
  for name in args.cases.split(","):
    if name not in CASES:
      p.error(f"--cases: unknown case {name!r}; choose from {', '.join(CASES)}")
  for gen in args.generations.split(","):
    if gen not in TOPOLOGY:
      p.error(f"--generations: unknown generation {gen!r}; choose from {', '.join(TOPOLOGY)}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Searches every case x generation and prints the Markdown table."""
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; no local TPU needed
  path = args.table or args.out
  done = []
  if path and os.path.exists(path):
    with open(path) as f:
      done = [json.loads(line) for line in f if line.strip()]
  cases = [CASES[name] for name in (args.cases.split(",") if not args.table else
                                    dict.fromkeys(r["case"] for r in done))]
  own = {c.name: network_flops(c) for c in cases}
  if args.table:
    print(table(done, own))
    return 0

  def write(point: dict) -> None:
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(point) + "\n")

  for case in cases:
    prior = None
    for generation in args.generations.split(","):
      result = search(case, generation, done, prior, write)
      prior = memory_line(result["points"]) or prior
  rows = [r for r in done if r["case"] in {c.name for c in cases}]
  if args.out:
    with open(args.out) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  print(table(rows, own))
  return 0


if __name__ == "__main__":
  sys.exit(main())
