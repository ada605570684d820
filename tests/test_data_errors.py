"""Bad input through the trainer's command line: one line naming the culprit, a non-zero exit,
and nothing written to the workdir. (Every loader error itself is tested in test_data_sources.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def _folder(root: pathlib.Path, bad: bool) -> None:
  for c in ("a", "b"):
    os.makedirs(root / c)
    for i in range(3):
      Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
  if bad:
    (root / "b" / "bad.png").write_bytes(b"not an image")


def _train(workdir, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "train", "--config", "configs/lenet_digits.py", "--workdir",
       str(workdir), "--config.progress=none", *overrides],
      capture_output=True, text=True, cwd=REPO, timeout=300,
  )


@pytest.mark.parametrize("case", ["corrupt_image", "empty_split"])
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, case):
  _folder(tmp_path / "data", bad=case == "corrupt_image")
  split = "train[6:]" if case == "empty_split" else "train"
  result = _train(tmp_path / "work", f"--config.dataset=folder:{tmp_path / 'data'}",
                  f"--config.train_split={split}", "--config.eval_split=")
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  expected = {"corrupt_image": f"cannot read image {tmp_path / 'data' / 'b' / 'bad.png'}",
              "empty_split": "split 'train[6:]' selects no example"}[case]
  assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
  assert not (tmp_path / "work").exists()
