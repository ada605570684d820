"""What the JAX and the PyTorch benchmarks share (standard library only, so the PyTorch side
imports without JAX): the result row, the device's peak, MFU and the timing windows."""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

# Dense bf16 peak per device, matched by substring of the lowercased device kind (first match
# wins). MFU is always taken against this bf16 peak, float32 runs included, so MFU figures of
# both dtypes share one ceiling. The table, with its sources, is train/chips.py.
from train.chips import PEAK_BF16_TFLOPS

RESULT_KEYS = ("model", "framework", "mode", "batch_size", "dtype", "images_per_sec", "step_ms",
               "mfu", "compile_s", "peak_mem_gb", "device")
OPTIMIZERS = ("momentum", "sgd", "adam")


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of `device_kind`, or None when unknown (CPUs)."""
  kind = device_kind.lower()
  for key, tflops in PEAK_BF16_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


def cpu_cores() -> int:
  """CPU cores this process may use (the affinity mask, not the host's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def device_label(kind: str, count: int = 1) -> str:
  """The JSON `device` field: the device kind, the count when > 1, the cores on a CPU."""
  label = kind if count == 1 else f"{kind} x{count}"
  if kind.lower() == "cpu":
    cores = cpu_cores()
    label += f" ({cores} core{'s' if cores > 1 else ''})"
  return label


def mfu(flops_per_step: float | None, step_s: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation, or None when either the FLOPs or the peak is unknown."""
  if not flops_per_step or not peak or step_s <= 0:
    return None
  return flops_per_step / step_s / peak


def result_row(**fields) -> dict:
  """A measurement with exactly RESULT_KEYS, in that order; a missing or extra key is a bug."""
  if set(fields) != set(RESULT_KEYS):
    raise KeyError(f"result keys {sorted(fields)} differ from {RESULT_KEYS}")
  return {k: fields[k] for k in RESULT_KEYS}


@dataclasses.dataclass
class Prepared:
  """A compiled, warmed-up-able benchmark of one framework.

  Attributes:
    name: the framework, for the notes on stderr.
    window: runs n steps and returns their wall time in seconds, blocking until they are done.
    finish: the result row for a measured step time in seconds.
  """

  name: str
  window: Callable[[int], float]
  finish: Callable[[float], dict]


def measure(prepared: Sequence[Prepared], *, steps: int, repeats: int, warmup: int) -> list[dict]:
  """Warm-up, then `repeats` rounds in which every benchmark times one window of `steps` steps.

  With two benchmarks the windows alternate (A, B, A, B, ...), so a load that comes and goes on
  a shared host slows both alike and the ratio stays meaningful. Each reports its median window.
  """
  if warmup:
    for p in prepared:
      p.window(warmup)
  times: list[list[float]] = [[] for _ in prepared]
  cpu_times: list[list[float]] = [[] for _ in prepared]
  for _ in range(repeats):
    for p, t, c in zip(prepared, times, cpu_times, strict=True):
      cpu_start = time.process_time()
      t.append(p.window(steps) / steps)
      c.append((time.process_time() - cpu_start) / steps)
  for p, t, c in zip(prepared, times, cpu_times, strict=True):
    # CPU time of the whole process (all threads): on a host shared with other jobs it is the
    # steadier measure of the work a CPU step needs; wall time is what the JSON reports.
    print(f"# {p.name}: step wall ms {[round(1000 * x, 1) for x in t]}, process CPU ms "
          f"{[round(1000 * x, 1) for x in c]}", file=sys.stderr)
  return [p.finish(statistics.median(t)) for p, t in zip(prepared, times, strict=True)]
