"""`python -m train --config X --dry_run [--target tpu:GEN:TOPOLOGY]`: the run compiled ahead of
time, and whether it fits.

The run is built as `train_and_evaluate` builds it (resolved config, model, task, optimizer,
executor: mesh or pmap, shardings, donated state) but from abstract shapes only: no parameter is
initialised (`jax.eval_shape`) and no batch is transferred. Its train and eval steps are then
compiled for the target and the report gives, per device: arguments, outputs, temporaries, the
total against the device's memory, FLOPs per step and per image, compile times and the
collectives of the compiled programs (count and bytes of all-reduce, all-gather, reduce-scatter,
all-to-all, collective-permute).

Data. The config is resolved as training resolves it (`train.resolve`), which reads the
dataset's description: TFDS datasets are described from `builder.info` alone (the dry run
resolves them as streamed, so no record is read when the info knows the split sizes, as it does
once a dataset is prepared or its metadata is reachable); the other sources are opened as
training opens them (`digits` and `synthetic:` are made in memory, `folder:` is listed, the
small `idx:`/`segfolder:` sets are read). The batch shapes are the task's `input_spec`; for an
in-memory input, those of one example through the transform, so e.g. a segmentation eval
batch has the whole images the eval sees rather than the training crop.

Targets. '' compiles for this machine's devices. 'tpu:GEN:TOPOLOGY' (tpu:v5e:1x1 is a Colab
v5e-1, tpu:v2:2x2 a v2-8, tpu:v4:2x2x1 a v4-8, ...) compiles for a TPU slice on any machine
through libtpu's compile-only devices (`jax.experimental.topologies`), one device per chip
(v4, v5p: megacore) or per TensorCore (v2, v3), as a TPU VM shows them.

Memory and the verdict. A step needs, per device, its arguments + outputs - the outputs that
reuse donated arguments + temporaries + its code, plus the input batches the loop keeps on the
device (`data.prefetch` transferred ahead and `loop.MAX_STEPS_AHEAD` dispatched steps). The run
fits when both steps do: on TPU within the part of HBM the compiler makes available
(`train.chips`; a step beyond it does not even compile, and the compiler's message is
reported); on GPU within the allocator's limit; on CPU within the host's RAM, which all CPU
devices share (so theirs are added). `memory_limit_bytes`, or JAXVISION_MEMORY_LIMIT=2GiB in
the environment, replaces that limit. Exit status 0 when it fits; 2 with one line on stderr
that names the biggest consumers and what would help when it does not.

FLOPs are XLA's cost analysis of the compiled step, per device. It counts a scanned loop's
body once and rematerialised work again, so for `scan`/`remat` models the report adds the
network's own FLOPs (3x the forward pass of the unrolled network). XLA's "optimal_seconds" is
not a time estimate (it comes out negative for whole models) and is never shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np

from train import chips
from train.build import build_model, build_task, check_model
from train.loop import MAX_STEPS_AHEAD
from train.optim import create_optimizer
from train.parallel import create_executor
from train.resolve import resolve

MEMORY_LIMIT_ENV = "JAXVISION_MEMORY_LIMIT"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Model options under which XLA's FLOP count is not the network's own.
_FLOP_HIDING_KWARGS = ("scan", "remat")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def parse_bytes(text: str, what: str = MEMORY_LIMIT_ENV) -> int:
  """'2GiB', '512MiB', '1.5GB', '1e9' -> bytes; a one-line error naming `what` otherwise."""
  match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
  try:
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
  except (AttributeError, ValueError, KeyError):
    value = -1.0
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{what}={text!r}: expected a positive size such as 2GiB, 512MiB or 1e9")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a dry run compiles for, and the memory each may use.

  Attributes:
    label: 'tpu:v5e:2x2', or 'local'.
    devices: the devices to compile for; None for this machine's, chosen as training does.
    chip: the chip table's entry, when known.
    memory_bytes: what one device may use (None: no verdict possible).
    memory_note: where `memory_bytes` comes from.
    shared: the devices share one memory (CPU devices: the host's RAM).
  """

  label: str
  devices: list | None
  chip: chips.Chip | None
  memory_bytes: int | None
  memory_note: str
  shared: bool = False


