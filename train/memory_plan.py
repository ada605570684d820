"""python -m train.memory_plan: the largest per-chip batch whose train step fits, per model and
TPU generation (the "TPU memory plan" table of BENCHMARKS.md).

    python -m train.memory_plan --out runs/memory_plan.jsonl
    python -m train.memory_plan --cases vit_b16 --generations v5e,v6e --out plan.jsonl
    python -m train.memory_plan --table runs/memory_plan.jsonl      # the Markdown table only
    python -m train.memory_plan --ops HLO_DIR/unet-v5e-4.hlo.txt.gz --out runs/memory_plan.jsonl

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
     fits and the next one up (by `step`: 1 below 16, then about a sixteenth of the batch) does
     not, bisecting between the
     largest fit and the smallest failure when the prediction misses;
  3. a case's memory per image carries over to the next generation as its first guess.
Every compile is one JSON line in --out (date, libtpu version, batch, fits, bytes, compile
time, FLOPs); a rerun with the same --out skips the compiles it already has.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from configs import resnet50_imagenet, unet_membrane, vit_b16_imagenet
from train import chips, dry_run
from train.build import build_task

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
    Case("vit_b16", lambda: _imagenet(vit_b16_imagenet), 160),
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


def _file_stem(case_name: str) -> str:
  """A case's name as its saved HLO files begin."""
  return case_name.replace(" ", "_")


def compile_once(case: Case, generation: str, batch: int, hlo_dir: str = "") -> dict:
  """One compile of `case`'s train step at per-chip `batch` for one chip of `generation`
  (its optimised HLO saved gzipped under `hlo_dir` when given)."""
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
  print(dry_run.report_text(run), file=sys.stderr, flush=True)
  if hlo_dir and "train" in run.compiled:
    os.makedirs(hlo_dir, exist_ok=True)
    name = f"{_file_stem(case.name)}-{generation}-{batch}.hlo.txt.gz"
    with gzip.open(os.path.join(hlo_dir, name), "wt") as f:
      f.write(run.compiled["train"].as_text())
  return {
      "case": case.name, "generation": generation, "target": target, "batch": batch,
      # A refused compile's need is the compiler's own figure: its report has no buffers.
      "fits": not step.error and step.total <= limit,
      "total": (step.required if step.error else step.total) or None,
      "temporaries": step.temporaries, "fixed": (step.arguments - batch_bytes + step.outputs
                                                 - step.aliased + step.code) if not step.error
      else None,
      "limit": limit, "compile_s": round(step.compile_s, 1),
      "compile_cpu_s": round(step.compile_cpu_s, 1),
      "wall_s": round(time.perf_counter() - start, 1),
      "flops_per_image": flops, "error": step.error,
      "date": datetime.date.today().isoformat(), "libtpu": libtpu_version(),
  }


