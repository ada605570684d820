"""Multi-task LeNet on scikit-learn's digits: classify the digit and regress its ink coverage.

One backbone (LeNet-5, ReLU + max-pool), two heads (`lenet_multitask`): 10-way logits and one
regression value. The loss is cross-entropy + 0.05 * MSE of the ink percentage (the share of
pixels brighter than the middle of the image's range; see jaxvision.multitask). The weight
puts the two terms on a comparable scale at the start: the ink's variance is about 16 (%^2),
the initial cross-entropy about 2.3.

    python -m train --config configs/multitask_digits.py --workdir /tmp/multitask_digits

Measured on the 2-core CPU (1000 steps, eval on the held-out 20%, 359 digits): accuracy 0.9889,
ink MAE 1.15 percentage points, r2 0.847. The trainer needs 'multitask' among the task names
that train/configuration.py accepts.
"""

from configs import base


def get_config(arg: str | None = None):
  """Digits at 28x28, 80/20 split, Adam; task 'multitask' on model 'lenet_multitask'."""
  c = base.get_config(arg)
  c.model = "lenet_multitask"
  c.task = "multitask"
  c.dataset = "digits"
  c.train_split = "train[:80%]"
  c.eval_split = "train[80%:]"
  c.image_size = 28
  c.batch_size = 64
  c.total_steps = 1000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optimizer = "adam"
  c.learning_rate = 3e-3
  c.data.normalize = "half"
  c.multitask.target = "ink"
  c.multitask.regression_loss = "mse"
  c.multitask.regression_weight = 0.05
  c.multitask.classification_weight = 1.0
  return c