def parse_target(target: str) -> tuple[str, str]:
  """'tpu:v5e:2x2' -> ('v5e', '2x2'); a one-line error for anything else."""
  parts = target.split(":")
  example = "e.g. tpu:v5e:1x1, tpu:v2:2x2, tpu:v4:2x2x1, tpu:v5p:2x2x1, tpu:v6e:2x2"
  if len(parts) != 3 or parts[0] != "tpu":
    raise ValueError(f"--target {target!r}: expected tpu:GEN:TOPOLOGY ({example})")
  generation, topology = parts[1], parts[2]
  if generation not in chips.TPU_GENERATIONS:
    raise ValueError(f"--target {target!r}: TPU generation {generation!r} is unknown; choose "
                     f"from {', '.join(chips.TPU_GENERATIONS)}")
  rank = 3 if generation in ("v4", "v5p") else 2
  if not re.fullmatch(r"[1-9][0-9]*" + r"x[1-9][0-9]*" * (rank - 1), topology):
    shape = "x".join("ABC"[:rank])
    raise ValueError(f"--target {target!r}: a {generation} topology is {shape} chips ({example})")
  return generation, topology


def tpu_devices(generation: str, topology: str) -> list:
  """The compile-only devices of a TPU slice (libtpu), as a TPU VM of that slice shows them."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--target tpu:{generation}:{topology} needs libtpu, which is not "
                     f"installed: pip install 'jaxvision[tpu]' (or 'jax[tpu]=={jax.__version__}')")
  # libtpu takes a machine-wide lock file when it initialises; compiling for a topology uses no
  # TPU, so it may share the machine with another process that holds the lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
    # Everything but the compile itself runs on the host: no local TPU backend to probe (which,
    # with libtpu installed and no TPU attached, fills stderr with its failure).
    jax.config.update("jax_platforms", "cpu")
  from jax.experimental import topologies

  dims = [int(d) for d in topology.split("x")]
  kwargs = {}
  if generation in ("v4", "v5p"):
    kwargs["chip_config_name"] = "megacore"  # a chip's two TensorCores as one device
  hosts = (min(dims[0], 2), min(dims[1], 2), 1)
  if hosts != (2, 2, 1):  # slices smaller than one host's 2x2 chips (e.g. a v5e-1)
    kwargs["chips_per_host_bounds"] = hosts
  try:
    with _quiet_stderr():
      return list(topologies.get_topology_desc(
          platform="tpu", topology_name=f"{generation}:{topology}", **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - libtpu's errors (RuntimeError, JaxRuntimeError)
    raise ValueError(f"--target tpu:{generation}:{topology}: libtpu has no such topology: "
                     f"{_first_line(e)}") from None


@contextlib.contextmanager
def _quiet_stderr():
  """Process-level stderr (file descriptor 2) discarded for the block: libtpu initialising on a
  machine without TPUs reports its failed probes of the TPU VM's environment there, and these
  say nothing about a compile-only topology."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def resolve_target(target: str, memory_limit_bytes: int | None) -> Target:
  """The devices and per-device memory of `target` ('' for this machine)."""
  if target:
    generation, topology = parse_target(target)
    chip = chips.tpu_chip(generation)
    devices = tpu_devices(generation, topology)
    if memory_limit_bytes:
      return Target(target, devices, chip, memory_limit_bytes, "memory_limit_bytes")
    return Target(target, devices, chip, chip.usable_bytes,
                  f"of {_gib(chip.memory_bytes)} HBM, as libtpu's compiler makes available")
  device = jax.devices()[0]
  chip = chips.chip_of(device.device_kind)
  shared = device.platform == "cpu"
  if memory_limit_bytes:
    return Target("local", None, chip, memory_limit_bytes, "memory_limit_bytes", shared)
  if shared:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target("local", None, None, ram, "host RAM, shared by the CPU devices", True)
  stats = _memory_stats(device)
  if stats.get("bytes_limit"):
    return Target("local", None, chip, int(stats["bytes_limit"]), "the allocator's limit")
  if chip is not None and chip.memory_bytes:
    return Target("local", None, chip, chip.usable_bytes or chip.memory_bytes, "train.chips")
  return Target("local", None, chip, None, "unknown")


def _memory_stats(device) -> dict:
  try:
    return device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without memory statistics raise
    return {}


def describe(config) -> tuple[ml_collections.FrozenConfigDict, object, object]:
  """(resolved config, train input, eval input or None) from the data's description only."""
  stream = None
  if str(config.dataset).startswith("tfds:"):
    # Streamed TFDS inputs read builder.info and no record; the in-memory path would read all.
    config = ml_collections.ConfigDict(config.to_dict())
    stream, config.data.stream = config.data.stream, "always"
  frozen, train_input, eval_input = resolve(config)
  if stream is not None:
    unfrozen = ml_collections.ConfigDict(frozen.to_dict())
    unfrozen.data.stream = stream
    frozen = ml_collections.FrozenConfigDict(unfrozen)
  return frozen, train_input, eval_input


