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

Measured 2026-12-01 on the 2-core CPU, alone, for the command above: mask AP50 0.780, mask AP
0.436, mask AP75 0.440 (box AP50 0.811, AP 0.434, AR100 0.504) on the 20 held-out tiles, in
23 min 36 s wall (1.0-1.5 s a step; 2.2 GB peak memory); mask AP50 0.719 at step 500. What the
drawn masks (`train.viz boxes`) get wrong: large, concave cells get duplicate boxes over parts
of themselves that NMS at IoU 0.5 keeps, and a box that reaches into a neighbour, where the
28 x 28 mask then blurs across the thin membrane between them; thin slivers that the tile edge
cuts and small cells squeezed between membranes are missed; masks spill over membranes of
one or two pixels where two cells touch.

The model is `maskrcnn_tiny` widened (ResNet widths 16-128, one basic block per stage, a
64-channel FPN, a 256-wide box head, the tiny 2-layer 32-channel mask head), trained from
scratch with Adam; 128 sampled proposals per image (at most 32 positives, about one per cell).
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
  c.grad_clip_norm = 10.0
  # base's schedule: 1,000 steps, evaluated and saved every 500.
  return c
