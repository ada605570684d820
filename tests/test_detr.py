"""DETR: registered variants (shapes, pinned counts, dtype policy), bad input, the set loss's
properties, post-processing, and one jitted training step that learns.

Parity with transformers (outputs, conversion, loss values) is in
tests/parity/test_hf_detr_parity.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision.detection.detr_loss import PARTS, detr_detections, detr_loss
from jaxvision.models import create_model, list_models, model_info

# `params` at the registered number of classes (detr_resnet50: transformers'
# DetrForObjectDetection with 91 labels) and the frozen BatchNorm arrays in `batch_stats`.
PINNED = {"detr_resnet50": 41_524_768, "detr_tiny": 493_887}
FROZEN = {"detr_resnet50": 4 * 26_560, "detr_tiny": 4 * 720}


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_every_detr_variant_has_a_pinned_count():
  assert sorted(list_models("detr*")) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shapes_counts_and_bf16_policy(name):
  info = model_info(name)
  model = create_model(name, dtype=jnp.bfloat16)
  assert model.family == "detr"
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  outputs, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert _count(variables["params"]) == PINNED[name]
  assert _count(variables["batch_stats"]) == FROZEN[name]
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  q, k, layers = model.num_queries, info.num_classes + 1, model.decoder_layers
  assert {n: v.shape for n, v in outputs.items()} == {
      "logits": (2, q, k), "pred_boxes": (2, q, 4), "aux_logits": (layers - 1, 2, q, k),
      "aux_pred_boxes": (layers - 1, 2, q, 4)}
  assert all(v.dtype == jnp.bfloat16 for v in outputs.values())


def test_bad_input_names_the_culprit():
  model = create_model("detr_tiny")
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match="pixel_mask"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, jnp.ones((1, 32, 32))), x)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x[0]), x)
  outputs = {"logits": jnp.zeros((2, 4, 3)), "pred_boxes": jnp.full((2, 4, 4), 0.5)}
  boxes, classes, valid = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int), jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="ground truth"):
    detr_loss(outputs, boxes[:1], classes, valid, (8, 8), aux=False)
  with pytest.raises(ValueError, match="only 4 queries"):
    detr_loss(outputs, jnp.zeros((2, 5, 4)), jnp.zeros((2, 5), int), jnp.ones((2, 5), bool),
              (8, 8), aux=False)
  with pytest.raises(ValueError, match="aux_logits"):
    detr_loss(outputs, boxes, classes, valid, (8, 8))
  with pytest.raises(ValueError, match="image_hw"):
    detr_loss(outputs, boxes, classes, valid, 8, aux=False)
  with pytest.raises(ValueError, match="max_detections=5"):
    detr_detections(outputs, (8, 8), max_detections=5)


@functools.lru_cache(maxsize=1)
def _loss_fn():
  return jax.jit(lambda o, b, c, v: detr_loss(o, b, c, v, (40, 80), aux=False))


def _loss_problem(seed=0):
  rng = np.random.default_rng(seed)
  b, q, k = 2, 6, 3
  logits = rng.standard_normal((b, q, k + 1)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.5, (b, q, 4)).astype(np.float32)
  gt = np.array([[[8, 4, 40, 20], [50, 10, 70, 38], [0, 0, 0, 0]],
                 [[10, 10, 30, 30], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  valid = np.array([[True, True, False], [True, False, False]])
  classes = np.array([[2, 0, 0], [1, 0, 0]], np.int32)
  return {"logits": logits, "pred_boxes": boxes}, gt, classes, valid


def test_loss_without_objects_is_no_object_cross_entropy():
  outputs, gt, classes, valid = _loss_problem()
  total, parts = _loss_fn()(outputs, gt, classes, np.zeros_like(valid))
  assert sorted(parts) == sorted(PARTS)
  log_p = jax.nn.log_softmax(outputs["logits"], -1)
  np.testing.assert_allclose(parts["loss_ce"], -np.mean(log_p[..., -1]), rtol=1e-6)
  assert float(parts["loss_bbox"]) == 0.0 and float(parts["loss_giou"]) == 0.0
  predicted = (np.argmax(outputs["logits"], -1) != 3).sum(1)
  np.testing.assert_allclose(parts["cardinality_error"], predicted.mean())
  np.testing.assert_allclose(total, parts["loss_ce"], rtol=1e-6)


def test_loss_matches_queries_whatever_their_order():
  outputs, gt, classes, valid = _loss_problem()
  # Exact boxes and a confident class on queries 4 and 1 (image 0) and 2 (image 1).
  scale = np.array([80, 40, 80, 40], np.float32)
  cxcywh = np.concatenate([(gt[..., :2] + gt[..., 2:]) / 2, gt[..., 2:] - gt[..., :2]], -1)
  targets = cxcywh / scale
  for image, query, obj in ((0, 4, 0), (0, 1, 1), (1, 2, 0)):
    outputs["pred_boxes"][image, query] = targets[image, obj]
    outputs["logits"][image, query] = -5.0
    outputs["logits"][image, query, classes[image, obj]] = 10.0
  _, parts = _loss_fn()(outputs, gt, classes, valid)
  assert float(parts["loss_bbox"]) < 1e-6 and float(parts["loss_giou"]) < 1e-6
  order = np.random.default_rng(1).permutation(outputs["logits"].shape[1])
  shuffled = {k: v[:, order] for k, v in outputs.items()}
  total, shuffled_parts = _loss_fn()(shuffled, gt, classes, valid)
  for name in PARTS:
    np.testing.assert_allclose(shuffled_parts[name], parts[name], rtol=1e-6, atol=1e-7)
  assert np.isfinite(float(total))


def test_detections_are_the_best_queries_in_pixels():
  logits = np.full((1, 3, 4), -10.0, np.float32)
  logits[0, 0] = (-1.0, 2.0, -1.0, -1.0)  # class 1, score 0.87
  logits[0, 1, 3] = 9.0  # no object: its best real class scores low
  logits[0, 2, 2] = 6.0  # class 2, the best
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]],
                   np.float32)
  det = detr_detections({"logits": logits, "pred_boxes": boxes}, (100, 200), max_detections=2,
                        score_threshold=0.5)
  np.testing.assert_array_equal(det["classes"], [[2, 1]])
  np.testing.assert_allclose(det["boxes"], [[[0, 50, 100, 100], [80, 30, 120, 70]]], atol=1e-4)
  assert det["scores"][0, 0] > det["scores"][0, 1] > 0.5
  np.testing.assert_array_equal(det["valid"], [[True, True]])


def _digit_batch(size=64):
  """Two fixed images with 1 and 3 bright squares (classes by size) and their padded boxes."""
  images = np.zeros((2, size, size, 3), np.float32)
  boxes = np.zeros((2, 4, 4), np.float32)
  classes = np.zeros((2, 4), np.int32)
  valid = np.zeros((2, 4), bool)
  objects = [[(8, 8, 24, 0)], [(4, 36, 16, 1), (30, 6, 20, 2), (40, 40, 12, 3)]]
  for i, objs in enumerate(objects):
    for j, (y, x, side, cls) in enumerate(objs):
      images[i, y:y + side, x:x + side] = 1.0 + 0.5 * cls
      boxes[i, j] = (x, y, x + side, y + side)
      classes[i, j], valid[i, j] = cls, True
  return images, boxes, classes, valid


@pytest.mark.slow  # half a minute of compiles alone, a minute beside the suite's other workers
def test_one_jitted_train_step_learns():
  model = create_model("detr_tiny", num_classes=4, dropout=0.0)
  images, boxes, classes, valid = _digit_batch()
  # The RBG generator compiles faster than threefry on CPU; the init is the same otherwise.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images[:1])
  params, frozen = variables["params"], variables["batch_stats"]
  optimizer = optax.adam(1e-3)
  traces = []

  @jax.jit
  def train_step(params, opt_state, step):
    traces.append(step)  # runs once per trace

    def loss_fn(p):
      outputs = model.apply({"params": p, "batch_stats": frozen}, images, train=True,
                            rngs={"dropout": jax.random.fold_in(jax.random.key(1), step)})
      return detr_loss(outputs, boxes, classes, valid, images.shape[1:3])

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    norms = {k: optax.global_norm(v) for k, v in grads.items()}
    return optax.apply_updates(params, updates), opt_state, loss, norms

  opt_state = jax.jit(optimizer.init)(params)
  losses = []
  for step in range(12):
    params, opt_state, loss, norms = train_step(params, opt_state, step)
    if step == 0:  # every module gets a finite, non-zero gradient
      norms = {k: float(v) for k, v in norms.items()}
      assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms
    losses.append(float(loss))
  assert len(traces) == 1
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
