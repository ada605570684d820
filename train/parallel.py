"""One step, two executions: `jax.jit` over a device mesh (default) or `jax.pmap`.

Both executors expose the same methods, so the loop never branches on the mode:
  init_state(rng) / train_step(state, batch) / eval_step(state, batch) / put_batch(batch)
  to_checkpoint(state) / from_checkpoint(state) / abstract_checkpoint (restore target)
  compiled_train_step: the jitted (or pmapped) step itself, which `train.bench` times.
Checkpoints hold one global copy of the state, so a run saved under one topology (devices,
processes, mesh or pmap) restores under another.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from train import step as step_lib
from train.state import create_train_state

# Leaves smaller than this stay replicated under FSDP: sharding them saves nothing.
_FSDP_MIN_SIZE = 2**14


def check_batch_divides(config, num_devices: int) -> None:
  """A clear error when a batch cannot be split evenly over devices and micro-batches."""
  accum = int(config.grad_accum_steps)
  if config.batch_size % (num_devices * accum):
    raise ValueError(
        f"batch_size={config.batch_size} does not divide over {num_devices} devices"
        + (f" x grad_accum_steps={accum}" if accum > 1 else "")
    )
  eval_batch = config.eval_batch_size or config.batch_size
  if eval_batch % num_devices:
    raise ValueError(f"eval_batch_size={eval_batch} does not divide over {num_devices} devices")


def select_devices(config, devices: list) -> list:
  """The devices a run uses: all of them, or the first `mesh.num_devices` (single process)."""
  n = int(config.mesh.num_devices)
  if not n:
    return list(devices)
  if jax.process_count() > 1:
    raise ValueError("config.mesh.num_devices selects devices of one process; leave it 0 for "
                     "multi-process runs")
  if not 0 < n <= len(devices):
    raise ValueError(f"config.mesh.num_devices={n}, but this process has {len(devices)} devices")
  return list(devices)[:n]


def step_kwargs(config, task) -> dict:
  """The keyword arguments that bind `step.train_step` to one config: what both executors jit."""
  return dict(
      task=task,
      grad_accum_steps=int(config.grad_accum_steps),
      ema_decay=float(config.ema_decay),
      mixup_alpha=float(config.mixup_alpha),
      cutmix_alpha=float(config.cutmix_alpha),
  )


class MeshExecutor:
  """`jax.jit` with NamedSharding over a ('data', 'fsdp') mesh; the batch is split over both axes.

  Parameters and optimizer state are replicated, or with `mesh.fsdp > 1` sharded along their
  largest divisible dimension over the 'fsdp' axis.
  """

  def __init__(self, config, model, tx, task, input_shape):
    devices = select_devices(config, jax.devices())
    fsdp = int(config.mesh.fsdp)
    data = int(config.mesh.data) if config.mesh.data > 0 else len(devices) // max(fsdp, 1)
    if fsdp < 1 or data * fsdp != len(devices):
      raise ValueError(
          f"mesh data={config.mesh.data} x fsdp={config.mesh.fsdp} does not match the "
          f"{len(devices)} devices"
      )
    check_batch_divides(config, len(devices))
    # Auto axes: the compiler propagates shardings (GSPMD), as the step is written for.
    self.mesh = jax.make_mesh(
        (data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices
    )
    self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
    self.replicated = NamedSharding(self.mesh, P())
    create = functools.partial(
        create_train_state, model, tx, input_shape=input_shape, ema=bool(config.ema_decay)
    )
    abstract = jax.eval_shape(create, jax.random.key(0))
    self.state_sharding = jax.tree.map(lambda leaf: self._leaf_sharding(leaf, fsdp), abstract)
    self.abstract_checkpoint = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_sharding
    )
    # Initialise directly into the target sharding: no full copy on one device first.
    self._init = jax.jit(create, out_shardings=self.state_sharding)
    self.compiled_train_step = jax.jit(
        functools.partial(step_lib.train_step, **step_kwargs(config, task)),
        in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=(0,),
    )
    self._eval = jax.jit(
        functools.partial(step_lib.eval_step, task=task),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=self.replicated,
    )
    self.num_devices = len(devices)

  def _leaf_sharding(self, leaf, fsdp: int) -> NamedSharding:
    if fsdp == 1 or leaf.size < _FSDP_MIN_SIZE:
      return self.replicated
    for dim in np.argsort(leaf.shape)[::-1]:
      if leaf.shape[dim] % fsdp == 0:
        spec = [None] * leaf.ndim
        spec[dim] = "fsdp"
        return NamedSharding(self.mesh, P(*spec))
    return self.replicated

  def init_state(self, rng):
    """A fresh TrainState, created directly in its target sharding."""
    return self._init(rng)

  def put_batch(self, batch: dict) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over the mesh."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()
    }

  def train_step(self, state, batch, rng):
    """One optimizer step on a batch from `put_batch`; returns (state, replicated metrics)."""
    return self.compiled_train_step(state, batch, rng)

  def eval_step(self, state, batch):
    """Summed eval metrics of one batch (see `train.step.eval_step`)."""
    return self._eval(state, batch)

  def to_checkpoint(self, state):
    """The state as saved: already one global copy under the mesh."""
    return state

  def from_checkpoint(self, state):
    """The state as restored (in `abstract_checkpoint`'s sharding): used as is."""
    return state

  def host_scalar(self, x) -> np.ndarray:
    """A (replicated) device value as a numpy array on the host."""
    return np.asarray(jax.device_get(x))


class PmapExecutor:
  """The same step under `jax.pmap` over this process's devices, with 'batch' collectives."""

  axis_name = "batch"

  def __init__(self, config, model, tx, task, input_shape):
    self.devices = select_devices(config, jax.local_devices())
    num_devices = len(self.devices) * jax.process_count()
    check_batch_divides(config, num_devices)
    create = functools.partial(
        create_train_state, model, tx, input_shape=input_shape, ema=bool(config.ema_decay)
    )
    abstract = jax.eval_shape(create, jax.random.key(0))
    device0 = jax.sharding.SingleDeviceSharding(self.devices[0])
    self.abstract_checkpoint = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device0), abstract
    )
    self._init = jax.jit(create)
    self.compiled_train_step = jax.pmap(
        functools.partial(step_lib.train_step, axis_name=self.axis_name,
                          **step_kwargs(config, task)),
        axis_name=self.axis_name,
        in_axes=(0, 0, None),
        donate_argnums=(0,),
        devices=self.devices if config.mesh.num_devices else None,
    )
    self._eval = jax.pmap(
        functools.partial(step_lib.eval_step, task=task, axis_name=self.axis_name),
        axis_name=self.axis_name,
        devices=self.devices if config.mesh.num_devices else None,
    )
    self._batch_sharding = NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("d",)), P("d"))
    self.num_devices = num_devices

  def init_state(self, rng):
    """A fresh TrainState, one copy per local device."""
    return self.from_checkpoint(self._init(rng))

  def put_batch(self, batch: dict) -> dict:
    """Process-local numpy batch -> [local devices, per device, ...] arrays, one row per device."""
    n = len(self.devices)
    return {
        k: jax.device_put(v.reshape((n, v.shape[0] // n) + v.shape[1:]), self._batch_sharding)
        for k, v in batch.items()
    }

  def train_step(self, state, batch, rng):
    """One optimizer step on a batch from `put_batch`; returns (state, first device's metrics)."""
    state, metrics = self.compiled_train_step(state, batch, rng)
    return state, jax.tree.map(lambda x: x[0], metrics)

  def eval_step(self, state, batch):
    """Summed eval metrics of one batch, psum'd over devices (see `train.step.eval_step`)."""
    return jax.tree.map(lambda x: x[0], self._eval(state, batch))

  def to_checkpoint(self, state):
    """The first device's copy: all copies are equal after the pmean'd update."""
    return jax.tree.map(lambda x: x[0], state)

  def from_checkpoint(self, state):
    """One global copy (as restored) -> one copy per local device."""
    n = len(self.devices)
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), self._batch_sharding), state
    )

  def host_scalar(self, x) -> np.ndarray:
    """A device value (already unstacked by the step methods) as a numpy array on the host."""
    return np.asarray(jax.device_get(x))


def create_executor(config, model, tx, task, input_shape):
  """The executor for `config.parallel`: 'mesh' or 'pmap'."""
  if config.parallel == "mesh":
    return MeshExecutor(config, model, tx, task, input_shape)
  if config.parallel == "pmap":
    return PmapExecutor(config, model, tx, task, input_shape)
  raise ValueError(f"config.parallel={config.parallel!r} is unknown; choose 'mesh' or 'pmap'")


def prefetch_to_device(batches: Iterable[dict], size: int, put) -> Iterator[dict]:
  """Keeps `size` batches already transferred (device_put is asynchronous) ahead of the step."""
  queue: collections.deque = collections.deque()
  iterator = iter(batches)
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
