"""ONNX export: metadata, dynamic batch, agreement with PyTorch, the ONNX-backed Predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from breast_cancer_detection.checkpoint import load_checkpoint, save_checkpoint
from breast_cancer_detection.cli import main
from breast_cancer_detection.data.breakhis import build_index
from breast_cancer_detection.errors import UserError
from breast_cancer_detection.export import (
    ExportError,
    OnnxModel,
    export_onnx,
    read_onnx_metadata,
)
from breast_cancer_detection.inference import Predictor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def checkpoint(trained_run, tmp_path_factory) -> Path:
    """The session's tiny checkpoint, with a threshold stored as `bcd evaluate` would."""
    ckpt = load_checkpoint(trained_run / "best.pt")
    ckpt.threshold = 0.4321
    path = tmp_path_factory.mktemp("export") / "best.pt"
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def onnx_path(checkpoint) -> Path:
    return export_onnx(checkpoint, checkpoint.with_name("model.onnx"))


def test_export_carries_preprocessing_and_a_dynamic_batch(onnx_path, checkpoint):
    meta = read_onnx_metadata(onnx_path)
    ckpt = load_checkpoint(checkpoint)
    assert meta["size"] == 32 and meta["resize"] == 40 and meta["arch"] == "tiny"
    assert meta["mean"] == pytest.approx(ckpt.preprocessing["mean"])
    assert meta["std"] == pytest.approx(ckpt.preprocessing["std"])
    assert meta["classes"] == ["benign", "malignant"] and meta["threshold"] == 0.4321
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    for n in (1, 3, 5):
        (logits,) = session.run(None, {"image": np.zeros((n, 3, 32, 32), np.float32)})
        assert logits.shape == (n, 2)


@pytest.mark.slow
def test_onnx_probabilities_match_pytorch(onnx_path, checkpoint, fake_breakhis):
    torch_pred = Predictor.from_checkpoint(checkpoint, device="cpu")
    onnx_pred = Predictor.from_onnx(onnx_path)
    assert onnx_pred.backend == "onnx" and onnx_pred.threshold == 0.4321
    assert Predictor.from_checkpoint(onnx_path).backend == "onnx"  # handed on by suffix
    assert onnx_pred.pre == torch_pred.pre and onnx_pred.classes == torch_pred.classes
    files = sorted(fake_breakhis.rglob("*.png"))[::9][:4]
    for batch_size in (1, 3):
        a = torch_pred.predict(files, batch_size=batch_size)
        b = onnx_pred.predict(files, batch_size=batch_size)
        pa = np.array([list(p.probabilities.values()) for p in a])
        pb = np.array([list(p.probabilities.values()) for p in b])
        np.testing.assert_allclose(pb, pa, atol=1e-4, rtol=0)
        assert [p.label for p in a] == [p.label for p in b]
    # Tiling and TTA run through the same backend-neutral path.
    big = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    ta, tb = torch_pred.predict(big, tta=True)[0], onnx_pred.predict(big, tta=True)[0]
    assert tb.heatmap.shape == ta.heatmap.shape
    np.testing.assert_allclose(tb.heatmap, ta.heatmap, atol=1e-4, rtol=0)


