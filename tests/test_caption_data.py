"""Caption data: the recipe sets (digit strips from scikit-learn's digits, shape scenes) written
in COCO's caption layout and read back by coco_captions:, the batch pipeline (one caption per
example per step, deterministic; the first in evaluation; all kept as references), bad records
(one line each, or skipped and counted with data.skip_bad), the Flickr layouts, the recipe
command line (train digits never from the held-out MNIST range) and TFDS's coco_captions."""

import gzip
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import base
from jaxvision.data import create_input, load_source
from jaxvision.data.make_caption_sets import (
  DIGIT_WORDS,
  digit_strips,
  main,
  shape_scenes,
  write_coco_captions,
)
from jaxvision.data.task_transforms import build_transform
from jaxvision.tasks.captioning import caption_references


def _digits(n=40, seed=0):
  from sklearn.datasets import load_digits

  bunch = load_digits()
  images = (bunch.images * (255 / 16)).round().astype(np.uint8)
  return digit_strips(images, bunch.target, n, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("shapes"))
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("val", 5)):
    write_coco_captions(root, split, *shape_scenes(n, rng, size=32))
  return root


def _config(dataset, **overrides):
  config = base.get_config()
  config.dataset = dataset
  config.image_size, config.batch_size, config.eval_batch_size = 16, 4, 4
  config.data.prefetch = 0
  for key, value in overrides.items():
    config.data[key] = value
  return config


def test_digit_strips_read_back_with_their_captions(tmp_path):
  strips, captions = _digits(30)
  assert {s.shape for s in strips} == {(8, 40, 1)}
  lengths = {len(c[0].split()) for c in captions}
  assert lengths <= {3, 4, 5} and len(lengths) > 1
  assert all(w in DIGIT_WORDS for c in captions for w in c[0].split())
  write_coco_captions(str(tmp_path), "train", strips, captions)
  source = load_source(f"coco_captions:{tmp_path}", "train[:10]")
  assert len(source) == 10 and source.channels == 1 and source.task == "captioning"
  assert source.captions == [tuple(c) for c in captions[:10]]
  np.testing.assert_array_equal(source.images[3], strips[3])


def test_strips_keep_their_aspect_with_image_width(tmp_path):
  """image_size x image_width: 8 x 40 strips reach the model whole (no square squeeze), at
  another size resized to that shape; other tasks refuse image_width in one line."""
  strips, captions = _digits(6)
  write_coco_captions(str(tmp_path), "train", strips, captions)
  for width, height in ((40, 8), (80, 16)):
    config = _config(f"coco_captions:{tmp_path}")
    config.image_size, config.image_width = height, width
    data = create_input(config, "train", train=True)
    assert data.image_shape == (height, width, 1)
    batch = next(iter(data.train_batches(0)))
    assert batch["image"].shape == (4, height, width, 1)
  with pytest.raises(ValueError, match=r"config.image_width=40 is for captioning only"):
    build_transform(base.get_config().data, train=True, task="classification",
                    image_size=(8, 40))


def test_shape_scenes_and_split_slicing(shapes_dir):
  source = load_source(f"coco_captions:{shapes_dir}", "train[:4]+val")
  assert len(source) == 9 and source.channels == 3
  np.testing.assert_array_equal(source.ids, [0, 1, 2, 3, 12, 13, 14, 15, 16])
  refs = source.references()
  assert len(refs[12]) == 3
  first = refs[0][0].split()
  # "a red circle left of a blue square" and its mirrored and "there is" forms.
  assert refs[0][1].endswith(" ".join(first[1:3]))
  assert caption_references(f"coco_captions:{shapes_dir}", "train[:4]+val",
                            base.get_config().data) == refs


def test_batches_sample_one_caption_per_step_deterministically(shapes_dir):
  from jaxvision.tasks.captioning import CaptioningTask
  from jaxvision.text import build_word_tokenizer

  config = _config(f"coco_captions:{shapes_dir}")
  train = create_input(config, "train", train=True)
  batch = train._train_batch(0)
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  again = create_input(config, "train", train=True)._train_batch(0)
  np.testing.assert_array_equal(batch["caption"], again["caption"])
  # Over steps an example shows different captions, each one of its own.
  refs = train.source.references()
  seen: dict[int, set] = {}
  for step in range(12):
    b = train._train_batch(step)
    for i, c in zip(b["id"], b["caption"], strict=True):
      assert c in refs[int(i)]
      seen.setdefault(int(i), set()).add(c)
  assert max(len(s) for s in seen.values()) > 1
  evaluation = create_input(config, "val", train=False)
  eval_batch = next(evaluation.eval_batches())
  assert [c for c in eval_batch["caption"]] == [refs_[0] for refs_ in eval_batch["captions"]]
  assert eval_batch["valid"].tolist() == [True] * 4
  # The task turns the chosen caption into the batch contract.
  tokenizer = build_word_tokenizer(train.source.all_captions())
  task = CaptioningTask(tokenizer, tokenizer.vocab_size, (16, 16, 3), max_len=12)
  prepared = task.prepare(batch, train=True)
  assert sorted(prepared) == ["id", "image", "token_mask", "tokens"]
  assert prepared["tokens"].shape == (4, 13) and prepared["tokens"].dtype == np.int32
  assert prepared["id"].dtype == np.int64
  assert [tokenizer.decode(t) for t in prepared["tokens"]] == list(batch["caption"])
  with pytest.raises(ValueError, match="unknown captioning augmentation 'flip'"):
    create_input(_config(f"coco_captions:{shapes_dir}", augment="flip"), "train", train=True)


