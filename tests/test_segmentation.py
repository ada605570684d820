"""Segmentation: losses, exact confusion-matrix metrics (also over 4 devices with a padded batch),
the U-Net weight map, overlap-tile inference, overlays and a few real training steps."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image
from scipy import ndimage

from configs import base
from conftest import xla_flags
from jaxvision.models import create_model
from jaxvision.segmentation import (
    add_weight_map,
    confusion_matrix,
    confusion_metrics,
    dihedral_logits,
    label_shift_profile,
    predict_and_save_overlays,
    predict_tiled,
    save_overlays,
    tta_logits,
    unet_weight_map,
)
from jaxvision.tasks import create_task
from jaxvision.tasks.segmentation import SegmentationTask


def seg_config(num_classes: int, **seg) -> ml_collections.ConfigDict:
  """A resolved-looking segmentation run config (what the tasks read)."""
  c = base.get_config()
  c.task, c.num_classes, c.data_info.image_shape = "segmentation", num_classes, (8, 8, 1)
  c.seg.update(seg)
  return c

# Five 2x3 examples: true classes and predicted classes (K = 3), counted by hand below.
LABELS = np.array([
    [[0, 0, 1], [1, 2, 2]],
    [[0, 1, 1], [2, 2, 0]],
    [[2, 2, 2], [2, 2, 2]],
    [[0, 0, 0], [1, 1, 1]],
    [[1, 0, 2], [0, 1, 0]],
])
PREDS = np.array([
    [[0, 1, 1], [1, 2, 0]],
    [[0, 1, 2], [2, 2, 0]],
    [[2, 2, 1], [2, 2, 2]],
    [[0, 0, 1], [1, 1, 0]],
    [[1, 0, 2], [0, 0, 0]],
])
# Rows: true class; columns: predicted class. Each cell counted from the arrays above.
HAND_CONFUSION = np.array([
    # pred 0, 1, 2
    [8, 2, 0],  # true 0: 10 pixels
    [2, 6, 1],  # true 1:  9 pixels
    [1, 1, 9],  # true 2: 11 pixels
])


def logits_for(preds, k=3):
  """Logits whose argmax is `preds`, with varied margins."""
  rng = np.random.default_rng(0)
  return (np.eye(k)[preds] * 3.0 + rng.uniform(0, 1, preds.shape + (k,))).astype(np.float32)


LOGITS = logits_for(PREDS)


def test_hand_confusion_matrix_and_metrics():
  assert HAND_CONFUSION.sum() == LABELS.size
  got = confusion_matrix(jnp.asarray(LABELS), jnp.asarray(PREDS), 3)
  np.testing.assert_array_equal(got, HAND_CONFUSION)
  m = confusion_metrics(HAND_CONFUSION)
  assert m["pixel_accuracy"] == pytest.approx(23 / 30)
  assert m["pixel_error"] == pytest.approx(7 / 30)
  # IoU_k = tp / (true + pred - tp): 8/(10+11-8), 6/(9+9-6), 9/(11+10-9)
  iou = [8 / 13, 6 / 12, 9 / 12]
  for k in range(3):
    assert m[f"iou_{k}"] == pytest.approx(iou[k])
  assert m["miou"] == pytest.approx(np.mean(iou))
  dice = [16 / 21, 12 / 18, 18 / 21]
  assert m["dice"] == pytest.approx(np.mean(dice))
  # An absent class (never true, never predicted) is left out of the means.
  m4 = confusion_metrics(np.pad(HAND_CONFUSION, ((0, 1), (0, 1))))
  assert np.isnan(m4["iou_3"]) and m4["miou"] == pytest.approx(np.mean(iou))


def test_labels_outside_the_classes_are_ignored():
  labels = LABELS.copy()
  labels[0, 0, 0] = 255
  got = np.asarray(confusion_matrix(jnp.asarray(labels), jnp.asarray(PREDS), 3))
  expected = HAND_CONFUSION.copy()
  expected[0, 0] -= 1
  np.testing.assert_array_equal(got, expected)


def _padded_batches(per_batch):
  """LABELS/PREDS in batches of `per_batch`; the last batch padded with garbage, valid=False."""
  n = len(LABELS)
  batches = []
  for lo in range(0, n, per_batch):
    rows = np.arange(lo, lo + per_batch)
    valid = rows < n
    rows = np.where(valid, rows, 2)  # padding repeats example 2 (all class 2): it must not count
    batches.append({"label": LABELS[rows], "logits": LOGITS[rows], "valid": valid})
  return batches


def four_device_eval() -> dict:
  """eval_sums under pmap over 4 devices, psum'd, added over batches, then finalized."""
  task = SegmentationTask(3)

  def step(logits, batch):
    return jax.lax.psum(task.eval_sums(logits, batch), "batch")

  pstep = jax.pmap(step, axis_name="batch", devices=jax.devices()[:4])
  total, per_device = None, []
  for b in _padded_batches(4):
    shard = lambda x: x.reshape((4, x.shape[0] // 4) + x.shape[1:])
    sums = pstep(shard(b["logits"]), {"label": shard(b["label"]), "valid": shard(b["valid"])})
    per_device.append(int(sums["count"].shape[0]))
    sums = jax.tree.map(lambda x: np.asarray(x[0]), sums)  # psum: every device holds the total
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return {"confusion": total["confusion"].tolist(), "devices": per_device,
          **task.finalize(total, {})}


def test_eval_sums_over_four_devices_with_padded_final_batch():
  if len(jax.devices()) >= 4:
    got = four_device_eval()
  else:  # the backend is already up with fewer devices: fake 4 in a fresh process
    env = {**os.environ, "XLA_FLAGS": xla_flags(4),
           "JAX_PLATFORMS": "cpu"}
    here = os.path.abspath(__file__)
    code = (f"import json, runpy; m = runpy.run_path({here!r}); "
            "print(json.dumps(m['four_device_eval']()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(here)))
    got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["devices"] == [4, 4]  # two batches, the second with 3 padded examples
  np.testing.assert_array_equal(got["confusion"], HAND_CONFUSION)
  assert got["pixel_error"] == pytest.approx(7 / 30)
  assert got["miou"] == pytest.approx(np.mean([8 / 13, 6 / 12, 9 / 12]))


def test_eval_loss_is_exact_over_batches_and_matches_numpy():
  task = SegmentationTask(3, ("cross_entropy",), class_weights=(1.0, 2.0, 0.5))
  total = None
  for b in _padded_batches(2):
    sums = jax.tree.map(np.asarray, task.eval_sums(jnp.asarray(b["logits"]), b))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  got = task.finalize(total, {})
  logits = LOGITS
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, LABELS[..., None], -1)[..., 0]
  w = np.array([1.0, 2.0, 0.5])[LABELS]
  assert got["loss"] == pytest.approx((ce * w).sum() / LABELS.size, rel=1e-5)
  assert int(total["count"]) == LABELS.size
  assert got["pixel_error"] == pytest.approx(7 / 30)


def test_training_loss_weights_crop_dice_and_bce():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, (2, 8, 8))
  logits = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)  # a 'valid' net: smaller output
  weight = rng.uniform(0.5, 3.0, (2, 8, 8)).astype(np.float32)
  batch = {"label": labels, "weight": weight}
  crop = lambda x: x[:, 2:6, 2:6]
  y, wm = crop(labels), crop(weight)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  loss, metrics = SegmentationTask(2, class_weights=(1.0, 3.0)).loss(jnp.asarray(logits), batch)
  assert float(loss) == pytest.approx(np.mean(ce * np.array([1.0, 3.0])[y] * wm), rel=1e-5)
  assert float(metrics["pixel_accuracy"]) == pytest.approx(np.mean(logits.argmax(-1) == y))
  # Soft Dice over the batch, per class then averaged, with smoothing 1.
  p = np.exp(logp)
  g = np.eye(2)[y]
  dice = np.mean([(2 * (p * g)[..., k].sum() + 1) / (p[..., k].sum() + g[..., k].sum() + 1)
                  for k in range(2)])
  loss, _ = SegmentationTask(2, ("dice",)).loss(jnp.asarray(logits), {"label": labels})
  assert float(loss) == pytest.approx(1 - dice, rel=1e-5)
  # BCE with one sigmoid channel: the logit of class 1.
  z = logits[..., 1:] - logits[..., :1]
  bce = np.log1p(np.exp(-z[..., 0])) * (y == 1) + np.log1p(np.exp(z[..., 0])) * (y == 0)
  loss, _ = SegmentationTask(2, ("bce",)).loss(jnp.asarray(z), {"label": labels})
  assert float(loss) == pytest.approx(bce.mean(), rel=1e-5)
  # bfloat16 logits are computed in float32.
  loss16, _ = SegmentationTask(2).loss(jnp.asarray(logits, jnp.bfloat16), {"label": labels})
  assert loss16.dtype == jnp.float32


