"""Semantic segmentation: losses, exact confusion-matrix metrics, the U-Net weight map,
overlap-tile inference, test-time averaging over flips and rotations, prediction overlays, and a
check that labels line up with their images. The trainer's task is
`jaxvision.tasks.segmentation.SegmentationTask`.
"""

from jaxvision.segmentation.alignment import label_shift_profile
from jaxvision.segmentation.losses import (
    binary_cross_entropy,
    class_probabilities,
    dice_sums,
    pixel_cross_entropy,
    pixel_weights,
    soft_dice_loss,
)
from jaxvision.segmentation.metrics import confusion_matrix, confusion_metrics, label_mask, predict
from jaxvision.segmentation.overlay import predict_and_save_overlays, save_overlays
from jaxvision.segmentation.tiling import mirror_pad, predict_tiled
from jaxvision.segmentation.tta import TTA_VERSIONS, dihedral_logits, tta_logits
from jaxvision.segmentation.weight_map import add_weight_map, unet_weight_map

__all__ = [
    "TTA_VERSIONS", "add_weight_map", "binary_cross_entropy", "class_probabilities",
    "confusion_matrix", "confusion_metrics", "dice_sums", "dihedral_logits",
    "label_mask", "label_shift_profile", "mirror_pad", "pixel_cross_entropy", "pixel_weights",
    "predict", "predict_and_save_overlays", "predict_tiled", "save_overlays", "soft_dice_loss",
    "tta_logits", "unet_weight_map",
]
