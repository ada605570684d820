"""python -m train.bench_torch: the PyTorch side of train.bench (same model, batch, optimizer).

    python -m train.bench_torch --model resnet50 --batch-size 256 --dtype bfloat16 --compile on

Models come from torchvision (CNNs) and timm (ViT) where they import; LeNet, U-Net, the `*_tiny`
test variants, and every ResNet when torchvision is missing use the plain PyTorch definitions
below, with the same layer shapes as jaxvision's. The PyTorch recipe is the usual fast one:
channels_last, bf16 autocast with float32 parameters, cudnn.benchmark, and `torch.compile` on
CUDA (eager on CPU by default, where compilation is slow; the JSON says which ran). Prints one
JSON line with train.bench's RESULT_KEYS. `compile_s` is the first step's extra time over a
steady step under torch.compile (compilation is lazy there), null in eager mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from train.bench_common import (
    OPTIMIZERS,
    Prepared,
    device_label,
    measure,
    mfu,
    peak_flops,
    result_row,
)
from train.model_kwargs import parse_model_kwargs

# Keyword arguments that change how JAX computes, not the network: the PyTorch side ignores them.
JAX_ONLY_KWARGS = frozenset({"remat", "scan", "attention_impl", "param_dtype"})

# name -> (blocks per stage, block, groups, width_per_group, stage widths)
RESNETS = {
    "resnet18": ((2, 2, 2, 2), "basic", 1, 64, (64, 128, 256, 512)),
    "resnet34": ((3, 4, 6, 3), "basic", 1, 64, (64, 128, 256, 512)),
    "resnet50": ((3, 4, 6, 3), "bottleneck", 1, 64, (64, 128, 256, 512)),
    "resnet101": ((3, 4, 23, 3), "bottleneck", 1, 64, (64, 128, 256, 512)),
    "resnet152": ((3, 8, 36, 3), "bottleneck", 1, 64, (64, 128, 256, 512)),
    "resnext50_32x4d": ((3, 4, 6, 3), "bottleneck", 32, 4, (64, 128, 256, 512)),
    "wide_resnet50_2": ((3, 4, 6, 3), "bottleneck", 1, 128, (64, 128, 256, 512)),
    "resnet_tiny": ((1, 1, 1, 1), "basic", 1, 64, (8, 16, 32, 64)),
    "resnext_tiny": ((1, 1, 1, 1), "bottleneck", 2, 32, (8, 16, 32, 64)),
}
# jaxvision U-Net presets (jaxvision/models/unet.py): depth, width, padding, batch_norm.
UNETS = {
    "unet": dict(depth=4, width=64, padding="valid", batch_norm=False),
    "unet_small": dict(depth=4, width=16, padding="same", batch_norm=True),
    "unet_tiny": dict(depth=2, width=4, padding="same", batch_norm=True),
}
TIMM_VITS = {
    "vit_ti16": "vit_tiny_patch16_224", "vit_s16": "vit_small_patch16_224",
    "vit_s8": "vit_small_patch8_224", "vit_b16": "vit_base_patch16_224",
    "vit_b32": "vit_base_patch32_224", "vit_b8": "vit_base_patch8_224",
    "vit_l16": "vit_large_patch16_224", "vit_l32": "vit_large_patch32_224",
    "vit_h14": "vit_huge_patch14_224",
}
TORCHVISION_ONLY = ("alexnet", "vgg", "googlenet", "densenet")


def _modules():
  """The plain PyTorch definitions (built on first use: torch is an optional dependency)."""
  import torch
  from torch import nn

  class LeNet(nn.Module):
    """LeNet-5 as jaxvision's: 5x5 convs (pad 2 on the first), sigmoid, 2x2 average pools."""

    def __init__(self, num_classes, in_chans, image_size, activation="sigmoid", pool="avg"):
      super().__init__()
      act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}[activation]
      pool_cls = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool]
      side = (image_size // 2 - 4) // 2
      self.features = nn.Sequential(
          nn.Conv2d(in_chans, 6, 5, padding=2), act(), pool_cls(2, 2),
          nn.Conv2d(6, 16, 5), act(), pool_cls(2, 2))
      self.classifier = nn.Sequential(
          nn.Flatten(), nn.Linear(16 * side * side, 120), act(), nn.Linear(120, 84), act(),
          nn.Linear(84, num_classes))

    def forward(self, x):
      return self.classifier(self.features(x))

  def conv_bn(cin, cout, kernel, stride=1, groups=1):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]

  class Block(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, strided grouped 3x3, 1x1 x4) residual block (v1.5)."""

    def __init__(self, kind, cin, planes, stride, groups, width_per_group):
      super().__init__()
      if kind == "basic":
        out = planes
        layers = [*conv_bn(cin, planes, 3, stride), nn.ReLU(), *conv_bn(planes, planes, 3)]
      else:
        out, width = planes * 4, int(planes * width_per_group / 64) * groups
        layers = [*conv_bn(cin, width, 1), nn.ReLU(), *conv_bn(width, width, 3, stride, groups),
                  nn.ReLU(), *conv_bn(width, out, 1)]
      self.body = nn.Sequential(*layers)
      self.shortcut = (nn.Sequential(*conv_bn(cin, out, 1, stride))
                       if stride != 1 or cin != out else nn.Identity())
      self.out = out

    def forward(self, x):
      return torch.relu(self.body(x) + self.shortcut(x))

  class ResNet(nn.Module):
    """ResNet / ResNeXt / Wide ResNet with the 'imagenet' (7x7/2 + pool) or 'small' (3x3/1) stem."""

    def __init__(self, layers, block, groups, width_per_group, widths, num_classes, in_chans,
                 stem="imagenet"):
      super().__init__()
      k, s = (7, 2) if stem == "imagenet" else (3, 1)
      stem_layers = [nn.Conv2d(in_chans, widths[0], k, s, k // 2, bias=False),
                     nn.BatchNorm2d(widths[0]), nn.ReLU()]
      if stem == "imagenet":
        stem_layers.append(nn.MaxPool2d(3, 2, 1))
      blocks, cin = [], widths[0]
      for stage, (planes, depth) in enumerate(zip(widths, layers, strict=True)):
        for i in range(depth):
          blocks.append(Block(block, cin, planes, 2 if stage and not i else 1, groups,
                              width_per_group))
          cin = blocks[-1].out
      self.body = nn.Sequential(*stem_layers, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
      self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
      return self.head(self.body(x))

  class UNet(nn.Module):
    """jaxvision's U-Net: double 3x3 convs, 2x2 pools, 2x2 up-convs, copy-and-crop, 1x1 head."""

    def __init__(self, num_classes, in_chans, depth, width, padding, batch_norm,
                 upsample="transpose"):
      super().__init__()
      pad = 1 if padding == "same" else 0

      def double(cin, cout):
        layers = []
        for c in (cin, cout):
          layers += [nn.Conv2d(c, cout, 3, padding=pad, bias=not batch_norm)]
          layers += [nn.BatchNorm2d(cout)] if batch_norm else []
          layers += [nn.ReLU()]
        return nn.Sequential(*layers)

      def up(cin, cout):
        if upsample == "transpose":
          return nn.ConvTranspose2d(cin, cout, 2, 2)
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"),
                             nn.Conv2d(cin, cout, 3, padding=1))

      widths = [width * 2**level for level in range(depth + 1)]
      self.enc = nn.ModuleList(double(in_chans if i == 0 else widths[i - 1], widths[i])
                               for i in range(depth))
      self.bottleneck = double(widths[depth - 1], widths[depth])
      self.up = nn.ModuleList(up(widths[i + 1], widths[i]) for i in range(depth))
      self.dec = nn.ModuleList(double(2 * widths[i], widths[i]) for i in range(depth))
      self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
      skips = []
      for enc in self.enc:
        x = enc(x)
        skips.append(x)
        x = torch.nn.functional.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for level in reversed(range(len(self.enc))):
        x = self.up[level](x)
        skip = skips[level]
        top, left = (skip.shape[2] - x.shape[2]) // 2, (skip.shape[3] - x.shape[3]) // 2
        x = torch.cat([skip[:, :, top:top + x.shape[2], left:left + x.shape[3]], x], 1)
        x = self.dec[level](x)
      return self.head(x)

  return LeNet, ResNet, UNet


