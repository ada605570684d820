"""LeNet-5 on scikit-learn's bundled digits: the embedded default, no download needed.

    python -m train --config configs/lenet_digits.py --workdir /tmp/lenet_digits

Measured result: see README (eval accuracy on the held-out 20% of the 1,797 digits).
"""

from configs import base


def get_config(arg: str | None = None):
  """Digits upscaled to 28x28, 80/20 split, Adam."""
  c = base.get_config(arg)
  c.model = "lenet"
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
  return c