def batch_spec(task, data, batch_size: int, *, train: bool) -> dict:
  """The global batch a step receives: the task's `input_spec`, or for an in-memory input the
  shapes of one example through its transform; eval batches add `valid`."""
  spec = dict(task.input_spec(batch_size))
  if data is not None and hasattr(data, "transform") and hasattr(data, "source"):
    example = data.transform(data.source.get_batch(np.zeros(1, np.int64)),
                             np.random.default_rng(0))
    example = task.prepare(example, train=train)
    spec = {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)[1:]),
                                    jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
            for k, v in example.items() if np.asarray(v).dtype.kind in "biuf"}
  if not train:
    spec["valid"] = jax.ShapeDtypeStruct((batch_size,), np.bool_)
  return spec


@dataclasses.dataclass
class StepReport:
  """What one compiled step needs per device.

  Attributes:
    name: 'train' or 'eval'.
    compile_s: lowering + compilation wall time.
    compile_cpu_s: the CPU time this process spent on it (all threads): on a shared host the
      steadier measure of the work.
    arguments / outputs / aliased / temporaries / code: bytes per device from XLA's memory
      analysis (aliased: outputs written into donated arguments).
    queued: bytes of the input batches the loop keeps on the device besides the step's own.
    flops: XLA's FLOP count of one call, per device (None when the backend gives none).
    collectives: {op: (count, bytes per device)} in the compiled program.
    error: the compiler's message when the step does not fit (the sizes are then 0).
    required: what that message says the step needs, in bytes (0 when it does not say).
  """

  name: str
  compile_s: float
  compile_cpu_s: float = 0.0
  arguments: int = 0
  outputs: int = 0
  aliased: int = 0
  temporaries: int = 0
  code: int = 0
  queued: int = 0
  flops: float | None = None
  collectives: dict = dataclasses.field(default_factory=dict)
  error: str = ""
  required: int = 0

  @property
  def total(self) -> int:
    """Bytes one device needs while the step runs."""
    return (self.arguments + self.outputs - self.aliased + self.temporaries + self.code
            + self.queued)


def compile_step(name: str, fn, args: tuple, queued: int, compiled_steps: dict) -> StepReport:
  """Lowers and compiles `fn(*args)` (kept in `compiled_steps[name]`); a compiler
  out-of-memory error becomes the report's `error`."""
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return StepReport(name, time.perf_counter() - start, time.process_time() - cpu_start,
                      queued=queued, error=_first_line(e), required=required_bytes(str(e)))
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  compiled_steps[name] = compiled
  report = StepReport(name, seconds, cpu_seconds, queued=queued, flops=_flops(compiled),
                      collectives=collectives(compiled.as_text()))
  memory = compiled.memory_analysis()
  if memory is not None:
    report.arguments = int(memory.argument_size_in_bytes)
    report.outputs = int(memory.output_size_in_bytes)
    report.aliased = int(memory.alias_size_in_bytes)
    report.temporaries = int(memory.temp_size_in_bytes)
    report.code = int(memory.generated_code_size_in_bytes)
  return report


_SIZE = r"([0-9.]+)([KMGT]?)"
_REQUIRED = (re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
             re.compile(rf"required for [^(]*\({_SIZE}\) exceeds available HBM"))


def required_bytes(message: str) -> int:
  """The bytes a TPU compiler's out-of-memory message says the program needs (0: unsaid).

  libtpu writes sizes with binary prefixes ('17.77G' is 17.77 GiB).
  """
  for pattern in _REQUIRED:
    match = pattern.search(message)
    if match:
      return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))
  return 0


def _flops(stage) -> float | None:
  try:
    analysis = stage.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\])\S*\s+(" + "|".join(COLLECTIVES)
                          + r")(-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{op: (count, bytes)} of the collectives in a compiled module's text (an async pair counts
  once, at its start); bytes are those of each op's largest result array, per device."""
  found: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.search(line)
    if not match:
      continue
    sizes = [_array_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(match.group(1))]
    # An all-reduce of several arrays returns all of them; the async forms of the others return
    # (operand, result, ...) tuples, whose largest array is the result.
    size = sum(sizes) if match.group(2) == "all-reduce" else max(sizes, default=0)
    count_bytes = found.setdefault(match.group(2), [0, 0])
    count_bytes[0] += 1
    count_bytes[1] += size
  return {op: (found[op][0], found[op][1]) for op in COLLECTIVES if op in found}


