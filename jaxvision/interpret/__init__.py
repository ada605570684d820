"""Seeing inside models: Grad-CAM, ViT attention maps and rollout, position-embedding similarity,
confusion matrices, and the matplotlib figures that show them (`plots`, the `[viz]` extra).

    cam = gradcam(model, variables, images)                  # cam.heatmaps (B, H, W) in [0, 1]
    weights = attention_weights(vit, variables, images)      # [(B, heads, N, N)] per block
    rollout = attention_rollout(weights)                     # (B, N, N), rows sum to 1
    sim = posemb_similarity(model_posemb(vit, params), vit.grid)   # (rows, cols, rows, cols)

`python -m train.viz KIND ...` writes these as PNG files from a trainer workdir.
"""

from jaxvision.interpret.attention import (
    attention_rollout,
    attention_weights,
    cls_attention,
    rollout_map,
)
from jaxvision.interpret.confusion import confusion_matrix, per_class_metrics
from jaxvision.interpret.gradcam import GradCAM, feature_layers, gradcam, peak_positions
from jaxvision.interpret.posemb import model_posemb, posemb_similarity

__all__ = [
    "GradCAM", "attention_rollout", "attention_weights", "cls_attention", "confusion_matrix",
    "feature_layers", "gradcam", "model_posemb", "peak_positions", "per_class_metrics",
    "posemb_similarity", "rollout_map",
]