def test_captioning_pad_crop_shifts_training_images_only():
  data = base.get_config().data
  data.augment, data.workers = "pad_crop(2)", 1
  image = np.zeros((8, 8, 1), np.uint8)
  image[3:5, 3:5] = 255
  batch = {"image": np.stack([image] * 16), "captions": [("a dot",)] * 16}
  shift, keep = (build_transform(data, train=t, task="captioning", image_size=8)
                 for t in (True, False))
  shifted, kept = shift(batch, np.random.default_rng(0)), keep(batch, np.random.default_rng(0))
  assert all(np.array_equal(x, kept["image"][0]) for x in kept["image"])
  assert np.argwhere(kept["image"][0, ..., 0] > 0).tolist() == [[3, 3], [3, 4], [4, 3], [4, 4]]
  # Every shift keeps the whole dot (the pad is smaller than its margin), some move it.
  assert all(np.sum(x > 0) == 4 for x in shifted["image"])
  assert any(not np.array_equal(x, kept["image"][0]) for x in shifted["image"])


def _bad_coco(root):
  os.makedirs(os.path.join(root, "annotations"))
  os.makedirs(os.path.join(root, "train"))
  for name in ("a.png", "b.png", "c.png"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, "train", name))
  data = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                     {"id": 3, "file_name": "missing.png"}, {"id": 4, "file_name": "c.png"}],
          "annotations": [{"id": 10, "image_id": 1, "caption": "a cat"},
                          {"id": 11, "image_id": 2, "caption": "  "},
                          {"id": 12, "image_id": 3, "caption": "a dog"},
                          {"id": 13, "image_id": 99, "caption": "lost"},
                          {"id": 14, "image_id": 4, "caption": "a cow"}]}
  with open(os.path.join(root, "annotations", "captions_train.json"), "w") as f:
    json.dump(data, f)


def test_bad_records_name_themselves_or_are_skipped_and_counted(tmp_path):
  root = str(tmp_path)
  _bad_coco(root)
  with pytest.raises(ValueError, match="annotation 11 of image_id 2 has an empty caption"):
    load_source(f"coco_captions:{root}", "train")
  config = _config(f"coco_captions:{root}", skip_bad=True)
  source = load_source(config.dataset, "train", data_config=config.data)
  assert source.captions == [("a cat",), ("a cow",)]
  np.testing.assert_array_equal(source.image_ids, [1, 4])
  assert len(source.skipped) == 4  # empty caption, b.png left without one, unknown id, missing
  text = " | ".join(source.skipped)
  assert "unknown image_id 99" in text and "missing.png does not exist" in text
  with pytest.raises(FileNotFoundError, match="no annotations/ folder"):
    load_source(f"coco_captions:{tmp_path / 'nowhere'}", "train")
  with pytest.raises(ValueError, match="split 'test' not found"):
    load_source(f"coco_captions:{root}", "test", data_config=config.data)


def _images(folder, names):
  os.makedirs(folder, exist_ok=True)
  for i, name in enumerate(names):
    Image.fromarray(np.full((6, 9, 3), 20 * i, np.uint8)).save(os.path.join(folder, name))


def test_flickr_token_file_with_split_lists(tmp_path):
  _images(tmp_path / "Flicker8k_Dataset", ["1.jpg", "2.jpg", "3.jpg"])
  (tmp_path / "Flickr8k.token.txt").write_text(
      "1.jpg#0\tA dog runs .\n1.jpg#1\tA brown dog .\n2.jpg#0\tTwo cats .\n3.jpg#0\tA bird .\n")
  (tmp_path / "Flickr_8k.trainImages.txt").write_text("1.jpg\n3.jpg\n")
  (tmp_path / "Flickr_8k.testImages.txt").write_text("2.jpg\n")
  source = load_source(f"flickr:{tmp_path}", "train")
  assert source.captions == [("A dog runs .", "A brown dog ."), ("A bird .",)]
  assert load_source(f"flickr:{tmp_path}", "test").captions == [("Two cats .",)]
  (tmp_path / "Flickr_8k.devImages.txt").write_text("4.jpg\n")
  with pytest.raises(ValueError, match="dev split lists 4.jpg, which has no caption"):
    load_source(f"flickr:{tmp_path}", "dev")


