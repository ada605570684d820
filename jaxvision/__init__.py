"""jaxvision: classic vision architectures as pure Flax Linen modules, plus the tools around them.

Importing jaxvision never imports TensorFlow; the TFDS input path loads it lazily.
"""

from jaxvision.models import list_models, model_info
from jaxvision.models import registry as _registry
from jaxvision.models.init import init
from jaxvision.pretrained import PretrainedConfig, load_pretrained


def create_model(name: str, *, pretrained=None, **kwargs):
  """The registered variant `name` (`list_models()`); keyword arguments override its defaults.

  With `pretrained` (True for the variant's default weights, 'hf-hub:ORG/REPO[@REVISION]', or a
  weights file; see jaxvision.pretrained) the module is built as the weights imply, loaded, and
  returned bound to its variables: `model(x)` runs it, `model.unbind()` gives (module,
  variables). `load_pretrained` also returns the weights' preprocessing.
  """
  if pretrained is None or pretrained is False:
    return _registry.create_model(name, **kwargs)
  model, variables, _ = load_pretrained(name, pretrained, **kwargs)
  return model.bind(variables)


__version__ = "0.1.0"
__all__ = ["PretrainedConfig", "create_model", "init", "list_models", "load_pretrained",
           "model_info", "__version__"]
