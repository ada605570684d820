"""python -m train.viz KIND --workdir DIR [options]: figures of a trained run, as PNG files.

KIND is one of
  gradcam       Grad-CAM heat maps over eval images (CNNs; --layer picks the layer)
  attention     a ViT's class-token attention, one table of blocks x heads per eval image
  rollout       a ViT's attention rollout over eval images
  posemb        a ViT's position-embedding cosine similarities (no data needed)
  confusion     confusion matrix with per-class precision and recall over the eval split
  curves        training curves from WORKDIR/metrics.jsonl (no checkpoint needed)
  segmentation  image | mask | prediction | errors for eval images of a segmentation run
  masks         a mask-transformer Segmenter (segmenter_mask_*) over training-size crops of
                eval images: each class embedding's attention over the patches, and each
                patch's similarity with each class embedding (two PNGs)
  boxes         eval images of a detection run with its detections (class name, score; instance
                masks filled in for Mask R-CNN) and the ground truth (white), one PNG each
                (--min-score hides weaker detections)
  captions      eval images of a captioning run with the generated caption and, per word, its
                cross-attention over the image patches, one PNG each

The run is rebuilt from WORKDIR/config.json and its latest checkpoint (or --step); the data is
the run's eval split (or --split). Figures go to --out (default WORKDIR/viz) and their paths are
printed. Matplotlib is needed: pip install 'jaxvision[viz]'.

    python -m train.viz curves --workdir /tmp/lenet_digits
    python -m train.viz gradcam --workdir /tmp/lenet_digits --num 16 --layer conv2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import jax
import numpy as np

from jaxvision.data import create_input
from jaxvision.detection.draw import save_detections
from jaxvision.detection.masks import paste_masks_numpy
from jaxvision.interpret import attention, mask_attention
from jaxvision.interpret.confusion import confusion_matrix, per_class_metrics
from jaxvision.interpret.gradcam import gradcam
from jaxvision.interpret.posemb import model_posemb, posemb_similarity
from jaxvision.tasks.segmentation import center_crop
from train.build import load_run

KINDS = ("gradcam", "attention", "rollout", "posemb", "confusion", "curves", "segmentation",
         "masks", "boxes", "captions")


# Examples read to choose the drawn ones from: enough to find every class of a large split.
_SCAN_LIMIT = 2000


def spread_over_classes(labels: np.ndarray, num: int) -> np.ndarray:
  """Indices of `num` examples taken in turn from each class (in class order), so a picture of
  16 examples shows many classes even when the split is sorted by class."""
  queues = [list(np.nonzero(labels == c)[0]) for c in np.unique(labels)]
  picked: list[int] = []
  while len(picked) < min(num, len(labels)):
    for queue in queues:
      if queue and len(picked) < num:
        picked.append(int(queue.pop(0)))
  return np.asarray(sorted(picked), np.int64)


def eval_examples(config, split: str, num: int | None) -> dict[str, np.ndarray]:
  """`num` examples (all when None) of `split`, transformed as the run evaluates them; with
  image labels, spread over the classes (`spread_over_classes`)."""
  data = create_input(config, split, train=False)
  parts, total = [], 0
  limit = None if num is None else max(num, _SCAN_LIMIT)
  for batch in data.eval_batches():
    keep = np.asarray(batch["valid"], bool)
    parts.append({k: np.asarray(v)[keep] for k, v in batch.items() if k in ("image", "label")})
    total += int(keep.sum())
    if limit is not None and total >= limit:
      break
  if not parts or total == 0:
    raise ValueError(f"split {split!r} of {config.dataset} has no examples")
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  if num is None:
    return out
  pick = (spread_over_classes(out["label"], num) if out["label"].ndim == 1
          else np.arange(min(num, total)))
  return {k: v[pick] for k, v in out.items()}


def class_names(config, num_classes: int) -> list[str]:
  """The run's class names (folder names, TFDS label names), else the class indices."""
  names = [str(n) for n in config.data_info.class_names]
  return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def _predict(model, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  outputs = []
  for i in range(0, len(images), batch_size):
    out = apply(images[i:i + batch_size])
    outputs.append(np.asarray(out["logits"] if isinstance(out, dict) else out, np.float32))
  return np.concatenate(outputs)


# Detection pictures are enlarged to at least this many pixels on their shorter side, so the
# class and score labels (PIL's default font, ~11 px) do not hide small objects.
_BOXES_MIN_SIDE = 384


def detection_pictures(run_, split: str, num: int, out: str, min_score: float) -> list[str]:
  """PNGs of the first `num` examples of `split` with the run's detections scoring at least
  `min_score` (below the run's own score threshold too) and the ground truth drawn
  (jaxvision.detection.draw), enlarged by a whole factor (nearest neighbour) so the labels stay
  legible; returns their paths."""

  config, task, model, variables = run_.config, run_.task, run_.model, run_.variables
  if config.task != "detection":
    raise ValueError(f"boxes needs a detection run; the run's task is {config.task!r}")
  task = dataclasses.replace(task, score_threshold=min(task.score_threshold, min_score))

  @jax.jit
  def predict(variables, batch):
    forward = lambda *a, **kw: model.apply(variables, *a, train=False, **kw)
    return task.predict(forward, batch)

  names = [str(n) for n in config.data_info.class_names] or None
  os.makedirs(out, exist_ok=True)
  paths: list[str] = []
  for batch in create_input(config, split, train=False).eval_batches():
    pred = jax.device_get(predict(variables, batch))
    for i in np.nonzero(np.asarray(batch["valid"], bool))[0]:
      if len(paths) >= num:
        return paths
      image = np.asarray(batch["image"][i])
      zoom = max(1, -(-_BOXES_MIN_SIDE // min(image.shape[:2])))
      image = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
      # Detections are in original-image pixels; the picture is the model's input.
      to_input = np.tile(batch["scale"][i], 2), np.tile(batch["offset"][i], 2)
      boxes = (np.asarray(pred["boxes"][i]) * to_input[0] + to_input[1]) * zoom
      masks = None
      if "mask_probs" in pred:  # instance masks (Mask R-CNN), pasted into the model's input
        masks = paste_masks_numpy(pred["mask_probs"][i], pred["input_boxes"][i],
                                  batch["image"].shape[1:3]) & pred["valid"][i][:, None, None]
        masks = np.repeat(np.repeat(masks, zoom, axis=1), zoom, axis=2)
      paths.append(save_detections(
          os.path.join(out, f"boxes_{len(paths):03d}.png"), image, boxes, pred["scores"][i],
          pred["classes"][i], valid=pred["valid"][i], class_names=names,
          score_threshold=min_score, gt_boxes=np.asarray(batch["boxes"][i]) * zoom,
          gt_classes=batch["classes"][i], gt_valid=batch["box_valid"][i], masks=masks))
  if not paths:
    raise ValueError(f"split {split!r} of {config.dataset} has no examples")
  return paths


def caption_pictures(run_, split: str, num: int, out: str) -> list[str]:
  """The captioning task's pictures (`CaptioningTask.save_pictures`) of the first `num`
  examples of `split`: each image, its generated caption and every word's cross-attention."""
  if run_.config.task != "captioning":
    raise ValueError(f"captions needs a captioning run; the run's task is {run_.config.task!r}")
  task = dataclasses.replace(run_.task, pictures=num)
  images = []
  for batch in create_input(run_.config, split, train=False).eval_batches():
    images += list(np.asarray(batch["image"])[np.asarray(batch["valid"], bool)])
    if len(images) >= num:
      break
  if not images:
    raise ValueError(f"split {split!r} of {run_.config.dataset} has no examples")
  images = np.stack(images[:num])
  forward = lambda *a, **kw: run_.model.apply(run_.variables, *a, train=False, **kw)
  predict = jax.jit(lambda x: task.predict(forward, {"image": x}))
  size = int(run_.config.eval_batch_size)
  parts = [jax.device_get(predict(images[i:i + size])) for i in range(0, len(images), size)]
  predictions = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
  return task.save_pictures(os.path.join(out, "caption_"), {"image": images}, predictions)


def _training_crops(images: np.ndarray, size) -> np.ndarray:
  """The centre crop of each image at the model's training size (the whole image if smaller)."""
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  return center_crop(images, min(h, images.shape[1]), min(w, images.shape[2]))


def class_mask_pictures(run_, images: np.ndarray, out: str, dpi: int) -> list[str]:
  """Two PNGs of a mask-transformer Segmenter over training-size crops of `images`: each class
  embedding's attention over the patches in the last decoder layer, and each patch's cosine
  similarity with each class embedding (the masks before the mask norm)."""
  from jaxvision.interpret import plots

  config, model, variables = run_.config, run_.model, run_.variables
  mask_attention.check_model(model)
  crops = _training_crops(images, model.image_size)
  names = class_names(config, int(config.num_classes))
  views = (
      ("attention", mask_attention.class_attention,
       "where each class embedding reads its evidence: its attention over the patches in the "
       "last decoder layer, head mean (red: most)"),
      ("similarity", mask_attention.class_masks,
       "each patch's cosine similarity with each class embedding, the masks before the mask "
       "norm (red: similar, blue: opposite)"),
  )
  paths = []
  for name, view, what in views:
    fig = mask_attention.mask_attention_figure(
        crops, view(model, variables, crops), class_names=names, dpi=dpi,
        title=f"{config.model}: {what}")
    paths.append(plots.save_figure(fig, os.path.join(out, f"masks_{name}.png")))
  return paths


def run(kind: str, args) -> list[str]:
  """Draws figure `kind` for the run in args.workdir; returns the written paths."""
  from jaxvision.interpret import plots

  out = args.out or os.path.join(args.workdir, "viz")
  if kind == "curves":
    rows = plots.read_metrics(args.workdir)
    metrics = args.metrics.split(",") if args.metrics else None
    fig = plots.curves_figure(rows, metrics=metrics, dpi=args.dpi, title=args.workdir)
    return [plots.save_figure(fig, os.path.join(out, "curves.png"))]

  run_ = load_run(args.workdir, args.step)
  config, model, variables = run_.config, run_.model, run_.variables
  if kind == "posemb":
    rows, cols = model.grid if hasattr(model, "grid") else (None, None)
    if rows is None:
      raise ValueError(f"posemb needs a ViT; the run's model is {config.model!r}")
    sim = posemb_similarity(model_posemb(model, variables["params"]), (rows, cols))
    marks = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
    fig = plots.heatmap_grid(
        sim, vmin=-1, vmax=1, cmap="viridis", marks=marks, dpi=args.dpi,
        cell_inches=min(0.9, 9.0 / cols), colorbar="cosine similarity",
        title=f"{config.model}: position-embedding similarity ({rows}x{cols} patches)")
    return [plots.save_figure(fig, os.path.join(out, "posemb.png"))]

  split = args.split or config.eval_split or config.train_split
  if kind == "boxes":
    return detection_pictures(run_, split, args.num, out, args.min_score)
  if kind == "captions":
    return caption_pictures(run_, split, args.num, out)
  num = None if kind == "confusion" else args.num
  data = eval_examples(config, split, num)
  batch = int(config.eval_batch_size)
  images = data["image"]

  if kind == "confusion":
    logits = _predict(model, variables, images, batch)
    confusion = confusion_matrix(data["label"], logits.argmax(-1), logits.shape[-1])
    stats = per_class_metrics(confusion)
    print(json.dumps({k: [None if np.isnan(x) else round(float(x), 4) for x in v]
                      for k, v in stats.items() if k != "support"}
                     | {"support": [int(x) for x in stats["support"]]}))
    fig = plots.confusion_figure(confusion, class_names=class_names(config, logits.shape[-1]),
                                 dpi=args.dpi, title=f"{config.model} on {split}")
    return [plots.save_figure(fig, os.path.join(out, "confusion.png"))]

  if kind == "gradcam":
    result = gradcam(model, variables, images, layer=args.layer or None,
                     class_index=args.class_index)
    names = class_names(config, int(np.asarray(result.logits).shape[-1]))
    predicted = np.asarray(np.argmax(result.logits, -1))
    titles = [f"true {names[y]}, predicted {names[p]}" for y, p in zip(
        data["label"], predicted, strict=True)]
    what = ("the predicted class" if args.class_index is None
            else f"class {names[args.class_index]}")
    fig = plots.overlay_grid(
        images, np.asarray(result.heatmaps), titles=titles, dpi=args.dpi, suptitle=(
            f"Grad-CAM of {config.model} at layer {result.layer}: where the evidence for "
            f"{what} lies (red: strong, blue: none)"))
    return [plots.save_figure(fig, os.path.join(out, "gradcam.png"))]

  if kind in ("attention", "rollout"):
    weights = attention.attention_weights(model, variables, images)
    size = images.shape[1:3]
    prefix = model.num_prefix_tokens
    if kind == "rollout":
      maps = attention.rollout_map(attention.attention_rollout(weights), model.grid, prefix)
      names = class_names(config, int(config.num_classes))
      fig = plots.overlay_grid(
          images, np.asarray(attention.upsample(maps, size)), dpi=args.dpi,
          titles=[f"true {names[y]}" for y in data["label"]], suptitle=(
              f"attention rollout of {config.model}: how much each patch feeds the class token "
              "through all blocks (red: most)"))
      return [plots.save_figure(fig, os.path.join(out, "rollout.png"))]
    cls = np.asarray(attention.upsample(attention.cls_attention(weights, model.grid, prefix), size))
    names = class_names(config, int(config.num_classes))
    paths = []
    for i in range(len(images)):
      table = cls[:, i]  # (blocks, heads, H, W)
      fig = plots.overlay_table(
          images[i], table, row_labels=[f"block {b}" for b in range(table.shape[0])],
          col_labels=[f"head {h}" for h in range(table.shape[1])], dpi=args.dpi,
          title=(f"{config.model}: the class token's attention to each patch, per block and head "
                 f"(example {i}, true {names[data['label'][i]]}; each map scaled to its maximum)"))
      paths.append(plots.save_figure(fig, os.path.join(out, f"attention_{i:03d}.png")))
    return paths

  if kind == "masks":
    return class_mask_pictures(run_, images, out, args.dpi)

  if kind == "segmentation":
    logits = _predict(model, variables, images, batch)
    fig = plots.segmentation_figure(images, data["label"], logits,
                                    num_classes=int(config.num_classes), dpi=args.dpi)
    return [plots.save_figure(fig, os.path.join(out, "segmentation.png"))]
  raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line of `python -m train.viz`."""
  parser = argparse.ArgumentParser(
      prog="python -m train.viz", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("kind", choices=KINDS, help="which figure to draw")
  parser.add_argument("--workdir", required=True,
                      help="trainer workdir (config.json, checkpoints/)")
  parser.add_argument("--out", default="", help="output directory (default WORKDIR/viz)")
  parser.add_argument("--split", default="", help="data split (default: the run's eval split)")
  parser.add_argument("--num", type=int, default=16, help="examples to draw (not for confusion)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--layer", default="", help="gradcam: layer path (default: last feature map)")
  parser.add_argument("--class-index", type=int, default=None,
                      help="gradcam: class to explain (default: the predicted one)")
  parser.add_argument("--metrics", default="", help="curves: comma-separated metric names")
  parser.add_argument("--min-score", type=float, default=0.3,
                      help="boxes: draw detections scoring at least this (default: %(default)s)")
  parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG files")
  args = parser.parse_args(argv)
  if args.num < 1:
    parser.error(f"--num={args.num} must be >= 1")
  return args


def main(argv: list[str] | None = None) -> int:
  """Entry point: writes the figure(s), prints their paths; one-line errors, exit status 2."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices are not news
  try:
    paths = run(args.kind, args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