def test_task_from_config_and_errors():
  c = seg_config(2, loss="cross_entropy+dice", class_weights=(1.0, 2.0))
  task = create_task(c)
  assert task.loss_terms == ("cross_entropy", "dice") and task.class_weights == (1.0, 2.0)
  assert task.input_spec(3)["label"].shape == (3, 8, 8)
  c.seg.loss = "focal"
  with pytest.raises(ValueError, match="focal"):
    create_task(c)
  c.seg.loss = "cross_entropy"
  c.num_classes = 3
  with pytest.raises(ValueError, match="class_weights"):
    create_task(c)
  c.num_classes, c.seg.class_weights = 2, ()
  c.mixup_alpha = 0.2
  with pytest.raises(ValueError, match="mixup"):
    create_task(c)
  with pytest.raises(ValueError, match="crop"):
    SegmentationTask(2).loss(jnp.zeros((1, 8, 8, 2)), {"label": np.zeros((1, 4, 4), np.int32)})


# -- test-time augmentation ----------------------------------------------------------------------

def _position_dependent(x):
  """Logits that depend on where a pixel is, so every dihedral version predicts differently."""
  h, w = x.shape[1], x.shape[2]
  ramp = jnp.arange(h)[:, None] * 0.3 - jnp.arange(w)[None, :] * 0.7
  ramp = ramp + 0.1 * (jnp.arange(h * w).reshape(h, w) % 5)
  first = x[..., 0] * 2.0 + ramp
  return jnp.stack([first, -first * 0.5, jnp.sin(first)], axis=-1)


