"""Predictor: loading a checkpoint, predicting tables and images, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from breast_cancer_detection.config import TrainConfig, load_preset
from breast_cancer_detection.data.breakhis import build_index
from breast_cancer_detection.engine import fit
from breast_cancer_detection.inference import Predictor


@pytest.fixture(scope="module")
def trained(fake_breakhis, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = TrainConfig.from_dict({**load_preset("cpu-smoke"), "data": str(fake_breakhis),
                                 "runs_dir": str(tmp), "name": "r", "size": 32, "resize": 40,
                                 "epochs": 3, "val": 0.25, "test": 0.2})
    return fit(cfg, progress=False).run_dir / "best.pt"


def test_predict_table_matches_single_predictions(trained, fake_breakhis):
    pred = Predictor.from_checkpoint(trained, device="cpu")
    assert pred.threshold == 0.5 and "default" in pred.threshold_source
    index = build_index(fake_breakhis).iloc[:10]
    table = pred.predict_table(fake_breakhis, index, batch_size=4, progress=False)
    assert table["error"].eq("").all()
    singles = pred.predict([fake_breakhis / p for p in index["path"]])
    np.testing.assert_allclose(table["probability"], [s.p_malignant for s in singles], atol=1e-5)
    assert all(abs(sum(s.probabilities.values()) - 1) < 1e-5 for s in singles)
    assert [s.label for s in singles] == [
        "malignant" if p >= 0.5 else "benign" for p in table["probability"]]


def test_predict_accepts_pil_and_arrays_and_reports_bad_files(trained, fake_breakhis, tmp_path):
    pred = Predictor.from_checkpoint(trained, device="cpu")
    path = sorted(fake_breakhis.rglob("*.png"))[0]
    im = Image.open(path).convert("RGB")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    out = pred.predict([path, im, np.asarray(im), bad])
    assert out[0].p_malignant == pytest.approx(out[1].p_malignant, abs=1e-6)
    assert out[0].p_malignant == pytest.approx(out[2].p_malignant, abs=1e-6)
    assert out[3].error and "bad.png" in out[3].error and np.isnan(out[3].p_malignant)
    index = build_index(fake_breakhis).iloc[:3].copy()
    (tmp_path / "t").mkdir()
    for p in index["path"]:
        dst = tmp_path / "t" / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((fake_breakhis / p).read_bytes())
    (tmp_path / "t" / index["path"].iloc[1]).write_bytes(b"")
    table = pred.predict_table(tmp_path / "t", index, progress=False)
    assert table["error"].ne("").tolist() == [False, True, False]
    assert table["prediction"].iloc[1] == -1 and np.isnan(table["probability"].iloc[1])
