"""The detection task on the one-stage detectors: a real forward + loss + gradient per tiny model,
a short optax training run that learns to find bright rectangles, decoding back to original
pixels, COCO evaluation of perfect and shifted detections, the config and the checks."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxvision.detection.boxes import pairwise_iou
from jaxvision.models import create_model
from jaxvision.models.retinanet import prior_bias
from jaxvision.tasks import TASKS, task_class
from jaxvision.tasks.detection import DetectionTask, num_model_classes

FAMILIES = {"ssd": "ssd_tiny", "retinanet": "retinanet_tiny", "fcos": "fcos_tiny"}
NUM_CLASSES = 2  # rectangles of class k are bright in colour channel k
# The cheapest compile: these runs are dominated by it, not by the tiny models' compute.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# For the training loop the steps count too: level 0 makes them ~100x slower.
TRAIN_COMPILE = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}
RBG = functools.partial(jax.random.key, impl="rbg")  # compiles faster than threefry on CPU


def synthetic_batch(n: int, size: int, max_boxes: int = 4, seed: int = 0) -> dict:
  """`n` dark images with one or two non-overlapping bright rectangles each, in the detection
  batch contract (boxes in these pixels, identity transform back to the original)."""
  rng = np.random.default_rng(seed)
  image = np.zeros((n, size, size, 3), np.float32)
  boxes = np.zeros((n, max_boxes, 4), np.float32)
  classes = np.zeros((n, max_boxes), np.int32)
  valid = np.zeros((n, max_boxes), bool)
  for i in range(n):
    taken = np.zeros((size, size), bool)
    for j in range(1 + i % 2):
      while True:
        w, h = rng.integers(size // 5, size // 2, size=2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        if not taken[y0:y0 + h, x0:x0 + w].any():
          break
      taken[y0:y0 + h, x0:x0 + w] = True
      classes[i, j] = (i + j) % NUM_CLASSES
      image[i, y0:y0 + h, x0:x0 + w, classes[i, j]] = 1.0
      boxes[i, j], valid[i, j] = (x0, y0, x0 + w, y0 + h), True
  return {"image": image - 0.25, "boxes": boxes, "classes": classes, "box_valid": valid,
          "box_ignore": np.zeros_like(valid), "id": np.arange(n, dtype=np.int32) + 100,
          "orig_size": np.full((n, 2), size, np.int32), "scale": np.ones((n, 2), np.float32),
          "offset": np.zeros((n, 2), np.float32), "valid": np.ones(n, bool)}


def _model_and_task(family: str, size: int, **kwargs):
  model = create_model(FAMILIES[family], num_classes=num_model_classes(family, NUM_CLASSES))
  return model, DetectionTask.for_model(model, (size, size, 3), max_boxes=4, **kwargs)


def _random_variables(model, x) -> dict:
  """Variables shaped by `model.init`, filled from numpy (no init compile): He-normal kernels,
  small biases, unit norm scales and statistics, SSD's conv4_3 scale at 20."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.standard_normal(shape, np.float32) * np.sqrt(2 / np.prod(shape[:-1]))
    if name == "l2_scale":
      return np.full(shape, 20.0, np.float32)
    low, high = {"scale": (0.8, 1.2), "var": (0.8, 1.2)}.get(name, (-0.1, 0.1))
    return rng.uniform(low, high, shape).astype(np.float32)

  abstract = jax.eval_shape(functools.partial(model.init, train=False), RBG(0), x)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def _check_gradients(family: str, grads) -> None:
  """Finite gradients, non-zero for every parameter a batch always reaches."""
  chex.assert_tree_all_finite(grads)
  nonzero = {jax.tree_util.keystr(p): bool(np.any(np.asarray(g)))
             for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  # SSD's heads and extra layers are per level: a level without matched boxes or mined
  # negatives (the coarsest ones at 64 px) gets no gradient.
  shared = {k: v for k, v in nonzero.items()
            if family != "ssd" or not ("head" in k or "extra" in k)}
  assert [k for k, v in shared.items() if not v] == [], "parameters with an all-zero gradient"
  assert any(v for k, v in nonzero.items() if "reg_head" in k)
  assert any(v for k, v in nonzero.items() if "cls_head" in k)


# SSD's forward + loss + gradient is the first step of test_training_learns_to_find_rectangles.
@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_tiny_forward_loss_and_gradient(family):
  """Train-mode loss and gradient (predictions of real outputs: the training test)."""
  size = 64
  model, task = _model_and_task(family, size)
  batch = synthetic_batch(2, size)
  variables = _random_variables(model, batch["image"])
  params, stats = variables["params"], variables.get("batch_stats", {})

  def loss_fn(params):
    outputs = model.apply({"params": params, "batch_stats": stats}, batch["image"], train=True)
    return task.loss(outputs, batch)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, terms), grads = grad_fn.lower(params).compile(FAST_COMPILE)(params)
  assert np.isfinite(loss) and loss > 0
  expected = {"retinanet": ["bbox_regression", "classification"],
              "fcos": ["bbox_ctrness", "bbox_regression", "classification"]}[family]
  assert sorted(terms) == [f"loss_{t}" for t in expected]
  assert all(float(v) > 0 for v in terms.values())
  _check_gradients(family, grads)


