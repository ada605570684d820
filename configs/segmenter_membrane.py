"""Segmenter (a ViT and a linear or mask-transformer decoder) on the ISBI 2012 EM membrane slices:
25 train / 5 held out, as configs/unet_membrane.py.

    python -m train --config configs/segmenter_membrane.py:cpu --workdir runs/segmenter_membrane_cpu
    python -m train --config configs/segmenter_membrane.py:cpu_mask \\
        --workdir runs/segmenter_membrane_cpu_mask
    python -m train --config configs/segmenter_membrane.py:gpu --workdir runs/segmenter_membrane_gpu

The metric is the pixel error on the 5 held-out labelled slices (whole 512x512 images, every
pixel). Predicting "no membrane" everywhere scores about 0.20; unet_membrane's CPU recipe 0.074.
  cpu       0.1129 pixel error (mIoU 0.697) in 12 min 47 s wall, 2026-12-02 (0.1277 at step
            1200), beside unet_membrane's 0.074 on the same slices. Its errors (overlays/): a
            band along every membrane edge, where the upsampled 4-px patch logits cannot follow
            a 2-5 px line; dark organelles (mitochondria, vesicle clusters) called membrane and
            dark, blurred membranes (cut at a slant) called interior, which the U-Net's
            full-resolution skips tell apart by texture; and straight error edges on the 32-px
            tile borders, where one 64-px window's context decided otherwise than its neighbour's.
  cpu_mask  0.1990 pixel error in 19 min 49 s wall on the same 2,400 steps and evaluation,
            2026-12-02 (0.2127 at step 1200): at the end it predicts no membrane (IoU 0 for that
            class; training loss 0.42-0.44 at the end), so it scores what "no membrane"
            everywhere scores. See the mask-norm remark below.
  gpu, gpu_mask: not measured (no GPU was lent).

Why 4-pixel patches on the CPU. Both decoders give K logits per patch, bilinearly upsampled, and
a membrane is 2-5 pixels wide. The best per-patch logits for the 5 held-out masks (fitted to
the masks by gradient descent on the cross-entropy after the upsampling) still err on 0.146 of
the pixels with 16-pixel patches, 0.050 with 8-pixel and 0.006 with 4-pixel patches. Short
trial runs on the shared CPU (errors only; the machine was too loaded for their times to count):
  8-px patches, 128-px crops, batch 8, 200-step schedule                  0.173
  the same on a 1200-step schedule, at step 400 (stopped)                  0.165
  4-px patches, 64-px crops, batch 16, 150-step schedule                   0.153
  4-px patches, 64-px crops, batch 8 (the cpu preset), 300-step schedules, 2026-12-01:
    learning rate 1e-3                                                     0.151
    learning rate 3e-4                                                     0.149
    learning rate 1e-3, weight EMA 0.98 / 0.99 (config.ema_decay)          0.152 / 0.153
  (the training loss sits at 0.33-0.36 from step 75 on at either rate; the held-out error
  falls as the cosine schedule ends: 0.149 at step 600 and 0.1295 at 1200 of the cpu preset)
  Smaller encoders for more steps, 4-px patches, batch 8, evaluated at the end only, 2026-12-02
  (--model_kwargs=width=128,num_heads=4,mlp_dim=512,depth=D --config.total_steps=N):
    2-px patches, 96 wide (1,024 tokens a crop): 6.6 s a step, stopped
    128 wide, 4 blocks, 2,400 steps                                         0.1250
      the same checkpoint with 16-px eval margins (model_kwargs.eval_margin)  0.1229
    128 wide, 3 blocks, 3,200 steps, 16-px eval margins                     0.1233
  (30 and 27 min wall, but the host ran at 9-28 images/s within one run: no timing). Every
  variant's training loss stays at 0.32-0.36 until the schedule ends.
  The 128-wide 4-block run again on the idle host, 2026-12-02: 0.1229 (16-px margins) in 11 min
  23 s wall. Test-time translation (seg.tta_shift) on its checkpoint, 16-px margins: 0.1229
  with the mirror image only, 0.1132 averaged also over the input moved by 2 px (half a patch)
  down/right (the border rows filled from the last predicted row; the task averages each pixel
  over the versions that cover it: 0.1129 in the cpu run);
  0.1207 with 24-px margins and no shift (4.6x the evaluation time of 16-px margins).
  The previous cpu preset (ViT-Ti width, 6 blocks, 8-px margins, no shift, 1,200 steps) gave
  0.1295 in 18 min 16 s, 2026-12-01, and its mask variant 0.1990 in 25 min 49 s.
  cpu_mask (4-px, batch 8), 150-step schedule: training loss 0.65 at step 25 and 0.58 at 150,
  where the linear decoder's (batch 16) was 0.44 and 0.34; not evaluated (out of memory with
  five slices per eval batch, hence eval_batch_size 1). With two classes the mask norm bounds
  the logits (jaxvision.models.segmenter.MaskTransformer), which may be why it learns slowly.
At batch 16 a 4-px model on 64-px crops took as long per step as unet_small on its batch of
four 256-px crops (train.bench back to back on the loaded machine: 7.4-7.7 s against 7.7 s), so
the CPU preset takes batch 8: about 0.5 s a step on the idle machine if unet_small's 1.0 s holds.

Data and augmentation as unet_membrane, for the reason its docstring gives: random crops,
horizontal flips and elastic deformation, no vertical flips or rotations (the labels sit about
half a pixel above the membranes, an offset a network can only learn if up stays up), and
test-time averaging with the mirror image (no vertical flips); the cpu presets also average
over 2-px translations, which keep up up.

The encoder trains from scratch (no pretrained weights are used here). To start it from ViT
weights, pass `--config.init_from=<a ViT run or a converted .npz>`: the encoder's parameters
carry the ViT's names, so they load by path and the decoder stays as initialised (see
jaxvision.models.segmenter); ImageNet ViTs expect RGB input in their own normalisation
(train.transfer's table), these slices are grey.

Evaluation. The model is built for the training crop (`model_kwargs.image_size`, which the
trainer sets from the data), so its learned position embedding is a grid of that size. Whole
512x512 slices are evaluated as the official Segmenter evaluates: windows of the crop's size,
here overlap-tiles with `eval_margin` pixels of mirrored context on each side
(`model_kwargs.eval_margin`). Without it the embedding is stretched to the larger grid: on the
200-step 8-px run above, 0.1846 stretched against 0.1729 with 16-px margins (0.1765 with none,
0.1718 with 32), and the stretched pass took 2.4x as long. On the 150-step 4-px run, margins of
8 pixels gave 0.153 against 0.159 without, at twice the cost.

Presets ('cpu' is the default):
  cpu       a narrow ViT (128 wide, 4 heads, MLP 512, 4 blocks) with 4-pixel patches and the
            linear decoder (0.83M parameters); 64x64 crops (a 16x16 patch grid), batch 8, AdamW
            with warm-up and cosine decay, 2,400 steps; evaluated on 64-px windows with 16-px
            margins, averaged over the mirror image and 2-px translations.
  cpu_mask  the same encoder with the mask transformer (2 layers, dropout 0.1 as the official
            code; 1.27M parameters).
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
    # 4-pixel patches: bilinear upsampling of per-patch logits can draw a 3-pixel membrane
    # only from a fine patch grid (the best 8-pixel logits still miss 5% of the pixels).
    c.model_kwargs.patch_size = 4
    # A narrower, shallower encoder than ViT-Ti: twice the steps in the same time did better.
    c.model_kwargs.width = 128
    c.model_kwargs.num_heads = 4
    c.model_kwargs.mlp_dim = 512
    c.model_kwargs.depth = 4
    # 64-pixel windows at evaluation: 16-pixel margins of context around 32-pixel tiles.
    c.model_kwargs.eval_margin = 16
    # Half a patch: the averaged patch grids follow a membrane on a 2-pixel grid.
    c.seg.tta_shift = 2
    c.image_size = 64
    c.batch_size = 8
    # One slice at a time: its windows (every test-time version) go through the model as one
    # batch, and five slices at once took over 13 GB with the mask decoder.
    c.eval_batch_size = 1
    c.learning_rate = 1e-3
    c.weight_decay = 0.05
    c.warmup_steps = 50
    c.total_steps = 2400
    c.log_every = 25
    c.eval_every = 1200
    c.checkpoint_every = 1200
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
