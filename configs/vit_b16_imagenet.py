"""ViT-B/16 trained from scratch on ImageNet-1k with the DeiT recipe (Touvron et al. 2021, without
distillation): AdamW, warmup-cosine, RandAugment, random erasing, mixup/cutmix, label smoothing,
stochastic depth, bf16 compute.

    python -m train --config configs/vit_b16_imagenet.py --workdir gs://BUCKET/vit_b16

reads `tfds:imagenet2012` (prepared beforehand, 1,281,167 train / 50,000 validation images).
Target, NOT measured here (no accelerator run yet): about 81.8% top-1 on the validation split,
DeiT-B's result for this recipe on 8-16 V100s / a TPU v3-32 class machine; DeiT also uses
repeated augmentation, which this recipe lacks, so expect a point or two below that.
"""

from configs import base

_IMAGES = 1_281_167  # ImageNet-1k train split


def get_config(arg: str | None = None):
  """ViT-B/16, 224 px, batch 1024, 300 epochs."""
  c = base.get_config(arg)
  c.model = "vit_b16"
  c.model_kwargs.drop_path = 0.1
  c.num_classes = 1000
  c.dtype = "bfloat16"  # parameters stay float32
  c.dataset = "tfds:imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 300.0
  c.log_every = 100
  steps_per_epoch = _IMAGES // c.batch_size
  c.eval_every = 10 * steps_per_epoch
  c.checkpoint_every = 2 * steps_per_epoch
  c.optimizer = "adamw"
  c.learning_rate = 5e-4 * c.batch_size / 512  # DeiT's linear scaling rule
  c.schedule = "warmup_cosine"
  c.warmup_steps = 5 * steps_per_epoch
  c.end_learning_rate = 1e-5
  c.weight_decay = 0.05
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.data.normalize = "imagenet"
  c.data.augment = "inception_crop,flip,randaug(2,9),erase(0.25)"
  return c
