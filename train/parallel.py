"""One step, two executions: `jax.jit` over a device mesh (default) or `jax.pmap`.

Both executors share everything but the transform of the step, so the loop never branches on
the mode:
  init_state(rng) / train_step(state, batch, rng) / eval_step(state, batch) / put_batch(batch)
  to_checkpoint(state) / from_checkpoint(state) / abstract_checkpoint (restore target)
  host_scalar(x): a scalar of the state on the host
  compiled_train_step / compiled_eval_step: the jitted (or pmapped) steps themselves, which
  `train.bench` times and the dry run compiles ahead of time, from abstract arguments
  (abstract_state_argument / batch_spec / abstract_rng) placed as the real ones;
  compile_train_step(batch, rng): that compile on a background thread, overlapping the state's
  initialisation or restore.
Checkpoints hold one global copy of the state, so a run saved under one topology (devices,
processes, mesh or pmap) restores under another.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvision.models.init import compile_once
from train import step as step_lib
from train.state import create_train_state

log = logging.getLogger(__name__)

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
  if config.eval_batch_size % num_devices:
    raise ValueError(
        f"eval_batch_size={config.eval_batch_size} does not divide over {num_devices} devices")


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


def step_kwargs(config) -> dict:
  """The keyword arguments (besides the task) that bind `step.train_step` to one config."""
  return dict(grad_accum_steps=int(config.grad_accum_steps), ema_decay=float(config.ema_decay))


class _Executor:
  """What both executions share; subclasses compile the steps and place the arrays."""

  num_devices: int
  abstract_checkpoint: object

  def __init__(self, config, model, tx, task):
    self._create = functools.partial(create_train_state, model, tx, task,
                                     ema=bool(config.ema_decay))
    self.abstract_state = jax.eval_shape(self._create, jax.random.key(0))
    self._train = functools.partial(step_lib.train_step, task=task, **step_kwargs(config))
    self._eval = functools.partial(step_lib.eval_step, task=task)

  def _unreplicate(self, tree):
    """One copy of a tree the execution replicates (identity where it keeps one)."""
    return tree

  def train_step(self, state, batch, rng):
    """One optimizer step on a batch from `put_batch`; returns (state, metrics)."""
    state, metrics = self.compiled_train_step(state, batch, rng)
    return state, self._unreplicate(metrics)

  def eval_step(self, state, batch):
    """(summed eval metrics, per-example eval outputs) of one batch, over all devices."""
    return self._unreplicate(self.compiled_eval_step(state, batch))

  def to_checkpoint(self, state):
    """The state as saved: one global copy."""
    return self._unreplicate(state)

  def describe(self) -> str:
    """One line: the devices and how the step runs on them."""
    kind = self._devices[0].device_kind
    return f"{self.num_devices} x {kind}, {self._layout}"

  def host_scalar(self, x) -> float | int:
    """A scalar of the state (e.g. `state.step`) as a Python number on the host."""
    return np.asarray(jax.device_get(self._unreplicate(x))).item()

  def compile_train_step(self, batch, rng) -> concurrent.futures.Future:
    """Compiles the train step for a batch from `put_batch` and the step's key, on another
    thread, before the state exists (its abstract value stands in).

    XLA compiles outside the GIL, so this compile overlaps the state's initialisation (its own
    compile) or restore; the step's first call then finds the program in JAX's cache. A failure
    here is only logged: the first call compiles again and reports it.
    """
    args = (self.abstract_state_argument(), batch, rng)

    def compile_step():
      try:
        self.compiled_train_step.lower(*args).compile()
      except Exception as e:  # noqa: BLE001 (the step's first call raises it properly)
        log.debug("ahead-of-time compile of the train step failed: %s", e)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
    future = pool.submit(compile_step)
    pool.shutdown(wait=False)
    return future


class MeshExecutor(_Executor):
  """`jax.jit` with NamedSharding over a ('data', 'fsdp') mesh; the batch is split over both axes.

  Parameters and optimizer state are replicated, or with `mesh.fsdp > 1` sharded along their
  largest divisible dimension over the 'fsdp' axis.
  """

  def __init__(self, config, model, tx, task, devices: list):
    super().__init__(config, model, tx, task)
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
    self.state_sharding = jax.tree.map(lambda leaf: self._leaf_sharding(leaf, fsdp),
                                       self.abstract_state)
    self.abstract_checkpoint = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_sharding
    )
    # Initialise directly into the target sharding: no full copy on one device first.
    self._init = jax.jit(self._create, out_shardings=self.state_sharding)
    self.compiled_train_step = jax.jit(
        self._train,
        in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=(0,),
    )
    # Replicated outputs: the per-example eval outputs of the whole global batch reach every
    # process (they are small: predictions, not activations).
    self.compiled_eval_step = jax.jit(
        self._eval, in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=self.replicated,
    )
    self.num_devices = len(devices)
    self._devices = devices
    self._layout = f"jit over a mesh of data={data} x fsdp={fsdp}"

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
    return compile_once(self._init, rng)(rng)

  def put_batch(self, batch: dict) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over the mesh."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()
    }

  def batch_spec(self, spec: dict) -> dict:
    """Abstract global batch (ShapeDtypeStructs with the batch sharding), for AOT compiles."""
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_sharding)
            for k, s in spec.items()}

  def abstract_state_argument(self):
    """The state as the steps receive it, abstract: `abstract_checkpoint`."""
    return self.abstract_checkpoint

  def abstract_rng(self):
    """The step's key, abstract: replicated over the mesh."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.replicated)

  def from_checkpoint(self, state):
    """The state as restored (in `abstract_checkpoint`'s sharding): used as is."""
    return state