def _step(batch: int) -> int:
  """The resolution of the search at `batch`: 1 below 16, then about 1/16 of the batch on a
  power-of-two grid (8 up to 255, 16 up to 511, ...)."""
  if batch < 16:
    return 1
  return max(8, 2 ** int(math.log2(batch)) // 16)


def _round(batch: float) -> int:
  """`batch` rounded down to the search's grid."""
  batch = int(batch)
  return max(batch // _step(batch) * _step(batch), 1)


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


def search(case: Case, generation: str, done: list[dict], prior, write, hlo_dir: str = "",
           max_compiles: int = MAX_COMPILES, pause_file: str = "") -> dict:
  """The compiles of `case` on `generation` down to its largest fitting per-chip batch
  (compiling only what `done` lacks)."""
  points = [p for p in done if p["case"] == case.name and p["generation"] == generation]
  limit = chips.tpu_chip(generation).usable_bytes
  batch = case.start if not points and prior is None else next_batch(points, limit, prior)
  for _ in range(max_compiles):
    if batch is None:
      break
    while pause_file and os.path.exists(pause_file):
      time.sleep(30)  # the (shared) host is wanted for something else between two compiles
    point = compile_once(case, generation, batch, hlo_dir)
    points.append(point)
    write(point)
    print(f"# {case.name} {generation} batch {batch}: "
          f"{'fits' if point['fits'] else 'does not fit'} "
          f"({dry_run._gib(point['total'] or 0)} of {dry_run._gib(limit)}; compile "
          f"{point['compile_s']}s)", file=sys.stderr, flush=True)
    batch = next_batch(points, limit, prior)
  return {"case": case.name, "generation": generation, "points": points}


def table(rows: Sequence[dict]) -> str:
  """The Markdown table: per case and chip, the largest fitting per-chip batch, the memory and
  compile time at it, and its compiled FLOPs per image against the network's own."""
  lines = ["| model | chip | largest batch per chip | memory at it / usable | compile wall "
           "(CPU) | compiled GFLOP/image | network's GFLOP/image | ratio |",
           "|---|---|---|---|---|---|---|---|"]
  points = [r for r in rows if "batch" in r]
  own = {r["case"]: r["network_flops"] for r in rows if r.get("network_flops")}
  cases = list(dict.fromkeys(r["case"] for r in points))
  generations = [g for g in GENERATIONS if any(p["generation"] == g for p in points)]
  for case in cases:
    for generation in generations:
      mine = [p for p in points if p["case"] == case and p["generation"] == generation]
      if not mine:
        continue  # not searched: a prediction from another chip's line is no result
      fits = [p for p in mine if p["fits"]]
      fails = [p["batch"] for p in mine if not p["fits"]]
      if not fits:
        lines.append(f"| {case} | {generation} | below {min(fails)} (none compiled fits) | | | "
                     "| | |")
        continue
      best = max(fits, key=lambda p: p["batch"])
      above = min((b for b in fails if b > best["batch"]), default=None)
      # Near the limit the compiler rematerialises to fit, so memory stops growing linearly
      # with the batch: only a compile that fails bounds the search.
      bound = (f"{best['batch']} ({above} does not fit)" if above is not None
               else f"{best['batch']} fits (larger not compiled)")
      flops, network = best["flops_per_image"], own.get(case)
      ratio = f"{flops / network:.2f}" if flops and network else ""
      if "scan" in case:  # XLA's cost analysis counts a while body (the scanned blocks) once
        ratio = "n/a (scan)"
      lines.append(
          f"| {case} | {generation} | {bound} | {dry_run._gib(best['total'])} / "
          f"{dry_run._gib(best['limit'])} | {best['compile_s']:.0f} s "
          f"({best.get('compile_cpu_s', 0):.0f} s) | {flops / 1e9 if flops else 0:.1f} | "
          f"{network / 1e9 if network else 0:.1f} | {ratio} |")
  return "\n".join(lines)


def network_flops(case: Case) -> float | None:
  """The case's own training FLOPs per image (3x the unrolled forward pass, unoptimised)."""
  config = case.config()
  config.batch_size = config.eval_batch_size = 8
  resolved, _, _ = dry_run.describe(config)

  return dry_run.model_flops_per_image(resolved, build_task(resolved))


def network_layer_flops(case: Case, batch: int) -> dict[str, float]:
  """The case's forward FLOPs per layer at per-chip `batch`: its unrolled forward pass compiled
  for the host (XLA:CPU keeps the real shapes and the op names)."""
  config = case.config()
  config.batch_size = config.eval_batch_size = batch
  resolved, _, _ = dry_run.describe(config)
  hlo = dry_run.plain_forward(resolved, build_task(resolved), batch).compile().as_text()
  flops: dict[str, float] = {}
  for op in matrix_ops(hlo):
    layer = _layer(op.op_name)[0].partition("/")[2]  # the model's own name comes first here
    flops[layer] = flops.get(layer, 0.0) + op.flops
  return flops


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class MatrixOp:
  """A convolution or dot of a compiled module.

  Attributes:
    name: the instruction's name.
    kind: 'convolution' or 'dot'.
    out: the result's shape.
    contraction: products summed per output element, on average (a convolution's input
      features x the window taps that meet real input, padding and dilation holes left out;
      the contracted dims of a dot).
    features: (input features, output features) of a convolution's kernel; for a dot,
      (contracted elements, last output dim).
    op_name: the JAX operation it comes from (the metadata's op_name).
  """

  name: str
  kind: str
  out: tuple[int, ...]
  contraction: float
  features: tuple[int, int]
  op_name: str

  @property
  def flops(self) -> float:
    """2 x output elements x contraction: the logical FLOPs."""
    return 2.0 * math.prod(self.out) * self.contraction


def _type_and_opcode(rest: str) -> tuple[str, str, str]:
  """(type, opcode, the text after the opcode's '(') of an instruction's right-hand side."""
  if rest.startswith("("):
    depth, end = 0, len(rest)
    for position, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        end = position + 1
        break
    type_text, rest = rest[:end], rest[end:]
  else:
    type_text, _, rest = rest.partition(" ")
  rest = rest.lstrip()
  opcode, _, args = rest.partition("(")
  return type_text, opcode.strip(), args


def _window(args: str, rank: int) -> list[tuple[int, int, int, int, int]]:
  """(size, low padding, stride, lhs dilation, rhs dilation) per spatial dim of a convolution's
  `window={...}` attribute."""
  text = (re.search(r"window=\{([^}]*)\}", args) or re.search("()", "")).group(1)
  fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
  ints = lambda key, default: ([int(v) for v in fields[key].split("x")] if key in fields
                               else [default] * rank)
  pads = ([int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields
          else [0] * rank)
  return list(zip(ints("size", 1), pads, ints("stride", 1), ints("lhs_dilate", 1),
                  ints("rhs_dilate", 1), strict=True))


def _real_taps(size_in: int, window: int, pad_lo: int, stride: int, lhs_dilate: int,
               rhs_dilate: int, size_out: int) -> int:
  """Window taps, summed over the output positions of one spatial dim, that meet a real input
  element: not padding, not a hole of an lhs dilation (how XLA writes transposed
  convolutions and some dots as convolutions)."""
  position = (np.arange(size_out)[:, None] * stride + np.arange(window)[None, :] * rhs_dilate
              - pad_lo)
  real = (position >= 0) & (position <= (size_in - 1) * lhs_dilate) & (position % lhs_dilate == 0)
  return int(real.sum())


def matrix_ops(hlo_text: str) -> list[MatrixOp]:
  """The convolutions and dots of a compiled module's text, with their logical sizes."""
  shapes, pending = {}, []
  for line in hlo_text.splitlines():
    match = _DEFINITION.match(line)
    if not match:
      continue
    type_text, opcode, args = _type_and_opcode(line[match.end():])
    arrays = _SHAPE.findall(type_text)
    if len(arrays) == 1 and not type_text.startswith("("):
      shapes[match.group(1)] = tuple(int(d) for d in arrays[0][1].split(",") if d)
    if opcode in ("convolution", "dot"):
      pending.append((match.group(1), opcode, args))
  ops = []
  for name, opcode, args in pending:
    operands = re.findall(r"%([\w.\-]+)", args.split(")")[0])
    if len(operands) < 2 or name not in shapes or any(o not in shapes for o in operands[:2]):
      continue
    lhs, rhs, out = shapes[operands[0]], shapes[operands[1]], shapes[name]
    op_name = (re.search(r'op_name="([^"]*)"', args) or re.search("()", "")).group(1)
    if opcode == "convolution":
      labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", args)
      if not labels:
        continue
      lhs_labels, kernel, out_labels = labels.groups()
      window = _window(args, sum(c.isdigit() for c in kernel))
      taps = 1
      for d, (size, pad_lo, stride, lhs_dilate, rhs_dilate) in enumerate(window):
        taps *= _real_taps(lhs[lhs_labels.index(str(d))], size, pad_lo, stride, lhs_dilate,
                           rhs_dilate, out[out_labels.index(str(d))])
      i, o = rhs[kernel.index("i")], rhs[kernel.index("o")]
      spatial_out = math.prod(out[out_labels.index(c)] for c in out_labels if c.isdigit())
      # `taps` sums over output positions already: per output element it is taps / positions.
      ops.append(MatrixOp(name, opcode, out, i * taps / max(spatial_out, 1), (i, o), op_name))
    else:
      contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", args)
      dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
      k = math.prod(lhs[d] for d in dims)
      ops.append(MatrixOp(name, opcode, out, k, (k, out[-1] if out else 1), op_name))
  return ops


def _layer(op_name: str) -> tuple[str, str]:
  """(the layer's module path, its pass: 'forward', 'backward', or 'unnamed' for an op that
  has no JAX op name) from a name such as
  'jit(train_step)/transpose(jvp(UNet))/dec0/conv1/conv_general_dilated'."""
  if not op_name:
    return "", "unnamed"
  parts = op_name.split("/")
  backward = any(p.startswith("transpose(") for p in parts)
  # Wrappers ('jit(...)', 'jvp(...)'), einsum specs and the primitive name are not the layer.
  layer = [p for p in parts[:-1] if not re.match(r"^[\w<>-]*\(", p) and "->" not in p]
  return "/".join(layer) or op_name, "backward" if backward else "forward"


def ops_report(hlo_text: str, compiled_flops: float | None = None,
               network: dict[str, float] | None = None, top: int = 12) -> str:
  """Where a compiled step's FLOPs go: its convolutions and dots per layer and pass, against
  XLA's count for the whole step (the rest: elementwise ops and reductions) and, given the
  network's forward FLOPs per layer (`network_layer_flops`), each forward layer's compiled
  FLOPs over its own: above 1 where the compiler computes on padded shapes. A layer that the
  compiler recomputes to save memory shows more ops than its passes need."""
  ops = matrix_ops(hlo_text)
  total = sum(op.flops for op in ops)
  groups: dict[tuple[str, str], list[MatrixOp]] = {}
  for op in ops:
    groups.setdefault(_layer(op.op_name), []).append(op)
  passes: dict[str, list[MatrixOp]] = {}
  for (_, kind), members in groups.items():
    passes.setdefault(kind, []).extend(members)
  lines = [f"convolutions and dots: {len(ops)} ops, {total / 1e9:.1f} GFLOP" + (
      f" of XLA's {compiled_flops / 1e9:.1f} for the step (the rest, elementwise ops and "
      f"reductions: {(compiled_flops - total) / 1e9:.1f})" if compiled_flops else ""),
           ", ".join(f"{kind} {sum(op.flops for op in members) / 1e9:.1f} GFLOP in "
                     f"{len(members)} ops" for kind, members in sorted(passes.items())),
           f"{'GFLOP':>9} {'ops':>4}  layer (pass): features in -> out, output shape"]
  if network:
    compiled_forward = sum(op.flops for op in passes.get("forward", []))
    own_forward = sum(network.values())
    lines.insert(2, f"forward: {compiled_forward / own_forward:.3f}x the network's "
                 f"{own_forward / 1e9:.1f} GFLOP")
  rows = sorted(groups.items(), key=lambda kv: -sum(op.flops for op in kv[1]))
  for (layer, kind), members in rows[:top]:
    first, flops = members[0], sum(op.flops for op in members)
    own = (network or {}).get(layer) if kind == "forward" else None
    lines.append(f"{flops / 1e9:>9.1f} {len(members):>4}  {layer} ({kind}): {first.features[0]} "
                 f"-> {first.features[1]}, {list(first.out)}"
                 + (f"; {flops / own:.3f}x the network's" if own else ""))
  return "\n".join(lines)


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
  p.add_argument("--hlo-dir", default="", help="save each compiled step's optimised HLO "
                 "(gzipped text) here, for `python -m train.memory_plan --ops FILE`")
  p.add_argument("--max-compiles", type=int, default=MAX_COMPILES,
                 help="compiles per case and chip (default: %(default)s); with 1, the batch "
                 "predicted from another chip's memory line is checked and the table marks "
                 "its bound as predicted")
  p.add_argument("--pause-file", default="",
                 help="before each compile, wait while this file exists (to lend a shared host "
                 "to something else between compiles)")
  p.add_argument("--top", type=int, default=12, help="--ops: rows of layers (default: "
                 "%(default)s)")
  p.add_argument("--table", default="", help="print the table of an --out file and exit")
  p.add_argument("--ops", default="", help="print where the FLOPs of a step saved by --hlo-dir "
                 "go (per layer and pass) and exit; with --out, against XLA's count for it")
  args = p.parse_args(argv)
  if args.ops and not os.path.isfile(args.ops):
    p.error(f"--ops: no file {args.ops!r}")
  for name in args.cases.split(","):
    if name not in CASES:
      p.error(f"--cases: unknown case {name!r}; choose from {', '.join(CASES)}")
  for gen in args.generations.split(","):
    if gen not in TOPOLOGY:
      p.error(f"--generations: unknown generation {gen!r}; choose from {', '.join(TOPOLOGY)}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Searches every generation x case and prints the Markdown table."""
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; no local TPU needed
  path = args.table or args.out
  rows = []
  if path and os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  if args.ops:
    with (gzip.open if args.ops.endswith(".gz") else open)(args.ops, "rt") as f:
      hlo_text = f.read()
    # The file's name is the compile's (`compile_once`): CASE-GENERATION-BATCH.hlo.txt.gz.
    name = os.path.basename(args.ops).split(".hlo")[0]
    stem, generation, batch = (name.rsplit("-", 2) + ["", ""])[:3]
    case = next((c for c in CASES.values() if _file_stem(c.name) == stem), None)
    step_flops = next((r["flops_per_image"] * r["batch"] for r in rows if case and "batch" in r
                       and r["flops_per_image"] and (r["case"], r["generation"], str(r["batch"]))
                       == (case.name, generation, batch)), None)
    # Another file's HLO gets the per-layer table without the network's column.
    network = network_layer_flops(case, int(batch)) if case and batch.isdigit() else None
    print(ops_report(hlo_text, step_flops, network, top=args.top))
    return 0

  def write(row: dict) -> None:
    rows.append(row)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")

  names = args.cases.split(",") if not args.table else list(dict.fromkeys(
      r["case"] for r in rows))
  for name in names:  # the network's own FLOPs: a lowering on the host, once per case
    if not any(r.get("network_flops") and r["case"] == name for r in rows):
      write({"case": name, "network_flops": network_flops(CASES[name])})
  if not args.table:
    # Generation by generation, so that a partial run has every case on the first chips; a
    # case's memory line on one chip is its first guess on the next.
    for generation in args.generations.split(","):
      for name in names:
        points = [r for r in rows if r["case"] == name and "batch" in r]
        prior = memory_line(points[-4:]) if points else None
        search(CASES[name], generation, [r for r in rows if "batch" in r], prior, write,
               args.hlo_dir, args.max_compiles, args.pause_file)
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