def test_two_lanes_predict_what_one_does_in_order_with_bad_inputs_in_place(
        onnx_path, fake_breakhis, tmp_path, monkeypatch):
    import os
    import threading

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    onnx_pred = Predictor.from_onnx(onnx_path)
    assert onnx_pred.lanes(0) == 2 and onnx_pred.lanes(2) == 1
    assert onnx_pred.for_lanes(1) is onnx_pred
    per_lane = onnx_pred.for_lanes(2)  # one thread a run: a session of its own, kept
    assert per_lane is onnx_pred.for_lanes(2) and per_lane.model is not onnx_pred.model
    (tmp_path / "bad.png").write_bytes(b"not an image")
    big = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    files = sorted(fake_breakhis.rglob("*.png"))[:7]
    inputs = [*files[:3], tmp_path / "bad.png", big, *files[3:]]
    seen = set()
    real = Predictor.probabilities

    def spy(self, x, **kw):
        seen.add(threading.current_thread().name)
        return real(self, x, **kw)

    monkeypatch.setattr(Predictor, "probabilities", spy)
    lanes = onnx_pred.predict(inputs, batch_size=2)
    assert len(seen) == 2  # both lanes scored
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    one = onnx_pred.predict(inputs, batch_size=2)
    assert [p.source for p in lanes] == [p.source for p in one]
    assert [p.source for p in lanes][:3] == [str(f) for f in files[:3]]
    assert lanes[3].label == "error" and "bad.png" in lanes[3].error
    assert lanes[4].heatmap is not None
    ok = [i for i in range(len(inputs)) if i != 3]
    np.testing.assert_allclose([lanes[i].p_malignant for i in ok],
                               [one[i].p_malignant for i in ok], atol=1e-5)


def test_onnx_backend_runs_predict_table(onnx_path, checkpoint, fake_breakhis):
    index = build_index(fake_breakhis).iloc[:6]
    a = Predictor.from_checkpoint(checkpoint).predict_table(fake_breakhis, index, progress=False)
    b = Predictor(onnx_path, Predictor.from_onnx(onnx_path).pre, backend="onnx",
                  threshold=0.4321).predict_table(fake_breakhis, index, batch_size=4,
                                                  progress=False)
    np.testing.assert_allclose(b["probability"], a["probability"], atol=1e-4, rtol=0)
    assert (b["prediction"] == a["prediction"]).all()


def test_an_export_that_disagrees_with_pytorch_is_refused(checkpoint, tmp_path, monkeypatch):
    # The check against PyTorch: an ONNX model whose malignant logit is off by 0.5 is refused.
    real = OnnxModel.forward
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: real(self, x) + torch.tensor(
        [0.0, 0.5]))
    with pytest.raises(ExportError, match="differs from PyTorch by"):
        export_onnx(checkpoint, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_with_non_finite_output_is_not_blamed_on_onnx(checkpoint, tmp_path):
    # NaN weights: the message names the broken model, not "differs by nan, try an opset".
    ckpt = load_checkpoint(checkpoint)
    first = next(k for k, v in ckpt.state_dict.items() if v.is_floating_point())
    ckpt.state_dict[first] = torch.full_like(ckpt.state_dict[first], float("nan"))
    with pytest.raises(ExportError, match="own PyTorch output is not finite") as failed:
        export_onnx(ckpt, tmp_path / "m.onnx")
    assert "weights are broken" in str(failed.value) and "opset" not in str(failed.value)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_not_our_onnx_file_is_refused(tmp_path):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(plain), dynamo=False)
    with pytest.raises(UserError, match="not a model written by `bcd export"):
        Predictor.from_onnx(plain)
    with pytest.raises(UserError, match="no such ONNX model"):
        Predictor.from_onnx(tmp_path / "missing.onnx")


def test_cli_export_then_predict_with_the_onnx_model(checkpoint, fake_breakhis, tmp_path, capsys):
    out = tmp_path / "m" / "model.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(out)]) == 0
    assert "matches PyTorch within 1e-4" in capsys.readouterr().out
    assert read_onnx_metadata(out)["threshold"] == 0.4321
    image = sorted(fake_breakhis.rglob("*.png"))[0]
    csv = tmp_path / "p.csv"
    assert main(["predict", str(out), str(image), "--out", str(csv), "--quiet"]) == 0
    row = csv.read_text().splitlines()[1].split(",")
    expected = Predictor.from_checkpoint(checkpoint).predict(image)[0].p_malignant
    assert float(row[3]) == pytest.approx(expected, abs=1e-4) and row[4] == "0.4321"
    assert main(["predict", str(out), str(image), "--out", str(csv), "--cam",
                 str(tmp_path / "c")]) == 2
    assert "--cam needs gradients" in capsys.readouterr().err
