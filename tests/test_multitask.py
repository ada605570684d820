"""Multi-task learning (two heads, one summed loss) and imbalanced data (class weights,
class-balanced sampling)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, multitask_digits
from jaxvision import imbalance
from jaxvision.data import ArrayInput, ArraySource
from jaxvision.models import create_model
from jaxvision.tasks import create_task
from jaxvision.tasks.classification import ClassificationTask
from jaxvision.tasks.multitask import MultiTask, ink_percentage
from train import loop
from train import step as step_lib
from train.state import create_train_state

# --- Multi-task ---------------------------------------------------------------------------------


def test_lenet_multitask_has_two_heads_on_lenet_parameter_names():
  model = create_model("lenet_multitask", num_classes=7)
  x = jnp.zeros((3, 28, 28, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out["logits"].shape == (3, 7) and out["regression"].shape == (3,)
  names = set(variables["params"])
  assert names == {"conv1", "conv2", "fc1", "fc2", "head", "regression_head"}
  lenet = jax.eval_shape(create_model("lenet", num_classes=7).init, jax.random.key(0), x)
  for name in ("conv1", "conv2", "fc1", "fc2", "head"):  # a LeNet checkpoint fits as is
    assert jax.tree.map(lambda a: a.shape, lenet["params"][name]) == jax.tree.map(
        lambda a: a.shape, variables["params"][name])
  features = create_model("lenet_multitask", num_classes=0)
  assert jax.eval_shape(features.init_with_output, jax.random.key(0), x)[0].shape == (3, 84)


def test_ink_percentage():
  image = np.zeros((2, 4, 4, 1), np.float32)
  image[0, :2] = 1.0  # half the pixels bright
  image[1, 0, 0] = 0.7
  ink = ink_percentage(jnp.asarray(image))
  np.testing.assert_allclose(ink, [50.0, 100.0 / 16])
  # Any positive affine normalisation leaves it unchanged.
  np.testing.assert_allclose(ink_percentage(jnp.asarray((image - 0.5) / 0.3)), ink, rtol=1e-6)


def batch_of(n=6, k=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": jnp.asarray(rng.random((n, 28, 28, 1)), jnp.float32),
      "label": jnp.asarray(rng.integers(0, k, n), jnp.int32),
      "valid": jnp.asarray([True] * (n - 1) + [False]),
  }


@pytest.mark.parametrize("target,regression_loss", [("ink", "mse"), ("label", "mae")])
def test_multitask_loss_is_the_weighted_sum(target, regression_loss):
  task = MultiTask(4, target=target, regression_loss=regression_loss, regression_weight=0.3,
                   classification_weight=2.0)
  batch = batch_of()
  rng = np.random.default_rng(1)
  outputs = {"logits": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
             "regression": jnp.asarray(rng.normal(size=6) * 10, jnp.float32)}
  loss, metrics = task.loss(outputs, batch)
  log_probs = jax.nn.log_softmax(outputs["logits"])
  ce = -np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(batch["label"])[:, None], 1))
  y = (np.asarray(ink_percentage(batch["image"])) if target == "ink"
       else np.asarray(batch["label"], np.float32))
  err = np.asarray(outputs["regression"]) - y
  reg = np.mean(err**2) if regression_loss == "mse" else np.mean(np.abs(err))
  np.testing.assert_allclose(loss, 2.0 * ce + 0.3 * reg, rtol=1e-5)
  np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(err)), rtol=1e-5)


def test_multitask_eval_counts_valid_examples_and_r2():
  task = MultiTask(4, target="label")
  batch = batch_of()
  perfect = {"logits": jax.nn.one_hot(batch["label"], 4) * 10,
             "regression": batch["label"].astype(jnp.float32)}
  metrics = task.finalize(jax.device_get(task.eval_sums(perfect, batch)), {})
  assert metrics["accuracy"] == 1.0 and metrics["mae"] == 0.0 and metrics["r2"] == 1.0
  constant = {**perfect, "regression": jnp.full((6,), float(np.mean(batch["label"][:5])))}
  metrics = task.finalize(jax.device_get(task.eval_sums(constant, batch)), {})
  np.testing.assert_allclose(metrics["r2"], 0.0, atol=1e-5)  # predicting the mean explains nothing
  with pytest.raises(ValueError, match="lenet_multitask"):
    task.loss(perfect["logits"], batch)


def test_multitask_from_config_and_bad_values():
  config = multitask_digits.get_config()
  config.num_classes, config.data_info.image_shape = 10, (28, 28, 1)
  task = create_task(config)
  assert isinstance(task, MultiTask)
  assert (task.target, task.regression_loss, task.regression_weight) == ("ink", "mse", 0.05)
  with pytest.raises(ValueError, match="regression_loss='huber'"):
    MultiTask(10, regression_loss="huber")
  with pytest.raises(ValueError, match="target='area'"):
    MultiTask(10, target="area")


@functools.lru_cache
def _jitted_step(task):
  return jax.jit(functools.partial(step_lib.train_step, task=task))


def test_one_training_step_moves_both_heads():
  model = create_model("lenet_multitask", num_classes=4)
  task = MultiTask(4, regression_weight=0.05)
  state = jax.jit(lambda r: create_train_state(model, optax.adam(1e-2), task, r,
                                               ema=False))(jax.random.key(0))
  batch = batch_of(8)
  new_state, metrics = _jitted_step(task)(state, batch, jax.random.key(1))
  assert np.isfinite(metrics["loss"]) and set(metrics) >= {"accuracy", "mae", "cross_entropy"}
  for head in ("head", "regression_head", "conv1"):
    assert not np.array_equal(new_state.params[head]["kernel"], state.params[head]["kernel"])


@pytest.mark.slow  # 9-11 s: a trainer run (test_one_training_step_moves_both_heads stays)
def test_multitask_config_trains_through_the_trainer(tmp_path):
  config = multitask_digits.get_config()
  config.total_steps, config.eval_every, config.checkpoint_every = 30, 0, 0
  config.log_every, config.progress = 10, "none"
  metrics = loop.train_and_evaluate(config, str(tmp_path))
  assert {"accuracy", "mae", "mse", "r2", "loss"} <= set(metrics)
  assert np.isfinite(metrics["mae"])


# --- Imbalanced data ----------------------------------------------------------------------------


def test_class_weights_undo_the_frequencies():
  labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
  w = imbalance.class_weights(labels, 4)
  counts = np.bincount(labels, minlength=4)
  np.testing.assert_allclose(counts[:3] * w[:3], 100 / 3, rtol=1e-5)  # equal total weight
  assert w[3] == 0.0  # absent class
  np.testing.assert_allclose(np.sum(counts * w), len(labels), rtol=1e-5)
  for method in ("sqrt_inverse", "effective"):
    w = imbalance.class_weights(labels, 3, method)
    assert w[2] > w[1] > w[0]
  with pytest.raises(ValueError, match="label 5 out of range for 3 classes"):
    imbalance.class_weights([5], 3)
  with pytest.raises(ValueError, match="'focal'"):
    imbalance.class_weights(labels, 3, "focal")


def test_balanced_epoch_order_draws_classes_equally_and_deterministically():
  labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
  order = imbalance.balanced_epoch_order(labels, 3, seed=0, epoch=0, size=30_000)
  share = np.bincount(labels[order], minlength=3) / len(order)
  np.testing.assert_allclose(share, 1 / 3, atol=0.02)
  again = imbalance.balanced_epoch_order(labels, 3, seed=0, epoch=0, size=30_000)
  np.testing.assert_array_equal(order, again)
  assert not np.array_equal(order, imbalance.balanced_epoch_order(labels, 3, seed=0, epoch=1,
                                                                   size=30_000))
  assert len(imbalance.balanced_epoch_order(labels, 3, seed=0, epoch=0)) == len(labels)


def test_class_weighted_cross_entropy():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  batch = {"label": jnp.asarray([0, 1, 2, 2, 0])}
  weights = (0.5, 1.0, 4.0)
  loss, _ = ClassificationTask(3, class_weights=weights).loss(logits, batch)
  per_example = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                    np.asarray(batch["label"])[:, None], 1)[:, 0]
  expected = np.mean(per_example * np.asarray(weights)[np.asarray(batch["label"])])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  unweighted, _ = ClassificationTask(3).loss(logits, batch)
  np.testing.assert_allclose(unweighted, per_example.mean(), rtol=1e-6)


def test_class_weights_from_config():
  config = base.get_config()
  config.task, config.num_classes, config.data_info.image_shape = "classification", 3, (8, 8, 1)
  assert create_task(config).class_weights is None
  config.class_weights = (1.0, 2.0, 3.0)
  assert create_task(config).class_weights == (1.0, 2.0, 3.0)
  config.num_classes = 4
  with pytest.raises(ValueError, match="class_weights has 3 values for 4 classes"):
    create_task(config)
  assert imbalance.parse_class_weights("1, 2.5", 2) == (1.0, 2.5)
  with pytest.raises(ValueError, match="finite and >= 0"):
    imbalance.parse_class_weights((1.0, -1.0), 2)


def test_balanced_sampling_puts_the_classes_on_an_equal_footing_in_the_pipeline():
  source = ArraySource(np.zeros((100, 4, 4, 1), np.uint8),
                       np.array([0] * 90 + [1] * 10, np.int32), num_classes=2)
  config = base.get_config()
  config.batch_size, config.image_size, config.data.balanced_sampling = 50, 4, True
  balanced = ArrayInput.from_config(config, source, train=True)
  drawn = np.concatenate([source.labels[balanced.train_indices(s)] for s in range(40)])
  assert abs(drawn.mean() - 0.5) < 0.05  # uniform order: 0.1
  again = ArrayInput.from_config(config, source, train=True)
  np.testing.assert_array_equal(balanced.train_indices(7), again.train_indices(7))
