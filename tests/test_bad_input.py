"""Bad input through the CLI: one `error:` line naming the culprit, exit 2, an intact workdir.

Every case runs `python -m train ...`'s entry point in its own process. To keep the table
cheap, one subprocess imports the trainer once and forks a child per case (this file's
`__main__` block): each child parses its own flags and exits like the real command would, so
exit status, stderr and the workdir are those of `python -m train`. Two cases also run as a
plain `python -m train` subprocess to show the two agree.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import xla_flags
from train.workdir import LOCK_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
BASE = ["--config", "configs/lenet_digits.py", "--config.progress=none"]
UNET = "--config.model=unet_tiny"

# (case id, arguments after BASE, substrings the error line must contain). `{x}` names a path
# made by the `inputs` fixture; `--workdir` is added unless the case gives one.
CASES = [
    # --- config values ---------------------------------------------------------------------------
    ("lr_negative", ["--config.learning_rate=-0.1"], ["config.learning_rate=-0.1"]),
    ("lr_nan", ["--config.learning_rate=nan"], ["config.learning_rate=nan"]),
    ("batch_not_divisible", ["--config.batch_size=30"], ["batch_size=30", f"{DEVICES} devices"]),
    ("batch_zero", ["--config.batch_size=0"], ["config.batch_size=0"]),
    ("total_steps_zero", ["--config.total_steps=0"], ["config.total_steps=0"]),
    ("grad_accum_zero", ["--config.grad_accum_steps=0"], ["config.grad_accum_steps=0"]),
    ("dtype_unknown", ["--config.dtype=float64"], ["config.dtype='float64'"]),
    ("freeze_not_regex", ["--config.freeze=(conv"], ["config.freeze='(conv'"]),
    ("too_many_devices", ["--config.mesh.num_devices=8"], ["num_devices=8", f"{DEVICES} devices"]),
    ("unknown_model", ["--config.model=resnet9000"], ["unknown model 'resnet9000'"]),
    ("unknown_optimizer", ["--config.optimizer=adamax9"], ["config.optimizer='adamax9'"]),
    ("unknown_schedule", ["--config.schedule=zigzag"], ["config.schedule='zigzag'"]),
    ("unknown_dataset_scheme", ["--config.dataset=ftp:/data"], ["unknown scheme 'ftp'"]),
    ("init_from_missing", ["--config.init_from={missing}/run"],
     ["config.init_from='{missing}/run'"]),
    ("num_classes_below_labels", ["--config.num_classes=5"], ["num_classes=5", "out of range"]),
    # --- flags and config files ------------------------------------------------------------------
    ("unknown_key", ["--config.bogus_key=1"], ["bogus_key"]),
    ("non_integer_value", ["--config.batch_size=abc"], ["batch_size"]),
    ("float_for_integer", ["--config.total_steps=1.5"], ["total_steps"]),
    ("missing_config_file", ["--config=configs/no_such_config.py"], ["no_such_config.py"]),
    ("broken_config_file", ["--config={broken_config}"], ["broken_config.py", "line 3"]),
    ("model_kwargs_unknown", ["--config={lenet_bad_kwargs}"], ["model_kwargs", "'lenet'", "widht"]),
    ("model_kwargs_flag_not_key_value", ["--model_kwargs=width"], ["--model_kwargs", "'width'"]),
    ("model_kwargs_flag_unknown", ["--model_kwargs=widht=3"], ["model_kwargs", "'lenet'", "widht"]),
    ("unexpected_argument", ["stray"], ["stray"]),
    # --- splits ----------------------------------------------------------------------------------
    ("split_bad_syntax", ["--config.train_split=train[:80"], ["'train[:80'"]),
    ("split_selects_nothing", ["--config.train_split=train[50%:50%]"], ["selects no example"]),
    ("split_unknown_name", ["--config.eval_split=test"], ["unknown split 'test'"]),
    # --- data ------------------------------------------------------------------------------------
    ("data_path_missing", ["--config.dataset=idx:{missing}"], ["{missing}"]),
    ("corrupt_image", ["--config.dataset=folder:{corrupt_folder}"], ["broken.png"]),
    ("empty_class_folder", ["--config.dataset=folder:{empty_class}"], ["{empty_class}/dog"]),
    ("image_mask_size_mismatch", ["--config.dataset=segfolder:{seg_mismatch}", UNET],
     ["1.png", "8x8", "6x6"]),
    ("image_without_mask", ["--config.dataset=segfolder:{seg_unpaired}", UNET],
     ["2.png", "no mask"]),
    ("label_out_of_range", ["--config.dataset=idx:{idx_negative_label}"],
     ["label -1", "train-labels-idx1-ubyte"]),
    ("idx_truncated", ["--config.dataset=idx:{idx_truncated}"], ["train-images-idx3-ubyte"]),
    # --- model vs data ---------------------------------------------------------------------------
    ("vit_patch_not_dividing", ["--config={vit_patch}"], ["patch_size=8", "30"]),
    ("vit_wrong_input_size", ["--config.model=vit_tiny"], ["vit_tiny", "(1, 28, 28, 1)"]),
    ("segmentation_data_classifier", ["--config.dataset=segfolder:{seg_ok}"],
     ["'lenet'", "segmentation"]),
    ("classification_data_segmenter", [UNET], ["'unet_tiny'", "classification"]),
    # --- checkpoints and workdir -----------------------------------------------------------------
    ("checkpoint_of_other_model", ["--config.model=resnet_tiny", "--workdir={lenet_workdir}"],
     ["'lenet'", "'resnet_tiny'", "checkpoints/2"]),
    ("checkpoint_of_other_shapes", ["--config.num_classes=12", "--config.batch_size=8",
                                    "--workdir={lenet_workdir}"],
     ["checkpoints/2", "params/head/", "(10,) there, (12,) here"]),
    ("workdir_is_a_file", ["--workdir={a_file}/w"], ["workdir {a_file}/w cannot be created"]),
    ("workdir_not_writable", ["--workdir={read_only}/w"],
     ["workdir {read_only}/w cannot be created"]),
]


def _png(path, array, mode):
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array.astype(np.uint8), mode).save(path)


def _idx(path, array, type_code):
  dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(bytes([0, 0, type_code, array.ndim]) + dims + array.tobytes())


def _make_inputs(root: str) -> dict[str, str]:
  """Small broken (and one sound) data sets, config files and workdirs under `root`."""
  rng = np.random.default_rng(0)
  image = lambda h, w, c=3: rng.integers(0, 255, (h, w, c) if c > 1 else (h, w))
  p = {name: os.path.join(root, name) for name in (
      "missing", "corrupt_folder", "empty_class", "seg_mismatch", "seg_unpaired", "seg_ok",
      "idx_negative_label", "idx_truncated", "a_file", "read_only", "lenet_workdir")}

  for cls in ("cat", "dog"):
    for i in range(3):
      _png(f"{p['corrupt_folder']}/{cls}/{i}.png", image(8, 8), "RGB")
  with open(f"{p['corrupt_folder']}/dog/broken.png", "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(100))  # a PNG signature, then garbage
  _png(f"{p['empty_class']}/cat/0.png", image(8, 8), "RGB")
  os.makedirs(f"{p['empty_class']}/dog")

  _png(f"{p['seg_mismatch']}/image/1.png", image(8, 8), "RGB")
  _png(f"{p['seg_mismatch']}/label/1.png", rng.integers(0, 2, (6, 6)), "L")
  for i in (1, 2):
    _png(f"{p['seg_unpaired']}/image/{i}.png", image(8, 8), "RGB")
  _png(f"{p['seg_unpaired']}/label/1.png", rng.integers(0, 2, (8, 8)), "L")
  for i in range(8):
    _png(f"{p['seg_ok']}/image/{i}.png", image(32, 32, 1), "L")
    _png(f"{p['seg_ok']}/label/{i}.png", rng.integers(0, 2, (32, 32)), "L")

  negative, truncated = p["idx_negative_label"], p["idx_truncated"]
  os.makedirs(negative)
  _idx(f"{negative}/train-images-idx3-ubyte.gz", np.zeros((4, 8, 8), np.uint8), 0x08)
  _idx(f"{negative}/train-labels-idx1-ubyte.gz", np.array([0, 1, -1, 2], np.int8), 0x09)  # signed
  os.makedirs(truncated)
  _idx(f"{truncated}/train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), 0x08)
  with gzip.open(f"{truncated}/train-images-idx3-ubyte.gz", "wb") as f:  # 50 of 256 pixels
    f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (4, 8, 8)) + bytes(50))

  open(p["a_file"], "w").close()
  if os.geteuid() == 0:  # chmod means nothing to root, but /proc refuses new directories
    p["read_only"] = "/proc/jaxvision"
  else:
    os.makedirs(p["read_only"], mode=0o555)

  configs = {
      "broken_config": "from configs import lenet_digits\ndef get_config(arg=None):\n  return (\n",
      "lenet_bad_kwargs": """
          from configs import lenet_digits
          def get_config(arg=None):
            c = lenet_digits.get_config()
            c.model_kwargs.widht = 2
            return c
      """,
      "vit_patch": """
          from configs import base
          def get_config(arg=None):
            c = base.get_config()
            c.model, c.dataset, c.image_size = "vit_tiny", "synthetic:30x30x3:10", 30
            c.model_kwargs.image_size = 30  # 8-pixel patches do not tile 30 pixels
            return c
      """,
  }
  for name, text in configs.items():
    p[name] = os.path.join(root, name + ".py")
    with open(p[name], "w") as f:
      f.write(textwrap.dedent(text))
  return p


def _tree_digest(path: str) -> str:
  """A digest of every file under `path` but the workdir's lock file (whose content is the pid
  of the last trainer that held it)."""
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in sorted(os.walk(path)):
    dirnames.sort()
    for name in sorted(filenames):
      if name == LOCK_FILE:
        continue
      full = os.path.join(dirpath, name)
      digest.update(os.path.relpath(full, path).encode())
      with open(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(DEVICES))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
  """Runs every case; {case id: (returncode, stderr, workdir, digest before, digest after)}."""
  root = str(tmp_path_factory.mktemp("bad_input"))
  paths = _make_inputs(root)
  # A real checkpoint (2 steps of LeNet) for the cases that must refuse it and leave it alone.
  made = subprocess.run(
      [sys.executable, "-m", "train", *BASE, "--workdir", paths["lenet_workdir"],
       "--config.total_steps=2", "--config.eval_split=", "--config.batch_size=8"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert made.returncode == 0, made.stderr
  jobs, digests = [], {}
  for name, args, _ in CASES:
    args = [a.format(**paths) for a in args]
    if not any(a.startswith("--workdir") for a in args):
      args.append(f"--workdir={os.path.join(root, 'w_' + name)}")
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir"))
    digests[name] = _tree_digest(workdir) if os.path.isdir(workdir) else None
    own_config = [a for a in args if a.startswith("--config=")]
    argv = [*own_config, *BASE[2:], *[a for a in args if a not in own_config]] if own_config else [
        *BASE, *args]
    jobs.append({"name": name, "argv": argv, "log": os.path.join(root, name + ".err")})
  with open(os.path.join(root, "jobs.json"), "w") as f:
    json.dump(jobs, f)
  driver = subprocess.run(
      [sys.executable, os.path.abspath(__file__), os.path.join(root, "jobs.json")],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert driver.returncode == 0, driver.stderr
  codes = json.loads(driver.stdout.strip().splitlines()[-1])
  results = {}
  for job in jobs:
    workdir = next(a.split("=", 1)[1] for a in job["argv"] if a.startswith("--workdir"))
    after = _tree_digest(workdir) if os.path.isdir(workdir) else None
    with open(job["log"]) as f:
      results[job["name"]] = (codes[job["name"]], f.read(), workdir, digests[job["name"]], after)
  results["_paths"] = paths
  return results


def test_the_table_has_at_least_20_cases():
  assert len({name for name, _, _ in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(outcome, name, args, expected):
  code, stderr, workdir, before, after = outcome[name]
  lines = [ln for ln in stderr.splitlines() if ln.strip()]
  assert "Traceback" not in stderr, stderr
  assert code == 2, (code, stderr)
  errors = [ln for ln in lines if ln.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], stderr
  for part in expected:
    assert part.format(**outcome["_paths"]) in errors[0], (part, errors[0])
  # Intact workdir: a fresh one is not even created; an existing one is byte-for-byte unchanged.
  assert after == before, f"{workdir} changed"


def test_forked_cases_match_a_plain_subprocess(outcome, tmp_path):
  """The fork driver reports what `python -m train` itself prints."""
  for name, args, _ in CASES:
    if name not in ("lr_nan", "corrupt_image"):
      continue
    args = [a.format(**outcome["_paths"]) for a in args] + [f"--workdir={tmp_path / name}"]
    plain = subprocess.run([sys.executable, "-m", "train", *BASE, *args], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    forked = outcome[name][1].strip().splitlines()[-1]
    assert plain.returncode == outcome[name][0] == 2
    assert plain.stderr.strip().splitlines()[-1] == forked


def _run_jobs(jobs_file: str) -> None:
  """Runs each job like `python -m train ARGV` in a forked child; prints {name: exit status}."""
  sys.path.insert(0, REPO)
  import traceback

  from absl import app

  import train.__main__ as cli
  import train.loop  # noqa: F401 - imported once here, not in every child

  codes = {}
  for job in json.load(open(jobs_file)):
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: becomes `python -m train ARGV`, then exits
      code = 1
      try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = [os.path.join(REPO, "train", "__main__.py"), *job["argv"]]
        app.run(cli.main, flags_parser=cli._parse_flags)
        code = 0
      except SystemExit as e:
        if isinstance(e.code, str):
          print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # noqa: BLE001 - what the interpreter would print
        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    codes[job["name"]] = os.waitstatus_to_exitcode(status)
    print(f"{job['name']}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  print(json.dumps(codes))


if __name__ == "__main__":
  _run_jobs(sys.argv[1])
