"""The detection task's R-CNN and DETR subclasses: chosen by the model's family from the config,
their one-line refusals, the outputs they accept, mask AP from masks pasted on device (perfect
masks score 1, shifted ones less while their boxes still score 1), DETR's decoding back to
original pixels and its set loss. The models' training steps learn in test_rcnn_training and
test_detr; the recipes run through the trainer in test_detection_recipe."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxvision.detection.rcnn_train import rcnn_train_forward
from jaxvision.models import create_model
from jaxvision.tasks import task_class
from jaxvision.tasks.detection import METRICS, num_model_classes
from jaxvision.tasks.detr import DetrTask
from jaxvision.tasks.two_stage import MASK_METRICS, TwoStageDetectionTask

SIZE = 64


def _config(model: str, classes: int = 2, masks: bool = False, **detection):
  family = "rcnn" if "rcnn" in model else "detr"
  c = ml_collections.ConfigDict()
  c.model, c.num_classes = model, num_model_classes(family, classes)
  c.model_kwargs = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"masks": masks})
  c.data_info = ml_collections.ConfigDict({"image_shape": (SIZE, SIZE, 3),
                                           "class_names": ("a", "b")[:classes]})
  c.detection = ml_collections.ConfigDict(dict(
      loss="auto", max_boxes=4, score_threshold=0.0, nms_iou=0.0, max_detections=0,
      pre_nms_top_k=0, box_loss="l1", pictures=2, no_object_weight=0.1, aux_loss=True))
  c.detection.update(detection)
  return c


def test_the_family_picks_the_task_class():
  rcnn = task_class("detection").from_config(_config("maskrcnn_tiny", masks=True))
  assert type(rcnn) is TwoStageDetectionTask and rcnn.masks and rcnn.num_classes == 2
  assert rcnn.metric_names == METRICS + MASK_METRICS
  assert rcnn.input_spec(3)["masks"].shape == (3, 4, SIZE, SIZE)
  faster = task_class("detection").from_config(_config("fasterrcnn_tiny"))
  assert not faster.masks and "masks" not in faster.input_spec(1)
  assert faster.metric_names == METRICS
  detr = task_class("detection").from_config(_config("detr_tiny"))
  assert type(detr) is DetrTask and detr.num_classes == 2
  assert detr.max_detections == create_model("detr_tiny").num_queries


@pytest.mark.parametrize("model,overrides,message", [
    ("maskrcnn_tiny", {}, "set config.data.masks=True"),
    ("fasterrcnn_tiny", {"score_threshold": 0.3}, "set config.model_kwargs.box_score_thresh"),
    ("detr_tiny", {"nms_iou": 0.5}, "does not apply to DETR"),
    ("detr_tiny", {"max_detections": 50}, "more than the model's 12 object queries"),
])
def test_bad_config_is_a_one_line_error(model, overrides, message):
  with pytest.raises(ValueError, match=message):
    task_class("detection").from_config(_config(model, **overrides))


def test_rcnn_training_outputs_are_checked():
  task = task_class("detection").from_config(_config("maskrcnn_tiny", masks=True))
  model = create_model("maskrcnn_tiny", num_classes=3)
  spec = task.input_spec(2)

  def outputs(batch):
    args, kwargs = task.model_inputs(batch)
    assert kwargs["method"] is rcnn_train_forward
    key = jax.random.key(0)
    return model.init_with_output({"params": key, "dropout": key}, *args, train=False,
                                  **kwargs)[0]

  abstract = jax.eval_shape(outputs, spec)
  task.check_outputs(abstract)
  three = task_class("detection").from_config(_config("maskrcnn_tiny", classes=1, masks=True))
  with pytest.raises(ValueError, match="has 3 class columns, but the task needs 2"):
    three.check_outputs(abstract)
  with pytest.raises(ValueError, match="gives no 'mask_logits'"):
    task.check_outputs({k: v for k, v in abstract.items() if k != "mask_logits"})


def _mask_batch(shift: int):
  """Two 64x64 images with two square objects each; the model 'detects' every object at its
  box with a full 28x28 mask, the mask of image 1's second object `shift` pixels off."""
  boxes = np.array([[[4, 4, 28, 28], [36, 8, 60, 32]], [[8, 30, 40, 62], [40, 40, 56, 56]]],
                   np.float32)
  masks = np.zeros((2, 2, SIZE, SIZE), np.uint8)
  for i in range(2):
    for j in range(2):
      x0, y0, x1, y1 = boxes[i, j].astype(int)
      masks[i, j, y0:y1, x0:x1] = 1
  batch = {"image": np.zeros((2, SIZE, SIZE, 3), np.float32), "boxes": boxes,
           "classes": np.array([[0, 1], [1, 0]], np.int32), "box_valid": np.ones((2, 2), bool),
           "box_ignore": np.zeros((2, 2), bool), "id": np.array([7, 9], np.int32),
           "orig_size": np.full((2, 2), SIZE, np.int32), "scale": np.ones((2, 2), np.float32),
           "offset": np.zeros((2, 2), np.float32), "valid": np.ones(2, bool), "masks": masks}
  mask_boxes = boxes.copy()
  mask_boxes[1, 1] += shift
  # Pasting widens a box by (28 + 2) / 28 around a 1-pixel zero border: a mask of ones fills
  # its box exactly.
  dets = {"boxes": jnp.asarray(boxes), "scores": jnp.asarray([[0.9, 0.9], [0.9, 0.8]]),
          "classes": jnp.asarray(batch["classes"]), "valid": jnp.ones((2, 2), bool),
          "mask_probs": jnp.ones((2, 2, 28, 28))}

  def forward(images):
    del images
    return {**dets, "boxes": jnp.asarray(mask_boxes) if shift else dets["boxes"]}

  return batch, forward, boxes


