"""Export: StableHLO (run in a fresh process that imports jax alone), ONNX (run by ONNX Runtime)
and SavedModel (run by TensorFlow), each equal to the JAX model within 1e-4 on eval-preprocessed
inputs for a CNN, a ViT and a U-Net, with the preprocessing and class names as metadata; and
`python -m train.export` on a real (tiny) run."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxvision
from configs import base
from conftest import small_config
from jaxvision.data.task_transforms import build_transform
from jaxvision.export import Exportable, export, load_exported, preprocessing_of

TOL = 1e-4
CASES = {  # name -> (input shape, data.normalize)
    "resnet_tiny": ((32, 32, 3), "imagenet"),
    "vit_tiny": ((32, 32, 3), "half"),
    "unet_tiny": ((32, 32, 1), "half"),
}
FULL = {"resnet50": ((224, 224, 3), "imagenet"), "vit_b16": ((224, 224, 3), "half"),
        "unet": ((572, 572, 1), "half")}
HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _random_variables(model, shape, seed):
  """Variables with non-trivial BatchNorm statistics, so that eval mode is exercised."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, *shape))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    fan_in = max(int(np.prod(leaf.shape[:-1])), 1) if name == "kernel" else 25
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _eval_images(shape, normalize, n, seed):
  """`n` random pictures of another size, through the data package's eval transform."""
  h, w, c = shape
  rng = np.random.default_rng(seed)
  data = base.get_config().data
  data.normalize = normalize
  if c == 1:  # segmentation evaluates full images: normalization only
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    transform = build_transform(data, train=False, task="segmentation")
    return transform({"image": images, "label": np.zeros((n, h, w), np.int32)}, rng)["image"]
  images = list(rng.integers(0, 256, (n, h + 9, w + 5, c), dtype=np.uint8))
  transform = build_transform(data, train=False, task="classification", image_size=h)
  return transform({"image": images, "label": np.zeros(n, np.int32)}, rng)["image"]


def _case(name, shape, normalize, seed=0):
  model = jaxvision.create_model(name)
  variables = _random_variables(model, shape, seed)
  exportable = Exportable.build(
      model, variables, input_shape=shape, name=name,
      preprocessing=preprocessing_of(image_size=shape[0], normalize=normalize, eval_crop=0.875),
      class_names=[f"class_{i}" for i in range(model.num_classes)])
  images = _eval_images(shape, normalize, 3, seed)
  expected = np.asarray(jax.jit(model.apply)(variables, images))
  return exportable, images, expected


@pytest.fixture(scope="module")
def cases():
  return {name: _case(name, *spec) for name, spec in CASES.items()}


def _check_metadata(path, exportable, fmt):
  with open(path) as f:
    meta = json.load(f)
  assert meta["format"] == fmt and meta["model"] == exportable.metadata["model"]
  assert meta["preprocessing"]["mean"] == exportable.metadata["preprocessing"]["mean"]
  assert meta["class_names"][:2] == ["class_0", "class_1"]
  assert meta["outputs"][0]["name"] == "logits"
  return meta


# A script that knows nothing of jaxvision: it gets the artifact folders and writes the outputs.
_FRESH = textwrap.dedent("""
    import sys
    import jax, numpy as np
    out = {}
    for folder in sys.argv[2:]:
      exported = jax.export.deserialize(open(folder + "/model.jax_export", "rb").read())
      with np.load(folder + "/weights.npz") as w:
        weights = [w[k] for k in sorted(w.files)]
      images = np.load(folder + "/images.npy")
      for n in (1, 3):
        out[folder + f"@{n}"] = np.asarray(exported.call(weights, images[:n])[0])
    assert not any(m.startswith(("jaxvision", "flax", "train")) for m in sys.modules), sorted(
        m for m in sys.modules if m.startswith(("jaxvision", "flax", "train")))
    np.savez(sys.argv[1], **{str(i): v for i, v in enumerate(out.values())})
    print(" ".join(out))
""")


