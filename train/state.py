"""The train state: everything a resumed run needs, and nothing it can derive.

The step's random key is not stored: it is `fold_in(base_key, step)`, so the state stays small
and a resumed run draws the same numbers as an uninterrupted one. The data position is `step`
too (see jaxvision.data.pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Parameters, BatchNorm statistics, optimizer state and counters.

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params: float32 parameters.
    batch_stats: BatchNorm running statistics ({} for models without BatchNorm).
    opt_state: the optimizer's state.
    ema_params: exponential moving average of params, or {} when `ema_decay` is 0.
    nonfinite_step: first step whose loss or gradients were NaN/Inf, -1 while all are finite.
      Such a step is not applied, so the state stays the last good one.
    apply_fn: the model's apply function (static).
    tx: the optimizer (static).
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree
  nonfinite_step: jax.Array
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def eval_params(self) -> PyTree:
    """The parameters evaluation uses: the EMA when enabled."""
    return self.ema_params if self.ema_params else self.params

  def variables(self, params: PyTree | None = None) -> dict:
    """The Flax variables dict for `apply`."""
    variables = {"params": self.params if params is None else params}
    if self.batch_stats:
      variables["batch_stats"] = self.batch_stats
    return variables


def init_variables(model, task, rng: jax.Array) -> dict:
  """The model's variables, initialised on a zero batch of the task's input spec."""
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in task.input_spec(1).items()}
  args, kwargs = task.model_inputs(batch)
  return model.init({"params": rng, "dropout": rng}, *args, train=False, **kwargs)


def create_train_state(model, tx, task, rng: jax.Array, *, ema: bool) -> TrainState:
  """Initialises the model for `task`'s inputs and the optimizer on its params."""
  variables = init_variables(model, task, rng)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else {},
      nonfinite_step=jnp.full((), -1, jnp.int32),
      apply_fn=model.apply,
      tx=tx,
  )
