"""Matplotlib figures: heat maps over images, grids of maps, confusion matrices, training curves
and segmentation overlays. Every function returns a `matplotlib.figure.Figure` (no pyplot state,
so it works headless and in threads); `save_figure` writes it as a PNG of exactly
figsize * dpi pixels.

Matplotlib is the `[viz]` extra (`pip install 'jaxvision[viz]'`); it is imported on first use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

from jaxvision.interpret.confusion import per_class_metrics

# Tints of the segmentation classes; class 0 (background) is drawn black.
SEG_COLORS = np.array([
    (0, 0, 0), (40, 200, 80), (60, 120, 255), (255, 160, 0), (200, 60, 255), (0, 220, 220),
    (255, 90, 160), (150, 150, 40),
], np.float32) / 255.0


def _matplotlib():
  try:
    import matplotlib
    from matplotlib.figure import Figure
  except ImportError:
    raise ImportError("plots need matplotlib: pip install 'jaxvision[viz]'") from None
  return matplotlib, Figure


def new_figure(width: float, height: float, dpi: int = 100):
  """An empty Figure of `width` x `height` inches (no pyplot)."""
  _, Figure = _matplotlib()
  return Figure(figsize=(width, height), dpi=dpi)


def save_figure(fig, path: str) -> str:
  """Writes `fig` to `path` as a PNG of figsize * dpi pixels; returns the path."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=fig.dpi, format="png")
  return path


def display_image(image) -> np.ndarray:
  """(H, W, C) image in any range -> (H, W) or (H, W, 3) floats in [0, 1], stretched per image."""
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3:
    image = image[..., :3]
  elif image.ndim != 2:
    raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
  lo, hi = float(image.min()), float(image.max())
  return (image - lo) / max(hi - lo, 1e-12)


def _grid_shape(n: int, ncols: int) -> tuple[int, int]:
  ncols = max(1, min(ncols, n))
  return math.ceil(n / ncols), ncols


def _finish(fig, title: str | None, fontsize: int) -> None:
  """tight_layout that leaves room for the figure title (which it would otherwise overlap)."""
  if title:
    fig.suptitle(title, fontsize=fontsize)
    height = fig.get_size_inches()[1]
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.3 / height))
  else:
    fig.tight_layout(pad=0.3)


def _axes_off(ax) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


def overlay_grid(
    images, heatmaps, *, titles: Sequence[str] | None = None, ncols: int = 8, alpha: float = 0.5,
    cmap: str = "jet", cell_inches: float = 1.6, dpi: int = 100, suptitle: str | None = None,
):
  """Each image with its heat map (values in [0, 1], image size) blended on top."""
  images, heatmaps = np.asarray(images), np.asarray(heatmaps, np.float32)
  if len(images) != len(heatmaps) or heatmaps.shape[1:3] != images.shape[1:3]:
    raise ValueError(f"heat maps {heatmaps.shape} do not match images {images.shape}")
  rows, cols = _grid_shape(len(images), ncols)
  title_room = 0.22 if titles is not None else 0.0  # square images leave no room for a title
  top_room = 0.3 if suptitle else 0.0
  height = rows * (cell_inches + title_room) + top_room
  fig = new_figure(cols * cell_inches, height, dpi)
  # Explicit spacing: tight_layout sizes the boxes before the square aspect shrinks the images,
  # and then lets titles run into the row above.
  gap = 0.04
  fig.subplots_adjust(left=gap / (cols * cell_inches), right=1 - gap / (cols * cell_inches),
                      bottom=gap / height, top=1 - (top_room + title_room) / height,
                      wspace=gap * 2 / cell_inches, hspace=(title_room + gap) / cell_inches)
  for i in range(rows * cols):
    ax = fig.add_subplot(rows, cols, i + 1)
    _axes_off(ax)
    if i >= len(images):
      ax.set_axis_off()
      continue
    shown = display_image(images[i])
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
    ax.imshow(heatmaps[i], cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    if titles is not None:
      ax.set_title(titles[i], fontsize=7, pad=2)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9, y=1 - 0.04 / height, va="top")
  return fig