def test_dihedral_logits_average_the_eight_versions_by_hand():
  x = np.random.default_rng(1).normal(size=(2, 6, 4, 1)).astype(np.float32)  # not square
  total = np.zeros((2, 6, 4, 3))
  for flip in (False, True):
    for k in range(4):
      version = np.rot90(x[:, :, ::-1] if flip else x, k, axes=(1, 2))
      back = np.rot90(np.asarray(_position_dependent(jnp.asarray(version))), -k, axes=(1, 2))
      back = back[:, :, ::-1] if flip else back
      total += np.asarray(jax.nn.softmax(back, -1))
  np.testing.assert_allclose(np.exp(dihedral_logits(_position_dependent, jnp.asarray(x))),
                             total / 8, rtol=1e-5, atol=1e-6)


def test_dihedral_logits_leave_a_pointwise_model_unchanged_and_keep_sigmoid_outputs():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 5, 1)), jnp.float32)
  pointwise = lambda images: jnp.concatenate([images, -images], -1)  # noqa: E731
  np.testing.assert_allclose(dihedral_logits(pointwise, x), jax.nn.log_softmax(pointwise(x)),
                             atol=1e-5)
  single = dihedral_logits(lambda images: images * 3.0, x)  # one channel: a sigmoid logit
  assert single.shape == (1, 5, 5, 1)
  np.testing.assert_allclose(single, x * 3.0, atol=1e-4)
  with pytest.raises(ValueError, match="B, H, W, C"):
    dihedral_logits(pointwise, x[0])


