"""Transforms and augmentation: normalization, crops, flips, RandAugment, erasing, joint seg ops."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from configs import base
from jaxvision.data import Normalize, build_transform
from jaxvision.data import seg_augment as seg
from jaxvision.data.augment import parse_augment
from jaxvision.data.decode import EncodedImage, decode_crop_resize
from jaxvision.data.randaugment import OPS, rand_augment
from jaxvision.data.transforms import center_box, inception_box, normalization


def data_config(**overrides):
  c = base.get_config().data
  c.workers = 1
  for k, v in overrides.items():
    c[k] = v
  return c


# --- Normalization -----------------------------------------------------------------------------


def test_normalize_half_maps_unit_interval_to_minus_one_one():
  values = np.array([0.0, 0.5, 1.0], np.float32)
  image = np.stack([values] * 3, axis=-1)  # [3, C=3]
  out = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(image)
  np.testing.assert_allclose(out, np.stack([[-1.0, 0.0, 1.0]] * 3, axis=-1))


def test_normalize_presets_and_explicit_statistics():
  assert normalization("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert normalization("(0.5,0.5,0.5),(0.5,0.5,0.5)") == ((0.5,) * 3, (0.5,) * 3)
  assert normalization("0.1307/0.3081") == ((0.1307,), (0.3081,))
  with pytest.raises(ValueError, match="data.normalize='imagenett' is not a preset"):
    normalization("imagenett")
  with pytest.raises(ValueError, match="3 channels but the images have 1"):
    Normalize(*normalization("imagenet"))(np.zeros((2, 4, 4, 1), np.float32))


def test_imagenet_preset_per_channel():
  image = np.ones((1, 2, 2, 3), np.uint8) * 255
  out = build_transform(data_config(normalize="imagenet"), train=False, task="classification",
                        image_size=2)({"image": image, "label": np.zeros(1)}, None)["image"]
  np.testing.assert_allclose(out[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) /
                             np.array([0.229, 0.224, 0.225]), rtol=1e-6)


# --- Spec parsing ------------------------------------------------------------------------------


def test_augment_spec_parses_names_and_arguments():
  ops = parse_augment("inception_crop, flip,randaug(2, 9),erase(0.25)", "classification")
  assert ops == {"inception_crop": (0.08,), "flip": (), "randaug": (2.0, 9.0), "erase": (0.25,)}
  assert parse_augment("elastic,flip,rot90,crop,jitter", "segmentation")["elastic"] == (10.0, 3)
  with pytest.raises(ValueError, match="unknown classification augmentation 'rot90'; known: "):
    parse_augment("flip,rot90", "classification")
  with pytest.raises(ValueError, match="randaug takes at most 2 arguments"):
    parse_augment("randaug(1,2,3)", "classification")
  with pytest.raises(ValueError, match="erase.p. needs 0 <= p <= 1"):
    parse_augment("erase(2)", "classification")


# --- Classification geometry -------------------------------------------------------------------


def test_inception_box_stays_inside_with_area_and_ratio_in_range():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = inception_box(500, 375, rng)
    assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
    w, h = right - left, bottom - top
    area = w * h / (500 * 375)
    assert 0.08 - 0.01 <= area <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_center_box_is_the_standard_eval_crop():
  assert center_box(500, 400, 0.875) == pytest.approx((75, 25, 425, 375))


def test_eval_resize_center_crops_and_keeps_orientation():
  # A 40x20 image whose left half is white: the eval crop keeps the center square (20x20 ->
  # 17.5 px), whose left part is white and right part black.
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :20] = 255
  out = decode_crop_resize(image, lambda w, h: center_box(w, h, 0.875), 8)
  assert out.shape == (8, 8, 3)
  assert out[:, :3].mean() > 200 and out[:, 5:].mean() < 50


def test_jpeg_draft_decoding_matches_full_decoding():
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  big = np.asarray(Image.fromarray(small).resize((640, 480), Image.BILINEAR))
  buffer = io.BytesIO()
  Image.fromarray(big).save(buffer, format="JPEG", quality=95)
  item = EncodedImage(data=buffer.getvalue())
  box = lambda w, h: center_box(w, h, 1.0)
  fast = decode_crop_resize(item, box, 32).astype(np.float32)
  full = decode_crop_resize(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), box, 32)
  assert np.abs(fast - full).mean() < 4.0


def test_double_flip_is_identity():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
  flipped = images[:, :, ::-1]
  np.testing.assert_array_equal(flipped[:, :, ::-1], images)
  image, mask = images[0].astype(np.float32), images[0, ..., 0].astype(np.int32)
  for seed in range(8):
    r = np.random.default_rng(seed)
    once = seg.flip(image, mask, r)
    r = np.random.default_rng(seed)
    twice = seg.flip(*seg.flip(image, mask, r), np.random.default_rng(seed))
    np.testing.assert_array_equal(twice[0], image)
    np.testing.assert_array_equal(twice[1], mask)
    assert once[0].shape == image.shape


def test_flip_flips_about_half_of_the_batch():
  images = np.arange(64 * 4 * 4, dtype=np.float32).reshape(64, 4, 4, 1) % 255
  out = build_transform(data_config(augment="flip"), train=True, task="classification",
                        image_size=4)({"image": images.astype(np.uint8), "label": np.zeros(64)},
                                      np.random.default_rng(0))["image"]
  same = [np.allclose(o, i / 255) for o, i in zip(out, images, strict=True)]
  mirrored = [np.allclose(o, i[:, ::-1] / 255) for o, i in zip(out, images, strict=True)]
  assert all(s or m for s, m in zip(same, mirrored, strict=True))
  assert 16 < sum(mirrored) < 48


def test_train_transform_is_deterministic_and_shaped():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8) for i in range(4)]
  batch = {"image": images, "label": np.arange(4)}
  fn = build_transform(data_config(augment="inception_crop,flip,randaug(2,9),erase(0.5)",
                                   normalize="imagenet"),
                       train=True, task="classification", image_size=16)
  a = fn(batch, np.random.default_rng([1, 2]))["image"]
  b = fn(batch, np.random.default_rng([1, 2]))["image"]
  c = fn(batch, np.random.default_rng([1, 3]))["image"]
  assert a.shape == (4, 16, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_pad_crop_shifts_within_the_padding():
  image = np.zeros((1, 8, 8, 1), np.uint8)
  image[0, 3, 3] = 255
  fn = build_transform(data_config(augment="pad_crop(2)"), train=True, task="classification",
                       image_size=8)
  for seed in range(10):
    out = fn({"image": image, "label": np.zeros(1)}, np.random.default_rng(seed))["image"]
    out = out[0, ..., 0]
    (y,), (x,) = np.nonzero(out)
    assert abs(y - 3) <= 2 and abs(x - 3) <= 2


def test_random_erase_fills_one_rectangle():
  images = np.full((32, 16, 16, 1), 128, np.uint8)
  fn = build_transform(data_config(augment="erase(1.0)"), train=True, task="classification",
                       image_size=16)
  out = fn({"image": images, "label": np.zeros(32)}, np.random.default_rng(0))["image"]
  changed = ~np.isclose(out, 128 / 255)
  for m in changed[..., 0]:
    ys, xs = np.nonzero(m)
    assert len(ys) > 0
    # The changed pixels fill their bounding box: one rectangle.
    assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert 0.02 * 256 * 0.5 <= len(ys) <= 256 / 3 * 1.2


@pytest.mark.parametrize("name", sorted(OPS))
def test_randaugment_ops_keep_shape_and_dtype(name):
  rng = np.random.default_rng(0)
  for channels in (1, 3):
    image = rng.integers(0, 256, (12, 10, channels), dtype=np.uint8)
    from PIL import Image as PILImage

    pil = PILImage.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(OPS[name](pil, 0.9))
    assert out.shape[:2] == (12, 10) and out.dtype == np.uint8


def test_randaugment_magnitude_zero_changes_little_and_ten_changes_more():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  weak = [np.abs(rand_augment(image, np.random.default_rng(s), 2, 0).astype(int) - image).mean()
          for s in range(20)]
  strong = [np.abs(rand_augment(image, np.random.default_rng(s), 2, 10).astype(int) - image).mean()
            for s in range(20)]
  assert np.mean(strong) > np.mean(weak) + 10


# --- Segmentation: joint transforms keep image and mask aligned ----------------------------------


def _labelled_pair(h=24, w=24, classes=4, seed=0):
  """A mask of blocks and an image that encodes the class of every pixel (value = class * 0.25)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, classes, (h // 6, w // 6))
  mask = np.kron(coarse, np.ones((6, 6), int)).astype(np.int32)
  image = (mask[..., None] * 0.25).astype(np.float32)
  return image, mask


@pytest.mark.parametrize("op", ["flip", "hflip", "rot90"])
def test_joint_flip_and_rot90_keep_alignment(op):
  image, mask = _labelled_pair()
  for seed in range(8):
    out_image, out_mask = getattr(seg, op)(image, mask, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.round(out_image[..., 0] / 0.25).astype(int), out_mask)


def test_hflip_never_turns_the_image_upside_down():
  image, mask = _labelled_pair()
  outcomes = set()
  for seed in range(16):
    out_image, out_mask = seg.hflip(image, mask, np.random.default_rng(seed))
    assert np.array_equal(out_mask, mask) or np.array_equal(out_mask, mask[:, ::-1])
    outcomes.add(np.array_equal(out_mask, mask))
  assert outcomes == {True, False}
  with pytest.raises(ValueError, match="drop 'hflip'"):
    parse_augment("crop,flip,hflip", "segmentation")


def test_joint_crop_keeps_alignment_and_mirror_pads():
  image, mask = _labelled_pair()
  for seed in range(5):
    ci, cm = seg.crop(image, mask, 16, np.random.default_rng(seed))
    assert ci.shape == (16, 16, 1) and cm.shape == (16, 16)
    np.testing.assert_array_equal(np.round(ci[..., 0] / 0.25).astype(int), cm)
  big_image, big_mask = seg.crop(image, mask, 30, None)
  assert big_image.shape == (30, 30, 1)
  np.testing.assert_array_equal(np.round(big_image[..., 0] / 0.25).astype(int), big_mask)


def test_elastic_deformation_moves_pixels_and_keeps_alignment():
  image, mask = _labelled_pair(48, 48)
  moved_total = 0
  for seed in range(4):
    out_image, out_mask = seg.elastic(image, mask, np.random.default_rng(seed), sigma=10, grid=3)
    assert out_mask.dtype == mask.dtype and set(np.unique(out_mask)) <= set(np.unique(mask))
    moved_total += np.mean(out_mask != mask)
    # Away from class edges (where cubic and nearest resampling legitimately differ) the
    # deformed image still reads as the deformed mask's class.
    interior = ndimage.maximum_filter(out_mask, 3) == ndimage.minimum_filter(out_mask, 3)
    agree = np.round(out_image[..., 0] / 0.25).astype(int) == out_mask
    assert agree[interior].mean() > 0.99
    # Control: a mask deformed by another draw does not line up.
    _, other_mask = seg.elastic(image, mask, np.random.default_rng(seed + 100), sigma=10, grid=3)
    assert (np.round(out_image[..., 0] / 0.25).astype(int) == other_mask)[interior].mean() < 0.9
  assert moved_total / 4 > 0.05  # the deformation is real, not the identity


def test_displacement_field_is_smooth_with_the_given_scale():
  rng = np.random.default_rng(0)
  fields = np.stack([seg.displacement_field((64, 64), rng, 10.0, 3) for _ in range(50)])
  corners = fields[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # control points are interpolated exactly
  assert 7.0 < corners.std() < 13.0
  assert np.abs(np.diff(fields, axis=-1)).max() < 3.0  # smooth: no pixel-to-pixel jumps


def test_segmentation_transform_train_crops_and_eval_keeps_full_images():
  image, mask = _labelled_pair(36, 36)
  batch = {"image": np.stack([(image * 255).astype(np.uint8)] * 2), "label": np.stack([mask] * 2)}
  train = build_transform(data_config(augment="crop,flip,rot90"), train=True,
                          task="segmentation", image_size=16)
  out = train(batch, np.random.default_rng(0))
  assert out["image"].shape == (2, 16, 16, 1) and out["label"].shape == (2, 16, 16)
  for im, m in zip(out["image"], out["label"], strict=True):
    np.testing.assert_array_equal(np.round(im[..., 0] * 255 / 63.75).astype(int), m)
  evaluation = build_transform(data_config(augment="crop,flip"), train=False,
                               task="segmentation", image_size=16)
  assert evaluation(batch, np.random.default_rng(0))["image"].shape == (2, 36, 36, 1)


def test_jitter_changes_only_the_image():
  image, mask = _labelled_pair()
  out = seg.jitter(image, np.random.default_rng(0), 0.2)
  assert out.shape == image.shape and not np.allclose(out, image)
  assert out.min() >= 0 and out.max() <= 1


def test_input_benchmark_runs_on_tiny_images():
  from jaxvision.data.bench import measure, stage_costs, synthetic_jpegs

  jpegs = synthetic_jpegs(2, 64, 48)
  result = measure(jpegs, size=32, batch=4, workers=2, seconds=0.05)
  assert result["images_per_sec"] > 0 and result["images_per_cpu_sec"] > 0
  assert set(stage_costs(jpegs, size=32, batch=4, repeats=1)["stage_cpu_ms_per_image"]) == {
      "jpeg_decode_full", "decode_inception_crop_resize", "flip", "normalize"}


def test_eval_keeps_images_that_already_have_the_target_size():
  rng = np.random.default_rng(0)
  exact = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  larger = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
  fn = build_transform(data_config(), train=False, task="classification", image_size=8)
  out = fn({"image": [exact, larger], "label": np.zeros(2)}, np.random.default_rng(0))["image"]
  np.testing.assert_allclose(out[0], exact / 255, atol=1e-6)
  assert out.shape == (2, 8, 8, 3)
