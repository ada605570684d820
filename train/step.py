"""Pure train and eval steps: state in, state out; jit- and pmap-able.

The steps name no task: the task says what the model receives, what the loss is and what
evaluation scores (jaxvision.tasks.base). The same functions run under both executions
(train.parallel): under `jax.jit` over a mesh the arrays are global, so means and BatchNorm
statistics already span every device; under `jax.pmap` each device sees its shard, and
`axis_name` turns on the collectives (pmean of gradients, BatchNorm statistics and metrics;
psum of eval sums, all_gather of per-example eval outputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.state import TrainState


def _split_micro_batches(batch: dict, k: int) -> dict:
  return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    task,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
    axis_name: str | None = None,
) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`; returns the new state and scalar metrics.

  `rng` is the run's base key; this step's key is `fold_in(rng, step)`.
  """
  rng = jax.random.fold_in(rng, state.step)
  augment_rng, dropout_rng = jax.random.split(rng)
  batch = task.augment(batch, augment_rng)

  def loss_fn(params, batch_stats, micro, micro_rng):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    args, kwargs = task.model_inputs(micro)
    outputs, mutated = state.apply_fn(
        variables, *args, train=True, rngs={"dropout": micro_rng}, mutable=["batch_stats"],
        **kwargs)
    loss, metrics = task.loss(outputs, micro)
    return loss, (metrics, mutated.get("batch_stats", batch_stats))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, (metrics, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, batch, dropout_rng
    )
  else:
    # Micro-batches run one after another; BatchNorm statistics thread through them.
    def accumulate(carry, micro_and_index):
      grads_sum, batch_stats = carry
      micro, i = micro_and_index
      (loss, (metrics, batch_stats)), grads = grad_fn(
          state.params, batch_stats, micro, jax.random.fold_in(dropout_rng, i)
      )
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    micro = _split_micro_batches(batch, grad_accum_steps)
    (grads, batch_stats), (losses, metrics) = jax.lax.scan(
        accumulate, (zeros, state.batch_stats), (micro, jnp.arange(grad_accum_steps))
    )
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    loss = jnp.mean(losses)
    metrics = jax.tree.map(jnp.mean, metrics)

  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)

  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  ema_params = state.ema_params
  if ema_decay:
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                              ema_params, params)

  # A NaN/Inf step is not applied: the state stays the last good one and remembers the step.
  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      batch_stats=keep_if_finite(batch_stats, state.batch_stats),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      ema_params=keep_if_finite(ema_params, state.ema_params),
      nonfinite_step=jnp.where(
          (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
      ),
  )
  return new_state, {"loss": loss, "grad_norm": grad_norm, **metrics}


def eval_step(state: TrainState, batch: dict, *, task,
              axis_name: str | None = None) -> tuple[dict, dict]:
  """(sums of the eval metrics over the valid examples of `batch`, per-example eval outputs).

  Under pmap the sums are psum'd and the per-example outputs gathered over `axis_name`, so
  every device holds the results of the whole global batch.
  """
  variables = state.variables(state.eval_params)

  def forward(*args, **kwargs):
    return state.apply_fn(variables, *args, train=False, **kwargs)

  predictions = task.predict(forward, batch)
  sums = task.eval_sums(predictions, batch)
  examples = task.eval_examples(predictions, batch)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
    examples = jax.lax.all_gather(examples, axis_name, tiled=True)
  return sums, examples