def _array_bytes(dtype: str, dims: str) -> int:
  count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
  return count * _DTYPE_BYTES.get(dtype, 1)


def abstract_arguments(executor, train_spec: dict, eval_spec: dict) -> tuple[tuple, tuple]:
  """(train step arguments, eval step arguments) as ShapeDtypeStructs, placed as the
  executor places the real ones."""
  state = executor.abstract_state_argument()
  return ((state, executor.batch_spec(train_spec), executor.abstract_rng()),
          (state, executor.batch_spec(eval_spec)))


def state_bytes(executor) -> dict[str, int]:
  """Bytes per device of the train state's parts: params, opt_state, ema_params, batch_stats."""
  state = executor.abstract_state
  parts = {"params": state.params, "opt_state": state.opt_state,
           "ema_params": state.ema_params, "batch_stats": state.batch_stats}
  sharding = getattr(executor, "state_sharding", None)
  shardings = {name: getattr(sharding, name) for name in parts} if sharding is not None else {}

  def size(tree, shards) -> int:
    leaves = jax.tree.leaves(tree)
    shard_list = jax.tree.leaves(shards) if shards is not None else [None] * len(leaves)
    total = 0
    for leaf, shard in zip(leaves, shard_list, strict=True):
      shape = shard.shard_shape(leaf.shape) if shard is not None else leaf.shape
      total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total

  return {name: size(tree, shardings.get(name)) for name, tree in parts.items()}


def plain_forward(config, task, batch: int):
  """The network's forward pass at `batch` abstract examples, unrolled (no scan, no remat),
  lowered for the host: the network's own work, as written."""
  plain = ml_collections.ConfigDict(config.to_dict())
  for key in _FLOP_HIDING_KWARGS:
    if key in plain.model_kwargs:
      plain.model_kwargs[key] = False
  model = build_model(plain)
  spec = task.input_spec(batch)

  def init(batch):
    args, kwargs = task.model_inputs(batch)
    key = jax.random.key(0)
    return model.init({"params": key, "dropout": key}, *args, train=False, **kwargs)

  def forward(variables, batch):
    args, kwargs = task.model_inputs(batch)
    return model.apply(variables, *args, train=False, **kwargs)

  return jax.jit(forward).lower(jax.eval_shape(init, spec), spec)


def model_flops_per_image(config, task) -> float | None:
  """The network's own training FLOPs per image: 3x the forward pass of the unrolled network,
  counted on the unoptimised (lowered, not compiled) program."""
  forward_flops = _flops(plain_forward(config, task, 1))
  return 3.0 * forward_flops if forward_flops else None


@dataclasses.dataclass
class CompiledRun:
  """A run's steps compiled ahead of time for a target.

  Attributes:
    config: the resolved run config.
    target: the devices compiled for and their memory.
    executor: the trainer's executor (mesh or pmap) over those devices.
    task: the run's task.
    steps: the train step's report, then the eval step's (when the run evaluates).
    state: bytes per device of the train state's parts.
    compiled: {'train' | 'eval': the compiled executable}, for steps that compiled.
  """

  config: ml_collections.FrozenConfigDict
  target: Target
  executor: object
  task: object
  steps: list[StepReport]
  state: dict[str, int]
  compiled: dict


def compile_run(config, *, target: str = "", memory_limit_bytes: int | None = None,
                evaluate: bool = True) -> CompiledRun:
  """Builds the run as training does, from abstract shapes, and compiles its steps for
  `target` (`evaluate`: the eval step too, when the config has an eval split)."""
  where = resolve_target(target, memory_limit_bytes)
  config, train_input, eval_input = describe(config)
  if where.devices is not None and config.parallel == "pmap":
    # pmap compiles for the devices it is given only when mesh.num_devices selects them.
    unfrozen = ml_collections.ConfigDict(config.to_dict())
    unfrozen.mesh.num_devices = len(where.devices)
    config = ml_collections.FrozenConfigDict(unfrozen)
  model, task = build_model(config), build_task(config)
  check_model(model, task, config)
  executor = create_executor(config, model, create_optimizer(config), task,
                             devices=where.devices)
  n = executor.num_devices
  train_spec = batch_spec(task, train_input, int(config.batch_size), train=True)
  eval_spec = batch_spec(task, eval_input, int(config.eval_batch_size), train=False)
  train_args, eval_args = abstract_arguments(executor, train_spec, eval_spec)
  per_device = lambda spec: sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                                for s in spec.values()) // n
  prefetch = int(config.data.prefetch)
  compiled = {}
  steps = [compile_step("train", executor.compiled_train_step, train_args,
                        (prefetch + MAX_STEPS_AHEAD) * per_device(train_spec), compiled)]
  if evaluate and config.eval_split:
    steps.append(compile_step("eval", executor.compiled_eval_step, eval_args,
                              prefetch * per_device(eval_spec), compiled))
  return CompiledRun(config, where, executor, task, steps, state_bytes(executor), compiled)


