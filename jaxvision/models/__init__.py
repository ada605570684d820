"""Model families, one per file, and the registry that names their variants.

    model = create_model('resnet50', num_classes=10, dtype=jnp.bfloat16)
    variables = model.init(rng, x)
    logits = model.apply(variables, x, train=False)
"""

# Importing each family registers its variants.
from jaxvision.models import (  # noqa: F401
    alexnet,
    densenet,
    detr,
    fcn,
    fcos,
    googlenet,
    gpt2,
    lenet,
    multitask,
    nin,
    rcnn,
    resnet,
    retinanet,
    segmenter,
    ssd,
    unet,
    vgg,
    vit,
    vit_gpt2,
)
from jaxvision.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
