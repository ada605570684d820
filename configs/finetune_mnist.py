"""Transfer learning on MNIST: pretrain on digits 0-4, fine-tune on few examples of digits 5-9.

The MNIST test split (IDX files) is cut into two tasks by `prepare` (written as IDX files again,
so the ordinary `idx:` source reads them):

  DST/pretrain/  digits 0-4 of test[:5000] (labels 0-4: a 5-class task, 2,561 images)
  DST/finetune/  digits 5-9 of test[5000:] (labels 5-9 kept: the model gets a new 10-way head,
                 the classic 'replace the head for K classes'; 2,422 images)

    python -m configs.finetune_mnist prepare ../shared/data/mnist /tmp/mnist_transfer
    python -m train --config configs/finetune_mnist.py:pretrain --workdir /tmp/xfer/pretrain
    python -m train --config configs/finetune_mnist.py:finetune --workdir /tmp/xfer/finetune \\
        --config.init_from=/tmp/xfer/pretrain
    python -m train --config configs/finetune_mnist.py:scratch --workdir /tmp/xfer/scratch

Modes after pretraining, all on one small budget (50 training images of digits 5-9,
finetune/test[:50], 25 steps of 32, evaluated on the 1,422 images of finetune/test[1000:]):

  finetune      the pretrained convolutions, fresh fc1 / fc2 / head (config.init_skip), all trained
  finetune_all  every pretrained layer but the head (whose shape changed), all trained
  linear        every pretrained layer, frozen but the head (config.freeze)
  scratch       no pretraining

Measured on the 2-core CPU (eval accuracy, seeds 0 / 1 / 2): pretrain 0.9844 on its held-out
10%; finetune 0.8615 / 0.8741 / 0.8720 vs scratch 0.8193 / 0.8347 / 0.7975. LeNet's dense
layers are specific to digits 0-4: reusing them (finetune_all 0.7475 / 0.8270 / 0.7349) is worse
than scratch; a frozen backbone (linear: 0.3882 / 0.4451 / 0.4810) is worse still.
"""

from __future__ import annotations

import os
import sys

import ml_collections
import numpy as np

from configs import base
from jaxvision.data.idx import find_files, read_idx

DATA = "/tmp/mnist_transfer"  # where `prepare` writes the two tasks; override with --config.dataset
MODES = ("pretrain", "finetune", "finetune_all", "linear", "scratch")


def get_config(arg: str | None = None):
  """arg: 'pretrain' | 'finetune' | 'finetune_all' | 'linear' (these three: set init_from) |
  'scratch'."""
  mode = arg or "finetune"
  if mode not in MODES:
    raise ValueError(f"configs/finetune_mnist.py:{mode}: choose from {', '.join(MODES)}")
  c = base.get_config()
  c.model_kwargs = ml_collections.ConfigDict({"activation": "relu", "pool": "max"})
  c.data.normalize = "mnist"
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
  c.train_split = "test[:50]"  # few examples: about 10 per class
  c.eval_split = "test[1000:]"
  c.batch_size = 32
  c.total_steps = 25
  c.log_every = 5
  c.eval_every = 0
  if mode == "finetune":
    c.init_skip = "^(fc1|fc2|head)/"  # reuse the convolutions only
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