def test_hflip_tta_averages_the_input_and_its_mirror():
  x = np.random.default_rng(4).normal(size=(2, 6, 4, 1)).astype(np.float32)
  plain = np.asarray(jax.nn.softmax(_position_dependent(jnp.asarray(x)), -1))
  mirrored = np.asarray(jax.nn.softmax(_position_dependent(jnp.asarray(x[:, :, ::-1])), -1))
  np.testing.assert_allclose(np.exp(tta_logits(_position_dependent, jnp.asarray(x), "hflip")),
                             (plain + mirrored[:, :, ::-1]) / 2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'vflip'"):
    tta_logits(_position_dependent, jnp.asarray(x), "vflip")


def _translated_reference(apply_fn, x, versions, shift):
  """The shifted average written out with loops: every pixel over the versions that cover it."""
  b, h, w, _ = x.shape
  total, count = 0.0, np.zeros((h, w, 1))
  padded = np.pad(x, ((0, 0), (shift, 0), (shift, 0), (0, 0)), mode="reflect")
  for dy in (0, shift):
    for dx in (0, shift):
      version = padded[:, shift - dy:shift - dy + h, shift - dx:shift - dx + w]
      probs = np.exp(np.asarray(tta_logits(apply_fn, jnp.asarray(version), versions)))
      moved = np.zeros_like(probs)
      moved[:, :h - dy, :w - dx] = probs[:, dy:, dx:]  # version pixel (a+dy, b+dx) is input (a, b)
      total = total + moved
      count[:h - dy, :w - dx] += 1
  return total / count


def test_shifted_tta_averages_the_translated_versions_moved_back():
  x = np.random.default_rng(5).normal(size=(2, 7, 6, 1)).astype(np.float32)
  for versions in ("none", "hflip"):
    np.testing.assert_allclose(
        np.exp(tta_logits(_position_dependent, jnp.asarray(x), versions, shift=2)),
        _translated_reference(_position_dependent, x, versions, 2), rtol=1e-5, atol=1e-6)
  # A pointwise model predicts the same pixel the same wherever it sits: nothing changes.
  pointwise = lambda images: jnp.concatenate([images, -images], -1)  # noqa: E731
  np.testing.assert_allclose(tta_logits(pointwise, jnp.asarray(x), "none", shift=3),
                             jax.nn.log_softmax(pointwise(jnp.asarray(x))), atol=1e-5)
  with pytest.raises(ValueError, match="test-time shift 6"):
    tta_logits(pointwise, jnp.asarray(x), "none", shift=6)


def test_task_evaluates_the_dihedral_average_when_configured():
  c = seg_config(3)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 1)), jnp.float32)
  plain = create_task(c)
  np.testing.assert_array_equal(plain.predict(_position_dependent, {"image": x}),
                                _position_dependent(x))
  c.seg.tta = "dihedral"
  np.testing.assert_allclose(create_task(c).predict(_position_dependent, {"image": x}),
                             dihedral_logits(_position_dependent, x))
  c.seg.tta = "hflip"
  np.testing.assert_allclose(create_task(c).predict(_position_dependent, {"image": x}),
                             tta_logits(_position_dependent, x, "hflip"))
  c.seg.tta_shift = 2
  np.testing.assert_allclose(create_task(c).predict(_position_dependent, {"image": x}),
                             tta_logits(_position_dependent, x, "hflip", shift=2))
  c.seg.tta = ""
  np.testing.assert_allclose(create_task(c).predict(_position_dependent, {"image": x}),
                             tta_logits(_position_dependent, x, "none", shift=2))
  c.seg.tta_shift = -1
  with pytest.raises(ValueError, match="seg.tta_shift=-1"):
    create_task(c)
  c.seg.tta, c.seg.tta_shift = "rot45", 0
  with pytest.raises(ValueError, match="seg.tta='rot45'"):
    create_task(c)


# -- label alignment ------------------------------------------------------------------------------