def test_stablehlo_runs_in_a_fresh_process_at_any_batch(tmp_path, cases):
  folders = []
  for name, (exportable, images, _) in cases.items():
    folder = str(tmp_path / name)
    paths = export(exportable, "stablehlo", folder)
    _check_metadata(paths[-1], exportable, "stablehlo")
    np.save(os.path.join(folder, "images.npy"), images)
    folders.append(folder)
  result = tmp_path / "outputs.npz"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", _FRESH, str(result), *folders], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  keys = proc.stdout.split()
  outputs = np.load(result)
  for i, key in enumerate(keys):
    folder, n = key.rsplit("@", 1)
    expected = cases[os.path.basename(folder)][2][:int(n)]
    got = outputs[str(i)]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# 15 s (jax2onnx and ONNX Runtime); -m slow.
@pytest.mark.slow
def test_onnx_runs_in_onnx_runtime(tmp_path, cases):
  import onnx

  for name, (exportable, images, expected) in cases.items():
    folder = str(tmp_path / name)
    paths = export(exportable, "onnx", folder)
    meta = _check_metadata(paths[-1], exportable, "onnx")
    model = onnx.load(paths[0])
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["jaxvision"])["class_names"] == meta["class_names"]
    assert model.graph.input[0].name == "images"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    run = load_exported("onnx", folder)
    for n in (1, 3):
      np.testing.assert_allclose(run(images[:n])[0], expected[:n], atol=TOL, rtol=0)


@pytest.mark.slow  # 7-12 s: TensorFlow's import and conversion
@pytest.mark.skipif(not HAS_TF, reason="exercises the error without TensorFlow instead")
def test_savedmodel_runs_in_tensorflow(tmp_path, cases):
  for name, (exportable, images, expected) in cases.items():
    folder = str(tmp_path / name)
    paths = export(exportable, "savedmodel", folder)
    _check_metadata(paths[-1], exportable, "savedmodel")
    _check_metadata(os.path.join(folder, "assets", "metadata.json"), exportable, "savedmodel")
    run = load_exported("savedmodel", folder)
    for n in (1, 3):
      np.testing.assert_allclose(run(images[:n])[0], expected[:n], atol=TOL, rtol=0)


@pytest.mark.skipif(HAS_TF, reason="TensorFlow is installed: the export itself is tested")
def test_savedmodel_without_tensorflow_is_a_one_line_error(tmp_path, cases):
  exportable = cases["resnet_tiny"][0]
  with pytest.raises(ImportError, match=r"needs TensorFlow: pip install 'jaxvision\[tfds\]'"):
    export(exportable, "savedmodel", str(tmp_path / "sm"))


def test_unknown_format():
  with pytest.raises(ValueError, match="export format 'tflite' is unknown"):
    export(None, "tflite", "out")


def test_export_cli_on_a_trained_run(tmp_path, capsys):
  from train import export as cli
  from train import loop

  workdir = str(tmp_path / "run")
  # Three steps, no evaluation: a real checkpoint and config.json, cheaply.
  config = small_config(total_steps=3, checkpoint_every=3, eval_split="", best_metric="")
  loop.train_and_evaluate(config, workdir)
  out = str(tmp_path / "hlo")
  assert cli.main(["--workdir", workdir, "--format", "stablehlo", "--out", out,
                   "--check", "2"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["input_shape"] == [28, 28, 1] and summary["max_abs_diff"] <= TOL
  with open(os.path.join(out, "metadata.json")) as f:
    meta = json.load(f)
  assert meta["class_names"] == [str(i) for i in range(10)]
  assert meta["preprocessing"]["normalize"] == "half" and meta["source"] == f"{workdir}@3"
  assert cli.main(["--workdir", str(tmp_path / "none"), "--format", "onnx", "--out", out]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "config.json not found" in err and "\n" not in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stablehlo", "onnx", "savedmodel"])
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_export(tmp_path, name, fmt):
  if fmt == "savedmodel" and not HAS_TF:
    pytest.skip("TensorFlow is not installed")
  exportable, images, expected = _case(name, *FULL[name])
  export(exportable, fmt, str(tmp_path))
  got = load_exported(fmt, str(tmp_path))(images)[0]
  scale = max(float(np.abs(expected).max()), 1.0)
  np.testing.assert_allclose(got, expected, atol=TOL * scale, rtol=0)
