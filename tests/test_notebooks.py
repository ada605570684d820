"""The Colab notebooks: each runs top to bottom in a real Jupyter kernel, in smoke mode, on CPU.

Smoke mode (JAXVISION_SMOKE=1) keeps every notebook's cells but shrinks them: tiny models, a
few steps, generated or mocked data instead of downloads. The kernel is this interpreter's
`python3` (jupyter_client runs it with sys.executable), with the repository on PYTHONPATH so a
fresh clone needs no install, and 4 fake CPU devices so the sharded (mesh) path really shards.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from conftest import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
# Notebook -> figures it draws; a plotting cell that silently shows nothing fails the test.
FIGURES = {"quickstart": 2, "vit_tpu": 2, "unet_segmentation": 3, "interpretability": 5}
NOTEBOOKS = tuple(FIGURES)
CELL_TIMEOUT_S = 300


def _kernel_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      # One compilation cache for the session: notebooks that train the same model (LeNet on the
      # digits in quickstart and interpretability) compile its steps once.
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAXVISION_SMOKE="1",
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=xla_flags(4),
      PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
      MPLBACKEND="module://matplotlib_inline.backend_inline",
      TF_CPP_MIN_LOG_LEVEL="2",
      PYDEVD_DISABLE_FILE_VALIDATION="1",
  )
  return env


def _read(name: str):
  path = NOTEBOOK_DIR / f"{name}.ipynb"
  assert path.is_file(), f"{path} is missing"
  return nbformat.read(path, as_version=4)


def _errors(nb) -> list[str]:
  found = []
  for i, cell in enumerate(nb.cells):
    for out in cell.get("outputs", []):
      if out.get("output_type") == "error":
        found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
  return found


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("jax_cache"))


# 25-55 s each on a 2-core CPU: run with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, compile_cache):
  nb = _read(name)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  try:
    # The kernel process gets smoke mode, CPU devices and the repository on its path.
    client.execute(env=_kernel_env(compile_cache))
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name}.ipynb: {str(e).strip().splitlines()[-1]}\n{e}")
  assert not _errors(nb), _errors(nb)
  images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == FIGURES[name], f"{name}.ipynb drew {len(images)} figures"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
           and (cell.get("outputs") or cell.get("execution_count") is not None)]
  assert not dirty, f"{name}.ipynb has outputs in cells {dirty}; strip them before committing"
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