def test_label_shift_profile_finds_labels_drawn_one_row_too_high():
  rng = np.random.default_rng(0)
  images, masks = [], []
  for _ in range(3):
    image = rng.uniform(150, 200, (32, 40))
    rows, cols = rng.choice(np.arange(4, 28), 4, replace=False), rng.choice(np.arange(4, 36), 4)
    image[rows] = 20.0  # dark "membranes": horizontal and vertical lines
    image[:, cols] = 20.0
    mask = (image > 100).astype(np.int32)  # 0 on the lines
    images.append(image)
    masks.append(np.roll(mask, -1, axis=0))  # labels drawn one row above the lines
  profile = label_shift_profile(images, masks, label=0, max_shift=2)
  assert profile.shape == (5, 5)
  # Moving the labels back down one row (dy = +1) puts them on the darkest pixels.
  assert np.unravel_index(np.argmin(profile), profile.shape) == (3, 2)
  aligned = label_shift_profile(images, [np.roll(m, 1, axis=0) for m in masks], label=0)
  assert np.unravel_index(np.argmin(aligned), aligned.shape) == (2, 2)
  with pytest.raises(ValueError, match="differ in size"):
    label_shift_profile([images[0]], [masks[0][:-1]], label=0)
  with pytest.raises(ValueError, match="label 7 is absent"):
    label_shift_profile(images, masks, label=7)


# -- weight map -----------------------------------------------------------------------------------

def brute_force_weight_map(mask, w0=10.0, sigma=5.0):
  """Full distance transform per cell, no truncation."""
  labels, n = ndimage.label(mask == 1)
  d = np.sort(np.stack([ndimage.distance_transform_edt(labels != i) for i in range(1, n + 1)]), 0)
  counts = np.bincount(mask.ravel(), minlength=2)
  wc = (mask.size / (2 * counts))[mask]
  border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
  return wc + np.where(mask == 1, 0.0, border)


def test_weight_map_matches_the_formula():
  mask = np.zeros((40, 50), np.int32)
  mask[5:15, 5:20] = 1  # cell A
  mask[5:15, 22:40] = 1  # cell B: a 2-pixel gap from A
  mask[25:35, 10:30] = 1  # cell C: far below
  mask[30:33, 45:48] = 1  # cell D: small
  w = unet_weight_map(mask)
  np.testing.assert_allclose(w, brute_force_weight_map(mask), atol=1e-3)
  # In the 2-pixel gap between A and B: d1 = 1, d2 = 2.
  frac_cells = mask.mean()
  assert w[10, 20] == pytest.approx(1 / (2 * (1 - frac_cells)) + 10 * np.exp(-9 / 50), rel=1e-5)
  # Cells and the image without two cells carry only the class weights.
  assert w[10, 10] == pytest.approx(1 / (2 * frac_cells), rel=1e-5)
  one = np.zeros((20, 20), np.int32)
  one[5:10, 5:10] = 1
  np.testing.assert_allclose(unet_weight_map(one, balance=False), 1.0)
  batch = add_weight_map({"label": np.stack([mask, mask]), "image": np.zeros((2, 40, 50, 1))})
  assert batch["weight"].shape == (2, 40, 50) and batch["weight"].dtype == np.float32
  with pytest.raises(ValueError, match="sigma"):
    unet_weight_map(mask, sigma=0)


# -- overlap-tile inference ----------------------------------------------------------------------

def _tiny_apply(size=32, **kwargs):
  model = create_model("unet_tiny", batch_norm=False, **kwargs)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * (0.4 if a.ndim > 1 else 0.1), a.dtype),
      abstract,
  )
  return jax.jit(lambda x: model.apply(variables, x))


def test_overlap_tile_equals_whole_image_for_same_padding():
  apply_fn = _tiny_apply()
  image = np.random.default_rng(2).normal(size=(2, 37, 45, 1)).astype(np.float32)
  margin = 32  # covers the receptive field of the depth-2 network; tiles align with pooling
  tiled = predict_tiled(apply_fn, image, tile=16, margin=margin, batch_size=8)
  assert tiled.shape == (2, 37, 45, 2)
  # Whole image at once, with the same mirrored border (sized so the network accepts it).
  padded = np.pad(image, ((0, 0), (margin, margin + 3), (margin, margin + 3), (0, 0)),
                  mode="reflect")
  whole = np.asarray(apply_fn(padded))[:, margin:margin + 37, margin:margin + 45]
  np.testing.assert_allclose(tiled, whole, atol=1e-5)
  single = predict_tiled(apply_fn, image[0], tile=(16, 32), margin=(32, 32), batch_size=3)
  np.testing.assert_allclose(single, whole[0], atol=1e-5)


