"""Optax optimizer and learning-rate schedule built from the config."""

from __future__ import annotations

import re

import optax
from flax import traverse_util

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "lars")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "piecewise")

# Weight decay skips biases, norm scales and embeddings that regularisation would distort.
_NO_DECAY = re.compile(r"(^|/)(bias|scale|cls_token|pos_embed|posemb\w*|mask_token)$")


def _map_paths(fn, params):
  """`fn('/'-joined path, leaf)` over every leaf, in the tree's structure."""
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=True, sep="/")
  return traverse_util.unflatten_dict(
      {k: v if v is traverse_util.empty_node else fn(k, v) for k, v in flat.items()}, sep="/")


def decay_mask(params):
  """True where weight decay applies: kernels and embeddings of rank >= 2, not biases/scales.
  Inside optax.multi_transform (freeze, scaled_lr_params) the other groups' leaves are
  placeholders without a shape: False."""
  return _map_paths(lambda path, leaf: getattr(leaf, "ndim", 0) >= 2
                    and not _NO_DECAY.search(path), params)


def freeze_labels(params, pattern: str, label: str = "frozen"):
  """`label` for every parameter whose path matches `pattern`, 'trained' otherwise."""
  regex = re.compile(pattern)
  return _map_paths(lambda path, _: label if regex.search(path) else "trained", params)


def create_schedule(config) -> optax.Schedule:
  """The learning-rate schedule named by `config.schedule`, over `config.total_steps`."""
  total_steps = int(config.total_steps)
  lr, warmup = float(config.learning_rate), int(config.warmup_steps)
  end = float(config.end_learning_rate)
  name = config.schedule
  if name == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
  if name == "warmup_linear":
    decay = optax.linear_schedule(lr, end, max(total_steps - warmup, 1))
    if not warmup:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
  if name == "piecewise":
    boundaries = [int(b * total_steps) if b < 1 else int(b) for b in config.decay_boundaries]
    factor = float(config.decay_factor)
    decay = optax.piecewise_constant_schedule(lr, {b: factor for b in boundaries})
    if not warmup:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
  raise ValueError(f"config.schedule={name!r} is unknown; choose from {', '.join(SCHEDULES)}")


def create_optimizer(config) -> optax.GradientTransformation:
  """Clipping -> optimizer with masked weight decay -> scaled learning rates -> freezing, as the
  config asks."""
  schedule = create_schedule(config)
  name, wd = config.optimizer, float(config.weight_decay)
  mask = decay_mask
  if name in ("sgd", "momentum", "nesterov"):
    momentum = None if name == "sgd" else float(config.momentum)
    # For SGD the decay is classic L2: added to the gradient before momentum (as torchvision).
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=momentum, nesterov=name == "nesterov"),
    )
  elif name == "adam":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.adam(schedule, b1=float(config.b1), b2=float(config.b2)),
    )
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=float(config.b1), b2=float(config.b2), weight_decay=wd, mask=mask)
  elif name == "lamb":
    tx = optax.lamb(schedule, b1=float(config.b1), b2=float(config.b2), weight_decay=wd, mask=mask)
  elif name == "lars":
    tx = optax.lars(
        schedule, weight_decay=wd, weight_decay_mask=mask, trust_ratio_mask=mask,
        momentum=float(config.momentum),
    )
  else:
    raise ValueError(f"config.optimizer={name!r} is unknown; choose from {', '.join(OPTIMIZERS)}")
  if config.scaled_lr_params:
    # Scaling the updates scales the learning rate, weight decay included (as a PyTorch
    # parameter group's lr does).
    factor = float(config.scaled_lr_factor)
    tx = optax.multi_transform(
        {"trained": tx, "scaled": optax.chain(tx, optax.scale(factor))},
        lambda p: freeze_labels(p, config.scaled_lr_params, "scaled"),
    )
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(float(config.grad_clip_norm)), tx)
  if config.freeze:
    # Frozen parameters get exactly zero updates, so they stay bitwise unchanged.
    tx = optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        lambda p: freeze_labels(p, config.freeze),
    )
  return tx
