"""`python -m train --dry_run`: the run compiled ahead of time, and its verdict.

The default suite compiles LeNet for this machine's (fake CPU) devices through the CLI and
checks the verdict both ways against a memory limit. The TPU compiles (libtpu's compile-only
devices, the `tpu` extra) are marked slow: the notebook's TPU config is compiled for a Colab
v5e-1 and a v2-8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from configs import lenet_digits
from conftest import cached_env, small_config
from train import chips, dry_run, memory_plan

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("compile_cache")


def _cli(cache: str, limit: str, *args: str) -> subprocess.CompletedProcess:
  env = cached_env(cache, devices=2)
  env[dry_run.MEMORY_LIMIT_ENV] = limit
  return subprocess.run(
      [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py", "--dry_run",
       "--config.batch_size=32", "--config.eval_batch_size=32", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _size(text: str) -> float:
  value, unit = text.split()
  return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_cli_dry_run_fits_a_large_limit_and_not_half_of_what_it_needs(compile_cache):
  fits = _cli(compile_cache, "4GiB")
  assert fits.returncode == 0, fits.stderr
  lines = fits.stdout.strip().splitlines()
  assert "target    local: 2 x cpu, jit over a mesh of data=2 x fsdp=1" in fits.stdout
  verdict = re.fullmatch(r"fits: the (train|eval) step needs ([0-9.]+ [KMG]iB) of 4.00 GiB "
                         r"\(memory_limit_bytes\)", lines[-1])
  assert verdict, lines[-1]
  # Both steps compiled; the batch is split over the 2 devices, so the gradients are averaged.
  header = next(ln for ln in lines if ln.strip().startswith("per device"))
  assert header.split()[-4:] == ["train", "step", "eval", "step"]
  totals = re.findall(r"[0-9.]+ [KMG]iB", next(ln for ln in lines if ln.strip().startswith(
      "total")))
  assert len(totals) == 2 and all(_size(t) > 0 for t in totals)
  assert re.search(r"train collectives: all-reduce [1-9]", fits.stdout)
  assert re.search(r"GFLOP per image\s+0\.00[0-9]+", fits.stdout)
  # The two CPU devices share the host's RAM: the verdict is for both of them.
  worst = max(_size(t) for t in totals)
  assert _size(verdict.group(2)) == pytest.approx(2 * worst, rel=0.05)  # sizes as printed

  limit = int(_size(verdict.group(2)) / 2)
  over = _cli(compile_cache, str(limit))
  assert over.returncode == 2, over.stdout + over.stderr
  errors = [ln for ln in over.stderr.splitlines() if ln.strip()]
  assert len(errors) == 1, over.stderr
  assert errors[0].startswith("does not fit: the train step needs "), errors[0]
  for part in ("temporaries", "parameters + optimizer state", "a smaller batch_size (now 16 "
               "per device", "grad_accum_steps=K", "dtype='bfloat16'", "mesh.fsdp=2"):
    assert part in errors[0], (part, errors[0])


def test_a_memory_limit_that_is_not_a_size_is_one_line_naming_the_variable():
  assert dry_run.parse_bytes("2GiB") == 2 * 2**30
  assert dry_run.parse_bytes("1.5 GB") == 1_500_000_000
  assert dry_run.parse_bytes("512mib") == 512 * 2**20
  assert dry_run.parse_bytes("1e6") == 10**6
  for bad in ("", "two GiB", "-1GiB", "0", "3 parsecs", "inf"):
    with pytest.raises(ValueError, match=rf"^{dry_run.MEMORY_LIMIT_ENV}="):
      dry_run.parse_bytes(bad)


@pytest.mark.parametrize("target, message", [
    ("v5e:2x2", "expected tpu:GEN:TOPOLOGY"),
    ("gpu:h100:1", "expected tpu:GEN:TOPOLOGY"),
    ("tpu:v9:2x2", "TPU generation 'v9' is unknown; choose from v2, v3, v4, v5e, v5p, v6e"),
    ("tpu:v4:2x2", "a v4 topology is AxBxC chips"),
    ("tpu:v5e:2x2x1", "a v5e topology is AxB chips"),
    ("tpu:v6e:0x2", "a v6e topology is AxB chips"),
])
def test_bad_targets_are_rejected_before_anything_is_built(target, message):
  config = small_config()
  with pytest.raises(ValueError, match=re.escape(message)):
    dry_run.dry_run(config, target=target)


def test_a_missing_libtpu_is_one_line_with_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(ValueError) as error:
    dry_run.dry_run(small_config(), target="tpu:v5e:1x1")
  assert str(error.value).startswith("--target tpu:v5e:1x1 needs libtpu, which is not installed: "
                                     "pip install 'jaxvision[tpu]'")
  assert "\n" not in str(error.value)


def test_collectives_are_counted_once_per_async_pair_with_their_result_bytes():
  hlo = "\n".join([
      "  %all-reduce-start = (f32[1000]{0}, bf16[10,10]{1,0}) all-reduce-start(%a, %b), "
      "channel_id=1",
      "  %all-reduce-done = (f32[1000]{0}, bf16[10,10]{1,0}) all-reduce-done(%all-reduce-start)",
      "  %ag = (bf16[4,128]{1,0:T(8,128)(2,1)}, bf16[16,128]{1,0:T(8,128)(2,1)}) "
      "all-gather-start(%x), dimensions={0}",
      "  %rs = f32[256]{0} reduce-scatter(%y), dimensions={0}",
      "  ROOT %ar = f32[]{:T(128)} all-reduce(%fusion), channel_id=2",
      "  %fusion.1 = f32[8]{0} fusion(%all-reduce), kind=kLoop",
  ])
  assert dry_run.collectives(hlo) == {"all-reduce": (2, 4000 + 200 + 4),
                                      "all-gather": (1, 16 * 128 * 2),
                                      "reduce-scatter": (1, 1024)}


def test_the_tpu_compilers_out_of_memory_messages_give_the_requirement():
  # The two forms libtpu 0.0.42 writes (sizes in GiB).
  assert dry_run.required_bytes(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
      "hbm. Used 17.77G of 15.75G hbm. Exceeded hbm capacity by 2.02G.") == int(17.77 * 2**30)
  assert dry_run.required_bytes(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (513.00G) exceeds available HBM (7.48G).") == 513 * 2**30
  assert dry_run.required_bytes("INTERNAL: something else") == 0


def test_the_chip_table_matches_device_kinds_most_specific_first():
  assert chips.chip_of("TPU v5 lite").name == "v5e"
  assert chips.chip_of("TPU v5").name == "v5p"
  assert chips.chip_of("TPU v6 lite").name == "v6e"
  assert chips.chip_of("NVIDIA H100 PCIe").name == "h100 pcie"
  assert chips.chip_of("NVIDIA H100 80GB HBM3").name == "h100"
  assert chips.chip_of("cpu") is None
  for chip in chips.CHIPS:
    assert chip.source and chip.peak_bf16_tflops > 0
    if chip.usable_bytes:
      assert 0.9 * chip.memory_bytes < chip.usable_bytes <= chip.memory_bytes
  # v2/v3 devices are TensorCores: half a chip's HBM and peak.
  assert chips.tpu_chip("v3").memory_bytes * 2 == 32 * chips.GiB
  assert chips.tpu_chip("v2").peak_bf16_tflops * 2 == 45.0


# --- TPU targets (libtpu, the `tpu` extra) -------------------------------------------------------

NOTEBOOKS = ("vit_tpu",)  # the notebooks that train on a Colab TPU runtime


def notebook_config(name: str, devices: list):
  """The config a notebook builds on a runtime with `devices`: its Config cell, run as it runs
  there (not in smoke mode)."""
  cells = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
  sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
  source = next(s for s in sources if "config = base.get_config()" in s)
  runtime = types.SimpleNamespace(devices=lambda: devices, device_count=lambda: len(devices))
  namespace = {"jax": runtime, "SMOKE": False}
  exec(compile(source, f"{name}.ipynb", "exec"), namespace)  # noqa: S102 - the notebook's cell
  return namespace["config"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tpu:v5e:1x1", "tpu:v2:2x2"])
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_tpu_configs_fit_colab_tpus(name, target, capsys):
  pytest.importorskip("libtpu", reason="TPU compiles need the 'tpu' extra (libtpu)")
  tfds = pytest.importorskip("tensorflow_datasets")
  generation, topology = dry_run.parse_target(target)
  config = notebook_config(name, dry_run.tpu_devices(generation, topology))
  assert config.dtype == "bfloat16"  # what the notebook picks on a TPU runtime
  # Mocked TFDS: the dataset's description (shapes, classes, split sizes) without the download.
  mock = (tfds.testing.mock_data(num_examples=50_000) if config.dataset.startswith("tfds:")
          else contextlib.nullcontext())
  with mock:
    status = dry_run.dry_run(config, target=target)
  out = capsys.readouterr()
  assert status == 0, out.out + out.err
  assert out.out.strip().splitlines()[-1].startswith("fits: the ")
  assert f"target    {target}:" in out.out


def test_memory_plan_table_reports_only_compiled_bounds():
  point = dict(generation="v5e", limit=16 * 2**30, compile_s=100.0, compile_cpu_s=90.0,
               flops_per_image=11e9, total=15 * 2**30)
  rows = [{"case": "vit_b16", "network_flops": 107e9},
          {**point, "case": "vit_b16", "batch": 184, "fits": True, "flops_per_image": 106e9},
          {**point, "case": "vit_b16 remat+scan", "batch": 640, "fits": True},
          {**point, "case": "vit_b16 remat+scan", "batch": 672, "fits": False},
          {**point, "case": "vit_b16 remat+scan", "generation": "v4", "batch": 1408, "fits": True}]
  lines = memory_plan.table(rows).splitlines()[2:]
  assert lines[0].startswith("| vit_b16 | v5e | 184 fits (larger not compiled) |")
  assert lines[0].endswith("| 0.99 |")
  assert not any(line.startswith("| vit_b16 | v4 |") for line in lines)  # v4 was not searched
  assert "| vit_b16 remat+scan | v5e | 640 (672 does not fit) |" in lines[1]
  assert all(line.endswith("| n/a (scan) |") for line in lines[1:]) and len(lines) == 3


def test_memory_plan_counts_the_products_of_convolutions_and_dots_as_xla_does():
  def conv(x, w):  # strided, padded unevenly, dilated: taps that meet padding do no work
    return jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 2), (0, 1)), rhs_dilation=(2, 1),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def up(x, k):  # the U-Net's 2x2 up-convolution as a product (a 6-D result)
    return jnp.einsum("nhwc,aboc->nhawbo", x, k)

  x, w, k = jnp.ones((2, 17, 13, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones((2, 2, 5, 3))
  for fn, args in ((conv, (x, w)), (up, (x, k))):
    compiled = jax.jit(fn).lower(*args).compile()
    ops = memory_plan.matrix_ops(compiled.as_text())
    assert len(ops) == 1 and ops[0].flops == compiled.cost_analysis()["flops"]
  forward = memory_plan.matrix_ops(jax.jit(conv).lower(x, w).compile().as_text())[0].flops

  # libtpu writes the U-Net's up-convolution as a 6-D convolution whose 2x2 "window" slides
  # over a padded size-1 dim: each output element meets one real tap, so 1024 products.
  tpu = """
  %x = bf16[4,32,32,1024,1,1]{3,2,5,4,1,0:T(8,128)(2,1)} parameter(0)
  %k = bf16[2,2,512,1024,1,1]{3,2,1,0,5,4:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.169 = bf16[4,32,32,2,2,512]{5,2,4,3,1,0:T(8,128)(2,1)} convolution(%x, %k), \
window={size=1x1x2x2 pad=0_0x0_0x1_1x1_1 rhs_reversal=0x0x1x1}, dim_labels=01bf23_23oi01->01b23f
"""
  (op,) = memory_plan.matrix_ops(tpu)
  assert op.flops == 2 * (4 * 32 * 32 * 2 * 2 * 512) * 1024 and op.features == (1024, 512)

  # Both gradients are convolutions over the same products (one with lhs dilation, the
  # strided forward transposed), so each counts what the forward does.
  loss = lambda x, w: jnp.sum(conv(x, w) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  ops = memory_plan.matrix_ops(hlo)
  assert [op.flops for op in ops] == [forward] * 3
  report = memory_plan.ops_report(hlo)
  # XLA:CPU keeps no op name on the kernel's gradient.
  assert "backward 0.0 GFLOP in 1 ops, forward 0.0 GFLOP in 1 ops, unnamed 0.0 GFLOP in 1 ops" \
      in report and "(forward): 3 -> 8, [2, 8, 6, 8]" in report
  assert memory_plan._layer("jit(train_step)/transpose(jvp(UNet))/up3/conv/"
                            "nhwc,aboc->nhawbo/dot_general") == ("up3/conv", "backward")


def test_memory_plan_sets_each_compiled_layer_against_the_networks_own():
  def lenet():
    config = lenet_digits.get_config()
    config.mesh.num_devices = 1
    return config

  config = lenet()
  config.batch_size = config.eval_batch_size = 8
  hlo = dry_run.compile_run(config, evaluate=False).compiled["train"].as_text()
  network = memory_plan.network_layer_flops(memory_plan.Case("lenet", lenet, 8), 8)
  assert set(network) == {"conv1", "conv2", "fc1", "fc2", "head"}, network
  report = memory_plan.ops_report(hlo, network=network).splitlines()
  # XLA:CPU computes on the real shapes: every forward layer does the network's own work.
  assert report[2] == f"forward: 1.000x the network's {sum(network.values()) / 1e9:.1f} GFLOP"
  forward = [line for line in report if "(forward)" in line]
  assert len(forward) == 5 and all(line.endswith("; 1.000x the network's") for line in forward)