def test_overlap_tile_with_valid_padding_and_errors():
  apply_fn = _tiny_apply(44, padding="valid")  # 44 -> 4: margin 20
  image = np.random.default_rng(3).normal(size=(10, 9, 1)).astype(np.float32)
  tiled = predict_tiled(apply_fn, image, tile=4, margin=20, batch_size=4)
  padded = np.pad(image[None], ((0, 0), (20, 20 + 2), (20, 20 + 3), (0, 0)), mode="reflect")
  assert tiled.shape == (10, 9, 2)
  whole = np.asarray(apply_fn(padded[:, :52, :52]))[0]  # 52 -> 12: the 3x3 tiles' area
  # Outputs reach ~1e3 (random weights): float32 sums in another order differ by ~2e-5 of them.
  np.testing.assert_allclose(tiled, whole[:10, :9], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="expected"):
    predict_tiled(apply_fn, image, tile=4, margin=24)
  with pytest.raises(ValueError, match="tile"):
    predict_tiled(apply_fn, image, tile=0, margin=20)


# -- overlays and a few real steps ---------------------------------------------------------------

def test_save_overlays_marks_errors(tmp_path):
  images = np.random.default_rng(0).uniform(size=(2, 12, 10, 1)).astype(np.float32)
  labels = np.zeros((2, 12, 10), np.int32)
  labels[:, 4:8] = 1
  preds = labels.copy()
  preds[0, 0, 0] = 1  # one wrong pixel
  paths = save_overlays(str(tmp_path / "eval_"), images, labels, preds)
  assert [os.path.basename(p) for p in paths] == ["eval_000.png", "eval_001.png"]
  png = np.asarray(Image.open(paths[0]))
  assert png.shape == (12, 30, 3)
  assert tuple(png[0, 20]) == (255, 30, 30)  # error panel: the wrong pixel is red
  assert tuple(png[1, 21]) != (255, 30, 30)
  assert tuple(png[3, 12]) == (255, 230, 0)  # prediction panel: boundary of class 1 (row 3)
  with pytest.raises(ValueError, match="match"):
    save_overlays(str(tmp_path / "x"), images, labels, preds[:1])


def test_a_few_training_steps_learn_a_synthetic_segmentation(tmp_path):
  model = create_model("unet_tiny", num_classes=2)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(8, 32, 32, 1)).astype(np.float32)
  images = ndimage.uniform_filter(images, size=(1, 5, 5, 1))
  images = (images - images.mean()) / images.std()
  labels = (images[..., 0] > np.median(images)).astype(np.int32)  # blobs of local brightness
  task = create_task(seg_config(2, loss="cross_entropy+dice"))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.asarray(rng.normal(size=a.shape) * np.sqrt(2 / np.prod(a.shape[:-1])),
                               a.dtype) if a.ndim > 1 else
      jnp.full(a.shape, 1.0 if ("scale" in str(p) or "var" in str(p)) else 0.0, a.dtype),
      abstract,
  )
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, stats, opt_state, batch):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, batch["image"], train=True,
                                mutable=["batch_stats"])
      return task.loss(logits, batch)[0], new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  batch = {"image": images, "label": labels}
  losses = []
  for _ in range(40):
    params, stats, opt_state, loss = step(params, stats, opt_state, batch)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  apply_fn = jax.jit(lambda x: model.apply({"params": params, "batch_stats": stats}, x))
  paths, metrics = predict_and_save_overlays(apply_fn, images, labels, str(tmp_path / "ov_"),
                                             batch_size=4)
  assert len(paths) == 8 and metrics["pixel_error"] < 0.15  # 0.5 at chance