def test_flickr_karpathy_json_and_captions_csv(tmp_path):
  karpathy, kaggle = tmp_path / "k", tmp_path / "c"
  _images(karpathy / "images", ["x.jpg", "y.jpg"])
  (karpathy / "dataset_flickr8k.json").write_text(json.dumps({"images": [
      {"filename": "x.jpg", "split": "train", "imgid": 0,
       "sentences": [{"raw": "a man"}, {"raw": "a person"}]},
      {"filename": "y.jpg", "split": "test", "imgid": 1, "sentences": [{"raw": "a tree"}]}]}))
  assert load_source(f"flickr:{karpathy}", "train").captions == [("a man", "a person")]
  assert load_source(f"flickr:{karpathy}", "test").image_ids.tolist() == [1]
  _images(kaggle / "Images", ["p.jpg"])
  (kaggle / "captions.txt").write_text('image,caption\np.jpg,"a boat, on water"\np.jpg,a ship\n')
  assert load_source(f"flickr:{kaggle}", "train").captions == [("a boat, on water", "a ship")]
  with pytest.raises(FileNotFoundError, match="no dataset_"):
    load_source(f"flickr:{tmp_path}", "train")


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_recipe_command_line_keeps_held_out_digits_out_of_training(tmp_path, capsys):
  # A fake MNIST test split whose labels tell the ranges apart: 0-4 below 8000, 5-9 above.
  labels = np.concatenate([np.arange(8000) % 5, 5 + np.arange(2000) % 5])
  images = np.random.default_rng(0).integers(0, 255, (10000, 28, 28))
  mnist = tmp_path / "mnist"
  mnist.mkdir()
  _write_idx(mnist / "t10k-images-idx3-ubyte.gz", images)
  _write_idx(mnist / "t10k-labels-idx1-ubyte.gz", labels)
  out = tmp_path / "digits"
  assert main(["--kind", "digits", "--mnist", str(mnist), "--out", str(out), "--train", "12",
               "--val", "6"]) == 0
  assert "captions_val.json" in capsys.readouterr().out
  train = load_source(f"coco_captions:{out}", "train")
  held_out = load_source(f"coco_captions:{out}", "val")
  assert {s.shape for s in train.images} == {(28, 140, 1)} and len(held_out) == 6
  assert {w for c in train.all_captions() for w in c.split()} <= set(DIGIT_WORDS[:5])
  assert {w for c in held_out.all_captions() for w in c.split()} <= set(DIGIT_WORDS[5:])
  assert main(["--kind", "shapes", "--out", str(tmp_path / "s"), "--train", "3",
               "--val", "2"]) == 0
  assert len(load_source(f"coco_captions:{tmp_path / 's'}", "val").captions[0]) == 3
  assert main(["--kind", "digits", "--out", str(tmp_path / "x")]) == 2
  assert "needs --mnist" in capsys.readouterr().err


@pytest.mark.slow
def test_tfds_coco_captions_with_mock_data():
  tf = pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")

  def png(i):
    buffer = io.BytesIO()
    Image.fromarray(np.full((6 + i, 8, 3), 10 * i, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()

  def as_dataset(self, split, *args, **kwargs):
    del self, args, kwargs
    n = {"train": 3, "val": 2}[str(split).split("[")[0]]

    def examples():
      for i in range(n):
        yield {"image": png(i), "image/id": np.int64(100 + i),
               "captions": {"id": np.arange(2, dtype=np.int64),
                            "text": np.array([f"caption {i} a".encode(), b"  "])}}

    signature = {"image": tf.TensorSpec((), tf.string), "image/id": tf.TensorSpec((), tf.int64),
                 "captions": {"id": tf.TensorSpec((None,), tf.int64),
                              "text": tf.TensorSpec((None,), tf.string)}}
    return tf.data.Dataset.from_generator(examples, output_signature=signature)

  config = _config("coco_captions:tfds", skip_bad=True)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(ValueError, match="image_id 100 has 1 empty caption"):
      load_source("coco_captions:tfds", "train")
    source = load_source("coco_captions:tfds", "train+val[:1]", data_config=config.data)
  assert source.captions == [("caption 0 a",), ("caption 1 a",), ("caption 2 a",),
                             ("caption 0 a",)]
  assert len(source.skipped) == 5  # the blank caption of each example read (all of val)
  np.testing.assert_array_equal(source.image_ids, [100, 101, 102, 100])
  np.testing.assert_array_equal(source.ids, [0, 1, 2, 3])
  # The encoded images decode through the same transform as files.
  batch = build_transform(config.data, train=False, task="captioning", image_size=16)(
      source.get_batch(np.arange(2)), np.random.default_rng(0))
  assert batch["image"].shape == (2, 16, 16, 3)