def overlay_table(
    image, maps, *, row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None, alpha: float = 0.55, cmap: str = "jet",
    cell_inches: float = 1.2, dpi: int = 100, title: str | None = None,
):
  """One image under every map of a (R, C, H, W) table (e.g. blocks x heads), each map scaled
  to its own maximum; the image alone in an extra first column."""
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 4 or maps.shape[2:] != np.asarray(image).shape[:2]:
    raise ValueError(f"maps {maps.shape} must be (R, C, H, W) at the image size "
                     f"{np.asarray(image).shape[:2]}")
  r, c = maps.shape[:2]
  shown = display_image(image)
  fig = new_figure((c + 1) * cell_inches, r * cell_inches + (0.35 if title else 0.1), dpi)
  for i in range(r):
    ax = fig.add_subplot(r, c + 1, i * (c + 1) + 1)
    _axes_off(ax)
    if i == 0:
      ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
      ax.set_title("image", fontsize=7)
    else:
      ax.set_axis_off()
    if row_labels is not None:
      ax.set_axis_on()
      _axes_off(ax)
      ax.set_ylabel(row_labels[i], fontsize=7)
      for side in ax.spines.values():
        side.set_visible(i == 0)
    for j in range(c):
      ax = fig.add_subplot(r, c + 1, i * (c + 1) + j + 2)
      _axes_off(ax)
      peak = max(float(maps[i, j].max()), 1e-12)
      ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
      ax.imshow(maps[i, j] / peak, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
      if col_labels is not None and i == 0:
        ax.set_title(col_labels[j], fontsize=7)
  _finish(fig, title, 9)
  return fig


def heatmap_grid(
    maps, *, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
    cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
    cell_inches: float = 0.9, dpi: int = 100, title: str | None = None, colorbar: str = "",
    marks: np.ndarray | None = None,
):
  """A (R, C) grid of small (h, w) maps from a (R, C, h, w) array, on one shared colour scale.

  `marks` (R, C, 2) puts a dot at a (row, col) of each map (e.g. the position itself).
  """
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 4:
    raise ValueError(f"maps must be (R, C, h, w), got shape {maps.shape}")
  r, c = maps.shape[:2]
  vmin = float(np.nanmin(maps)) if vmin is None else vmin
  vmax = float(np.nanmax(maps)) if vmax is None else vmax
  bar = 0.6 if colorbar else 0.0
  fig = new_figure(c * cell_inches + bar + 0.4, r * cell_inches + (0.4 if title else 0.1), dpi)
  grid = fig.add_gridspec(r, c, left=0.35 / (c * cell_inches + bar + 0.4),
                          right=1 - (bar + 0.05) / (c * cell_inches + bar + 0.4),
                          wspace=0.08, hspace=0.08 + (0.25 if col_labels is not None else 0),
                          top=0.9 if title else 0.98, bottom=0.02)
  image = None
  for i in range(r):
    for j in range(c):
      ax = fig.add_subplot(grid[i, j])
      _axes_off(ax)
      image = ax.imshow(maps[i, j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
      if marks is not None:
        ax.plot(marks[i, j, 1], marks[i, j, 0], "w.", markersize=2)
      if col_labels is not None and i == 0:
        ax.set_title(col_labels[j], fontsize=7)
      if row_labels is not None and j == 0:
        ax.set_ylabel(row_labels[i], fontsize=7)
  if colorbar and image is not None:
    cax = fig.add_axes([1 - (bar - 0.1) / (c * cell_inches + bar + 0.4), 0.1, 0.015, 0.75])
    fig.colorbar(image, cax=cax).set_label(colorbar, fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  return fig


def confusion_figure(
    confusion, *, class_names: Sequence[str] | None = None, dpi: int = 100, title: str = "",
):
  """Row-normalised confusion matrix with counts, beside per-class precision and recall bars."""
  confusion = np.asarray(confusion, np.int64)
  k = confusion.shape[0]
  names = [str(n) for n in (class_names if class_names is not None else range(k))]
  if len(names) != k:
    raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
  stats = per_class_metrics(confusion)
  support = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  side = max(3.0, 0.45 * k + 1.5)
  fig = new_figure(side * 2 + 0.6, side, dpi)
  ax = fig.add_subplot(1, 2, 1)
  image = ax.imshow(confusion / support, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(k), names, fontsize=7, rotation=90 if k > 12 else 0)
  ax.set_yticks(range(k), names, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if k <= 20:
    for i in range(k):
      for j in range(k):
        if confusion[i, j]:
          dark = confusion[i, j] / support[i, 0] > 0.5
          ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                  color="white" if dark else "black")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class")
  accuracy = np.trace(confusion) / max(confusion.sum(), 1)
  ax.set_title(f"{title + ': ' if title else ''}accuracy {accuracy:.4f} "
               f"({confusion.sum()} examples)", fontsize=8)

  bars = fig.add_subplot(1, 2, 2)
  y = np.arange(k)
  bars.barh(y - 0.2, np.nan_to_num(stats["precision"]), height=0.4, label="precision")
  bars.barh(y + 0.2, np.nan_to_num(stats["recall"]), height=0.4, label="recall")
  ticks = [f"{n} (n={s})" for n, s in zip(names, stats["support"], strict=True)]
  bars.set_yticks(y, ticks, fontsize=7)
  bars.invert_yaxis()
  bars.set_xlim(0, 1.0)
  for i, (p, r) in enumerate(zip(stats["precision"], stats["recall"], strict=True)):
    for value, dy in ((p, -0.2), (r, 0.2)):
      if not np.isnan(value):
        bars.text(0.01, i + dy, f"{value:.3f}", va="center", fontsize=6, color="white")
  bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
  bars.set_title("precision and recall", fontsize=8)
  fig.tight_layout(pad=0.5)
  return fig


def read_metrics(path: str) -> list[dict]:
  """The rows of a run's metrics.jsonl (a file, or the workdir that holds it)."""
  if os.path.isdir(path) or not path.endswith(".jsonl"):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file {path}")
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          raise ValueError(f"{path}:{number} is not a JSON line") from None
  return rows


# Metrics drawn by default, in this order, when a run has them.
CURVE_METRICS = ("loss", "accuracy", "top5", "pixel_error", "miou", "dice", "mae",
                 "learning_rate", "images_per_sec")


def curves_figure(rows: list[dict], *, metrics: Sequence[str] | None = None, dpi: int = 100,
                  title: str = ""):
  """One panel per metric: train and eval values against the step."""
  available = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))} - {"step"}
  if metrics is None:
    metrics = [m for m in CURVE_METRICS if m in available]
  missing = [m for m in metrics if m not in available]
  if missing or not metrics:
    raise ValueError(f"metrics {missing or list(metrics)} are not in the run; it has "
                     f"{sorted(available)}")
  ncols = min(3, len(metrics))
  nrows = math.ceil(len(metrics) / ncols)
  fig = new_figure(3.6 * ncols, 2.6 * nrows + (0.3 if title else 0), dpi)
  for i, metric in enumerate(metrics):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    for split, style in (("train", "-"), ("eval", "o-")):
      points = [(r["step"], r[metric]) for r in rows
                if r.get("split") == split and isinstance(r.get(metric), (int, float))]
      if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, style, markersize=3, label=split)
    ax.set_title(metric, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _finish(fig, title, 10)
  return fig


def segmentation_figure(
    images, masks, predictions, *, num_classes: int | None = None, cell_inches: float = 1.8,
    dpi: int = 100,
):
  """One row per example: image | true mask | predicted mask | errors (red on the image)."""
  images, masks, predictions = np.asarray(images), np.asarray(masks), np.asarray(predictions)
  if predictions.ndim == 4:  # logits
    predictions = (predictions[..., 0] > 0 if predictions.shape[-1] == 1
                   else predictions.argmax(-1)).astype(np.int32)
  if not (len(images) == len(masks) == len(predictions)):
    raise ValueError(f"{len(images)} images, {len(masks)} masks, {len(predictions)} predictions")
  h, w = predictions.shape[1:]
  k = num_classes or int(max(masks.max(initial=0), predictions.max(initial=0))) + 1
  colors = SEG_COLORS[np.arange(max(k, 1)) % len(SEG_COLORS)]
  fig = new_figure(4 * cell_inches, len(images) * cell_inches + 0.3, dpi)
  for i in range(len(images)):
    image = display_image(_center_crop(images[i], h, w))
    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
    mask = _center_crop(masks[i], h, w)
    wrong = (mask != predictions[i]) & (mask >= 0)
    errors = rgb * 0.5
    errors[wrong] = (1.0, 0.1, 0.1)
    panels = (rgb, colors[np.clip(mask, 0, k - 1)], colors[predictions[i] % len(colors)], errors)
    captions = ("image", "mask", "prediction", f"errors {wrong.mean():.1%}")
    for j, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
      ax = fig.add_subplot(len(images), 4, 4 * i + j + 1)
      _axes_off(ax)
      ax.imshow(panel, vmin=0, vmax=1, interpolation="nearest")
      if i == 0 or j == 3:
        ax.set_title(caption, fontsize=8)
  fig.tight_layout(pad=0.3)
  return fig


def _center_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """Images and masks larger than a 'valid' U-Net's prediction are cropped to its centre."""
  top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
  if top < 0 or left < 0:
    raise ValueError(f"array of shape {x.shape} is smaller than the prediction {(h, w)}")
  return x[top:top + h, left:left + w]
