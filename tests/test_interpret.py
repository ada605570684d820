"""Interpretation: Grad-CAM localises, attention rollout, position-embedding similarity, figures,
and `python -m train.viz`."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from jaxvision.interpret import attention, plots, posemb
from jaxvision.interpret.confusion import confusion_matrix, per_class_metrics
from jaxvision.interpret.gradcam import (
    feature_layers,
    gradcam,
    peak_positions,
    receptive_field_centers,
)
from jaxvision.models import create_model

# --- Grad-CAM ----------------------------------------------------------------------------------


def bright_squares(n, seed, size=28, side=6):
  """Noise, a dim distractor square, and a bright square whose quadrant is the class (0-3);
  class 4 has the distractor alone. Returns images, labels and the bright squares' boxes."""
  rng = np.random.default_rng(seed)
  images = rng.normal(0, 0.1, (n, size, size, 1)).astype(np.float32)
  labels = rng.integers(0, 4, n)
  labels[rng.random(n) < 0.2] = 4
  boxes = np.zeros((n, 4), int)
  half = size // 2

  def corner(quadrant):
    qr, qc = divmod(int(quadrant), 2)
    top, left = rng.integers(0, half - side + 1, size=2)
    return qr * half + top, qc * half + left

  for i, c in enumerate(labels):
    r, col = corner(c % 4)
    dr, dc = corner((c + rng.integers(1, 4)) % 4)
    images[i, dr:dr + side, dc:dc + side] += 0.4
    if c < 4:
      images[i, r:r + side, col:col + side] += 1.0
    boxes[i] = (r, col, r + side, col + side)
  return images, labels.astype(np.int32), boxes


class ConvReLU(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(self.features, (3, 3), name="conv")(x))


class SquareNet(nn.Module):
  """A small CoordConv CNN (it needs the coordinates: the class is a position) with global
  average pooling; its last feature map is sown and perturbed as the CNN families can be."""

  @nn.compact
  def __call__(self, x, *, train=False):
    b, h, w, _ = x.shape
    ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
    x = jnp.concatenate([x, jnp.broadcast_to(jnp.stack([ys, xs], -1), (b, h, w, 2))], -1)
    x = ConvReLU(16, name="block1")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = ConvReLU(16, name="block2")(x)
    self.sow("intermediates", "features", x)
    x = self.perturb("features", x)
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def square_net():
  model = SquareNet()
  images, labels, _ = bright_squares(2048, 0)
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  for s in range(200):
    i = (s * 32) % len(images)
    params, opt = step(params, opt, images[i:i + 32], labels[i:i + 32])
  return model, {"params": params}


def test_gradcam_peak_falls_inside_the_bright_square(square_net):
  model, variables = square_net
  images, labels, boxes = bright_squares(200, 1)
  result = gradcam(model, variables, images)
  assert result.layer == "features"  # the perturbation point is preferred
  assert result.heatmaps.shape == (200, 28, 28)
  assert float(result.heatmaps.min()) >= 0 and float(result.heatmaps.max()) <= 1
  accuracy = float(np.mean(np.asarray(result.class_index) == labels))
  assert accuracy >= 0.9, f"the test network did not learn the task (accuracy {accuracy})"
  has_square = labels < 4
  peaks = np.asarray(peak_positions(result.heatmaps))[has_square]
  box = boxes[has_square]
  inside = ((peaks[:, 0] >= box[:, 0]) & (peaks[:, 0] < box[:, 2])
            & (peaks[:, 1] >= box[:, 1]) & (peaks[:, 1] < box[:, 3]))
  assert inside.mean() >= 0.9, f"Grad-CAM peak inside the square on {inside.mean():.1%}"


def test_gradcam_by_submodule_equals_gradcam_by_perturbation(square_net):
  model, variables = square_net
  images, _, _ = bright_squares(8, 2)
  by_perturb = gradcam(model, variables, images, layer="features")
  by_module = gradcam(model, variables, images, layer="block2")
  np.testing.assert_allclose(by_module.heatmaps, by_perturb.heatmaps, atol=1e-5)
  # An explicit class: the class-0 map of an image of class 3 is another map.
  other = gradcam(model, variables, images, layer="block2", class_index=0)
  assert np.all(np.asarray(other.class_index) == 0)


