"""jaxvision: classic vision architectures as pure Flax Linen modules, plus the tools around them.

Importing jaxvision never imports TensorFlow; the TFDS input path loads it lazily.
"""

from jaxvision.models import create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "__version__"]
