"""One backbone, two heads: class logits and a regression value (multi-task learning).

`MultiTaskNet` wraps any registry model built with `num_classes=0` (which returns its pooled
features) and adds a classification head `head` and a regression head `regression_head`. The
backbone shares the parent's parameter scope, so its parameters keep the names they have in
the single-task model (`conv1`, `fc2`, ...): a single-task checkpoint initialises the backbone
and the classifier with `config.init_from` as is.

The output is a dict {'logits': (B, K), 'regression': (B,)}; `jaxvision.multitask.MultiTask`
is the task that trains it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models.registry import create_model, register_model


class MultiTaskNet(nn.Module):
  """A registry backbone with a classification and a regression head.

  Attributes:
    backbone: registry name of the feature extractor (built with num_classes=0).
    backbone_kwargs: extra constructor arguments of the backbone, as (key, value) pairs.
    num_classes: classes of the classification head; 0 returns the backbone's features.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  backbone: str = "lenet"
  backbone_kwargs: tuple = ()
  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    """Builds the headless backbone, sharing its parameter scope with this module."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.features = create_model(self.backbone, num_classes=0, **kw, **dict(self.backbone_kwargs))
    # The backbone's parameters live at this module's level, named as in the backbone alone.
    nn.share_scope(self, self.features)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, **kw)
      self.regression_head = nn.Dense(1, **kw)

  def __call__(self, x, *, train: bool = False):
    features = self.features(x, train=train)
    if not self.num_classes:
      return features
    if features.ndim != 2:
      raise ValueError(f"backbone {self.backbone!r} with num_classes=0 returned shape "
                       f"{features.shape}; a multi-task head needs pooled (B, D) features")
    return {"logits": self.head(features), "regression": self.regression_head(features)[:, 0]}


@register_model(input_shape=(28, 28, 1), num_classes=10, paper="Caruana 1997, Multitask learning")
def lenet_multitask(**kwargs) -> MultiTaskNet:
  """LeNet-5 (ReLU, max-pool) features with a digit classifier and a regression head."""
  backbone_kwargs = (("activation", kwargs.pop("activation", "relu")),
                     ("pool", kwargs.pop("pool", "max")))
  return MultiTaskNet(backbone="lenet", backbone_kwargs=backbone_kwargs, **kwargs)