def _take(kwargs: dict, allowed: Sequence[str], name: str) -> dict:
  """The kwargs the PyTorch builder of `name` understands; JAX-only ones dropped, others refused."""
  unknown = sorted(set(kwargs) - set(allowed) - JAX_ONLY_KWARGS)
  if unknown:
    raise ValueError(f"--model-kwargs {', '.join(unknown)} not supported by the PyTorch side of "
                     f"{name!r} (it takes {', '.join(allowed) or 'none'})")
  return {k: v for k, v in kwargs.items() if k in allowed}


def build_model(name: str, *, num_classes: int, in_chans: int, image_size: int, kwargs: dict):
  """The PyTorch network for registry name `name`, and where it came from."""
  LeNet, ResNet, UNet = _modules()
  if name == "lenet":
    kw = _take(kwargs, ("activation", "pool"), name)
    return LeNet(num_classes, in_chans, image_size, **kw), "plain"
  if name in UNETS:
    kw = _take(kwargs, ("depth", "width", "padding", "batch_norm", "upsample"), name)
    return UNet(num_classes, in_chans, **{**UNETS[name], **kw}), "plain"
  if name in TIMM_VITS:
    kw = _take(kwargs, ("image_size", "drop_path", "qkv_bias", "dropout"), name)
    try:
      import timm
    except ImportError:
      raise ValueError(f"the PyTorch side of {name!r} needs timm (pip install timm)") from None
    return timm.create_model(
        TIMM_VITS[name], pretrained=False, num_classes=num_classes, in_chans=in_chans,
        img_size=kw.get("image_size", image_size), drop_path_rate=kw.get("drop_path", 0.0),
        qkv_bias=kw.get("qkv_bias", True), drop_rate=kw.get("dropout", 0.0)), "timm"
  if name in RESNETS:
    layers, block, groups, wpg, widths = RESNETS[name]
    kw = _take(kwargs, ("stem", "widths", "zero_init_residual"), name)
    torchvision = _torchvision()
    if torchvision is not None and hasattr(torchvision.models, name) and "widths" not in kw:
      model = getattr(torchvision.models, name)(
          num_classes=num_classes, zero_init_residual=kw.get("zero_init_residual", False))
      if kw.get("stem", "imagenet") == "small" or in_chans != 3:
        from torch import nn

        k, s = (3, 1) if kw.get("stem") == "small" else (7, 2)
        model.conv1 = nn.Conv2d(in_chans, 64, k, s, k // 2, bias=False)
        if kw.get("stem") == "small":
          model.maxpool = nn.Identity()
      return model, "torchvision"
    return ResNet(layers, block, groups, wpg, tuple(kw.get("widths", widths)), num_classes,
                  in_chans, stem=kw.get("stem", "imagenet")), "plain"
  if name.startswith(TORCHVISION_ONLY):
    torchvision = _torchvision()
    if torchvision is None or not hasattr(torchvision.models, name):
      raise ValueError(f"the PyTorch side of {name!r} needs torchvision with that model "
                       "(pip install torchvision)")
    _take(kwargs, (), name)
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(num_classes=num_classes, **extra), "torchvision"
  raise ValueError(f"model {name!r} has no PyTorch counterpart in train.bench_torch")


def _torchvision():
  try:
    import torchvision
  except ImportError:  # the plain definitions stand in
    return None
  return torchvision


def _optimizer(name: str, params, lr: float):
  import torch

  if name == "momentum":
    return torch.optim.SGD(params, lr=lr, momentum=0.9)
  if name == "sgd":
    return torch.optim.SGD(params, lr=lr)
  return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)  # optax's defaults