@pytest.mark.parametrize("shift", [0, 6])
def test_mask_ap_scores_the_pasted_masks(shift):
  task = task_class("detection").from_config(_config("maskrcnn_tiny", masks=True))
  batch, forward, boxes = _mask_batch(shift)
  predictions = task.predict(forward, batch)
  assert predictions["mask_inter"].shape == (2, 2, 2)
  examples = jax.tree.map(np.asarray, task.eval_examples(predictions, batch))
  if shift:  # the boxes stay where they are; only the mask moves
    examples["det_boxes"] = boxes
  metrics = task.finalize({}, examples)
  assert set(metrics) == set(METRICS + MASK_METRICS)
  assert metrics["ap50"] == pytest.approx(1.0)
  if shift == 0:  # the pasted masks cover their squares up to a border pixel or so
    assert metrics["mask_ap50"] == pytest.approx(1.0) and metrics["mask_ap"] > 0.9
  else:
    # A 16-px square 6 px off (IoU 10*10 / (2*256 - 100) = 0.24) misses at every threshold:
    # class 0 has one hit then that miss (precision 1 up to recall 0.5: 51 of the 101 recall
    # points), class 1 both hits.
    assert metrics["ap"] == pytest.approx(1.0)
    assert metrics["mask_ap50"] == pytest.approx((51 / 101 + 1) / 2)


def test_detr_decodes_queries_to_original_pixels_and_takes_the_set_loss():
  task = task_class("detection").from_config(_config("detr_tiny", max_detections=3))
  b, q, k = 2, 12, 2
  logits = np.full((b, q, k + 1), -5.0, np.float32)
  logits[..., -1] = 5.0  # every query says "no object" ...
  logits[0, 4, 1] = logits[1, 7, 0] = 10.0  # ... but these two
  boxes = np.tile(np.array([0.5, 0.5, 0.25, 0.5], np.float32), (b, q, 1))
  outputs = {"logits": jnp.asarray(logits), "pred_boxes": jnp.asarray(boxes),
             "aux_logits": jnp.asarray(logits)[None], "aux_pred_boxes": jnp.asarray(boxes)[None]}
  batch = {"image": np.zeros((b, SIZE, SIZE, 3), np.float32),
           "scale": np.full((b, 2), 0.5, np.float32), "offset": np.zeros((b, 2), np.float32),
           "orig_size": np.full((b, 2), 2 * SIZE, np.int32)}
  dets = jax.tree.map(np.asarray, task.predict(lambda images: outputs, batch))
  assert dets["boxes"].shape == (b, 3, 4)
  assert dets["classes"][:, 0].tolist() == [1, 0] and (dets["scores"][:, 0] > 0.99).all()
  # (0.5, 0.5, 0.25, 0.5) of a 64-px input: x 24..40, y 16..48; twice that in the original.
  np.testing.assert_allclose(dets["boxes"][0, 0], [48, 32, 80, 96], atol=1e-4)

  gt = {"boxes": jnp.asarray([[[24, 16, 40, 48]], [[0, 0, 8, 8]]], jnp.float32),
        "classes": jnp.asarray([[1], [0]], jnp.int32), "box_valid": jnp.ones((b, 1), bool),
        "box_ignore": jnp.zeros((b, 1), bool)}
  loss, parts = jax.jit(task.loss)(outputs, gt)  # eager, the matcher's loops crawl
  assert np.isfinite(float(loss)) and {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(
      parts)
  # Image 0's query 4 sits on its box exactly: the box terms come from image 1 alone.
  no_aux = dataclasses.replace(task, aux_loss=False)
  total, no_aux_parts = jax.jit(no_aux.loss)(outputs, gt)
  assert "loss_ce_0" not in no_aux_parts and float(total) < float(loss)

