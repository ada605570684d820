"""One-stage detectors trained from scratch on canvases of real handwritten digits.

    python -m jaxvision.data.make_digit_canvases --mnist ../shared/data/mnist \
        --out runs/digit_canvases --train 10000
    python -m train --config configs/detect_digits.py:fcos --workdir runs/detect_digits_fcos
    python -m train.viz boxes --workdir runs/detect_digits_fcos

Each 128x128 grayscale canvas holds 1-6 MNIST digits (drawn 14-40 px, so their tight ink boxes
are 2-30 px wide and 7-30 px tall: all COCO 'small'), 10 classes. Train canvases use MNIST test
images [0, 8000), the 500 held-out val canvases only [8000, 10000). The metric is COCO box AP
on the val canvases (`ap`, `ap50`, ...), read through the `coco:` reader.

Measured 2026-12-01 on the 2-core CPU (fcos preset, 10,000 train canvases): AP 0.758, AP50
0.949, AP75 0.876, AR100 0.811 on the 500 val canvases, 10 min 23 s wall for the command above
(at step 1500: AP 0.727, AP50 0.938; 4,000 steps gave AP 0.768 / AP50 0.953 in 19 min 50 s on a
busier machine). The same detector without the stride-4 level (64-channel FPN, P3-P7) reached
AP 0.711 / AP50 0.898 in 5,000 steps: 3.4% of the val digits held no P3 location. What is left:
digits under or over a larger one (duplicate boxes and a look-alike class at a lower score) and
small scrawls called a neighbouring class (an '8' drawn at 14 px).

The detr preset does not converge on this CPU in the recipe's 30 minutes (measured 2026-12-01,
3,000 steps of 16 in 34 min wall, the test suite running beside it for 20 of them): held-out
AP50 0.003 at step 1,000, 0.011 at 2,000 and 0.015 at 3,000 (AP 0.005, AR100 0.051). Its boxes
learn (the matched queries' GIoU loss fell from 0.84 at step 500 to 0.44 at 2,000, L1 from 0.18
to 0.08), but its classes do not yet: the class loss stays at 2.2, near the 2.35 of a constant
prediction, so a query finds a digit but not which one. DETR is known to need hundreds of
epochs from scratch; this is 4.8. An earlier run with the backbone at the transformer's rate
(5e-4) learned nothing in 1,000 steps: its outputs did not depend on the image (standard
deviation over images 0.004 against 0.21 over queries), the unnormalised backbone's features
having grown to a standard deviation near 2,000. With a GPU (not measured here):
`python -m train --config configs/detect_digits.py:detr --workdir runs/detect_digits_detr
--config.total_steps=60000` after `pip install -e ".[cuda]"`.

Presets ('fcos' is the default):
  fcos       `fcos_tiny` widened (ResNet widths 16..128) with a stride-4 P2 level (32-channel
             FPN and heads, P2-P7); every digit falls in P2's range (regression distances up to
             32 px), so the stride-4 level does nearly all the work.
  retinanet  `retinanet_tiny` with the same ResNet widths, a 64-channel FPN (P3-P7), anchors of
             12..192 px (3 per octave) with height/width ratios 1, 1.6 and 2.6 (digits are
             taller than wide).
  ssd        `ssd_tiny` widened (16..64 channels), four levels at strides 8..64 with default
             boxes of 9..90 px.
  detr       `detr_tiny` on three ResNet stages (a stride-16 map: 8 x 8 tokens), width 128,
             3 + 3 layers, 12 queries; DETR's AdamW with the backbone 10x slower.
"""

from configs import base

PRESETS = ("fcos", "retinanet", "ssd", "detr")