def _fresh_variables(model, x) -> dict:
  """Starting variables made in numpy (compiling `init` would cost more than the training):
  He-normal kernels (gain 1 for the heads' outputs), zero biases but the sigmoid classifiers'
  prior, identity norms, SSD's conv4_3 scale at 20.

  FCOS's box distances start at one stride instead of torchvision's ~0: from zero-size boxes
  the GIoU gradient of a side vanishes with the other axis' extent, and on 4 images a distance
  channel can sink below its ReLU for good."""
  rng = np.random.default_rng(0)
  prior = float(prior_bias(0.01)(None, ()))
  outputs = ("cls_logits", "bbox_reg", "bbox_ctrness")

  def fill(path, leaf):
    names, shape = [p.key for p in path], leaf.shape
    head = names[1] in ("cls_head", "reg_head") and (names[2] in outputs or model.family == "ssd")
    if names[-1] == "kernel":
      gain = 1.0 if head else 2.0
      return rng.standard_normal(shape, np.float32) * np.sqrt(gain / np.prod(shape[:-1]))
    value = {"l2_scale": 20.0, "scale": 1.0, "var": 1.0}.get(names[-1], 0.0)
    if names[-2:] == ["cls_logits", "bias"]:
      value = prior
    elif names[-2:] == ["bbox_reg", "bias"] and model.family == "fcos":
      value = 1.0
    return np.full(shape, value, np.float32)

  abstract = jax.eval_shape(functools.partial(model.init, train=False), RBG(0), x)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def _train(family: str, steps: int, lr: float, size: int = 64):
  """Adam on 4 synthetic images in one jitted scan; (losses, the first step's gradient,
  predictions, batch)."""
  model, task = _model_and_task(family, size)
  batch = synthetic_batch(4, size)
  x = batch["image"]
  variables = _fresh_variables(model, x)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.adam(lr)

  def train(params):
    def step(carry, _):
      params, opt_state = carry
      (loss, _), grads = jax.value_and_grad(lambda p: task.loss(
          model.apply({"params": p, "batch_stats": stats}, x, train=True), batch),
          has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      # Per-parameter |gradient| sums: the first step's tell which parameters learn.
      return (optax.apply_updates(params, updates), opt_state), (
          loss, jax.tree.map(lambda g: jnp.sum(jnp.abs(g)), grads))

    (params, _), (losses, grads) = jax.lax.scan(step, (params, tx.init(params)), None,
                                                length=steps)
    forward = lambda images: model.apply({"params": params, "batch_stats": stats}, images)
    return losses, jax.tree.map(lambda g: g[0], grads), task.predict(forward, batch)

  losses, grads, predictions = jax.jit(train).lower(params).compile(TRAIN_COMPILE)(params)
  return np.asarray(losses), grads, jax.tree.map(np.asarray, predictions), batch


def _assert_found(predictions, batch):
  """Every ground-truth rectangle has a detection of its class with IoU > 0.5 among its image's
  top (number of rectangles + 1) detections."""
  for i in range(len(batch["image"])):
    gt = batch["boxes"][i][batch["box_valid"][i]]
    gt_cls = batch["classes"][i][batch["box_valid"][i]]
    top = np.argsort(-np.where(predictions["valid"][i], predictions["scores"][i], -1))
    top = top[:len(gt) + 1]
    top = top[predictions["valid"][i][top]]
    iou = np.asarray(pairwise_iou(gt, predictions["boxes"][i][top]))
    hit = (iou > 0.5) & (gt_cls[:, None] == predictions["classes"][i][top][None, :])
    assert hit.any(axis=1).all(), (i, gt.tolist(), predictions["boxes"][i][top].tolist(),
                                   predictions["classes"][i][top].tolist())


# Measured drops: SSD ~160x in 60 steps, RetinaNet ~390x in 200; FCOS ~4x in 300, its loss
# bounded below by the centerness BCE (the soft targets' entropy, ~0.56 here).
@pytest.mark.parametrize("family,steps,lr,factor", [
    ("ssd", 60, 3e-3, 20),
    pytest.param("retinanet", 200, 3e-3, 5, marks=pytest.mark.slow),
    pytest.param("fcos", 300, 3e-3, 2.5, marks=pytest.mark.slow),
])
def test_training_learns_to_find_rectangles(family, steps, lr, factor):
  losses, grads, predictions, batch = _train(family, steps, lr)
  assert np.all(np.isfinite(losses)) and losses[0] > 0
  _check_gradients(family, grads)
  d = len(predictions["valid"][0])
  chex.assert_shape([predictions["boxes"], predictions["scores"], predictions["classes"],
                     predictions["valid"]], [(4, d, 4), (4, d), (4, d), (4, d)])
  assert predictions["classes"].dtype == np.int32
  assert losses[-10:].mean() < losses[0] / factor, (losses[0], losses[-10:].mean())
  _assert_found(predictions, batch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_predict_decodes_to_original_pixels(family):
  """One confident prediction exactly on anchor j decodes to anchor j, mapped back through
  the batch's scale / offset and clipped to the original image."""
  size = 64
  model, task = _model_and_task(family, size)
  anchors = task.anchors.boxes
  j = int(np.argmin(np.abs(anchors - [20, 12, 36, 44]).sum(1)))  # an anchor inside the image
  n, k = len(anchors), num_model_classes(family, NUM_CLASSES)
  cls = np.full((1, n, k), -12.0, np.float32)
  cls[0, j, 1 + (family == "ssd")] = 12.0  # class 1; SSD's column 0 is the background
  if family == "ssd":
    cls[0, :, 0] = 0.0
    cls[0, j, 0] = -12.0
  # Zero deltas (SSD, RetinaNet) and half-size distances (FCOS) reproduce the anchor.
  reg = np.full((1, n, 4), 0.5 if family == "fcos" else 0.0, np.float32)
  outputs = {"cls_logits": cls, "bbox_regression": reg}
  if family == "fcos":
    outputs["bbox_ctrness"] = np.full((1, n, 1), 12.0, np.float32)
  batch = {"image": np.zeros((1, size, size, 3), np.float32),
           "scale": np.array([[0.5, 0.25]], np.float32),
           "offset": np.array([[4.0, -2.0]], np.float32),
           "orig_size": np.array([[240, 100]], np.int32)}
  predictions = jax.jit(lambda b: task.predict(lambda x: outputs, b))(batch)
  assert int(np.sum(predictions["valid"])) == 1
  x1, y1, x2, y2 = np.clip(anchors[j], 0, size)
  expected = [(x1 - 4) / 0.5, (y1 + 2) / 0.25, (x2 - 4) / 0.5, (y2 + 2) / 0.25]
  expected = np.clip(expected, 0, [100, 240, 100, 240])
  np.testing.assert_allclose(predictions["boxes"][0, 0], expected, rtol=1e-5, atol=1e-3)
  assert int(predictions["classes"][0, 0]) == 1
  assert float(predictions["scores"][0, 0]) > 0.99


def _examples(shift: float = 0.0, drop_last: bool = False, area: float | None = None):
  """(task, batch, eval_examples, predictions) of a synthetic batch whose detections are its
  ground truth, shifted right by `shift` x the box width (and without the last real example's
  detections; with every annotation's area `area`)."""
  _, task = _model_and_task("retinanet", 64)
  batch = synthetic_batch(4, 64)
  if area is not None:
    batch["box_area"] = np.full(batch["box_valid"].shape, area, np.float32)
  batch["box_ignore"] = batch["box_ignore"].copy()
  batch["valid"] = np.array([True, True, True, False])  # the last one is padding
  widths = batch["boxes"][..., 2] - batch["boxes"][..., 0]
  boxes = batch["boxes"] + shift * np.stack([widths, 0 * widths, widths, 0 * widths], -1)
  d = task.max_detections
  pad = lambda a, v=0: np.concatenate([a, np.full((4, d - a.shape[1], *a.shape[2:]), v,
                                                  a.dtype)], axis=1)
  predictions = {"boxes": pad(boxes), "scores": pad(np.where(batch["box_valid"], 0.9, 0.0)),
                 "classes": pad(batch["classes"]), "valid": pad(batch["box_valid"], False)}
  if drop_last:
    predictions["valid"][2] = False
  return task, batch, jax.tree.map(np.asarray, task.eval_examples(predictions, batch)), \
      predictions


def test_finalize_gives_coco_ap_of_perfect_and_shifted_detections():
  task, batch, examples, _ = _examples()
  perfect = task.finalize(task.eval_sums(_examples()[3], batch), examples)
  assert sorted(perfect) == sorted(task.metric_names)
  for name in ("ap", "ap50", "ap75", "ar100"):
    assert perfect[name] == pytest.approx(1.0), name
  shifted = task.finalize({}, _examples(shift=0.3)[2])  # IoU 0.54: found at 0.5, not at 0.75
  assert shifted["ap50"] == pytest.approx(1.0)
  assert shifted["ap75"] == pytest.approx(0.0)
  assert 0 < shifted["ap"] < perfect["ap"]
  missing = task.finalize({}, _examples(drop_last=True)[2])
  assert missing["ar100"] < 1.0 and missing["ap"] < 1.0
  # Sizes come from the boxes (all under 32^2 px here), or from the annotations' areas.
  assert (perfect["ap_small"], perfect["ap_large"]) == (pytest.approx(1.0), -1.0)
  large = task.finalize({}, _examples(area=100.0**2)[2])
  assert (large["ap_small"], large["ap_large"]) == (-1.0, pytest.approx(1.0))


def test_eval_sums_count_valid_examples_and_detections():
  task, batch, _, predictions = _examples()
  sums = task.eval_sums(predictions, batch)
  assert int(sums["count"]) == 3
  assert int(sums["detections"]) == int(batch["box_valid"][:3].sum())


def test_gt_boxes_are_mapped_to_original_pixels():
  task, batch, _, predictions = _examples()
  batch = dict(batch, scale=np.full((4, 2), 0.5, np.float32),
               offset=np.full((4, 2), 3.0, np.float32))
  examples = task.eval_examples(predictions, batch)
  valid = batch["box_valid"]
  np.testing.assert_allclose(np.asarray(examples["gt_boxes"])[valid],
                             (batch["boxes"][valid] - 3.0) / 0.5)


def _config(model: str, num_classes: int, **detection) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model, c.num_classes = model, num_classes
  c.model_kwargs = ml_collections.ConfigDict()
  c.data_info = ml_collections.ConfigDict({"image_shape": (64, 64, 3), "class_names": ("a", "b")})
  c.detection = ml_collections.ConfigDict(dict(
      loss="auto", max_boxes=50, score_threshold=0.0, nms_iou=0.0, max_detections=0,
      pre_nms_top_k=0, box_loss="l1", pictures=2))
  c.detection.update(detection)
  return c


@pytest.mark.parametrize("model,num_classes,family,k,score,dets", [
    ("ssd_tiny", 3, "ssd", 2, 0.01, 200),
    ("retinanet_tiny", 2, "retinanet", 2, 0.05, 300),
    ("fcos_tiny", 2, "fcos", 2, 0.2, 100),
])
def test_from_config_takes_the_family_and_its_defaults(model, num_classes, family, k, score,
                                                       dets):
  assert TASKS["detection"] == "jaxvision.tasks.detection:DetectionTask"
  task = task_class("detection").from_config(_config(model, num_classes))
  assert (task.family, task.num_classes) == (family, k)
  assert (task.score_threshold, task.max_detections) == (score, dets)
  assert task.max_boxes == 50 and task.class_names == ("a", "b") and task.num_pictures == 2
  spec = task.input_spec(8)
  assert spec["image"].shape == (8, 64, 64, 3)
  assert spec["boxes"].shape == (8, 50, 4) and spec["box_ignore"].shape == (8, 50)
  set_by_config = task_class("detection").from_config(
      _config(model, num_classes, score_threshold=0.3, max_detections=7))
  assert (set_by_config.score_threshold, set_by_config.max_detections) == (0.3, 7)


def test_bad_config_is_a_one_line_error():
  with pytest.raises(ValueError, match="is not a detector"):
    task_class("detection").from_config(_config("resnet_tiny", 2))
  with pytest.raises(ValueError, match="detection.box_loss='l2'"):
    task_class("detection").from_config(_config("retinanet_tiny", 2, box_loss="l2"))
  with pytest.raises(ValueError, match="max_boxes=0"):
    task_class("detection").from_config(_config("retinanet_tiny", 2, max_boxes=0))


def test_check_outputs_names_the_mismatch():
  model, task = _model_and_task("fcos", 64)
  outputs = jax.eval_shape(
      lambda x: model.init_with_output(RBG(0), x)[0], jax.ShapeDtypeStruct((2, 64, 64, 3),
                                                                           jnp.float32))
  task.check_outputs(outputs)
  with pytest.raises(ValueError, match="'bbox_ctrness' is missing"):
    task.check_outputs({k: v for k, v in outputs.items() if k != "bbox_ctrness"})
  _, bigger = _model_and_task("fcos", 96)
  with pytest.raises(ValueError, match=r"needs \(B, 194, 2\)"):
    bigger.check_outputs(outputs)
  with pytest.raises(ValueError, match="needs a dict of raw head outputs"):
    task.check_outputs(jax.ShapeDtypeStruct((2, 10), jnp.float32))


def test_save_pictures_draws_each_example(tmp_path):
  task, batch, _, predictions = _examples()
  n = 2
  paths = task.save_pictures(str(tmp_path / "det_"), jax.tree.map(lambda a: a[:n], batch),
                             jax.tree.map(lambda a: a[:n], predictions))
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["det_0.png", "det_1.png"]
  from PIL import Image

  picture = np.asarray(Image.open(paths[0]))
  assert picture.shape == (64, 64, 3) and picture.std() > 0
