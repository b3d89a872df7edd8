"""Runs the front-door notebook headless (``bcd notebook``), as papermill does: a cell of
parameters is put right after the notebook's own ``parameters`` cell, and every cell runs in
a fresh kernel. ``--quick`` runs it offline in a few minutes on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError, install_hint
from .pretrained import REPO_ROOT, SAMPLE_PATCHES

NOTEBOOK = REPO_ROOT / "Breast_Cancer_Detection.ipynb"
"""The notebook, at the root of a clone."""


def quick_parameters(folder: str | Path) -> dict[str, Any]:
    """The ``--quick`` run: the synthetic BreakHis tree (written into ``folder``), the
    ``cpu-smoke`` preset for 2 epochs from random weights, and the inference cell on the sample
    patches with the model made for them; no network, no GPU."""
    from .data.synthetic import write_synthetic_breakhis

    folder = Path(folder)
    data = write_synthetic_breakhis(folder / "synthetic-breakhis")
    return {"DATA": str(data), "PRESET": "cpu-smoke", "PRETRAINED": False, "EPOCHS": 2,
            "VAL": 0.25, "TEST": 0.25, "SEED": 0, "RUNS": str(folder / "runs"),
            "TRAINED": "pcam-patch-cnn",
            "MY_IMAGES": [str(p) for p in sorted(SAMPLE_PATCHES.glob("*/*.jpg"))]}


def run_notebook(params: dict[str, Any], folder: str | Path, *,
                 notebook: str | Path = NOTEBOOK, out: str | Path | None = None,
                 timeout: int = 900):
    """Executes ``notebook`` in ``folder`` with ``params`` overriding its parameters cell.

    Args:
        params: Parameter name -> Python value (written with ``repr``).
        folder: The kernel's working folder.
        notebook: The notebook to run.
        out: Where to write the executed notebook, with its outputs; None writes nothing.
        timeout: Seconds one cell may take.

    Returns:
        The executed notebook (an ``nbformat`` node).

    Raises:
        UserError: nbclient is missing, or the notebook is not there.
        nbclient.exceptions.CellExecutionError: a cell failed (its traceback in the message).
    """
    try:
        import nbclient
        import nbformat
    except ImportError as e:
        raise UserError(f"running the notebook needs nbclient, nbformat and ipykernel "
                        f"({e.name} is missing): pip install nbclient nbformat ipykernel, or "
                        f"{install_hint('dev')}.") from None
    notebook = Path(notebook)
    if not notebook.is_file():
        raise UserError(f"{notebook}: no such notebook. It lives in the repository: git clone "
                        "it (or download Breast_Cancer_Detection.ipynb) and run from there.")
    nb = nbformat.read(notebook, as_version=4)
    at = next((i for i, c in enumerate(nb.cells)
               if "parameters" in c.metadata.get("tags", [])), -1)
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    Path(folder).mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    try:
        client.execute()
    finally:
        if out is not None:  # also a failed run: its outputs show where it stopped
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out)
    return nb


def pictures(nb) -> int:
    """How many ``image/png`` outputs an executed notebook holds."""
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))
