"""Image captioning on the host: the caption metrics (BLEU-1..4, CIDEr-D as the COCO caption
evaluation computes them, exact match, token accuracy).

    metrics = caption_metrics(['a dog runs'], [['a dog is running', 'the dog runs']])
"""

from jaxvision.captioning.metrics import (
    bleu,
    caption_metrics,
    cider_d,
    exact_match,
    normalize,
    token_accuracy,
)

__all__ = ["bleu", "caption_metrics", "cider_d", "exact_match", "normalize", "token_accuracy"]
