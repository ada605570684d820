"""Segmenter (a ViT and a linear or mask-transformer decoder) on the ISBI 2012 EM membrane slices:
25 train / 5 held out, as configs/unet_membrane.py.

    python -m train --config configs/segmenter_membrane.py:cpu --workdir runs/segmenter_membrane_cpu
    python -m train --config configs/segmenter_membrane.py:cpu_mask \\
        --workdir runs/segmenter_membrane_cpu_mask
    python -m train --config configs/segmenter_membrane.py:gpu --workdir runs/segmenter_membrane_gpu

The metric is the pixel error on the 5 held-out labelled slices (whole 512x512 images, every
pixel). Predicting "no membrane" everywhere scores about 0.22; unet_membrane's CPU recipe 0.074.
  cpu, cpu_mask, gpu, gpu_mask: not measured yet.

Data and augmentation as unet_membrane, for the reason its docstring gives: random crops,
horizontal flips and elastic deformation, no vertical flips or rotations (the labels sit about
half a pixel above the membranes, an offset a network can only learn if up stays up), and
test-time averaging with the mirror image only.

The encoder trains from scratch (no pretrained weights are used here). To start it from ViT
weights, pass `--config.init_from=<a ViT run or a converted .npz>`: the encoder's parameters
carry the ViT's names, so they load by path and the decoder stays as initialised (see
jaxvision.models.segmenter); ImageNet ViTs expect RGB input in their own normalisation
(train.transfer's table), these slices are grey.

Evaluation. The model is built for the training crop (`model_kwargs.image_size`, which the
trainer sets from the data), so its learned position embedding is a grid of that size. Whole
512x512 slices are evaluated as the official Segmenter evaluates: windows of the crop's size,
here overlap-tiles with `eval_margin` pixels of mirrored context on each side
(`model_kwargs.eval_margin`); without it the embedding would be stretched to the larger grid.

Presets ('cpu' is the default):
  cpu       ViT-Ti width (192, 3 heads) with 8-pixel patches and 6 blocks, linear decoder
            (2.7M parameters); 128x128 crops (a 16x16 patch grid), batch 8, AdamW with
            warm-up and cosine decay.
  cpu_mask  the same encoder with the mask transformer (2 layers, dropout 0.1 as the official
            code).
  gpu       Seg-S/8 (ViT-S, 12 blocks, 8-pixel patches) with the linear decoder, 256x256 crops,
            batch 16, bfloat16, stochastic depth 0.1 (the official recipe's).
  gpu_mask  Seg-S/8 with the mask transformer.
"""

from configs import base

PRESETS = ("cpu", "cpu_mask", "gpu", "gpu_mask")


def get_config(arg: str | None = None):
  """`arg` picks the preset: 'cpu' (default), 'cpu_mask', 'gpu' or 'gpu_mask'."""
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"segmenter_membrane preset {preset!r}; choose from {PRESETS}")
  c = base.get_config()
  c.task = "segmentation"
  c.dataset = "segfolder:../shared/data/isbi2012-membrane"
  c.train_split = "train[:25]"
  c.eval_split = "train[25:]"
  c.num_classes = 2  # 0 = membrane, 1 = cell interior (the masks' 0 / 255)
  c.data.normalize = "half"
  c.data.augment = "crop,hflip,elastic(10,3)"  # up stays up: see unet_membrane's docstring
  c.seg.tta = "hflip"
  c.best_metric = "pixel_error"
  c.best_mode = "min"
  c.keep_checkpoints = 1
  c.optimizer = "adamw"
  c.schedule = "warmup_cosine"
  c.grad_clip_norm = 1.0  # a transformer from scratch: the first steps' gradients spike

  if preset.startswith("cpu"):
    c.model = "segmenter_mask_ti8" if preset == "cpu_mask" else "segmenter_linear_ti8"
    c.model_kwargs.depth = 6
    # 128-pixel windows: 16-pixel margins of context, 96-pixel tiles (6x6 per 512x512 slice).
    c.model_kwargs.eval_margin = 16
    c.image_size = 128
    c.batch_size = 8
    c.eval_batch_size = 5
    c.learning_rate = 1e-3
    c.weight_decay = 0.05
    c.warmup_steps = 50
    c.total_steps = 1200
    c.log_every = 25
    c.eval_every = 400
    c.checkpoint_every = 400
  else:
    c.model = "segmenter_mask_s8" if preset == "gpu_mask" else "segmenter_linear_s8"
    c.model_kwargs.drop_path = 0.1
    c.model_kwargs.eval_margin = 32
    c.image_size = 256
    c.batch_size = 16
    c.eval_batch_size = 5
    c.dtype = "bfloat16"
    c.learning_rate = 5e-4
    c.weight_decay = 0.05
    c.warmup_steps = 200
    c.total_steps = 4000
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 500
  return c