def test_gradcam_on_registry_cnns():
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  lenet = create_model("lenet")
  variables = jax.jit(lenet.init)(jax.random.key(0), x)
  layers = dict(feature_layers(lenet, variables, x))
  assert layers["conv2"] == (2, 10, 10, 16)
  result = gradcam(lenet, variables, x)
  assert result.layer == "conv2" and result.coarse.shape == (2, 10, 10)
  assert np.all(np.isfinite(result.heatmaps))
  # LeNet's conv2 is a 'VALID' conv: position i sits over pixel 4.5 + 2 i, not edge to edge.
  assert receptive_field_centers(lenet, variables, x, "conv2") == (2.0, 4.5, 2.0, 4.5)
  with pytest.raises(ValueError, match="'nope'.*feature layers: conv1"):
    gradcam(lenet, variables, x, layer="nope")


@pytest.mark.slow
def test_gradcam_on_a_resnet_with_batch_stats():
  resnet = create_model("resnet_tiny")  # BatchNorm statistics in the variables
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(resnet.init)(jax.random.key(0), x)
  result = gradcam(resnet, variables, x)
  assert result.heatmaps.shape == (2, 32, 32) and np.all(np.isfinite(result.heatmaps))


# --- ViT attention and position embeddings -------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
  model = create_model("vit_tiny", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_attention_rollout_rows_sum_to_one_and_match_a_reference(vit):
  model, variables, x = vit
  weights = attention.attention_weights(model, variables, x)
  assert len(weights) == model.depth and weights[0].shape == (3, 2, 17, 17)
  for fusion in attention.HEAD_FUSIONS:
    rollout = attention.attention_rollout(weights, head_fusion=fusion)
    np.testing.assert_allclose(np.sum(rollout, -1), 1.0, atol=1e-5)
  # Reference: the product of the residual-mixed, renormalised head means, in numpy.
  expected = np.broadcast_to(np.eye(17), (3, 17, 17))
  for w in weights:
    a = 0.5 * np.asarray(w, np.float64).mean(axis=1) + 0.5 * np.eye(17)
    expected = (a / a.sum(-1, keepdims=True)) @ expected
  np.testing.assert_allclose(attention.attention_rollout(weights), expected, atol=1e-5)
  cls = attention.cls_attention(weights, model.grid)
  assert cls.shape == (model.depth, 3, 2, 4, 4)
  maps = attention.rollout_map(attention.attention_rollout(weights), model.grid)
  assert maps.shape == (3, 4, 4) and np.allclose(np.max(maps, axis=(1, 2)), 1.0)
  with pytest.raises(ValueError, match="VisionTransformer"):
    attention.attention_weights(create_model("lenet"), {}, x)


def test_posemb_similarity_of_a_position_with_itself_is_one(vit):
  model, variables, _ = vit
  sim = posemb.posemb_similarity(posemb.model_posemb(model, variables["params"]), model.grid)
  assert sim.shape == (4, 4, 4, 4)
  diagonal = np.array([sim[i, j, i, j] for i in range(4) for j in range(4)])
  np.testing.assert_allclose(diagonal, 1.0, atol=1e-6)
  assert sim.max() <= 1.0 + 1e-6 and sim.min() >= -1.0 - 1e-6
  # Fixed 2-D sin-cos embeddings: similarity falls with distance along a row.
  fixed = create_model("vit_tiny", posemb="sincos2d")
  sim = posemb.posemb_similarity(posemb.model_posemb(fixed, {}), fixed.grid)
  assert sim[0, 0, 0, 0] > sim[0, 0, 0, 1] > sim[0, 0, 0, 3]
  np.testing.assert_allclose(sim, sim.transpose(2, 3, 0, 1), atol=1e-6)


# --- Confusion and figures ----------------------------------------------------------------------


def test_confusion_and_per_class_precision_recall():
  labels = np.array([0, 0, 0, 1, 1, 2])
  predictions = np.array([0, 0, 1, 1, 1, 1])
  confusion = confusion_matrix(labels, predictions, 3)
  np.testing.assert_array_equal(confusion, [[2, 1, 0], [0, 2, 0], [0, 1, 0]])
  stats = per_class_metrics(confusion)
  np.testing.assert_allclose(stats["precision"][:2], [1.0, 0.5])
  assert np.isnan(stats["precision"][2])  # class 2 is never predicted
  np.testing.assert_allclose(stats["recall"], [2 / 3, 1.0, 0.0])
  with pytest.raises(ValueError, match="label 3 out of range"):
    confusion_matrix([3], [0], 3)


def png_size(path):
  with Image.open(path) as image:
    return image.size


def test_figures_have_the_expected_pixel_sizes(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.random((3, 16, 16, 1)).astype(np.float32)
  fig = plots.overlay_grid(images, rng.random((3, 16, 16)), ncols=2, dpi=50, titles=list("abc"))
  assert png_size(plots.save_figure(fig, str(tmp_path / "overlay.png"))) == (160, 182)

  fig = plots.heatmap_grid(rng.random((2, 3, 4, 4)), dpi=40, cell_inches=1.0)
  assert png_size(plots.save_figure(fig, str(tmp_path / "grid.png"))) == (136, 84)

  fig = plots.overlay_table(images[0], rng.random((2, 2, 16, 16)), dpi=50, cell_inches=1.0,
                            row_labels=["b0", "b1"], col_labels=["h0", "h1"])
  assert png_size(plots.save_figure(fig, str(tmp_path / "table.png"))) == (150, 105)

  fig = plots.confusion_figure(np.array([[5, 1, 0], [0, 3, 2], [1, 0, 4]]), dpi=50)
  assert png_size(plots.save_figure(fig, str(tmp_path / "confusion.png"))) == (330, 150)

  rows = [{"step": s, "split": "train", "loss": 1 / s, "accuracy": s / 10} for s in range(1, 11)]
  rows.append({"step": 10, "split": "eval", "loss": 0.2, "accuracy": 0.8})
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  fig = plots.curves_figure(plots.read_metrics(str(tmp_path)), dpi=50)
  assert png_size(plots.save_figure(fig, str(tmp_path / "curves.png"))) == (360, 130)
  with pytest.raises(ValueError, match="'miou'"):
    plots.curves_figure(rows, metrics=["miou"])

  masks = (rng.random((2, 16, 16)) > 0.5).astype(np.int32)
  fig = plots.segmentation_figure(images[:2], masks, 1 - masks, num_classes=2, dpi=50,
                                  cell_inches=1.0)
  assert png_size(plots.save_figure(fig, str(tmp_path / "seg.png"))) == (200, 115)


def test_plots_without_matplotlib_name_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
  with pytest.raises(ImportError, match=r"jaxvision\[viz\]"):
    plots.new_figure(1, 1)


# --- python -m train.viz ------------------------------------------------------------------------


def tiny_run(workdir, **overrides):
  from configs import lenet_digits
  from train import loop

  c = lenet_digits.get_config()
  c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 0, 0
  c.batch_size, c.progress = 32, "none"
  for key, value in overrides.items():
    with c.unlocked():
      c[key] = value
  loop.train_and_evaluate(c, str(workdir))
  return str(workdir)


def test_viz_cli_writes_the_figures_of_a_cnn_run(tmp_path, capsys):
  from train import viz

  cnn = tiny_run(tmp_path / "cnn", eval_split="")  # no eval: one compilation less
  for kind in ("curves", "gradcam", "confusion"):
    assert viz.main([kind, "--workdir", cnn, "--num", "4", "--dpi", "40",
                     "--split", "train[80%:]"]) == 0
    assert os.path.exists(os.path.join(cnn, "viz", f"{kind}.png"))
  printed = capsys.readouterr().out
  stats = json.loads(next(ln for ln in printed.splitlines() if ln.startswith("{")))
  assert sum(stats["support"]) == 359  # the whole eval split: train[80%:] of the 1,797 digits
  # A ViT figure for a CNN run is a one-line error, exit status 2.
  assert viz.main(["posemb", "--workdir", cnn]) == 2
  assert "posemb needs a ViT" in capsys.readouterr().err
  assert viz.main(["curves", "--workdir", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_viz_cli_writes_the_figures_of_a_vit_run(tmp_path):
  from train import viz

  vit = tiny_run(tmp_path / "vit", model="vit_tiny", image_size=32, dataset="synthetic:32x32x3:4",
                 train_split="train", eval_split="test")
  out = str(tmp_path / "figures")
  for kind in ("attention", "rollout", "posemb"):
    assert viz.main([kind, "--workdir", vit, "--num", "2", "--out", out, "--dpi", "40"]) == 0
  assert sorted(os.listdir(out)) == ["attention_000.png", "attention_001.png", "posemb.png",
                                     "rollout.png"]
