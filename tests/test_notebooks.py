"""Every notebook under notebooks/ runs top to bottom (its own asserts included) on a CPU."""

import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient
from quick_jit import QUICK_BUILD_FLAGS

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert any(p.name == "scan_vs_kernel.ipynb" for p in NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  # The kernel inherits the environment: the notebooks compare forms on small arrays, so
  # building their programs is most of the time (tests/quick_jit.py).
  monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {QUICK_BUILD_FLAGS}".strip())
  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  # An error in any cell raises CellExecutionError with the cell's traceback.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent.parent)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in outputs), "the notebook drew no plot"
  print(f"{path.name}: {time.perf_counter() - start:.0f} s")