def prepare(args: argparse.Namespace) -> Prepared:
  """Builds the PyTorch train step (or forward pass) and runs its first (compiling) step."""
  import torch

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  compiled = args.compile == "on" or (args.compile == "auto" and cuda)
  channels_last = args.channels_last == "on"
  if cuda:
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    # JAX's default float32 matmul precision on GPU uses TF32; match it.
    torch.set_float32_matmul_precision("high")
  torch.manual_seed(0)
  model, source = build_model(
      args.model, num_classes=args.num_classes, in_chans=args.in_chans,
      image_size=args.image_size, kwargs=parse_model_kwargs(args.model_kwargs))
  model = model.to(device)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  b, s = args.batch_size, args.image_size
  x = torch.randn(b, args.in_chans, s, s, device=device).contiguous(memory_format=memory_format)
  segmentation = args.model in UNETS
  y = torch.randint(0, args.num_classes, (b, s, s) if segmentation else (b,), device=device)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  forward = torch.compile(model) if compiled else model

  def loss_fn(logits):
    target = y
    if segmentation:  # the 'valid' U-Net's smaller output meets the center of the label map
      h, w = logits.shape[2:]
      top, left = (s - h) // 2, (s - w) // 2
      target = y[:, top:top + h, left:left + w]
    return torch.nn.functional.cross_entropy(logits.float(), target)

  if args.mode == "train":
    model.train()
    opt = _optimizer(args.optimizer, model.parameters(), args.learning_rate)

    def make_step(fn):
      def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
          logits = fn(x)
        loss_fn(logits).backward()
        opt.step()
      return step
  else:
    model.eval()

    def make_step(fn):
      def step():
        with torch.inference_mode(), autocast():
          fn(x)
      return step

  step = make_step(forward)
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def window(n: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(n):
      step()
    sync()
    return time.perf_counter() - start

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  first_s = window(1)  # includes compilation under torch.compile

  def finish(step_s: float) -> dict:
    return _row(args, step_s, first_s, compiled, channels_last, source, make_step(model))

  return Prepared("torch-compile" if compiled else "torch-eager", window, finish)


def _row(args, step_s: float, first_s: float, compiled: bool, channels_last: bool, source: str,
         eager_step) -> dict:
  import torch

  cuda = torch.cuda.is_available()
  b = args.batch_size
  peak_mem = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
  kind = torch.cuda.get_device_name() if cuda else "cpu"
  peak = peak_flops(kind)
  # FLOPs are counted on the eager model: the counter does not see inside compiled graphs.
  flops = _count_flops(eager_step) if peak else None
  print(f"# torch {args.model} {args.mode}: model from {source}, "
        f"{'torch.compile' if compiled else 'eager'}, channels_last={channels_last}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}", file=sys.stderr)
  return result_row(
      model=args.model, framework="torch-compile" if compiled else "torch-eager", mode=args.mode,
      batch_size=b, dtype=args.dtype, images_per_sec=b / step_s, step_ms=1000.0 * step_s,
      mfu=mfu(flops, step_s, peak), compile_s=max(first_s - step_s, 0.0) if compiled else None,
      peak_mem_gb=peak_mem, device=device_label(kind),
  )


def _count_flops(step) -> float | None:
  """FLOPs of one eager step (matmuls and convolutions, forward and backward)."""
  from torch.utils.flop_counter import FlopCounterMode

  counter = FlopCounterMode(display=False)
  with counter:
    step()
  return float(counter.get_total_flops()) or None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Flags mirroring train.bench's; sizes default to the jaxvision registry's."""
  p = argparse.ArgumentParser(
      prog="python -m train.bench_torch",
      description="The PyTorch side of train.bench: one JSON line with the same keys.")
  p.add_argument("--model", required=True, help="jaxvision registry name")
  p.add_argument("--batch-size", type=int, required=True)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--mode", choices=("train", "infer"), default="train")
  p.add_argument("--steps", type=int, default=10, help="timed steps per window")
  p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--image-size", type=int, default=0, help="default: the registry's")
  p.add_argument("--in-chans", type=int, default=0, help="default: the registry's")
  p.add_argument("--num-classes", type=int, default=0, help="default: the registry's")
  p.add_argument("--model-kwargs", default="")
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum")
  p.add_argument("--learning-rate", type=float, default=0.01)
  p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                 help="torch.compile: auto = on CUDA, eager on CPU")
  p.add_argument("--channels-last", choices=("on", "off"), default="on")
  args = p.parse_args(argv)
  if args.batch_size < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
    p.error("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
  if not (args.image_size and args.in_chans and args.num_classes):
    # Only here: the PyTorch side may run in an environment without JAX (--torch-python).
    from jaxvision.models import model_info

    try:
      info = model_info(args.model)
    except ValueError as e:
      p.error(str(e))
    args.image_size = args.image_size or info.input_shape[0]
    args.in_chans = args.in_chans or info.input_shape[2]
    args.num_classes = args.num_classes or info.num_classes
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the PyTorch benchmark and prints its JSON line; a bad argument ends with one line."""
  import json

  args = parse_args(argv)
  try:
    (row,) = measure([prepare(args)], steps=args.steps, repeats=args.repeats, warmup=args.warmup)
  except ValueError as e:
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
