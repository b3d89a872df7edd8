"""The notebook runs top to bottom on a tiny fake BreakHis tree (cpu-smoke), and ships clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "Breast_Cancer_Detection.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code)


@pytest.mark.slow
def test_notebook_executes_end_to_end(fake_breakhis, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    # Like papermill: a cell right after the parameters cell overrides them.
    params = (f"DATA = {str(fake_breakhis)!r}\nPRESET = 'cpu-smoke'\nPRETRAINED = False\n"
              f"EPOCHS = 2\nVAL, TEST, SEED = 0.25, 0.25, 0\nRUNS = {str(tmp_path / 'runs')!r}\n")
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    assert "patients in both train and test: 0" in text
    assert "largest difference after reloading" in text
    assert list((tmp_path / "runs").glob("*/best.pt"))
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= 6  # sample grid, curves, report plots, prediction figures
