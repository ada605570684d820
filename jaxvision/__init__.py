"""jaxvision: classic vision architectures as pure Flax Linen modules, plus the tools around them.

Importing jaxvision never imports TensorFlow; the TFDS input path loads it lazily.
"""

from jaxvision.models import create_model, list_models, model_info
from jaxvision.models.pretrained import PretrainedConfig, load_pretrained

__version__ = "0.1.0"
__all__ = ["PretrainedConfig", "create_model", "list_models", "load_pretrained", "model_info",
           "__version__"]
