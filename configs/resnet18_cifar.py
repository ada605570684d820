"""ResNet-18 on CIFAR-10 with the small-image stem (3x3 stride-1 conv, no max-pool), the common
CIFAR recipe: SGD + Nesterov momentum, warmup-cosine over 200 epochs, weight decay 5e-4,
4-pixel pad-and-crop + flips.

    python -m train --config configs/resnet18_cifar.py --workdir /tmp/resnet18_cifar

reads `tfds:cifar10` (50,000 train / 10,000 test images; TFDS downloads and prepares it once).
Target, NOT measured here (no accelerator run yet): about 95% top-1 on the test split, what
this recipe typically gives for ResNet-18 with a small stem; one modern GPU takes roughly an
hour or two.
"""

from configs import base

_IMAGES = 50_000  # CIFAR-10 train split


def get_config(arg: str | None = None):
  """ResNet-18 (small stem), 32 px, batch 128, 200 epochs."""
  c = base.get_config(arg)
  c.model = "resnet18"
  c.model_kwargs.stem = "small"
  c.num_classes = 10
  c.dataset = "tfds:cifar10"
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32
  c.eval_batch_size = 1000
  c.num_epochs = 200.0
  steps_per_epoch = _IMAGES // c.batch_size
  c.log_every = 100
  c.eval_every = 10 * steps_per_epoch
  c.checkpoint_every = 10 * steps_per_epoch
  c.optimizer = "nesterov"
  c.learning_rate = 0.1
  c.schedule = "warmup_cosine"
  c.warmup_steps = steps_per_epoch
  c.weight_decay = 5e-4  # L2 added to the gradient for the SGD family
  c.data.normalize = "cifar10"
  c.data.augment = "pad_crop(4),flip"
  return c
