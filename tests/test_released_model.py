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


def _card_figure(label: str, card: Path = CARD) -> float:
    """A number from the model card's table row that starts with ``label``."""
    m = re.search(rf"^\| {re.escape(label)} \| \*?\*?([0-9.]+)", card.read_text(), re.M)
    assert m, f"no '{label}' row in {card}"
    return float(m[1])


def _valid_auc(shared_data: Path, name: str) -> float:
    """One-view ROC AUC of the registered model ``name`` on PCam's 3,000 valid patches."""
    root = shared_data / "pcam-subset"
    valid = build_index(root)
    valid = valid[valid["split"] == "val"]
    assert len(valid) == 3000
    predictor = Predictor.from_pretrained(name, device="cpu")
    out = predictor.predict_table(root, valid, batch_size=256, progress=False)
    return roc_auc(out["target"].to_numpy(), out["probability"].to_numpy())


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
    auc = _valid_auc(shared_data, "pcam-patch-cnn")
    assert auc == pytest.approx(_card_figure("ROC AUC, one view"), abs=0.002)


BREAKHIS = ROOT / "checkpoints" / "breakhis-patch-cnn.pt"
BREAKHIS_CARD = ROOT / "checkpoints" / "breakhis-patch-cnn.md"


def test_the_breakhis_model_is_the_registered_file_with_its_card():
    entry = trained_model("breakhis-patch-cnn")
    assert entry.path == BREAKHIS and BREAKHIS.is_file()
    assert entry.sha256 == sha256_of(BREAKHIS)
    assert BREAKHIS.stat().st_size <= 16 * 1024 * 1024  # the limit for a committed model
    ckpt = load_checkpoint(BREAKHIS)
    assert ckpt.arch == "patch_cnn" and ckpt.pre().size == 224 and ckpt.resume is None
    assert not ckpt.config["pretrained"] and ckpt.config["data"].endswith("breakhis-real")
    # Trained on every image: no patient held out, so the threshold came from the CV.
    assert not ckpt.split_patients.get("val") and not ckpt.split_patients.get("test")
    assert len(ckpt.split_patients["train"]) == 18
    assert ckpt.threshold_info["chosen_on"] == "cv out-of-fold"
    card = BREAKHIS_CARD.read_text()
    assert f"{ckpt.threshold:.4f}" in card and entry.sha256 in card
    assert "not a diagnostic device" in card and "141" in card and "18 patients" in card


@pytest.mark.real_data("breakhis-samples")
def test_bcd_predict_scores_breakhis_images_with_the_breakhis_model_by_default(
        shared_data, tmp_path, capsys):
    from breast_cancer_detection.cli import main

    images = sorted((shared_data / "breakhis-samples").rglob("*.png"))[:2]
    out = tmp_path / "p.csv"
    assert main(["predict", *map(str, images), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "default trained model for images, breakhis-patch-cnn" in err
    assert "ranks BreakHis images only weakly" not in err  # the right model: no warning
    import pandas as pd

    table = pd.read_csv(out, keep_default_na=False)
    assert (table["error"] == "").all() and table["label"].isin(["benign", "malignant"]).all()
    # The PCam model on the same images warns, stating what was measured.
    assert main(["predict", "--model", "pcam-patch-cnn", *map(str, images), "--out",
                 str(out), "--quiet"]) == 0
    assert "ranks BreakHis images only weakly" in capsys.readouterr().err


def test_a_96_px_patch_given_to_the_breakhis_model_points_to_the_patch_model(tmp_path):
    from PIL import Image

    patch = tmp_path / "patch.png"
    Image.new("RGB", (96, 96), (200, 120, 180)).save(patch)
    (pred,) = Predictor.from_pretrained("breakhis-patch-cnn", device="cpu").predict([patch])
    assert pred.error, "a 96 px patch must be refused, not answered"
    assert "96x96 pixels is too small" in pred.error and "--model pcam-patch-cnn" in pred.error


MOBILENET = ROOT / "checkpoints" / "pcam-mobilenet-v2.pt"
MOBILENET_CARD = ROOT / "checkpoints" / "pcam-mobilenet-v2.md"


def test_the_pcam_mobilenet_is_the_registered_file_with_its_card():
    entry = trained_model("pcam-mobilenet-v2")
    assert entry.path == MOBILENET and MOBILENET.is_file()
    assert entry.sha256 == sha256_of(MOBILENET) and entry.sha256 in MOBILENET_CARD.read_text()
    assert MOBILENET.stat().st_size <= 16 * 1024 * 1024  # the limit for a committed model
    assert not entry.default and not entry.slide_default  # pcam-patch-cnn stays the default
    ckpt = load_checkpoint(MOBILENET)
    assert ckpt.arch == "mobilenet_v2" and ckpt.pre().size == 96 and ckpt.mpp == 0.972
    assert ckpt.config["pretrained"] and ckpt.resume is None
    assert ckpt.threshold_info["chosen_on"] == "val"
    assert f"{ckpt.threshold:.4f}" in MOBILENET_CARD.read_text()
    assert not ckpt.int8_onnx  # its int8 export failed the gate: the card says so


@pytest.mark.real_data("pcam-subset")
@pytest.mark.slow
def test_the_pcam_mobilenet_reproduces_its_validation_auc(shared_data):
    auc = _valid_auc(shared_data, "pcam-mobilenet-v2")
    assert auc == pytest.approx(_card_figure("ROC AUC, one view", MOBILENET_CARD), abs=0.002)
