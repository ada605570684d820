"""What a run reports: WORKDIR/metrics.jsonl, TensorBoard events, and the terminal.

metrics.jsonl has one JSON object per line: {"step", "split": "train"|"eval", <metric>: value}.
Only process 0 writes; the others stay silent.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


def _drop_rows_after(path: str, step: int) -> None:
  """Keeps the rows of `path` up to `step`: a resumed run redoes (and relogs) the steps after it.

  Rewritten through a temporary file and a rename, so a kill here loses no row.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [ln for ln in lines if ln.strip() and _row_step(ln) <= step]
  if len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in kept)
  os.replace(tmp, path)


def _row_keys(path: str) -> set[tuple[int, str]]:
  """(step, split) of every complete row of `path`."""
  keys = set()
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
          keys.add((int(row["step"]), str(row["split"])))
        except (ValueError, KeyError, TypeError):
          continue
  return keys


def _row_step(line: str) -> float:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):  # a half-written last line from a kill
    return math.inf


def _clean(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no NaN/Inf


class Reporter:
  """Writes metrics to metrics.jsonl and TensorBoard, and shows progress on the terminal.

  Attributes:
    workdir: where metrics.jsonl and the event files go.
    total_steps: the run's last step, for the progress bar.
    enabled: False on every process but 0.
  """

  def __init__(self, workdir: str, total_steps: int, *, enabled: bool = True,
               progress: str = "auto", start_step: int = 0):
    self.workdir = workdir
    self.total_steps = total_steps
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._rows: set[tuple[int, str]] = set()
    self._start = time.time()
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, start_step)
    self._rows = _row_keys(path)
    self._jsonl = open(path, "a", buffering=1)
    # purge_step hides events (step >= it) a previous attempt logged past the resumed step.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    if progress == "auto":
      progress = "bar" if sys.stderr.isatty() or _in_notebook() else "lines"
    self.progress = progress
    if progress == "bar":
      # tqdm.auto: a widget in a notebook, a text bar on a terminal.
      self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, initial=start_step)

  def has_row(self, step: int, split: str) -> bool:
    """Whether metrics.jsonl already holds a row of `split` at `step` (a resumed run's own
    earlier rows included)."""
    return (int(step), split) in self._rows

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` (a step dispatched, not waited for: no host sync)."""
    if self._bar is not None:
      self._bar.update(int(step) - self._bar.n)

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Records `metrics` of `split` at `step` everywhere."""
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._rows.add((int(step), split))
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    self._show(step, split, metrics)

  def _show(self, step, split, metrics):
    keys = ("loss", "accuracy", "pixel_error", "miou", "images_per_sec")
    shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
    if self._bar is not None:
      self._bar.n = int(step)
      if split == "train":
        self._bar.set_postfix_str(shown, refresh=True)
      else:
        self._bar.write(f"eval @ {step}: {shown}")
    elif self.progress == "lines":
      elapsed = time.time() - self._start
      print(f"[{elapsed:7.1f}s] {split:5s} step {step}/{self.total_steps} {shown}", flush=True)

  def message(self, text: str) -> None:
    """A line for the terminal that does not break the progress bar."""
    if not self.enabled or self.progress == "none":
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    """Closes the progress bar and flushes the TensorBoard writer."""
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def run_summary(config, *, devices: str, parameters: int, workdir: str, start_step: int) -> str:
  """The block printed before the first step: what runs where, on what, for how long."""
  info = config.data_info
  shape = "x".join(str(d) for d in info.image_shape)
  epochs = (f" ({config.total_steps / info.steps_per_epoch:.3g} epochs)"
            if info.steps_per_epoch else "")
  evaluation = (f"eval_split {config.eval_split!r}: {info.eval_examples:,} examples"
                if config.eval_split else "no eval split")
  classes = f", {config.num_classes} classes" if config.num_classes else ""
  names = list(info.class_names)
  if names:
    classes += f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
  start = f"resumed from step {start_step}" if start_step else "new run"
  return "\n".join([
      f"{config.model} on {config.dataset} ({config.task}{classes})",
      f"  devices   {devices}",
      f"  model     {parameters:,} parameters, {config.dtype} compute",
      f"  data      train_split {config.train_split!r}: {info.train_examples:,} examples; "
      f"{evaluation}; images {shape}",
      f"  schedule  {config.total_steps:,} steps of batch {config.batch_size}{epochs}, "
      f"{config.optimizer} lr {config.learning_rate:g} ({config.schedule})",
      f"  workdir   {workdir} ({start})",
  ])


def _in_notebook() -> bool:
  """Whether this process is a Jupyter / Colab kernel (where tqdm.auto draws a widget)."""
  return "ipykernel" in sys.modules


def _fmt(value) -> str:
  value = float(value)
  if abs(value) >= 100:
    return f"{value:.0f}"
  return f"{value:.4f}"
