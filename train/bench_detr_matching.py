"""python -m train.bench_detr_matching: DETR's train step with the Hungarian matching on device
(`jaxvision.detection.hungarian`, the library's) against the reference's way, scipy's
`linear_sum_assignment` on the host through `jax.pure_callback`.

    python -m train.bench_detr_matching --model detr_resnet50 --batch-size 8 --image-size 128

Both variants run the same jitted step (forward, DETR's set loss with its auxiliary layers,
gradient, Adam update) on one synthetic batch with up to `--max-boxes` padded boxes per image;
only the matcher differs: the host variant computes the same [G, Q] costs on the device, copies
them to the host, solves every image of every decoder layer with scipy, and copies the
assignment back (what DETR and transformers do every step). A `loss` row times the set loss
and its gradient alone on fixed outputs, where the matching is most of the work. The two
variants must give the same loss; compile time is `lower(...).compile()`, the step time the
median of `--windows` windows of `--steps` steps, the two variants' windows alternating.

Output: one JSON object per measurement with the keys of `train.bench_common.result_row` (the
other benchmarks' rows; `framework` is 'jax-device-matching' or 'jax-host-matching', `mode`
'train' or 'loss'), then a last line with the host / device step-time ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from jaxvision.detection.detr_loss import detr_loss
from jaxvision.detection.hungarian import detr_cost
from jaxvision.models import create_model
from train.bench_common import device_label, result_row

MATCHERS = ("device", "host")


def _solve_on_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """scipy's assignment of every [G, Q] matrix of cost [..., G, Q] (padded rows: -1)."""
  cost, valid = np.asarray(cost), np.asarray(valid)
  flat_cost = cost.reshape(-1, *cost.shape[-2:])
  flat_valid = np.broadcast_to(valid, cost.shape[:-1]).reshape(-1, cost.shape[-2])
  out = np.full(flat_valid.shape, -1, np.int32)
  for i, (c, v) in enumerate(zip(flat_cost, flat_valid, strict=True)):
    rows = np.flatnonzero(v)
    if rows.size:
      r, cols = scipy.optimize.linear_sum_assignment(c[rows])
      out[i, rows[r]] = cols
  return out.reshape(cost.shape[:-1])


def host_match(pred_logits, pred_boxes, gt_classes, gt_boxes, gt_valid, *, class_weight=1.0,
               l1_weight=5.0, giou_weight=2.0):
  """`hungarian.detr_match`'s interface, solved by scipy on the host (DETR's reference way)."""
  pred_logits, pred_boxes, gt_boxes = jax.lax.stop_gradient((pred_logits, pred_boxes, gt_boxes))
  cost = jax.vmap(lambda lg, bx, c, g: detr_cost(lg, bx, c, g, class_weight=class_weight,
                                                 l1_weight=l1_weight, giou_weight=giou_weight))(
      pred_logits, pred_boxes, gt_classes, gt_boxes)
  cost = jnp.where(gt_valid[..., None], cost, 0.0)
  shape = jax.ShapeDtypeStruct(gt_valid.shape, jnp.int32)
  # One host call for all decoder layers: vmap hands the callback the stacked matrices.
  return jax.pure_callback(_solve_on_host, shape, cost, gt_valid, vmap_method="expand_dims")


