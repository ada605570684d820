"""Batching over processes and devices: padded eval counts every example once; shards are disjoint.

The test session has 4 fake CPU devices (tests/conftest.py). Processes are simulated by building
one input per process index, exactly as each process of a multi-host run does.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import base
from jaxvision.data import ArrayInput, ArraySource, build_transform, create_input


def _source(n, num_classes=3):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((n, 2, 2, 1), np.uint8)
  return ArraySource(images, (np.arange(n) % num_classes).astype(np.int32), num_classes,
                     ids=np.arange(100, 100 + n, dtype=np.int64))


def _inputs(source, batch, processes, train=False):
  config = base.get_config()
  config.data.workers = 1
  transform = build_transform(config.data, train=train, task="classification", image_size=2)
  return [ArrayInput(source, global_batch_size=batch, transform=transform, image_size=2, seed=3,
                     process_index=p, process_count=processes, prefetch=0)
          for p in range(processes)]


@pytest.mark.parametrize("n,batch,processes", [(10, 4, 1), (10, 4, 2), (7, 8, 2), (13, 6, 3),
                                               (4, 8, 4), (1, 4, 2), (12, 4, 2)])
def test_eval_counts_every_example_exactly_once(n, batch, processes):
  source = _source(n)
  per_process = [list(i.eval_batches()) for i in _inputs(source, batch, processes)]
  # Every process yields the same number of equally shaped batches (collectives line up).
  assert len({len(bs) for bs in per_process}) == 1
  seen = []
  for batches in per_process:
    for b in batches:
      assert b["image"].shape[0] == batch // processes == len(b["valid"])
      seen += b["id"][b["valid"]].tolist()
  assert sorted(seen) == list(range(100, 100 + n))


def test_train_shards_of_two_processes_are_disjoint_and_cover_the_epoch():
  source = _source(24)
  inputs = _inputs(source, 8, 2, train=True)
  steps = inputs[0].steps_per_epoch
  assert steps == 3
  seen = []
  for step in range(steps):
    rows = [set(i.train_indices(step).tolist()) for i in inputs]
    assert not rows[0] & rows[1]
    seen += [r for rs in rows for r in rs]
  assert sorted(seen) == list(range(24))
  # The next epoch is a different permutation of the same examples.
  assert [i.train_indices(steps).tolist() for i in inputs] != [i.train_indices(0).tolist()
                                                             for i in inputs]


def test_the_same_seed_gives_the_same_batches_and_resume_continues_exactly():
  source = _source(20)
  config = base.get_config()
  config.data.augment = "flip,erase(0.5)"
  config.data.workers = 2
  config.image_size = 2
  make = lambda: ArrayInput(source, global_batch_size=4, seed=5, prefetch=2, image_size=2,
                            transform=build_transform(config.data, train=True,
                                                      task="classification", image_size=2))
  first = make().train_batches(0)
  run = [next(first) for _ in range(8)]
  resumed = make().train_batches(5)
  for expected in run[5:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_shards_over_four_devices_are_disjoint_and_cover_the_split(processes):
  devices = jax.devices()
  assert len(devices) == 4, "tests/conftest.py sets 4 fake CPU devices"
  source = _source(23)
  per_device: dict[int, list[int]] = {}
  for p, eval_input in enumerate(_inputs(source, 8, processes)):
    # This process's devices: process p of P owns devices [p*4/P, (p+1)*4/P).
    local = devices[p * 4 // processes:(p + 1) * 4 // processes]
    mesh = jax.sharding.Mesh(np.array(local), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    for batch in eval_input.eval_batches():
      ids = jax.device_put(np.where(batch["valid"], batch["id"], -1), sharding)
      for shard in ids.addressable_shards:
        per_device.setdefault(shard.device.id, []).extend(
            int(i) for i in np.asarray(shard.data) if i >= 0)
  assert len(per_device) == 4
  everything = [i for ids in per_device.values() for i in ids]
  assert len(everything) == len(set(everything)) == 23
  assert sorted(everything) == list(range(100, 123))


def test_create_input_eval_split_with_padding(tmp_path):
  config = base.get_config()
  config.dataset, config.eval_batch_size, config.data.prefetch = "synthetic:4x4x1:3", 100, 0
  config.image_size = 4
  eval_input = create_input(config, "test[:250]", train=False, process_index=1, process_count=2)
  batches = list(eval_input.eval_batches())
  assert len(batches) == 3 and all(b["image"].shape == (50, 4, 4, 1) for b in batches)
  assert sum(int(b["valid"].sum()) for b in batches) == 100  # rows 50..99, 150..199 of each 100