def get_config(arg: str | None = None):
  """`arg` picks the detector: 'fcos' (default), 'retinanet', 'ssd' or 'detr'."""
  preset = arg or "fcos"
  if preset not in PRESETS:
    raise ValueError(f"detect_digits preset {preset!r}; choose from {PRESETS}")
  c = base.get_config()
  c.task = "detection"
  c.dataset = "coco:runs/digit_canvases"
  c.train_split = "train"
  c.eval_split = "val"
  c.image_size = 128  # the canvases' own size: no resampling
  c.batch_size = 16
  c.detection.max_boxes = 8  # a canvas has at most 6 digits
  # Pixels to [-1, 1], no augmentation: this schedule with unnormalised pixels and random scale
  # jitter (0.75-1.25) reached AP50 0.34, where 1,000 steps like these on 3,000 canvases reached
  # 0.74. Flips are out in any case: a mirrored digit is another glyph, or none.
  c.data.normalize = "half"
  c.best_metric = "ap"
  c.keep_checkpoints = 1
  c.learning_rate = 2e-3
  c.schedule = "warmup_cosine"
  c.warmup_steps = 100
  c.total_steps = 3000
  c.log_every = 250
  c.eval_every = 1500
  c.checkpoint_every = 1500
  widths = (16, 32, 64, 128)
  if preset != "detr":  # DETR keeps every query's detection, without a threshold or NMS
    c.detection.score_threshold = 0.05
  if preset == "fcos":
    c.model = "fcos_tiny"
    c.model_kwargs.widths = widths
    # A stride-4 P2 level: a location must lie inside a box to learn it, and 3.4% of the val
    # digits (thin '1's, 2-4 px wide) hold no location of the stride-8 grid (0.7% at stride 4).
    # 32 channels keep the 4x larger level's heads at about the cost of P3's at 64.
    c.model_kwargs.min_level = 2
    c.model_kwargs.anchor_sizes = (4, 8, 16, 32, 64, 128)
    c.model_kwargs.fpn_features = 32
    c.model_kwargs.head_groups = 8
  elif preset == "retinanet":
    c.model = "retinanet_tiny"
    c.model_kwargs.widths = widths
    c.model_kwargs.fpn_features = 64
    c.model_kwargs.anchor_sizes = (12, 24, 48, 96, 192)
    c.model_kwargs.aspect_ratios = (1.0, 1.6, 2.6)
  elif preset == "detr":
    c.model = "detr_tiny"
    # Three ResNet stages: a stride-16 map, 8 x 8 tokens of a 128-px canvas (stride 32 would
    # leave 4 x 4 tokens for up to six digits).
    c.model_kwargs.layers = (2, 2, 2)
    c.model_kwargs.widths = (32, 64, 128)
    c.model_kwargs.d_model = 128
    c.model_kwargs.num_heads = 4
    c.model_kwargs.ffn_dim = 256
    c.model_kwargs.encoder_layers = 3
    c.model_kwargs.decoder_layers = 3
    c.model_kwargs.num_queries = 12
    c.model_kwargs.dropout = 0.0
    # DETR's optimizer: AdamW, weight decay 1e-4, gradients clipped at 0.1, the backbone ten
    # times slower than the transformer (at the transformer's rate, 5e-4, the unnormalised
    # backbone's features grew to a standard deviation near 2,000 in 1,000 steps and drowned the
    # position embeddings).
    c.optimizer = "adamw"
    c.learning_rate = 2e-4
    c.scaled_lr_params = "^backbone/"
    c.scaled_lr_factor = 0.1
    c.weight_decay = 1e-4
    c.grad_clip_norm = 0.1
    c.total_steps = 3000
    c.eval_every = 1000
    c.checkpoint_every = 1000
  else:
    c.model = "ssd_tiny"
    c.model_kwargs.widths = (16, 32, 64, 64, 64)
    c.model_kwargs.fc_width = 64
    c.model_kwargs.extras = ((32, 64, 3, 2, 1), (32, 64, 3, 2, 1))
    c.model_kwargs.scales = (0.07, 0.15, 0.3, 0.5, 0.7)
  return c
