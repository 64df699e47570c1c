"""Every notebook in notebooks/ runs top to bottom, and is stored without outputs."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # a guard against hangs; a busy 2-core CI host needs minutes per training cell


def _ids(paths):
  return [path.stem for path in paths]


def test_notebooks_exist():
  assert len(NOTEBOOKS) >= 3, f"expected the notebooks in {NOTEBOOKS_DIR}, found {NOTEBOOKS}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path):
  notebook = nbformat.read(path, as_version=4)
  # The kernel is a fresh process: it must not inherit the 8 simulated devices of conftest.py
  # (a notebook that wants them sets XLA_FLAGS itself, before importing jax).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  client = NotebookClient(
    notebook,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
  )
  client.execute(env=env)  # raises CellExecutionError naming the cell on any error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{path.name} cell {index} has stored outputs"
      assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
