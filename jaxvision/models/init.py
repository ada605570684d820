"""`init(model, shape)`: a model's variables, initialised under `jax.jit` with a cheap compile.

Eager `model.init` dispatches every initializer op by op (a minute for DenseNet-121 on a 2-core
CPU); under `jit` it is one program. That program runs once, so on CPU it is compiled at LLVM's
-O2 instead of XLA's default -O3: the random-number code of the initializers is where -O3 spends
its time (4-7x longer to compile, measured on LeNet, ResNet, DenseNet, ViT, U-Net), and the
parameters come out bit for bit the same as those of eager `model.init`.

    variables = jaxvision.init(create_model("densenet121"), (1, 224, 224, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# For programs that run once (initialisation): see the module docstring.
_RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 2}


def compile_once(fn: Callable, *args, **kwargs):
  """`fn` (a jitted function) compiled for `args`, cheaply when it runs only once."""
  lowered = fn.lower(*args, **kwargs)
  on_cpu = all(d.platform == "cpu" for d in jax.devices())
  return lowered.compile(compiler_options=_RUN_ONCE_CPU_OPTIONS if on_cpu else None)


def init(model, *inputs, rng: int | jax.Array = 0, **kwargs) -> dict:
  """The variables of `model` for `inputs`: shapes (`(1, 224, 224, 3)`, float32 zeros) or
  arrays; `kwargs` go to `model.__call__` (e.g. `train=False`, the default)."""
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  arrays = [jnp.zeros(tuple(x), jnp.float32) if _is_shape(x) else jnp.asarray(x) for x in inputs]
  kwargs.setdefault("train", False)
  fn = jax.jit(lambda key, *xs: model.init({"params": key, "dropout": key}, *xs, **kwargs))
  return compile_once(fn, key, *arrays)(key, *arrays)


def _is_shape(x) -> bool:
  return isinstance(x, Sequence) and all(isinstance(d, int) for d in x)
