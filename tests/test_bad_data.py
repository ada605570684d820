"""Bad data through the CLI: one `error:` line naming the file (and the value or size), exit 2,
an intact workdir. Images too large to decode, segmentation masks whose values do not say which
class they are, two files of one name, one-class data sets.

The cases run like test_bad_input's: one subprocess imports the trainer once and forks a child
per case (test_bad_input's driver, run by this file's `__main__` block), so exit status, stderr
and the workdir are those of `python -m train`. (The loaders' own errors: test_data_errors.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from test_bad_input import _env, _run_jobs, _tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config", "configs/lenet_digits.py", "--config.progress=none", "--config.total_steps=1"]
UNET = "--config.model=unet_tiny"

# (case id, arguments after BASE, substrings the error line must contain). `{x}` names a path
# made by `_make_inputs`; `--workdir` is added unless the case gives one.
CASES = [
    # --- images too large to decode --------------------------------------------------------------
    ("decompression_bomb", ["--config.dataset=folder:{bomb}"],
     ["image {bomb}/dog/huge.png has 400,000,000 pixels", "data.max_image_pixels"]),
    ("over_max_image_pixels", ["--config.dataset=folder:{cats_dogs}",
                               "--config.data.max_image_pixels=63"],
     ["image {cats_dogs}/cat/", ".png is 8x8 (64 pixels), over the limit of 63"]),
    ("segfolder_decompression_bomb", ["--config.dataset=segfolder:{seg_bomb}", UNET],
     ["image {seg_bomb}/image/9.png has 400,000,000 pixels"]),
    # --- what a mask value means -----------------------------------------------------------------
    ("mask_255_patch", ["--config.dataset=segfolder:{seg_255}", UNET],
     ["mask {seg_255}/label/1.png has value 255", "data.mask_values=(0, 1, 2, 255)",
      "'ignore' label", "not supported yet"]),
    ("mask_255_over_num_classes", ["--config.dataset=segfolder:{seg_255}", UNET,
                                   "--config.num_classes=3"],
     ["label 255 out of range for 3 classes in {seg_255}/label/1.png", "'ignore' label"]),
    ("mask_16_bit", ["--config.dataset=segfolder:{seg_16bit}", UNET],
     ["mask {seg_16bit}/label/0.png has value 1000 but no mask has 1", "data.mask_values"]),
    ("mask_value_not_declared", ["--config.dataset=segfolder:{seg_255}", UNET,
                                 "--config.data.mask_values=(0, 1, 2)"],
     ["mask {seg_255}/label/1.png has value 255", "data.mask_values=(0, 1, 2) does not list"]),
    ("mask_values_twice", ["--config.dataset=segfolder:{seg_255}", UNET,
                           "--config.data.mask_values=(0, 0)"], ["data.mask_values=(0, 0)"]),
    ("binary_masks_three_classes", ["--config.dataset=segfolder:{seg_binary}", UNET,
                                    "--config.num_classes=3"],
     ["{seg_binary}/label/", "has value 255", "config.num_classes=3"]),
    # --- ambiguous pairs -------------------------------------------------------------------------
    ("two_images_of_one_name", ["--config.dataset=segfolder:{seg_two_images}", UNET],
     ["{seg_two_images}/image/3.jpg", "{seg_two_images}/image/3.png"]),
    ("two_masks_of_one_name", ["--config.dataset=segfolder:{seg_two_masks}", UNET],
     ["{seg_two_masks}/label/3.png", "{seg_two_masks}/label/3.tif"]),
    # --- one class -------------------------------------------------------------------------------
    ("folder_one_class", ["--config.dataset=folder:{one_class}"],
     ["classification needs at least 2 classes; folder:{one_class} has one, 'cat'"]),
    ("masks_one_class", ["--config.dataset=segfolder:{seg_one_class}", UNET],
     ["segmentation needs at least 2 classes", "hold one value, 0"]),
    # --- folder slices ---------------------------------------------------------------------------
    ("folder_split_selects_nothing", ["--config.dataset=folder:{cats_dogs}",
                                      "--config.train_split=train[6:]"], ["'train[6:]'"]),
]


def _png(path, array) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _huge_png(path, width=20000, height=20000) -> None:
  """A complete, valid 1-bit PNG of width x height (48 kB on disk, 400 million pixels)."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  rows = zlib.compressobj(6)
  block = bytes(1 + (width + 7) // 8) * 500
  pixels = b"".join(rows.compress(block) for _ in range(height // 500)) + rows.flush()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                            0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _segfolder(root, masks) -> None:
  """image/i.png (a gray image drawn from the mask) and label/i.png for each mask."""
  for i, mask in enumerate(masks):
    _png(f"{root}/image/{i}.png", (mask.astype(np.int64) * 60 % 256).astype(np.uint8))
    _png(f"{root}/label/{i}.png", mask)


def _make_inputs(root: str) -> dict[str, str]:
  """Small bad data sets under `root` (and one sound folder)."""
  p = {name: os.path.join(root, name) for name in (
      "bomb", "cats_dogs", "seg_bomb", "seg_255", "seg_16bit", "seg_binary", "seg_two_images",
      "seg_two_masks", "one_class", "seg_one_class")}
  for folder in (p["bomb"], p["cats_dogs"]):
    for c, cls in enumerate(("cat", "dog")):
      for i in range(3):
        _png(f"{folder}/{cls}/{i}.png", np.full((8, 8, 3), 60 * c + 20 * i, np.uint8))
  _huge_png(f"{p['bomb']}/dog/huge.png")
  for i in range(3):
    _png(f"{p['one_class']}/cat/{i}.png", np.full((8, 8, 3), 20 * i, np.uint8))

  stripes = [np.tile(np.arange(3, dtype=np.uint8), (8, 3))[:, :8] for _ in range(4)]  # 0, 1, 2
  patched = [m.copy() for m in stripes]
  patched[1][2:5, 2:5] = 255
  _segfolder(p["seg_255"], patched)
  _segfolder(p["seg_16bit"], [np.where(np.eye(8, dtype=bool), 1000, 0).astype(np.uint16)] * 4)
  binary = [np.where(np.eye(8, dtype=bool), 255, 0).astype(np.uint8)] * 4
  _segfolder(p["seg_binary"], binary)
  _segfolder(p["seg_bomb"], binary)
  shutil.copy(f"{p['bomb']}/dog/huge.png", f"{p['seg_bomb']}/image/9.png")
  _png(f"{p['seg_bomb']}/label/9.png", binary[0])
  for name in ("seg_two_images", "seg_two_masks"):
    _segfolder(p[name], binary)
  _png(f"{p['seg_two_images']}/image/3.jpg", np.zeros((8, 8), np.uint8))
  _png(f"{p['seg_two_masks']}/label/3.tif", binary[0])
  _segfolder(p["seg_one_class"], [np.zeros((8, 8), np.uint8)] * 4)
  return p


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
  """Runs every case; {case id: (returncode, stderr, workdir, digest before, digest after)}."""
  root = str(tmp_path_factory.mktemp("bad_data"))
  paths = _make_inputs(root)
  jobs, digests = [], {}
  for name, args, _ in CASES:
    args = [a.format(**paths) for a in args]
    workdir = os.path.join(root, "w_" + name)
    digests[name] = _tree_digest(workdir) if os.path.isdir(workdir) else None
    jobs.append({"name": name, "argv": [*BASE, *args, f"--workdir={workdir}"],
                 "log": os.path.join(root, name + ".err")})
  with open(os.path.join(root, "jobs.json"), "w") as f:
    json.dump(jobs, f)
  driver = subprocess.run(
      [sys.executable, os.path.abspath(__file__), os.path.join(root, "jobs.json")],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert driver.returncode == 0, driver.stderr
  codes = json.loads(driver.stdout.strip().splitlines()[-1])
  results = {}
  for job in jobs:
    workdir = job["argv"][-1].split("=", 1)[1]
    after = _tree_digest(workdir) if os.path.isdir(workdir) else None
    with open(job["log"]) as f:
      results[job["name"]] = (codes[job["name"]], f.read(), workdir, digests[job["name"]], after)
  results["_paths"] = paths
  return results


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_data_fails_in_one_line(outcome, name, args, expected):
  code, stderr, workdir, before, after = outcome[name]
  lines = [ln for ln in stderr.splitlines() if ln.strip()]
  assert "Traceback" not in stderr, stderr
  assert code == 2, (code, stderr)
  errors = [ln for ln in lines if ln.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], stderr
  for part in expected:
    assert part.format(**outcome["_paths"]) in errors[0], (part, errors[0])
  assert after == before, f"{workdir} changed"  # a fresh workdir is not even created


@pytest.mark.slow  # a real (1-step) training run: its compile is most of a minute on 2 busy cores
def test_a_skipped_decompression_bomb_still_trains(tmp_path):
  paths = _make_inputs(str(tmp_path))
  workdir = tmp_path / "work"
  result = subprocess.run(
      [sys.executable, "-m", "train", *BASE, f"--config.dataset=folder:{paths['bomb']}",
       "--config.data.skip_bad=True", "--config.eval_split=", "--config.batch_size=4",
       f"--workdir={workdir}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"skipping image {paths['bomb']}/dog/huge.png has 400,000,000 pixels" in result.stderr
  assert (workdir / "metrics.jsonl").is_file()


if __name__ == "__main__":
  _run_jobs(sys.argv[1])