def dry_run(config, *, target: str = "", memory_limit_bytes: int | None = None) -> int:
  """Compiles the run's train and eval steps for `target` and prints the report; the exit
  status: 0 when it fits, 2 when it does not."""
  if memory_limit_bytes is None and os.environ.get(MEMORY_LIMIT_ENV):
    memory_limit_bytes = parse_bytes(os.environ[MEMORY_LIMIT_ENV])
  run = compile_run(config, target=target, memory_limit_bytes=memory_limit_bytes)
  own_flops = None
  if any(run.config.model_kwargs.get(k, False) for k in _FLOP_HIDING_KWARGS):
    own_flops = model_flops_per_image(run.config, run.task)
  print(report_text(run, own_flops))
  verdict, fits = judge(run)
  print(verdict, file=sys.stdout if fits else sys.stderr, flush=True)
  return 0 if fits else 2


def _needed(where: Target, step: StepReport, n: int) -> int:
  return step.total * (n if where.shared else 1)


def judge(run: CompiledRun) -> tuple[str, bool]:
  """(one-line verdict, fits) for the compiled steps against the target's memory."""
  config, where, executor, steps, state = (run.config, run.target, run.executor, run.steps,
                                           run.state)
  n = executor.num_devices
  failed = [s for s in steps if s.error]
  limit = where.memory_bytes
  if not failed and limit is None:
    return "fits: no memory limit known for these devices (set JAXVISION_MEMORY_LIMIT)", True
  over = [s for s in steps if limit is not None and not s.error and _needed(where, s, n) > limit]
  if not failed and not over:
    worst = max(steps, key=lambda s: s.total)
    return (f"fits: the {worst.name} step needs {_gib(_needed(where, worst, n))} of "
            f"{_gib(limit)} ({where.memory_note})"), True
  step = failed[0] if failed else over[0]
  if step.error:
    need = f"does not compile on {where.label}: {step.error}"
    if step.required:
      need = (f"needs {_gib(step.required)} per device of {_gib(limit)}, the compiler says "
              f"({step.error})")
  else:
    need = (f"needs {_gib(_needed(where, step, n))} per device of {_gib(limit)} "
            f"({where.memory_note})")
  kept = state["params"] + state["opt_state"] + state["ema_params"] + state["batch_stats"]
  consumers = (f"temporaries (activations, gradients) {_gib(step.temporaries)}, parameters + "
               f"optimizer state {_gib(kept)}" if not step.error else
               f"parameters + optimizer state {_gib(kept)} per device")
  return f"does not fit: the {step.name} step {need}; {consumers}; " + \
      "; ".join(advice(config, executor, step, kept, limit)), False


