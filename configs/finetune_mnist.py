"""Transfer learning on MNIST: pretrain on digits 0-4, fine-tune on few examples of digits 5-9.

The MNIST test split (IDX files) is cut into two tasks by `prepare` (written as IDX files again,
so the ordinary `idx:` source reads them):

  DST/pretrain/  digits 0-4 of test[:5000] (labels 0-4: a 5-class task, ~2,550 images)
  DST/finetune/  digits 5-9 of test[5000:] (labels 5-9 kept: the model gets a new 10-way head,
                 the classic 'replace the head for K classes'; ~2,450 images)

    python -m configs.finetune_mnist prepare ../shared/data/mnist /tmp/mnist_transfer
    python -m train --config configs/finetune_mnist.py:pretrain --workdir /tmp/xfer/pretrain
    python -m train --config configs/finetune_mnist.py:finetune --workdir /tmp/xfer/finetune \\
        --config.init_from=/tmp/xfer/pretrain
    python -m train --config configs/finetune_mnist.py:linear --workdir /tmp/xfer/linear \\
        --config.init_from=/tmp/xfer/pretrain             # frozen backbone, head only
    python -m train --config configs/finetune_mnist.py:scratch --workdir /tmp/xfer/scratch

Fine-tuning, linear probing and training from scratch share one small budget: 200 training
images of digits 5-9 (finetune/test[:200]), 100 steps of 32, evaluated on finetune/test[1000:].
Measured results: the closing note of issue 9.
"""

from __future__ import annotations

import os
import sys

import ml_collections
import numpy as np

from configs import base

DATA = "/tmp/mnist_transfer"  # where `prepare` writes the two tasks; override with --config.dataset
MODES = ("pretrain", "finetune", "linear", "scratch")


def get_config(arg: str | None = None):
  """arg: 'pretrain' | 'finetune' (set init_from) | 'linear' (set init_from) | 'scratch'."""
  mode = arg or "finetune"
  if mode not in MODES:
    raise ValueError(f"configs/finetune_mnist.py:{mode}: choose from {', '.join(MODES)}")
  c = base.get_config()
  c.model = "lenet"
  c.model_kwargs = ml_collections.ConfigDict({"activation": "relu", "pool": "max"})
  c.image_size = 28
  c.data.normalize = "mnist"
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.log_every = 25
  c.checkpoint_every = 0
  if mode == "pretrain":
    c.dataset = f"idx:{DATA}/pretrain"
    c.train_split = "test[:90%]"
    c.eval_split = "test[90%:]"
    c.batch_size = 64
    c.total_steps = 1000
    c.eval_every = 500
    return c
  c.dataset = f"idx:{DATA}/finetune"
  c.train_split = "test[:200]"  # few examples: ~40 per class
  c.eval_split = "test[1000:]"
  c.batch_size = 32
  c.total_steps = 100
  c.eval_every = 50
  if mode == "linear":
    c.freeze = "^(?!head/)"  # everything but the new head stays as pretrained
    c.learning_rate = 3e-3
  return c


def _write_idx(path: str, array: np.ndarray) -> None:
  import gzip

  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def prepare(src: str, dst: str) -> dict[str, int]:
  """Writes DST/pretrain and DST/finetune from the MNIST IDX files in SRC; returns their sizes."""
  from jaxvision.data.idx import find_files, read_idx

  files = find_files(src)
  if "test" not in files:
    raise FileNotFoundError(f"{src} has no t10k-* (test split) IDX files")
  images, labels = read_idx(files["test"]["images"]), read_idx(files["test"]["labels"])
  index = np.arange(len(labels))
  tasks = {
      "pretrain": (index < 5000) & (labels <= 4),
      "finetune": (index >= 5000) & (labels >= 5),
  }
  sizes = {}
  for name, keep in tasks.items():
    os.makedirs(os.path.join(dst, name), exist_ok=True)
    _write_idx(os.path.join(dst, name, "t10k-images-idx3-ubyte.gz"), images[keep])
    _write_idx(os.path.join(dst, name, "t10k-labels-idx1-ubyte.gz"), labels[keep].astype(np.uint8))
    sizes[name] = int(keep.sum())
  return sizes


if __name__ == "__main__":
  if len(sys.argv) != 4 or sys.argv[1] != "prepare":
    print("usage: python -m configs.finetune_mnist prepare SRC_MNIST_DIR DST_DIR", file=sys.stderr)
    sys.exit(2)
  print(prepare(sys.argv[2], sys.argv[3]))
