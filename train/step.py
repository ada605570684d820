"""Pure train and eval steps: state in, state out; jit- and pmap-able.

The same functions run under both executions (train.parallel): under `jax.jit` over a mesh the
arrays are global, so means and BatchNorm statistics already span every device; under
`jax.pmap` each device sees its shard, and `axis_name` turns on the collectives (pmean of
gradients, BatchNorm statistics and metrics; psum of eval sums).
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
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    axis_name: str | None = None,
) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`; returns the new state and scalar metrics.

  `rng` is the run's base key; this step's key is `fold_in(rng, step)`.
  """
  rng = jax.random.fold_in(rng, state.step)
  mix_rng, dropout_rng = jax.random.split(rng)
  if mixup_alpha or cutmix_alpha:
    from jaxvision.data.mix import mix_batch

    targets = task.targets(batch)
    images, soft = mix_batch(
        mix_rng, batch["image"], targets, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
    )
    batch = {**batch, "image": images, "soft_label": soft}

  def loss_fn(params, batch_stats, micro, micro_rng):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, mutated = state.apply_fn(
        variables, micro["image"], train=True, rngs={"dropout": micro_rng}, mutable=["batch_stats"]
    )
    loss, metrics = task.loss(logits, micro)
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


def eval_step(state: TrainState, batch: dict, *, task, axis_name: str | None = None) -> dict:
  """Sums of the eval metrics over the valid examples of `batch`."""
  variables = state.variables(state.eval_params)

  def forward(images):
    return state.apply_fn(variables, images, train=False)

  # The task decides what is scored: one forward pass, or e.g. a test-time average.
  logits = task.eval_logits(forward, batch["image"])
  sums = task.eval_sums(logits, batch)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums
