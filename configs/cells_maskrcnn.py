"""Mask R-CNN trained from scratch on the cells of the ISBI 2012 EM slices (instance segmentation).

    python -m jaxvision.data.make_cell_instances --isbi ../shared/data/isbi2012-membrane \\
        --out runs/cells256 --tile 256
    python -m train --config configs/cells_maskrcnn.py --workdir runs/cells_maskrcnn
    python -m train.viz boxes --workdir runs/cells_maskrcnn

The instances are the cells the challenge's membrane labels enclose (connected regions of cell
interior of at least 50 px), the 25 / 5 slice split of configs/unet_membrane.py, each slice cut
into four 256 x 256 tiles: 100 train tiles (3,092 cells) and 20 held-out tiles (629 cells, 25-37
per tile). A whole slice holds about 110 cells, more than the 100 detections per image that
COCO's AP counts, hence the tiles. The tiles are evaluated at their own size, so the mask AP
is COCO's own (`mask_ap50`, ...), beside box AP (`ap50`, ...).
"""

from configs import base


def get_config(arg: str | None = None):
  del arg
  c = base.get_config()
  c.task = "detection"
  c.dataset = "coco:runs/cells256"
  c.train_split = "train"
  c.eval_split = "val"
  c.image_size = 256  # the tiles' own size: no resampling
  c.data.masks = True
  c.data.normalize = "half"
  # Cells have no up or left: mirror images are cells too; the scale jitter varies their sizes.
  c.data.augment = "scale_jitter(0.8,1.25),flip"
  c.detection.max_boxes = 64  # a tile holds at most 45 cells
  c.best_metric = "mask_ap50"
  c.keep_checkpoints = 1

  c.model = "maskrcnn_tiny"
  c.model_kwargs.widths = (16, 32, 64, 128)
  c.model_kwargs.fpn_features = 64
  c.model_kwargs.representation_size = 256
  # About 30 cells per tile: enough proposals and detections for all of them.
  c.model_kwargs.rpn_post_nms_top_n_test = 300
  c.model_kwargs.box_detections_per_img = 100
  c.model_kwargs.box_batch_size_per_image = 128  # at most 32 positives: about one per cell

  c.batch_size = 4
  c.eval_batch_size = 4
  c.learning_rate = 2e-3
  c.schedule = "warmup_cosine"
  c.warmup_steps = 100
  c.total_steps = 1000
  c.grad_clip_norm = 10.0
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  return c
