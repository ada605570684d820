"""ViT + GPT-2 captioner describing two coloured shapes and where they are ("a red circle left
of a blue square").

    python -m jaxvision.data.make_caption_sets --kind shapes --out runs/data/caption_shapes
    python -m train --config configs/caption_shapes.py --workdir runs/caption_shapes

Measured 2026-12-01 on the 2-core CPU: BLEU-4 0.584, CIDEr-D 5.04, BLEU-1 0.895, exact match
0.26 on the held-out scenes, 9 min 34 s wall for the training command.
"""

from configs import base


def get_config(arg: str | None = None):
  """A small vit_gpt2 on the 64 x 64 scenes resized to 32 x 32, AdamW with warm-up and cosine
  decay."""
  c = base.get_config(arg)
  c.task = "captioning"
  c.dataset = "coco_captions:runs/data/caption_shapes"
  c.train_split = "train"
  c.eval_split = "val"
  c.model = "vit_gpt2_tiny"
  c.model_kwargs.patch_size = 4
  c.model_kwargs.encoder_size = (128, 3, 4, 256)
  c.model_kwargs.decoder_size = (128, 1, 4, 256)
  c.model_kwargs.max_positions = 12
  c.image_size = 32
  c.batch_size = 64
  c.data.normalize = "half"
  c.caption.max_len = 11  # "there is a red circle left of a blue square" and the end token
  c.optimizer = "adamw"
  c.weight_decay = 0.05
  c.schedule = "warmup_cosine"
  c.warmup_steps = 100
  c.total_steps = 1500
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.best_metric = "cider"
  return c
