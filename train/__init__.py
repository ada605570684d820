"""The jaxvision trainer: `python -m train --config configs/NAME.py --workdir DIR`.

A library of small pure pieces (optimizer factory, train state, steps, parallel execution,
checkpoints, metric writers) assembled by `train.loop.train_and_evaluate`.
"""
