"""The accelerators the trainer plans for: memory per device and dense bf16 peak, with sources.

One table serves the dry run's "fits" verdict (`python -m train --dry_run`) and the benchmarks'
MFU (`train.bench`). Figures are per JAX device: on TPU v2 and v3 each of a chip's two
TensorCores is its own device with its own half of the chip's HBM; on v4 and v5p the two
TensorCores of a chip form one "megacore" device; v5e and v6e chips have one TensorCore.

Standard library only: the PyTorch side of the benchmark imports this without JAX.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator as the trainer sees it.

  Attributes:
    name: short name ('v5e', 'h100').
    device_kinds: lowercased substrings of `jax.Device.device_kind` that identify it; the
      table is searched in order and the first match wins, so specific names come first.
    memory_bytes: HBM per JAX device, or None where the kind does not tell (A100 40/80 GB:
      the dry run then asks the device's allocator).
    usable_bytes: the part of `memory_bytes` a TPU program may use: the "available HBM" that
      libtpu's compiler (0.0.42.1) reports when a program does not fit; the runtime keeps the
      rest. None where unmeasured (GPUs: the allocator's own limit is read from the device).
    peak_bf16_tflops: dense (no sparsity) bf16 matrix peak per JAX device, in TFLOP/s.
    devices_per_chip: JAX devices per chip (2 on TPU v2/v3: one per TensorCore).
    source: where the figures come from.
  """

  name: str
  device_kinds: tuple[str, ...]
  memory_bytes: int | None
  usable_bytes: int | None
  peak_bf16_tflops: float
  devices_per_chip: int
  source: str


_TPU_DOCS = "https://cloud.google.com/tpu/docs/"


def _gib(x: float) -> int:
  return int(x * GiB)


CHIPS: tuple[Chip, ...] = (
    # The spec sheet's dense bf16 figure is 756 (1,513 with sparsity).
    Chip("h100 pcie", ("h100 pcie",), 80 * GB, None, 756.0, 1,
         "NVIDIA H100 datasheet, https://www.nvidia.com/en-us/data-center/h100/"),
    # H100 SXM: 989 on the spec sheet (1,979 with sparsity), but dense bf16 GEMMs measure ~800
    # (power/clock limited); MFU is taken against that measured peak. The H200 is the same
    # GH100 compute die with 141 GB of HBM3e.
    Chip("h100", ("h100",), 80 * GB, None, 800.0, 1,
         "NVIDIA H100 datasheet, https://www.nvidia.com/en-us/data-center/h100/ (989 dense "
         "bf16 on the sheet; 800 as measured on dense GEMMs)"),
    Chip("h200", ("h200",), 141 * GB, None, 800.0, 1,
         "NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/ (989 dense "
         "bf16 on the sheet, as the H100; 800 as measured on dense GEMMs)"),
    # 40 GB and 80 GB boards share the device kind's prefix; the memory comes from the device.
    Chip("a100", ("a100",), None, None, 312.0, 1,
         "NVIDIA A100 datasheet, https://www.nvidia.com/en-us/data-center/a100/"),
    # v2/v3: the docs give HBM and peak per chip; a JAX device is one of its two TensorCores.
    Chip("v2", ("tpu v2",), 8 * GiB, _gib(7.48), 22.5, 2,
         _TPU_DOCS + "v2 (per chip: 45 TFLOP/s bf16, 16 GiB HBM2; 2 TensorCores)"),
    Chip("v3", ("tpu v3",), 16 * GiB, _gib(15.48), 61.5, 2,
         _TPU_DOCS + "v3 (per chip: 123 TFLOP/s bf16, 32 GiB HBM2; 2 TensorCores)"),
    Chip("v4", ("tpu v4",), 32 * GiB, _gib(30.75), 275.0, 1,
         _TPU_DOCS + "v4 (per chip: 275 TFLOP/s bf16, 32 GiB HBM2; one megacore device)"),
    # The device kinds are JAX's: 'TPU v5 lite' (v5e), 'TPU v5' (v5p), 'TPU v6 lite' (v6e).
    Chip("v5e", ("tpu v5 lite", "tpu v5e"), 16 * GiB, _gib(15.75), 197.0, 1,
         _TPU_DOCS + "v5e (per chip: 197 TFLOP/s bf16, 16 GB HBM2)"),
    Chip("v5p", ("tpu v5p", "tpu v5"), 96 * GiB, _gib(95.74), 459.0, 1,
         _TPU_DOCS + "v5p (per chip: 459 TFLOP/s bf16, '95 GB' HBM2e; one megacore "
         "device; libtpu's compiler makes 95.74 GiB of it available, so 96 GiB)"),
    Chip("v6e", ("tpu v6 lite", "tpu v6e"), 32 * GiB, _gib(31.25), 918.0, 1,
         _TPU_DOCS + "v6e (per chip: 918 TFLOP/s bf16, 32 GB HBM)"),
    # CPUs: no entry. The peak depends on the SIMD units, cores and clocks of the host, which
    # the device kind ('cpu') does not tell; MFU is then null.
)

# TPU generations as `--target tpu:GEN:TOPOLOGY` names them.
TPU_GENERATIONS = ("v2", "v3", "v4", "v5e", "v5p", "v6e")


def chip_of(device_kind: str) -> Chip | None:
  """The table's entry for a `jax.Device.device_kind`, or None (CPUs, unknown kinds)."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(key in kind for key in chip.device_kinds):
      return chip
  return None


def tpu_chip(generation: str) -> Chip:
  """The entry of TPU generation `generation` ('v5e', ...)."""
  if generation not in TPU_GENERATIONS:
    raise ValueError(f"TPU generation {generation!r} is unknown; choose from "
                     f"{', '.join(TPU_GENERATIONS)}")
  return next(chip for chip in CHIPS if chip.name == generation)


# (device-kind substring, dense bf16 TFLOP/s per device), in match order: the benchmarks' MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = tuple(
    (key, chip.peak_bf16_tflops) for chip in CHIPS for key in chip.device_kinds)