def synthetic_batch(batch: int, size: int, max_boxes: int, num_classes: int, seed: int = 0):
  """Images and 1 .. max_boxes padded xyxy pixel boxes per image."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  counts = rng.integers(1, max_boxes + 1, batch)
  valid = np.arange(max_boxes)[None] < counts[:, None]
  x1, y1 = rng.uniform(0, 0.7 * size, (2, batch, max_boxes))
  side = rng.uniform(0.1 * size, 0.3 * size, (2, batch, max_boxes))
  boxes = np.stack([x1, y1, x1 + side[0], y1 + side[1]], -1).astype(np.float32)
  classes = rng.integers(0, num_classes, (batch, max_boxes)).astype(np.int32)
  return images, np.where(valid[..., None], boxes, 0).astype(np.float32), classes, valid


def _window(fn, args, steps: int) -> float:
  """Seconds per call over one window of `steps` calls."""
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def _steps(model, images, boxes, classes, valid, frozen, optimizer):
  """The train step and the loss step of each matcher (plain functions, not yet jitted)."""
  hw = images.shape[1:3]
  steps = {}
  for name in MATCHERS:
    kw = {"matcher": host_match} if name == "host" else {}

    def train_step(params, opt_state, step, kw=kw):
      def loss_fn(p):
        out = model.apply({"params": p, "batch_stats": frozen}, images, train=True,
                          rngs={"dropout": jax.random.fold_in(jax.random.key(1), step)})
        return detr_loss(out, boxes, classes, valid, hw, **kw)[0]

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    def loss_step(outputs, kw=kw):
      return jax.value_and_grad(lambda o: detr_loss(o, boxes, classes, valid, hw, **kw)[0])(
          outputs)

    steps[("train", name)], steps[("loss", name)] = train_step, loss_step
  return steps


def bench(args: argparse.Namespace) -> list[dict]:
  """The train and loss rows of both matchers; their timed windows alternate, so load from
  other processes hits both alike."""
  model = create_model(args.model, num_classes=args.num_classes)
  images, boxes, classes, valid = synthetic_batch(args.batch_size, args.image_size,
                                                  args.max_boxes, args.num_classes)
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images[:1])
  params, frozen = variables["params"], variables["batch_stats"]
  optimizer = optax.adam(1e-4)
  opt_state = jax.jit(optimizer.init)(params)
  outputs = jax.jit(model.apply)(variables, images)
  device = device_label(jax.devices()[0].device_kind)
  inputs = {"train": (params, opt_state, 0), "loss": (outputs,)}
  rows = []
  steps = _steps(model, images, boxes, classes, valid, frozen, optimizer)
  for mode in ("train", "loss"):
    compiled, compile_s, losses = {}, {}, {}
    for name in MATCHERS:
      start = time.perf_counter()
      compiled[name] = jax.jit(steps[(mode, name)]).lower(*inputs[mode]).compile()
      compile_s[name] = time.perf_counter() - start
      value = jax.block_until_ready(compiled[name](*inputs[mode]))  # also the warm-up
      losses[name] = float(value[-1] if mode == "train" else value[0])
    a, b = losses["device"], losses["host"]
    if abs(a - b) > 1e-4 * max(1.0, abs(a)):
      raise RuntimeError(f"{mode}: device matching gives loss {a}, host matching {b}")
    times = {name: [] for name in MATCHERS}
    for _ in range(args.windows):
      for name in MATCHERS:
        times[name].append(_window(compiled[name], inputs[mode], args.steps))
    for name in MATCHERS:
      step_s = float(np.median(times[name]))
      rows.append(result_row(model=args.model, framework=f"jax-{name}-matching", mode=mode,
                             batch_size=args.batch_size, dtype="float32",
                             images_per_sec=args.batch_size / step_s, step_ms=1e3 * step_s,
                             mfu=None, compile_s=compile_s[name], peak_mem_gb=None,
                             device=device))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line; bad values end with one line and exit status 2."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="detr_resnet50", help="a detr* registry name")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--image-size", type=int, default=128, help="square input side in pixels")
  p.add_argument("--num-classes", type=int, default=91)
  p.add_argument("--max-boxes", type=int, default=20, help="padded ground-truth boxes per image")
  p.add_argument("--steps", type=int, default=3, help="steps per timed window")
  p.add_argument("--windows", type=int, default=3, help="timed windows (the median is kept)")
  args = p.parse_args(argv)
  if not args.model.startswith("detr"):
    p.error(f"--model {args.model!r}: choose a detr* model")
  for key in ("batch_size", "image_size", "num_classes", "max_boxes", "steps", "windows"):
    if getattr(args, key) < 1:
      p.error(f"--{key.replace('_', '-')} must be at least 1")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs both variants and prints the rows and the host / device ratios."""
  rows = bench(parse_args(argv))
  by = {(r["mode"], r["framework"]): r["step_ms"] for r in rows}
  print(json.dumps({f"ratio_host_over_device_{mode}": by[(mode, "jax-host-matching")] /
                    by[(mode, "jax-device-matching")] for mode in ("train", "loss")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
