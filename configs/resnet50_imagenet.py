"""ResNet-50 v1.5 on ImageNet-1k: the large-batch SGD recipe (Goyal et al. 2017) with cosine
decay and label smoothing: SGD + Nesterov momentum 0.9, learning rate 0.1 x batch / 256 = 0.4
after 5 linear warm-up epochs, cosine to 0 over 90 epochs, weight decay 1e-4, label smoothing
0.1, bf16 compute with float32 parameters, batch 1024, inception crop + flip.

    python -m train --config configs/resnet50_imagenet.py --workdir gs://BUCKET/resnet50

reads `tfds:imagenet2012` (prepared beforehand, 1,281,167 train / 50,000 validation images).
Target, NOT measured here (no accelerator run yet): about 76.5-77% top-1 on the validation
split, what this recipe is reported to reach for ResNet-50 v1.5 in 90 epochs on an 8-GPU or
TPU v3-8 class machine.
"""

from configs import base

_IMAGES = 1_281_167  # ImageNet-1k train split


def get_config(arg: str | None = None):
  """ResNet-50, 224 px, batch 1024, 90 epochs."""
  c = base.get_config(arg)
  c.model = "resnet50"
  c.num_classes = 1000
  c.dtype = "bfloat16"  # parameters stay float32
  c.dataset = "tfds:imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 90.0
  steps_per_epoch = _IMAGES // c.batch_size
  c.log_every = 100
  c.eval_every = 5 * steps_per_epoch
  c.checkpoint_every = steps_per_epoch
  c.optimizer = "nesterov"
  c.learning_rate = 0.1 * c.batch_size / 256  # the linear scaling rule: 0.4
  c.schedule = "warmup_cosine"
  c.warmup_steps = 5 * steps_per_epoch
  c.weight_decay = 1e-4  # L2 added to the gradient for the SGD family
  c.label_smoothing = 0.1
  c.data.normalize = "imagenet"
  c.data.augment = "inception_crop,flip"
  return c