class PmapExecutor(_Executor):
  """The same step under `jax.pmap` over this process's devices, with 'batch' collectives."""

  axis_name = "batch"

  def __init__(self, config, model, tx, task, devices: list):
    super().__init__(config, model, tx, task)
    self.devices = devices
    num_devices = len(self.devices) * jax.process_count()
    check_batch_divides(config, num_devices)
    # Checkpoints hold global arrays: with several processes the first copy becomes one array
    # replicated over every process's devices (Orbax writes no process-local arrays).
    self._checkpoint_sharding = (
        NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())
        if jax.process_count() > 1 else jax.sharding.SingleDeviceSharding(self.devices[0]))
    self.abstract_checkpoint = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._checkpoint_sharding),
        self.abstract_state
    )
    self._init = jax.jit(self._create)
    chosen = self.devices if config.mesh.num_devices else None
    self.compiled_train_step = jax.pmap(
        functools.partial(self._train, axis_name=self.axis_name), axis_name=self.axis_name,
        in_axes=(0, 0, None), donate_argnums=(0,), devices=chosen,
    )
    self.compiled_eval_step = jax.pmap(
        functools.partial(self._eval, axis_name=self.axis_name), axis_name=self.axis_name,
        devices=chosen,
    )
    # The axis is named as pmap names its outputs' axis: the state placed here and the state a
    # step returns then have equal shardings, and the step compiles once, not twice.
    local_mesh = jax.sharding.Mesh(np.array(self.devices), (self.axis_name,))
    self._batch_sharding = NamedSharding(local_mesh, P(self.axis_name))
    self._on_every_device = NamedSharding(local_mesh, P())
    n = len(self.devices)
    self._first_copy = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree),
                               out_shardings=self._on_every_device)
    self._replicate = jax.jit(
        lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
        out_shardings=self._batch_sharding)
    self.num_devices = num_devices
    self._devices = devices
    self._layout = f"pmap over {len(devices)} local devices x {jax.process_count()} processes"

  def _unreplicate(self, tree):
    """The first device's copy: after the pmean'd update and the psum all copies are equal.

    One jitted program per tree structure: indexing leaf by leaf would compile a gather for
    every distinct leaf shape (dozens of compiles for a model's state).
    """
    return self._first_copy(tree)

  def host_scalar(self, x) -> float | int:
    """A scalar of the state as a Python number: the first device's copy, read on the host."""
    return np.asarray(jax.device_get(x))[0].item()

  def to_checkpoint(self, state):
    """The first device's copy, as one global array per leaf."""
    tree = self._first_copy(state)
    if jax.process_count() == 1:
      return tree
    return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
        x.shape, self._checkpoint_sharding, [s.data for s in x.addressable_shards]), tree)

  def init_state(self, rng):
    """A fresh TrainState, one copy per local device."""
    return self.from_checkpoint(compile_once(self._init, rng)(rng))

  def batch_spec(self, spec: dict) -> dict:
    """Abstract batch of this process (ShapeDtypeStructs) -> rows of local devices, placed as
    `put_batch` places them, for AOT compiles."""
    n = len(self.devices)
    return {k: jax.ShapeDtypeStruct((n, s.shape[0] // n, *s.shape[1:]), s.dtype,
                                    sharding=self._batch_sharding) for k, s in spec.items()}

  def abstract_state_argument(self):
    """The state as the steps receive it, abstract: a copy per local device."""
    n = len(self.devices)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype,
                                                       sharding=self._batch_sharding),
                        self.abstract_state)

  def abstract_rng(self):
    """The step's key, abstract: one key, broadcast to every device by pmap (in_axes None)."""
    return jax.eval_shape(lambda: jax.random.key(0))

  def put_batch(self, batch: dict) -> dict:
    """Process-local numpy batch -> [local devices, per device, ...] arrays, one row per device."""
    n = len(self.devices)
    return {
        k: jax.device_put(v.reshape((n, v.shape[0] // n) + v.shape[1:]), self._batch_sharding)
        for k, v in batch.items()
    }

  def from_checkpoint(self, state):
    """One global copy (as restored) -> one copy per local device (one program for the tree)."""
    local = jax.tree.map(lambda x: x if x.is_fully_addressable else x.addressable_data(0), state)
    return self._replicate(jax.device_put(local, self._on_every_device))


def create_executor(config, model, tx, task, devices: list | None = None):
  """The executor for `config.parallel` ('mesh' or 'pmap') over `devices` (default: this
  process's, or every process's for the mesh)."""
  if config.parallel == "mesh":
    return MeshExecutor(config, model, tx, task, select_devices(config, devices or jax.devices()))
  if config.parallel == "pmap":
    return PmapExecutor(config, model, tx, task,
                        select_devices(config, devices or jax.local_devices()))
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