def advice(config, executor, step: StepReport, kept: int, limit: int) -> list[str]:
  """What would make the step fit, biggest consumer first."""
  n = executor.num_devices
  batch = int(config.batch_size if step.name == "train" else config.eval_batch_size)
  helps = []
  key = "batch_size" if step.name == "train" else "eval_batch_size"
  if limit is not None and (step.required or (not step.error and step.temporaries)):
    if step.error:  # the compiler's requirement: everything but the state scales
      variable, total = step.required - kept, step.required
    else:
      variable = step.temporaries + step.queued + max(step.arguments - kept, 0)
      total = step.total
    room = limit - (total - variable)
    fit = int(batch // n * room / variable) if room > 0 and variable > 0 else 0
    fit = fit // 8 * 8 if fit >= 8 else fit
    guess = (f"; about {fit} per device would fit, if activations scale with the batch"
             if 0 < fit < batch // n else "")
    helps.append(f"a smaller {key} (now {batch // n} per device{guess})")
  else:
    helps.append(f"a smaller {key} (now {batch // n} per device)")
  if step.name == "train":
    if config.grad_accum_steps == 1:
      helps.append("grad_accum_steps=K (the same global batch in K micro-batches)")
    fields = {f.name for f in dataclasses.fields(build_model(config))}
    if "remat" in fields and not config.model_kwargs.get("remat", False):
      helps.append("model_kwargs.remat=True (recompute activations in the backward pass)")
  if config.dtype == "float32":
    helps.append("dtype='bfloat16' (half the activation memory)")
  if n > 1 and int(config.mesh.fsdp) == 1 and config.parallel == "mesh":
    helps.append(f"mesh.fsdp={n} (shard parameters and optimizer state over the devices)")
  if config.ema_decay:
    helps.append("ema_decay=0 (no second copy of the parameters)")
  if kept > step.temporaries:  # the state dominates: put the parameter advice first
    helps = helps[1:] + helps[:1]
  return helps


def report_text(run: CompiledRun, own_flops: float | None = None) -> str:
  """The printed report: the run, then one column per compiled step."""
  config, where, executor, steps, state = (run.config, run.target, run.executor, run.steps,
                                           run.state)
  n = executor.num_devices
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(executor.abstract_state.params))
  memory = (f"{_gib(where.memory_bytes)} per device ({where.memory_note})"
            if where.memory_bytes else "unknown")
  if where.shared and where.memory_bytes:
    memory = f"{_gib(where.memory_bytes)} for all {n} devices ({where.memory_note})"
  info = config.data_info
  lines = [
      f"dry run: {config.model} on {config.dataset} ({config.task}, {config.num_classes} "
      f"classes), {config.dtype} compute",
      f"  target    {where.label}: {executor.describe()}"
      f"{' (compile-only devices)' if where.devices is not None else ''}",
      f"  memory    {memory}",
      f"  batch     train {config.batch_size} ({config.batch_size // n} per device), eval "
      f"{config.eval_batch_size}; images {'x'.join(str(d) for d in info.image_shape)}; "
      f"{info.train_examples:,} train examples (described, not loaded)",
      f"  state     {params:,} parameters; per device: "
      + ", ".join(f"{k} {_gib(v)}" for k, v in state.items() if v),
      "",
      f"  {'per device':<22}" + "".join(f"{s.name + ' step':>16}" for s in steps),
  ]
  rows = [("arguments", "arguments"), ("outputs", "outputs"), ("aliased (donated)", "aliased"),
          ("temporaries", "temporaries"), ("code", "code"), ("queued input batches", "queued")]
  for label, attr in rows:
    lines.append(f"  {label:<22}" + "".join(
        f"{'-' if s.error else _gib(getattr(s, attr)):>16}" for s in steps))
  lines.append(f"  {'total':<22}" + "".join(
      f"{(_gib(s.required) if s.required else 'over') if s.error else _gib(s.total):>16}"
      for s in steps))
  lines.append(f"  {'compile time':<22}" + "".join(f"{s.compile_s:>15.1f}s" for s in steps))
  lines.append(f"  {'  (process CPU time)':<22}" + "".join(f"{s.compile_cpu_s:>15.1f}s"
                                                         for s in steps))
  lines.append(f"  {'GFLOP per step':<22}" + "".join(
      f"{s.flops / 1e9 if s.flops else 0:>16.4g}" for s in steps))
  batches = {"train": int(config.batch_size), "eval": int(config.eval_batch_size)}
  lines.append(f"  {'GFLOP per image':<22}" + "".join(
      f"{s.flops * n / batches[s.name] / 1e9 if s.flops else 0:>16.4g}" for s in steps))
  if own_flops:
    lines.append(f"  (the network's own training FLOPs: {own_flops / 1e9:.4g} GFLOP per image; "
                 "XLA counts a scanned layer once and rematerialised work again)")
  for s in steps:
    if s.error:
      lines.append(f"  {s.name} step: the compiler refused it: {s.error}")
    elif s.collectives:
      lines.append(f"  {s.name} collectives: " + ", ".join(
          f"{op} {count} ({_gib(size)})" for op, (count, size) in s.collectives.items()))
    else:
      lines.append(f"  {s.name} collectives: none")
  return "\n".join(lines)


def _gib(size: int | float) -> str:
  if size >= 2**30:
    return f"{size / 2**30:.2f} GiB"
  if size >= 2**20:
    return f"{size / 2**20:.1f} MiB"
  if size >= 2**10:
    return f"{size / 2**10:.1f} KiB"
  return f"{int(size)} B"


def _first_line(error: BaseException) -> str:
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  return lines[0] if lines else type(error).__name__
