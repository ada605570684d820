"""LeNet-5 on scikit-learn's bundled digits: the embedded default, no download needed.

    python -m train --config configs/lenet_digits.py --workdir /tmp/lenet_digits

Measured result: see README (eval accuracy on the held-out 20% of the 1,797 digits).
"""

from configs import base


def get_config(arg: str | None = None):
  """The base config's LeNet on digits (28x28, 80/20 split, Adam, 1000 steps), batch 64,
  learning rate 3e-3, inputs scaled to [-1, 1]."""
  c = base.get_config(arg)
  c.batch_size = 64
  c.log_every = 100
  c.learning_rate = 3e-3
  c.data.normalize = "half"
  return c
