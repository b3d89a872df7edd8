"""The model shipped in checkpoints/: it loads, it is the file the registry names, and it still
scores what its model card says on PCam's validation patches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from breast_cancer_detection.checkpoint import load_checkpoint
from breast_cancer_detection.data.breakhis import build_index
from breast_cancer_detection.data.download import sha256_of
from breast_cancer_detection.inference import Predictor
from breast_cancer_detection.metrics import roc_auc
from breast_cancer_detection.pretrained import trained_model

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT / "checkpoints" / "pcam-patch-cnn.pt"
CARD = ROOT / "checkpoints" / "README.md"


def _card_figure(label: str) -> float:
    """A number from the model card's table row that starts with ``label``."""
    m = re.search(rf"^\| {re.escape(label)} \| \*?\*?([0-9.]+)", CARD.read_text(), re.M)
    assert m, f"no '{label}' row in {CARD}"
    return float(m[1])


def test_the_released_model_is_the_registered_file_and_fits_the_size_limit():
    entry = trained_model("pcam-patch-cnn")
    assert entry.path == RELEASED and RELEASED.is_file()
    assert entry.sha256 == sha256_of(RELEASED)
    assert RELEASED.stat().st_size <= 8 * 1024 * 1024
    ckpt = load_checkpoint(RELEASED)
    assert ckpt.arch == "patch_cnn" and ckpt.pre().size == 96
    assert ckpt.threshold is not None and ckpt.threshold_info["chosen_on"] == "val"
    assert f"{ckpt.threshold:.4f}" in CARD.read_text()
    assert entry.sha256 in CARD.read_text()


@pytest.mark.real_data("pcam-subset")
@pytest.mark.slow
def test_the_released_model_reproduces_its_validation_auc(shared_data):
    root = shared_data / "pcam-subset"
    valid = build_index(root)
    valid = valid[valid["split"] == "val"]
    assert len(valid) == 3000
    predictor = Predictor.from_pretrained("pcam-patch-cnn", device="cpu")
    out = predictor.predict_table(root, valid, batch_size=256, progress=False)
    auc = roc_auc(out["target"].to_numpy(), out["probability"].to_numpy())
    assert auc == pytest.approx(_card_figure("ROC AUC, one view"), abs=0.002)
