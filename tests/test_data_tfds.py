"""tfds:NAME: in memory (tfds.testing.mock_data) and streamed (a tiny dataset prepared in tmp).

The streamed dataset is a real TFDS dataset written by the test, so TFDS slicing, per-process
shards and resume are exercised on real records; its images encode their example index in the
pixel values, so coverage is checked on content, not only on the ids the pipeline reports.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from configs import base  # noqa: E402
from jaxvision.data import ArrayInput, create_input  # noqa: E402
from jaxvision.data import tfds as jv_tfds  # noqa: E402
from jaxvision.data.tfds_stream import TfdsStream  # noqa: E402

SIZES = {"train": 37, "test": 11}


class JaxvisionTinyTest(tfds.core.GeneratorBasedBuilder):
  """37 + 11 PNGs of varying sizes; pixel (r, g) = (index % 256, index // 256), label index % 3."""

  VERSION = tfds.core.Version("1.0.0")

  @classmethod
  def get_metadata(cls):
    # TFDS looks for README/citation files in the builder's package; a test module has none.
    from tensorflow_datasets.core import dataset_metadata

    return dataset_metadata.DatasetMetadata(description="jaxvision test data", citation="", tags=[])

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, SIZES["train"]),
            "test": self._generate_examples(1000, SIZES["test"])}

  def _generate_examples(self, offset, n):
    for i in range(n):
      index = offset + i
      image = np.zeros((10 + i % 5, 12 + i % 3, 3), np.uint8)
      image[..., 0], image[..., 1] = index % 256, index // 256
      yield index, {"image": image, "label": index % 3}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  JaxvisionTinyTest(data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


def config_for(dataset, data_dir="", **data):
  c = base.get_config()
  c.dataset, c.image_size, c.batch_size, c.eval_batch_size, c.seed = dataset, 8, 4, 4, 1
  c.data.prefetch, c.data.workers, c.data.tfds_dir = 0, 1, data_dir
  for k, v in data.items():
    c.data[k] = v
  return c


def index_of(images: np.ndarray) -> np.ndarray:
  """The example index drawn into each (unnormalized, data.normalize='none') image."""
  r = np.round(images[:, 4, 4, 0] * 255).astype(int)
  g = np.round(images[:, 4, 4, 1] * 255).astype(int)
  return r + 256 * g


def test_mnist_in_memory_with_mock_data():
  with tfds.testing.mock_data(num_examples=20):
    config = config_for("tfds:mnist")
    config.image_size = 28
    train = create_input(config, "train[:80%]", train=True)
    evaluation = create_input(config, "train[80%:]", train=False)
  assert isinstance(train, ArrayInput) and train.num_examples == 16 and train.num_classes == 10
  batch = next(iter(train.train_batches(0)))
  assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.float32
  ids = [i for b in evaluation.eval_batches() for i in b["id"][b["valid"]]]
  assert len(ids) == 4 and not set(ids) & set(train.source.ids.tolist())


def test_small_fixed_size_datasets_stay_in_memory_large_ones_stream(tiny_dir):
  with tfds.testing.mock_data(num_examples=5):
    builder = jv_tfds.get_builder("mnist", base.get_config().data)
    assert not jv_tfds.use_stream(builder, "train", base.get_config().data, 28)
  builder = jv_tfds.get_builder("jaxvision_tiny_test", config_for("", tiny_dir).data)
  assert jv_tfds.use_stream(builder, "train", base.get_config().data, 8)  # sizes vary


@pytest.mark.parametrize("processes,split", [(1, "train"), (2, "train[5:]+test[:3]"), (3, "test")])
def test_streamed_eval_covers_every_example_once(tiny_dir, processes, split):
  config = config_for("tfds:jaxvision_tiny_test", tiny_dir)
  config.eval_batch_size = 6 if processes == 3 else 4
  inputs = [create_input(config, split, train=False, process_index=p, process_count=processes)
            for p in range(processes)]
  assert all(isinstance(i, TfdsStream) for i in inputs)
  per_process = [list(i.eval_batches()) for i in inputs]
  assert len({len(b) for b in per_process}) == 1  # the same number of batches everywhere
  seen = []
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (config.eval_batch_size // processes, 8, 8, 3)
      seen += index_of(b["image"][b["valid"]]).tolist()
  # What TFDS itself reads for the whole selection (it stores examples in a shuffled order).
  ds = tfds.builder("jaxvision_tiny_test", data_dir=tiny_dir).as_dataset(split=split)
  expected = [int(ex["image"][0, 0, 0]) + 256 * int(ex["image"][0, 0, 1]) for ex in ds]
  assert len(expected) == {"train": 37, "test": 11, "train[5:]+test[:3]": 35}[split]
  assert sorted(seen) == sorted(expected)


def test_streamed_training_shards_are_disjoint_and_resume_exactly(tiny_dir):
  config = config_for("tfds:jaxvision_tiny_test", tiny_dir, augment="inception_crop,flip",
                      shuffle_buffer=64)
  inputs = [create_input(config, "train[:32]", train=True, process_index=p, process_count=2)
            for p in range(2)]
  assert inputs[0].steps_per_epoch == 8  # 16 examples per process, 2 per step
  streams = [i.train_batches(0) for i in inputs]
  epoch = [[next(s) for _ in range(8)] for s in streams]
  ids = [np.concatenate([b["id"] for b in batches]) for batches in epoch]
  assert sorted(ids[0].tolist() + ids[1].tolist()) == list(range(32))
  # Resuming at step 5 (as after a restart) continues with the same batches, crops included.
  resumed = create_input(config, "train[:32]", train=True, process_index=1, process_count=2)
  stream = resumed.train_batches(5)
  for step in range(5, 8):
    got = next(stream)
    np.testing.assert_array_equal(got["id"], epoch[1][step]["id"])
    np.testing.assert_array_equal(got["image"], epoch[1][step]["image"])
  # The second epoch is reshuffled.
  assert not np.array_equal(next(streams[0])["id"], epoch[0][0]["id"])


def test_missing_tfds_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install 'jaxvision\[tfds\]'") as info:
    jv_tfds.import_tf()
  assert isinstance(info.value, ValueError)  # the trainer prints it as a one-line error


def test_unknown_tfds_dataset_is_named():
  with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
    jv_tfds.get_builder("no_such_dataset_xyz", base.get_config().data)


def test_importing_jaxvision_and_local_sources_never_imports_tensorflow():
  code = (
      "import sys, jaxvision, jaxvision.data\n"
      "from configs import base\n"
      "from jaxvision.data import create_input\n"
      "c = base.get_config()\n"
      "next(iter(create_input(c, c.train_split, train=True).train_batches(0)))\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
  assert result.returncode == 0, result.stderr[-2000:]


def test_variable_size_dataset_streams_under_mock_data():
  with tfds.testing.mock_data(num_examples=6):
    config = config_for("tfds:imagenet2012", augment="inception_crop,flip,randaug(2,9),erase(0.25)",
                        normalize="imagenet")
    train = create_input(config, "train", train=True)
    evaluation = create_input(config, "validation", train=False)
    assert isinstance(train, TfdsStream) and train.num_classes == 1000
    batch = next(iter(train.train_batches(0)))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
    assert sum(int(b["valid"].sum()) for b in evaluation.eval_batches()) == 6
