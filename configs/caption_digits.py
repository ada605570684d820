"""ViT + GPT-2 captioner reading strips of 3-5 MNIST digits aloud ("four one seven").

    python -m jaxvision.data.make_caption_sets --mnist ../shared/data/mnist --kind digits \
        --out runs/data/caption_digits
    python -m train --config configs/caption_digits.py --workdir runs/caption_digits

Measured 2026-12-01 on the 2-core CPU: exact match 0.731, BLEU-4 0.832, CIDEr-D 7.59, token
accuracy 0.940 on the 1,000 held-out strips, 13 min 23 s wall for the training command. Each
28 x 140 strip is resized to 70 x 70, so a 14-px patch column covers one digit (14 px wide,
squeezed 2x). The cross-attention of each word sweeps left to right over the strip, at or
within half a column of its digit, mostly in the top row of patches.

The training loss ends at 0.003: the model knows the training digits by heart. Shifts of up to
4 px with dropout 0.1 (`--config.data.augment='pad_crop(4)' --model_kwargs=dropout=0.1`) on the
same schedule underfit instead: training loss 0.40, exact match 0.654, BLEU-4 0.771 (12 min
16 s, 2026-12-01).
"""

from configs import base


def get_config(arg: str | None = None):
  """A small vit_gpt2 on 64 x 64 resized strips, AdamW with warm-up and cosine decay."""
  c = base.get_config(arg)
  c.task = "captioning"
  c.dataset = "coco_captions:runs/data/caption_digits"
  c.train_split = "train"
  c.eval_split = "val"
  c.model = "vit_gpt2_tiny"
  c.model_kwargs.patch_size = 14
  c.model_kwargs.encoder_size = (128, 3, 4, 256)
  c.model_kwargs.decoder_size = (128, 2, 4, 256)
  c.model_kwargs.max_positions = 8
  c.image_size = 70
  c.batch_size = 64
  c.caption.max_len = 6  # five digit words and the end token
  c.optimizer = "adamw"
  c.weight_decay = 0.05
  c.schedule = "warmup_cosine"
  c.warmup_steps = 100
  c.total_steps = 4000
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.best_metric = "exact_match"
  return c
